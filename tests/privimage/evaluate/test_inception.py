"""The FID Inception: state-dict keys/shapes of pt_inception-2015-12-05-6726825d.pth, forward, preprocessing."""

import numpy as np
import pytest
import torch

from privimage.evaluate.inception import (
    FIDInceptionV3,
    find_inception_weights,
    load_fid_inception,
    preprocess,
)


def _conv(name, c_in, c_out, k):
    kh, kw = (k, k) if isinstance(k, int) else k
    return [(name, c_in, c_out, kh, kw)]


def _block_a(p, c_in, pool):
    return (_conv(f"{p}.branch1x1", c_in, 64, 1) + _conv(f"{p}.branch5x5_1", c_in, 48, 1)
            + _conv(f"{p}.branch5x5_2", 48, 64, 5) + _conv(f"{p}.branch3x3dbl_1", c_in, 64, 1)
            + _conv(f"{p}.branch3x3dbl_2", 64, 96, 3) + _conv(f"{p}.branch3x3dbl_3", 96, 96, 3)
            + _conv(f"{p}.branch_pool", c_in, pool, 1))


def _block_c(p, c7):
    return (_conv(f"{p}.branch1x1", 768, 192, 1) + _conv(f"{p}.branch7x7_1", 768, c7, 1)
            + _conv(f"{p}.branch7x7_2", c7, c7, (1, 7)) + _conv(f"{p}.branch7x7_3", c7, 192, (7, 1))
            + _conv(f"{p}.branch7x7dbl_1", 768, c7, 1) + _conv(f"{p}.branch7x7dbl_2", c7, c7, (7, 1))
            + _conv(f"{p}.branch7x7dbl_3", c7, c7, (1, 7)) + _conv(f"{p}.branch7x7dbl_4", c7, c7, (7, 1))
            + _conv(f"{p}.branch7x7dbl_5", c7, 192, (1, 7)) + _conv(f"{p}.branch_pool", 768, 192, 1))


def _block_e(p, c_in):
    return (_conv(f"{p}.branch1x1", c_in, 320, 1) + _conv(f"{p}.branch3x3_1", c_in, 384, 1)
            + _conv(f"{p}.branch3x3_2a", 384, 384, (1, 3)) + _conv(f"{p}.branch3x3_2b", 384, 384, (3, 1))
            + _conv(f"{p}.branch3x3dbl_1", c_in, 448, 1) + _conv(f"{p}.branch3x3dbl_2", 448, 384, 3)
            + _conv(f"{p}.branch3x3dbl_3a", 384, 384, (1, 3)) + _conv(f"{p}.branch3x3dbl_3b", 384, 384, (3, 1))
            + _conv(f"{p}.branch_pool", c_in, 192, 1))


# The published architecture (Szegedy et al. 2015, arXiv 1512.00567, as torchvision's Inception3 names it,
# aux_logits=False, 1008 classes), written out conv by conv: every BasicConv2d contributes conv.weight and
# bn.{weight, bias, running_mean, running_var} to the weights file.
CONVS = (
    _conv("Conv2d_1a_3x3", 3, 32, 3) + _conv("Conv2d_2a_3x3", 32, 32, 3) + _conv("Conv2d_2b_3x3", 32, 64, 3)
    + _conv("Conv2d_3b_1x1", 64, 80, 1) + _conv("Conv2d_4a_3x3", 80, 192, 3)
    + _block_a("Mixed_5b", 192, 32) + _block_a("Mixed_5c", 256, 64) + _block_a("Mixed_5d", 288, 64)
    + _conv("Mixed_6a.branch3x3", 288, 384, 3) + _conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    + _conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3) + _conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    + _block_c("Mixed_6b", 128) + _block_c("Mixed_6c", 160) + _block_c("Mixed_6d", 160) + _block_c("Mixed_6e", 192)
    + _conv("Mixed_7a.branch3x3_1", 768, 192, 1) + _conv("Mixed_7a.branch3x3_2", 192, 320, 3)
    + _conv("Mixed_7a.branch7x7x3_1", 768, 192, 1) + _conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7))
    + _conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)) + _conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    + _block_e("Mixed_7b", 1280) + _block_e("Mixed_7c", 2048)
)


def expected_weights_file_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, c_in, c_out, kh, kw in CONVS:
        shapes[f"{name}.conv.weight"] = (c_out, c_in, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{stat}"] = (c_out,)
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def test_state_dict_keys_and_shapes_are_those_of_the_weights_file():
    expected = expected_weights_file_shapes()
    assert len(CONVS) == 94 and len(expected) == 94 * 5 + 2
    state = FIDInceptionV3().state_dict()
    ours = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert ours == expected
    # the only other entries: BatchNorm's counters (present or not in a file, depending on the torch that wrote it)
    assert {k for k in state if k.endswith("num_batches_tracked")} == {f"{c[0]}.bn.num_batches_tracked" for c in CONVS}


def test_loads_a_weights_file_with_and_without_batchnorm_counters(tmp_path):
    source = FIDInceptionV3()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = source.state_dict()
    torch.save(state, tmp_path / "full.pth")
    old_style = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old_style, tmp_path / "old.pth")
    for name in ("full.pth", "old.pth"):
        net = load_fid_inception(tmp_path / name)
        assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, source.Mixed_7c.branch_pool.conv.weight)
        assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_wrong_weights_are_refused_with_the_file_name(tmp_path):
    state = FIDInceptionV3().state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "imagenet1000.pth")
    with pytest.raises(ValueError, match=r"imagenet1000.pth: fc.weight has shape \(1000, 2048\)"):
        load_fid_inception(tmp_path / "imagenet1000.pth")
    del state["fc.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth do not match.*fc.weight"):
        load_fid_inception(tmp_path / "partial.pth")


def test_weights_path_from_argument_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PRIVIMAGE_INCEPTION_WEIGHTS", raising=False)
    assert find_inception_weights(None) is None
    monkeypatch.setenv("PRIVIMAGE_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=r"missing.pth \(from \$PRIVIMAGE_INCEPTION_WEIGHTS\)"):
        find_inception_weights(None)
    (tmp_path / "w.pth").write_bytes(b"x")
    assert find_inception_weights(tmp_path / "w.pth") == tmp_path / "w.pth"


def test_forward_on_random_weights_gives_2048_features():
    net = FIDInceptionV3().eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        feats, logits = net(preprocess(x))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # average of ReLU outputs


def _bilinear_reference(img: np.ndarray, out: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), written out for one (H, W) image."""
    h, w = img.shape

    def coords(n_in):
        src = np.maximum((np.arange(out) + 0.5) * n_in / out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = coords(h)
    x0, x1, wx = coords(w)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


def test_preprocess_matches_the_reference_resize_and_normalisation():
    # pytorch-fid: uint8 -> [0, 1] -> bilinear to 299 (align_corners=False) -> 2x - 1; grey repeated to RGB.
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (1, 1, 7, 5), dtype=np.uint8)  # odd, non-square on purpose
    out = preprocess(torch.from_numpy(grey))
    assert out.shape == (1, 3, 299, 299) and out.dtype == torch.float32
    expected = 2 * _bilinear_reference(grey[0, 0].astype(np.float64) / 255, 299) - 1
    for c in range(3):
        np.testing.assert_allclose(out[0, c].numpy(), expected, atol=2e-6)
    assert out.min() >= -1 and out.max() <= 1
    # float input in [0, 1] is taken as is; a 299x299 input is not resampled
    x = torch.rand(1, 3, 299, 299)
    torch.testing.assert_close(preprocess(x), 2 * x - 1)


def _pool_branch_input(block, x, pooled):
    with torch.no_grad():
        out = block(x)
        return out[:, -block.branch_pool.conv.out_channels:], block.branch_pool(pooled)


def test_fid_specific_pooling_of_the_2015_graph():
    # TensorFlow's SAME average pool excludes padding from the mean (A, C and the first E block), and the
    # second E block (Mixed_7c) max-pools: the two places where the FID graph differs from torchvision's.
    from torch.nn import functional as F

    net = FIDInceptionV3().eval()
    x = torch.rand(1, 288, 7, 7) + 0.5  # positive, so padded zeros would change an average
    got, want = _pool_branch_input(net.Mixed_5d, x, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    torch.testing.assert_close(got, want)
    _, wrong = _pool_branch_input(net.Mixed_5d, x, F.avg_pool2d(x, 3, 1, 1, count_include_pad=True))
    assert not torch.allclose(got, wrong)
    x = torch.rand(1, 2048, 5, 5) - 0.5
    got, want = _pool_branch_input(net.Mixed_7c, x, F.max_pool2d(x, 3, 1, 1))
    torch.testing.assert_close(got, want)
    x = torch.rand(1, 1280, 5, 5) + 0.5
    got, want = _pool_branch_input(net.Mixed_7b, x, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    torch.testing.assert_close(got, want)
