"""Builders of the benchmarked callables: one per (implementation, configuration).

An *implementation* (:data:`IMPLS`) is a way of running the same model. Reference modes (the
pure-PyTorch loop of ``avme_ext.reference``):

=============================== ===========================================================
``ref-eager``                   eager mode, fp32 (TF32 off)
``ref-eager-tf32``              eager mode with TF32 matmuls allowed
``ref-eager-bf16``              eager mode under bf16 autocast
``ref-compile``                 the loss under ``torch.compile`` (default mode)
``ref-compile-reduce-overhead`` the loss under ``torch.compile(mode="reduce-overhead")``
                                (inductor + CUDA graphs through cudagraph trees)
``ref-compile-max-autotune``    (optional) ``torch.compile(mode="max-autotune")``: Triton GEMM
                                autotuning + CUDA graphs
``ref-cudagraph``               the whole step captured by hand in one CUDA graph: forward,
                                backward and a ``capturable=True`` Adam step, replayed on
                                static input buffers
=============================== ===========================================================

Fused modes (the CUDA ops of ``avme_ext.ops``), one per design and precision:

=================================== =======================================================
``fused-<design>-<precision>``      the fused ops forced to ``<design>`` (``auto``: the host's
                                    own choice) with ``<precision>`` products (fp32, tf32, bf16)
``fused-<design>-<precision>-graph`` the same, the whole step captured in one CUDA graph as
                                    ``ref-cudagraph`` (forward, backward, ``capturable=True``
                                    Adam): how a training loop runs it
=================================== =======================================================

The design is forced with ``avme_ext.ops.design(name)``, a context manager, around the whole
step (and around the warm-up and capture of a graph); when the extension has no such override,
only ``fused-auto-*`` runs (the extension's default design) and the others are skipped with the
reason.

Every training step is: ``zero_grad``, the mean negative ELBO (reconstruction + sum of the K
KL terms, i.e. ``AVME.loss`` with ``kl_weight=1``) on a fresh batch ``x`` with fresh noise
``eps``, ``backward``, ``Adam.step``. The loss is computed from ``model.core(x, None, eps)``
rather than through ``AVME.loss`` so that the noise is pre-generated and no host
synchronisation (``AVME.check_images`` checks that pixels are binary) sits in the step: it
would forbid CUDA-graph capture and add a sync to every eager step.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from avme_ext import AVME, loop_types, ops
from avme_ext.model import gaussian_kl, reconstruction_nll

try:  # sibling modules, whether imported as ``bench.workloads`` or run from bench/
    from .flops import ModelSize
except ImportError:  # pragma: no cover
    from flops import ModelSize  # type: ignore[import-not-found,no-redef]  # run from bench/

__all__ = [
    "ImplSpec",
    "DESIGNS",
    "PRECISIONS",
    "IMPLS",
    "DEFAULT_IMPLS",
    "APPLICABLE",
    "select_impls",
    "spec_extras",
    "design_reason",
    "unavailable_reason",
    "design_context",
    "tf32_mode",
    "autocast_mode",
    "matmul_mode",
    "run_context",
    "elbo_loss",
    "build_model",
    "TrainCase",
    "build_train_case",
    "make_train_inputs",
    "make_sample_inputs",
    "build_sample_case",
    "pool_size",
    "free_memory",
]

#: The fused designs benchmarked, and the matrix-product precisions of the fused ops.
DESIGNS: tuple[str, ...] = loop_types.DESIGNS
PRECISIONS: tuple[str, ...] = loop_types.PRECISIONS
#: Modes whose build is a ``torch.compile`` (expensive: timed separately, last, within the budget).
COMPILE_MODES = ("compile", "compile-reduce-overhead", "compile-max-autotune")


@dataclass(frozen=True)
class ImplSpec:
    """How one implementation runs the model.

    Attributes:
        name: the key in :data:`IMPLS`, used in records.
        core_impl: ``AVMECore``'s ``impl``: ``"ref"`` or ``"cuda"`` (fused ops).
        precision: ``AVMECore``'s ``precision`` (used by the fused ops only).
        mode: ``"eager"``, ``"eager-tf32"``, ``"eager-bf16"``, ``"compile"``,
            ``"compile-reduce-overhead"``, ``"compile-max-autotune"`` or ``"cudagraph"``.
        matmul: precision of the matrix products, the key of the peak rate it is compared
            with (``"fp32"``, ``"tf32"`` or ``"bf16"``).
        description: one line for the README and the report.
        design: the fused design forced with ``avme_ext.ops.design`` (None for the reference).
    """

    name: str
    core_impl: str
    precision: str
    mode: str
    matmul: str
    description: str
    design: str | None = None

    @property
    def fused(self) -> bool:
        return self.core_impl == "cuda"

    @property
    def compiles(self) -> bool:
        """Whether building it runs ``torch.compile``."""
        return self.mode in COMPILE_MODES

    @property
    def graph(self) -> bool:
        """Whether the whole training step is captured in one CUDA graph."""
        return self.mode == "cudagraph"


def _reference_specs() -> list[ImplSpec]:
    return [
        ImplSpec("ref-eager", "ref", "fp32", "eager", "fp32", "reference, eager, fp32 (TF32 off)"),
        ImplSpec("ref-eager-tf32", "ref", "fp32", "eager-tf32", "tf32", "reference, eager, TF32 matmuls allowed"),
        ImplSpec("ref-eager-bf16", "ref", "fp32", "eager-bf16", "bf16", "reference, eager, bf16 autocast"),
        ImplSpec("ref-compile", "ref", "fp32", "compile", "fp32", "reference under torch.compile (default mode)"),
        ImplSpec(
            "ref-compile-reduce-overhead",
            "ref",
            "fp32",
            "compile-reduce-overhead",
            "fp32",
            "reference under torch.compile(mode='reduce-overhead'): inductor + CUDA graphs",
        ),
        ImplSpec(
            "ref-compile-max-autotune",
            "ref",
            "fp32",
            "compile-max-autotune",
            "fp32",
            "reference under torch.compile(mode='max-autotune'): GEMM autotuning + CUDA graphs",
        ),
        ImplSpec(
            "ref-cudagraph",
            "ref",
            "fp32",
            "cudagraph",
            "fp32",
            "reference captured by hand in one CUDA graph (fwd + bwd + capturable Adam)",
        ),
    ]


def _fused_specs() -> list[ImplSpec]:
    specs = []
    for design in DESIGNS:
        what = "the host's choice of design" if design == "auto" else f"{design} design"
        for precision in PRECISIONS:
            products = {
                "fp32": "fp32 products",
                "tf32": "TF32 tensor cores",
                "bf16": "bf16 tensor cores, fp32 accumulation",
            }[precision]
            specs.append(
                ImplSpec(
                    f"fused-{design}-{precision}",
                    "cuda",
                    precision,
                    "eager",
                    precision,
                    f"fused CUDA ops, {what}, {products}",
                    design,
                )
            )
            specs.append(
                ImplSpec(
                    f"fused-{design}-{precision}-graph",
                    "cuda",
                    precision,
                    "cudagraph",
                    precision,
                    f"fused CUDA ops, {what}, {products}, whole step in one CUDA graph",
                    design,
                )
            )
    return specs


IMPLS: dict[str, ImplSpec] = {spec.name: spec for spec in _reference_specs() + _fused_specs()}

_REF_EAGER = ("ref-eager", "ref-eager-tf32", "ref-eager-bf16")
_FUSED_EAGER = tuple(f"fused-{d}-{p}" for d in DESIGNS for p in PRECISIONS)
_FUSED_AUTO = tuple(f"fused-auto-{p}" for p in PRECISIONS)

#: Implementations each workload can run (others requested are reported as not applicable).
APPLICABLE: dict[str, tuple[str, ...]] = {
    "train": tuple(IMPLS),
    "memory": tuple(IMPLS),
    "sample": _REF_EAGER + _FUSED_EAGER,
    "iwae": _REF_EAGER + _FUSED_EAGER,
}
#: Implementations each workload runs when ``--impls`` is not given.
DEFAULT_IMPLS: dict[str, tuple[str, ...]] = {
    "train": (
        *_REF_EAGER,
        "ref-compile",
        "ref-compile-reduce-overhead",
        "ref-cudagraph",
        *_FUSED_EAGER,
        *(f"{name}-graph" for name in _FUSED_AUTO),
    ),
    "sample": _REF_EAGER + _FUSED_EAGER,
    "iwae": _REF_EAGER + _FUSED_AUTO,
    "memory": ("ref-eager", "ref-cudagraph", *_FUSED_AUTO, "fused-auto-bf16-graph"),
}


def select_impls(patterns: list[str]) -> list[str]:
    """Expand ``--impls`` items (names or globs such as ``fused-*-bf16``) into implementation names.

    Raises:
        ValueError: an item that matches no implementation.
    """
    names: list[str] = []
    for pattern in patterns:
        matched = [name for name in IMPLS if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"--impls: {pattern!r} matches no implementation; valid: {', '.join(IMPLS)}")
        names += [name for name in matched if name not in names]
    return names


def spec_extras(spec: ImplSpec) -> dict[str, object]:
    """What a record says about its implementation: family, mode, design, precision of the fused ops."""
    extras: dict[str, object] = {"fused": spec.fused, "mode": spec.mode, "dtype": "float32"}
    if spec.fused:
        extras.update(
            design=spec.design,
            core_precision=spec.precision,
            design_forced=spec.design != "auto" and hasattr(ops, "design"),
        )
        if not hasattr(ops, "design"):
            extras["design_note"] = "avme_ext.ops.design not present: the extension's default design"
    return extras


def design_reason(design: str | None) -> str | None:
    """Why ``design`` cannot be forced in this build (None when it can, or needs no forcing)."""
    if design is None or design == "auto":
        return None
    if not hasattr(ops, "design"):
        return (
            "avme_ext.ops.design is not present in this build: only the default design runs (recorded as fused-auto-*)"
        )
    known = getattr(ops, "DESIGNS", DESIGNS)
    if design not in known:
        return f"design {design!r} is not in avme_ext.ops.DESIGNS {tuple(known)}"
    return None


def unavailable_reason(spec: ImplSpec, device: torch.device, *, cpu_compile: bool = False) -> str | None:
    """Why ``spec`` cannot run on ``device`` (None when it can)."""
    cuda = device.type == "cuda"
    if spec.fused:
        if not cuda:
            return "the fused ops need a CUDA device"
        if not ops.is_available():
            return "the avme CUDA extension is not built (avme_ext.ops.is_available() is False)"
        reason = design_reason(spec.design)
        if reason:
            return reason
    if spec.mode in ("cudagraph", "compile-reduce-overhead", "compile-max-autotune") and not cuda:
        return "CUDA graphs need a CUDA device"
    if spec.mode == "eager-tf32" and not cuda:
        return "TF32 is a CUDA tensor-core mode"
    if spec.mode == "compile" and not cuda and not cpu_compile:
        return (
            "torch.compile is skipped on the CPU (inductor's C++ build of the unrolled K-step loop and "
            "its backward takes minutes on a small CPU); pass --cpu-compile to include it"
        )
    return None


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks, so that measurements start clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pool_size(wanted: int, bytes_per_set: int, cap_bytes: int) -> int:
    """How many input sets to pre-generate: ``wanted``, at most ``cap_bytes`` worth, at least 1."""
    return max(1, min(wanted, cap_bytes // max(1, bytes_per_set)))


# --------------------------------------------------------------------------- inputs


def make_train_inputs(
    images: Tensor, batch: int, steps: int, size: ModelSize, sets: int, device: torch.device, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """``sets`` fresh (x, eps) pairs: random batches of real binary images and N(0, 1) noise.

    Args:
        images: (N, D) uint8 0/1 images on ``device`` (the training split).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(sets):
        index = torch.randint(0, images.shape[0], (batch,), generator=generator, device=device)
        x = images[index].to(torch.float32)
        eps = torch.randn((steps, batch, size.latent_dim), generator=generator, device=device)
        out.append((x, eps))
    return out


def make_sample_inputs(
    num: int, steps: int, size: ModelSize, sets: int, device: torch.device, seed: int
) -> list[Tensor]:
    """``sets`` fresh prior draws z (K, num, Z)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn((steps, num, size.latent_dim), generator=generator, device=device) for _ in range(sets)]


# --------------------------------------------------------------------------- model and loss


def build_model(spec: ImplSpec, size: ModelSize, steps: int, device: torch.device, seed: int = 0) -> AVME:
    """The model for ``spec`` with weights drawn from ``seed`` (identical across implementations)."""
    torch.manual_seed(seed)
    model = AVME(
        data_dim=size.data_dim,
        num_classes=size.num_classes,
        enc_hidden=size.enc_hidden,
        dec_hidden=size.dec_hidden,
        latent_dim=size.latent_dim,
        steps=steps,
        impl=spec.core_impl,
        precision=spec.precision,
    )
    return model.to(device)


def elbo_loss(model: AVME, x: Tensor, eps: Tensor) -> Tensor:
    """Mean negative ELBO of the batch with the given noise (``AVME.loss`` with kl_weight=1, no checks)."""
    out = model.core(x, None, eps)
    kl = gaussian_kl(out.mu.float(), out.logvar.float()).sum(dim=0)
    return (reconstruction_nll(out.canvas.float(), x) + kl).mean()


@contextlib.contextmanager
def tf32_mode(mode: str) -> Iterator[None]:
    """TF32 matmuls allowed (forward and backward) for the ``eager-tf32`` mode; nothing otherwise."""
    if mode != "eager-tf32":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def autocast_mode(mode: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for the ``eager-bf16`` mode (around the forward only, as autocast asks)."""
    if mode == "eager-bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def matmul_mode(mode: str, device: torch.device) -> Iterator[None]:
    """The matmul precision context of an eager mode (inference): TF32 allowed, bf16 autocast, or nothing."""
    with tf32_mode(mode), autocast_mode(mode, device):
        yield


def design_context(design: str | None) -> contextlib.AbstractContextManager[Any]:
    """``avme_ext.ops.design(design)`` when the build has that override and a design is named."""
    override = getattr(ops, "design", None)
    if design is None or override is None:
        return contextlib.nullcontext()
    context: contextlib.AbstractContextManager[Any] = override(design)
    return context


@contextlib.contextmanager
def run_context(spec: ImplSpec, device: torch.device) -> Iterator[None]:
    """Everything ``spec`` runs under: its matmul mode and, for the fused ops, its forced design."""
    with design_context(spec.design), matmul_mode(spec.mode, device):
        yield


# --------------------------------------------------------------------------- training step


@dataclass
class TrainCase:
    """A ready training step.

    Attributes:
        step: ``step(i)`` runs one training step on input set ``i % len(inputs)``.
        setup_seconds: wall seconds of compilation / graph capture (first calls included),
            None for eager implementations.
        setup_kind: what ``setup_seconds`` measured.
        extras: anything worth recording about the build (e.g. dynamo graph counts).
        model: the model the step trains.
    """

    step: Callable[[int], None]
    setup_seconds: float | None = None
    setup_kind: str | None = None
    extras: dict[str, Any] | None = None
    model: AVME | None = None


def _dynamo_counts() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover  # noqa: BLE001 - optional: no counters without dynamo
        return {}
    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def configure_dynamo(limit: int = 64) -> None:
    """Raise dynamo's recompile limits: every (batch, K, mode) is a new compile of one code object."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(limit, getattr(dynamo.config, name)))


def build_train_case(
    spec: ImplSpec,
    size: ModelSize,
    steps: int,
    inputs: list[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    lr: float = 1e-3,
    seed: int = 0,
    setup_calls: int = 3,
) -> TrainCase:
    """Build the training step of ``spec`` for the batch/K of ``inputs`` (compiling or capturing it).

    Args:
        spec: the implementation.
        size: model sizes.
        steps: K.
        inputs: pre-generated (x, eps) sets; the step picks set ``i % len(inputs)``.
        device: where to run.
        lr: Adam learning rate.
        seed: weight seed.
        setup_calls: for compiled/graph implementations, calls made at build time (the first
            one compiles; cudagraph trees record a graph on a later one), wall-timed together
            as ``setup_seconds``.
    """
    model = build_model(spec, size, steps, device, seed)
    n = len(inputs)

    if spec.graph:
        case = _build_cudagraph_case(model, inputs, lr, lambda: design_context(spec.design))
        case.model = model
        return case

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    if spec.compiles:
        configure_dynamo()
        mode = spec.mode.removeprefix("compile-") if spec.mode != "compile" else None
        loss_fn = torch.compile(lambda x, eps: elbo_loss(model, x, eps), mode=mode, dynamic=False)
        # cudagraph trees (reduce-overhead, max-autotune) overwrite a replay's outputs on the next
        # one: a training loop marks the start of every iteration.
        mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if mode else None

        def step(i: int) -> None:
            x, eps = inputs[i % n]
            if mark_step is not None:
                mark_step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(x, eps)
            loss.backward()
            optimizer.step()

        before = _dynamo_counts()

        def setup_steps() -> None:
            for i in range(setup_calls):
                step(i)

        seconds = _wall(device, setup_steps)
        after = _dynamo_counts()
        extras = {key: after[key] - before.get(key, 0) for key in after}
        return TrainCase(
            step, seconds, f"torch.compile mode={mode or 'default'}, {setup_calls} first calls", extras, model
        )

    def eager_step(i: int) -> None:
        x, eps = inputs[i % n]
        with design_context(spec.design), tf32_mode(spec.mode):
            optimizer.zero_grad(set_to_none=True)
            with autocast_mode(spec.mode, device):
                loss = elbo_loss(model, x, eps)
            loss.backward()
            optimizer.step()

    return TrainCase(eager_step, model=model)


def _wall(device: torch.device, fn: Callable[[], object]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _build_cudagraph_case(
    model: AVME,
    inputs: list[tuple[Tensor, Tensor]],
    lr: float,
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    warmup: int = 3,
) -> TrainCase:
    """Whole-step capture as in the PyTorch CUDA-graphs docs ("whole network capture").

    Static input buffers; warm-up iterations on a side stream; ``torch.cuda.graph`` around
    zero-grad-free forward + backward + ``Adam(capturable=True).step()``; every call copies
    the next fresh batch and noise into the static buffers (the copy is inside the timed
    region, as it is in a training loop) and replays the graph. ``context()`` (the forced
    design of the fused ops) is entered around the warm-up and the capture.
    """
    n = len(inputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, capturable=True)
    static_x = inputs[0][0].clone()
    static_eps = inputs[0][1].clone()
    start = time.perf_counter()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), context():
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            elbo_loss(model, static_x, static_eps).backward()
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with context(), torch.cuda.graph(graph):
        static_loss = elbo_loss(model, static_x, static_eps)
        static_loss.backward()
        optimizer.step()
    graph.replay()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    def step(i: int) -> None:
        x, eps = inputs[i % n]
        static_x.copy_(x)
        static_eps.copy_(eps)
        graph.replay()

    step.graph = graph  # type: ignore[attr-defined]  # keep the graph (and its pool) alive with the step
    return TrainCase(step, seconds, f"side-stream warm-up ({warmup} steps) + capture + first replay")


# --------------------------------------------------------------------------- sampling


def build_sample_case(
    spec: ImplSpec, size: ModelSize, steps: int, inputs: list[Tensor], device: torch.device, *, seed: int = 0
) -> Callable[[int], None]:
    """``call(i)``: draw images from prior draws ``inputs[i % n]`` (decoder + write, sigmoid of s_K)."""
    model = build_model(spec, size, steps, device, seed)
    n = len(inputs)

    @torch.no_grad()
    def call(i: int) -> None:
        with run_context(spec, device):
            torch.sigmoid(model.core.sample(z=inputs[i % n]).canvas)

    return call
