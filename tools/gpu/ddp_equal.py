#!/usr/bin/env python
"""One-GPU DDP equality: ``avme train`` under torchrun (one process, DDP) ends where a plain run ends.

Runs ``python -m avme_ext train`` with one seed on a subset of binarized MNIST, three times in
parallel:

``plain``    one process;
``repeat``   the same again, to see whether the kernels are run-to-run deterministic;
``ddp``      ``python -m torch.distributed.run --standalone --nproc_per_node=1 -m avme_ext train``
             (torchrun: DistributedDataParallel with one process);

then compares every tensor of the final checkpoints (``last.safetensors``: parameters and
optimizer state). Pass: for every tensor, ||ddp - plain|| / ||plain|| <= --rtol (default 1e-5),
and, when ``plain`` and ``repeat`` are bit-identical, ``ddp`` must be bit-identical too. Where
``avme train`` has ``--graph``, all three runs get ``--graph off`` (torchrun runs never capture
graphs, so the comparison is of DDP alone).

Usage (GPU, paper sizes; tools/gpu/check.sh runs it)::

    python3 tools/gpu/ddp_equal.py --out-json $OUT/ddp.json
    python3 tools/gpu/ddp_equal.py --device cpu --impl ref --tiny --out-json /tmp/ddp.json   # a CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--enc-hidden", "16", "--dec-hidden", "16", "--latent-dim", "4", "--steps", "3"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--impl", default="cuda", help="avme train --impl (default cuda: the fused ops)")
    p.add_argument("--precision", default="fp32", help="avme train --precision (default fp32)")
    p.add_argument("--train-subset", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--batch-size", type=int, default=100, help="global batch size (default 100)")
    p.add_argument("--epochs", type=int, default=1, help="epochs (default 1: train-subset / batch-size steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU checks of this script)")
    p.add_argument("--rtol", type=float, default=1e-5, help="largest norm-wise relative difference per tensor")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds each run may take")
    p.add_argument("--workdir", default="/tmp/avme-ddp-equal", help="where the runs write (not under $OUT)")
    p.add_argument("--out-json", required=True, help="the summary JSON to write")
    return p.parse_args(argv)


def train_help() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "avme_ext", "train", "--help"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.stdout


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a plain run must not look like a torchrun worker
    return env


def commands(args: argparse.Namespace, workdir: Path, graph_option: bool) -> dict[str, list[str]]:
    """The three ``avme train`` command lines, by run name."""
    options = [
        "--epochs",
        str(args.epochs),
        "--train-subset",
        str(args.train_subset),
        "--valid-subset",
        "0",
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--impl",
        args.impl,
        "--precision",
        args.precision,
        "--no-progress",
        "--no-tensorboard",
        *(TINY if args.tiny else []),
        *(["--graph", "off"] if graph_option else []),
    ]
    train = ["-m", "avme_ext", "train"]
    return {
        "plain": [sys.executable, *train, "--out", str(workdir / "plain"), *options],
        "repeat": [sys.executable, *train, "--out", str(workdir / "repeat"), *options],
        "ddp": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            *train,
            "--out",
            str(workdir / "ddp"),
            *options,
        ],
    }


def run_all(cmds: dict[str, list[str]], workdir: Path, timeout: float) -> tuple[dict[str, int], dict[str, float]]:
    """Run the commands in parallel; (exit codes, seconds) by name. Logs go to workdir/<name>.log."""
    procs, logs, starts = {}, {}, {}
    for name, cmd in cmds.items():
        print(f"[ddp_equal] {name}: {' '.join(cmd)}", flush=True)
        logs[name] = open(workdir / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115
        starts[name] = time.perf_counter()
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=logs[name], stderr=subprocess.STDOUT)
    codes, seconds = {}, {}
    deadline = time.perf_counter() + timeout
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = 124
        seconds[name] = round(time.perf_counter() - starts[name], 1)
        logs[name].close()
    return codes, seconds


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-tensor comparison of two checkpoints: exact equality and the largest norm-wise relative difference."""
    if sorted(a) != sorted(b):
        return {"same_keys": False, "only_first": sorted(set(a) - set(b)), "only_second": sorted(set(b) - set(a))}
    worst, worst_key, exact, finite = 0.0, None, True, True
    for key in sorted(a):
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            return {"same_keys": True, "mismatch": f"{key}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"}
        if not torch.equal(x, y):
            exact = False
        if x.is_floating_point():
            x64, y64 = x.double(), y.double()
            finite = finite and bool(torch.isfinite(x64).all()) and bool(torch.isfinite(y64).all())
            rel = float((x64 - y64).norm() / x64.norm().clamp_min(1e-30))
        else:
            rel = 0.0 if torch.equal(x, y) else float("inf")
        if not rel <= worst:  # NaN-safe: a NaN difference becomes the worst
            worst, worst_key = rel, key
    return {
        "same_keys": True,
        "tensors": len(a),
        "exact": exact,
        "finite": finite,
        "max_rel": worst,
        "worst_tensor": worst_key,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from safetensors.torch import load_file

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    graph_option = "--graph" in train_help()
    cmds = commands(args, workdir, graph_option)
    for name in cmds:  # fresh runs: an earlier one in the same folder would be refused (or resumed)
        shutil.rmtree(workdir / name, ignore_errors=True)
    codes, seconds = run_all(cmds, workdir, args.timeout)
    summary: dict[str, object] = {
        "rtol": args.rtol,
        "exit_codes": codes,
        "seconds": seconds,
        "graph_off": graph_option,
        "commands": {k: " ".join(v) for k, v in cmds.items()},
    }
    ok = all(code == 0 for code in codes.values())
    if not ok:
        for name, code in codes.items():
            if code != 0:
                print(f"[ddp_equal] {name} exited {code}; last lines of its log:")
                print("\n".join((workdir / f"{name}.log").read_text(errors="replace").splitlines()[-25:]))
        summary["pass"] = False
        summary["reason"] = "a run failed"
    else:
        ckpt = {name: load_file(workdir / name / "last.safetensors") for name in cmds}
        ddp = compare(ckpt["plain"], ckpt["ddp"])
        repeat = compare(ckpt["plain"], ckpt["repeat"])
        summary.update(ddp=ddp, repeat=repeat)
        deterministic = bool(repeat.get("exact"))
        within = (
            bool(ddp.get("same_keys"))
            and bool(ddp.get("finite"))
            and float(ddp.get("max_rel", float("inf"))) <= args.rtol
        )
        summary["deterministic"] = deterministic
        summary["pass"] = within and (bool(ddp.get("exact")) or not deterministic)
        if not summary["pass"]:
            summary["reason"] = (
                "bit-identical plain runs, but DDP differs"
                if within
                else f"DDP differs by more than rtol {args.rtol:g}"
            )
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {k: summary[k] for k in ("pass", "deterministic", "ddp", "repeat", "reason", "seconds") if k in summary},
            indent=1,
        )
    )
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
