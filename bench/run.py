#!/usr/bin/env python
"""Run the avme benchmarks and write ``bench/results/<YYYY-MM-DD>-<gpu>.json``.

Workloads (``--workloads``, run in this order):

``roofline``  dense matmul rate (one large product per precision: fp32 with TF32 off, tf32,
              bf16) and device-to-device copy bandwidth: the ceilings the others are compared with
``sample``    images/s drawing ``--sample-num`` images of K steps
``iwae``      the IWAE bound with S = ``--iwae-samples`` over the test images, images/s
``train``     training step (forward, backward, Adam) in samples/s, per implementation, at
              every ``--batches`` B with K = the first ``--steps``, and at B = ``--steps-batch``
              for every other K of ``--steps``; the torch.compile modes in a second pass, with
              what is left of the budget; compile / capture time as separate records
``memory``    peak GPU memory of a training step per implementation at B = ``--memory-batch``

Examples::

    python bench/run.py                                   # everything, paper sizes, on the GPU
    python bench/run.py --workloads train --impls 'ref-eager,fused-*-tf32' --batches 1024
    python bench/run.py --smoke --device cpu --out /tmp/bench   # tiny sizes, seconds on a CPU

See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable; append (not prepend) so that an installed
    # ``avme_ext`` (with its built extension) wins over the source tree's copy.
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from avme_ext import ops  # noqa: E402
from avme_ext.data import load_split  # noqa: E402
from avme_ext.loop_types import PRECISIONS  # noqa: E402
from bench import flops as F  # noqa: E402
from bench.timing import Timer, interleave, round_order, summarize  # noqa: E402
from bench.workloads import (  # noqa: E402
    APPLICABLE,
    DEFAULT_IMPLS,
    IMPLS,
    ImplSpec,
    build_model,
    build_sample_case,
    build_train_case,
    free_memory,
    make_sample_inputs,
    make_train_inputs,
    pool_size,
    run_context,
    select_impls,
    spec_extras,
    unavailable_reason,
)

#: In the order they run: the roofline first (the peaks for the fractions), then the capped
#: sample and iwae workloads, then training (its torch.compile builds last, within the budget),
#: and the memory workload, which builds every implementation again.
WORKLOADS = ("roofline", "sample", "iwae", "train", "memory")
MATMUL_PRECISIONS = PRECISIONS
MIB = 1024 * 1024

#: Defaults at the paper's sizes (GPU) and in ``--smoke`` mode (tiny, CPU-friendly).
FULL_DEFAULTS: dict[str, Any] = {
    "model_size": "784,400,400,100",
    "batches": "100,256,1024,4096",
    "steps": "12,64",
    "steps_batch": 1024,
    "repeats": 30,
    "warmup": 3,
    "sample_num": 10000,
    "iwae_samples": 5000,
    "iwae_images": 10000,
    "iwae_ref_images": 100,
    "iwae_rows": 50000,
    "iwae_seconds": 150.0,
    "memory_batch": 1024,
    "matmul_size": 8192,
    "copy_mib": 1024,
}
SMOKE_DEFAULTS: dict[str, Any] = {
    "model_size": "784,32,32,8",
    "batches": "4,16",
    "steps": "3,5",
    "steps_batch": 16,
    "repeats": 3,
    "warmup": 1,
    "sample_num": 64,
    "iwae_samples": 16,
    "iwae_images": 16,
    "iwae_ref_images": 8,
    "iwae_rows": 64,
    "iwae_seconds": 10.0,
    "memory_batch": 16,
    "matmul_size": 256,
    "copy_mib": 16,
}


# --------------------------------------------------------------------------- arguments


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in _csv(text)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument(
        "--impls",
        help="comma list of implementations or globs (e.g. 'ref-*,fused-*-bf16'), "
        "run by every workload that applies; default: each workload's own list (see bench/README.md). "
        f"Known: {', '.join(IMPLS)}",
    )
    p.add_argument("--batches", help="training batch sizes B (default 100,256,1024,4096; smoke 4,16)")
    p.add_argument(
        "--steps",
        help="K values: the first for every workload, the others for training at "
        "--steps-batch (default 12,64; smoke 3,5)",
    )
    p.add_argument("--steps-batch", type=int, help="B of the training runs over K (default 1024)")
    p.add_argument("--repeats", type=int, help="timed rounds per configuration (default 30; smoke 3)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 3; smoke 1)")
    p.add_argument(
        "--config-seconds",
        type=float,
        help="cap on the timed rounds of one configuration (all its "
        "implementations together): past it, rounds stop once --min-repeats are done (default: none)",
    )
    p.add_argument(
        "--min-repeats", type=int, default=10, help="timed rounds always run under --config-seconds (default 10)"
    )
    p.add_argument("--model-size", help="D,He,Hd,Z (default 784,400,400,100)")
    p.add_argument("--sample-num", type=int, help="images per sampling call (default 10000)")
    p.add_argument("--iwae-samples", type=int, help="S importance samples per image (default 5000)")
    p.add_argument("--iwae-images", type=int, help="test images for the fused ops (default 10000, all)")
    p.add_argument("--iwae-ref-images", type=int, help="test images for the reference, extrapolated (default 100)")
    p.add_argument("--iwae-rows", type=int, help="trajectories per timed call (max_rows; default 50000)")
    p.add_argument(
        "--iwae-seconds",
        type=float,
        help="time cap of the iwae workload: past it, the images done so far are extrapolated (default 150)",
    )
    p.add_argument("--memory-batch", type=int, help="B of the memory workload (default 1024)")
    p.add_argument("--matmul-size", type=int, help="n of the n^3 roofline product (default 8192)")
    p.add_argument("--copy-mib", type=int, help="MiB copied by the bandwidth probe (default 1024)")
    p.add_argument("--pool-mib", type=int, default=2048, help="cap on pre-generated fresh inputs per configuration")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda (default when available) or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few repeats (a CPU check of the suite)")
    p.add_argument("--cpu-compile", action="store_true", help="also run torch.compile on a CPU device")
    p.add_argument(
        "--budget-s",
        type=float,
        help="wall-clock budget of the whole run: past it, remaining "
        "configurations are skipped (recorded with the reason) and the file is still written",
    )
    p.add_argument(
        "--compile-reserve-s",
        type=float,
        default=180.0,
        help="do not start a torch.compile build with less than this left in --budget-s",
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "bench" / "results"),
        help="output .json file, or a directory for <date>-<gpu>.json (default bench/results/)",
    )
    p.add_argument("--append", help="an earlier results .json to add these records to (same key replaces)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    defaults = SMOKE_DEFAULTS if args.smoke else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workload_list = _csv(args.workloads)
    try:
        args.impl_list = None if args.impls is None else select_impls(_csv(args.impls))
    except ValueError as error:
        p.error(str(error))
    for name in args.workload_list:
        if name not in WORKLOADS:
            p.error(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}")
    args.batch_list = _ints(args.batches)
    args.steps_list = _ints(args.steps)
    sizes = _ints(args.model_size)
    if len(sizes) != 4:
        p.error("--model-size takes D,He,Hd,Z")
    args.size = F.ModelSize(*sizes)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.min_repeats < 1:
        p.error("--min-repeats must be >= 1")
    if args.config_seconds is not None and args.config_seconds <= 0:
        p.error("--config-seconds must be > 0")
    return args


# --------------------------------------------------------------------------- run context


class Budget:
    """A wall-clock budget for the whole run (unlimited when ``seconds`` is None)."""

    def __init__(self, seconds: float | None) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def exceeded(self) -> bool:
        return self.remaining() <= 0


def _say(message: str) -> None:
    print(message, flush=True)


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_revision() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the source tree: from git, else from ``AVME_GIT_COMMIT``/``AVME_GIT_DIRTY``.

    The GPU machine gets a copy of the working tree without ``.git``; tools/gpu/stamp.sh writes
    those two variables into a file the GPU call carries (see tools/gpu/README.md).
    """
    top = _git("rev-parse", "--show-toplevel")
    commit = _git("rev-parse", "HEAD") if top is not None and Path(top).resolve() == ROOT else None
    if commit is not None:
        status = _git("status", "--porcelain")
        return commit, None if status is None else bool(status)
    commit = os.environ.get("AVME_GIT_COMMIT") or None
    dirty = os.environ.get("AVME_GIT_DIRTY")
    return commit, None if dirty in (None, "") else dirty == "1"


def _gpu_properties(device: torch.device) -> dict[str, Any] | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / MIB, 1) or None,
    }


def driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


class Context:
    """Everything a workload needs: arguments, device, timer, budget and the records."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:  # torch types index as int; None for "cuda"
            self.device = torch.device("cuda", torch.cuda.current_device())  # type: ignore[unreachable]
        self.timer = Timer(self.device)
        self.budget = Budget(args.budget_s)
        self.size: F.ModelSize = args.size
        self.records: list[dict[str, Any]] = []
        self.pool_bytes = args.pool_mib * MIB
        self.date = dt.date.today().isoformat()
        self.name = device_name(self.device)
        self.gpu = slug(self.name) if self.device.type == "cuda" else "cpu"
        out = Path(args.out)
        self.out = out if out.suffix == ".json" else out / f"{self.date}-{self.gpu}.json"
        self.previous: dict[str, Any] | None = None
        if args.append:
            with open(args.append, encoding="utf-8") as handle:
                self.previous = json.load(handle)
        #: index of this run's command in the file's ``commands`` (0 unless appending), stored in every record
        self.run_index = 0 if self.previous is None else len(self._previous_commands())

    def _previous_commands(self) -> list[str]:
        assert self.previous is not None
        return list(self.previous.get("commands") or [self.previous.get("command")])

    # ---- records
    def add(
        self,
        workload: str,
        impl: str,
        batch: int | None,
        steps: int | None,
        value: float | None,
        unit: str,
        **extra: Any,
    ) -> dict[str, Any]:
        record = {"workload": workload, "impl": impl, "batch": batch, "steps": steps, "value": value, "unit": unit}
        record.update(extra)
        record["run"] = self.run_index
        self.records.append(record)
        if value is None:
            _say(f"  [{workload}] {impl:26s} B={batch} K={steps}: skipped: {extra.get('skipped')}")
        else:
            _say(f"  [{workload}] {impl:26s} B={batch} K={steps}: {value:.6g} {unit}")
        return record

    def skip(
        self, workload: str, impl: str, batch: int | None, steps: int | None, unit: str, reason: str, **extra: Any
    ) -> None:
        self.add(workload, impl, batch, steps, None, unit, skipped=reason, **extra)

    def budget_reason(self, compile_build: bool = False) -> str | None:
        left = self.budget.remaining()
        if left <= 0:
            return f"time budget (--budget-s {self.args.budget_s:g}) spent"
        if compile_build and left < self.args.compile_reserve_s:
            return (
                f"time budget: {left:.0f} s left of --budget-s {self.args.budget_s:g}, under "
                f"--compile-reserve-s {self.args.compile_reserve_s:g} needed to start a compile"
            )
        return None

    # ---- output
    def header(self) -> dict[str, Any]:
        args = self.args
        commit, dirty = source_revision()
        return {
            "schema": 1,
            "device": self.name,
            "device_type": self.device.type,
            "gpu": self.gpu,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "driver": driver_version() if self.device.type == "cuda" else None,
            "date": self.date,
            "timestamp": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": commit,
            "git_dirty": dirty,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, "bench/run.py", *args.argv]),
            "python": platform.python_version(),
            "host": platform.node(),
            "cpu_threads": torch.get_num_threads(),
            "avme_ops_available": bool(ops.is_available()),
            "avme_designs": list(getattr(ops, "DESIGNS", [])) or None,
            "avme_design_override": hasattr(ops, "design"),
            "gpu_properties": _gpu_properties(self.device),
            "config": {
                "model_size": vars(self.size),
                "workloads": args.workload_list,
                "impls": {w: impls_for(args, w) for w in args.workload_list if w != "roofline"},
                "dtype": "float32",
                "config_seconds": args.config_seconds,
                "min_repeats": args.min_repeats,
                "batches": args.batch_list,
                "steps": args.steps_list,
                "steps_batch": args.steps_batch,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "sample_num": args.sample_num,
                "iwae_samples": args.iwae_samples,
                "iwae_images": args.iwae_images,
                "iwae_ref_images": args.iwae_ref_images,
                "iwae_rows": args.iwae_rows,
                "iwae_seconds": args.iwae_seconds,
                "memory_batch": args.memory_batch,
                "matmul_size": args.matmul_size,
                "copy_mib": args.copy_mib,
                "smoke": args.smoke,
                "budget_s": args.budget_s,
                "seed": args.seed,
            },
        }

    def merged_records(self) -> list[dict[str, Any]]:
        if self.previous is None:
            return list(self.records)

        def key(r: dict[str, Any]) -> tuple[Any, ...]:
            return (r.get("workload"), r.get("impl"), r.get("batch"), r.get("steps"))

        new_keys = {key(r) for r in self.records}
        kept = [r for r in self.previous.get("records", []) if key(r) not in new_keys]
        return kept + self.records

    def write(self) -> Path:
        data = self.header()
        if self.previous is not None:
            data["commands"] = [*self._previous_commands(), data["command"]]
            if self.previous.get("device") != data["device"]:
                data["appended_device_mismatch"] = self.previous.get("device")
        data["records"] = add_fractions(self.merged_records())
        data["peaks"] = peaks_of(data["records"])
        data["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
        os.replace(tmp, self.out)
        return self.out


def peaks_of(records: list[dict[str, Any]]) -> dict[str, float]:
    """Measured matmul rates (TFLOP/s) by precision, from the roofline records."""
    peaks = {}
    for r in records:
        if r.get("workload") == "roofline" and str(r.get("impl", "")).startswith("matmul-") and r.get("value"):
            peaks[r["impl"].removeprefix("matmul-")] = r["value"]
    return peaks


def add_fractions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``fraction_of_peak`` = achieved TFLOP/s over the measured matmul rate of the record's precision."""
    peaks = peaks_of(records)
    for r in records:
        precision = r.get("precision")
        if r.get("tflops") is not None and precision in peaks and r.get("workload") != "roofline":
            r["fraction_of_peak"] = r["tflops"] / peaks[precision]
            r["peak"] = f"matmul-{precision}"
    return records


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _timing_extras(seconds: list[float], work: float) -> dict[str, Any]:
    """Median/IQR/min/max of per-call seconds and of the rate work/seconds."""
    s = summarize(seconds)
    return {
        "repeats": s.n,
        "time_median_s": s.median,
        "time_iqr_s": s.iqr,
        "time_min_s": s.min,
        "time_max_s": s.max,
        "iqr": work / s.q1 - work / s.q3 if s.q1 > 0 else None,
        "value_min": work / s.max if s.max > 0 else None,
        "value_max": work / s.min if s.min > 0 else None,
    }


def _guarded(name: str, fn: Callable[[int], object], failures: dict[str, str]) -> Callable[[int], None]:
    """Wrap a case so that an exception stops that implementation, not the run."""

    def call(i: int) -> None:
        if name in failures:
            return
        try:
            fn(i)
        except Exception as error:  # noqa: BLE001 - recorded as a skip with the reason
            failures[name] = _first_line(error)
            traceback.print_exc()

    return call


def impls_for(args: argparse.Namespace, workload: str) -> list[str]:
    """The implementations ``workload`` runs: ``--impls`` where it applies, else the workload's defaults."""
    if args.impl_list is None:
        return list(DEFAULT_IMPLS[workload])
    return [n for n in args.impl_list if n in APPLICABLE[workload]]


def _applicable(ctx: Context, workload: str) -> list[str]:
    names = impls_for(ctx.args, workload)
    if ctx.args.impl_list is not None:
        left_out = [n for n in ctx.args.impl_list if n not in APPLICABLE[workload]]
        if left_out:
            _say(f"  [{workload}] not applicable to: {', '.join(left_out)}")
    return names


# --------------------------------------------------------------------------- workloads


def run_roofline(ctx: Context) -> None:
    """Dense matmul rate per precision and copy bandwidth, interleaved."""
    n = ctx.args.matmul_size
    dev = ctx.device
    generator = torch.Generator(device=dev).manual_seed(ctx.args.seed)
    cases: dict[str, Callable[[int], None]] = {}
    keep: list[Any] = []
    for precision in MATMUL_PRECISIONS:
        impl = f"matmul-{precision}"
        if precision == "tf32" and dev.type != "cuda":
            ctx.skip("roofline", impl, None, None, "TFLOP/s", "TF32 is a CUDA tensor-core mode", size=n)
            continue
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        sets = [
            (
                torch.randn(n, n, generator=generator, device=dev).to(dtype),
                torch.randn(n, n, generator=generator, device=dev).to(dtype),
            )
            for _ in range(2)
        ]
        out = torch.empty(n, n, device=dev, dtype=dtype)
        keep.append((sets, out))

        def call(
            i: int,
            sets: list[tuple[torch.Tensor, torch.Tensor]] = sets,
            out: torch.Tensor = out,
            precision: str = precision,
        ) -> None:
            a, b = sets[i % len(sets)]
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            try:
                torch.matmul(a, b, out=out)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous

        cases[impl] = call
    numel = ctx.args.copy_mib * MIB // 4
    src = torch.randn(numel, generator=generator, device=dev)
    dst = torch.empty_like(src)

    def copy(i: int) -> None:
        dst.copy_(src)

    cases["copy"] = copy
    samples = interleave(cases, ctx.args.repeats, ctx.args.warmup, ctx.timer)
    for impl, seconds in samples.items():
        if impl == "copy":
            moved = 2 * numel * 4
            med = summarize(seconds).median
            ctx.add(
                "roofline",
                "copy",
                None,
                None,
                moved / med / 1e9,
                "GB/s",
                bytes=moved,
                what="device-to-device copy, bytes read + written",
                **_timing_extras(seconds, moved / 1e9),
            )
        else:
            flop = F.matmul_flops(n, n, n)
            med = summarize(seconds).median
            ctx.add(
                "roofline",
                impl,
                None,
                None,
                flop / med / 1e12,
                "TFLOP/s",
                size=n,
                flops=flop,
                what=f"{n}x{n} @ {n}x{n} torch.matmul",
                **_timing_extras(seconds, flop / 1e12),
            )


def _load_images(split: str, device: torch.device) -> torch.Tensor:
    return load_split("binarized_mnist", split).images.to(device)


def _reset_dynamo() -> None:
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:  # pragma: no cover  # noqa: BLE001 - optional: a failed reset only keeps dynamo's cache
        pass


def _train_configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    k0 = args.steps_list[0]
    configs = [(b, k0) for b in args.batch_list]
    configs += [(args.steps_batch, k) for k in args.steps_list[1:] if (args.steps_batch, k) not in configs]
    return configs


def _cpu_compile(ctx: Context) -> bool:
    return bool(ctx.args.cpu_compile)


class RoundLimit:
    """``should_stop`` of :func:`interleave` for one configuration: the run's budget, and
    ``--config-seconds`` (counted from the first warm-up round) once ``--min-repeats`` timed rounds are done."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.start = time.perf_counter()
        self.rounds = 0  # timed rounds done when called (interleave asks before every round after the first)

    def __call__(self) -> bool:
        self.rounds += 1
        if self.ctx.budget.exceeded():
            return True
        cap = self.ctx.args.config_seconds
        return cap is not None and self.rounds >= self.ctx.args.min_repeats and time.perf_counter() - self.start > cap


ANCHOR_IMPL = "ref-eager"


def run_train(ctx: Context) -> None:
    """Training throughput per implementation, interleaved, for every (B, K) configuration.

    Two passes over the configurations: first every implementation that builds quickly (eager
    modes, CUDA graphs, the fused ops), then the ``torch.compile`` ones, whose builds take tens
    of seconds each and so fill what is left of ``--budget-s``. The second pass times
    ``ref-eager`` alongside again (``anchor_ref_eager`` in its records, against the first pass's
    ``anchor_ref_eager_first_pass``, from this run or the file it appends to), so a drift between
    the passes shows.
    """
    names = _applicable(ctx, "train")
    quick = [n for n in names if not IMPLS[n].compiles]
    compiled = [n for n in names if IMPLS[n].compiles]
    images = _load_images("train", ctx.device)
    configs = _train_configs(ctx.args)
    passes = [("main", quick)] + ([("compile", compiled)] if compiled else [])
    for group, group_names in passes:
        if not group_names:
            continue
        anchor = ANCHOR_IMPL if group == "compile" and not unavailable_reason(IMPLS[ANCHOR_IMPL], ctx.device) else None
        for batch, steps in configs:
            _train_config(ctx, group_names, images, batch, steps, group=group, anchor=anchor)
            # Everything of the configuration (models, graphs, inputs) died with the call's frame.
            _reset_dynamo()
            free_memory()
            ctx.write()


def _train_config(
    ctx: Context,
    names: list[str],
    images: torch.Tensor,
    batch: int,
    steps: int,
    group: str = "main",
    anchor: str | None = None,
) -> None:
    """Build every implementation for one (B, K), then time them interleaved.

    ``anchor``: an implementation already recorded for this (B, K) to time alongside again; its
    rate goes into the extras of this call's records instead of a record of its own.
    """
    args, size, dev = ctx.args, ctx.size, ctx.device
    _say(f"train B={batch} K={steps} ({group})")
    set_bytes = 4 * (batch * size.data_dim + steps * batch * size.latent_dim)
    sets = pool_size(args.warmup + args.repeats, set_bytes, ctx.pool_bytes)
    inputs = make_train_inputs(images, batch, steps, size, sets, dev, seed=args.seed + batch * 1000 + steps)
    cases: dict[str, Callable[[int], None]] = {}
    specs: dict[str, ImplSpec] = {}
    for name in names:
        spec = IMPLS[name]
        reason = unavailable_reason(spec, dev, cpu_compile=_cpu_compile(ctx)) or ctx.budget_reason(
            compile_build=spec.compiles
        )
        if reason:
            ctx.skip("train", name, batch, steps, "samples/s", reason, **spec_extras(spec), timing_group=group)
            continue
        try:
            case = build_train_case(spec, size, steps, inputs, dev, lr=args.lr, seed=args.seed)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            ctx.skip(
                "train",
                name,
                batch,
                steps,
                "samples/s",
                f"build failed: {_first_line(error)}",
                **spec_extras(spec),
                timing_group=group,
            )
            continue
        if case.setup_seconds is not None:
            ctx.add("compile", name, batch, steps, case.setup_seconds, "s", what=case.setup_kind, **(case.extras or {}))
        cases[name] = case.step
        specs[name] = spec
    if not cases:
        return
    if anchor is not None:
        cases[anchor] = build_train_case(IMPLS[anchor], size, steps, inputs, dev, lr=args.lr, seed=args.seed).step
    failures: dict[str, str] = {}
    guarded = {name: _guarded(name, fn, failures) for name, fn in cases.items()}
    samples = interleave(guarded, args.repeats, args.warmup, ctx.timer, should_stop=RoundLimit(ctx))
    anchor_extras: dict[str, Any] = {}
    if anchor is not None:
        anchor_seconds = samples.pop(anchor)
        if anchor not in failures and anchor_seconds:
            first = next(
                (
                    r["value"]
                    for r in ctx.merged_records()
                    if (r["workload"], r["impl"], r["batch"], r["steps"]) == ("train", anchor, batch, steps)
                    and r["value"] is not None
                ),
                None,
            )
            anchor_extras = {
                "anchor_impl": anchor,
                "anchor_ref_eager": batch / summarize(anchor_seconds).median,
                "anchor_ref_eager_first_pass": first,
            }
    flops = F.train_step_flops(batch, steps, size)
    executed = F.train_step_flops(batch, steps, size, executed=True)
    for name, seconds in samples.items():
        spec = specs[name]
        if name in failures:
            ctx.skip(
                "train",
                name,
                batch,
                steps,
                "samples/s",
                f"failed while timing: {failures[name]}",
                **spec_extras(spec),
                timing_group=group,
            )
            continue
        med = summarize(seconds).median
        ctx.add(
            "train",
            name,
            batch,
            steps,
            batch / med,
            "samples/s",
            flops=flops,
            flops_executed=executed,
            flops_convention="algorithmic",
            tflops=flops / med / 1e12,
            precision=spec.matmul,
            input_sets=sets,
            **spec_extras(spec),
            timing_group=group,
            **anchor_extras,
            **_timing_extras(seconds, batch),
        )


def run_sample(ctx: Context) -> None:
    """Images per second drawing ``--sample-num`` images of K steps."""
    args, size, dev = ctx.args, ctx.size, ctx.device
    steps, num = args.steps_list[0], args.sample_num
    _say(f"sample N={num} K={steps}")
    sets = pool_size(args.warmup + args.repeats, 4 * steps * num * size.latent_dim, ctx.pool_bytes)
    inputs = make_sample_inputs(num, steps, size, sets, dev, seed=args.seed + 7)
    cases, specs = {}, {}
    for name in _applicable(ctx, "sample"):
        spec = IMPLS[name]
        reason = unavailable_reason(spec, dev) or ctx.budget_reason()
        if reason:
            ctx.skip("sample", name, num, steps, "images/s", reason, **spec_extras(spec))
            continue
        cases[name] = build_sample_case(spec, size, steps, inputs, dev, seed=args.seed)
        specs[name] = spec
    failures: dict[str, str] = {}
    if cases:
        guarded = {name: _guarded(name, fn, failures) for name, fn in cases.items()}
        samples = interleave(guarded, args.repeats, args.warmup, ctx.timer, should_stop=RoundLimit(ctx))
        flops = F.sample_flops(num, steps, size)
        for name, seconds in samples.items():
            if name in failures:
                ctx.skip(
                    "sample",
                    name,
                    num,
                    steps,
                    "images/s",
                    f"failed while timing: {failures[name]}",
                    **spec_extras(specs[name]),
                )
                continue
            med = summarize(seconds).median
            ctx.add(
                "sample",
                name,
                num,
                steps,
                num / med,
                "images/s",
                flops=flops,
                flops_executed=F.sample_flops(num, steps, size, executed=True),
                flops_convention="algorithmic",
                tflops=flops / med / 1e12,
                precision=specs[name].matmul,
                input_sets=sets,
                **spec_extras(specs[name]),
                **_timing_extras(seconds, num),
            )
    ctx.write()


def run_iwae(ctx: Context) -> None:
    """IWAE bound with S samples over the test images; the reference on a subset, extrapolated.

    Each timed call is ``AVME.iwae_bound`` on a group of ``max(1, rows // S)`` images with
    ``max_rows=rows`` (noise drawing, logsumexp and the input check included: the whole
    evaluation). Groups are interleaved round-robin over implementations; the rate is
    images done / total time. Past ``--iwae-seconds`` (or the global budget) the images done
    so far are extrapolated to the full test set.
    """
    args, size, dev = ctx.args, ctx.size, ctx.device
    steps, samples, rows = args.steps_list[0], args.iwae_samples, args.iwae_rows
    test = load_split("binarized_mnist", "test")
    total = min(args.iwae_images, len(test))
    target = len(test)  # what the bound is reported over in the paper: the whole test split
    order = torch.randperm(
        len(test), generator=torch.Generator().manual_seed(args.seed)
    )  # the split is sorted by label
    images = test.images[order].to(dev, torch.float32)
    per_call = max(1, rows // samples)
    _say(f"iwae S={samples} K={steps}: {per_call} images per call")
    models, limits, specs = {}, {}, {}
    for name in _applicable(ctx, "iwae"):
        spec = IMPLS[name]
        reason = unavailable_reason(spec, dev) or ctx.budget_reason()
        if reason:
            ctx.skip("iwae", name, None, steps, "images/s", reason, samples=samples, **spec_extras(spec))
            continue
        models[name] = build_model(spec, size, steps, dev, seed=args.seed)
        limits[name] = total if spec.fused else min(total, args.iwae_ref_images)
        specs[name] = spec
    generators = {name: torch.Generator(device=dev).manual_seed(args.seed + 11) for name in models}

    def call(name: str, start: int) -> int:
        x = images[start : min(start + per_call, limits[name])]
        with run_context(specs[name], dev):
            models[name].iwae_bound(x, samples=samples, max_rows=rows, generator=generators[name])
        return x.shape[0]

    failures: dict[str, str] = {}
    for name in list(models):  # warm-up: one call each, untimed
        try:
            call(name, 0)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            failures[name] = _first_line(error)
    ctx.timer.synchronize()
    times: dict[str, list[float]] = {name: [] for name in models}
    done: dict[str, int] = dict.fromkeys(models, 0)
    deadline = time.perf_counter() + args.iwae_seconds
    rounds = max((math.ceil(limit / per_call) for limit in limits.values()), default=0)
    stopped = False
    for r in range(rounds):
        for name in round_order(list(models), r):
            if name in failures or done[name] >= limits[name]:
                continue
            if time.perf_counter() > deadline or ctx.budget.exceeded():
                stopped = True
                break
            try:
                count = [0]

                def timed(name: str = name, count: list[int] = count) -> None:
                    count[0] = call(name, done[name])

                seconds = ctx.timer.time(timed)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                failures[name] = _first_line(error)
                continue
            times[name].append(seconds)
            done[name] += count[0]
        if stopped:
            break
    for name in models:
        if name in failures:
            ctx.skip(
                "iwae",
                name,
                None,
                steps,
                "images/s",
                f"failed: {failures[name]}",
                samples=samples,
                **spec_extras(specs[name]),
            )
            continue
        if not times[name]:
            ctx.skip(
                "iwae",
                name,
                None,
                steps,
                "images/s",
                "no call finished within --iwae-seconds",
                samples=samples,
                **spec_extras(specs[name]),
            )
            continue
        seconds = sum(times[name])
        rate = done[name] / seconds
        flops = F.iwae_flops(done[name], samples, steps, size)
        stats = summarize(times[name])
        ctx.add(
            "iwae",
            name,
            None,
            steps,
            rate,
            "images/s",
            samples=samples,
            images=done[name],
            **spec_extras(specs[name]),
            target_images=target,
            extrapolated=done[name] < target,
            seconds_measured=seconds,
            seconds_full_test=target / rate,
            images_per_call=per_call,
            repeats=stats.n,
            time_median_s=stats.median,
            time_iqr_s=stats.iqr,
            time_min_s=stats.min,
            time_max_s=stats.max,
            flops=flops,
            flops_executed=F.iwae_flops(done[name], samples, steps, size, executed=True),
            flops_convention="algorithmic",
            tflops=flops / seconds / 1e12,
            precision=specs[name].matmul,
            stopped_early=stopped and done[name] < limits[name],
        )
    ctx.write()


def run_memory(ctx: Context) -> None:
    """Peak GPU memory of a training step, each implementation built and measured alone."""
    args, size, dev = ctx.args, ctx.size, ctx.device
    batch, steps = args.memory_batch, args.steps_list[0]
    names = _applicable(ctx, "memory")
    if dev.type != "cuda":
        for name in names:
            ctx.skip(
                "memory",
                name,
                batch,
                steps,
                "MiB",
                "peak memory statistics need a CUDA device (torch.cuda.max_memory_allocated)",
            )
        return
    images = _load_images("train", dev)
    inputs = make_train_inputs(images, batch, steps, size, 4, dev, seed=args.seed + 3)
    del images
    input_bytes = 4 * (batch * size.data_dim + steps * batch * size.latent_dim)
    for name in names:
        spec = IMPLS[name]
        reason = unavailable_reason(spec, dev) or ctx.budget_reason(compile_build=spec.compiles)
        if reason:
            ctx.skip("memory", name, batch, steps, "MiB", reason)
            continue
        free_memory()
        torch.cuda.synchronize(dev)
        base_alloc = torch.cuda.memory_allocated(dev)
        base_reserved = torch.cuda.memory_reserved(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            case = build_train_case(spec, size, steps, inputs, dev, lr=args.lr, seed=args.seed)
            case.step(0)
            case.step(1)
            torch.cuda.synchronize(dev)
            setup_peak = torch.cuda.max_memory_allocated(dev) - base_alloc
            persistent = torch.cuda.memory_allocated(dev) - base_alloc
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
            case.step(2)
            torch.cuda.synchronize(dev)
            step_peak = torch.cuda.max_memory_allocated(dev)
            reserved = torch.cuda.memory_reserved(dev) - base_reserved
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            ctx.skip("memory", name, batch, steps, "MiB", f"failed: {_first_line(error)}")
            continue
        finally:
            case = None  # type: ignore[assignment]
            _reset_dynamo()
            free_memory()
        peak = max(setup_peak, step_peak - base_alloc)
        ctx.add(
            "memory",
            name,
            batch,
            steps,
            peak / MIB,
            "MiB",
            what="peak allocated over build, compile/capture and 3 steps, above the pre-built inputs",
            persistent_mib=persistent / MIB,
            step_transient_mib=(step_peak - before) / MIB,
            reserved_mib=reserved / MIB,
            input_set_mib=input_bytes / MIB,
        )
    del inputs
    free_memory()
    ctx.write()


RUNNERS: dict[str, Callable[[Context], None]] = {
    "roofline": run_roofline,
    "train": run_train,
    "sample": run_sample,
    "iwae": run_iwae,
    "memory": run_memory,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # "fp32" means fp32: TF32 only where an impl asks for it
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    ctx = Context(args)
    _say(
        f"avme bench on {ctx.name} ({ctx.device}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"fused ops available: {ops.is_available()}; writing {ctx.out}"
    )
    for workload in WORKLOADS:  # fixed order: roofline first, so the peaks exist for the fractions
        if workload not in args.workload_list:
            continue
        _say(f"== {workload} ({ctx.budget.elapsed():.0f} s elapsed)")
        RUNNERS[workload](ctx)
        free_memory()  # the workload's tensors are gone with its frame
        ctx.write()
    path = ctx.write()
    _say(f"== done in {ctx.budget.elapsed():.0f} s: {len(ctx.records)} records -> {path}")
    _print_summary(ctx.records)
    return 0


def _print_summary(records: list[dict[str, Any]]) -> None:
    _say(f"{'workload':9s} {'impl':26s} {'B':>6s} {'K':>3s} {'value':>12s} unit        %peak")
    for r in records:
        value = "skipped" if r.get("value") is None else f"{r['value']:.4g}"
        frac = r.get("fraction_of_peak")
        _say(
            f"{r['workload']:9s} {r['impl']:26s} {r.get('batch') or ''!s:>6s} {r.get('steps') or ''!s:>3s} "
            f"{value:>12s} {r['unit']:11s} {'' if frac is None else f'{100 * frac:.1f}'}"
        )


if __name__ == "__main__":
    sys.exit(main())
