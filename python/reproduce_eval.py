"""Evaluation stage of the reproduction: the test split, one chunk of images at a time, resumable.

Each model is evaluated in passes (:func:`passes_for`): ``main`` gives the negative ELBO, the
reconstruction term, the per-step KL and the IWAE bound with ``samples`` trajectories per image
(-log p(x) for an unconditional model, -log p(x|y) for a conditional one); ``marginal``
(conditional models) gives -log p(x) over a uniform label prior from one IWAE bound per class with
``marginal_samples`` trajectories each.

Chunk ``i`` of a pass is ``avme_ext.evaluation.evaluate(..., shard=(i, num_chunks))``: the images
``[i * B, (i + 1) * B)`` with the random streams of chunk ``i``, so the merged chunks equal one
uninterrupted ``avme eval --batch-size B --seed S --max-rows R`` run exactly (same device). Every
chunk is written atomically to ``<model>/eval/<pass>/chunk-NNNNN.safetensors`` with its timing;
an invocation skips the chunks that exist and stops before a chunk that would not finish before
its deadline.

The test split is read here only, and only once every model is trained.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reproduce_state import Layout, Manifest, ModelSpec, Plan, now_iso

#: IWAE trajectories per second assumed before a chunk has been timed on this device: a cautious
#: guess that only decides whether the first chunk is started; the measurement replaces it.
DEFAULT_TRAJECTORIES_PER_SECOND = 1.0e5
#: Arithmetic estimate for an H100 (for planning only, not measured): one trajectory of the paper's
#: model costs about 92 MFLOP in the reference (K=12 steps of 7.46 MFLOP, plus 2.5 MFLOP for the
#: image's own encoder product); at 40 TFLOP/s of FP32 matrix products plus 40% for the
#: element-wise work, about 3e5 trajectories per second.
ESTIMATED_TRAJECTORIES_PER_SECOND_H100 = 3.0e5
SAFETY = 1.25
CHUNK_META = "avme-reproduction-chunk"


class StageOrderError(RuntimeError):
    """A stage was asked for before the stages it needs are done."""


@dataclass(frozen=True)
class EvalPass:
    """One evaluation of a model over the test split.

    Attributes:
        name: ``main`` or ``marginal``.
        samples: IWAE trajectories per image (per class for ``marginal``).
        marginal: compute -log p(x) from one bound per class (conditional models).
    """

    name: str
    samples: int
    marginal: bool

    def trajectories(self, images: int, num_classes: int) -> int:
        """Trajectories run for ``images`` images (the cost of a chunk)."""
        return images * self.samples * (num_classes if self.marginal else 1)


def passes_for(spec: ModelSpec, plan: Plan) -> list[EvalPass]:
    passes = [EvalPass("main", plan.samples, False)]
    if spec.conditional and plan.marginal_samples > 0:
        passes.append(EvalPass("marginal", plan.marginal_samples, True))
    return passes


def test_images(plan: Plan) -> int:
    return plan.num_images or 10_000


def num_chunks(plan: Plan) -> int:
    return math.ceil(test_images(plan) / plan.eval_batch_size)


def load_test_split(plan: Plan):
    """The test split (or its seeded random subset of ``plan.num_images``, chosen as ``avme eval --num-images`` does)."""
    import torch

    from avme_ext.data import load_split

    split = load_split("binarized_mnist", "test", seed=plan.seed)
    if plan.num_images:
        split = split.subset(plan.num_images, torch.Generator().manual_seed(plan.seed))
    return split


# --------------------------------------------------------------------------- chunk files
def save_chunk(path: Path, result: Any, meta: dict[str, Any]) -> None:
    """Write an ``EvalResult`` (its per-image tensors) and ``meta`` atomically as safetensors."""
    from safetensors.torch import save_file

    tensors = {name: getattr(result, name).contiguous() for name in result._PER_IMAGE if getattr(result, name) is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={CHUNK_META: json.dumps({**meta, "samples": result.samples})})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_chunk(path: Path) -> tuple[Any, dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from avme_ext.evaluation import EvalResult

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[CHUNK_META])
    tensors = load_file(str(path))
    fields = {name: tensors.get(name) for name in EvalResult._PER_IMAGE}
    return EvalResult(**fields, samples=int(meta["samples"])), meta


def chunks_on_file(layout: Layout, name: str, eval_pass: EvalPass, plan: Plan) -> list[int]:
    return [i for i in range(num_chunks(plan)) if layout.chunk(name, eval_pass.name, i).is_file()]


def missing_chunks(layout: Layout, manifest: Manifest, name: str, eval_pass: EvalPass) -> list[int]:
    """Chunks of a pass evaluated by no call: neither recorded in the manifest (a call on another
    machine) nor on file here."""
    plan = manifest.plan
    recorded = manifest.data["evaluation"].get(name, {}).get(eval_pass.name, {}).get("done", [])
    done = set(recorded) | set(chunks_on_file(layout, name, eval_pass, plan))
    return [i for i in range(num_chunks(plan)) if i not in done]


def load_pass(layout: Layout, name: str, eval_pass: EvalPass, plan: Plan) -> tuple[Any, list[dict[str, Any]]]:
    """The merged result of a finished pass and the chunks' metadata.

    Raises:
        StageOrderError: some chunks are missing.
    """
    from avme_ext.evaluation import merge_results

    missing = sorted(set(range(num_chunks(plan))) - set(chunks_on_file(layout, name, eval_pass, plan)))
    if missing:
        raise StageOrderError(f"{name}/{eval_pass.name}: {len(missing)} of {num_chunks(plan)} test chunks are not "
                              "here; evaluate them, or apply the files the evaluation calls returned (--unpack)")
    parts = [load_chunk(layout.chunk(name, eval_pass.name, i)) for i in range(num_chunks(plan))]
    return merge_results([part for part, _ in parts]), [meta for _, meta in parts]


# --------------------------------------------------------------------------- the stage
def rate_key(eval_pass: EvalPass, plan: Plan, num_classes: int) -> str:
    return f"{eval_pass.name}-S{eval_pass.samples}-C{num_classes}-B{plan.eval_batch_size}-R{plan.max_rows}"


def estimated_chunk_seconds(manifest: Manifest, device_name: str, key: str, trajectories: int) -> tuple[float, bool]:
    """(seconds, measured) for one chunk."""
    measured = manifest.rates(device_name)["eval_chunk"].get(key)
    if measured is not None:
        return float(measured), True
    return trajectories / DEFAULT_TRAJECTORIES_PER_SECOND, False


def eval_stage(
    layout: Layout,
    manifest: Manifest,
    *,
    device: str,
    device_name: str,
    deadline: float,
    log,
    chunks_per_call: int | None = None,
) -> bool:
    """Evaluate the missing chunks that fit before ``deadline`` (at most ``chunks_per_call``); True when
    every pass of every model is done. Chunks done are recorded in the manifest, so a call on another
    machine needs only the manifest and the weights.

    Raises:
        StageOrderError: a model is not trained yet (the test split stays untouched until all are).
    """
    if not manifest.all_trained():
        raise StageOrderError(f"the test split is evaluated once every model is trained; still training: "
                              f"{manifest.untrained()}")
    import torch

    from avme_ext.checkpoint import load_model
    from avme_ext.evaluation import evaluate

    plan = manifest.plan
    chunks = num_chunks(plan)
    split = None
    complete = True
    evaluated = 0
    for spec in plan.specs:
        weights = layout.weights(spec.name)
        model = None
        for eval_pass in passes_for(spec, plan):
            entry = manifest.eval_entry(spec.name, eval_pass.name)
            entry.update({"samples": eval_pass.samples, "marginal": eval_pass.marginal, "num_chunks": chunks,
                          "images": test_images(plan)})
            missing = missing_chunks(layout, manifest, spec.name, eval_pass)
            entry["done"] = sorted(set(range(chunks)) - set(missing))
            entry["chunks_done"] = len(entry["done"])
            if not missing:
                continue
            complete = False
            if not weights.is_file():
                log(f"{spec.name}: {weights} is not here (not carried to this machine); its evaluation waits")
                continue
            if model is None:
                model = load_model(weights, device=device, impl=plan.impl)
            if split is None:
                split = load_test_split(plan)
            classes = model.num_classes
            key = rate_key(eval_pass, plan, classes)
            for index in missing:
                images = min(plan.eval_batch_size, len(split) - index * plan.eval_batch_size)
                estimate, measured = estimated_chunk_seconds(manifest, device_name, key,
                                                             eval_pass.trajectories(images, classes))
                left = deadline - time.monotonic()
                if chunks_per_call is not None and evaluated >= chunks_per_call:
                    log(f"{spec.name}/{eval_pass.name}: stopping before chunk {index}: {chunks_per_call} chunks done")
                    manifest.save()
                    return False
                if estimate * SAFETY > left:
                    log(f"{spec.name}/{eval_pass.name}: stopping before chunk {index} of {chunks}: "
                        f"{estimate:.1f} s per chunk{'' if measured else ' (estimate)'}, {left:.0f} s left")
                    manifest.save()
                    return False
                start = time.perf_counter()
                result = evaluate(model, split, samples=eval_pass.samples, batch_size=plan.eval_batch_size,
                                  seed=plan.seed, max_rows=plan.max_rows, shard=(index, chunks),
                                  marginal=eval_pass.marginal)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                save_chunk(layout.chunk(spec.name, eval_pass.name, index), result, {
                    "chunk": index, "num_chunks": chunks, "seconds": seconds, "device": device,
                    "device_name": device_name, "finished_at": now_iso(),
                })
                entry["done"] = sorted({*entry["done"], index})
                entry["chunks_done"] = len(entry["done"])
                evaluated += 1
                entry["seconds"] = round(entry.get("seconds", 0.0) + seconds, 3)
                entry.setdefault("devices", [])
                if device_name not in entry["devices"]:
                    entry["devices"].append(device_name)
                if images == plan.eval_batch_size:
                    manifest.rates(device_name)["eval_chunk"][key] = round(seconds, 4)
                manifest.save()
            log(f"{spec.name}/{eval_pass.name}: all {chunks} chunks evaluated ({entry['seconds']:.1f} s)")
    manifest.save()
    return complete or all(
        not missing_chunks(layout, manifest, spec.name, p) for spec in plan.specs for p in passes_for(spec, plan)
    )
