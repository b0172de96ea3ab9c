"""The data options through a run: ``avme train`` records them (and the split), ``avme eval`` and
``avme sample`` read them back; runs written before these options existed still load, evaluate and sample."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from avme_ext.checkpoint import load_model, read_training_options
from avme_ext.cli import main
from avme_ext.data import DataSpec, load_run_split
from helpers import SHARED_DATA, load_script, model_args

SMALL = [*model_args(8, 2, 2), "--no-progress", "--batch-size", "16", "--no-tensorboard"]
TINY = [*SMALL, "--epochs", "1"]


def write_pictures(root: Path, classes: int = 3, per_class: int = 20, size: int = 9, mode: str = "L") -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run trained on an image folder without splits (held out by seed), and the folder."""
    base = tmp_path_factory.mktemp("folder")
    pictures = write_pictures(base / "pictures")
    run = base / "run"
    assert (
        main(
            [
                "train",
                "--out",
                str(run),
                "--dataset",
                "imagefolder",
                "--data-root",
                str(pictures),
                "--split-seed",
                "7",
                "--binarize",
                "static",
                *TINY,
            ]
        )
        == 0
    )
    return run, pictures


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_the_run_records_its_data(folder_run):
    run, _ = folder_run
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["dataset"] == "imagefolder"
    assert config["train"]["split_seed"] == 7
    data = config["data"]
    assert data["pixels"] == "binary"
    assert data["image_shape"] == [1, 9, 9]
    assert data["num_classes"] == 3
    assert {k: v["size"] for k, v in data["splits"].items()} == {"train": 48, "valid": 6, "test": 6}
    assert "manual_seed(7)" in data["splits"]["test"]["rule"]
    assert data["fingerprint"].startswith("sha256:")
    assert config["model"]["data_dim"] == 81
    assert config["model"]["image_shape"] == [1, 9, 9]
    saved, record = read_training_options(run)
    assert saved is not None
    assert saved["dataset"] == "imagefolder"
    assert record == data


def test_eval_finds_the_runs_test_images(folder_run, tmp_path):
    run, pictures = folder_run
    model = load_model(run)
    images = load_run_split(run, "test", {}, model.config)
    spec = DataSpec("imagefolder", str(pictures), seed=0, binarize="static", split_seed=7, likelihood="bernoulli")
    assert images.images.equal(spec.open().split("test").images)
    assert main(["eval", str(run), "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["summary"]["num_images"] == 6
    assert result["provenance"]["dataset"] == "imagefolder"


def _draws_any_shape() -> bool:
    """Whether :mod:`avme_ext.images` draws images of any (C, H, W) (not only 28 x 28)."""
    from avme_ext import images

    grid = getattr(images, "make_image_grid", None)
    return grid is not None and "image_shape" in inspect.signature(grid).parameters


@pytest.mark.skipif(not _draws_any_shape(), reason="avme_ext.images draws 28x28 images only in this version")
def test_sample_reconstructs_the_runs_test_images(folder_run, tmp_path):
    run, _ = folder_run
    assert main(["sample", str(run), "--num", "4", "--reconstruct", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s_recon.png").is_file()


def test_eval_refuses_a_changed_folder(folder_run, tmp_path, capsys):
    run, pictures = folder_run
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in pictures.rglob("*.png"):
        (changed / path.parent.name).mkdir(exist_ok=True)
        (changed / path.parent.name / path.name).write_bytes(path.read_bytes())
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(changed / "class0" / "extra.png")
    assert main(["eval", str(run), "--data-root", str(changed), "--no-progress"]) == 2
    error = last_line(capsys.readouterr().err)
    assert error.startswith("avme eval: error: cannot load the test images:")
    assert "differs from the data the run was trained on: the files changed" in error


def test_eval_refuses_images_of_another_shape(folder_run, capsys):
    run, _ = folder_run
    assert main(["eval", str(run), "--image-size", "8", "--no-progress"]) == 2
    assert "image shape (1, 8, 8) vs (1, 9, 9)" in last_line(capsys.readouterr().err)


def test_conditional_takes_the_data_sets_classes(tmp_path):
    pictures = write_pictures(tmp_path / "p", classes=2, per_class=10)
    assert (
        main(
            [
                "train",
                "--out",
                str(tmp_path / "r"),
                "--dataset",
                "imagefolder",
                "--data-root",
                str(pictures),
                "--conditional",
                *TINY,
            ]
        )
        == 0
    )
    assert load_model(tmp_path / "r").num_classes == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--likelihood", "bernoulli"], "has colour images; the Bernoulli likelihood takes 0/1 pixels"),
        (["--binarize", "static"], "--likelihood logistic, or --channels 1"),
    ],
)
def test_colour_images_with_bernoulli_are_refused(tmp_path, capsys, extra, message):
    pictures = write_pictures(tmp_path / "p", classes=1, per_class=10, mode="RGB")
    out = tmp_path / "r"
    assert (
        main(["train", "--out", str(out), "--dataset", "imagefolder", "--data-root", str(pictures), *TINY, *extra]) == 2
    )
    assert message in last_line(capsys.readouterr().err)
    assert not out.exists()


def test_missing_files_one_line_on_the_command_line(tmp_path, capsys):
    assert (
        main(["train", "--out", str(tmp_path / "r"), "--dataset", "fashion_mnist", "--data-root", str(tmp_path), *TINY])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pass --download to fetch them, or --data-root DIR" in err
    assert str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in err


def test_dynamic_binarization_of_a_folder_resumes_exactly(tmp_path):
    pictures = write_pictures(tmp_path / "p", classes=1, per_class=40)
    args = ["--dataset", "imagefolder", "--data-root", str(pictures), *SMALL]
    assert main(["train", "--out", str(tmp_path / "full"), *args, "--epochs", "2"]) == 0
    assert main(["train", "--out", str(tmp_path / "part"), *args, "--epochs", "1"]) == 0
    assert main(["train", "--out", str(tmp_path / "part"), "--resume", "--epochs", "2", "--no-progress"]) == 0
    full, part = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "part" / "last.safetensors")
    assert all(torch.equal(full[k], part[k]) for k in full if k.startswith("model."))
    assert json.loads((tmp_path / "full" / "config.json").read_text())["data"]["pixels"] == "dynamic"


# --------------------------------------------------------------------------- the logistic likelihood
def _has_logistic() -> bool:
    from avme_ext.model import AVME

    try:
        AVME(
            data_dim=4, enc_hidden=2, dec_hidden=2, latent_dim=1, steps=1, likelihood="logistic", image_shape=(1, 2, 2)
        )
    except NotImplementedError:
        return False
    return True


needs_logistic = pytest.mark.skipif(not _has_logistic(), reason="no logistic likelihood in this version")


@needs_logistic
def test_colour_shapes_train_evaluate_sample_and_draw_a_gif(tmp_path, capsys):
    """The README's colour example at a tiny size: python/make_shapes.py, then one command each to train
    with the logistic likelihood, evaluate in bits per dimension, and sample grids, strips and a GIF."""
    shapes = tmp_path / "shapes"
    load_script("make_shapes").write_shapes(shapes, num=30, size=12, seed=0)
    run = tmp_path / "r"
    assert (
        main(
            [
                "train",
                "--out",
                str(run),
                "--dataset",
                "imagefolder",
                "--data-root",
                str(shapes),
                "--image-size",
                "6",
                "--likelihood",
                "logistic",
                *TINY,
            ]
        )
        == 0
    )
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["pixels"] == "levels"
    assert config["model"]["image_shape"] == [3, 6, 6]
    assert config["data"]["num_classes"] == 3
    valid = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "valid"]
    assert valid[0]["likelihood"] == "logistic"
    assert valid[0]["nelbo_bits_per_dim"] == pytest.approx(valid[0]["nelbo"] / (108 * math.log(2)))
    capsys.readouterr()
    assert main(["eval", str(run), "--samples", "2", "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert summary["num_images"] == 3
    assert summary["likelihood"] == "logistic"
    assert summary["iwae_nll_bits_per_dim"] == pytest.approx(summary["iwae_nll"] / (108 * math.log(2)))
    if not _draws_any_shape():
        return
    grid, gif = tmp_path / "s.png", tmp_path / "steps.gif"
    assert main(["sample", str(run), "--num", "4", "--reconstruct", "2", "--out", str(grid), "--gif", str(gif)]) == 0
    assert main(["sample", str(run), "--unroll", "--num", "2", "--out", str(tmp_path / "u.png")]) == 0
    for path in (grid, tmp_path / "s_recon.png", tmp_path / "u.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB", path
            assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 2, path
    with Image.open(gif) as animation:
        assert animation.format == "GIF"
        assert animation.n_frames == 2


@needs_logistic
@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="no ../shared/data/mnist")
def test_mnist_grey_levels_with_the_logistic_likelihood(tmp_path):
    run = tmp_path / "r"
    assert (
        main(
            [
                "train",
                "--out",
                str(run),
                "--dataset",
                "mnist",
                "--data-root",
                str(SHARED_DATA / "mnist"),
                "--likelihood",
                "logistic",
                "--train-subset",
                "64",
                "--valid-subset",
                "32",
                *TINY,
            ]
        )
        == 0
    )
    images = load_run_split(run, "valid", {}, load_model(run).config)
    assert images.levels
    assert images.name == "mnist/valid"
    assert len(images) == 10_000


# --------------------------------------------------------------------------- runs of earlier versions
_NEW_TRAIN_KEYS = (
    "binarize",
    "image_size",
    "channels",
    "emnist_split",
    "valid_fraction",
    "test_fraction",
    "split_seed",
)


def _as_earlier_version(run: Path) -> None:
    """Rewrite a run directory as versions before the data options wrote it: no new training keys, no data
    record, no likelihood or image shape in the model config (the files are otherwise the same)."""

    def strip(document: dict[str, Any]) -> dict[str, Any]:
        document.pop("data", None)
        for key in _NEW_TRAIN_KEYS:
            document["train"].pop(key, None)
        return document

    config = strip(json.loads((run / "config.json").read_text()))
    for key in ("likelihood", "image_shape"):
        config["model"].pop(key)
    (run / "config.json").write_text(json.dumps(config))
    for name in ("best.safetensors", "last.safetensors"):
        path = run / name
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        meta = json.loads(header["__metadata__"]["avme"])
        strip(meta["trainer"])
        for key in ("likelihood", "image_shape"):
            meta["config"].pop(key)
        save_file(load_file(path), path, metadata={"avme": json.dumps(meta)})


def test_a_run_of_an_earlier_version_loads_evaluates_samples_and_resumes(tmp_path, capsys):
    run = tmp_path / "old"
    assert main(["train", "--out", str(run), "--train-subset", "64", "--valid-subset", "32", *TINY]) == 0
    before = main(["eval", str(run), "--num-images", "20", "--json", str(tmp_path / "a.json"), "--no-progress"])
    _as_earlier_version(run)
    saved, record = read_training_options(run)
    assert saved is not None
    assert "split_seed" not in saved
    assert record is None
    assert main(["eval", str(run), "--num-images", "20", "--json", str(tmp_path / "b.json"), "--no-progress"]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["summary"] for n in "ab")
    assert before == 0
    assert a == b
    assert main(["sample", str(run), "--num", "4", "--reconstruct", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["data"]["dataset"] == "binarized_mnist"
