"""Tests of the learning-rate schedule (``--lr-schedule``, ``--lr-final``, ``--lr-decay-epochs``) on the CPU."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avme_ext import training as T
from avme_ext.checkpoint import load_checkpoint, save_checkpoint
from avme_ext.cli import main
from avme_ext.config import AVMEConfig
from avme_ext.model import AVME
from avme_ext.training.step import GraphedStep, set_group_learning_rates
from helpers import model_args, subset_args

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    *model_args(16, 4, 3),
    *subset_args(600, 100),
    "--batch-size",
    "100",
    "--no-progress",
    "--no-tensorboard",
    "--log-every",
    "1",
]
STEPS_PER_EPOCH = 6


def test_cosine_rates() -> None:
    rate = T.learning_rate_at
    assert rate(0, 1e-3, "constant") == 1e-3
    assert rate(10**6, 1e-3, "constant") == 1e-3
    assert rate(0, 1e-3, "cosine", final=1e-5, decay_steps=100) == 1e-3  # the first update uses --lr
    assert rate(50, 1e-3, "cosine", final=1e-5, decay_steps=100) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)
    assert rate(25, 1.0, "cosine", final=0.0, decay_steps=100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert rate(100, 1e-3, "cosine", final=1e-5, decay_steps=100) == pytest.approx(1e-5, rel=1e-12)
    assert rate(500, 1e-3, "cosine", final=1e-5, decay_steps=100) == pytest.approx(1e-5, rel=1e-12)
    rates = [rate(s, 1e-3, "cosine", final=0.0, decay_steps=40) for s in range(41)]
    assert all(a > b for a, b in itertools.pairwise(rates))  # strictly falling over the decay
    held = [rate(s, 1e-3, "cosine", final=0.0, decay_steps=10, hold_steps=5) for s in range(20)]
    assert held[:6] == [1e-3] * 6
    assert held[10] == pytest.approx(5e-4)
    assert held[15:] == [0.0] * 5
    assert held[5:] == [rate(s, 1e-3, "cosine", final=0.0, decay_steps=10) for s in range(15)]
    with pytest.raises(ValueError, match="decay_steps >= 1"):
        rate(0, 1e-3, "cosine", final=0.0, decay_steps=0)


def test_config_makes_the_cosine_schedule_concrete_and_checks_it() -> None:
    cfg = T.TrainConfig(lr_schedule="cosine", epochs=30)
    assert (cfg.lr_final, cfg.lr_decay_epochs, cfg.lr_hold_epochs) == (0.0, 30, 0)
    held = T.TrainConfig(lr_schedule="cosine", epochs=30, lr_hold_epochs=20)
    assert (held.lr_decay_epochs, held.lr_hold_epochs) == (10, 20)  # the decay fills the rest of the run
    assert T.TrainConfig().lr_final is None
    assert T.TrainConfig().lr_decay_epochs is None
    with pytest.raises(
        T.OptionError, match=r"lr_final \(--lr-final\) only apply to lr_schedule \(--lr-schedule\) cosine"
    ):
        T.TrainConfig(lr_final=1e-5)
    with pytest.raises(T.OptionError, match=r"lr_decay_epochs \(--lr-decay-epochs\) only apply"):
        T.TrainConfig(lr_decay_epochs=3)
    with pytest.raises(T.OptionError, match=r"lr_hold_epochs \(--lr-hold-epochs\) only apply"):
        T.TrainConfig(lr_hold_epochs=3)
    with pytest.raises(T.OptionError, match=r"lr_hold_epochs \(--lr-hold-epochs\) must be an integer >= 0, got -1"):
        T.TrainConfig(lr_schedule="cosine", lr_hold_epochs=-1)
    with pytest.raises(
        T.OptionError, match=r"lr_final \(--lr-final\) must be a finite number in \[0, lr=0.001\], got 0.01"
    ):
        T.TrainConfig(lr_schedule="cosine", lr_final=1e-2)
    with pytest.raises(T.OptionError, match=r"lr_final .* got nan"):
        T.TrainConfig(lr_schedule="cosine", lr_final=float("nan"))
    with pytest.raises(T.OptionError, match=r"lr_decay_epochs \(--lr-decay-epochs\) must be an integer >= 1, got 0"):
        T.TrainConfig(lr_schedule="cosine", lr_decay_epochs=0)
    with pytest.raises(T.OptionError, match=r"lr_schedule \(--lr-schedule\) must be one of"):
        T.TrainConfig(lr_schedule="linear")
    # resumed with a larger --epochs, the decay keeps the length it was given when the run started
    saved = T.TrainConfig(lr_schedule="cosine", epochs=10).to_dict()
    resumed, _ = T.resolve_configs({"epochs": 20}, saved, AVMEConfig())
    assert (resumed.epochs, resumed.lr_decay_epochs) == (20, 10)
    with pytest.raises(T.TrainError, match=r"lr_final: 0\.0 \(checkpoint\) vs 1e-05 \(this command\)"):
        T.resolve_configs({"lr_final": 1e-5}, saved, AVMEConfig())


def train_rates(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["lr"]) for r in records if r["kind"] == "train"]


def test_cosine_run_follows_the_schedule_and_resumes_bit_for_bit(tmp_path: Path, capsys) -> None:
    cosine = [
        "--lr-schedule",
        "cosine",
        "--lr",
        "0.004",
        "--lr-final",
        "0.0004",
        "--lr-decay-epochs",
        "2",
        "--lr-hold-epochs",
        "1",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", "--out", str(whole), *TINY, *cosine, "--epochs", "3"]) == 0
    assert (
        "learning rate: 0.004 for 1 epoch, then half a cosine down to 0.0004 over 2 epochs" in capsys.readouterr().err
    )
    # the record after step s reports the rate of that step's update: the schedule at s - 1
    logged = train_rates(whole)
    assert [step for step, _ in logged] == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    for step, lr in logged:
        expected = T.learning_rate_at(
            step - 1, 0.004, "cosine", final=0.0004, decay_steps=2 * STEPS_PER_EPOCH, hold_steps=STEPS_PER_EPOCH
        )
        assert lr == pytest.approx(expected, rel=1e-12), step
    assert [lr for _, lr in logged[: STEPS_PER_EPOCH + 1]] == [0.004] * (STEPS_PER_EPOCH + 1)  # held for an epoch
    assert logged[-1][1] == pytest.approx(0.0004 + 0.0036 * (1 + math.cos(math.pi * 11 / 12)) / 2)
    config = json.loads((whole / "config.json").read_text())["train"]
    assert (config["lr_schedule"], config["lr_final"], config["lr_decay_epochs"], config["lr_hold_epochs"]) == (
        "cosine",
        0.0004,
        2,
        1,
    )

    # two epochs (the decay half done), then resumed without the schedule options to three: the same bits
    assert main(["train", "--out", str(split), *TINY, *cosine, "--epochs", "2"]) == 0
    assert main(["train", "--out", str(split), "--resume", "--epochs", "3", "--no-progress"]) == 0
    a, b = load_file(whole / "last.safetensors"), load_file(split / "last.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_rates(split) == logged


def test_cosine_decay_defaults_to_the_first_launch_epochs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--lr-schedule", "cosine", "--epochs", "1"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    rates = [lr for _, lr in train_rates(out)]
    assert rates[STEPS_PER_EPOCH:] == [0.0] * STEPS_PER_EPOCH  # the decay ended with the first launch's epoch
    assert json.loads((out / "config.json").read_text())["train"]["lr_decay_epochs"] == 1


def test_constant_schedule_options_are_refused_on_the_command_line(tmp_path: Path, capsys) -> None:
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, "--lr-final", "1e-5"]) == 2
    err = capsys.readouterr().err
    assert "lr_final (--lr-final) only apply to lr_schedule (--lr-schedule) cosine" in err
    assert not (tmp_path / "run").exists()


def test_a_graphed_step_keeps_its_rate_in_a_tensor_and_checkpoints_a_float(tmp_path: Path) -> None:
    """The captured update reads the rate from a 0-dim tensor filled in place; the checkpoint stores a float."""
    torch.manual_seed(0)
    model = AVME.from_config(AVMEConfig(enc_hidden=8, dec_hidden=8, latent_dim=2, steps=2), impl="ref")
    optimizer = T.make_adam(model.parameters(), 1e-3, capturable=True)  # built on the CPU: never stepped here
    step = GraphedStep(model, optimizer, clip_grad=1.0, batch_size=4)
    rate = optimizer.param_groups[0]["lr"]
    assert isinstance(rate, torch.Tensor)
    assert rate.dim() == 0
    assert float(rate) == pytest.approx(1e-3)
    step.set_learning_rate(2.0**-12)  # exact in float32
    assert optimizer.param_groups[0]["lr"] is rate
    assert float(rate) == 2.0**-12
    version = rate._version
    step.set_learning_rate(2.0**-12)  # unchanged (a constant schedule): no write to the device tensor
    assert rate._version == version
    step.set_learning_rate(2.0**-11)
    assert rate._version == version + 1
    assert float(rate) == 2.0**-11
    step.set_learning_rate(2.0**-12)
    save_checkpoint(tmp_path / "c.safetensors", model, optimizer=optimizer)
    optimizer_state = load_checkpoint(tmp_path / "c.safetensors").optimizer_state
    assert optimizer_state is not None
    group = optimizer_state["param_groups"][0]
    assert group["lr"] == 2.0**-12
    assert isinstance(group["lr"], float)
    assert group["capturable"] is False
    assert optimizer.param_groups[0]["lr"] is rate  # storing changed nothing


def test_group_rates_set_as_floats_or_in_place() -> None:
    parameter = torch.nn.Parameter(torch.zeros(3))
    plain = torch.optim.Adam([parameter], lr=1e-3)
    set_group_learning_rates(plain, 5e-4)
    assert plain.param_groups[0]["lr"] == 5e-4
    assert isinstance(plain.param_groups[0]["lr"], float)
    tensor_rate = torch.tensor(1e-3)
    held = torch.optim.Adam([parameter], lr=tensor_rate)
    set_group_learning_rates(held, 5e-4)
    assert held.param_groups[0]["lr"] is tensor_rate
    assert float(tensor_rate) == pytest.approx(5e-4)
