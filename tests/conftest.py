"""Shared test set-up: a fixed seed per test, the `gpu` marker's skip, the device switch, and the share of the
CPU each pytest-xdist worker takes.

The device switch: tests that take the ``device`` fixture run on ``$PRIVIMAGE_TEST_DEVICE`` (default ``cpu``;
the GPU suite, ``bench/gpu_suite.sh``, re-runs them with ``cuda``) and are marked ``on_device`` so they can be
selected alone (``-m on_device``). Those that also take ``precision`` run once per dtype of
``$PRIVIMAGE_TEST_DTYPES`` (comma-separated torch dtype names, default ``float64``): float64 is checked to
tight absolute tolerances; any other dtype by ``within_precision``, i.e. against a float64 reference with a
tolerance from the dtype's own rounding (STYLE.md §3).

Under pytest-xdist (pyproject's addopts: a worker per core, at most 4, ``--dist loadscope``):
- each worker runs torch on its share of the cores (cores // workers, at least 1), and so do the processes it
  starts unless told otherwise (``OMP_NUM_THREADS``): W workers of the default all-core thread pools on a 2-core
  machine oversubscribe it, and busy-waiting OpenMP threads make that several times slower than one thread each;
- a module's tests run on one worker (loadscope), so a module fixture (a whole ``privimage run``, a trained
  classifier) is computed once, not once per worker that draws one of its tests;
- the modules holding ``slow`` tests are sent first: a scope cannot be split, so one left for the end keeps a
  worker busy after the other has run out of work.
"""

import functools
import os

import pytest
import torch

import kernel_cases


def pytest_configure(config):
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:  # an xdist worker (module docstring)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        share = max(1, cores // workers)
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        config.pluginmanager.register(_SlowModulesFirst(), "privimage-slow-modules-first")


class _SlowModulesFirst:
    """The modules (files) that hold a ``slow`` test first, each module's tests kept together and in their order
    (module docstring). Only in xdist workers: a run in one process keeps the collection order."""

    @pytest.hookimpl(trylast=True)  # after pytest's own reordering (fixtures) and deselection (-m, -k)
    def pytest_collection_modifyitems(self, items):
        slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # stable: the rest keeps its order


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
