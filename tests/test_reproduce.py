"""python/reproduce_paper.py: the whole pipeline at the --smoke sizes on the CPU (training side by side,
evaluation in chunks, figures, results), a rerun that skips finished work, and interrupted runs
(SIGTERM and SIGKILL mid-training, SIGINT mid-evaluation) that continue to the same numbers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import REPO, run_in_repo, subprocess_env

sys.path.insert(0, str(REPO / "python"))

import reproduce_paper
from avme_ext.results import PUBLISHED
from reproduce_eval import chunk_key, load_chunk, read_chunk_meta, save_chunk
from reproduce_plan import MODELS, EvalPass, Layout, Plan, make_plan
from reproduce_train import read_run_status, stop_reason, trained_summary

SCRIPT = REPO / "python" / "reproduce_paper.py"
SMOKE_SECONDS = 180  # the promise of --smoke on a CPU

# Loaded by every Python process of the interrupted runs (PYTHONPATH): an ``avme train`` process sends
# a signal to its parent, the reproduction, once its run reaches a step, and waits (at most a minute)
# for the SIGINT that follows, so that it saves its checkpoint at that step whatever the machine's
# load; the reproduction sends itself a signal when it starts a given evaluation chunk. Each fires
# once (a marker file).
SITECUSTOMIZE = textwrap.dedent("""
    import os, signal, sys, time

    def _once(marker):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    _train = os.environ.get("REPRO_TEST_TRAIN_SIGNAL")  # SIGNAL:STEP:MARKER
    if _train and "train" in sys.argv[:4]:
        from avme_ext.training import trainer as _trainer
        _name, _step, _marker = _train.split(":")
        _run_step = _trainer.Trainer._run_step

        def _signalling_step(self, *args, **kwargs):
            stop = _run_step(self, *args, **kwargs)
            if self.state.step == int(_step) and _once(_marker):
                os.kill(os.getppid(), getattr(signal, _name))
                waited = time.monotonic() + 60
                while not self.stop and time.monotonic() < waited:
                    time.sleep(0.05)
            return stop or bool(self.stop)

        _trainer.Trainer._run_step = _signalling_step

    _eval = os.environ.get("REPRO_TEST_EVAL_SIGNAL")  # SIGNAL:CALL:MARKER
    if _eval and sys.argv[0].endswith("reproduce_paper.py"):
        import avme_ext.evaluation as _evaluation
        _name, _call, _marker = _eval.split(":")
        _evaluate, _calls = _evaluation.evaluate, []

        def _signalling_evaluate(*args, **kwargs):
            _calls.append(1)
            if len(_calls) == int(_call) and _once(_marker):
                os.kill(os.getpid(), getattr(signal, _name))
            return _evaluate(*args, **kwargs)

        _evaluation.evaluate = _signalling_evaluate
""")


class TimedRun(subprocess.CompletedProcess[str]):
    """A finished run of the script, and how long it took."""

    def __init__(self, result: subprocess.CompletedProcess[str], seconds: float) -> None:
        super().__init__(result.args, result.returncode, result.stdout, result.stderr)
        self.seconds = seconds


def run(out: Path, docs: Path, *extra: str, env: dict[str, str] | None = None, shim: Path | None = None) -> TimedRun:
    environment = subprocess_env(**(env or {}))
    if shim is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(shim), str(REPO)])
    started = time.monotonic()
    result = run_in_repo(
        [sys.executable, str(SCRIPT), "--out", str(out), "--docs", str(docs), "--smoke", *extra],
        env=environment,
        timeout=600,
    )
    return TimedRun(result, time.monotonic() - started)


def describe(result: TimedRun) -> str:
    return f"exit {result.returncode} after {result.seconds:.0f} s\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"


def likelihood_figures(docs: Path) -> list[dict[str, Any]]:
    """What must not depend on interruptions: every number and the training outcome, without timings."""
    keep = (
        "name",
        "num_images",
        "iwae_samples",
        "marginal_samples_per_class",
        "test_nelbo",
        "test_nelbo_sem",
        "test_iwae",
        "test_iwae_sem",
        "test_reconstruction",
        "test_kl",
        "test_kl_per_step",
        "test_nll_given_y",
        "test_nll_marginal",
    )
    records = json.loads((docs / "results.json").read_text())["models"]
    return [
        {
            **{k: r.get(k) for k in keep},
            **{k: r["training"][k] for k in ("epochs", "stop_reason", "best_epoch", "best_valid_nelbo")},
        }
        for r in records
    ]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run (minutes on a CPU: its users are marked slow)."""
    root = tmp_path_factory.mktemp("smoke")
    result = run(root / "run", root / "docs")
    return {"out": root / "run", "docs": root / "docs", "result": result}


# --------------------------------------------------------------------------- the smoke run
@pytest.mark.slow
def test_smoke_run_trains_evaluates_and_reports_within_its_budget(smoke):
    result, out, docs = smoke["result"], smoke["out"], smoke["docs"]
    assert result.returncode == 0, describe(result)
    assert result.seconds < SMOKE_SECONDS, describe(result)
    log = result.stdout
    assert "plan (smoke: tiny sizes)" in log
    assert "time left: training" in log
    assert "done in" in log
    document = json.loads((docs / "results.json").read_text())
    assert document["format"] == "avme-reproduction-results"
    assert document["smoke"] is True
    assert document["command"] == "python python/reproduce_paper.py --out DIR --smoke"
    records = {r["name"]: r for r in document["models"]}
    assert list(records) == list(MODELS)
    for name, record in records.items():
        assert record["num_images"] == 20
        assert record["iwae_samples"] == 4
        assert record["steps"] == 3
        for key in ("test_nelbo", "test_iwae", "test_reconstruction"):
            assert math.isfinite(record[key]), (name, key)
            assert record[key] > 0, (name, key)
        assert record["test_reconstruction"] < record["test_nelbo"]
        assert record["test_nelbo"] == pytest.approx(record["test_reconstruction"] + sum(record["test_kl_per_step"]))
        assert len(record["test_kl_per_step"]) == 3
        assert record["kinds"]["test_reconstruction"].startswith("reconstruction term")
        training = record["training"]
        assert training["epochs"] == training["epoch_cap"] == (3 if name == "avme-canvas" else 2)
        assert training["stop_reason"] == "epoch cap"
        assert 1 <= training["best_epoch"] <= training["epochs"]
        assert training["selection"].startswith("best validation")
        for figure in ("training_curve.png", "kl_per_step.png", "samples.png", "unrolled.png", "reconstructions.png"):
            assert (docs / "images" / name / figure).stat().st_size > 0, (name, figure)
        weights = out / name / "weights.fp16.safetensors"
        from safetensors.torch import load_file

        assert {t.dtype for t in load_file(weights).values() if t.is_floating_point()} == {torch.float16}
    conditional = records["avme-canvas-conditional"]
    assert conditional["test_iwae"] == conditional["test_nll_given_y"]
    assert conditional["marginal_samples_per_class"] == 2
    # -log p(x) under a uniform prior is at most -log p(x|y) + log 10 (one bound per class)
    assert conditional["test_nll_marginal"] <= conditional["test_nll_given_y"] + math.log(10) + 1e-9
    assert "test_nll_marginal" not in records["avme-canvas"]
    published = {p["model"]: p["kind"] for p in document["published"]}
    assert published["NADE"] == "exact NLL"
    assert published["DLGM"] == "estimate"
    assert published["AVME (paper's Table 1)"].startswith("reconstruction term")
    table = (docs / "results.md").read_text()
    assert "A smoke run" in table
    assert "not a likelihood" in table
    assert "80.50" in table
    assert "(images/avme-canvas/unrolled.png)" in table
    progress = json.loads((out / "progress.json").read_text())
    assert progress["stage"] == "done"
    assert progress["evaluation"]["trajectories_left"] == 0


@pytest.mark.slow
def test_a_rerun_skips_finished_work(smoke):
    out, docs = smoke["out"], smoke["docs"]
    assert smoke["result"].returncode == 0, describe(smoke["result"])
    files = sorted(
        p
        for p in [*out.rglob("*"), *docs.rglob("*")]
        if p.is_file() and p.name not in ("reproduce.log", "progress.json", ".lock")
    )
    before = {p: p.stat().st_mtime_ns for p in files}
    again = run(out, docs)
    assert again.returncode == 0, describe(again)
    assert "training (avme train" not in again.stdout
    assert "evaluating" not in again.stdout
    assert all(f"{name}: trained" in again.stdout for name in MODELS)
    assert {p: p.stat().st_mtime_ns for p in files} == before


@pytest.mark.slow
def test_the_plan_of_a_directory_is_fixed_by_its_first_run(smoke, capsys):
    code = reproduce_paper.main(["--out", str(smoke["out"]), "--docs", str(smoke["docs"]), "--device", "cpu"])
    assert code == 2
    assert "holds a reproduction with another plan" in capsys.readouterr().out
    assert reproduce_paper.main(["--out", str(smoke["out"]), "--models", "avme-canvas,draw"]) == 2
    assert "--models must name some of" in capsys.readouterr().err


# --------------------------------------------------------------------------- interrupted runs
@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shim")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


@pytest.mark.slow
def test_interrupted_runs_continue_to_the_numbers_of_an_uninterrupted_one(smoke, shim, tmp_path):
    out, docs, marks = tmp_path / "run", tmp_path / "docs", tmp_path
    layout = Layout(out)
    # 1. a scheduler's SIGTERM while the models train (sent when a run reaches step 4 of 6 or 9)
    stopped = run(out, docs, shim=shim, env={"REPRO_TEST_TRAIN_SIGNAL": f"SIGTERM:4:{marks / 'term'}"})
    assert stopped.returncode == 143, describe(stopped)
    assert "stopped by SIGTERM" in stopped.stdout
    assert "run the same command again" in stopped.stdout
    unfinished = [n for n in MODELS if not layout.training(n).is_file()]
    assert unfinished, stopped.stdout
    assert any((layout.run_dir(n) / "last.safetensors").is_file() for n in unfinished), stopped.stdout
    # 2. SIGKILL while avme-canvas trains its last epoch: its process gets SIGINT from the kernel and
    # saves its checkpoint on its own (a rerun waits for it: it holds the lock)
    killed = run(out, docs, shim=shim, env={"REPRO_TEST_TRAIN_SIGNAL": f"SIGKILL:8:{marks / 'kill'}"})
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    assert not layout.training("avme-canvas").is_file()
    # 3. Ctrl-C at the third chunk of the evaluation (after the training is done)
    interrupted = run(out, docs, shim=shim, env={"REPRO_TEST_EVAL_SIGNAL": f"SIGINT:3:{marks / 'int'}"})
    assert interrupted.returncode == 130, describe(interrupted)
    assert all(layout.training(n).is_file() for n in MODELS)
    canvas_log = layout.train_log("avme-canvas").read_text()
    assert "SIGINT received: saved" in canvas_log, canvas_log
    assert "at step 8 (epoch 3, batch 2 of 3)" in canvas_log, canvas_log
    chunks = list(out.rglob("chunk-*.safetensors"))
    assert len(chunks) == 2, chunks  # the first two of 2 + 2 + 2 + 2 + 2 + 2
    assert not (docs / "results.json").exists()
    done_before = {p: p.stat().st_mtime_ns for p in chunks}
    # 4. the rerun finishes
    finished = run(out, docs)
    assert finished.returncode == 0, describe(finished)
    assert "avme-canvas/main: evaluating" not in finished.stdout  # its chunks were done before the Ctrl-C
    assert {p: p.stat().st_mtime_ns for p in chunks} == done_before
    assert likelihood_figures(docs) == likelihood_figures(smoke["docs"])


# --------------------------------------------------------------------------- the parts
def test_each_model_decays_its_learning_rate_over_the_last_third_of_its_own_cap():
    plan = make_plan(smoke=False, impl="ref")
    assert plan.epochs == {
        "avme-canvas": 150,
        "avme-canvas-conditional": 100,
        "avme-error": 100,
        "avme-error-conditional": 100,
    }
    for name, (hold, decay) in {"avme-canvas": (100, 50), "avme-error": (67, 33)}.items():
        options = " ".join(plan.train_args(name))
        assert f"--lr-schedule cosine --lr-final 0.0 --lr-hold-epochs {hold} --lr-decay-epochs {decay} " in options
        assert "--patience 10 " in options
        assert "--enc-hidden 400 --dec-hidden 400 --latent-dim 100 --steps 12" in options
        assert "--train-subset" not in options
    conditional = plan.train_args("avme-error-conditional")
    assert conditional[conditional.index("--num-classes") + 1] == "10"
    assert conditional[conditional.index("--encoder-input") + 1] == "error"
    assert [p.name for p in plan.passes("avme-canvas-conditional")] == ["main", "marginal"]
    assert [p.samples for p in plan.passes("avme-canvas")] == [5000]
    assert plan.num_chunks == 100
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.slow
def test_a_model_is_trained_only_with_the_plans_options_and_its_weights(smoke):
    layout, plan = Layout(smoke["out"]), make_plan(smoke=True, impl="ref")
    assert trained_summary(layout, plan, "avme-canvas") is not None
    assert trained_summary(layout, make_plan(smoke=True, impl="cuda"), "avme-canvas") is None
    assert trained_summary(layout, Plan(**{**plan.__dict__, "patience": 3}), "avme-canvas") is None


def test_a_run_is_finished_at_its_cap_or_when_its_patience_is_spent():
    plan = make_plan(smoke=False, impl="ref")
    assert (
        stop_reason(plan, "avme-error", {"epoch": 100, "batch": 0, "best_epoch": 100, "best_nelbo": 90.0})
        == "epoch cap"
    )
    spent = {"epoch": 30, "batch": 0, "best_epoch": 20, "best_nelbo": 90.0}
    reason = stop_reason(plan, "avme-canvas", spent)
    assert reason is not None
    assert reason.startswith("patience (10 epochs")
    assert stop_reason(plan, "avme-canvas", {**spent, "epoch": 29}) is None
    assert stop_reason(plan, "avme-canvas", {**spent, "batch": 7}) is None  # mid-epoch: not yet
    assert stop_reason(plan, "avme-canvas", {**spent, "best_epoch": None}) is None  # a checkpoint without best_epoch


def test_run_status_reads_the_validation_records_and_ignores_a_torn_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"kind": "valid", "epoch": e, "nelbo": v, "time": 10.0 * e} for e, v in ((1, 120.0), (2, 110.0), (3, 111.0))
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "valid", "ep')
    status = read_run_status(metrics)
    assert (status.epochs, status.best, status.seconds_per_epoch) == (3, (2, 110.0), 10.0)
    assert read_run_status(tmp_path / "none.jsonl").epochs == 0


def test_time_left_runs_the_models_jobs_at_a_time(tmp_path):
    layout = Layout(tmp_path)
    plan = Plan(epochs={"avme-canvas": 10, "avme-error": 10, "avme-canvas-conditional": 10})
    for name, (done, seconds) in {"avme-canvas": (4, 2.0), "avme-error": (0, None)}.items():
        layout.run_dir(name).mkdir(parents=True)
        if done:
            assert seconds is not None
            lines = [{"kind": "valid", "epoch": e, "nelbo": 100.0, "time": seconds * e} for e in range(1, done + 1)]
            (layout.run_dir(name) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    progress = reproduce_paper.Progress(layout, plan, list(plan.epochs), 2, print, 30.0)
    left, models = progress.training_left()
    # 6 epochs x 2 s; then two runs of 10 epochs at the one measured rate: 12 + 20 on one slot, 20 on the other
    assert left == 32.0
    assert models["avme-canvas"]["epochs"] == 4
    progress.trained = {"avme-canvas"}
    assert progress.training_left()[0] == 20.0
    assert (
        reproduce_paper.Progress(Layout(tmp_path / "new"), plan, ["avme-error"], 1, print, 30.0).training_left()[0]
        is None
    )


def test_chunks_merged_equal_one_evaluation(tmp_path, one_thread):
    from avme_ext import AVME
    from avme_ext.data import load_split
    from avme_ext.evaluation import evaluate, merge_results

    torch.manual_seed(0)
    model = AVME(num_classes=10, enc_hidden=8, dec_hidden=8, latent_dim=3, steps=2)
    split = load_split("binarized_mnist", "valid").subset(25, torch.Generator().manual_seed(1))
    whole = evaluate(model, split, samples=3, batch_size=10, seed=4, marginal=True)
    key = chunk_key(Plan(eval_batch_size=10), EvalPass("marginal", 3, True), "abc")
    parts = []
    for index in range(3):
        path = tmp_path / f"chunk-{index:05d}.safetensors"
        save_chunk(
            path,
            evaluate(model, split, samples=3, batch_size=10, seed=4, marginal=True, shard=(index, 3)),
            {"key": key, "chunk": index},
        )
        assert read_chunk_meta(path) == {"key": key, "chunk": index}
        parts.append(load_chunk(path))
    merged = merge_results(parts)
    for name in whole._PER_IMAGE:
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    assert read_chunk_meta(tmp_path / "missing.safetensors") is None


def test_published_numbers_are_labelled():
    kinds = {p.model: p.kind for p in PUBLISHED}
    assert kinds["AVME (paper's Table 1)"].startswith("reconstruction term")
    assert kinds["NADE"] == "exact NLL"
    assert kinds["DRAW, with attention"].startswith("bound")
