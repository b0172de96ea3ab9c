"""One training step: forward, loss, backward, gradient norm, then clipping and Adam.

Two implementations with one interface (:class:`TrainStep`), chosen by ``--graph``
(:func:`use_cuda_graphs`):

* :class:`EagerStep` runs the step op by op (every device; DDP under torchrun).
* :class:`GraphedStep` (CUDA, one process) records the step once in two CUDA graphs and
  replays them, so a step costs two graph launches instead of hundreds of kernel launches:

  1. the *gradient graph*: forward, loss, backward and the global gradient norm of the batch
     held in static input buffers (x, one-hot y, eps, KL weight);
  2. the *update graph*: clipping the gradients to ``--clip-grad`` and Adam's step
     (``torch.optim.Adam(capturable=True)``), whose learning rate is a 0-dim tensor on the
     device that :meth:`GraphedStep.set_learning_rate` fills before each replay.

  After the gradient graph the loss and the gradient norm are read on the host (the step's one
  synchronisation); the update graph is replayed only when both are finite, so a non-finite
  step never touches the weights or Adam's state. A batch of another size than the captured
  one (the last, partial batch of an epoch) runs the same functions eagerly. Before capturing,
  the step runs a few times on a side stream (as ``torch.cuda.graphs`` requires), and the
  weights and Adam's state are then put back exactly as they were, so capturing changes no bit
  of the trajectory.

Both run the same functions, :func:`gradient_pass` and :func:`update_pass`; the graphed step
runs them with the sync-free :func:`avme_ext.model.elbo_terms` forward (inputs are checked when the data is
loaded, not per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..distributed import DistInfo
from ..model import AVME, ELBOTerms, elbo_terms
from .config import GRAPH_MODES
from .errors import OptionError

__all__ = [
    "use_cuda_graphs",
    "StepStats",
    "TrainStep",
    "EagerStep",
    "GraphedStep",
    "CudaGraphRecorder",
    "EagerRecorder",
    "elbo_terms",
    "gradient_pass",
    "update_pass",
    "set_group_learning_rates",
    "ParameterSnapshot",
]

T = TypeVar("T")
Forward = Callable[[Tensor, "Tensor | None", Tensor], ELBOTerms]


def use_cuda_graphs(mode: str, device: torch.device, info: DistInfo) -> bool:
    """Whether ``--graph MODE`` captures the step in CUDA graphs on ``device``.

    ``auto``: on for a CUDA device in a single process, off elsewhere. ``on``: on, or an error where
    it cannot work. ``off``: never. Under torchrun (DDP) graphs are off: DDP's gradient all-reduce
    (bucketing decided during the first iterations, NCCL calls issued from autograd hooks) would
    have to be captured too, which this trainer does not do.

    Raises:
        OptionError: an unknown mode; ``on`` on a device other than CUDA, or under torchrun.
    """
    if mode not in GRAPH_MODES:
        raise OptionError(f"--graph must be one of {GRAPH_MODES}, got {mode!r}")
    if mode == "off":
        return False
    if mode == "on":
        if device.type != "cuda":
            raise OptionError(f"--graph on needs a CUDA device, but this run uses {device}; "
                             "use --graph auto (graphs on CUDA only) or --graph off")
        if info.distributed:
            raise OptionError(f"--graph on is not supported under torchrun (WORLD_SIZE={info.world_size}): "
                             "DDP's gradient all-reduce is not captured; use --graph auto or off")
        return True
    return device.type == "cuda" and not info.distributed


@dataclass(frozen=True)
class StepStats:
    """What one step reports, summed over the global batch (all ranks).

    Attributes:
        loss_sum: sum over images of reconstruction + kl_weight * KL (the objective).
        reconstruction_sum, kl_sum: sums of the two terms (KL summed over the K steps).
        grad_norm: global L2 norm of the gradient of the batch-mean objective, before clipping.
        stop: some rank received SIGINT/SIGTERM (the run checkpoints after this step).
    """

    loss_sum: float
    reconstruction_sum: float
    kl_sum: float
    grad_norm: float
    stop: bool = False

    @property
    def finite(self) -> bool:
        """True when the loss and the gradient norm are finite (the update may be applied)."""
        return math.isfinite(self.loss_sum) and math.isfinite(self.grad_norm)


class TrainStep(Protocol):
    """One optimisation step in two halves, so the caller can check the statistics in between."""

    optimizer: torch.optim.Optimizer

    def gradients(self, x: Tensor, labels: Tensor | None, eps: Tensor, global_size: int, kl_weight: float,
                  stop: bool) -> StepStats:
        """Compute the gradients of this rank's rows ``x`` (B_r, D), ``labels`` (B_r,) or None, and
        noise ``eps`` (K, B_r, Z) of a global batch of ``global_size`` images; report the step."""

    def update(self) -> None:
        """Clip the gradients of the last :meth:`gradients` and take Adam's step."""

    def set_learning_rate(self, lr: float) -> None:
        """The learning rate of the next :meth:`update`."""

    def skip(self) -> None:
        """Drop the gradients of the last :meth:`gradients` (a non-finite step): no update."""


# --------------------------------------------------------------------------- the step body


def gradient_pass(forward: Forward, parameters: list[nn.Parameter], x: Tensor, y: Tensor | None, eps: Tensor,
                  kl_weight: float | Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Forward, objective, backward, and the global gradient norm (the first half of a step).

    Gradients are accumulated into ``parameters``' ``.grad`` (None or zero before). Runs eagerly
    and under CUDA graph capture alike (no host synchronisation when ``forward`` has none).

    Args:
        forward: ``(x, y, eps) -> ELBOTerms``.
        kl_weight: weight of the KL term: a float, or a 0-dim tensor on the device (a static input).
        scale: the loss is ``sum(objective) * scale``: ``world_size / global batch size`` makes the
            gradient (after DDP's average over ranks) that of the global batch mean.

    Returns:
        (sums, grad_norm): float64 (3,) sums over this rank's rows of the objective, the
        reconstruction term and the KL; the float32 0-dim L2 norm of all gradients.
    """
    terms = forward(x, y, eps)
    objective = terms.reconstruction + kl_weight * terms.kl.sum(dim=1)
    loss = objective.sum() * scale
    loss.backward()
    sums = torch.stack([objective.sum(), terms.reconstruction.sum(), terms.kl.sum()]).detach().double()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    return sums, grad_norm


def update_pass(parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer, clip_grad: float,
                grad_norm: Tensor) -> None:
    """Clip the gradients to norm ``clip_grad`` (0: no clipping) given their norm, then step the optimizer.

    Together with :func:`gradient_pass` this is exactly ``clip_grad_norm_`` followed by ``step()``.
    """
    torch.nn.utils.clip_grads_with_norm_(parameters, clip_grad if clip_grad > 0 else math.inf, grad_norm)
    optimizer.step()


def set_group_learning_rates(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr``: in place where it is a tensor (a
    captured update reads that tensor), else as a float."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = float(lr)


# --------------------------------------------------------------------------- eager


class EagerStep:
    """The step op by op, on any device, under DDP too (gradients all-reduced by ``forward_model``).

    Args:
        model: the model (its parameters are stepped).
        forward_model: what runs the forward: ``model``, or its DistributedDataParallel wrapper.
        optimizer: Adam over ``model``'s parameters.
        clip_grad: ``--clip-grad`` (0: no clipping).
        world_size: number of processes.
    """

    def __init__(self, model: AVME, forward_model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 clip_grad: float, world_size: int = 1) -> None:
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.world_size = world_size
        self._parameters = list(model.parameters())
        self._forward: Forward = lambda x, y, eps: forward_model(x, y, eps=eps)  # noqa: E731
        self._grad_norm: Tensor | None = None

    def gradients(self, x: Tensor, labels: Tensor | None, eps: Tensor, global_size: int, kl_weight: float,
                  stop: bool) -> StepStats:
        self.optimizer.zero_grad(set_to_none=True)
        sums, self._grad_norm = gradient_pass(self._forward, self._parameters, x, labels, eps, kl_weight,
                                              self.world_size / global_size)
        shared = dist_utils.all_reduce_sum(torch.cat([sums, sums.new_tensor([1.0 if stop else 0.0])]))
        values = torch.cat([shared[:3], self._grad_norm.detach().double().reshape(1).to(shared.device),
                            shared[3:]]).tolist()
        return StepStats(*values[:4], stop=values[4] > 0)

    def update(self) -> None:
        assert self._grad_norm is not None, "update() without gradients()"
        update_pass(self._parameters, self.optimizer, self.clip_grad, self._grad_norm)

    def set_learning_rate(self, lr: float) -> None:
        set_group_learning_rates(self.optimizer, lr)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- graphs


class Recorded(Protocol[T]):
    """A recorded function: :meth:`replay` runs it again and returns its outputs."""

    def replay(self) -> T: ...


@dataclass
class _CudaGraphCall(Generic[T]):
    graph: torch.cuda.CUDAGraph
    output: T  # static: the graph writes into these tensors on every replay

    def replay(self) -> T:
        self.graph.replay()
        return self.output


class CudaGraphRecorder:
    """Records functions in CUDA graphs that share one memory pool (replay them in capture order)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, fn: Callable[[], object], iterations: int) -> None:
        """Run ``fn`` ``iterations`` times on a side stream (lazy initialisations happen outside capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(iterations):
                fn()
        torch.cuda.current_stream().wait_stream(side)

    def record(self, fn: Callable[[], T]) -> _CudaGraphCall[T]:
        """Capture ``fn`` (its kernels are not run now); its outputs are the graph's static outputs."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = fn()
        return _CudaGraphCall(graph, output)


@dataclass
class _EagerCall(Generic[T]):
    fn: Callable[[], T]

    def replay(self) -> T:
        return self.fn()


class EagerRecorder:
    """Records nothing: every replay calls the function again. Runs :class:`GraphedStep`'s logic
    (static buffers, warm-up and restore, the split into two halves) where CUDA graphs cannot run."""

    def warm_up(self, fn: Callable[[], object], iterations: int) -> None:
        for _ in range(iterations):
            fn()

    def record(self, fn: Callable[[], T]) -> _EagerCall[T]:
        return _EagerCall(fn)


class ParameterSnapshot:
    """A copy of parameters and optimizer state, put back in place (same tensors) by :meth:`restore`.

    An optimizer state that does not exist yet (a fresh Adam) is restored as zeros, which is what
    Adam creates on its first step (``step``, ``exp_avg`` and ``exp_avg_sq`` all zero).
    """

    def __init__(self, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.parameters = parameters
        self.optimizer = optimizer
        self.values = [p.detach().clone() for p in parameters]
        self.state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, Tensor)}
                      for p in parameters if p in optimizer.state}

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, value in zip(self.parameters, self.values):
            parameter.copy_(value)
        for parameter in self.parameters:
            saved = self.state.get(id(parameter))
            for key, tensor in self.optimizer.state.get(parameter, {}).items():
                if not isinstance(tensor, Tensor):
                    continue
                if saved is None:
                    tensor.zero_()
                else:
                    tensor.copy_(saved[key])


class GraphedStep:
    """The step as two replayed CUDA graphs (see the module docstring).

    It computes what :class:`EagerStep` computes, by the same functions; with the same optimizer the
    results are the same bit for bit (tested on the CPU). On CUDA its Adam is ``capturable``, whose
    arithmetic (bias corrections on the device) rounds differently from the default Adam's, so a
    graphed run and an eager run agree to float tolerance, and each resumes bit for bit.

    Args:
        model: the model (single process; its parameters are stepped).
        optimizer: Adam over ``model``'s parameters; ``capturable=True`` when recording CUDA graphs.
        clip_grad: ``--clip-grad`` (0: no clipping).
        batch_size: the batch size to capture; other sizes run eagerly.
        recorder: :class:`CudaGraphRecorder` (default) or :class:`EagerRecorder`.
        warmup_iterations: eager runs before the capture (their effect on the weights is undone).
    """

    def __init__(self, model: AVME, optimizer: torch.optim.Optimizer, *, clip_grad: float, batch_size: int,
                 recorder: CudaGraphRecorder | EagerRecorder | None = None, warmup_iterations: int = 3) -> None:
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.batch_size = batch_size
        self.recorder = recorder if recorder is not None else CudaGraphRecorder()
        self.warmup_iterations = warmup_iterations
        self.num_classes = model.config.num_classes
        self._core = model.core
        self._likelihood = model.likelihood
        self._parameters = list(model.parameters())
        self._forward: Forward = lambda x, y, eps: elbo_terms(  # noqa: E731
            self._core, x, y, eps, likelihood=self._likelihood)
        self._gradient_call: Recorded[Tensor] | None = None
        self._update_call: Recorded[None] | None = None
        self._static: dict[str, Tensor | None] = {}
        self._eager_norm: Tensor | None = None  # set when the last batch ran eagerly
        self._rate: float | None = None  # the rate last set, so an unchanged rate costs no device write
        if any(group.get("capturable", False) for group in optimizer.param_groups):
            # a captured update reads its rate from the device: one 0-dim tensor per group, filled in place
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self._parameters[0].device)

    @property
    def captured(self) -> bool:
        """True once the graphs are recorded (at the first batch of the captured size)."""
        return self._gradient_call is not None

    def _one_hot(self, labels: Tensor | None) -> Tensor | None:
        if self.num_classes == 0:
            return None
        return F.one_hot(labels.to(torch.int64), self.num_classes).to(self._parameters[0].dtype)

    def gradients(self, x: Tensor, labels: Tensor | None, eps: Tensor, global_size: int, kl_weight: float,
                  stop: bool) -> StepStats:
        y = self._one_hot(labels)
        if x.shape[0] != self.batch_size:
            return self._eager_gradients(x, y, eps, global_size, kl_weight, stop)
        if not self.captured:
            self._capture(x, y, eps)
        self._eager_norm = None
        static = self._static
        static["x"].copy_(x)
        static["eps"].copy_(eps)
        if y is not None:
            static["y"].copy_(y)
        static["kl_weight"].fill_(kl_weight)
        stats = self._gradient_call.replay()
        return StepStats(*stats.tolist(), stop=stop)

    def update(self) -> None:
        if self._eager_norm is not None:
            update_pass(self._parameters, self.optimizer, self.clip_grad, self._eager_norm)
        else:
            assert self._update_call is not None, "update() without gradients()"
            self._update_call.replay()

    def set_learning_rate(self, lr: float) -> None:
        if lr != self._rate:  # a constant rate: one fill at the first step, none after
            set_group_learning_rates(self.optimizer, lr)
            self._rate = lr

    def skip(self) -> None:
        """Nothing to drop: the next step overwrites the static gradients."""

    def _eager_gradients(self, x: Tensor, y: Tensor | None, eps: Tensor, global_size: int, kl_weight: float,
                         stop: bool) -> StepStats:
        # zero in place: after the capture .grad are the graphs' static tensors, which must stay
        self.optimizer.zero_grad(set_to_none=not self.captured)
        sums, self._eager_norm = gradient_pass(self._forward, self._parameters, x, y, eps, kl_weight,
                                               1.0 / global_size)
        return StepStats(*torch.cat([sums, self._eager_norm.detach().double().reshape(1)]).tolist(), stop=stop)

    def _capture(self, x: Tensor, y: Tensor | None, eps: Tensor) -> None:
        """Warm up, put the weights and Adam's state back, and record the two graphs for ``x``'s shape."""
        static = self._static
        static.update(x=x.clone(), y=None if y is None else y.clone(), eps=eps.clone(),
                      kl_weight=torch.ones((), dtype=x.dtype, device=x.device),
                      grad_norm=torch.zeros((), dtype=x.dtype, device=x.device))
        scale = 1.0 / self.batch_size

        def gradients() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)  # under capture: .grad is allocated in the graphs' pool
            sums, grad_norm = gradient_pass(self._forward, self._parameters, static["x"], static["y"], static["eps"],
                                            static["kl_weight"], scale)
            static["grad_norm"].copy_(grad_norm)
            return torch.cat([sums, grad_norm.detach().double().reshape(1)])

        def update() -> None:
            update_pass(self._parameters, self.optimizer, self.clip_grad, static["grad_norm"])

        def one_step() -> None:
            gradients()
            update()

        snapshot = ParameterSnapshot(self._parameters, self.optimizer)
        self.recorder.warm_up(one_step, self.warmup_iterations)
        snapshot.restore()
        self._gradient_call = self.recorder.record(gradients)
        self._update_call = self.recorder.record(update)
