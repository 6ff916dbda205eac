"""Shared helpers of the kernel tests: the precision check and random layer cases.

Imported by name (``import kernel_cases as H``): pyproject's pytest ``pythonpath`` puts tests/ on sys.path.
"""

import pytest
import torch
import torch.nn.functional as F

# (dtype, atol relative to the largest reference value). Kernels and references both accumulate in fp32
# from the same rounded inputs, so bf16 differs from fp32 only by its larger values' rounding in the sums.
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-4)]


def assert_within(ours, ref_same, ref64, atol, what="", *, accumulated=True):
    """err(ours) ≤ 2·err(reference at the same dtype) + atol·max|ref64| (STYLE.md §3), errors against the
    float64 reference, on any device; on failure name the worst element with all three values.

    ``accumulated``: ``ours`` must be float32 or float64 (the kernels accumulate norms and sums so).
    Also the ``within_precision`` fixture (tests/conftest.py), with ``accumulated=False``."""
    ours = torch.as_tensor(ours).detach()
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    if accumulated:
        assert ours.dtype in (torch.float32, torch.float64), f"{what}: result dtype {ours.dtype}, want fp32 accumulation"
    ours, ref_same, ref64 = (torch.as_tensor(t).detach().cpu().double() for t in (ours, ref_same, ref64))
    if ref64.numel() == 0:
        return
    assert torch.isfinite(ours).all(), f"{what}: non-finite values {ours}"
    err = (ours - ref64).abs()
    err_ref = (ref_same - ref64).abs().max()
    bound = 2 * err_ref + atol * ref64.abs().max().clamp_min(1e-30)
    if not err.max() <= bound:
        i = int(err.flatten().argmax())
        raise AssertionError(
            f"{what}: max error {float(err.max()):.3e} > bound {float(bound):.3e} (2 × reference error "
            f"{float(err_ref):.3e} + atol); worst flat index {i}: ours {float(ours.flatten()[i]):.8g}, "
            f"reference {float(ref_same.flatten()[i]):.8g}, float64 {float(ref64.flatten()[i]):.8g}; "
            f"{int((err > bound).sum())} of {err.numel()} elements outside")


# Conv2d cases: (R, C_in, C_out, H, W, kernel, stride, padding, dilation, groups), chosen for the odd shapes
# the issue names: batch 1 and 7, channels 3 and 5, H≠W, stride 2, groups 2, 1×1, dilation.
CONV_CASES = [
    pytest.param((1, 3, 5, 6, 5, 3, 1, 1, 1, 1), id="b1-c3to5-HneW"),
    pytest.param((7, 4, 6, 5, 7, 3, 2, 1, 1, 2), id="b7-stride2-groups2"),
    pytest.param((3, 5, 3, 4, 6, 1, 1, 0, 1, 1), id="1x1"),
    pytest.param((2, 4, 4, 7, 6, 3, 1, 2, 2, 2), id="dilation2-groups2"),
]
# Linear cases: (R, extra dims, d, p); 17/20 cross the interpreter's 16-wide tiles.
LINEAR_CASES = [
    pytest.param((1, (), 3, 5), id="b1-no-extra-dims"),
    pytest.param((7, (5,), 5, 3), id="b7-tokens"),
    pytest.param((4, (2, 3), 17, 20), id="two-extra-dims"),
]


def conv_case(spec, dtype=torch.float64):
    R, c_in, c_out, H, W, k, s, p, d, g = spec
    x = torch.randn(R, c_in, H, W, dtype=torch.float64)
    w = torch.randn(c_out, c_in // g, k, k, dtype=torch.float64)
    out = F.conv2d(x, w, stride=s, padding=p, dilation=d, groups=g)
    go = torch.randn_like(out)
    geometry = dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=g)
    return x.to(dtype), go.to(dtype), geometry


def linear_case(spec, dtype=torch.float64):
    R, extra, d, p = spec
    return (torch.randn(R, *extra, d, dtype=torch.float64).to(dtype),
            torch.randn(R, *extra, p, dtype=torch.float64).to(dtype))


# Row layouts: (name, R → (sample_index, is_padding) or None); multi-row samples are ragged on purpose.
def rows(kind, R):
    if kind == "plain":
        return {}
    if kind == "padding":
        pad = torch.zeros(R, dtype=torch.bool)
        pad[R // 2] = True
        return {"is_padding": pad}
    if kind == "all-padding":
        return {"is_padding": torch.ones(R, dtype=torch.bool)}
    if kind == "multi-row":
        sample_index = torch.tensor([(r * 2) % 3 if r < 5 else r % 2 for r in range(R)])
        pad = torch.zeros(R, dtype=torch.bool)
        if R > 2:
            pad[1] = True
        return {"sample_index": sample_index, "is_padding": pad, "num_samples": 3}
    raise ValueError(kind)


ROW_KINDS = ["plain", "padding", "all-padding", "multi-row"]

