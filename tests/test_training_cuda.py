"""Training on a GPU with CUDA graphs (``--graph``): skipped without CUDA.

What these check, and the CPU tests cannot: that the two graphs of :class:`GraphedStep` capture
(reference and fused loops), replay to the results of the same step run eagerly, resume bit for
bit, and that checkpoints move between graphed and eager launches.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avme_ext import ops
from avme_ext.cli import main
from avme_ext.config import AVMEConfig
from avme_ext.model import AVME
from avme_ext.training import make_adam
from avme_ext.training.step import EagerRecorder, GraphedStep
from helpers import model_args, subset_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IMPLS = ["ref", pytest.param("cuda", marks=pytest.mark.skipif(not ops.is_available(), reason="fused ops unavailable"))]
TINY = [
    *model_args(32, 8, 4),
    *subset_args(1000, 200),
    "--batch-size",
    "64",
    "--log-every",
    "5",
    "--no-progress",
    "--device",
    "cuda",
]


def batch(model: AVME, size: int, seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randint(0, 2, (size, model.config.data_dim), generator=generator, device="cuda").float()
    labels = torch.randint(0, 10, (size,), generator=generator, device="cuda") if model.num_classes else None
    return x, labels, model.core.draw_noise(size, generator)


@pytest.mark.parametrize("impl", IMPLS)
def test_replayed_graphs_equal_the_same_step_run_eagerly(impl: str) -> None:
    torch.manual_seed(0)
    model = AVME.from_config(
        AVMEConfig(num_classes=10, enc_hidden=32, dec_hidden=32, latent_dim=8, steps=4), impl=impl
    ).cuda()
    twin = copy.deepcopy(model)
    graphed = GraphedStep(model, make_adam(model.parameters(), 1e-2, capturable=True), clip_grad=1.0, batch_size=16)
    eager = GraphedStep(
        twin,
        make_adam(twin.parameters(), 1e-2, capturable=True),
        clip_grad=1.0,
        batch_size=16,
        recorder=EagerRecorder(),
    )
    for index, (size, poison) in enumerate([(16, False), (16, True), (16, False), (5, False), (16, False)]):
        x, labels, eps = batch(model, size, seed=index)
        if poison:
            eps = eps * float("nan")
        stats = [step.gradients(x, labels, eps, size, 0.5, stop=False) for step in (graphed, eager)]
        assert stats[0].finite == stats[1].finite == (not poison)
        if not poison:
            assert stats[0].loss_sum == pytest.approx(stats[1].loss_sum, rel=1e-5)
            assert stats[0].grad_norm == pytest.approx(stats[1].grad_norm, rel=1e-4)
        for step in (graphed, eager):  # a new rate every step: the captured update must read it
            step.set_learning_rate(1e-2 * 0.5**index)
            step.update() if stats[0].finite else step.skip()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert graphed.captured


@pytest.mark.parametrize("impl", IMPLS)
def test_graphed_training_resumes_bit_for_bit(impl: str, tmp_path: Path, capsys) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--out", str(full), *TINY, "--impl", impl, "--epochs", "2", "--checkpoint-every", "7"]) == 0
    assert "CUDA graphs" in capsys.readouterr().err
    assert main(["train", "--out", str(part), *TINY, "--impl", impl, "--epochs", "1", "--checkpoint-every", "7"]) == 0
    assert main(["train", "--out", str(part), "--resume", "--epochs", "2", "--no-progress"]) == 0
    a, b = load_file(full / "last.safetensors"), load_file(part / "last.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after a resume"


def test_checkpoints_move_between_graphed_and_eager_launches(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--epochs", "1", "--graph", "on"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--graph", "off", "--no-progress"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--graph", "on", "--no-progress"]) == 0
    state = load_file(out / "last.safetensors")
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())
