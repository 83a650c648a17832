import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: examples.tasks


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole suite: these problems are small, and on a busy 2-core
    machine multi-threaded float64 eigh/SVD and tiny fits run 10-100x slower (OpenMP spin-waits).
    Bit-exact resume tests also need the same thread count in every run they compare."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
