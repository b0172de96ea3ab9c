"""python/reproduce_paper.py on tiny sizes on the CPU: stages, resume, skipping, the manifest, the
limits of what travels back from a GPU call, the test split kept out of training, parallel runs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, subprocess_env

sys.path.insert(0, str(REPO / "python"))

import reproduce_pack as packing
from reproduce_eval import EvalPass, load_chunk, save_chunk
from reproduce_state import Layout, Manifest, Plan
from reproduce_train import (
    CALIBRATION_EPOCHS,
    Launch,
    MetricsTail,
    QueueItem,
    RateModel,
    RunProgress,
    calibrate,
    plan_launch,
    run_pool,
    stop_reason,
    train_command,
)

from avme_ext.results import PUBLISHED, render_results_markdown

SCRIPT = REPO / "python" / "reproduce_paper.py"
TINY_MODEL = ["--", "--train-subset", "300", "--valid-subset", "100", "--enc-hidden", "16", "--dec-hidden", "16",
              "--latent-dim", "4", "--steps", "3"]
TINY_EVAL = ["--samples", "2", "--marginal-samples", "2", "--num-images", "20", "--eval-batch-size", "10"]

# Loaded by every child Python process of these tests: a float16 export stand-in while the package
# has no avme_ext.checkpoint.export_weights, and a log of every split of binarized MNIST loaded.
SITECUSTOMIZE = textwrap.dedent("""
    import os, sys
    import avme_ext.checkpoint as _checkpoint
    if not hasattr(_checkpoint, "export_weights"):
        def export_weights(source, destination, *, dtype=None):
            import torch
            model = _checkpoint.load_model(source).to(dtype or torch.float16)
            return _checkpoint.save_checkpoint(destination, model)
        _checkpoint.export_weights = export_weights
    if os.environ.get("REPRO_SPLIT_LOG"):
        import avme_ext.data.mnist as _data  # where the data sources look the loader up
        _load = _data.load_binarized_mnist
        def _logged(split="train", *args, **kwargs):
            with open(os.environ["REPRO_SPLIT_LOG"], "a") as log:
                log.write(split + " " + " ".join(sys.argv[1:4]) + "\\n")
            return _load(split, *args, **kwargs)
        _data.load_binarized_mnist = _logged
""")


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shim")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def run(*args, shim=None, split_log=None, timeout=600):
    """Run the script; ``shim``: the folder of the sitecustomize above (needed where weights are exported)."""
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(REPO)] if shim else [str(REPO)])
    if split_log is not None:
        env["REPRO_SPLIT_LOG"] = str(split_log)
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout, check=False)
    return result


def describe(result) -> str:
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def splits_loaded(log) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.is_file() else []


# --------------------------------------------------------------------------- the stages, one after another
@pytest.fixture(scope="module")
def staged(shim, tmp_path_factory):
    """One state directory taken through every stage; what each invocation did is kept for the tests."""
    root = tmp_path_factory.mktemp("staged")
    out, docs, log = root / "repro", root / "docs", root / "splits.log"
    done = {}
    done["init"] = run("--out", out, "--init", "--models", "avme-canvas,avme-canvas-conditional", "--epochs", "2",
                       "--epochs", "avme-canvas=3", *TINY_EVAL, *TINY_MODEL)
    done["eval_too_early"] = run("--out", out, "--stage", "eval", "--device", "cpu", shim=shim, split_log=log)
    done["splits_before_training"] = splits_loaded(log)
    done["train"] = run("--out", out, "--stage", "train", "--device", "cpu", "--jobs", "2", shim=shim, split_log=log)
    done["splits_after_training"] = splits_loaded(log)
    done["eval"] = run("--out", out, "--stage", "eval", "--device", "cpu", shim=shim, split_log=log)
    done["splits_after_eval"] = splits_loaded(log)
    chunks = sorted(out.rglob("chunk-*.safetensors"))
    done["chunk_mtimes"] = {p: p.stat().st_mtime_ns for p in chunks}
    # 'all' finds training and evaluation done and makes the figures and the report
    done["all"] = run("--out", out, "--docs", docs, "--stage", "all", "--device", "cpu", "--jobs", "2", shim=shim,
                      split_log=log)
    done["publish"] = run("--out", out, "--docs", docs, "--stage", "publish", "--pretrained-dir", root / "pretrained")
    done["status"] = run("--out", out, "--stage", "status")
    done["next_call"] = run("--out", out, "--stage", "next-call")
    return {"out": out, "docs": docs, "root": root, "runs": done}


def test_test_split_is_untouched_until_the_evaluation_stage(staged):
    runs = staged["runs"]
    assert runs["init"].returncode == 0, describe(runs["init"])
    refused = runs["eval_too_early"]
    assert refused.returncode == 2 and "once every model is trained" in refused.stderr, describe(refused)
    assert runs["splits_before_training"] == []
    assert runs["train"].returncode == 0, describe(runs["train"])
    loaded = runs["splits_after_training"]
    assert "train" in loaded and "valid" in loaded and "test" not in loaded, loaded
    assert runs["eval"].returncode == 0, describe(runs["eval"])
    assert "test" in runs["splits_after_eval"]


def test_two_runs_train_side_by_side_and_finished_runs_are_skipped(staged):
    manifest = json.loads((staged["out"] / "manifest.json").read_text())
    launches = {name: m["launches"] for name, m in manifest["models"].items()}
    assert all(len(v) == 1 for v in launches.values()), launches  # the second 'train' started nothing
    first, second = (v[0] for v in launches.values())
    assert first["concurrent"] == second["concurrent"] == 2
    assert first["started_at"] <= second["ended_at"] and second["started_at"] <= first["ended_at"]
    assert runs_ok(staged, "all") and "training to epoch" not in staged["runs"]["all"].stdout
    for name, entry in manifest["models"].items():
        epochs = 3 if name == "avme-canvas" else 2
        assert entry["status"] == "trained" and entry["epochs_done"] == epochs and entry["stop_reason"] == "epochs"
        assert 1 <= entry["best_epoch"] <= epochs and math.isfinite(entry["best_valid_nelbo"])
        assert not (staged["out"] / name / "train").exists()  # the optimizer state is gone once trained
        weights = staged["out"] / name / "weights.fp16.safetensors"
        assert weights.stat().st_size == entry["weights"]["bytes"]
        with torch.no_grad():
            from safetensors.torch import load_file

            tensors = load_file(weights)
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
        assert (staged["out"] / name / "logs" / "train-call002.log").is_file()


def runs_ok(staged, name) -> bool:
    result = staged["runs"][name]
    assert result.returncode == 0, describe(result)
    return True


def test_evaluation_resumes_per_chunk_and_skips_what_is_done(staged):
    assert runs_ok(staged, "all")
    for path, mtime in staged["runs"]["chunk_mtimes"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was evaluated again"
    assert len(staged["runs"]["chunk_mtimes"]) == 2 + 2 + 2  # 20 images in chunks of 10: main, main, marginal


def test_results_figures_manifest_and_publish(staged):
    for name in ("all", "publish", "status", "next_call"):
        assert runs_ok(staged, name)
    records = json.loads((staged["docs"] / "results.json").read_text())
    assert [r["name"] for r in records] == ["avme-canvas", "avme-canvas-conditional"]
    unconditional, conditional = records
    for record in records:
        assert record["num_images"] == 20 and record["iwae_samples"] == 2 and record["steps"] == 3
        for key in ("test_nelbo", "test_iwae", "test_reconstruction"):
            assert isinstance(record[key], float) and math.isfinite(record[key]) and record[key] > 0, key
        assert record["test_reconstruction"] < record["test_nelbo"]
        assert len(record["test_kl_per_step"]) == 3
        assert record["kinds"]["test_reconstruction"].startswith("reconstruction term")
        assert record["training"]["selection"].startswith("best validation")
    assert "test_nll_marginal" not in unconditional
    assert conditional["test_iwae"] == conditional["test_nll_given_y"]
    assert math.isfinite(conditional["test_nll_marginal"]) and conditional["marginal_samples_per_class"] == 2
    assert json.loads((staged["docs"] / "reproduction-manifest.json").read_text())["format"] == \
        "avme-reproduction-manifest"
    table = (staged["docs"] / "results.md").read_text()
    assert "80.50" in table and "not a likelihood" in table and "2 trajectories per class" in table
    for record in records:
        for figure in ("samples.png", "reconstructions.png", "unrolled.png", "training_curve.png", "kl_per_step.png"):
            assert (staged["docs"] / "figures" / record["name"] / figure).is_file(), figure
    manifest = json.loads((staged["out"] / "manifest.json").read_text())
    assert all(manifest["stages"][s]["done"] for s in ("train", "eval", "figures", "report", "publish"))
    assert "status" not in [c["stage"] for c in manifest["calls"]]  # status and next-call only read
    status = staged["runs"]["status"].stdout
    assert "avme-canvas-conditional" in status and "trained" in status and "2/2 chunks" in status
    calls = manifest["calls"]
    assert [c["number"] for c in calls] == list(range(1, len(calls) + 1))
    assert all(c["device_name"].startswith("cpu") and "commit" in c and c["seconds"] is not None for c in calls)
    refusal = ("refused: the test split is evaluated once every model is trained; "
               "still training: ['avme-canvas', 'avme-canvas-conditional']")
    assert [c["outcome"] for c in calls][:2] == [refusal, "done"]
    published = sorted(p.name for p in (staged["root"] / "pretrained").iterdir() if p.suffix == ".safetensors")
    assert published == ["avme-canvas-conditional.safetensors", "avme-canvas.safetensors"]
    assert "no device work left" in staged["runs"]["next_call"].stdout


# --------------------------------------------------------------------------- device calls and the transport
def test_calls_on_fresh_machines_continue_exactly_from_what_next_call_carries(shim, staged, tmp_path):
    """Three 'device calls', each on a fresh folder holding only what ``--stage next-call`` names, each
    sending its changes back: training carried over once, evaluation split over two calls. The weights
    equal those of one uninterrupted run (the 3 epochs of avme-canvas in ``staged``), and no chunk is
    evaluated twice."""
    local = tmp_path / "local" / "repro"
    assert run("--out", local, "--init", "--models", "avme-canvas", "--epochs", "3", *TINY_EVAL, *TINY_MODEL).returncode == 0
    calls = [(["--epochs-per-call", "2"], 3), (["--chunks-per-call", "1"], 3), ([], 0)]
    carried, packed = [], []
    for number, (extra, expected) in enumerate(calls):
        advice = run("--out", local, "--stage", "next-call")
        call = json.loads(advice.stdout)
        device = tmp_path / f"device{number}" / "repro"
        device.mkdir(parents=True)
        for path in map(Path, call["carry"]):
            target = device / path.relative_to(local)
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if path.is_dir() else shutil.copyfile)(path, target)
        carried.append(sorted(Path(p).relative_to(local).as_posix() for p in call["carry"]))
        returned = tmp_path / f"out{number}"
        # --jobs 2: the same CPU threads per run as in ``staged``, so the arithmetic is the same
        result = run("--out", device, "--stage", "auto", "--device", "cpu", "--jobs", "2", "--expect-calls", number,
                     "--pack-to", returned, *extra, shim=shim)
        assert result.returncode == expected, describe(result)
        files = sorted(p.name for p in returned.iterdir())
        assert len(files) <= packing.MAX_FILES and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
        assert all((returned / f).stat().st_size <= packing.PART_BYTES for f in files)
        packed.append({e["path"] for e in packing.read_index(returned)["files"]})
        unpacked = run("--out", local, "--unpack", returned)
        assert unpacked.returncode == 0, describe(unpacked)
    assert carried[0] == ["manifest.json"]
    best_so_far = {"avme-canvas/train-best.fp16.safetensors"}  # only when the best epoch is not the resume point
    assert set(carried[1]) - best_so_far == {"avme-canvas/train", "manifest.json"}
    assert carried[2] == ["avme-canvas/weights.fp16.safetensors", "manifest.json"]
    chunks = [{p for p in files if "/eval/" in p} for files in packed]
    assert chunks[0] == set() and len(chunks[1]) == 1 and len(chunks[2]) == 1 and not chunks[1] & chunks[2]
    assert run("--out", local, "--stage", "next-call").stdout.count("no device work left") == 1

    again = run("--out", local, "--unpack", tmp_path / "out0")
    assert again.returncode == 2 and "in the order of the calls" in again.stderr
    stale = run("--out", tmp_path / "device0" / "repro", "--stage", "auto", "--device", "cpu",
                "--expect-calls", "0", "--pack-to", tmp_path / "stale")
    assert stale.returncode == 2 and "did not get the latest state" in stale.stderr

    manifest = json.loads((local / "manifest.json").read_text())
    launches = manifest["models"]["avme-canvas"]["launches"]
    assert [(launch["epochs_from"], launch["epochs_to"]) for launch in launches] == [(0, 2), (2, 3)]
    assert manifest["stages"]["eval"]["done"] and not (local / "avme-canvas" / "train").exists()
    from safetensors.torch import load_file

    resumed = load_file(local / "avme-canvas" / "weights.fp16.safetensors")
    straight = load_file(staged["out"] / "avme-canvas" / "weights.fp16.safetensors")
    assert manifest["models"]["avme-canvas"]["best_epoch"] == json.loads(
        (staged["out"] / "manifest.json").read_text())["models"]["avme-canvas"]["best_epoch"]
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_a_device_call_refuses_a_machine_without_the_carried_state(tmp_path):
    result = run("--out", tmp_path / "repro", "--stage", "auto", "--pack-to", tmp_path / "out")
    assert result.returncode == 2 and "does not exist on this machine" in result.stderr
    assert not (tmp_path / "repro").exists()


def test_the_plan_is_fixed_once_made(tmp_path):
    out = tmp_path / "repro"
    assert run("--out", out, "--init", "--models", "avme-canvas", "--epochs", "3").returncode == 0
    assert run("--out", out, "--init", "--models", "avme-canvas", "--epochs", "3").returncode == 0
    changed = run("--out", out, "--init", "--epochs", "4")
    assert changed.returncode == 2 and "epochs" in changed.stderr and "another plan" in changed.stderr
    bad = run("--out", tmp_path / "other", "--init", "--models", "avme-nope")
    assert bad.returncode == 2 and "avme-nope" in bad.stderr


# --------------------------------------------------------------------------- sizes of what travels
def test_full_size_weights_and_resume_state_fit_the_limits(tmp_path, monkeypatch):
    """At the paper's sizes: float16 weights under 16 MB; one unfinished run's resume state (weights and
    Adam state in float32, about 57 MiB) packs into at most 7 files of at most 15 MiB, 60 MiB in all."""
    from avme_ext import AVME
    from avme_ext.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = AVME(num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-2
    optimizer.step()
    root = tmp_path / "repro"
    last = save_checkpoint(root / "avme-canvas-conditional" / "train" / "last.safetensors", model, optimizer=optimizer)
    assert last.stat().st_size > 56 * packing.MiB
    from reproduce_train import export_fp16

    from avme_ext import checkpoint

    if not hasattr(checkpoint, "export_weights"):  # the package predates export_weights: same stand-in as above
        def export_weights(source, destination, *, dtype=None):
            return save_checkpoint(destination, checkpoint.load_model(source).to(dtype))

        monkeypatch.setattr(checkpoint, "export_weights", export_weights, raising=False)
    weights = export_fp16(last, root / "avme-canvas-conditional" / "weights.fp16.safetensors")
    assert weights.stat().st_size < 16_000_000
    rel = "avme-canvas-conditional/train/last.safetensors"
    report = packing.pack(root, [rel], [], tmp_path / "returned", base={})
    files = list((tmp_path / "returned").iterdir())
    assert len(files) <= packing.MAX_FILES and report.packed_bytes <= packing.MAX_BYTES
    assert all(f.stat().st_size <= packing.PART_BYTES < 16 * packing.MiB for f in files)
    assert report.packed_bytes < 0.9 * report.raw_bytes  # docs/reproduction.md: about 86%
    target = tmp_path / "unpacked"
    packing.unpack(tmp_path / "returned", target)
    restored = load_checkpoint(target / rel)
    assert all(torch.equal(restored.model_state[k], v) for k, v in model.state_dict().items())


def test_pack_refuses_what_does_not_fit_and_unpack_refuses_damage(tmp_path):
    root = tmp_path / "repro"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.bin").write_bytes(os.urandom(300_000))
    with pytest.raises(packing.PackTooLarge, match="limit"):
        packing.pack(root, ["a/x.bin"], [], tmp_path / "out", base={}, max_bytes=100_000)
    assert not (tmp_path / "out").exists()
    with pytest.raises(packing.PackTooLarge):
        packing.pack(root, ["a/x.bin"], [], tmp_path / "out", base={}, part_bytes=50_000, max_files=4)
    report = packing.pack(root, ["a/x.bin"], ["a/gone.txt"], tmp_path / "out", base={}, part_bytes=100_000)
    assert len(report.parts) == 4
    (root / "a" / "gone.txt").write_text("old")
    packing.unpack(tmp_path / "out", root)
    assert not (root / "a" / "gone.txt").exists()
    part = report.parts[1]
    data = bytearray(part.read_bytes())
    data[10] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        packing.unpack(tmp_path / "out", tmp_path / "elsewhere")


def test_what_does_not_fit_is_dropped_in_order_and_recorded(tmp_path, monkeypatch):
    """Over the limits: first the best-so-far weights of unfinished runs, then the runs after the first."""
    import reproduce_paper

    layout = Layout(tmp_path / "repro")
    manifest = Manifest.create(layout, Plan(models=("avme-canvas", "avme-error"), epochs={"avme-canvas": 5, "avme-error": 5}))
    before = packing.snapshot(layout.root)
    for name in ("avme-canvas", "avme-error"):
        manifest.model(name)["status"] = "training"
        layout.run_dir(name).mkdir(parents=True)
        (layout.run_dir(name) / "last.safetensors").write_bytes(os.urandom(2_000_000))
    layout.best_so_far("avme-canvas").write_bytes(os.urandom(1_000_000))
    manifest.model("avme-canvas")["best_so_far"] = {"epoch": 3, "valid_nelbo": 99.0, "at_resume_point": False}
    manifest.save()
    monkeypatch.setattr(packing, "MAX_BYTES", 3_500_000)
    reproduce_paper.pack_changes(layout, manifest, before, tmp_path / "out", {"calls": 0})
    first, second = manifest.model("avme-canvas"), manifest.model("avme-error")
    assert first["status"] == "training" and first["best_so_far"]["lost"] and not layout.best_so_far("avme-canvas").exists()
    assert second["status"] == "pending" and second["reset_for_transport"] == 1 and not layout.run_dir("avme-error").exists()
    index = packing.read_index(tmp_path / "out")
    assert {e["path"] for e in index["files"]} == {"manifest.json", "avme-canvas/train/last.safetensors"}
    assert index["packed_bytes"] <= 3_500_000


def test_changes_list_new_changed_and_removed_files_but_not_the_best_checkpoint(tmp_path):
    root = tmp_path / "repro"
    (root / "m" / "train").mkdir(parents=True)
    (root / "keep.txt").write_text("same")
    (root / "edit.txt").write_text("before")
    (root / "gone.txt").write_text("x")
    before = packing.snapshot(root)
    time.sleep(0.01)
    (root / "edit.txt").write_text("after!")
    (root / "gone.txt").unlink()
    (root / "m" / "train" / "last.safetensors").write_bytes(b"1")
    (root / "m" / "train" / "best.safetensors").write_bytes(b"2")
    changed, removed = packing.changes(root, before)
    assert changed == ["edit.txt", "m/train/last.safetensors"] and removed == ["gone.txt"]


# --------------------------------------------------------------------------- the plan of a call
def test_plan_launch_starts_only_runs_that_finish_or_one_that_carries_over():
    rates = RateModel({"1": 3.0, "4": 10.0}, startup=20.0)
    queue = [QueueItem("a", 0, 100), QueueItem("b", 0, 100), QueueItem("c", 0, 100), QueueItem("d", 0, 100)]
    # 4 side by side: 20 + 100 * 10 * 1.15 = 1170 s; 2: 10 s per epoch assumed (no measurement) -> 1170 s; 1: 365 s
    chosen = plan_launch(queue, 4, 400.0, rates, allow_carry_over=True)
    assert chosen.targets == {"a": 100} and chosen.finishing
    chosen = plan_launch(queue, 4, 1200.0, rates, allow_carry_over=True)
    assert chosen.targets == {q.name: 100 for q in queue} and chosen.finishing
    carry = plan_launch(queue, 4, 200.0, rates, allow_carry_over=True)
    assert carry.targets == {"a": math.floor((200 - 20) / (3.0 * 1.15))} and not carry.finishing
    assert plan_launch(queue, 4, 200.0, rates, allow_carry_over=False) is None
    assert plan_launch(queue, 4, 21.0, rates, allow_carry_over=True) is None
    assert plan_launch(queue, 2, math.inf, rates, allow_carry_over=False).targets == {q.name: 100 for q in queue}
    manual = plan_launch([QueueItem("a", 5, 100), QueueItem("b", 0, 3)], 2, 10.0, rates, allow_carry_over=False,
                         epochs_per_call=4)
    assert manual.targets == {"a": 9, "b": 3} and not manual.finishing


def test_rate_model_is_conservative_where_nothing_was_measured():
    rates = RateModel({"2": 6.0})
    assert rates.seconds_per_epoch(2) == 6.0
    assert rates.seconds_per_epoch(1) == 6.0  # fewer runs: assumed no faster per run
    assert rates.seconds_per_epoch(4) == 12.0  # more runs: assumed no faster in total
    default = RateModel()
    assert not default.measured and default.seconds_per_epoch(4) == 17.1 and default.seconds_per_epoch(1) == 17.1


def test_stopping_rule_uses_the_validation_curve():
    curve = RunProgress(epochs_done=15, valid={e: 100.0 - e for e in range(1, 6)} | {e: 96.0 for e in range(6, 16)})
    assert curve.best == (5, 95.0) and curve.epochs_since_best() == 10
    assert stop_reason(curve, 100, 10) == "patience" and stop_reason(curve, 100, 11) is None
    assert stop_reason(curve, 15, 50) == "epochs"
    nan_first = RunProgress(epochs_done=2, valid={1: math.nan, 2: 120.0})
    assert nan_first.best == (2, 120.0)
    assert RunProgress().best is None and stop_reason(RunProgress(), 5, 1) is None


def test_the_time_budget_stops_a_run_with_sigterm(tmp_path):
    started = {}

    def start(launch):
        launch.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        launch.tail = MetricsTail(tmp_path / "none.jsonl", 0)
        launch.started = started["t"] = time.monotonic()

    launch = Launch("a", 5, 0, RunProgress())
    done = run_pool([launch], 1, time.monotonic() + 1.0, 10, start, lambda message: None)
    assert done == [launch] and launch.stopped == "budget" and launch.returncode != 0
    assert launch.ended - started["t"] < 30


def test_calibration_measures_one_and_several_runs_side_by_side(tmp_path, monkeypatch):
    """The throw-away runs a GPU call starts with (on 1/10 of the data), here on the CPU with a tiny model."""
    import reproduce_train

    monkeypatch.setattr(reproduce_train, "CALIBRATION_TRAIN_IMAGES", 1000)  # 10 steps per epoch, scaled by 50
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    layout = Layout(tmp_path / "repro")
    tiny = ("--enc-hidden", "8", "--dec-hidden", "8", "--latent-dim", "2", "--steps", "2")
    manifest = Manifest.create(layout, Plan(models=("avme-canvas",), epochs={"avme-canvas": 5}, train_extra=tiny))
    messages = []
    calibrate(manifest, device="cpu", device_name="test-device", jobs=2, deadline=math.inf, log=messages.append)
    rates = Manifest.load(layout).rates("test-device")
    assert set(rates["train_epoch"]) == {"1", "2"}, messages
    assert all(math.isfinite(v) and v > 0 for v in rates["train_epoch"].values())
    assert rates["train_startup"] is not None and rates["train_startup"] >= 0 and "calibrated_at" in rates
    assert not list(layout.root.glob("avme-canvas*")) and CALIBRATION_EPOCHS == 3  # nothing kept of the runs


def test_metrics_tail_reads_only_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "valid", "epoch": 1}\n{"kind": "va')
    tail = MetricsTail(path, 0)
    assert tail.read() == [{"kind": "valid", "epoch": 1}]
    with open(path, "a") as handle:
        handle.write('lid", "epoch": 2}\n')
    assert tail.read() == [{"kind": "valid", "epoch": 2}] and tail.read() == []


# --------------------------------------------------------------------------- evaluation in chunks
def test_chunks_merged_equal_one_evaluation(tmp_path, one_thread):
    from avme_ext import AVME
    from avme_ext.data import load_split
    from avme_ext.evaluation import evaluate, merge_results

    torch.manual_seed(0)
    model = AVME(num_classes=10, enc_hidden=8, dec_hidden=8, latent_dim=3, steps=2)
    split = load_split("binarized_mnist", "valid").subset(25, torch.Generator().manual_seed(1))
    whole = evaluate(model, split, samples=3, batch_size=10, seed=4, marginal=True)
    parts = []
    for index in range(3):
        part = evaluate(model, split, samples=3, batch_size=10, seed=4, marginal=True, shard=(index, 3))
        path = tmp_path / f"chunk-{index:05d}.safetensors"
        save_chunk(path, part, {"chunk": index})
        loaded, meta = load_chunk(path)
        assert meta["chunk"] == index and meta["samples"] == 3
        parts.append(loaded)
    merged = merge_results(parts)
    for name in whole._PER_IMAGE:
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    assert EvalPass("marginal", 3, True).trajectories(10, 10) == 300


def test_plan_and_manifest_roundtrip(tmp_path):
    layout = Layout(tmp_path / "repro")
    plan = Plan(models=("avme-error", "avme-canvas"), epochs={"avme-error": 7, "avme-canvas": 9}, train_extra=("--x",))
    manifest = Manifest.create(layout, plan)
    again = Manifest.load(layout)
    assert again.plan == plan and again.untrained() == ["avme-error", "avme-canvas"]
    with pytest.raises(ValueError, match="epochs of avme-canvas"):
        Plan(models=("avme-canvas",), epochs={"avme-canvas": 0})
    assert manifest.data["models"]["avme-canvas"]["epochs_target"] == 9


def test_each_model_decays_its_learning_rate_over_the_end_of_its_own_epoch_cap(tmp_path):
    plan = Plan(models=("avme-error", "avme-canvas"), epochs={"avme-error": 7, "avme-canvas": 150}, lr_final=1e-5)
    for name, (hold, decay) in {"avme-error": (5, 2), "avme-canvas": (100, 50)}.items():
        command = train_command(name, tmp_path / name, plan, target=2, device="cpu")
        options = " ".join(command[command.index("train") + 1:])
        assert "--epochs 2 " in options  # this launch's target; the schedule spans the whole cap
        assert f"--lr-schedule cosine --lr-final 1e-05 --lr-decay-epochs {decay} --lr-hold-epochs {hold} " in options
    constant = train_command("avme-canvas", tmp_path, Plan(lr_schedule="constant"), target=2, device="cpu")
    assert "--lr-final" not in constant and constant[constant.index("--lr-schedule") + 1] == "constant"
    # a manifest written before the schedule was part of the plan keeps its constant rate
    old = {k: v for k, v in Plan().to_dict().items() if k not in ("lr_schedule", "lr_final")}
    assert Plan.from_dict(old).lr_schedule == "constant"
    with pytest.raises(ValueError, match="lr_final must be in"):
        Plan(lr_final=1.0)
    with pytest.raises(ValueError, match="lr_decay_fraction must be in"):
        Plan(lr_decay_fraction=0.0)


def test_published_numbers_are_labelled():
    kinds = {p.model: p.kind for p in PUBLISHED}
    assert kinds["AVME (paper's Table 1)"].startswith("reconstruction term")
    assert kinds["NADE"] == "exact NLL" and kinds["DRAW, with attention"].startswith("bound")
    text = render_results_markdown([])
    assert all(f"{p.nats:.2f}" in text for p in PUBLISHED)
