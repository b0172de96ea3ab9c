"""Fault tolerance of ``avme train``: kills, signals, non-finite values and bad files (CPU, tiny model).

Every interrupted run (a subprocess) is resumed and compared bit for bit with an uninterrupted run of
the same seed. Subprocesses (OMP_NUM_THREADS=1) and in-process runs (torch.set_num_threads(1)) all
compute single-threaded, so they give the same bits.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from avme_ext import training as T
from avme_ext.checkpoint import CheckpointError, load_checkpoint, load_model
from avme_ext.cli import main
from avme_ext.training import schedule
from avme_ext.training import trainer as trainer_module
from helpers import REPO, model_args, subprocess_env, subset_args

TIMEOUT = 120
# 1000 images, batch 50: 20 steps per epoch, 40 in all
ARGS = [
    *model_args(32, 8, 4),
    *subset_args(1000, 200),
    "--batch-size",
    "50",
    "--epochs",
    "2",
    "--log-every",
    "1",
    "--no-progress",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def spawn(*args: str, script: str | None = None) -> subprocess.Popen[str]:
    """Start ``avme train ARGS`` (or ``python -c script ARGS``) in a subprocess."""
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "avme_ext", "train"]
    return subprocess.Popen(
        [*head, *args], env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, err


def resume(out: Path, *extra: str) -> None:
    """Resume in-process (single-threaded, like the subprocesses: the same bits, without a second start-up)."""
    assert main(["train", "--out", str(out), "--resume", "--no-progress", *extra]) == 0


def wait_for(predicate, process: subprocess.Popen[str], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"process ended ({process.returncode}) before {what}: {err}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_same_run(reference: Path, out: Path) -> None:
    """Same weights and Adam state bit for bit, and the same metrics apart from wall-clock fields."""
    a, b = load_file(reference / "last.safetensors"), load_file(out / "last.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs from the uninterrupted run"

    def strip(run: Path) -> list[dict[str, object]]:
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("time", "examples_per_s", "seconds")}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert strip(out) == strip(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (in-process, single-threaded: bit for bit what a subprocess computes)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    torch.set_num_threads(1)
    assert main(["train", "--out", str(out), *ARGS]) == 0
    return out


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(reference: Path, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    out = tmp_path / "run"
    process = spawn("--out", str(out), "--checkpoint-every", "3", *ARGS)
    lines = rng.randrange(1, 40)
    wait_for(lambda: metric_lines(out) >= lines, process, f"{lines} metric lines")
    time.sleep(rng.uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    resume(out)
    try:
        assert_same_run(reference, out)
    except AssertionError as error:
        raise AssertionError(f"[kill moment seed {seed}] {error}") from None


class SimulatedCrashError(Exception):
    pass


def test_crash_before_the_first_checkpoint_restarts_with_the_saved_settings(
    reference: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``--resume`` alone after a death before any checkpoint: a new run with the settings of config.json."""
    out = tmp_path / "run"
    original = T.Trainer.train_step

    def crashing(self, *args, **kwargs):
        if self.state.step == 4:
            raise SimulatedCrashError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(T.Trainer, "train_step", crashing)
    with pytest.raises(SimulatedCrashError):
        main(["train", "--out", str(out), *ARGS])
    assert metric_lines(out) == 4
    assert not (out / "last.safetensors").exists()
    monkeypatch.undo()
    resume(out)
    err = capsys.readouterr().err
    assert "no checkpoint" in err
    assert "using the settings of" in err
    assert_same_run(reference, out)


SLOW_CHECKPOINT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import avme_ext.checkpoint as C
    from avme_ext.cli import main
    marker, calls = Path(sys.argv.pop(1)), []
    real_save_file = C.save_file
    def slow_save_file(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        calls.append(path)
        if len(calls) == 3:  # the third checkpoint: written to its temp file, not yet renamed
            marker.write_text(str(path))
            time.sleep(600)
    C.save_file = slow_save_file
    raise SystemExit(main(sys.argv[1:]))
""")


def test_sigkill_during_a_checkpoint_write(reference: Path, tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "writing"
    process = spawn(str(marker), "train", "--out", str(out), "--checkpoint-every", "4", *ARGS, script=SLOW_CHECKPOINT)
    wait_for(marker.exists, process, "the third checkpoint write")
    temp = Path(marker.read_text())
    assert temp.is_file()
    assert temp.name.startswith(".last.safetensors.")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    # the torn write left the previous complete checkpoint (step 8) in place
    assert load_checkpoint(out / "last.safetensors").trainer_state["state"]["step"] == 8
    resume(out)
    assert not temp.exists(), "the stale temporary file was not cleaned up"
    assert_same_run(reference, out)


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)]
)
def test_signal_saves_a_checkpoint_and_exits_cleanly(reference: Path, tmp_path: Path, signum, code) -> None:
    out = tmp_path / "run"
    process = spawn("--out", str(out), *ARGS)
    wait_for(lambda: metric_lines(out) >= 5, process, "5 training steps")
    process.send_signal(signum)
    returncode, err = finish(process)
    assert returncode == code, err
    assert signal.Signals(signum).name in err
    assert "--resume" in err
    state = load_checkpoint(out / "last.safetensors").trainer_state["state"]
    assert 5 <= state["step"] < 40
    resume(out)
    assert_same_run(reference, out)


def _nan_noise_at(monkeypatch, bad_step: int) -> None:
    """Make the reparameterisation noise of step index ``bad_step`` NaN (so the loss and gradients are NaN)."""
    original = schedule.step_noise  # the function the trainer imported

    def noise(model, seed, step, batch_size, generator):
        eps = original(model, seed, step, batch_size, generator)
        return eps * float("nan") if step == bad_step else eps

    monkeypatch.setattr(trainer_module, "step_noise", noise)


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(reference: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    _nan_noise_at(monkeypatch, 7)
    assert main(["train", "--out", str(out), "--checkpoint-every", "3", *ARGS]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 8 (epoch 1, batch 8 of 20)" in err
    assert "untouched" in err
    assert load_checkpoint(out / "last.safetensors").trainer_state["state"]["step"] == 6
    monkeypatch.undo()
    resume(out)
    assert_same_run(reference, out)


def test_skip_nonfinite_skips_the_update(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    _nan_noise_at(monkeypatch, 5)
    assert main(["train", "--out", str(out), "--skip-nonfinite", *ARGS, "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 6" in err
    assert "update skipped" in err
    assert "skipped non-finite steps: 1" in err
    state = load_checkpoint(out / "last.safetensors")
    assert state.optimizer_state is not None
    assert state.trainer_state["state"]["skipped"] == 1
    assert state.trainer_state["state"]["step"] == 20
    assert int(state.optimizer_state["state"][0]["step"]) == 19  # Adam stepped 19 times of 20
    assert all(torch.isfinite(p).all() for p in load_model(out / "last.safetensors").parameters())


def test_lr_overflow_is_reported(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *ARGS, "--lr", "1e30", "--epochs", "1"]) == 1  # failed while working
    assert "non-finite" in capsys.readouterr().err
    assert not (out / "last.safetensors").exists()


class Payload:
    """Unpickling this runs ``Path(marker).touch()``: the checkpoint loader must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_checkpoint_is_never_executed(reference: Path, tmp_path: Path, capsys) -> None:
    out, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(reference, out)
    for name, dump in (
        ("pickle", lambda f: pickle.dump(Payload(marker), f)),
        ("torch.save", lambda f: torch.save({"model": Payload(marker)}, f)),
    ):
        with open(out / "last.safetensors", "wb") as handle:
            dump(handle)
        with pytest.raises(CheckpointError):
            load_checkpoint(out / "last.safetensors")
        with pytest.raises(CheckpointError):
            load_model(out / "last.safetensors")
        assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "last.safetensors" in err, name
        assert "not a safetensors file" in err or "not an avme checkpoint" in err, name
        assert not marker.exists(), f"a {name} payload was executed"


def test_truncated_checkpoint_is_refused_and_kept(reference: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    data = (out / "last.safetensors").read_bytes()
    for size in (4, 100, len(data) // 2, len(data) - 1):
        (out / "last.safetensors").write_bytes(data[:size])
        assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "last.safetensors" in err
        assert "truncated" in err or "corrupt" in err or "not a safetensors" in err
        assert (out / "last.safetensors").read_bytes() == data[:size]  # the user's file is left as it was


def test_checkpoint_of_another_config_is_refused(reference: Path, tmp_path: Path, capsys) -> None:
    # resuming with another model size names both configs
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert main(["train", "--out", str(out), "--resume", "--enc-hidden", "16"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err
    assert "enc_hidden=32" in err
    assert "enc_hidden=16" in err
    # a run directory whose checkpoint comes from another run
    other = tmp_path / "other"
    assert (
        main(
            [
                "train",
                "--out",
                str(other),
                *model_args(16, 4, 3),
                "--epochs",
                "1",
                "--train-subset",
                "100",
                "--valid-subset",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    shutil.copy(reference / "last.safetensors", other / "last.safetensors")
    assert main(["train", "--out", str(other), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "enc_hidden=16" in err
    assert "enc_hidden=32" in err
    assert "mixes two runs" in err


def test_corrupt_data_file_is_reported(tmp_path: Path, capsys) -> None:
    root, out = tmp_path / "data", tmp_path / "run"
    root.mkdir()
    np.savez(root / "binarized_mnist.npz", x_train=np.full((10, 98), 255, np.uint8))  # no y_train
    assert main(["train", "--out", str(out), "--data-root", str(root), *ARGS]) == 2
    assert "missing keys" in capsys.readouterr().err
    (root / "binarized_mnist.npz").write_bytes(b"PK\x03\x04 truncated zip")
    assert main(["train", "--out", str(out), "--data-root", str(root), *ARGS]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert not (out / "config.json").exists()  # nothing written for a run that could not start


def test_bad_inputs_to_public_functions(tmp_path: Path) -> None:
    cfg = T.TrainConfig(train_subset=100, valid_subset=0, batch_size=50)
    from avme_ext.config import AVMEConfig
    from avme_ext.distributed import DistInfo

    cpu = torch.device("cpu")
    small = AVMEConfig(enc_hidden=8, dec_hidden=8, latent_dim=2, steps=2)
    trainer = T.Trainer(T.build_setup(cfg, small, DistInfo(), cpu), tmp_path)
    x, _, eps, size = trainer._batch(T.epoch_permutation(100, 0, 0), 0, 0)
    with pytest.raises(ValueError, match=r"binary|NaN"):
        trainer.train_step(x * float("nan"), None, eps, size, 1.0)
    with pytest.raises(ValueError, match="eps must have shape"):
        trainer.train_step(x, None, eps[:, :3], size, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        trainer.train_step(x, None, eps.double(), size, 1.0)
    with pytest.raises(ValueError, match="unconditional"):
        trainer.train_step(x, torch.zeros(size, dtype=torch.int64), eps, size, 1.0)
    conditional = T.Trainer(T.build_setup(cfg, dataclasses.replace(small, num_classes=10), DistInfo(), cpu), tmp_path)
    x, y, eps, size = conditional._batch(T.epoch_permutation(100, 0, 0), 0, 0)
    assert y is not None
    with pytest.raises(ValueError, match="labels in"):
        conditional.train_step(x, y + 10, eps, size, 1.0)
    with pytest.raises(T.TrainError, match="out of range"):
        T.build_setup(cfg, dataclasses.replace(small, num_classes=5), DistInfo(), cpu)
    assert not any(tmp_path.iterdir())  # constructing trainers writes nothing
