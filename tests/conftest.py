"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Single-threaded CPU math, like subprocesses under torchrun (OMP_NUM_THREADS=1), so that results
    computed here and in a child process match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
