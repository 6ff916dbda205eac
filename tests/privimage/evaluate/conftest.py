"""Evaluation tests run torch on one thread (restored afterwards): their batches are tiny, so a second thread
only adds synchronisation, and on a shared 2-core CPU two threads per process oversubscribe the cores
(measured: 35 s for this folder on one thread vs 145 s on two, at load average ~5)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every evaluation test on one torch thread (the shared fixture; pytestmark does not apply from a conftest)."""
