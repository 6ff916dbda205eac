"""Shared test set-up: a fixed seed per test, the `gpu` marker's skip, and the device switch.

The device switch: tests that take the ``device`` fixture run on ``$PRIVIMAGE_TEST_DEVICE`` (default ``cpu``;
the GPU suite, ``bench/gpu_suite.sh``, re-runs them with ``cuda``) and are marked ``on_device`` so they can be
selected alone (``-m on_device``). Those that also take ``precision`` run once per dtype of
``$PRIVIMAGE_TEST_DTYPES`` (comma-separated torch dtype names, default ``float64``): float64 is checked to
tight absolute tolerances; any other dtype by ``within_precision``, i.e. against a float64 reference with a
tolerance from the dtype's own rounding (STYLE.md §3).
"""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.on_device)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _test_dtypes() -> list[torch.dtype]:
    names = [n.strip() for n in os.environ.get("PRIVIMAGE_TEST_DTYPES", "float64").split(",") if n.strip()]
    dtypes = [getattr(torch, n, None) for n in names]
    bad = [n for n, d in zip(names, dtypes) if not isinstance(d, torch.dtype) or not d.is_floating_point]
    if bad:
        raise pytest.UsageError(f"PRIVIMAGE_TEST_DTYPES={os.environ['PRIVIMAGE_TEST_DTYPES']!r}: {bad} are not "
                                "torch floating-point dtype names (use e.g. float64,float32).")
    return dtypes


def pytest_generate_tests(metafunc):
    if "precision" in metafunc.fixturenames:
        dtypes = _test_dtypes()
        metafunc.parametrize("precision", dtypes, ids=[str(d).replace("torch.", "") for d in dtypes])


@pytest.fixture
def device():
    """``torch.device($PRIVIMAGE_TEST_DEVICE)``, default cpu. On CUDA, TF32 is switched off for the test, so
    float32 means float32 (cuDNN convolutions would otherwise round their inputs to 10-bit mantissas)."""
    dev = torch.device(os.environ.get("PRIVIMAGE_TEST_DEVICE") or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("PRIVIMAGE_TEST_DEVICE asks for CUDA but no CUDA device is present")
    if dev.type != "cuda":
        yield dev
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield dev
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _within_precision(ours, ref_same, ref64, atol: float, what: str = "") -> None:
    """err(ours) ≤ 2·err(reference at the same dtype) + atol·max|ref64|, errors against the float64 reference
    ``ref64`` (STYLE.md §3); on failure names the worst element with all three values."""
    ours, ref_same, ref64 = (torch.as_tensor(t).detach().cpu().double() for t in (ours, ref_same, ref64))
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    if ref64.numel() == 0:
        return
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = (ours - ref64).abs()
    bound = 2 * (ref_same - ref64).abs().max() + atol * ref64.abs().max().clamp_min(1e-30)
    if not err.max() <= bound:
        i = int(err.flatten().argmax())
        raise AssertionError(f"{what}: max error {float(err.max()):.3e} > bound {float(bound):.3e}; worst flat "
                             f"index {i}: ours {float(ours.flatten()[i]):.8g}, same-dtype reference "
                             f"{float(ref_same.flatten()[i]):.8g}, float64 {float(ref64.flatten()[i]):.8g}")


@pytest.fixture
def within_precision():
    """The precision check as a fixture (test files are not importable modules here):
    ``within_precision(ours, ref_same_dtype, ref_float64, atol, what)``."""
    return _within_precision
