"""Write a small colour image data set without downloading anything: coloured shapes in class folders.

Each image is one shape (the class: circle, square or triangle) of a random bright colour, position
and size on a random dark background, drawn four times larger and scaled down by averaging
(antialiased edges). The folder is what ``avme train --dataset imagefolder`` reads: one subfolder
per class, PNG files in it. The images are a function of --num, --size and --seed, so anyone gets the
same ones (and ``avme eval`` the same held-out test images). Use it to try the colour path
(``--likelihood logistic``) in a few CPU minutes; the README's "Data sets" section shows what this gives:

    python python/make_shapes.py --out shapes    # 6,000 RGB images, 32 x 32, in shapes/{circle,square,triangle}/
    avme train --out runs/shapes --dataset imagefolder --data-root shapes/ --image-size 16 --likelihood logistic \\
        --enc-hidden 128 --dec-hidden 128 --latent-dim 16 --steps 8 --epochs 50 --batch-size 50 \\
        --lr 3e-3 --lr-schedule cosine --lr-hold-epochs 25
    avme eval runs/shapes --samples 100
    avme sample runs/shapes --num 64 --scale 4 --reconstruct 16 --out samples.png
    avme sample runs/shapes --unroll --num 9 --scale 4 --out strips.png --gif steps.gif
"""

from __future__ import annotations

import argparse
import colorsys
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

#: The classes, in the order images are assigned to them (image i is of class i mod 3).
SHAPES = ("circle", "square", "triangle")
#: Shapes are drawn this many times larger than the image, then scaled down (antialiasing).
SUPERSAMPLE = 4
#: The shape's extent (side of its bounding square) as a share of the image side: [min, max).
EXTENT = (0.4, 0.75)
#: HSV value (brightness) ranges of the background and of the shape: the shape is always brighter.
BACKGROUND_VALUE = (0.05, 0.35)
SHAPE_VALUE = (0.8, 1.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make_shapes.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("shapes"),
                        help="folder to write (it gets one subfolder per shape) (default: shapes)")
    parser.add_argument("--num", type=int, default=6000,
                        help="images in all, spread evenly over the three shapes (default: 6000)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every colour, position and size (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shape subfolders of a folder that already has files")
    args = parser.parse_args(argv)
    if args.num < len(SHAPES):
        parser.error(f"--num must be at least {len(SHAPES)} (one image per shape), got {args.num}")
    if args.size < 8:
        parser.error(f"--size must be at least 8 pixels, got {args.size}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder, got the file {args.out}")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} already has files; choose an empty folder or add --overwrite")
    return args


def random_colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, shape) as 8-bit RGB: a dark background and a bright shape of independent random hues,
    so the shape stands out whatever the two hues are."""

    def rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        return round(255 * r), round(255 * g), round(255 * b)

    background = rgb(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(*BACKGROUND_VALUE))
    shape = rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(*SHAPE_VALUE))
    return background, shape


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``size`` x ``size`` pixels: ``shape`` (one of :data:`SHAPES`) of random colour,
    extent (a share :data:`EXTENT` of the side) and position (wholly inside the image)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    background, colour = random_colours(rng)
    big = size * SUPERSAMPLE
    extent = rng.uniform(*EXTENT) * big
    left, top = rng.uniform(0, big - extent, size=2)
    box = (left, top, left + extent, top + extent)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:  # an upright triangle filling its box
        draw.polygon([(left, top + extent), (left + extent, top + extent), (left + extent / 2, top)], fill=colour)
    return image.resize((size, size), Image.Resampling.BOX)


def write_shapes(out: Path, num: int, size: int, seed: int) -> list[Path]:
    """Write ``num`` PNG images to ``out/<shape>/<index>.png`` (image i is of shape ``SHAPES[i % 3]``);
    returns their paths. The images are a function of (num, size, seed): one seeded generator draws
    them in order."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        (out / shape).mkdir(parents=True, exist_ok=True)
        for old in (out / shape).glob("*.png"):
            old.unlink()
    digits = len(str(num - 1))
    paths = []
    for index in tqdm(range(num), desc=f"writing {out}", unit="image"):
        shape = SHAPES[index % len(SHAPES)]
        path = out / shape / f"{index:0{digits}d}.png"
        draw_shape(shape, size, rng).save(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths = write_shapes(args.out, args.num, args.size, args.seed)
    print(f"wrote {len(paths)} images of {args.size} x {args.size} pixels to {args.out}/{{{','.join(SHAPES)}}}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
