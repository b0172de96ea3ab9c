"""What a run trains: the model (initialised from the seed), Adam, both restored from a checkpoint,
and the training step, put together in a :class:`TrainingSetup` by :func:`build_setup`.

Adam's ``capturable`` flag (needed to capture its step in a CUDA graph, see
:mod:`avme_ext.training.step`) is a property of how a launch executes, not of the run: a
checkpoint always stores ``capturable: false``, and loading adopts the flag of the optimizer it
is loaded into. So a checkpoint written with CUDA graphs resumes without them and vice versa.
(``state["step"]`` is a float32 scalar either way: on the CPU without ``capturable``, on the
parameters' device with it; the checkpoint stores it on the CPU.)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import Checkpoint, CheckpointError
from ..config import AVMEConfig
from ..distributed import DistInfo
from ..model import AVME
from ..seeds import derive_seed
from .config import TrainConfig
from .errors import TrainError
from .schedule import SEED_NAMESPACE
from .splits import load_training_data
from .state import TrainState
from .step import EagerStep, GraphedStep, TrainStep, use_cuda_graphs
from .trainer import TrainingSetup

__all__ = ["build_model", "make_adam", "restore_training_state", "make_step", "build_setup"]


def build_model(model_cfg: AVMEConfig, cfg: TrainConfig, device: torch.device) -> AVME:
    """The model, initialised on the CPU from ``cfg.seed`` (same weights on every device and rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(SEED_NAMESPACE, cfg.seed, "init"))
        model = AVME.from_config(model_cfg, impl=cfg.impl, precision=cfg.precision)
    model = model.to(device)
    try:
        model.core.resolved_impl(device)
    except RuntimeError as error:
        raise TrainError(f"--impl {cfg.impl}: {error}") from None
    return model


def _store_portable(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """state_dict post-hook: the saved groups say ``capturable: false`` whatever this launch uses,
    and hold the learning rate as a float (a graphed step keeps it in a device tensor)."""
    state_dict["param_groups"] = [{**group, "capturable": False, "lr": float(group["lr"])}
                                  for group in state_dict["param_groups"]]
    return state_dict


def _adopt_own_capturable(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """load_state_dict pre-hook: keep this optimizer's ``capturable`` (which decides where ``step`` lives).
    (The learning rate loaded is the saved one; the trainer sets each step's rate from the schedule.)"""
    own = [group.get("capturable", False) for group in optimizer.param_groups]
    groups = [{**group, "capturable": flag} for group, flag in zip(state_dict["param_groups"], own)]
    return {**state_dict, "param_groups": groups + list(state_dict["param_groups"][len(own):])}


def make_adam(parameters: Iterable[nn.Parameter], lr: float, *, capturable: bool = False) -> torch.optim.Adam:
    """Adam with learning rate ``lr``; ``capturable=True`` (CUDA only) lets a CUDA graph capture its step.

    Its ``state_dict`` is the same for both settings and loads into either (see the module docstring).
    """
    optimizer = torch.optim.Adam(parameters, lr=lr, capturable=capturable)
    optimizer.register_state_dict_post_hook(_store_portable)
    optimizer.register_load_state_dict_pre_hook(_adopt_own_capturable)
    return optimizer


def restore_training_state(model: AVME, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint, path: Path) -> None:
    """Load the weights and Adam's state of ``checkpoint`` (read from ``path``) into ``model`` and ``optimizer``.

    Raises:
        TrainError: the checkpoint holds another architecture.
        CheckpointError: it has no optimizer state, or its tensors do not fit.
    """
    if checkpoint.config != model.config:
        raise TrainError(f"{path} holds a model of another configuration: it is {checkpoint.config}, "
                         f"this run is {model.config}")
    if checkpoint.optimizer_state is None:
        raise CheckpointError(f"{path} has no optimizer state; it cannot be resumed (it can be evaluated)")
    try:
        model.load_state_dict(checkpoint.model_state)
        optimizer.load_state_dict(checkpoint.optimizer_state)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot restore the training state ({error})") from None


def make_step(model: AVME, cfg: TrainConfig, info: DistInfo, device: torch.device, *, graphed: bool,
              checkpoint: tuple[Checkpoint, Path] | None = None) -> TrainStep:
    """Adam (restored from ``checkpoint`` when given) and the step that runs it: a :class:`GraphedStep`
    when ``graphed`` (see :func:`use_cuda_graphs`), else an :class:`EagerStep`.

    Under torchrun the model is wrapped in DistributedDataParallel for the (eager) step, after the
    checkpoint is loaded.
    """
    optimizer = make_adam(model.parameters(), cfg.lr, capturable=graphed)
    if checkpoint is not None:
        restore_training_state(model, optimizer, *checkpoint)
    if graphed:
        return GraphedStep(model, optimizer, clip_grad=cfg.clip_grad, batch_size=cfg.batch_size)
    forward_model: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return EagerStep(model, forward_model, optimizer, clip_grad=cfg.clip_grad, world_size=info.world_size)


def build_setup(cfg: TrainConfig, model_cfg: AVMEConfig, info: DistInfo, device: torch.device,
                checkpoint: tuple[Checkpoint, Path] | None = None, *, fit_shape: bool = False,
                classes_from_data: bool = False) -> TrainingSetup:
    """Load the data, build the model and the step, restore ``(checkpoint, its path)`` when given.

    The model is built with ``model_cfg`` fitted to the data (``fit_shape``: take the data's image
    shape; ``classes_from_data``: its number of classes; see
    :func:`~avme_ext.training.splits.fit_model_to_data`).

    Writes nothing: a run that cannot start (bad data, a --batch-size that does not divide among
    the processes, labels that do not fit the model, --graph on without CUDA) fails here before
    touching its directory.
    """
    graphed = use_cuda_graphs(cfg.graph, device, info)
    data = load_training_data(cfg, model_cfg, info, device, fit_shape=fit_shape, classes_from_data=classes_from_data)
    model = build_model(data.model_config, cfg, device)
    step = make_step(model, cfg, info, device, graphed=graphed, checkpoint=checkpoint)
    state = TrainState.from_checkpoint(checkpoint[0].trainer_state) if checkpoint is not None else TrainState()
    return TrainingSetup(cfg, info, device, data, model, step, state)
