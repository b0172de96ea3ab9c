"""The paper's reproduction through GPU calls of a few minutes each (see tools/gpu/README.md).

A call runs ``python/reproduce_paper.py`` on the state carried in (``tools/gpu/reproduce.sh``) and
sends back what it added; the optimizer state of a run that did not finish stays on the machine, so
the calls are planned for runs that finish inside one.

    python tools/gpu/reproduce_call.py next                 # here: the next call (command, timeout_s, carry)
    python tools/gpu/reproduce_call.py pack --since F ...   # on the GPU machine (reproduce.sh runs it)
    python tools/gpu/reproduce_call.py unpack FILES_AT      # here: apply what a call sent back
    python tools/gpu/reproduce_call.py publish              # here, at the end: the pretrained registry

Once ``next`` answers that no GPU work is left, ``python python/reproduce_paper.py --out .carry/repro``
here (CPU) finds every model trained and evaluated and writes the figures and docs/results.{md,json}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "python"), str(REPO)]

from reproduce_eval import pending_work
from reproduce_plan import MODELS, Layout, Plan, make_plan, read_json
from reproduce_train import trained_summary

from avme_ext.choices import IMPLS

RUN = REPO / ".carry" / "repro"
PART_NAME = "repro.tar.gz.{:03d}"
MiB = 1 << 20
#: What comes back from a call: at most 8 files of 16 MiB, 64 MiB in all; the script's log,
#: summary.txt and build.log leave 5 files for the parts.
PART_BYTES, MAX_PARTS = 15 * MiB, 5
#: What travels to the machine: the working tree and the carried paths, 64 MiB in all.
CARRY_LIMIT = 64 * MiB
#: Seconds per epoch of one run alone on an H100 before anything is measured, by --impl: the reference
#: with CUDA graphs trains 150 epochs in about 7 minutes (an estimate), the fused kernels are expected
#: to take 1 to 2 minutes (not measured); the calls measure it.
DEFAULT_SECONDS_PER_EPOCH = {"ref": 2.8, "cuda": 0.8, "auto": 0.8}
#: Seconds of a call that train no model: start-up, the evaluation pilot, process start, the
#: SIGTERM and the packing (STOP_S of reproduce.sh).
CALL_OVERHEAD_S = 120
SAFETY = 1.15


def load_plan(layout: Layout, impl: str | None = None) -> Plan:
    """The plan of the state here (made by the first call), else the paper's with ``impl`` (default ref)."""
    saved = read_json(layout.plan)
    if saved and impl not in (None, saved["impl"]):
        raise SystemExit(f"{layout.plan} was made with --impl {saved['impl']}; a reproduction keeps one --impl")
    return Plan.from_dict(saved) if saved else make_plan(smoke=False, impl=impl or "ref")


# --------------------------------------------------------------------------- next
def seconds_per_epoch(layout: Layout, plan: Plan, jobs: int) -> tuple[float, str]:
    """(seconds per epoch of each of ``jobs`` runs side by side, where the number comes from): the
    slowest rate measured with the same number of runs, else scaled from another number (the GPU's
    throughput assumed shared), else :data:`DEFAULT_SECONDS_PER_EPOCH` times ``jobs``."""
    progress = read_json(layout.progress) or {}
    measured = [m["seconds_per_epoch"] for m in progress.get("models", {}).values() if m.get("seconds_per_epoch")]
    if measured and progress.get("jobs"):
        return max(measured) * jobs / progress["jobs"], f"measured with {progress['jobs']} run(s) side by side"
    return DEFAULT_SECONDS_PER_EPOCH[plan.impl] * jobs, "an estimate: nothing measured yet"


def next_call(layout: Layout, budget_s: int, impl: str | None = None) -> dict[str, Any]:
    """The next GPU call: train the largest group of untrained models expected to finish inside it,
    else evaluate the models with test chunks left."""
    plan = load_plan(layout, impl)
    trained = {n: s for n in MODELS if (s := trained_summary(layout, plan, n)) is not None}
    untrained = [n for n in MODELS if n not in trained]
    call: dict[str, Any] = {"work": None, "message": "no GPU work left: run python/reproduce_paper.py --out "
                                                     f"{layout.root} here to write the figures and the results"}
    if untrained:
        for jobs in range(len(untrained), 0, -1):
            group = untrained[:jobs]
            rate, basis = seconds_per_epoch(layout, plan, jobs)
            need = max(plan.epochs[n] for n in group) * rate * SAFETY + CALL_OVERHEAD_S
            if need <= budget_s or jobs == 1:
                call = {"work": "train", "models": group, "estimate_s": round(need), "rate_basis": basis}
                if need > budget_s:
                    call["warning"] = (f"{group[0]} needs about {need:.0f} s at {rate:.2f} s per epoch: it may not finish "
                                       "inside the call, and an unfinished run's state does not come back")
                break
    else:
        work = pending_work(layout, plan, {n: s["weights"]["sha256"] for n, s in trained.items()})
        if work:
            call = {"work": "eval", "models": sorted({w.name for w in work}, key=list(MODELS).index)}
    if call["work"]:
        deadline = budget_s - 30
        fused = f"IMPL={plan.impl} BUILD=1 " if plan.impl != "ref" else ""
        call["command"] = f"{fused}MODELS={','.join(call['models'])} DEADLINE_S={deadline} bash tools/gpu/reproduce.sh"
        call["timeout_s"] = budget_s
        call["carry"] = [os.path.relpath(layout.root, REPO), "tools/gpu/stamp.env"]
        call["carry_bytes"] = sum(p.stat().st_size for p in layout.root.rglob("*") if p.is_file())
        if call["carry_bytes"] > CARRY_LIMIT - 8 * MiB:
            call["warning"] = f"{call['carry_bytes'] / MiB:.0f} MiB to carry: near the {CARRY_LIMIT // MiB} MiB limit"
    return call


# --------------------------------------------------------------------------- pack / unpack
def sends_back(rel: Path) -> bool:
    """What a call sends back: not the runs' checkpoints (their optimizer state is too large), not the lock."""
    return rel.parts[1:2] != ("train",) and rel.name != ".lock"


def pack(run: Path, since: Path, out: Path) -> list[Path]:
    """Files of ``run`` changed after ``since`` was written, as a gzipped tar cut into parts in ``out``.

    Raises:
        RuntimeError: more than :data:`MAX_PARTS` parts of :data:`PART_BYTES`.
    """
    start = since.stat().st_mtime_ns
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.stat().st_mtime_ns >= start
                   and sends_back(p.relative_to(run)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for path in files:
            archive.add(path, arcname=path.relative_to(run).as_posix())
    data = buffer.getvalue()
    parts = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [data]
    if len(parts) > MAX_PARTS:
        raise RuntimeError(f"{len(data) / MiB:.1f} MiB to send back: more than {MAX_PARTS} parts of {PART_BYTES // MiB} MiB")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, part in enumerate(parts):
        written.append(out / PART_NAME.format(index))
        written[-1].write_bytes(part)
    print(f"packed {len(files)} files ({len(data) / MiB:.1f} MiB) into {len(parts)} part(s) in {out}")
    return written


def unpack(files_at: Path, run: Path) -> list[str]:
    """Extract the parts a call sent back into ``run``; returns the files written."""
    parts = sorted(files_at.glob("repro.tar.gz.[0-9][0-9][0-9]"))
    if not parts:
        raise FileNotFoundError(f"{files_at}: no {PART_NAME.format(0)} (not the files of a reproduction call)")
    data = b"".join(p.read_bytes() for p in parts)
    run.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        names = archive.getnames()
        archive.extractall(run, filter="data")
    print(f"applied {len(names)} files from {len(parts)} part(s) to {run}")
    return names


def publish(layout: Layout, docs: Path, directory: Path | None) -> None:
    """Register the four models' float16 weights by name in the pretrained registry, with their results."""
    from avme_ext.pretrained import register_pretrained

    records = {r["name"]: r for r in json.loads((docs / "results.json").read_text(encoding="utf-8"))["models"]}
    for name, record in records.items():
        spec = MODELS[name]
        description = (f"AVME on binarized MNIST, {'class-conditional' if spec.conditional else 'unconditional'}, "
                       f"encoder input {spec.encoder_input}, K={record['steps']} (the paper's reproduction)")
        entry = register_pretrained(name, layout.weights(name), description=description, results=record,
                                    directory=directory)
        print(f"{name}: {entry.file} ({entry.sha256[:12]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(RUN), help="the reproduction's state here (default .carry/repro)")
    commands = parser.add_subparsers(dest="command", required=True)
    plan_next = commands.add_parser("next", help="print the next GPU call as JSON")
    plan_next.add_argument("--budget-s", type=int, default=570, help="the call's timeout_s (at most 600)")
    plan_next.add_argument("--impl", default=None, choices=IMPLS,
                           help="the K-step loop of a new reproduction (default: the state's, else ref)")
    packing = commands.add_parser("pack", help="on the GPU machine: pack what the call added")
    packing.add_argument("--since", required=True, help="a file written when the call started")
    packing.add_argument("--out", default=os.environ.get("OUT"), help="where the parts go (default $OUT)")
    unpacking = commands.add_parser("unpack", help="apply the parts a call sent back")
    unpacking.add_argument("files_at")
    publishing = commands.add_parser("publish", help="register the weights in the pretrained registry")
    publishing.add_argument("--docs", default=str(REPO / "docs"), help="where results.json is")
    publishing.add_argument("--registry", default=None, help="default: avme_ext/assets/pretrained")
    args = parser.parse_args(argv)
    layout = Layout(Path(args.run).resolve())
    if args.command == "next":
        print(json.dumps(next_call(layout, args.budget_s, args.impl), indent=2))
    elif args.command == "pack":
        pack(layout.root, Path(args.since), Path(args.out))
    elif args.command == "unpack":
        unpack(Path(args.files_at), layout.root)
    else:
        publish(layout, Path(args.docs), Path(args.registry) if args.registry else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
