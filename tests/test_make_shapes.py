"""``python/make_shapes.py``: a seeded folder of colour shapes in class subfolders, as ``imagefolder`` reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, load_script


@pytest.fixture(scope="module")
def make_shapes():
    return load_script("make_shapes")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def test_writes_rgb_pngs_in_one_folder_per_shape(make_shapes, tmp_path, capsys):
    assert make_shapes.main(["--out", str(tmp_path / "s"), "--num", "7", "--size", "12"]) == 0
    assert "wrote 7 images of 12 x 12 pixels" in capsys.readouterr().out
    files = {d.name: sorted(p.name for p in d.iterdir()) for d in (tmp_path / "s").iterdir()}
    assert files == {
        "circle": ["0.png", "3.png", "6.png"],
        "square": ["1.png", "4.png"],
        "triangle": ["2.png", "5.png"],
    }
    for path in (tmp_path / "s").rglob("*.png"):
        assert pixels(path).shape == (12, 12, 3)


def test_the_shape_is_bright_on_a_dark_background(make_shapes):
    rng = np.random.default_rng(1)
    for shape in make_shapes.SHAPES:
        for _ in range(5):
            image = np.asarray(make_shapes.draw_shape(shape, 32, rng)).max(axis=2)  # HSV value, 0..255
            # the shape covers less than half of the border, so the border's median is the background
            background = np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]))
            assert background <= make_shapes.BACKGROUND_VALUE[1] * 255 + 1
            assert image.max() >= make_shapes.SHAPE_VALUE[0] * 255 - 1  # the shape's colour
            bright = image > (background + image.max()) / 2
            share = bright.mean()  # the shape's area: between a small triangle's and a large square's
            smallest, largest = make_shapes.EXTENT
            assert 0.5 * smallest**2 * 0.8 < share < largest**2 * 1.1, (shape, share)


def test_shapes_differ_by_class(make_shapes):
    """The same draws give a square's corner filled where a circle's and a triangle's are background."""
    masks = {}
    for shape in make_shapes.SHAPES:
        image = np.asarray(make_shapes.draw_shape(shape, 32, np.random.default_rng(4))).max(axis=2)
        masks[shape] = image > image.min() + (image.max() - image.min()) / 2
    area = {shape: int(mask.sum()) for shape, mask in masks.items()}
    assert area["triangle"] < area["circle"] < area["square"]  # 1/2, pi/4 and all of the same box
    assert area["triangle"] / area["square"] == pytest.approx(0.5, abs=0.1)
    assert area["circle"] / area["square"] == pytest.approx(np.pi / 4, abs=0.1)


def test_same_seed_same_images_other_seed_other_images(make_shapes, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_shapes.write_shapes(tmp_path / name, 6, 10, seed)
    written = sorted((tmp_path / "a").rglob("*.png"))
    assert len(written) == 6
    for path in written:
        assert np.array_equal(pixels(path), pixels(tmp_path / "b" / path.relative_to(tmp_path / "a")))
    assert not np.array_equal(pixels(tmp_path / "a" / "circle" / "0.png"), pixels(tmp_path / "c" / "circle" / "0.png"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num", "2"], "--num must be at least 3"),
        (["--size", "4"], "--size must be at least 8 pixels, got 4"),
    ],
)
def test_bad_arguments_are_refused(make_shapes, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        make_shapes.main(["--out", str(tmp_path / "s"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_folder_with_files_is_kept_unless_overwrite(make_shapes, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        make_shapes.main(["--out", str(out), "--num", "3", "--size", "8"])
    assert "already has files; choose an empty folder or add --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    make_shapes.main(["--out", str(out), "--num", "6", "--size", "8", "--overwrite"])
    make_shapes.main(["--out", str(out), "--num", "3", "--size", "8", "--overwrite"])  # fewer: old PNGs go
    assert sorted(p.name for p in (out / "circle").iterdir()) == ["0.png"]
    assert (out / "notes.txt").read_text() == "mine"


def test_the_readme_shows_the_shapes_pictures_with_the_commands_that_made_them():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Data sets\n") : readme.index("\n## ", readme.index("## Data sets\n") + 1)]
    assert "python python/make_shapes.py --out shapes" in section
    for picture in ("shapes-samples.png", "shapes-samples_recon.png", "shapes-unrolled.png", "shapes-steps.gif"):
        assert f"](docs/images/{picture})" in section
        assert (REPO / "docs" / "images" / picture).is_file()
    for made in (
        "--out docs/images/shapes-samples.png",
        "--reconstruct 16",
        "--out docs/images/shapes-unrolled.png",
        "--gif docs/images/shapes-steps.gif",
    ):
        assert made in section
