"""Tests of avme_ext.data on the real MNIST files in ../shared/data (no network)."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from avme_ext import data as D
from avme_ext.data import mnist as mnist_files
from helpers import SHARED_DATA

SHARED = SHARED_DATA
MNIST_DIR = SHARED / "mnist"
README_MD5 = "040a17ccac7b1835a5377201be1d68c4"
SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}
MEANS = {"train": 0.1306, "valid": 0.1311, "test": 0.1325}
IDX_NAMES = [f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]

needs_shared = pytest.mark.skipif(
    not (SHARED / "binarized_mnist.npz").is_file() or not MNIST_DIR.is_dir(),
    reason="no ../shared/data (binarized_mnist.npz, mnist/)",
)


@pytest.fixture(scope="module")
def vendored() -> dict[str, D.ImageSplit]:
    return {split: D.load_binarized_mnist(split) for split in D.SPLITS}


@pytest.fixture(scope="module")
def official_test() -> tuple[np.ndarray, np.ndarray]:
    """Official t10k gray images (10000, 784) uint8 and labels (10000,) uint8."""
    images = D.read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz", D.IDX_IMAGES_MAGIC)
    labels = D.read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz", D.IDX_LABELS_MAGIC)
    return images.reshape(-1, D.NUM_PIXELS), labels


def _copy_mnist(dest: Path, names=IDX_NAMES, gunzip: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if gunzip:
            with gzip.open(MNIST_DIR / name) as src, open(dest / name.removesuffix(".gz"), "wb") as out:
                shutil.copyfileobj(src, out)
        else:
            (dest / name).symlink_to(MNIST_DIR / name)
    return dest


def _write_amat(path: Path, rows: np.ndarray) -> None:
    path.write_text("".join(" ".join(map(str, row)) + "\n" for row in rows))


# --------------------------------------------------------------------------- vendored npz


@pytest.mark.parametrize("split", D.SPLITS)
def test_vendored_split(vendored, split):
    s = vendored[split]
    assert len(s) == SIZES[split]
    assert s.images.shape == (SIZES[split], 784)
    assert s.images.dtype == torch.uint8
    assert s.binarized
    assert s.has_labels
    assert set(s.images.unique().tolist()) == {0, 1}
    assert s.labels.dtype == torch.int64
    assert s.labels.min() >= 0
    assert s.labels.max() < 10
    assert s.images.float().mean().item() == pytest.approx(MEANS[split], abs=1e-4)
    assert s.name == f"binarized_mnist/{split}"


@needs_shared
def test_vendored_file_is_the_shared_file():
    def md5(path):
        return hashlib.md5(path.read_bytes()).hexdigest()

    assert md5(D.VENDORED_NPZ) == README_MD5 == md5(SHARED / "binarized_mnist.npz")
    assert README_MD5 in (D.VENDORED_NPZ.parent / "README.md").read_text()
    assert D.load_split("binarized_mnist", "valid", root=SHARED).images.equal(
        D.load_split("binarized_mnist", "valid").images
    )


@needs_shared
def test_test_label_counts_equal_official(vendored, official_test):
    counts = torch.from_numpy(official_test[1].astype(np.int64)).bincount(minlength=10)
    assert vendored["test"].labels.bincount(minlength=10).equal(counts)


def test_test_split_sorted_so_subset_is_random(vendored):
    test = vendored["test"]
    assert (test.labels[:100] == 0).all()  # sorted by label: first rows are misleading
    sub = test.subset(500, torch.Generator().manual_seed(0))
    assert len(sub) == 500
    assert sub.labels.unique().numel() == 10
    assert sub.binarized
    again = test.subset(500, torch.Generator().manual_seed(0))
    assert sub.images.equal(again.images)
    with pytest.raises(ValueError, match="subset size"):
        test.subset(10_001)


def test_batch_and_dataset(vendored):
    s = vendored["valid"]
    x, y = s.batch(torch.tensor([3, 1, 4]), dtype=torch.float64)
    assert x.shape == (3, 784)
    assert x.dtype == torch.float64
    assert y.dtype == torch.int64
    assert x.equal(s.images[[3, 1, 4]].double())
    assert y.equal(s.labels[[3, 1, 4]])
    loader = torch.utils.data.DataLoader(s.as_dataset(), batch_size=32)
    xb, yb = next(iter(loader))
    assert xb.shape == (32, 784)
    assert xb.dtype == torch.float32
    assert yb.equal(s.labels[:32])


def test_image_split_validates_shapes():
    with pytest.raises(ValueError, match="784"):
        D.ImageSplit(torch.zeros(2, 10, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), True, "x")
    with pytest.raises(ValueError, match="labels"):
        D.ImageSplit(torch.zeros(2, 784, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), True, "x")
    with pytest.raises(ValueError, match="uint8"):
        D.ImageSplit(torch.zeros(2, 784), torch.zeros(2, dtype=torch.int64), True, "x")


# --------------------------------------------------------------------------- official IDX files


@needs_shared
@pytest.mark.parametrize("layout", ["plain_gz", "torchvision_gz", "plain_uncompressed"])
def test_idx_layouts(tmp_path, official_test, layout):
    test_names = [n for n in IDX_NAMES if n.startswith("t10k")]
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision_gz" else tmp_path
    _copy_mnist(folder, test_names, gunzip=layout == "plain_uncompressed")
    s = D.load_mnist_idx("test", tmp_path, binarize="threshold")
    gray, labels = official_test
    assert len(s) == 10_000
    assert s.binarized
    assert s.name == "mnist_threshold/test"
    assert s.labels.equal(torch.from_numpy(labels.astype(np.int64)))
    assert s.images.equal(torch.from_numpy((gray > 127.5).astype(np.uint8)))


@needs_shared
def test_idx_train_and_split_dispatch():
    full = D.load_mnist_idx("train", MNIST_DIR, binarize="threshold")
    assert len(full) == 60_000
    assert full.labels.bincount().sum() == 60_000
    train = D.load_split("mnist_threshold", "train", root=MNIST_DIR)
    valid = D.load_split("mnist_threshold", "valid", root=MNIST_DIR)
    assert (len(train), len(valid)) == (50_000, 10_000)
    assert train.images.equal(full.images[:50_000])
    assert valid.labels.equal(full.labels[50_000:])
    assert valid.name == "mnist_threshold/valid"


@needs_shared
def test_static_binarization_reproducible(official_test):
    a = D.load_mnist_idx("test", MNIST_DIR, "static", seed=0)
    b = D.load_mnist_idx("test", MNIST_DIR, "static", seed=0)
    c = D.load_mnist_idx("test", MNIST_DIR, "static", seed=1)
    assert a.binarized
    assert a.images.dtype == torch.uint8
    assert a.images.equal(b.images)
    assert not a.images.equal(c.images)
    gray_mean = official_test[0].mean() / 255
    assert a.images.float().mean().item() == pytest.approx(gray_mean, abs=1e-3)
    # pixels that are 0 in gray are never 1 in a Bernoulli(gray) draw
    assert not a.images[torch.from_numpy(official_test[0] == 0)].any()


@needs_shared
def test_dynamic_binarization(official_test):
    s = D.load_split("mnist_dynamic", "test", root=MNIST_DIR)
    assert not s.binarized
    assert s.images.dtype == torch.float32
    assert s.images.min() >= 0
    assert s.images.max() <= 1
    index = torch.arange(2000)
    with pytest.raises(ValueError, match="generator"):
        s.batch(index)
    g = torch.Generator().manual_seed(0)
    x1, y1 = s.batch(index, g)
    x2, _ = s.batch(index, g)
    x3, _ = s.batch(index, torch.Generator().manual_seed(0))
    assert set(x1.unique().tolist()) == {0.0, 1.0}
    assert x1.dtype == torch.float32
    assert not x1.equal(x2)
    assert x1.equal(x3)
    assert y1.equal(torch.from_numpy(official_test[1][:2000].astype(np.int64)))
    assert x1.mean().item() == pytest.approx(s.images[index].mean().item(), abs=2e-3)
    assert x1.mean().item() == pytest.approx(official_test[0][:2000].mean() / 255, abs=2e-3)


# --------------------------------------------------------------------------- amat files


def test_amat_matches_npz(tmp_path, vendored):
    rows = vendored["test"].images[:200].numpy()
    _write_amat(D.amat_path(tmp_path, "test"), rows)
    assert D.load_amat(D.amat_path(tmp_path, "test")).equal(torch.from_numpy(rows))
    s = D.load_split("binarized_mnist_amat", "test", root=tmp_path)
    assert s.images.equal(torch.from_numpy(rows))
    assert s.name == "binarized_mnist_amat/test"
    assert not s.has_labels
    assert (s.labels == -1).all()
    assert s.labels.shape == (200,)
    x, _ = s.batch(torch.arange(5))
    assert x.equal(torch.from_numpy(rows[:5]).float())


def test_amat_float_tokens(tmp_path, vendored):
    rows = vendored["valid"].images[:3].numpy()
    path = tmp_path / "f.amat"
    path.write_text("".join(" ".join(f"{v:.1f}" for v in row) + "\n" for row in rows))
    assert D.load_amat(path).equal(torch.from_numpy(rows))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda row: row[:-1], "expected 784 values, got 783"),
        (lambda row: [*row[:10], "2", *row[11:]], "expected 0/1 values, found '2'"),
        (lambda row: [*row[:10], "0.5", *row[11:]], "expected 0/1 values, found '0.5'"),
        (lambda row: [*row[:10], "x", *row[11:]], "non-numeric"),
    ],
)
def test_amat_bad_line_names_line(tmp_path, bad, message):
    good = ["0"] * 784
    path = tmp_path / "bad.amat"
    path.write_text("\n".join(" ".join(r) for r in (good, good, bad(list(good)), good)) + "\n")
    with pytest.raises(D.DataFormatError, match=re.escape(f"{path}, line 3: {message}")):
        D.load_amat(path)


# --------------------------------------------------------------------------- errors


def test_missing_idx_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        D.load_split("mnist_static", "valid", root=tmp_path)
    msg = str(info.value)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        assert str(tmp_path / name) in msg
        assert str(tmp_path / "MNIST" / "raw" / name) in msg
    assert "download=True" in msg
    assert "--download" not in msg
    hint = getattr(info.value, "cli_hint", None)  # what the command line prints instead
    assert isinstance(hint, str)
    assert "--download" in hint
    assert "download=True" not in hint
    assert str(tmp_path / "MNIST") in hint


def test_missing_amat_and_npz_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "binarized_mnist_valid.amat"))):
        D.load_split("binarized_mnist_amat", "valid", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "binarized_mnist.npz"))):
        D.load_split("binarized_mnist", "valid", root=tmp_path)


@pytest.mark.parametrize("cut", [100, 1_000_000, -10])
def test_truncated_npz(tmp_path, cut):
    path = tmp_path / "binarized_mnist.npz"
    path.write_bytes(D.VENDORED_NPZ.read_bytes()[:cut])
    with pytest.raises(D.DataFormatError, match=re.escape(str(path))) as info:
        D.load_binarized_mnist("test", path)
    assert "corrupt or truncated" in str(info.value)
    assert "x_test" in str(info.value)


def test_npz_content_errors(tmp_path):
    path = tmp_path / "b.npz"
    packed = np.zeros((4, 98), np.uint8)
    np.savez(path, x_train=packed)
    with pytest.raises(D.DataFormatError, match=r"missing keys \['y_train'\]"):
        D.load_binarized_mnist("train", path)
    np.savez(path, x_train=np.zeros((4, 97), np.uint8), y_train=np.zeros(4, np.uint8))
    with pytest.raises(D.DataFormatError, match=r"\(4, 97\)"):
        D.load_binarized_mnist("train", path)
    np.savez(path, x_train=np.full((4, 784), 3, np.uint8), y_train=np.zeros(4, np.uint8))
    with pytest.raises(D.DataFormatError, match="0/1"):
        D.load_binarized_mnist("train", path)
    np.savez(path, x_train=packed, y_train=np.array([0, 1, 2, 10], np.uint8))
    with pytest.raises(D.DataFormatError, match=r"labels must be in \[0, 10\)"):
        D.load_binarized_mnist("train", path)
    np.savez(path, x_train=packed, y_train=np.zeros(3, np.uint8))
    with pytest.raises(D.DataFormatError, match=r"expected \(4,\) integer labels"):
        D.load_binarized_mnist("train", path)


@needs_shared
def test_corrupt_idx(tmp_path):
    raw = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    images.write_bytes((MNIST_DIR / images.name).read_bytes()[:5000])
    labels.write_bytes(raw)
    with pytest.raises(D.DataFormatError, match=re.escape(str(images))):
        D.load_mnist_idx("test", tmp_path)
    labels.write_bytes(raw[:-1])
    with pytest.raises(D.DataFormatError, match="truncated"):
        D.read_idx(labels, D.IDX_LABELS_MAGIC)
    labels.write_bytes(raw + b"\0")
    with pytest.raises(D.DataFormatError, match=r"oversized IDX file: header says shape \(10000,\), file has 10001"):
        D.read_idx(labels, D.IDX_LABELS_MAGIC)
    with pytest.raises(D.DataFormatError, match="expected IDX magic number 2051, found 2049"):
        D.read_idx(labels, D.IDX_IMAGES_MAGIC)


@pytest.mark.parametrize(
    ("call", "choices"),
    [
        (lambda: D.load_split("cifar", "train"), "binarized_mnist, binarized_mnist_amat, mnist_static"),
        (lambda: D.load_split("binarized_mnist", "validation"), "train, valid, test"),
        (lambda: D.load_binarized_mnist("dev"), "train, valid, test"),
        (lambda: D.load_mnist_idx("valid", "."), "train, test"),
        (lambda: D.load_mnist_idx("test", ".", binarize="none"), "static, dynamic, threshold"),
    ],
)
def test_bad_names(call, choices):
    with pytest.raises(ValueError, match=f"valid choices: {choices}"):
        call()


# --------------------------------------------------------------------------- downloads, mocked


@needs_shared
def test_download_mnist_is_called_when_missing(tmp_path, monkeypatch, official_test):
    calls = []

    def fake_download(root):
        calls.append(Path(root))
        _copy_mnist(Path(root) / "MNIST" / "raw")

    monkeypatch.setattr(mnist_files, "download_mnist", fake_download)
    s = D.load_split("mnist_static", "test", root=tmp_path, download=True)
    assert calls == [tmp_path]
    assert len(s) == 10_000
    D.load_split("mnist_static", "test", root=tmp_path, download=True)  # files now present
    assert calls == [tmp_path]


def test_download_amat_is_called_when_missing(tmp_path, monkeypatch, vendored):
    rows = vendored["train"].images[:7].numpy()
    calls = []

    def fake_download(root, splits=D.SPLITS):
        calls.append(tuple(splits))
        _write_amat(D.amat_path(root, splits[0]), rows)

    monkeypatch.setattr(mnist_files, "download_binarized_mnist_amat", fake_download)
    s = D.load_binarized_mnist_amat("train", tmp_path, download=True)
    assert calls == [("train",)]
    assert s.images.equal(torch.from_numpy(rows))


def test_download_helper_checks_md5(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    dest = tmp_path / "out" / "dest.bin"
    with pytest.raises(OSError, match="md5"):
        D._download([src.as_uri()], dest, md5="0" * 32)
    assert not dest.exists()
    assert not list(dest.parent.iterdir())
    D._download([src.as_uri()], dest, md5=hashlib.md5(b"abc").hexdigest())
    assert dest.read_bytes() == b"abc"
