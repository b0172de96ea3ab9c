"""The emulator's serial schedules (csrc/emulation/cuda_emulation.h): one warp at a time, blocks
and warps in ascending ("forward") or descending ("reverse") order from one barrier to the next.

A missing barrier then gives a wrong result every time, whichever side of it runs first (the
self-test kernels of csrc/emulation/schedule_selftest.h), and every kernel design gives the
reference's results under both orders: forward and backward (fp32, whose persistent products are
the tensor-core fragments, and fp64, CUDA-core FMA) and the sampler, with several blocks and
warps.
"""

from __future__ import annotations

import pytest
import torch

from .helpers import CASES, Case, compare_sample_with_reference, compare_with_reference

SERIAL = ("forward", "reverse")
#: What each self-test unit sees of its neighbour's write when the barrier is there.
SELFTEST_EXPECTED = {"grid": [2.0, 3.0, 1.0], "block": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1.0]}
#: Several blocks (the emulated SM count) with partial ones, classes, both encoder inputs.
MULTI_BLOCK = [c for c in CASES if "emulator" in c.on and not c.slow and c.sms > 1 and c.K > 1]


def test_cases_cover_several_blocks():
    assert len(MULTI_BLOCK) >= 2
    assert {c.encoder_input for c in MULTI_BLOCK} == {"canvas", "error"}


@pytest.mark.parametrize("barrier", ["grid", "block"])
def test_serial_schedules_turn_a_missing_barrier_into_a_wrong_result(emulator_backend, barrier):
    ns = emulator_backend.ns
    for schedule in ("concurrent", *SERIAL):
        ns.set_schedule(schedule)
        assert ns.schedule() == schedule
        assert ns.schedule_selftest(barrier, True).tolist() == SELFTEST_EXPECTED[barrier]
    for schedule in SERIAL:
        ns.set_schedule(schedule)
        seen = ns.schedule_selftest(barrier, False).tolist()
        # the unit that runs first reads its neighbour's slot before the write
        stale = 0 if schedule == "forward" else -1
        assert seen[stale] != SELFTEST_EXPECTED[barrier][stale]
        assert seen != SELFTEST_EXPECTED[barrier]


def test_an_unknown_schedule_is_refused(emulator_backend):
    with pytest.raises(ValueError, match="schedule must be 'concurrent', 'forward' or 'reverse', got 'random'"):
        emulator_backend.ns.set_schedule("random")


def _case_params() -> list[object]:
    """Every MULTI_BLOCK case in fp32 and fp64; the first case's fp32 run in the fast suite, the
    others marked slow."""
    return [
        pytest.param(case, dtype, id=f"{case.id}-{name}", marks=() if (i, name) == (0, "fp32") else pytest.mark.slow)
        for i, case in enumerate(MULTI_BLOCK)
        for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64"))
    ]


@pytest.mark.parametrize("schedule", SERIAL)
@pytest.mark.parametrize(("case", "dtype"), _case_params())
def test_forward_and_backward_under_serial_schedules(
    emulator_backend, case: Case, dtype, schedule, emu_sms, each_design
):
    emu_sms(case.sms)
    emulator_backend.ns.set_schedule(schedule)
    compare_with_reference(emulator_backend, case, dtype=dtype)


@pytest.mark.parametrize("schedule", SERIAL)
def test_sampler_under_serial_schedules(emulator_backend, schedule, emu_sms, each_design):
    emu_sms(3)
    emulator_backend.ns.set_schedule(schedule)
    compare_sample_with_reference(emulator_backend, 5, 3, CASES[4].sizes, 2)
