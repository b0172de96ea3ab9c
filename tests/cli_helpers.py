"""Helpers of the command-line tests: a tiny run directory, running ``avme`` in-process, its one-line errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from avme_ext.checkpoint import save_checkpoint
from avme_ext.cli import main
from avme_ext.model import AVME
from helpers import ModelArgs

#: Sizes of the tiny model of :func:`tiny_run_dir`.
TINY_SIZES: ModelArgs = {"enc_hidden": 16, "dec_hidden": 16, "latent_dim": 4, "steps": 3, "impl": "ref"}


def tiny_run_dir(root: Path) -> Path:
    """A run directory ``root`` with best and last checkpoints (and their .json twins) of a tiny model."""
    torch.manual_seed(0)
    model = AVME(**TINY_SIZES)
    save_checkpoint(root / "best.safetensors", model)
    save_checkpoint(root / "last.safetensors", model)
    return root


def run_cli(argv: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``avme ARGV`` in this process: (exit status, stdout, stderr); argparse's exits included."""
    code: int | str | None
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    assert isinstance(code, int), code  # argparse exits with a status, never a message
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    """The one line of ``err``, checked to be ``avme <command>: error: ...`` without a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"avme {command}: error: "), err
    assert "Traceback" not in err
    assert "usage:" not in err
    return lines[0]
