import numpy as np
import torch

from privimage.evaluate.features import extract_features, load_proxy_classifier, proxy_feature_net
from privimage.evaluate.classify import SmallCNN
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


def test_proxy_classifier_loads_and_gives_features_and_logits(tmp_path):
    torch.save(SmallCNN(1, 3, width=4), tmp_path / "classifier.pt")
    net = proxy_feature_net(load_proxy_classifier(tmp_path / "classifier.pt"))
    assert net.kind == "proxy" and net.metric_name("fid") == "proxy_fid"
    images = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    feats, logits = extract_features(net, images, batch_size=2)
    assert feats.shape == (5, 16) and logits.shape == (5, 3)
    # batching does not change the result (eval mode: no batch statistics)
    feats_one, _ = extract_features(net, images, batch_size=5)
    np.testing.assert_allclose(feats, feats_one, rtol=1e-5, atol=1e-6)


def test_bf16_is_a_cuda_only_path_and_a_no_op_on_cpu():
    net = proxy_feature_net(SmallCNN(3, 4, width=4))
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    fp32, _ = extract_features(net, images, bf16=False)
    bf16, _ = extract_features(net, images, bf16=True, device="cpu")
    np.testing.assert_array_equal(fp32, bf16)
