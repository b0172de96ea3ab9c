"""Pictures of any image shape (avme_ext.images): grey and colour grids, strips, reconstructions, the
drawing as an animated GIF; and ``avme sample --gif`` on a colour model with the logistic likelihood
trained a few steps in Python."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import GifImagePlugin, Image, ImageSequence

from avme_ext import images
from avme_ext.checkpoint import save_checkpoint
from avme_ext.cli import main
from avme_ext.evaluation import evaluate
from avme_ext.model import AVME

COLOUR = (3, 6, 5)  # not square, so height and width cannot be swapped unnoticed
PAD = images.DEFAULT_PADDING
BAR = images.PROGRESS_BAR_HEIGHT


def colour_tiles(count: int) -> torch.Tensor:
    """(count, 90) images: image i is pure red, green or blue (i % 3) at intensity (i + 1) / count."""
    tiles = torch.zeros(count, *COLOUR)
    for i in range(count):
        tiles[i, i % 3] = (i + 1) / count
    return tiles.reshape(count, -1)


def tile_pixel(grid: torch.Tensor, row: int, col: int, shape=COLOUR, scale: int = 1) -> torch.Tensor:
    """The (3,) colour at the top-left pixel of tile (row, col) of a grid."""
    _, height, width = shape
    top, left = PAD + row * (height + PAD), PAD + col * (width + PAD)
    return grid[:, scale * top, scale * left]


def gif_frames(data: bytes) -> tuple[GifImagePlugin.GifImageFile, list[Image.Image]]:
    gif = Image.open(io.BytesIO(data))
    assert isinstance(gif, GifImagePlugin.GifImageFile), gif.format
    return gif, [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]


# --------------------------------------------------------------------------- grids
def test_colour_grid_puts_every_image_in_its_tile_with_its_colours():
    grid = images.make_image_grid(colour_tiles(7), 3, image_shape=COLOUR)
    assert grid.shape == (3, *images.grid_size(3, 3, image_shape=COLOUR))
    for i in range(7):
        expected = torch.zeros(3)
        expected[i % 3] = (i + 1) / 7
        torch.testing.assert_close(tile_pixel(grid, i // 3, i % 3), expected)
    assert torch.all(grid[:, 0, 0] == images.DEFAULT_PAD_VALUE)  # padding around the tiles


def test_grey_images_keep_the_mnist_default_and_other_shapes_are_checked():
    digits = torch.rand(4, 784)
    grid = images.sample_grid(digits, scale=2)
    assert grid.shape == (3, *images.grid_size(2, 2, scale=2))  # 28x28 tiles without being told
    assert torch.equal(grid[0], grid[1])
    assert torch.equal(grid[1], grid[2])
    with pytest.raises(ValueError, match=r"image_shape \(3, 6, 5\) holds 90 pixels, but the images have 784"):
        images.make_image_grid(digits, image_shape=COLOUR)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        images.make_image_grid(torch.rand(2, 24), image_shape=(2, 3, 4))
    with pytest.raises(ValueError, match=r"must be \(B, D\) flattened images"):
        images.make_image_grid(torch.rand(2, 3, 6, 5), image_shape=COLOUR)


def test_colour_strips_reconstructions_and_class_rows():
    k, b = 4, 2
    steps = colour_tiles(k * b).view(k, b, -1)
    strips = images.unrolled_strips_grid(steps, image_shape=COLOUR)
    assert strips.shape == (3, *images.grid_size(b, k, image_shape=COLOUR))
    torch.testing.assert_close(tile_pixel(strips, 1, 2), steps[2, 1].view(COLOUR)[:, 0, 0])  # row = image, col = step
    x, recon = colour_tiles(5), 1.0 - colour_tiles(5)
    pairs = images.reconstructions_grid(x, recon, 3, image_shape=COLOUR)
    assert pairs.shape == (3, *images.grid_size(4, 3, image_shape=COLOUR))
    torch.testing.assert_close(tile_pixel(pairs, 3, 1), recon[4].view(COLOUR)[:, 0, 0])  # second pair, image 4
    classes = images.class_grid(colour_tiles(6).view(2, 3, -1), image_shape=COLOUR)
    assert classes.shape == (3, *images.grid_size(2, 3, image_shape=COLOUR))


# --------------------------------------------------------------------------- the drawing as a GIF
@pytest.mark.parametrize("shape", [(1, 28, 28), COLOUR])
def test_drawing_gif_has_one_frame_per_step_and_holds_the_last(shape, tmp_path):
    k, b, scale = 5, 3, 2
    d = math.prod(shape)
    steps = torch.rand(k, b, d, generator=torch.Generator().manual_seed(0))
    steps[2] = steps[1]  # two steps that look alike stay two frames (the progress bar differs)
    path = images.save_drawing_gif(
        steps, tmp_path / "drawing.gif", 2, image_shape=shape, scale=scale, frame_ms=100, hold_ms=2000
    )
    gif, frames = gif_frames(path.read_bytes())
    height, width = images.grid_size(2, 2, image_shape=shape, scale=scale)
    assert gif.n_frames == k
    assert len(frames) == k
    assert gif.size == (width, height + scale * BAR)
    durations = [frame.info["duration"] for frame in ImageSequence.Iterator(Image.open(path))]
    assert durations == [100] * (k - 1) + [2000]
    assert gif.info.get("loop") == 0
    # frame t shows step t: the first tile's top-left pixel, and the bar filled to t/K
    for t, frame in enumerate(frames):
        expected = steps[t, 0].view(shape)[:, 0, 0].expand(3) * 255
        got = torch.tensor(frame.getpixel((scale * PAD, scale * PAD)), dtype=torch.float32)
        assert (got - expected).abs().max() <= (1 if shape[0] == 1 else 24), (t, got, expected)  # 256-colour palette
        bar_row = height + scale * BAR // 2
        filled = sum(frame.getpixel((x, bar_row)) == (255, 255, 255) for x in range(width))
        assert filled == round(width * (t + 1) / k)


def test_gif_arguments_are_checked(tmp_path):
    frames = images.drawing_frames(torch.rand(2, 1, 784))
    with pytest.raises(ValueError, match=r"use a \.gif file name"):
        images.write_gif(frames, tmp_path / "a.png")
    with pytest.raises(ValueError, match="hold_ms must be an integer number of milliseconds >= 10"):
        images.encode_gif(frames, hold_ms=0)
    with pytest.raises(ValueError, match="one size"):
        images.encode_gif([frames[0], frames[0][:, :-1]])
    with pytest.raises(ValueError, match=r"steps must be \(K, B, D\)"):
        images.drawing_frames(torch.rand(2, 784))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- a colour model end to end
@pytest.fixture(scope="module")
def colour_checkpoint(tmp_path_factory):
    """A logistic AVME on 3x8x8 images (a red square on a random-colour background) trained 30 steps."""
    torch.manual_seed(0)
    model = AVME(
        data_dim=192,
        enc_hidden=24,
        dec_hidden=24,
        latent_dim=4,
        steps=4,
        likelihood="logistic",
        image_shape=(3, 8, 8),
        impl="ref",
    )
    generator = torch.Generator().manual_seed(1)
    data = torch.rand(32, 3, 1, 1, generator=generator).expand(32, 3, 8, 8).clone()
    data[:, :, 2:6, 2:6] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    data = (data * 255).round().reshape(32, -1) / 255
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        for step in range(30):
            loss, _ = model.loss(data[(step % 4) * 8 :][:8], generator=generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < losses[0]
    path = save_checkpoint(tmp_path_factory.mktemp("colour") / "best.safetensors", model)
    return path, model, data


def test_colour_model_evaluates_in_bits_per_dim(colour_checkpoint):
    from test_likelihoods import in_memory_split

    _, model, data = colour_checkpoint
    summary = evaluate(model, in_memory_split(data[:12]), samples=3, batch_size=6).summary()
    assert summary["likelihood"] == "logistic"
    assert summary["data_dim"] == 192
    assert 0 < summary["iwae_nll_bits_per_dim"] < 8 + 1  # a discrete 8-bit likelihood, not yet trained
    assert summary["iwae_nll_bits_per_dim"] == pytest.approx(summary["iwae_nll"] / (192 * math.log(2)))


def test_sample_writes_a_colour_grid_and_a_gif_of_the_drawing(colour_checkpoint, tmp_path, capsys):
    path, model, _ = colour_checkpoint
    out, gif_path = tmp_path / "samples.png", tmp_path / "drawing.gif"
    code = main(
        [
            "sample",
            str(path),
            "--num",
            "6",
            "--nrow",
            "3",
            "--scale",
            "3",
            "--out",
            str(out),
            "--gif",
            str(gif_path),
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert str(out) in printed
    assert str(gif_path) in printed
    png = Image.open(out)
    height, width = images.grid_size(2, 3, image_shape=(3, 8, 8), scale=3)
    assert png.size == (width, height)
    assert png.mode == "RGB"
    gif, frames = gif_frames(gif_path.read_bytes())
    assert gif.n_frames == model.steps
    assert gif.size == (width, height + 3 * BAR)
    # the last frame is the grid: the same samples (same seed), up to the GIF's palette
    last = np.asarray(frames[-1].crop((0, 0, width, height)), dtype=np.float32)
    grid = np.asarray(png.convert("RGB"), dtype=np.float32)
    assert np.abs(last - grid).mean() < 4
    red = torch.tensor(png.convert("RGB").getpixel((3 * (PAD + 4), 3 * (PAD + 4))))  # centre of the first tile
    assert red[0] > red[1]
    assert red[0] > red[2]


def test_sample_gif_needs_a_gif_name(colour_checkpoint, tmp_path, capsys):
    path, _, _ = colour_checkpoint
    code = main(["sample", str(path), "--gif", str(tmp_path / "a.png"), "--out", str(tmp_path / "s.png")])
    assert code == 2
    assert "--gif" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
