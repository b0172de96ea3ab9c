"""Shared fixtures, and the ``slow`` marker's option.

``pytest`` runs the fast suite; the tests marked ``@pytest.mark.slow`` (the large emulator
gradchecks, training runs in subprocesses, compiling with inductor) are deselected unless
``pytest --runslow`` asks for the full suite (as CI does) or a ``-m`` expression names the
marker (``pytest -m slow`` runs only them).
"""

from __future__ import annotations

import pytest
import torch

RUNSLOW = "--runslow"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        RUNSLOW, action="store_true", default=False,
        help="also run the tests marked slow: the full suite, as CI runs it",
    )  # fmt: skip


def _marker_expression_names_slow(config: pytest.Config) -> bool:
    return "slow" in (config.getoption("markexpr") or "")


def _runs_slow(config: pytest.Config) -> bool:
    """The slow tests are collected: --runslow, or a -m expression that names the marker."""
    return config.getoption(RUNSLOW) or _marker_expression_names_slow(config)


def pytest_report_header(config: pytest.Config) -> str:
    if config.getoption(RUNSLOW):
        return f"slow tests: included ({RUNSLOW})"
    if _marker_expression_names_slow(config):
        return "slow tests: as the -m expression selects"
    return f"slow tests: deselected ({RUNSLOW} runs the full suite)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests marked slow unless asked for (deselected, not skipped: the skip list
    stays the list of what cannot run on this machine)."""
    if _runs_slow(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _runs_slow(config):  # whatever was deselected, -k or -m left it out, not the marker
        return
    deselected = [item for item in terminalreporter.stats.get("deselected", []) if item.get_closest_marker("slow")]
    if deselected:
        tests = "test" if len(deselected) == 1 else "tests"
        terminalreporter.write_line(f"{len(deselected)} slow {tests} deselected; `pytest {RUNSLOW}` runs them too")


@pytest.fixture
def one_thread():
    """Single-threaded CPU math, like subprocesses under torchrun (OMP_NUM_THREADS=1), so that results
    computed here and in a child process match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
