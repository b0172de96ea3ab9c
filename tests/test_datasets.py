"""The data sets beyond MNIST, each read from small files written in its real on-disk format (as torchvision's
own tests fake them): IDX files in FashionMNIST/KMNIST/EMNIST raw folders, CIFAR-10's pickled batches,
SVHN's .mat files, Omniglot's zipped and unzipped PNG folders, image folders and npz files.

torchvision checks the md5 of the official CIFAR-10, SVHN and Omniglot files, which small files cannot
match: those tests turn off that check only (``check_integrity`` of the data set's module, as torchvision's
tests do), and one test shows it is on otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avme_ext.data import DataFormatError, DataOptionError, DataSpec, load_split
from avme_ext.data.pixels import resize, to_channels
from avme_ext.data.splits import split_rows

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- writers of the real formats
def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file of unsigned bytes: magic 0x0000_08_<ndim>, big-endian sizes, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist_like(raw: Path, prefixes: dict[str, int], classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``<prefix>-images-idx3-ubyte`` / ``-labels-idx1-ubyte`` pairs in ``raw``; returns what was written."""
    written = {}
    for prefix, n in prefixes.items():
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, classes, n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[prefix] = (images, labels)
    return written


def write_cifar10(root: Path, per_batch: int = 4, test: int = 5) -> dict[str, tuple[np.ndarray, list[int]]]:
    """cifar-10-batches-py/: five pickled training batches, test_batch and batches.meta, as the python version."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    for name, n, part in [
        *((f"data_batch_{i}", per_batch, "train") for i in range(1, 6)),
        ("test_batch", test, "test"),
    ]:
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump(
                {
                    "batch_label": name.encode(),
                    "labels": labels,
                    "data": data,
                    "filenames": [f"{i}.png".encode() for i in range(n)],
                },
                handle,
            )
        written[part][0].append(data)
        written[part][1].extend(labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(
            {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}, handle
        )
    return {part: (np.concatenate(data).reshape(-1, 3, 32, 32), labels) for part, (data, labels) in written.items()}


def write_omniglot(root: Path, folder: str, shape=(2, 2, 3)) -> list[np.ndarray]:
    """omniglot-py/<folder>/<alphabet>/<character>/<n>.png (mode 1, 105 x 105, black ink on white) and its zip.

    Returns the images (0 = ink) in sorted order of (alphabet, character, file)."""
    base = root / "omniglot-py"
    images = []
    for a in range(shape[0]):
        for c in range(shape[1]):
            character = base / folder / f"Alphabet_{a}" / f"character{c + 1:02d}"
            character.mkdir(parents=True)
            for i in range(shape[2]):
                pixels = np.where(RNG.random((105, 105)) < 0.2, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert("1").save(character / f"{a}{c}_{i:02d}.png")
                images.append(pixels)
    with zipfile.ZipFile(base / f"{folder}.zip", "w") as archive:
        for path in sorted((base / folder).rglob("*.png")):
            archive.write(path, path.relative_to(base))
    return images


def write_image_folder(root: Path, classes=("a", "b"), n=5, size=(12, 10), mode="L") -> dict[str, list[np.ndarray]]:
    written: dict[str, list[np.ndarray]] = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        written[name] = []
        for i in range(n):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i:02d}.png")
            written[name].append(pixels)
    return written


@pytest.fixture
def no_md5(monkeypatch):
    """Turn off torchvision's md5 check of the official files (small fake files cannot match it), and only it."""
    import torchvision.datasets.cifar
    import torchvision.datasets.omniglot
    import torchvision.datasets.svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.omniglot):
        monkeypatch.setattr(module, "check_integrity", exists)


def one_line_missing(error: BaseException, *paths: Path, download: bool = True) -> None:
    """A missing-files error: one line naming the files, and the options that fix it on the command line."""
    message, hint = str(error), getattr(error, "cli_hint", None)
    assert isinstance(hint, str), "the error carries the command line's wording"
    assert "\n" not in message
    assert "\n" not in hint
    for path in paths:
        assert str(path) in hint
    assert ("--download" in hint) == download
    assert "--data-root" in hint
    assert "download=True" not in hint
    assert "--download" not in message


# --------------------------------------------------------------------------- Fashion-MNIST, KMNIST, EMNIST
@pytest.mark.parametrize(("name", "folder"), [("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_mnist_like_sets(tmp_path, name, folder):
    written = write_mnist_like(tmp_path / folder / "raw", {"train": 20, "t10k": 6}, 10)
    test = load_split(name, "test", tmp_path)
    images, labels = written["t10k"]
    assert test.levels
    assert test.image_shape == (1, 28, 28)
    assert test.num_classes == 10
    assert test.images.equal(torch.from_numpy(images.reshape(6, -1)))
    assert test.labels.equal(torch.from_numpy(labels.astype(np.int64)))
    train, valid = load_split(name, "train", tmp_path), load_split(name, "valid", tmp_path)
    assert (len(train), len(valid)) == (18, 2)  # 10% of 20 held out by seed
    rows = torch.cat([train.images, valid.images])
    assert sorted(map(bytes, rows.numpy())) == sorted(map(bytes, written["train"][0].reshape(20, -1)))
    x, _ = test.batch(torch.arange(2))
    assert x.dtype == torch.float32
    assert x.equal(torch.from_numpy(images[:2].reshape(2, -1)).float() / 255)


def test_emnist_split_and_orientation(tmp_path):
    written = write_mnist_like(tmp_path / "EMNIST" / "raw", {"emnist-letters-train": 10, "emnist-letters-test": 4}, 27)
    test = load_split("emnist", "test", tmp_path, emnist_split="letters")
    images = written["emnist-letters-test"][0]
    assert test.num_classes == 27  # torchvision's letters: "N/A" and a-z
    assert test.images.view(4, 28, 28).equal(torch.from_numpy(images).transpose(1, 2))  # stored transposed
    with pytest.raises(FileNotFoundError) as error:
        load_split("emnist", "test", tmp_path)  # the balanced split is not there
    one_line_missing(error.value, tmp_path / "EMNIST" / "raw" / "emnist-balanced-test-images-idx3-ubyte")


def test_grey_sets_binarize_for_bernoulli(tmp_path):
    write_mnist_like(tmp_path / "KMNIST" / "raw", {"train": 30, "t10k": 10}, 10)
    levels = load_split("kmnist", "test", tmp_path)
    dynamic = load_split("kmnist", "test", tmp_path, likelihood="bernoulli")
    assert dynamic.dynamic
    assert dynamic.images.equal(levels.images.float() / 255)
    x1, _ = dynamic.batch(torch.arange(10), torch.Generator().manual_seed(1))
    x2, _ = dynamic.batch(torch.arange(10), torch.Generator().manual_seed(1))
    assert x1.equal(x2)
    assert set(x1.unique().tolist()) <= {0.0, 1.0}
    static = load_split("kmnist", "test", tmp_path, seed=3, binarize="static")
    again = load_split("kmnist", "test", tmp_path, seed=3, binarize="static")
    assert static.binarized
    assert static.images.equal(again.images)
    assert not static.images[levels.images == 0].any()
    assert static.images[levels.images == 255].all()
    threshold = load_split("kmnist", "test", tmp_path, binarize="threshold")
    assert threshold.images.equal((levels.images >= 128).to(torch.uint8))
    with pytest.raises(DataOptionError, match="is for --likelihood bernoulli"):
        load_split("kmnist", "test", tmp_path, binarize="static", likelihood="logistic")


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
        ("kmnist", "KMNIST/raw/t10k-labels-idx1-ubyte"),
        ("emnist", "EMNIST/raw/emnist-balanced-test-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/test_batch"),
        ("svhn", "SVHN/test_32x32.mat"),
        ("omniglot", "omniglot-py/images_evaluation.zip"),
    ],
)
def test_missing_files_one_line(tmp_path, name, missing):
    if name == "svhn" and importlib.util.find_spec("scipy") is None:
        pytest.skip("svhn needs scipy")
    with pytest.raises(FileNotFoundError) as error:
        load_split(name, "test", tmp_path)
    one_line_missing(error.value, tmp_path / missing)


# --------------------------------------------------------------------------- CIFAR-10 and SVHN, in colour
def test_cifar10(tmp_path, no_md5):
    written = write_cifar10(tmp_path)
    test = load_split("cifar10", "test", tmp_path, likelihood="logistic")
    assert test.levels
    assert test.image_shape == (3, 32, 32)
    assert test.num_classes == 10
    assert test.images.equal(torch.from_numpy(written["test"][0].reshape(5, -1)))  # CHW order, as stored
    assert test.labels.tolist() == written["test"][1]
    train, valid = (load_split("cifar10", s, tmp_path) for s in ("train", "valid"))
    assert (len(train), len(valid)) == (18, 2)
    with pytest.raises(DataOptionError, match=r"colour images; the Bernoulli likelihood .* --channels 1"):
        load_split("cifar10", "test", tmp_path, likelihood="bernoulli")
    grey = load_split("cifar10", "test", tmp_path, likelihood="bernoulli", channels=1, binarize="threshold")
    assert grey.image_shape == (1, 32, 32)
    assert grey.binarized


def test_cifar10_md5_is_checked(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataFormatError, match=r"cannot be read by torchvision.*not the official one"):
        load_split("cifar10", "test", tmp_path)


def test_svhn(tmp_path, no_md5):
    scipy_io = pytest.importorskip("scipy.io", reason="svhn needs scipy")
    images = RNG.integers(0, 256, (32, 32, 3, 7), dtype=np.uint8)  # SVHN's layout: H, W, C, N
    labels = np.array([[10], [1], [2], [3], [10], [9], [5]], dtype=np.uint8)  # 10 is the digit 0
    (tmp_path / "SVHN").mkdir()
    scipy_io.savemat(tmp_path / "SVHN" / "test_32x32.mat", {"X": images, "y": labels})
    test = load_split("svhn", "test", tmp_path, likelihood="logistic")
    assert test.image_shape == (3, 32, 32)
    assert test.labels.tolist() == [0, 1, 2, 3, 0, 9, 5]
    assert test.images.view(7, 3, 32, 32).equal(torch.from_numpy(images).permute(3, 2, 0, 1))


# --------------------------------------------------------------------------- Omniglot
def test_omniglot(tmp_path, no_md5):
    written = write_omniglot(tmp_path, "images_background")
    train_part = DataSpec("omniglot", str(tmp_path), image_size=105).open()
    full = torch.cat([train_part.split("train").images, train_part.split("valid").images])
    assert len(full) == 12
    assert not train_part.split("train").has_labels
    inked = sorted(map(bytes, full.numpy()))
    assert inked == sorted(bytes((255 - w).reshape(-1)) for w in written)  # ink is 255
    small = load_split("omniglot", "train", tmp_path)  # 28 x 28 unless told
    assert small.image_shape == (1, 28, 28)
    with pytest.raises(FileNotFoundError) as error:
        load_split("omniglot", "test", tmp_path)
    one_line_missing(error.value, tmp_path / "omniglot-py" / "images_evaluation.zip")


def test_omniglot_unreadable_image_names_the_file(tmp_path, no_md5):
    write_omniglot(tmp_path, "images_background", shape=(1, 1, 2))
    bad = next((tmp_path / "omniglot-py" / "images_background").rglob("*.png"))
    bad.write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match=f"{bad}: not a readable image"):
        DataSpec("omniglot", str(tmp_path), image_size=105).open().split("train")


# --------------------------------------------------------------------------- image folders
def test_image_folder_grey_split_by_seed(tmp_path):
    written = write_image_folder(tmp_path / "pics", n=10)
    spec = DataSpec("imagefolder", str(tmp_path / "pics"))
    splits = {s: spec.open().split(s) for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [16, 2, 2]
    assert all(s.image_shape == (1, 10, 12) and s.levels and s.num_classes == 2 for s in splits.values())
    everything = torch.cat([s.images for s in splits.values()])
    expected = [bytes(p.reshape(-1)) for name in ("a", "b") for p in written[name]]
    assert sorted(map(bytes, everything.numpy())) == sorted(expected)
    other = DataSpec("imagefolder", str(tmp_path / "pics"), split_seed=1).open().split("test")
    assert not other.images.equal(splits["test"].images)
    labels = torch.cat([s.labels for s in splits.values()])
    class_a = {bytes(p.reshape(-1)) for p in written["a"]}
    assert [int(bytes(row) not in class_a) for row in everything.numpy()] == labels.tolist()


def test_image_folder_colour_resize_and_layout(tmp_path):
    root = tmp_path / "pics"
    write_image_folder(root / "train", n=4, size=(20, 16), mode="RGB")
    written = write_image_folder(root / "test", n=2, size=(8, 8), mode="RGB")
    source = DataSpec("imagefolder", str(root), image_size=8).open()
    test = source.split("test")
    assert test.image_shape == (3, 8, 8)
    assert len(test) == 4
    assert len(source.split("valid")) == 1
    assert test.images[0].equal(torch.from_numpy(written["a"][0]).permute(2, 0, 1).reshape(-1))  # 8x8: unchanged
    grey = DataSpec("imagefolder", str(root), image_size=8, channels=1).open().split("test")
    pil_grey = np.asarray(Image.fromarray(written["a"][0]).convert("L"))
    assert grey.images[0].equal(torch.from_numpy(pil_grey.copy()).reshape(-1))
    with pytest.raises(DataFormatError, match=r"different sizes.*--image-size"):
        DataSpec("imagefolder", str(root)).open().split("train")


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_split("imagefolder", "train", tmp_path / "nowhere")
    one_line_missing(error.value, tmp_path / "nowhere", download=False)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="images of"):
        load_split("imagefolder", "train", tmp_path / "empty")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match=re.escape(str(tmp_path / "bad" / "a" / "x.png"))):
        load_split("imagefolder", "train", tmp_path / "bad")
    with pytest.raises(DataOptionError, match="needs data_root"):
        load_split("imagefolder", "train")


# --------------------------------------------------------------------------- npz
def test_npz_without_splits(tmp_path):
    images = RNG.integers(0, 256, (40, 6, 5, 3), dtype=np.uint8)  # channels last
    labels = RNG.integers(0, 4, 40)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    splits = [load_split("npz", s, tmp_path / "d.npz", likelihood="logistic") for s in ("train", "valid", "test")]
    assert [len(s) for s in splits] == [32, 4, 4]
    assert splits[0].image_shape == (3, 6, 5)
    assert splits[0].num_classes == 4
    rows = torch.cat([s.images for s in splits])
    assert sorted(map(bytes, rows.numpy())) == sorted(bytes(i.transpose(2, 0, 1).reshape(-1)) for i in images)


def test_npz_with_splits_and_kinds(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=RNG.random((20, 4, 4)) < 0.5, x_test=RNG.random((3, 4, 4)) < 0.5)
    test = load_split("npz", "test", path)
    assert test.binarized
    assert not test.has_labels
    assert len(test) == 3
    assert len(load_split("npz", "valid", path)) == 2
    as_levels = load_split("npz", "test", path, likelihood="logistic")  # 0/1 are the levels 0 and 255
    assert as_levels.binarized
    assert as_levels.images.equal(test.images)
    with pytest.raises(DataOptionError, match=r"binary .* images already"):
        load_split("npz", "test", path, binarize="static")
    np.savez(path, x_train=np.zeros((4, 3, 8, 8), np.uint8), y_train=np.arange(4))  # channels first
    assert load_split("npz", "train", path, test_fraction=0.25, valid_fraction=0.25).image_shape == (3, 8, 8)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 3, 3), np.uint8)}, "has keys"),
        ({"images": np.zeros((2, 3, 3))}, r"uint8 \(8-bit levels\) or bool.*numpy.round"),
        ({"images": np.zeros((2, 9), np.uint8)}, r"got shape \(2, 9\)"),
        ({"images": np.zeros((2, 3, 3), np.uint8), "labels": np.array([0, -1])}, "labels must be >= 0"),
        ({"x_train": np.zeros((2, 3, 3), np.uint8), "x_test": np.zeros((2, 4, 4), np.uint8)}, "one shape"),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataFormatError, match=message):
        load_split("npz", "train", tmp_path / "d.npz")


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_split("npz", "train", tmp_path / "d.npz")
    one_line_missing(error.value, tmp_path / "d.npz", download=False)


# --------------------------------------------------------------------------- pixels and splits
def test_to_grey_is_pils_convert_l():
    rgb = RNG.integers(0, 256, (17, 13, 3), dtype=np.uint8)
    ours = to_channels(torch.from_numpy(rgb).permute(2, 0, 1)[None], 1)[0, 0]
    assert ours.equal(torch.from_numpy(np.array(Image.fromarray(rgb).convert("L"))))
    assert to_channels(ours[None, None], 3).shape == (1, 3, 17, 13)


def test_resize_keeps_levels_and_constant_images():
    flat = torch.full((2, 1, 30, 20), 77, dtype=torch.uint8)
    assert resize(flat, 8).equal(torch.full((2, 1, 8, 8), 77, dtype=torch.uint8))
    image = torch.randint(0, 256, (1, 3, 9, 9), dtype=torch.uint8)
    assert resize(image, 9) is image


def test_held_out_splits_partition_by_seed():
    parts = {"all"}
    rows: dict[str, torch.Tensor] = {}
    for s in ("train", "valid", "test"):
        chosen = split_rows(s, parts, 103, valid_fraction=0.15, test_fraction=0.1, seed=5).rows
        assert chosen is not None, s
        rows[s] = chosen
    assert [len(rows[s]) for s in ("train", "valid", "test")] == [78, 15, 10]  # floor(f * 103 + 1/2)
    assert torch.cat(list(rows.values())).sort().values.equal(torch.arange(103))
    assert all(r.equal(r.sort().values) for r in rows.values())
    again = split_rows("test", parts, 103, valid_fraction=0.15, test_fraction=0.1, seed=5)
    assert again.rows is not None
    assert again.rows.equal(rows["test"])
    assert "manual_seed(5)" in again.rule
    with pytest.raises(DataOptionError, match="too few"):
        split_rows("valid", {"train", "test"}, 3, valid_fraction=0.1, test_fraction=0.1, seed=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dataset": "binarized_mnist", "binarize": "static"}, "does not apply"),
        ({"dataset": "mnist_static", "binarize": "dynamic"}, "cannot take"),
        ({"dataset": "kmnist", "emnist_split": "letters"}, "only applies to --dataset emnist"),
        ({"dataset": "kmnist", "valid_fraction": 0.6, "test_fraction": 0.5}, "must be < 1"),
        ({"dataset": "kmnist", "valid_fraction": 1.5}, r"must be a number in \(0, 1\)"),
        ({"dataset": "kmnist", "image_size": 0}, "image_size"),
        ({"dataset": "kmnist", "channels": 2}, "valid choices: 1, 3"),
        (
            {
                "dataset": "cifar",
            },
            "valid choices: binarized_mnist",
        ),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        DataSpec(**options)
