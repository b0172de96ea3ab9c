"""The fast suite leaves out exactly the tests marked slow, and ``pytest --runslow`` (what CI runs)
collects every test: checked on the collection of a module that marks a whole test and one
parametrisation of another slow."""

from __future__ import annotations

import sys

import pytest

from helpers import run_in_repo

MODULE = "tests/test_module_compile.py"


def collected(*options: str) -> tuple[set[str], str]:
    """The node ids ``pytest --collect-only`` selects with ``options``, and its summary line."""
    result = run_in_repo([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *options, MODULE], timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    return {line for line in lines if "::" in line}, next(line for line in reversed(lines) if "collected" in line)


@pytest.fixture(scope="module")
def selections() -> dict[str, tuple[set[str], str]]:
    return {"default": collected(), "runslow": collected("--runslow")}


def test_default_run_deselects_exactly_the_slow_tests(selections):
    fast, summary = selections["default"]
    everything, _ = selections["runslow"]
    slow = everything - fast
    assert fast
    assert slow
    assert fast < everything
    assert summary.startswith(f"{len(fast)}/{len(everything)} tests collected ({len(slow)} deselected)"), summary
    # a whole test, and the two parametrisations of a test of which one is slow
    assert f"{MODULE}::test_inductor_loss_forward_and_backward_match_eager" in slow
    assert f"{MODULE}::test_compiled_loss_forward_and_backward_match_eager[3-error]" in slow
    assert f"{MODULE}::test_compiled_loss_forward_and_backward_match_eager[0-canvas]" in fast


def test_runslow_collects_every_test(selections):
    everything, summary = selections["runslow"]
    assert summary.startswith(f"{len(everything)} tests collected in"), summary
