"""The benchmark suite (bench/): a CPU smoke run end to end, FLOP formulas, timing helpers, report, crossover."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest
import torch

from helpers import REPO, load_module, run_in_repo

if str(REPO) not in sys.path:  # bench/ is imported as a package from the checkout
    sys.path.append(str(REPO))

from avme_ext.loop_types import AVMEParams
from avme_ext.reference import avme_forward_reference
from bench import flops as F
from bench import report
from bench.timing import Timer, interleave, quantile, round_order, summarize
from bench.workloads import DESIGNS

# --------------------------------------------------------------------------- end to end (CPU smoke)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench/run.py --smoke on the CPU (its users are marked slow)."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "run.py"),
        "--smoke",
        "--device",
        "cpu",
        "--repeats",
        "2",
        "--out",
        str(out),
    ]
    proc = run_in_repo(cmd, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_run_writes_a_valid_results_file(smoke_results: Path):
    data = json.loads(smoke_results.read_text())
    for key in ("device", "torch", "cuda", "driver", "date", "git_commit", "command", "records", "config"):
        assert key in data, key
    assert data["torch"] == torch.__version__
    assert "--smoke" in data["command"]
    records = data["records"]
    for r in records:
        for key in ("workload", "impl", "batch", "steps", "value", "unit"):
            assert key in r, (key, r)
        assert (r["value"] is None) == ("skipped" in r), r
        if r["value"] is None:
            assert isinstance(r["skipped"], str)
            assert r["skipped"]

    by = {(r["workload"], r["impl"], r["batch"], r["steps"]): r for r in records}
    # Training: the reference in eager mode at every smoke configuration (B in {4, 16} at K=3, K=5 at B=16).
    for batch, steps in [(4, 3), (16, 3), (16, 5)]:
        r = by[("train", "ref-eager", batch, steps)]
        assert r["unit"] == "samples/s"
        assert r["value"] > 0
        assert r["repeats"] == 2
        assert r["iqr"] is not None
        assert r["iqr"] >= 0
        assert r["value_min"] <= r["value"] <= r["value_max"]
        assert r["flops"] == F.train_step_flops(batch, steps, F.ModelSize(784, 32, 32, 8))
        assert r["flops_executed"] < r["flops"]
        assert r["precision"] == "fp32"
        assert r["fraction_of_peak"] > 0  # against the fp32 matmul measured in the same run
        assert r["fused"] is False
        assert r["mode"] == "eager"
        assert r["timing_group"] == "main"
        bf16 = by[("train", "ref-eager-bf16", batch, steps)]  # autocast runs on the CPU too
        assert bf16["value"] > 0
        assert bf16["precision"] == "bf16"
        # CPU: torch.compile skipped by default in smoke mode, TF32, CUDA graphs and fused ops unavailable.
        for impl in (
            "ref-eager-tf32",
            "ref-compile",
            "ref-compile-reduce-overhead",
            "ref-cudagraph",
            *(f"fused-{d}-{p}" for d in DESIGNS for p in ("fp32", "tf32", "bf16")),
            "fused-auto-bf16-graph",
        ):
            assert by[("train", impl, batch, steps)]["value"] is None, impl
        assert ("train", "ref-compile-max-autotune", batch, steps) not in by  # optional: not run by default
    assert "torch.compile" in by[("train", "ref-compile", 4, 3)]["skipped"]
    assert by[("train", "ref-compile", 4, 3)]["timing_group"] == "compile"
    fused = by[("train", "fused-persistent-bf16", 4, 3)]
    assert "CUDA" in fused["skipped"]
    assert fused["design"] == "persistent"
    assert fused["core_precision"] == "bf16"
    assert data["config"]["impls"]["iwae"] == [
        "ref-eager",
        "ref-eager-tf32",
        "ref-eager-bf16",
        "fused-auto-fp32",
        "fused-auto-tf32",
        "fused-auto-bf16",
    ]

    sample = by[("sample", "ref-eager", 64, 3)]
    assert sample["unit"] == "images/s"
    assert sample["value"] > 0
    iwae = by[("iwae", "ref-eager", None, 3)]
    assert iwae["value"] > 0
    assert iwae["extrapolated"] is True
    assert iwae["images"] == 8
    assert iwae["samples"] == 16
    assert iwae["seconds_full_test"] == pytest.approx(10000 / iwae["value"])
    matmul = by[("roofline", "matmul-fp32", None, None)]
    assert matmul["unit"] == "TFLOP/s"
    assert matmul["value"] > 0
    assert by[("roofline", "matmul-tf32", None, None)]["value"] is None
    assert data["peaks"]["fp32"] == matmul["value"]
    assert all(r["value"] is None for r in records if r["workload"] == "memory")  # needs CUDA


@pytest.mark.slow
def test_report_writes_table_and_plot_without_touching_the_real_readme(smoke_results: Path, tmp_path: Path):
    real_readme = REPO / "bench" / "README.md"
    before = real_readme.read_text()
    readme = tmp_path / "README.md"
    shutil.copy(real_readme, readme)
    cmd = [
        sys.executable,
        str(REPO / "bench" / "report.py"),
        str(smoke_results),
        "--readme",
        str(readme),
        "--plot-dir",
        str(tmp_path),
    ]
    proc = run_in_repo(cmd, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert real_readme.read_text() == before

    text = readme.read_text()
    section = text.split(report.START, 1)[1].split(report.END, 1)[0]
    assert "No GPU results" not in section
    assert "| impl | B=4 K=3 | B=16 K=3 | B=16 K=5 |" in section
    assert "| ref-eager-bf16 |" in section
    assert "| fused-stagewise-bf16 | skipped |" in section
    assert "**best fused / best non-fused**" in section
    assert "**Targets**" in section
    assert "| training B=16 K=5: best fused / best non-fused >= 1.5x | target |" in section
    assert "Smoke run" in section
    assert "| train | ref-eager | 16 | 5 |" in section
    assert "skipped: " in section
    assert text.startswith(before.split(report.START, 1)[0])  # the rest of the README is kept
    plot = tmp_path / f"{smoke_results.stem}-train-throughput.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({plot.name})" in section  # linked relative to the README


@pytest.mark.slow
def test_append_replaces_records_of_the_same_key(smoke_results: Path, tmp_path: Path):
    merged = tmp_path / "merged.json"
    from bench import run

    assert (
        run.main(
            [
                "--smoke",
                "--device",
                "cpu",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--workloads",
                "roofline",
                "--matmul-size",
                "64",
                "--copy-mib",
                "1",
                "--append",
                str(smoke_results),
                "--out",
                str(merged),
            ]
        )
        == 0
    )
    first, data = json.loads(smoke_results.read_text()), json.loads(merged.read_text())
    assert len(data["commands"]) == 2
    assert "--append" in data["commands"][1]
    assert len(data["records"]) == len(first["records"])
    runs = {(r["workload"], r["impl"]): r["run"] for r in data["records"]}
    assert runs[("roofline", "matmul-fp32")] == 1
    assert runs[("sample", "ref-eager")] == 0
    assert data["peaks"]["fp32"] == next(r["value"] for r in data["records"] if r["impl"] == "matmul-fp32")


def test_real_readme_has_markers_and_no_invented_numbers():
    text = (REPO / "bench" / "README.md").read_text()
    assert report.START in text
    assert report.END in text


# --------------------------------------------------------------------------- FLOP formulas


TINY = F.ModelSize(data_dim=3, enc_hidden=2, dec_hidden=2, latent_dim=1, num_classes=0)


def test_flop_formulas_match_a_hand_count():
    # B=2, D=3, He=Hd=2, Z=1, C=0, one step:
    #   encoder  2*2*(4*2)*(2*3 + 2 + 0 + 2) = 320
    #   posterior 2*2*(2*1)*2               =  16
    #   decoder  2*2*(4*2)*(1 + 0 + 2)      =  96
    #   write    2*2*3*2                    =  24      -> 456 per step
    assert F.forward_step_flops(2, TINY) == 456
    assert F.forward_flops(2, 2, TINY) == 912
    # executed: x's part of the encoder product (2*2*8*3 = 96) once instead of twice
    assert F.forward_flops(2, 2, TINY, executed=True) == 912 - 96
    assert F.train_step_flops(2, 2, TINY) == 3 * 912
    # sampling: decoder 96 + write 24 per step
    assert F.sample_flops(2, 2, TINY) == 240
    assert F.iwae_flops(images=1, samples=2, steps=2, size=TINY) == 912
    assert F.matmul_flops(2, 3, 4) == 48
    # with a condition (C=1): y's parts hoisted from both LSTMs when executed
    cond = F.ModelSize(3, 2, 2, 1, num_classes=1)
    per_step = 2 * 2 * 8 * (6 + 2 + 1 + 2) + 16 + 2 * 2 * 8 * (1 + 1 + 2) + 24
    assert F.forward_step_flops(2, cond) == per_step
    assert F.forward_flops(2, 3, cond, executed=True) == 3 * per_step - 2 * (2 * 2 * 8 * (3 + 1) + 2 * 2 * 8 * 1)
    assert F.sample_flops(2, 3, cond, executed=True) == 3 * (2 * 2 * 8 * 4 + 24) - 2 * (2 * 2 * 8 * 1)


def _random_params(size: F.ModelSize, generator: torch.Generator) -> AVMEParams:
    d, he, hd, z, c = size.data_dim, size.enc_hidden, size.dec_hidden, size.latent_dim, size.num_classes
    shapes = [
        (4 * he, 2 * d + hd + c),
        (4 * he, he),
        (4 * he,),
        (4 * he,),
        (2 * z, he),
        (2 * z,),
        (4 * hd, z + c),
        (4 * hd, hd),
        (4 * hd,),
        (4 * hd,),
        (d, hd),
        (d,),
    ]
    return AVMEParams(*[(0.3 * torch.randn(s, generator=generator)).requires_grad_() for s in shapes])


def test_executed_flops_match_torch_flop_counter_on_the_reference():
    from torch.utils.flop_counter import FlopCounterMode

    size = F.ModelSize(data_dim=7, enc_hidden=5, dec_hidden=4, latent_dim=3)
    batch, steps = 6, 4
    g = torch.Generator().manual_seed(0)
    params = _random_params(size, g)
    x = torch.randint(0, 2, (batch, size.data_dim), generator=g).float()
    eps = torch.randn(steps, batch, size.latent_dim, generator=g)
    with FlopCounterMode(display=False) as forward_counter:
        out = avme_forward_reference(x, None, eps, params)
    assert forward_counter.get_total_flops() == F.forward_flops(batch, steps, size, executed=True)
    with FlopCounterMode(display=False) as backward_counter:
        (out.canvas.sum() + out.mu.sum() + out.logvar.sum()).backward()
    ratio = backward_counter.get_total_flops() / forward_counter.get_total_flops()
    # backward ~ 2x forward; a bit less since no gradient flows into x or the zero initial states
    assert 1.5 < ratio <= 2.0


def test_paper_sizes_flops():
    per_step = F.forward_step_flops(1, F.PAPER_SIZE)
    assert per_step == 2 * 1600 * 2368 + 2 * 200 * 400 + 2 * 1600 * 500 + 2 * 784 * 400
    assert F.train_step_flops(1024, 12, F.PAPER_SIZE) == 3 * 12 * 1024 * per_step


# --------------------------------------------------------------------------- timing helpers


def test_quantiles_and_summary_match_numpy():
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 4.0, 2.0, 10.0, 3.0]
    s = summarize(values)
    assert s.median == pytest.approx(np.median(values))
    assert s.q1 == pytest.approx(np.quantile(values, 0.25))
    assert s.q3 == pytest.approx(np.quantile(values, 0.75))
    assert s.iqr == pytest.approx(s.q3 - s.q1)
    assert (s.min, s.max, s.n) == (1.0, 10.0, 6)
    assert summarize([7.0]).iqr == 0.0
    assert quantile([1.0, 2.0], 0.5) == 1.5
    with pytest.raises(ValueError, match="at least one sample"):
        summarize([])


def test_round_order_rotates():
    names = ["a", "b", "c"]
    assert round_order(names, 0) == ["a", "b", "c"]
    assert round_order(names, 1) == ["b", "c", "a"]
    assert round_order(names, 4) == ["b", "c", "a"]
    assert round_order([], 3) == []


def test_interleave_runs_round_robin_with_fresh_indices_after_warmup():
    calls: list[tuple[str, int]] = []
    cases = {name: (lambda i, name=name: calls.append((name, i))) for name in ("a", "b", "c")}
    samples = interleave(cases, repeats=3, warmup=2, timer=Timer("cpu"))
    assert calls[:6] == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1)]  # warm-up rounds
    assert calls[6:] == [("a", 2), ("b", 2), ("c", 2), ("b", 3), ("c", 3), ("a", 3), ("c", 4), ("a", 4), ("b", 4)]
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in samples.values() for t in v)


def test_interleave_stops_on_budget_but_keeps_one_round():
    cases = {"a": lambda i: None, "b": lambda i: None}
    samples = interleave(cases, repeats=10, warmup=0, timer=Timer("cpu"), should_stop=lambda: True)
    assert {k: len(v) for k, v in samples.items()} == {"a": 1, "b": 1}


def test_timer_measures_sleep():
    import time

    assert Timer("cpu").time(lambda: time.sleep(0.02)) >= 0.015


# --------------------------------------------------------------------------- report and fractions


def test_report_markers_and_formatting():
    text = f"intro\n{report.START}\nold\n{report.END}\noutro\n"
    assert report.replace_between_markers(text, "new") == f"intro\n{report.START}\nnew\n{report.END}\noutro\n"
    with pytest.raises(ValueError, match="the README needs the markers"):
        report.replace_between_markers("no markers", "x")
    assert report.fmt(1234567.8) == "1,234,568"
    assert report.fmt(12.3456) == "12.35"
    assert report.fmt(None) == ""


def test_fractions_use_the_peak_of_the_same_precision():
    from bench.run import add_fractions, peaks_of

    records = [
        {"workload": "roofline", "impl": "matmul-fp32", "value": 50.0},
        {"workload": "roofline", "impl": "matmul-bf16", "value": 500.0},
        {"workload": "train", "impl": "ref-eager", "tflops": 25.0, "precision": "fp32"},
        {"workload": "train", "impl": "fused-bf16", "tflops": 100.0, "precision": "bf16"},
        {"workload": "train", "impl": "fused-tf32", "tflops": 100.0, "precision": "tf32"},
    ]
    assert peaks_of(records) == {"fp32": 50.0, "bf16": 500.0}
    out = add_fractions(records)
    assert out[2]["fraction_of_peak"] == pytest.approx(0.5)
    assert out[3]["fraction_of_peak"] == pytest.approx(0.2)
    assert "fraction_of_peak" not in out[4]  # no tf32 peak measured in this run


def test_merge_of_results_files(tmp_path: Path):
    a = {
        "device": "X",
        "records": [
            {"workload": "train", "impl": "ref-eager", "batch": 1, "steps": 2, "value": 1.0, "unit": "samples/s"},
            {
                "workload": "train",
                "impl": "ref-compile",
                "batch": 1,
                "steps": 2,
                "value": None,
                "unit": "samples/s",
                "skipped": "budget",
            },
        ],
    }
    b = {
        "device": "X",
        "records": [
            {"workload": "train", "impl": "ref-compile", "batch": 1, "steps": 2, "value": 3.0, "unit": "samples/s"}
        ],
    }
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    merged = report.load_results([tmp_path / "a.json", tmp_path / "b.json"])
    values = {r["impl"]: r["value"] for r in merged["records"]}
    assert values == {"ref-eager": 1.0, "ref-compile": 3.0}
    markdown = report.render_markdown(merged)
    assert "| **best non-fused** | 3 (ref-compile) |" in markdown


# --------------------------------------------------------------------------- targets


def _train(impl: str, batch: int, value: float | None, **extra: object) -> dict[str, object]:
    return {
        "workload": "train",
        "impl": impl,
        "batch": batch,
        "steps": 12,
        "value": value,
        "unit": "samples/s",
        **extra,
    }


def test_targets_are_checked_against_the_best_of_each_family():
    records = [
        _train("ref-eager", 100, 3000.0),
        _train("ref-cudagraph", 100, 20000.0),
        _train("fused-persistent-bf16", 100, 120000.0),
        _train("fused-auto-fp32-graph", 100, 90000.0),
        _train("ref-eager", 4096, 100000.0),
        _train("ref-eager-bf16", 4096, 120000.0),
        _train("fused-stagewise-bf16", 4096, 150000.0),
        _train("fused-stagewise-fp32", 4096, 600000.0),
        _train("ref-compile", 4096, None, skipped="time budget (--budget-s 5) spent"),
        {"workload": "sample", "impl": "ref-eager", "batch": 10000, "steps": 12, "value": 900000.0},
        {"workload": "sample", "impl": "fused-auto-bf16", "batch": 10000, "steps": 12, "value": 1800000.0},
    ]
    checks = {c.goal: c for c in report.check_targets({"config": {"steps": [12]}, "records": records})}
    ratio100 = checks["training B=100 K=12: best fused / best non-fused >= 1.5x"]
    assert (ratio100.measured, ratio100.status) == ("6.00x", "met")
    assert "fused-persistent-bf16" in ratio100.note
    assert "ref-cudagraph" in ratio100.note
    ratio4096 = checks["training B=4096 K=12: best fused / best non-fused >= 1.5x"]
    assert (ratio4096.measured, ratio4096.status) == ("5.00x", "met")
    assert "ref-compile" in ratio4096.note
    eager = checks["training B=100 K=12: best fused / ref-eager >= 10x"]
    assert (eager.measured, eager.status) == ("40.00x", "met")
    assert checks["training B=100 K=12: best fused >= 100,000 samples/s"].status == "met"
    bf16 = checks["training B=4096 K=12: best fused bf16 >= 500,000 samples/s"]
    assert (bf16.status, bf16.note) == ("not met", "fused-stagewise-bf16")  # the fp32 record does not count
    assert checks["sampling N=10000 K=12: best fused / best reference mode >= 1.5x"].status == "met"
    assert checks["IWAE: best fused / best reference mode >= 1.5x"].status == "not measured"


# --------------------------------------------------------------------------- implementations


def test_impls_accept_globs_and_refuse_unknown_names():
    from bench.workloads import IMPLS, select_impls

    assert select_impls(["ref-eager", "fused-*-bf16"]) == ["ref-eager", *(f"fused-{d}-bf16" for d in DESIGNS)]
    assert select_impls(["fused-persistent-*"]) == [
        "fused-persistent-fp32",
        "fused-persistent-fp32-graph",
        "fused-persistent-tf32",
        "fused-persistent-tf32-graph",
        "fused-persistent-bf16",
        "fused-persistent-bf16-graph",
    ]
    assert set(select_impls(["*"])) == set(IMPLS)
    with pytest.raises(ValueError, match="fused-fp32"):
        select_impls(["fused-fp32"])


def test_forced_design_wraps_the_whole_step(monkeypatch):
    """With ``avme_ext.ops.design`` present, every step (forward and backward) runs inside ``design(name)``."""
    import contextlib

    from avme_ext import ops
    from bench import workloads as W

    active: list[str] = []
    seen: list[tuple[str, str | None]] = []

    @contextlib.contextmanager
    def fake_design(name: str):
        active.append(name)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(ops, "design", fake_design, raising=False)
    monkeypatch.setattr(ops, "DESIGNS", ("auto", "rowtile", "persistent"), raising=False)
    spec = W.ImplSpec(
        "test-persistent", "ref", "fp32", "eager", "fp32", "reference under a forced design", design="persistent"
    )
    size = F.ModelSize(12, 6, 5, 3)
    images = torch.randint(0, 2, (20, 12), dtype=torch.uint8)
    inputs = W.make_train_inputs(images, 4, 3, size, 2, torch.device("cpu"), seed=0)
    case = W.build_train_case(spec, size, 3, inputs, torch.device("cpu"))
    assert case.model is not None
    weight = case.model.core.write.weight
    weight.register_hook(lambda grad: seen.append(("backward", active[-1] if active else None)))
    case.step(0)
    assert seen == [("backward", "persistent")]
    assert active == []
    assert W.unavailable_reason(spec, torch.device("cpu")) is None  # the reference runs on the CPU
    fused = W.IMPLS["fused-stagewise-bf16"]
    monkeypatch.setattr(ops, "is_available", lambda: True)
    reason = W.unavailable_reason(fused, torch.device("cuda"))
    assert reason is not None
    assert "not in avme_ext.ops.DESIGNS" in reason
    assert W.unavailable_reason(W.IMPLS["fused-persistent-bf16"], torch.device("cuda")) is None
    assert W.spec_extras(W.IMPLS["fused-persistent-bf16"])["design_forced"] is True
    monkeypatch.delattr(ops, "design")
    reason = W.unavailable_reason(W.IMPLS["fused-persistent-bf16"], torch.device("cuda"))
    assert reason is not None
    assert "ops.design is not present" in reason
    assert W.unavailable_reason(W.IMPLS["fused-auto-bf16"], torch.device("cuda")) is None  # the default design
    assert "design_note" in W.spec_extras(W.IMPLS["fused-auto-bf16"])


def test_round_limit_stops_after_the_cap_once_the_minimum_is_done():
    from types import SimpleNamespace

    from bench.run import Budget, Context, RoundLimit

    # A stand-in for the run's context: RoundLimit reads its budget and two of its arguments.
    ctx = SimpleNamespace(budget=Budget(None), args=SimpleNamespace(config_seconds=1e-9, min_repeats=3))
    limit = RoundLimit(cast(Context, ctx))
    assert [limit() for _ in range(4)] == [False, False, True, True]
    ctx.args.config_seconds = None
    assert not RoundLimit(cast(Context, ctx))()
    ctx.budget = Budget(-1.0)  # spent
    assert RoundLimit(cast(Context, ctx))()


# --------------------------------------------------------------------------- crossover


@pytest.mark.slow
def test_crossover_runs_on_the_smoke_results(smoke_results: Path, tmp_path: Path, capsys):
    from avme_ext import dispatch
    from bench import crossover

    out = tmp_path / "dispatch.py"
    with pytest.raises(SystemExit):  # a CPU smoke file says nothing about a GPU
        crossover.main([str(smoke_results), "--out", str(out)])
    assert "not a full-size GPU run" in capsys.readouterr().err
    assert not out.exists()
    assert crossover.main([str(smoke_results), "--allow-smoke", "--out", str(out)]) == 0
    sources, models, table = dispatch.parse_table(out.read_text())
    device = json.loads(smoke_results.read_text())["device"]
    for precision in ("fp32", "tf32", "bf16"):
        assert table[(device, "float32", precision)] == [(16, "ref")]  # no fused ops on the CPU: never faster
        assert smoke_results.name in sources[(device, "float32", precision)]
        # the smoke run's model (--model-size 784,32,32,8) and the K of its training records
        assert models[(device, "float32", precision)] == {
            "data_dim": 784,
            "num_classes": 0,
            "enc_hidden": 32,
            "dec_hidden": 32,
            "latent_dim": 8,
            "steps": [3, 5],
        }


# --------------------------------------------------------------------------- GPU scripts (tools/gpu/)


GPU_TOOLS = REPO / "tools" / "gpu"


def test_gpu_scripts_parse():
    for script in sorted(GPU_TOOLS.glob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False, timeout=30)
        assert proc.returncode == 0, (script.name, proc.stderr)


def test_source_revision_falls_back_to_the_stamp(monkeypatch):
    from bench import run

    monkeypatch.setattr(run, "_git", lambda *cmd: None)  # the GPU machine's copy has no .git
    monkeypatch.setenv("AVME_GIT_COMMIT", "b" * 40)
    monkeypatch.setenv("AVME_GIT_DIRTY", "1")
    assert run.source_revision() == ("b" * 40, True)
    monkeypatch.delenv("AVME_GIT_COMMIT")
    monkeypatch.delenv("AVME_GIT_DIRTY")
    assert run.source_revision() == (None, None)


def _load_tool(name: str) -> ModuleType:
    return load_module(f"gpu_{name}", GPU_TOOLS / f"{name}.py")


def test_train_compare_checks_the_last_common_epoch(tmp_path: Path):
    compare = _load_tool("train_compare")
    nelbo = {"cuda-fp32": [120.0, 100.0, 95.0], "cuda-bf16": [120.5, 100.2], "cuda-tf32": [119.0, 100.5, 90.0]}
    for name, values in nelbo.items():
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        lines = [json.dumps({"kind": "valid", "epoch": e + 1, "step": e, "nelbo": v}) for e, v in enumerate(values)]
        (folder / "metrics.jsonl").write_text("\n".join([*lines, '{"kind": "valid", "ep']) + "\n")  # a cut line
        (tmp_path / "runs" / f"{name}.rc").write_text("143\n" if name == "cuda-bf16" else "0\n")
    out = tmp_path / "check.json"
    assert compare.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--epochs", "3"]) == 1
    result = json.loads(out.read_text())
    assert result["epoch_compared"] == 2  # cuda-bf16 was stopped after two epochs
    assert result["checks"]["cuda-bf16"]["pass"]
    assert result["checks"]["cuda-bf16"]["difference"] == pytest.approx(0.2)
    assert not result["checks"]["cuda-tf32"]["pass"]  # 0.5 nats off
    assert result["runs"]["cuda-bf16"]["exit_code"] == 143
    assert result["pass"] is False
    assert compare.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--tolerance", "0.6"]) == 0
    assert compare.main(["--runs", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert "baseline" in json.loads(out.read_text())["reason"]


def test_ddp_checkpoint_comparison_is_exact_or_relative():
    ddp = _load_tool("ddp_equal")
    a = {"w": torch.ones(3), "step": torch.tensor(5)}
    assert ddp.compare(a, {"w": torch.ones(3), "step": torch.tensor(5)})["exact"] is True
    near = ddp.compare(a, {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-6]), "step": torch.tensor(5)})
    assert near["exact"] is False
    assert 0 < near["max_rel"] < 1e-6
    assert near["worst_tensor"] == "w"
    nan = ddp.compare(a, {"w": torch.tensor([1.0, float("nan"), 1.0]), "step": torch.tensor(5)})
    assert nan["finite"] is False
    assert not nan["max_rel"] <= 1e-5
    assert ddp.compare(a, {"w": torch.ones(3)})["same_keys"] is False


# --------------------------------------------------------------------------- grid barrier microbenchmark


def test_barrier_benchmark_refuses_bad_arguments_and_a_machine_without_cuda(capsys):
    from bench import barrier

    for argv, message in (
        (["--threads", "0"], "--threads: expected comma-separated integers >= 1"),
        (["--barriers", "nope"], "expected a comma-separated subset of ['cooperative_groups', 'flag']"),
        (["--rounds", "0"], "--rounds and --repeats must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            barrier.main(argv)
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    if not torch.cuda.is_available():
        assert barrier.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_barrier_benchmark_measures_both_barriers(tmp_path: Path):
    from avme_ext import ops
    from bench import barrier

    if not ops.is_available():
        pytest.skip("the CUDA extension is not built")
    out = tmp_path / "barrier.json"
    assert barrier.main(["--threads", "128", "--rounds", "200", "--repeats", "3", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert {r["barrier"] for r in document["results"]} == {"cooperative_groups", "flag"}
    assert all(0 < r["round_us"] < 1000 for r in document["results"]), document["results"]
    assert document["device"]
    assert document["torch"] == torch.__version__
    counters = torch.zeros(2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="threads must be a multiple of 32"):
        torch.ops.avme_bench.grid_barrier_loop(counters, torch.zeros(3, device="cuda"), 1, 48, 1, "flag")
    with pytest.raises(RuntimeError, match="sink must be a contiguous float32 tensor of 3 \\* blocks = 6"):
        torch.ops.avme_bench.grid_barrier_loop(counters, torch.zeros(3, device="cuda"), 2, 64, 1, "flag")
    with pytest.raises(RuntimeError, match="cannot all be resident"):
        torch.ops.avme_bench.grid_barrier_loop(
            counters, torch.zeros(3 * 65536, device="cuda"), 65536, 1024, 1, "cooperative_groups"
        )
