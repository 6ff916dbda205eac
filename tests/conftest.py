"""Shared test set-up: a fixed seed per test, the `gpu` marker's skip, and the device switch.

The device switch: tests that take the ``device`` fixture run on ``$PRIVIMAGE_TEST_DEVICE`` (default ``cpu``;
the GPU suite, ``bench/gpu_suite.sh``, re-runs them with ``cuda``) and are marked ``on_device`` so they can be
selected alone (``-m on_device``). Those that also take ``precision`` run once per dtype of
``$PRIVIMAGE_TEST_DTYPES`` (comma-separated torch dtype names, default ``float64``): float64 is checked to
tight absolute tolerances; any other dtype by ``within_precision``, i.e. against a float64 reference with a
tolerance from the dtype's own rounding (STYLE.md §3).
"""

import functools
import os

import pytest
import torch

import kernel_cases


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


@pytest.fixture
def within_precision():
    """The precision check (``kernel_cases.assert_within``) for results in any dtype:
    ``within_precision(ours, ref_same_dtype, ref_float64, atol, what)``."""
    return functools.partial(kernel_cases.assert_within, accumulated=False)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored afterwards): tiny batches gain nothing from a second thread,
    two threads per process oversubscribe a shared 2-core CPU, and a reference computed on one thread sums in
    the same order as the one-thread ranks of the distributed tests. Use with ``pytest.mark.usefixtures``."""
    from threads import one_torch_thread as on_one_thread

    with on_one_thread():
        yield
