"""End-to-end tests of ``avme sample | eval | plot`` on tiny checkpoints: files, geometry, JSON, errors."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image

from avme_ext.checkpoint import save_checkpoint
from avme_ext.cli import main
from avme_ext.model import AVME
from helpers import ModelArgs, run_in_repo, subprocess_env

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SIZES: ModelArgs = {"enc_hidden": 16, "dec_hidden": 16, "latent_dim": 4, "steps": 3, "impl": "ref"}
K = SIZES["steps"]
PAD = 2


def grid_pixels(rows: int, cols: int, scale: int) -> tuple[int, int]:
    """PIL (width, height) of a grid of rows x cols 28x28 tiles with 2-pixel padding, scaled."""
    return scale * (cols * (28 + PAD) + PAD), scale * (rows * (28 + PAD) + PAD)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    uncond = save_checkpoint(root / "uncond.safetensors", AVME(**SIZES))
    run_dir = root / "cond_run"
    cond = save_checkpoint(run_dir / "best.safetensors", AVME(num_classes=10, **SIZES))
    return {"uncond": uncond, "cond_file": cond, "cond_run": run_dir}


def _png(path: Path) -> Image.Image:
    assert path.is_file(), path
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    return image


def _run(argv: Sequence[object], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- sample
@pytest.mark.parametrize(("device", "message"), [("tpu", "is not a device"), ("cuda:7", "CUDA")])
def test_bad_device_is_a_clear_error(checkpoints, tmp_path, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, _, err = _run(["sample", checkpoints["uncond"], "--out", tmp_path / "s.png", "--device", device], capsys)
    assert code == 2
    assert f"--device '{device}'" in err
    assert message in err
    assert not (tmp_path / "s.png").exists()


def test_sample_plain_grid(checkpoints, tmp_path, capsys):
    out = tmp_path / "samples.png"
    code, stdout, _ = _run(
        ["sample", checkpoints["uncond"], "--num", 12, "--nrow", 4, "--out", out, "--device", "cpu"], capsys
    )
    assert code == 0
    assert str(out) in stdout
    image = _png(out)
    assert image.size == grid_pixels(3, 4, scale=2)  # 12 samples, 4 per row, default --scale 2
    # Padding is visible: the top-left corner is the gray separator, not a digit pixel.
    assert image.convert("L").getpixel((0, 0)) in range(120, 136)


def test_sample_default_is_square_and_scale(checkpoints, tmp_path, capsys):
    out = tmp_path / "s.png"
    code, _, _ = _run(["sample", checkpoints["uncond"], "--out", out, "--scale", 1, "--seed", 3], capsys)
    assert code == 0
    assert _png(out).size == grid_pixels(8, 8, scale=1)  # 64 samples


def test_sample_is_deterministic_given_seed(checkpoints, tmp_path, capsys):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (1, 1, 2), strict=True):
        assert _run(["sample", checkpoints["uncond"], "--num", 4, "--out", path, "--seed", seed], capsys)[0] == 0
    a, b, c = (path.read_bytes() for path in paths)
    assert a == b
    assert a != c


def test_sample_unroll(checkpoints, tmp_path, capsys):
    out = tmp_path / "steps.png"
    code, stdout, _ = _run(
        ["sample", checkpoints["uncond"], "--unroll", "--num", 5, "--out", out, "--scale", 3], capsys
    )
    assert code == 0
    assert str(out) in stdout
    assert _png(out).size == grid_pixels(5, K, scale=3)  # one strip of K steps per row


def test_sample_conditional_per_class(checkpoints, tmp_path, capsys):
    out = tmp_path / "classes.png"
    code, _, _ = _run(["sample", checkpoints["cond_run"], "--per-class", 3, "--out", out], capsys)
    assert code == 0
    assert _png(out).size == grid_pixels(10, 3, scale=2)  # one row per class
    unrolled = tmp_path / "classes_steps.png"
    code, _, _ = _run(["sample", checkpoints["cond_file"], "--unroll", "--out", unrolled], capsys)
    assert code == 0
    assert _png(unrolled).size == grid_pixels(10, K, scale=2)  # default 1 strip per class


def test_sample_reconstruct(checkpoints, tmp_path, capsys):
    out = tmp_path / "g.png"
    code, stdout, _ = _run(["sample", checkpoints["uncond"], "--num", 4, "--out", out, "--reconstruct", 10], capsys)
    recon = tmp_path / "g_recon.png"
    assert code == 0
    assert str(recon) in stdout
    assert _png(recon).size == grid_pixels(4, 8, scale=2)  # 10 images: 2 pairs of rows of 8


def test_sample_option_errors(checkpoints, tmp_path, capsys):
    code, _, err = _run(["sample", checkpoints["cond_file"], "--num", 4, "--out", tmp_path / "x.png"], capsys)
    assert code != 0
    assert "--per-class" in err
    code, _, err = _run(["sample", checkpoints["uncond"], "--per-class", 4, "--out", tmp_path / "x.png"], capsys)
    assert code != 0
    assert "conditional" in err
    code, _, err = _run(["sample", checkpoints["uncond"], "--out", tmp_path / "x.jpg"], capsys)
    assert code != 0
    assert ".png" in err


# --------------------------------------------------------------------------- eval
@pytest.mark.parametrize("which", ["uncond", "cond_run"])
def test_eval_json(checkpoints, tmp_path, capsys, which):
    out = tmp_path / "eval.json"
    argv = ["eval", checkpoints[which], "--samples", 4, "--num-images", 20, "--batch-size", 8, "--json", out]
    code, stdout, _ = _run(argv, capsys)
    assert code == 0
    assert "negative ELBO" in stdout
    assert "reconstruction term -log p(x|z) (not a likelihood)" in stdout
    assert "IWAE bound" in stdout
    assert "S=4" in stdout
    document = json.loads(out.read_text())
    summary, provenance = document["summary"], document["provenance"]
    keys = {"num_images", "nelbo", "reconstruction", "kl", "kl_per_step", "iwae_nll", "iwae_samples"}
    if which == "cond_run":
        keys |= {"nll_given_y", "nll_marginal"}
        assert "-log p(x), all 10 classes" in stdout
    assert keys <= set(summary)
    for key in keys - {"kl_per_step"}:
        assert isinstance(summary[key], (int, float)), key
        assert math.isfinite(summary[key]), key
    assert len(summary["kl_per_step"]) == K
    assert all(math.isfinite(v) for v in summary["kl_per_step"])
    assert summary["num_images"] == 20
    assert summary["iwae_samples"] == 4
    assert math.isclose(summary["nelbo"], summary["reconstruction"] + summary["kl"], rel_tol=1e-9)
    for key in (
        "checkpoint",
        "split",
        "num_images",
        "samples",
        "seed",
        "device",
        "torch_version",
        "wall_clock_seconds",
    ):
        assert key in provenance, key
    assert provenance["split"] == "test"
    assert provenance["samples"] == 4
    assert provenance["device"] == "cpu"
    assert provenance["torch_version"] == torch.__version__
    assert provenance["wall_clock_seconds"] > 0


def test_eval_is_deterministic_given_seed(checkpoints, tmp_path, capsys):
    results = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.json"
        argv = ["eval", checkpoints["uncond"], "--num-images", 10, "--split", "valid", "--seed", seed, "--json", out]
        assert _run([*argv, "--no-progress"], capsys)[0] == 0
        results.append(json.loads(out.read_text())["summary"])
    assert results[0] == results[1]
    assert results[0]["nelbo"] != results[2]["nelbo"]
    assert "iwae_nll" not in results[0]  # --samples 0: ELBO only


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    for command in (["eval", missing], ["sample", missing, "--out", tmp_path / "s.png"]):
        code, _, err = _run(command, capsys)
        assert code != 0
        assert str(missing) in err
        assert "does not exist" in err
    code, _, err = _run(["eval", tmp_path], capsys)  # a directory without checkpoints
    assert code != 0
    assert "best.safetensors" in err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, err = _run(["eval", bad], capsys)
    assert code != 0
    assert str(bad) in err


# --------------------------------------------------------------------------- plot
def _write_metrics(path: Path, epochs: int = 3, steps_per_epoch: int = 10) -> None:
    lines = []
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            loss = 90 + 200 / step
            lines.append(
                {
                    "kind": "train",
                    "epoch": epoch,
                    "step": step,
                    "loss": loss,
                    "reconstruction": loss - 20,
                    "kl": 20.0,
                    "kl_weight": 1.0,
                    "lr": 1e-3,
                    "examples_per_s": 1000.0,
                    "time": step * 0.1,
                }
            )
        nelbo = 100 + 30 / epoch
        lines.append(
            {
                "kind": "valid",
                "epoch": epoch,
                "step": step,
                "nelbo": nelbo,
                "reconstruction": nelbo - 20,
                "kl": 20.0,
                "kl_per_step": [8.0, 5.0, 4.0, 3.0][:K] + [0.0] * max(0, K - 4),
                "best": True,
                "time": step * 0.1,
            }
        )
        lines.append(
            {"kind": "epoch", "epoch": epoch, "step": step, "seconds": 1.0, "train_loss": 95.0, "examples": 1000}
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_plot_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _write_metrics(run_dir / "metrics.jsonl")
    code, stdout, _ = _run(["plot", run_dir], capsys)
    assert code == 0
    for name in ("training_curve.png", "kl_per_step.png"):
        path = run_dir / name
        assert str(path) in stdout
        image = _png(path)
        assert image.size[0] > 300
        assert image.size[1] > 200


def test_plot_metrics_file_to_out_dir(tmp_path, capsys):
    metrics = tmp_path / "m" / "metrics.jsonl"
    _write_metrics(metrics)
    out_dir = tmp_path / "figures"
    code, _, _ = _run(["plot", metrics, "--out-dir", out_dir, "--which", "last"], capsys)
    assert code == 0
    assert (out_dir / "training_curve.png").is_file()
    assert (out_dir / "kl_per_step.png").is_file()


def test_plot_bad_metrics_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n\n{"kind": "valid", "epoch": 1, "st\n')
    code, _, err = _run(["plot", bad], capsys)
    assert code != 0
    assert f"{bad}:3" in err
    assert "JSON" in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"kind": "train", "step": 1, "loss": "high"}\n')
    code, _, err = _run(["plot", wrong], capsys)
    assert code != 0
    assert f"{wrong}:1" in err
    assert "loss" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = _run(["plot", empty], capsys)
    assert code != 0
    assert "empty" in err
    code, _, err = _run(["plot", tmp_path / "missing"], capsys)
    assert code != 0
    assert "does not exist" in err
    code, _, err = _run(["plot", tmp_path], capsys)  # a directory without metrics.jsonl
    assert code != 0
    assert "metrics.jsonl" in err


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("sample", ["--num", "--out", "--unroll", "--per-class", "--seed", "--device", "--scale", "--reconstruct"]),
        (
            "eval",
            [
                "--split",
                "--samples",
                "--num-images",
                "--batch-size",
                "--max-rows",
                "--json",
                "--seed",
                "--device",
                "--dataset",
                "--data-root",
                "5000",
            ],
        ),
        ("plot", ["RUN_DIR_OR_METRICS", "--out-dir", "training_curve.png", "kl_per_step.png"]),
    ],
)
def test_help(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text
    for option in options:
        assert option in text, option


def test_module_entry_point_exit_codes(tmp_path):
    """``python -m avme_ext`` returns a non-zero exit status (not a traceback) for a bad input."""
    result = run_in_repo([sys.executable, "-m", "avme_ext", "plot", str(tmp_path / "missing.jsonl")], timeout=120)
    assert result.returncode != 0
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_under_torchrun_matches_single_process(checkpoints, tmp_path):
    """Two CPU ranks (gloo) evaluate their chunks and rank 0 reports the merged result, which equals
    a single-process run bit for bit (same thread count: torchrun sets OMP_NUM_THREADS=1)."""
    env = subprocess_env()
    common = [
        "eval",
        str(checkpoints["cond_run"]),
        "--samples",
        "2",
        "--num-images",
        "20",
        "--batch-size",
        "6",
        "--device",
        "cpu",
        "--no-progress",
        "--json",
    ]
    single = run_in_repo(
        [sys.executable, "-m", "avme_ext", *common, str(tmp_path / "single.json")], env=env, timeout=300
    )
    assert single.returncode == 0, single.stderr
    multi = run_in_repo(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "avme_ext",
            *common,
            str(tmp_path / "multi.json"),
        ],
        env=env,
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout.count("negative ELBO") == 1  # only rank 0 prints
    a = json.loads((tmp_path / "single.json").read_text())
    b = json.loads((tmp_path / "multi.json").read_text())
    assert b["provenance"]["world_size"] == 2
    assert a["provenance"]["world_size"] == 1
    assert a["summary"] == b["summary"]


# --------------------------------------------------------------------------- cost estimate and plots
def test_eval_says_what_it_will_cost_before_starting(checkpoints, capsys, monkeypatch):
    code, _, err = _run(["eval", checkpoints["uncond"], "--samples", 3, "--num-images", 12, "--no-progress"], capsys)
    lines = err.splitlines()
    assert code == 0
    assert len(lines) == 1
    assert lines[0].startswith("avme eval: IWAE S=3 on 12 images: about ")
    assert "this CPU" in lines[0]
    assert "--num-images" not in lines[0]  # a quick evaluation needs no advice

    import avme_ext.evaluation as E

    day = E.CostEstimate(trajectories=10, seconds=26 * 3600.0, trajectories_per_second=1.0, pilot_seconds=0.1)
    monkeypatch.setattr(E, "estimate_cost", lambda *args, **kwargs: day)
    code, _, err = _run(["eval", checkpoints["cond_run"], "--samples", 3, "--num-images", 4, "--no-progress"], capsys)
    assert code == 0
    assert "IWAE S=3 x 10 classes on 4 images: about 26.0 h on this CPU" in err
    assert "use --num-images N or a GPU" in err


def _sparse_metrics(path: Path, log_every: int = 5, steps: int = 50) -> list[dict[str, Any]]:
    records = []
    for step in range(log_every, steps + 1, log_every):
        records.append({"kind": "train", "epoch": 1 + (step - 1) // 25, "step": step, "loss": 90 + 1050 / step})
        if step % 25 == 0:
            records.append(
                {
                    "kind": "valid",
                    "epoch": step // 25,
                    "step": step,
                    "nelbo": 100 + 50 / step,
                    "kl_per_step": [1.0, 2.0, 3.0],
                    "best": True,
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return records


def _legend_labels(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None, "the axes have no legend"
    return [text.get_text() for text in legend.get_texts()]


def test_training_curve_shows_its_first_point_and_what_points_average(tmp_path):
    from avme_ext.plotting import read_metrics, training_curve_figure

    records = _sparse_metrics(tmp_path / "metrics.jsonl")
    figure = training_curve_figure(read_metrics(tmp_path / "metrics.jsonl"))
    ax = figure.axes[0]
    low, high = ax.get_ylim()
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert high >= losses[0] == max(losses)
    assert low <= min(losses)
    assert ax.get_xlim()[0] <= 5
    labels = _legend_labels(ax)
    assert any("mean over the 5 steps before each point" in label for label in labels), labels
    assert any("validation" in label and "mean over the validation images" in label for label in labels), labels


def test_training_curve_draws_a_changing_learning_rate_on_its_own_axis(tmp_path):
    from avme_ext.plotting import training_curve_figure

    records = _sparse_metrics(tmp_path / "metrics.jsonl")
    constant = training_curve_figure([{**r, "lr": 1e-3} if r["kind"] == "train" else r for r in records])
    assert not any(ax.get_ylabel() == "learning rate" for ax in constant.axes)  # a constant rate adds nothing
    decaying = [{**r, "lr": 1e-3 * (1 - r["step"] / 50)} if r["kind"] == "train" else r for r in records]
    figure = training_curve_figure(decaying)
    (rate_axis,) = [ax for ax in figure.axes if ax.get_ylabel() == "learning rate"]
    (line,) = rate_axis.lines
    expected = [r["lr"] for r in decaying if r["kind"] == "train"]
    assert np.asarray(line.get_ydata()).tolist() == pytest.approx(expected)
    assert rate_axis.get_ylim()[0] == 0.0
    labels = _legend_labels(rate_axis)
    assert "learning rate (right axis)" in labels
    assert any("validation" in label for label in labels)


def test_training_curve_of_a_single_record_is_visible(tmp_path):
    from avme_ext.plotting import training_curve_figure

    figure = training_curve_figure([{"kind": "train", "epoch": 1, "step": 50, "loss": 240.0}])
    (line,) = figure.axes[0].lines
    assert line.get_marker() not in (None, "None", "")
    assert np.asarray(line.get_xdata()).tolist() == [50.0]
    low, high = figure.axes[0].get_ylim()
    assert low < 240.0 < high


def test_plot_failure_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1, "step": 3}\n')  # nothing to plot
    code, _, err = _run(["plot", run], capsys)
    assert code == 2
    assert err.startswith("avme plot: error: ")
    assert "no 'train' or 'valid'" in err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
