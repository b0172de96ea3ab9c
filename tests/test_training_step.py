"""Tests of the training step (avme_ext.training.step) on the CPU.

CUDA graphs cannot run here, so :class:`GraphedStep` runs with :class:`EagerRecorder`: every
"replay" calls the recorded function again. That exercises everything of the graphed step but the
capture itself: static input buffers, the warm-up and the exact restore of weights and Adam's
state, the split into a gradient half and an update half with the finiteness check in between,
and the eager fallback for a batch of another size. The capture and replay on a GPU are checked
by tests/test_training_cuda.py (and the fused ops' capture by tests/ops/test_cuda_only.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from avme_ext.checkpoint import load_checkpoint, save_checkpoint
from avme_ext.config import AVMEConfig
from avme_ext.distributed import DistInfo
from avme_ext.model import AVME, elbo_terms
from avme_ext.training import OptionError, TrainConfig, Trainer, build_setup, make_adam
from avme_ext.training.step import (
    EagerRecorder,
    EagerStep,
    Forward,
    GraphedStep,
    ParameterSnapshot,
    gradient_pass,
    update_pass,
    use_cuda_graphs,
)
from helpers import SizeArgs

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES: SizeArgs = {"enc_hidden": 16, "dec_hidden": 16, "latent_dim": 4, "steps": 3}
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def make_model(num_classes: int = 0, seed: int = 0, likelihood: str = "bernoulli") -> AVME:
    torch.manual_seed(seed)
    return AVME.from_config(AVMEConfig(num_classes=num_classes, likelihood=likelihood, **SIZES), impl="ref")


def make_batch(model: AVME, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Random images (size, D) (binary, or k/255 for the logistic likelihood), labels (size,) for a
    conditional model, noise (K, size, Z)."""
    generator = torch.Generator().manual_seed(seed)
    levels = 256 if model.config.likelihood == "logistic" else 2
    x = torch.randint(0, levels, (size, model.config.data_dim), generator=generator).float() / (levels - 1)
    labels = torch.randint(0, 10, (size,), generator=generator) if model.num_classes else None
    return x, labels, model.core.draw_noise(size, generator)


def forward_of(model: AVME) -> Forward:
    """The training forward of ``model`` as :func:`gradient_pass` takes it."""
    return lambda x, y, eps: model(x, y, eps=eps)


def grads_of(model: AVME) -> list[torch.Tensor]:
    """Copies of the gradients of every parameter (all set by the backward before)."""
    copies = []
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        copies.append(p.grad.clone())
    return copies


def assert_same_training_state(a: tuple[AVME, torch.optim.Optimizer], b: tuple[AVME, torch.optim.Optimizer]) -> None:
    for (name, p), q in zip(a[0].named_parameters(), b[0].parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs"
    state_a, state_b = a[1].state_dict()["state"], b[1].state_dict()["state"]
    assert sorted(state_a) == sorted(state_b)
    for index in state_a:
        for key, value in state_a[index].items():
            assert torch.equal(value, state_b[index][key]), f"Adam state {index}.{key} differs"


# --------------------------------------------------------------------------- --graph


def test_graph_mode_selection() -> None:
    one, two = DistInfo(), DistInfo(0, 2, 0)
    assert use_cuda_graphs("auto", CUDA, one) is True
    assert use_cuda_graphs("auto", CPU, one) is False
    assert use_cuda_graphs("auto", CUDA, two) is False  # DDP: eager
    assert use_cuda_graphs("on", CUDA, one) is True
    assert use_cuda_graphs("off", CUDA, one) is False
    assert use_cuda_graphs("off", CPU, two) is False
    with pytest.raises(OptionError, match="--graph on needs a CUDA device, but this run uses cpu"):
        use_cuda_graphs("on", CPU, one)
    with pytest.raises(OptionError, match="--graph on is not supported under torchrun"):
        use_cuda_graphs("on", CUDA, two)
    with pytest.raises(OptionError, match="--graph must be one of"):
        use_cuda_graphs("yes", CUDA, one)


def test_graph_on_without_cuda_fails_before_anything_is_written(tmp_path: Path, capsys) -> None:
    from avme_ext.cli import main

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--graph", "on", "--device", "cpu", "--train-subset", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            "avme train: error: --graph on needs a CUDA device, but this run uses cpu; use --graph auto "
            "(graphs on CUDA only) or --graph off"
        )
    ]
    assert not out.exists()


def test_build_setup_picks_the_eager_step_on_cpu() -> None:
    cfg = TrainConfig(train_subset=100, valid_subset=0, batch_size=50)
    setup = build_setup(cfg, AVMEConfig(**SIZES), DistInfo(), CPU)
    assert isinstance(setup.step, EagerStep)
    assert setup.step.optimizer.param_groups[0]["capturable"] is False


# --------------------------------------------------------------------------- the step body


def test_elbo_terms_equal_the_model_forward() -> None:
    model = make_model(num_classes=10)
    x, labels, eps = make_batch(model, 7, seed=1)
    assert labels is not None
    y = F.one_hot(labels, 10).float()
    got, expected = elbo_terms(model.core, x, y, eps), model(x, labels, eps=eps)
    assert torch.equal(got.reconstruction, expected.reconstruction)
    assert torch.equal(got.kl, expected.kl)
    assert got.kl.shape == (7, SIZES["steps"])
    assert torch.isfinite(got.kl).all()


@pytest.mark.parametrize("clip_grad", [0.0, 1.0])
def test_step_body_is_clip_grad_norm_then_adam(clip_grad: float) -> None:
    """gradient_pass + update_pass are exactly the formula of a training step: sum of the objective
    scaled to the batch mean, backward, clip_grad_norm_, Adam."""
    x, _, eps = make_batch(make_model(), 9, seed=2)
    results = []
    for split in (False, True):
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        stepped = []
        for kl_weight in (0.3, 1.0):
            optimizer.zero_grad(set_to_none=True)
            if split:
                sums, norm = gradient_pass(forward_of(model), list(model.parameters()), x, None, eps, kl_weight, 1 / 9)
                update_pass(list(model.parameters()), optimizer, clip_grad, norm)
            else:
                terms = model(x, eps=eps)
                objective = terms.reconstruction + kl_weight * terms.kl.sum(dim=1)
                (objective.sum() * (1 / 9)).backward()
                sums = torch.stack([objective.sum(), terms.reconstruction.sum(), terms.kl.sum()]).double()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad > 0 else float("inf"))
                optimizer.step()
            stepped.append((sums, norm))
        results.append((model, optimizer, *stepped[-1]))
    (model_a, opt_a, sums_a, norm_a), (model_b, opt_b, sums_b, norm_b) = results
    assert torch.equal(sums_a, sums_b)
    assert torch.equal(norm_a, norm_b)
    assert torch.isfinite(norm_a)
    assert_same_training_state((model_a, opt_a), (model_b, opt_b))


def test_kl_weight_as_a_static_tensor_gives_the_same_bits() -> None:
    """The graphed step feeds the KL weight as a 0-dim tensor; the eager step as a float."""
    model = make_model()
    x, _, eps = make_batch(model, 8, seed=3)

    def forward(a, b, c):
        return elbo_terms(model.core, a, b, c)

    outputs = []
    for kl_weight in (0.1, torch.tensor(0.1)):
        model.zero_grad(set_to_none=True)
        sums, norm = gradient_pass(forward, list(model.parameters()), x, None, eps, kl_weight, 1 / 8)
        outputs.append((sums, norm, grads_of(model)))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][2], outputs[1][2], strict=True))


# --------------------------------------------------------------------------- the graphed step's logic


def test_snapshot_restores_weights_and_a_fresh_adam_exactly() -> None:
    model, reference = make_model(), make_model()
    optimizer, fresh = make_adam(model.parameters(), 1e-2), make_adam(reference.parameters(), 1e-2)
    x, _, eps = make_batch(model, 6, seed=4)
    params = list(model.parameters())
    snapshot = ParameterSnapshot(params, optimizer)
    for _ in range(3):  # what a warm-up does: real steps
        optimizer.zero_grad(set_to_none=True)
        _, norm = gradient_pass(forward_of(model), params, x, None, eps, 1.0, 1 / 6)
        update_pass(params, optimizer, 10.0, norm)
    assert not torch.equal(params[0], next(reference.parameters()))
    snapshot.restore()
    assert all(torch.equal(p, q) for p, q in zip(params, reference.parameters(), strict=True))
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in optimizer.state.values())
    for m, opt in ((model, optimizer), (reference, fresh)):  # the next step is a first step
        opt.zero_grad(set_to_none=True)
        _, norm = gradient_pass(forward_of(m), list(m.parameters()), x, None, eps, 1.0, 1 / 6)
        update_pass(list(m.parameters()), opt, 10.0, norm)
    assert_same_training_state((model, optimizer), (reference, fresh))


@pytest.mark.parametrize(
    ("num_classes", "clip_grad", "likelihood"), [(0, 10.0, "bernoulli"), (10, 0.5, "bernoulli"), (10, 0.5, "logistic")]
)
def test_graphed_step_logic_equals_the_eager_step(num_classes: int, clip_grad: float, likelihood: str) -> None:
    """Same stats and the same weights and Adam state, bit for bit, over a sequence with an eager
    partial batch before and after the capture, a non-finite (skipped) step, and KL warm-up; with the
    logistic likelihood its log-scale is trained by both alike."""
    eager_model = make_model(num_classes, likelihood=likelihood)
    graphed_model = copy.deepcopy(eager_model)
    eager = EagerStep(eager_model, eager_model, make_adam(eager_model.parameters(), 1e-2), clip_grad=clip_grad)
    graphed = GraphedStep(
        graphed_model,
        make_adam(graphed_model.parameters(), 1e-2),
        clip_grad=clip_grad,
        batch_size=8,
        recorder=EagerRecorder(),
        warmup_iterations=2,
    )
    plan = [(5, 0.0, False), (8, 0.25, False), (8, 0.5, True), (8, 0.75, False), (3, 1.0, False), (8, 1.0, False)]
    for index, (size, kl_weight, poison) in enumerate(plan):
        x, labels, eps = make_batch(eager_model, size, seed=10 + index)
        if poison:
            eps = eps * float("nan")
        before = [p.detach().clone() for p in graphed_model.parameters()]
        stats = [step.gradients(x, labels, eps, size, kl_weight, stop=False) for step in (eager, graphed)]
        values = [dataclasses.astuple(s) for s in stats]
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(*values, strict=True)), (index, stats)
        assert stats[0].finite is not poison
        for step in (eager, graphed):
            step.update() if stats[0].finite else step.skip()
        if poison:  # a non-finite step touches neither the weights nor Adam's state
            assert all(torch.equal(p, q) for p, q in zip(before, graphed_model.parameters(), strict=True))
        assert graphed.captured is (index >= 1)
        assert_same_training_state((eager_model, eager.optimizer), (graphed_model, graphed.optimizer))
    assert all(torch.isfinite(p).all() for p in graphed_model.parameters())
    if likelihood == "logistic":  # its log-scale is one of the parameters stepped
        name = "likelihood.log_scale"
        assert not torch.equal(graphed_model.state_dict()[name], make_model(likelihood=likelihood).state_dict()[name])


def test_trainer_with_the_graphed_step_logic_trains_like_the_eager_trainer(tmp_path: Path) -> None:
    """The whole epoch loop (update/skip, the last partial batch, checkpoints) with GraphedStep's logic."""
    cfg = TrainConfig(train_subset=130, valid_subset=0, batch_size=40, epochs=2, kl_warmup_steps=3, progress=False)
    model_cfg = AVMEConfig(**SIZES)
    runs = []
    for name in ("eager", "graphed"):
        setup = build_setup(cfg, model_cfg, DistInfo(), CPU)
        if name == "graphed":
            step = GraphedStep(
                setup.model,
                setup.step.optimizer,
                clip_grad=cfg.clip_grad,
                batch_size=cfg.batch_size,
                recorder=EagerRecorder(),
            )
            setup = dataclasses.replace(setup, step=step)
        assert Trainer(setup, tmp_path / name).run() == 0
        runs.append(load_checkpoint(tmp_path / name / "last.safetensors"))
    eager_run, graphed_run = runs
    assert eager_run.optimizer_state is not None
    assert graphed_run.optimizer_state is not None
    assert graphed_run.trainer_state["state"]["step"] == 8  # 2 epochs of 3 full batches + 1 of 10 images
    for key, value in eager_run.model_state.items():
        assert torch.equal(value, graphed_run.model_state[key]), key
    for index, entry in eager_run.optimizer_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, graphed_run.optimizer_state["state"][index][key]), (index, key)


# --------------------------------------------------------------------------- Adam's checkpoint format


def test_adam_state_is_stored_the_same_and_loads_both_ways(tmp_path: Path) -> None:
    """capturable (CUDA graphs) or not, the checkpoint says capturable: false, and loading keeps the
    flag of the optimizer it goes into (which decides where Adam's ``step`` lives)."""
    model = make_model()
    plain = make_adam(model.parameters(), 1e-3)
    x, _, eps = make_batch(model, 4, seed=5)
    plain.zero_grad()
    _, norm = gradient_pass(forward_of(model), list(model.parameters()), x, None, eps, 1.0, 0.25)
    update_pass(list(model.parameters()), plain, 10.0, norm)
    capturable = make_adam(make_model().parameters(), 1e-3, capturable=True)
    capturable.load_state_dict(plain.state_dict())
    assert capturable.param_groups[0]["capturable"] is True
    step = capturable.state[capturable.param_groups[0]["params"][0]]["step"]
    assert step.dtype == torch.float32
    assert float(step) == 1.0
    saved = capturable.state_dict()
    assert saved["param_groups"][0]["capturable"] is False  # the stored format does not depend on the launch
    assert capturable.param_groups[0]["capturable"] is True  # ... and storing it changed nothing
    save_checkpoint(tmp_path / "c.safetensors", model, optimizer=capturable)
    restored = load_checkpoint(tmp_path / "c.safetensors").optimizer_state
    assert restored is not None
    assert restored["param_groups"][0]["capturable"] is False
    again = make_adam(make_model().parameters(), 1e-3)
    again.load_state_dict(restored)
    assert again.param_groups[0]["capturable"] is False
    for index, entry in plain.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, again.state_dict()["state"][index][key]), (index, key)
