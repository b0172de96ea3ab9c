"""``avme --help``, every ``avme <command> --help`` and argument errors answer without importing
torch (whose import takes seconds): the parsers are built from torch-free modules and each
subcommand imports its heavy modules when it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import run_in_repo, subprocess_env

COMMANDS = ("train", "sample", "eval", "plot", "export", "list-pretrained")


def _imported_modules(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime -m avme_ext ARGV``; the process and the modules it imported."""
    done = run_in_repo([sys.executable, "-X", "importtime", "-m", "avme_ext", *argv], env=subprocess_env(), timeout=120)
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done, modules


def _torch_modules(modules: set[str]) -> list[str]:
    return sorted(name for name in modules if name == "torch" or name.startswith("torch."))


@pytest.mark.parametrize("argv", [["--help"], *[[command, "--help"] for command in COMMANDS]], ids=" ".join)
def test_help_does_not_import_torch(argv):
    done, modules = _imported_modules(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: avme" in done.stdout
    assert "avme_ext.cli" in modules  # the measurement sees the command line's imports
    assert not _torch_modules(modules), _torch_modules(modules)[:5]


@pytest.mark.parametrize(
    "argv",
    [["train", "--out", "r", "--epochs", "0"], ["eval", "RUN", "--samples", "-1"], ["sample"], ["no-such-command"]],
    ids=" ".join,
)
def test_argument_errors_do_not_import_torch(argv):
    done, modules = _imported_modules(*argv)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error:" in done.stderr
    assert not _torch_modules(modules), _torch_modules(modules)[:5]


def test_the_console_entry_point_builds_every_parser_without_torch():
    code = (
        "import sys; from avme_ext.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    done = run_in_repo([sys.executable, "-c", code], env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
