"""Tests of the fused ops (torch.ops.avme.*) against the float64 reference.

One suite for two backends (see backends.py): the CPU emulator of the kernels, which runs
everywhere a C++ compiler does, and a CUDA device with the built extension. Small sizes on
the emulator; the paper's sizes on CUDA only. ``AVME_EXPECT_EXTENSION=1`` makes a missing
built extension a failure instead of a skip.

On a GPU machine, run it so that a crash names the test and the line::

    python -X faulthandler -m pytest tests/ops -v
"""
