import numpy as np

from privimage.evaluate.plots import COLOURS, _nice_ticks, line_plot


def test_line_plot_draws_the_series_where_it_belongs():
    img = line_plot({"a": ([0, 10], [0, 10])}, width=200, height=150, title="t")
    assert img.shape == (150, 200, 3) and img.dtype == np.uint8
    blue = np.all(img == COLOURS[0], axis=-1)
    ys, xs = np.nonzero(blue[:, :150])  # ignore the legend swatch at the top right
    # a rising diagonal: the leftmost blue pixels are low in the image, the rightmost high
    assert ys[xs.argmin()] > ys[xs.argmax()] + 40


def test_line_plot_survives_constant_single_and_nan_series():
    img = line_plot({"flat": ([0, 1, 2], [3, 3, 3]), "one": ([5], [1]), "gaps": ([0, 1, 2], [np.nan, 1, np.inf])})
    assert np.all(img == COLOURS[0], axis=-1).any() and np.all(img == COLOURS[1], axis=-1).any()
    assert line_plot({}).shape == (360, 640, 3)


def test_ticks_are_round_numbers_inside_the_range():
    ticks = _nice_ticks(-0.03, 0.97)
    np.testing.assert_allclose(ticks, [0.0, 0.2, 0.4, 0.6, 0.8])
    assert not np.signbit(ticks).any()
