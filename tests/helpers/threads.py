"""torch on one thread for a block (the function-scoped ``one_torch_thread`` fixture of tests/conftest.py is this;
a module-scoped fixture, which runs outside it, uses it directly)."""

import contextlib

import torch


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside, the caller's thread count restored afterwards, however the block ends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
