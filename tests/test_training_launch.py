"""Tests of how ``avme train`` starts: the cost estimate, the default run directory, concurrent runs,
Ctrl-C while starting, and option errors in command-line words (CPU, tiny model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from avme_ext.cli import main
from avme_ext.training import builders
from avme_ext.training.cost import CostEstimate, format_duration, plural
from avme_ext.training.run_dir import reserve_default_out_dir
from helpers import model_args, subprocess_env, subset_args

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [*model_args(8, 2, 2), *subset_args(200, 0), "--epochs", "1", "--no-progress"]


def test_cost_estimate_measures_after_the_first_steps_and_says_it_once() -> None:
    cost = CostEstimate(steps_per_epoch=500, steps_left=25_000, where="cuda:0 (a GPU)", skip=2, measure=5)
    assert cost.plan(50) == "500 steps per epoch, 25000 steps to go (50 epochs) on cuda:0 (a GPU)"
    times = [10.0, 30.0, 30.5, 31.0, 31.5, 32.0, 32.5]  # 20 s of start-up in the first step, then 0.5 s per step
    lines = [cost.step_done(now=t) for t in times]
    assert lines[:-1] == [None] * 6
    assert lines[-1] == (
        "measured 500.0 ms per step on cuda:0 (a GPU): about 4.2 min per epoch and 3.5 h for the "
        "25000 steps to go (training only; validation comes on top)"
    )
    assert cost.step_done(now=40.0) is None
    assert cost.step_done(now=50.0) is None


def test_plurals_and_durations() -> None:
    assert plural(1, "epoch") == "1 epoch"
    assert plural(0, "epoch") == "0 epochs"
    assert plural(2, "epoch") == "2 epochs"
    assert plural(1, "process", "es") == "1 process"
    assert plural(4, "process", "es") == "4 processes"
    assert format_duration(42.04) == "42.0 s"
    assert format_duration(390) == "6.5 min"
    assert format_duration(3 * 3600 + 720) == "3.2 h"


def test_default_run_directories_never_collide(tmp_path: Path) -> None:
    made = [reserve_default_out_dir(None, tmp_path / "runs") for _ in range(3)]  # within the same second, mostly
    assert len(set(made)) == 3
    assert all(path.is_dir() and not any(path.iterdir()) for path in made)
    assert reserve_default_out_dir("mine", tmp_path / "runs") == tmp_path / "runs" / "mine"
    assert not (tmp_path / "runs" / "mine").exists()  # a named directory is the user's: only checked later


def test_ctrl_c_while_starting_is_one_line_and_130(tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(builders, "load_training_data", interrupted)  # Ctrl-C while the data loads
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["avme train: interrupted (SIGINT)"]
    assert not out.exists()


def test_option_errors_use_command_line_words(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--lr", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "avme train: error: lr (--lr) must be a finite number > 0, got -1.0"
    assert main(["train", "--out", str(out), *TINY, "--train-subset", "70000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("avme train: error: --train-subset 70000 is larger than binarized_mnist/train")
    assert main(["train", "--out", str(out), *TINY, "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("avme train: error: --device 'cuda:7': ")
    assert len(err.splitlines()) == 1
    assert main(["train", *TINY, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "avme train: error: --resume needs --out DIR (the run directory to continue)"
    assert not out.exists()


@pytest.mark.slow  # two training subprocesses
def test_several_runs_at_once_without_out(tmp_path: Path) -> None:
    """Two ``avme train`` processes started together in one directory each get their own run directory."""
    command = [sys.executable, "-m", "avme_ext", "train", *TINY]
    env = subprocess_env()
    processes = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for process in processes:
        _, err = process.communicate(timeout=180)  # reads both pipes to the end and closes them
        results.append((process.returncode, err))
    assert all(code == 0 for code, _ in results), results
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    assert all((run / "last.safetensors").is_file() for run in runs)
