"""Evaluation stage of the reproduction: every pass of every model over the test split, chunk by chunk.

Chunk ``i`` of a pass is ``avme_ext.evaluation.evaluate(..., shard=(i, num_chunks))``: the images
``[i * B, (i + 1) * B)`` with the random streams of chunk ``i``, so the merged chunks equal one
uninterrupted ``avme eval --batch-size B --seed S --max-rows R`` run exactly (same device). Each
chunk is written atomically with what made it (the weights' SHA-256, samples, seed, ...); a rerun
skips the chunks that match and evaluates the others. The weights evaluated are the float16 files
of the training stage, loaded as float32.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reproduce_plan import MODELS, EvalPass, Layout, Plan, device_name

CHUNK_META = "avme-reproduction-chunk"


@dataclass(frozen=True)
class PassWork:
    """The chunks of one pass of one model still to evaluate."""

    name: str
    eval_pass: EvalPass
    weights_sha256: str
    missing: list[int]

    def trajectories(self, plan: Plan) -> int:
        return self.eval_pass.trajectories(len(self.missing) * plan.eval_batch_size, MODELS[self.name].num_classes)


# --------------------------------------------------------------------------- chunk files
def chunk_key(plan: Plan, eval_pass: EvalPass, weights_sha256: str) -> dict[str, Any]:
    """What a chunk's numbers depend on; a chunk file holding another key is evaluated again."""
    return {"samples": eval_pass.samples, "marginal": eval_pass.marginal, "seed": plan.seed,
            "batch_size": plan.eval_batch_size, "max_rows": plan.max_rows, "num_images": plan.test_images,
            "impl": plan.impl, "weights_sha256": weights_sha256}


def save_chunk(path: Path, result: Any, meta: dict[str, Any]) -> None:
    """Write an ``EvalResult``'s per-image tensors and ``meta`` atomically as safetensors."""
    from safetensors.torch import save_file

    from avme_ext.checkpoint import atomic_write_bytes

    tensors = {name: getattr(result, name).contiguous() for name in result._PER_IMAGE if getattr(result, name) is not None}
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata={CHUNK_META: json.dumps(meta)}))


def read_chunk_meta(path: Path) -> dict[str, Any] | None:
    """The metadata of a chunk file, or None when it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {})[CHUNK_META])
    except (OSError, KeyError, ValueError, RuntimeError):
        return None


def chunk_meta(path: Path) -> dict[str, Any]:
    """The metadata of a chunk file that must be there.

    Raises:
        FileNotFoundError: the file is missing or holds no chunk.
    """
    meta = read_chunk_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path}: no evaluation chunk here (run the evaluation first)")
    return meta


def load_chunk(path: Path) -> Any:
    """The ``EvalResult`` of a chunk file."""
    from safetensors.torch import load_file

    from avme_ext.evaluation import EvalResult

    meta = chunk_meta(path)
    tensors = load_file(str(path))
    return EvalResult(**{name: tensors.get(name) for name in EvalResult._PER_IMAGE}, samples=int(meta["key"]["samples"]))


def pass_work(layout: Layout, plan: Plan, name: str, eval_pass: EvalPass, weights_sha256: str) -> PassWork:
    key = chunk_key(plan, eval_pass, weights_sha256)
    missing = [i for i in range(plan.num_chunks)
               if (read_chunk_meta(layout.chunk(name, eval_pass.name, i)) or {}).get("key") != key]
    return PassWork(name, eval_pass, weights_sha256, missing)


def pending_work(layout: Layout, plan: Plan, weights: dict[str, str]) -> list[PassWork]:
    """The passes with chunks left, for the trained models ``weights`` (name -> SHA-256 of their weights)."""
    work = [pass_work(layout, plan, name, p, sha) for name, sha in weights.items() for p in plan.passes(name)]
    return [w for w in work if w.missing]


def load_pass(layout: Layout, plan: Plan, name: str, eval_pass: EvalPass) -> tuple[Any, list[dict[str, Any]]]:
    """The merged result of a finished pass and its chunks' metadata."""
    from avme_ext.evaluation import merge_results

    paths = [layout.chunk(name, eval_pass.name, i) for i in range(plan.num_chunks)]
    return merge_results([load_chunk(p) for p in paths]), [chunk_meta(p) for p in paths]


# --------------------------------------------------------------------------- the stage
def load_test_split(plan: Plan) -> Any:
    """The test split (or its seeded random subset of ``plan.num_images``, chosen as ``avme eval --num-images`` does)."""
    import torch

    from avme_ext.data import load_split

    split = load_split("binarized_mnist", "test", seed=plan.seed)
    if plan.num_images:
        split = split.subset(plan.num_images, torch.Generator().manual_seed(plan.seed))
    return split


def measure_device(plan: Plan, device: str) -> dict[str, Any]:
    """The device's name and the IWAE's trajectories per second on it, timed on an untrained model of the
    plan's sizes (``avme_ext.evaluation.estimate_cost``: well under a second)."""
    from avme_ext import AVME
    from avme_ext.evaluation import estimate_cost

    model = AVME(**plan.model_sizes("avme-canvas-conditional"), impl=plan.impl).to(device)
    rate = estimate_cost(model, 1, samples=1, max_rows=plan.max_rows).trajectories_per_second
    return {"device": device_name(device), "trajectories_per_second": rate}


#: :func:`measure_device` in a process of its own (argv: python/, the plan as JSON, the device).
MEASURE_CHILD = ("import json, sys; sys.path[:0] = [sys.argv[1]]; import reproduce_eval, reproduce_plan; "
                 "plan = reproduce_plan.Plan.from_dict(json.loads(sys.argv[2])); "
                 "print(json.dumps(reproduce_eval.measure_device(plan, sys.argv[3])))")


def measure_device_in_child(plan: Plan, device: str) -> dict[str, Any]:
    """:func:`measure_device` in a child process, so that this one holds no CUDA context while the
    training processes run (an MPS daemon started afterwards serves them alone)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEASURE_CHILD, str(Path(__file__).resolve().parent),
                           json.dumps(plan.to_dict()), device], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the evaluation speed on {device} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def evaluate_models(layout: Layout, plan: Plan, work: list[PassWork], *, device: str, device_label: str,
                    log: Callable[[str], None], report: Callable[[PassWork, int, int, float], None]) -> None:
    """Evaluate every missing chunk of ``work``.

    ``report(work, chunks_left, trajectories, seconds)`` is called after each chunk with the chunks left in
    that pass and the trajectories and seconds of the chunk.
    """
    import torch

    from avme_ext.checkpoint import load_model
    from avme_ext.evaluation import evaluate

    split = load_test_split(plan)
    for item in work:
        model = load_model(layout.weights(item.name), device=device, impl=plan.impl)
        key = chunk_key(plan, item.eval_pass, item.weights_sha256)
        log(f"{item.name}/{item.eval_pass.name}: evaluating {len(item.missing)} of {plan.num_chunks} chunks "
            f"(S={item.eval_pass.samples}{' per class' if item.eval_pass.marginal else ''})")
        for position, index in enumerate(item.missing):
            start = time.perf_counter()
            result = evaluate(model, split, samples=item.eval_pass.samples, batch_size=plan.eval_batch_size,
                              seed=plan.seed, max_rows=plan.max_rows, shard=(index, plan.num_chunks),
                              marginal=item.eval_pass.marginal)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            save_chunk(layout.chunk(item.name, item.eval_pass.name, index), result,
                       {"key": key, "chunk": index, "seconds": round(seconds, 4), "device": device_label})
            report(item, len(item.missing) - position - 1, item.eval_pass.trajectories(len(result), MODELS[item.name].num_classes), seconds)
