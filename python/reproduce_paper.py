"""Reproduce the paper's binarized-MNIST experiments with honest likelihoods, in stages that fit short GPU calls.

Four models (unconditional and class-conditional, with the paper's encoder input "canvas" and
DRAW's "error" image as an ablation) are trained with the paper's configuration (K=12, LSTMs of
400, Z=100, batch 100, Adam), each keeping its best validation epoch; then evaluated on the
10,000-image test split (negative ELBO, IWAE with S=5000, reconstruction term, per-step KL, and
-log p(x|y), -log p(x) for the conditional models); then the figures and ``docs/results.json``,
``docs/results.md`` are made beside the published numbers.

Stages (``--stage``):

    auto      the next GPU work that fits --time-budget: training, then (once every model is
              trained) the evaluation on the test split; exit status 3 while work remains
    all       everything, without a time limit (for a machine without limits, or a smoke run)
    train | eval | figures | report | publish     one stage
    status    what is done and an estimate of the GPU time left (reads only)
    next-call the GPU call that continues the work: command, timeout_s, carry (reads only)

All state lives in --out (default .carry/repro, ignored by git; layout in reproduce_state.py)
with a manifest.json of what is done, timings, devices and commits. Every stage resumes: a
training run continues exactly from its checkpoint (avme train --resume), the evaluation per
chunk of images, the figures per file; finished work is skipped. --pack-to DIR writes what an
invocation changed as at most 7 files of at most 15 MiB (60 MiB in all); --unpack DIR applies
them here.

    python python/reproduce_paper.py --init                           # the plan, in .carry/repro
    python python/reproduce_paper.py --stage next-call                # the next GPU call
    python python/reproduce_paper.py --unpack DIR                     # apply what a call returned
    python python/reproduce_paper.py --stage figures && python python/reproduce_paper.py --stage report
    python python/reproduce_paper.py --out /tmp/smoke/repro --docs /tmp/smoke/docs --stage all \\
        --models avme-canvas --epochs 1 --samples 2 --num-images 20 --device cpu -- \\
        --train-subset 300 --valid-subset 100 --enc-hidden 16 --dec-hidden 16 --latent-dim 4 --steps 3

docs/reproduction.md describes the plan call by call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(HERE), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import reproduce_pack as packing
from reproduce_mps import MPS_MODES, mps_daemon
from avme_ext.loop_types import IMPLS
from avme_ext.training.config import LR_SCHEDULES
from reproduce_eval import (
    ESTIMATED_TRAJECTORIES_PER_SECOND_H100,
    StageOrderError,
    eval_stage,
    missing_chunks,
    num_chunks,
    passes_for,
)
from reproduce_state import (
    DEFAULT_EPOCHS,
    MODELS,
    Layout,
    Manifest,
    ManifestError,
    Plan,
    device_description,
    provenance,
    source_commit,
)
from reproduce_train import RateModel, read_progress, train_stage

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_MORE = 0, 1, 2, 3
STAGES = ("auto", "all", "train", "eval", "figures", "report", "publish", "status", "next-call")
#: Seconds kept back from --time-budget for stopping the runs and packing the results.
PACK_RESERVE_SECONDS = 45.0
#: A GPU call: the command's own budget and its timeout leave room for start-up and transfers.
CALL_BUDGET_MINUTES = 8.5
CALL_OVERHEAD_SECONDS = 75
DEVICE_START_SECONDS = 90
CARRY_LIMIT_BYTES = 64 << 20

PLAN_OPTIONS = ("models", "epochs", "patience", "lr", "lr_schedule", "lr_final", "lr_decay_fraction", "clip_grad", "kl_warmup_steps", "seed",
                "impl", "samples", "marginal_samples", "eval_batch_size", "max_rows", "num_images")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- arguments
def _epochs_option(text: str) -> tuple[str | None, int]:
    name, _, value = text.rpartition("=")
    try:
        epochs = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MODEL=N, got {text!r}") from None
    if epochs < 1 or (name and name not in MODELS):
        raise argparse.ArgumentTypeError(f"expected N >= 1 or MODEL=N with MODEL in {list(MODELS)}, got {text!r}")
    return (name or None), epochs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".carry/repro", help="state directory (default .carry/repro)")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where results.md, results.json and figures/ go")
    parser.add_argument("--stage", default="auto", choices=STAGES)
    parser.add_argument("--init", action="store_true", help="create the manifest with the plan options and stop")
    plan = parser.add_argument_group("plan (fixed when the manifest is created)")
    plan.add_argument("--models", default=None, help=f"comma-separated, in order of priority (default {','.join(MODELS)})")
    plan.add_argument("--epochs", type=_epochs_option, action="append", default=None, metavar="N|MODEL=N",
                      help=f"epoch cap of every model, or of one (repeatable; default {DEFAULT_EPOCHS})")
    plan.add_argument("--patience", type=int, default=None, help="stop after N epochs without a better validation bound (10)")
    plan.add_argument("--lr", type=float, default=None, help="Adam learning rate, at the start (1e-3)")
    plan.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                      help="constant, or cosine: --lr, then a cosine decay to --lr-final over the last "
                           "--lr-decay-fraction of each model's epoch cap (cosine)")
    plan.add_argument("--lr-final", type=float, default=None, help="cosine: the rate at the epoch cap (0)")
    plan.add_argument("--lr-decay-fraction", type=float, default=None,
                      help="cosine: the share of each epoch cap spent decaying (1/3)")
    plan.add_argument("--clip-grad", type=float, default=None, help="gradient-norm clip (10)")
    plan.add_argument("--kl-warmup-steps", type=int, default=None, help="linear KL warm-up steps (0)")
    plan.add_argument("--seed", type=int, default=None, help="seed of training and evaluation (0)")
    plan.add_argument("--impl", default=None, choices=IMPLS,
                      help="K-step loop implementation for training and evaluation (ref); keep one for a whole run")
    plan.add_argument("--samples", type=int, default=None, help="IWAE trajectories per test image (5000)")
    plan.add_argument("--marginal-samples", type=int, default=None,
                      help="conditional models: trajectories per class for -log p(x) (500; 0 skips it)")
    plan.add_argument("--eval-batch-size", type=int, default=None, help="images per evaluation chunk (100)")
    plan.add_argument("--max-rows", type=int, default=None, help="IWAE trajectories evaluated at once (20000)")
    plan.add_argument("--num-images", type=int, default=None, help="test images, a seeded subset (0: all 10,000)")
    run = parser.add_argument_group("this invocation")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    run.add_argument("--jobs", type=int, default=None, help="training runs side by side (default 4 on CUDA, 1 on CPU)")
    run.add_argument("--mps", choices=MPS_MODES, default="auto",
                     help="run the training processes of a CUDA call under a private NVIDIA MPS daemon, so their "
                          "kernels run concurrently: auto (when nvidia-cuda-mps-control works), on (or fail), off "
                          "(default auto)")
    run.add_argument("--time-budget", type=float, default=0.0, metavar="MIN", help="minutes for this invocation (0: no limit)")
    run.add_argument("--epochs-per-call", type=int, default=None, metavar="N",
                     help="train each model at most N more epochs in this invocation (manual staging)")
    run.add_argument("--chunks-per-call", type=int, default=None, metavar="N",
                     help="evaluate at most N chunks in this invocation (manual staging)")
    run.add_argument("--expect-calls", type=int, default=None, metavar="N",
                     help="refuse to start unless the manifest records N calls (a GPU call checks it got the latest state)")
    run.add_argument("--pack-to", default=None, metavar="DIR", help="write what this invocation changed to DIR (the device's $OUT)")
    run.add_argument("--unpack", default=None, metavar="DIR", help="apply the files a GPU call returned, then stop")
    run.add_argument("--device-seconds-left", type=float, default=900.0,
                     help="next-call: device seconds left in the current lease of the GPU machine")
    run.add_argument("--device-warm", action="store_true",
                     help="next-call: the device machine is still warm (no start-up to allow for)")
    run.add_argument("--pretrained-dir", default=None, help="publish: the registry (default avme_ext/assets/pretrained)")
    parser.add_argument("train_extra", nargs=argparse.REMAINDER, help="after '--': more 'avme train' options")
    return parser


def plan_from_args(args: argparse.Namespace, base: Plan | None = None) -> Plan:
    """The plan: ``base`` (or the defaults) with the options given on the command line."""
    plan = (base or Plan()).to_dict()
    if args.models is not None:
        plan["models"] = [m for m in args.models.split(",") if m]
    epochs = {**DEFAULT_EPOCHS, **plan["epochs"]}
    for name, value in args.epochs or []:
        for target in [name] if name else list(MODELS):
            epochs[target] = value
    plan["epochs"] = {name: epochs[name] for name in plan["models"] if name in epochs}
    for name in PLAN_OPTIONS[2:]:
        value = getattr(args, name)
        if value is not None:
            plan[name] = value
    if args.train_extra:
        plan["train_extra"] = [a for a in args.train_extra if a != "--"]
    return Plan.from_dict(plan)


def given_plan_options(args: argparse.Namespace) -> list[str]:
    given = [name for name in PLAN_OPTIONS if getattr(args, name) is not None]
    return given + (["train_extra"] if [a for a in args.train_extra if a != "--"] else [])


def open_manifest(layout: Layout, args: argparse.Namespace) -> Manifest:
    """The manifest in --out; created from the plan options when there is none (not in a GPU call)."""
    if Manifest.exists(layout):
        manifest = Manifest.load(layout)
        given = given_plan_options(args)
        if given:
            wanted = plan_from_args(args, manifest.plan).to_dict()
            differ = [k for k in wanted if wanted[k] != manifest.data["plan"].get(k)]
            if differ:
                raise ManifestError(f"{layout.manifest} holds another plan ({', '.join(differ)} differ); the plan is fixed "
                                    "once made: drop these options, or use another --out")
        return manifest
    if args.pack_to:
        raise ManifestError(f"{layout.manifest} does not exist on this machine: carry the state directory "
                            "(see --stage next-call), or create it with --init first")
    return Manifest.create(layout, plan_from_args(args))


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ManifestError(f"--device {name}: CUDA is not available here")
    return name


# --------------------------------------------------------------------------- transport
def shrink_for_transport(layout: Layout, manifest: Manifest, step: int, changed: set[str]) -> bool:
    """Make the state to send back smaller; False when this step finds nothing to drop.

    Only unfinished runs whose files changed in this invocation (``changed``: paths relative to
    the state directory) are touched. Step 0 drops their float16 best weights so far (the
    validation value is kept; the selection then uses the best weights still at hand). Step 1
    restarts all of them but the first in priority from scratch; step 2 restarts the first too
    (the finished models still travel).
    """
    training = [name for name in manifest.plan.models if manifest.model(name)["status"] == "training"
                and layout.rel(layout.run_dir(name) / "last.safetensors") in changed]
    if step == 0:
        dropped = [name for name in training
                   if layout.best_so_far(name).is_file() and layout.rel(layout.best_so_far(name)) in changed]
        for name in dropped:
            layout.best_so_far(name).unlink()
            manifest.model(name)["best_so_far"] = {**manifest.model(name).get("best_so_far", {}), "lost": True}
            log(f"{name}: best weights so far dropped to fit the limits of what comes back")
        manifest.save()
        return bool(dropped)
    restart = training[1:] if step == 1 else training
    for name in restart:
        shutil.rmtree(layout.run_dir(name), ignore_errors=True)
        entry = manifest.model(name)
        entry.update({"status": "pending", "epochs_done": 0, "best_epoch": None, "best_valid_nelbo": None})
        entry.pop("best_so_far", None)
        entry["reset_for_transport"] = entry.get("reset_for_transport", 0) + 1
        log(f"{name}: its unfinished run cannot travel back; it restarts from scratch next time")
    manifest.save()
    return bool(restart)


def pack_changes(layout: Layout, manifest: Manifest, before: packing.Snapshot, destination: Path, base: dict) -> None:
    """Pack what this invocation changed into ``destination``, dropping state (:func:`shrink_for_transport`)
    until it fits the limits of what comes back."""
    for step in range(4):
        changed, removed = packing.changes(layout.root, before)
        try:
            report = packing.pack(layout.root, changed, removed, destination, base=base)
        except packing.PackTooLarge as error:
            log(f"pack: {error}")
            if step == 3:
                raise
            shrink_for_transport(layout, manifest, step, set(changed))
            continue
        log(f"packed {len(report.files)} files ({report.raw_bytes / 2**20:.1f} MiB, {report.packed_bytes / 2**20:.1f} MiB "
            f"packed, {len(report.parts)} parts) and {len(report.removed)} removals into {destination}")
        return


def unpack_into(layout: Layout, source: Path) -> None:
    index = packing.read_index(source)
    base = index["base"]
    if Manifest.exists(layout):
        local = Manifest.load(layout).data
        if local["created_at"] != base.get("created_at") or len(local["calls"]) != base.get("calls"):
            raise ManifestError(
                f"the files in {source} continue a state with {base.get('calls')} calls (created {base.get('created_at')}); "
                f"{layout.manifest} has {len(local['calls'])} calls (created {local['created_at']}): apply the returned "
                "files in the order of the calls, each once")
    packing.unpack(source, layout.root)
    log(f"applied {len(index['files'])} files and {len(index['removed'])} removals from {source} to {layout.root}")


# --------------------------------------------------------------------------- status and the next call
def _tree_bytes() -> int | None:
    """Bytes of the working tree that travels to the device (tracked and untracked files git does not ignore)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, timeout=60, check=True).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return None
    return sum((REPO / os.fsdecode(n)).stat().st_size for n in names if n and (REPO / os.fsdecode(n)).is_file())


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remaining_work(layout: Layout, manifest: Manifest) -> dict[str, Any]:
    """What is left, with estimated device seconds at the rates measured on the device (or the defaults)."""
    plan = manifest.plan
    rates_by_device = manifest.data["rates"]
    device_rates = next((r for name, r in rates_by_device.items() if not name.startswith("cpu")), None) or {
        "train_epoch": {}, "train_startup": None, "eval_chunk": {}}
    model = RateModel(device_rates["train_epoch"], device_rates["train_startup"])
    per_model_epoch = min(model.seconds_per_epoch(j) / j for j in (1, 2, 3, 4))
    epochs_left = {name: max(0, manifest.model(name)["epochs_target"] - manifest.model(name)["epochs_done"])
                   for name in manifest.untrained()}
    chunks_left = {}
    eval_seconds = 0.0
    for spec in plan.specs:
        for eval_pass in passes_for(spec, plan):
            missing = len(missing_chunks(layout, manifest, spec.name, eval_pass))
            if missing:
                chunks_left[f"{spec.name}/{eval_pass.name}"] = missing
                key = next((k for k in device_rates["eval_chunk"] if k.startswith(f"{eval_pass.name}-S{eval_pass.samples}-")), None)
                per_chunk = device_rates["eval_chunk"].get(key) if key else None
                if per_chunk is None:
                    trajectories = eval_pass.trajectories(plan.eval_batch_size, 10 if spec.conditional else 1)
                    per_chunk = trajectories / ESTIMATED_TRAJECTORIES_PER_SECOND_H100
                eval_seconds += missing * per_chunk
    return {
        "epochs_left": epochs_left,
        "train_seconds_estimate": sum(epochs_left.values()) * per_model_epoch,
        "train_rates_measured": model.measured,
        "chunks_left": chunks_left,
        "eval_seconds_estimate": eval_seconds,
    }


def print_status(layout: Layout, manifest: Manifest) -> None:
    plan = manifest.plan
    print(f"{layout.manifest}: {len(manifest.data['calls'])} calls")
    for name in plan.models:
        m = manifest.model(name)
        progress = read_progress(layout.run_dir(name)) if m["status"] != "trained" else None
        epochs = progress.epochs_done if progress else m["epochs_done"]
        best = m["best_valid_nelbo"]
        print(f"  {name:<26} {m['status']:<9} epochs {epochs}/{m['epochs_target']}  best valid -ELBO "
              f"{'n/a' if best is None else f'{best:.3f}'} (epoch {m['best_epoch']})"
              + (f"  stopped: {m['stop_reason']}" if m["stop_reason"] else ""))
    for spec in plan.specs:
        for eval_pass in passes_for(spec, plan):
            left = len(missing_chunks(layout, manifest, spec.name, eval_pass))
            print(f"  eval {spec.name}/{eval_pass.name} (S={eval_pass.samples}{' per class' if eval_pass.marginal else ''}): "
                  f"{num_chunks(plan) - left}/{num_chunks(plan)} chunks")
    work = remaining_work(layout, manifest)
    train_note = "measured rates" if work["train_rates_measured"] else "default rate, an estimate"
    eval_note = "measured rates where present, else an arithmetic estimate"
    print(f"  device time left (estimates): training about {work['train_seconds_estimate'] / 60:.1f} min ({train_note}), "
          f"evaluation about {work['eval_seconds_estimate'] / 60:.1f} min ({eval_note}), start-ups and transfers not counted")


def next_call(layout: Layout, manifest: Manifest, seconds_left: float, warm: bool = False) -> dict[str, Any] | None:
    """The GPU call that continues the work (None when none is left): {"command", "timeout_s", "carry", ...}."""
    carry = [layout.manifest]
    if manifest.untrained():
        for name in manifest.untrained():
            for path in (layout.run_dir(name), layout.best_so_far(name)):
                if path.exists():
                    carry.append(path)
        work = "train"
    else:
        plan = manifest.plan
        pending = [s.name for s in plan.specs
                   if any(missing_chunks(layout, manifest, s.name, p) for p in passes_for(s, plan))]
        if not pending:
            return None
        carry += [layout.weights(name) for name in pending]
        work = "eval"
    start = 0 if warm else DEVICE_START_SECONDS
    budget = min(CALL_BUDGET_MINUTES, (seconds_left - start - CALL_OVERHEAD_SECONDS) / 60)
    if budget < 2:
        return {"error": f"{seconds_left:.0f} device seconds left: too little for a call; continue in the next lease"}
    budget = math.floor(budget * 2) / 2
    commit = source_commit()
    label = commit["commit"] + ("+modified" if commit.get("modified") else "")
    out = layout.root.relative_to(REPO).as_posix() if layout.root.is_relative_to(REPO) else str(layout.root)
    command = (f"set -o pipefail; export PYTHONUNBUFFERED=1 AVME_COMMIT={shlex.quote(label)}; "
               f"python3 python/reproduce_paper.py --out {out} --stage auto --time-budget {budget:g} "
               f"--expect-calls {len(manifest.data['calls'])} --pack-to \"$OUT\" 2>&1 | tee \"$OUT/repro-log.txt\"")
    rel = [p.relative_to(REPO).as_posix() if p.is_relative_to(REPO) else str(p) for p in carry]
    carried = sum(_bytes_under(p) for p in carry)
    tree = _tree_bytes()
    return {"work": work, "command": command, "timeout_s": int(min(600, budget * 60 + CALL_OVERHEAD_SECONDS)),
            "carry": rel, "carry_bytes": carried, "tree_bytes": tree,
            "fits": None if tree is None else tree + carried <= CARRY_LIMIT_BYTES}


# --------------------------------------------------------------------------- stages
def run_stage(stage: str, layout: Layout, manifest: Manifest, args: argparse.Namespace, device: str,
              device_name: str, deadline: float, call: int) -> int:
    docs = Path(args.docs)
    jobs = args.jobs or (4 if device.startswith("cuda") else 1)
    train_args = {"device": device, "device_name": device_name, "jobs": jobs, "call": call,
                  "epochs_per_call": args.epochs_per_call, "log": log}
    code = EXIT_DONE
    if stage in ("auto", "all", "train"):
        start = time.monotonic()
        mode = args.mps if manifest.untrained() else "off"
        with mps_daemon(mode, device, log) as mps:
            # rates measured with MPS are kept apart from those without
            train_args["device_name"] = device_name + (" with MPS" if mps.active else "")
            trained = train_stage(layout, manifest, deadline=math.inf if stage == "all" else deadline,
                                  client_env=mps.env, **train_args)
        manifest.mark_stage("train", trained, time.monotonic() - start)
        manifest.save()
        if not trained:
            return EXIT_MORE
    if stage in ("auto", "all", "eval"):
        start = time.monotonic()
        evaluated = eval_stage(layout, manifest, device=device, device_name=device_name,
                               deadline=math.inf if stage == "all" else deadline, log=log,
                               chunks_per_call=args.chunks_per_call)
        manifest.mark_stage("eval", evaluated, time.monotonic() - start)
        manifest.save()
        if not evaluated:
            return EXIT_MORE
    if stage in ("all", "figures"):
        from reproduce_report import figures_stage

        start = time.monotonic()
        figures_stage(layout, manifest, docs / "figures", log)
        manifest.mark_stage("figures", True, time.monotonic() - start)
    if stage in ("all", "report"):
        from reproduce_report import report_stage

        start = time.monotonic()
        command = "python python/reproduce_paper.py " + " ".join(shlex.quote(a) for a in (args.argv or []))
        report_stage(layout, manifest, docs, command.strip(), log)
        manifest.mark_stage("report", True, time.monotonic() - start)
    if stage == "publish":
        from reproduce_report import publish_stage

        target = Path(args.pretrained_dir) if args.pretrained_dir else REPO / "avme_ext" / "assets" / "pretrained"
        publish_stage(layout, manifest, docs, target, log)
        manifest.mark_stage("publish", True)
    manifest.save()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    layout = Layout(Path(args.out).resolve())
    try:
        if args.unpack:
            unpack_into(layout, Path(args.unpack))
            return EXIT_DONE
        if args.stage in ("status", "next-call"):
            manifest = Manifest.load(layout)
            if args.stage == "status":
                print_status(layout, manifest)
            else:
                call = next_call(layout, manifest, args.device_seconds_left, args.device_warm)
                print(json.dumps(call or {"work": None, "message": "no device work left: run --stage figures, "
                                          "--stage report and --stage publish here"}, indent=2))
            return EXIT_DONE
        manifest = open_manifest(layout, args)
        if args.init:
            log(f"plan written to {layout.manifest}")
            return EXIT_DONE
        if args.expect_calls is not None and len(manifest.data["calls"]) != args.expect_calls:
            raise ManifestError(f"{layout.manifest} records {len(manifest.data['calls'])} calls, expected "
                                f"{args.expect_calls}: this machine did not get the latest state")
        device = resolve_device(args.device)
    except (ManifestError, ValueError, FileNotFoundError) as error:
        print(f"reproduce_paper: error: {error}", file=sys.stderr)
        return EXIT_USAGE

    device_name = device_description(device)
    started = time.monotonic()
    budget = args.time_budget * 60 if args.time_budget > 0 else math.inf
    reserve = PACK_RESERVE_SECONDS if args.pack_to else 0.0
    deadline = started + budget - reserve
    before = packing.snapshot(layout.root) if args.pack_to else None
    base = {"calls": len(manifest.data["calls"]), "created_at": manifest.data["created_at"]}
    record = manifest.begin_call(args.stage, provenance(device), args.argv)
    code, outcome = EXIT_FAILED, "failed"
    try:
        code = run_stage(args.stage, layout, manifest, args, device, device_name, deadline, record["number"])
        outcome = {EXIT_DONE: "done", EXIT_MORE: "more work remains"}[code]
    except StageOrderError as error:
        print(f"reproduce_paper: error: {error}", file=sys.stderr)
        code, outcome = EXIT_USAGE, f"refused: {error}"
    except (RuntimeError, OSError, ValueError) as error:  # the state so far is still packed and sent back
        print(f"reproduce_paper: error: {type(error).__name__}: {error}", file=sys.stderr)
        code, outcome = EXIT_FAILED, f"failed: {error}"
    finally:
        record.update({"seconds": round(time.monotonic() - started, 3), "outcome": outcome, "finished_at": time.strftime(
            "%Y-%m-%dT%H:%M:%S%z")})
        manifest.save()
        if args.pack_to:
            pack_changes(layout, manifest, before, Path(args.pack_to), base)
    if code == EXIT_MORE:
        log(f"stopped after {(time.monotonic() - started) / 60:.1f} min with work left; run again to continue")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
