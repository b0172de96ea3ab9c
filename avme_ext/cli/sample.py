"""``avme sample``: PNG grids of samples, unrolled drawing steps and reconstructions; the drawing as a GIF."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import (
    EXIT_STATUS_HELP,
    CLIError,
    RawDefaultsFormatter,
    add_checkpoint_argument,
    add_device_arguments,
    add_seed_argument,
    check_output_path,
    load_model_for_cli,
    nonnegative_int,
    positive_int,
    resolve_device,
    resolve_model_source,
)
from ._data_options import add_data_options, datasets_epilog, load_run_images
from ._memory import FLOAT_BYTES, check_fits
from ._png_split import items_per_png, numbered_paths, split_note

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from avme_ext.images import GridOptions
    from avme_ext.model import AVME

DESCRIPTION = """\
Draw images from a trained model's prior and save them as a PNG grid.

An unconditional model gives a grid of --num samples (--nrow per row). A conditional model
gives one row per class with --per-class samples each. --unroll instead writes one strip per
row showing the canvas sigmoid(s_t) after every drawing step t = 1..K (the paper's Figures 8
and 9). --gif FILE also saves the drawing as an animated GIF: the same samples, laid out as in
the grid, after every step t = 1..K, with the finished drawing held. --reconstruct N also saves
N random images of --split (odd rows) above their reconstructions (even rows), from the data set
the run was trained on (the data options its checkpoint recorded; those given here override
them). Images have the
model's shape (grey or colour); what is drawn is the mean sigmoid(s_K) of p(x|z) (for the
logistic likelihood, the mean grey level or colour of every pixel). Grey images are white on
black (--invert: black on white), scaled up by --scale with nearest-neighbour upsampling. A grid
larger than image viewers open (Pillow's limit, about 89 megapixels: some 26,000 MNIST samples
at --scale 2) is written as numbered files (samples-1.png, samples-2.png, ...), with a note.

Everything is checked (model, data set, output names) and every image drawn before any file
is written; files are replaced atomically, so a failed or interrupted command leaves the old
files as they were. Prints the path of every file written."""

EPILOG = (
    """\
examples:
  avme sample runs/mnist --out samples.png                 # 8x8 grid of 64 samples
  avme sample runs/mnist --unroll --num 8 --out steps.png  # 8 strips of K steps
  avme sample runs/cond/best.safetensors --per-class 10    # 10 rows (digits 0-9) of 10
  avme sample runs/mnist --reconstruct 16 --seed 3
  avme sample runs/cifar --num 16 --out samples.png --gif drawing.gif   # grid and animation

"""
    + datasets_epilog()
    + "\n\n"
    + EXIT_STATUS_HELP
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="save a PNG grid of samples (or unrolled drawing steps, reconstructions)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RawDefaultsFormatter,
    )
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--num",
        type=positive_int,
        default=None,
        help="samples from an unconditional model (default: 64; 8 with --unroll)",
    )
    parser.add_argument(
        "--per-class",
        type=positive_int,
        default=None,
        metavar="N",
        help="conditional model: N samples for every class, one row per class (default: 8; 1 with --unroll)",
    )
    parser.add_argument("--out", default="samples.png", help="PNG file to write")
    parser.add_argument("--unroll", action="store_true", help="one strip per row showing sigmoid(s_t), t = 1..K")
    parser.add_argument(
        "--nrow",
        type=positive_int,
        default=None,
        help="tiles per row of a plain grid (default: about the square root of the number)",
    )
    parser.add_argument("--scale", type=positive_int, default=2, help="integer upscaling factor (nearest neighbour)")
    parser.add_argument("--invert", action="store_true", help="black digits on white (colours: their complements)")
    parser.add_argument(
        "--gif", default=None, metavar="FILE", help="also save the K drawing steps of the samples as an animated GIF"
    )
    parser.add_argument(
        "--reconstruct",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="also save N random images of --split above their reconstructions",
    )
    parser.add_argument(
        "--recon-out",
        default=None,
        help="PNG for --reconstruct (default: <--out stem>_recon.png)",
    )
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"), help="images for --reconstruct")
    add_seed_argument(parser)
    add_device_arguments(parser)
    add_data_options(parser, from_run=True)
    parser.set_defaults(
        func=run, memory_advice="ask for fewer images (--num, --per-class, --reconstruct) or a smaller --scale"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from avme_ext.checkpoint import atomic_write_bytes
    from avme_ext.images import drawing_frames, encode_gif

    out = check_output_path(args.out, "--out", suffix=".png")
    gif = check_output_path(args.gif, "--gif", suffix=".gif") if args.gif else None
    recon_out = None
    if args.reconstruct:
        recon_out = Path(args.recon_out) if args.recon_out else out.with_name(f"{out.stem}_recon.png")
        check_output_path(recon_out, "--recon-out", suffix=".png")
        if recon_out.resolve() == out.resolve():
            raise CLIError(f"--recon-out {recon_out} is the same file as --out; give another name")
    elif args.recon_out:
        raise CLIError("--recon-out needs --reconstruct N")
    device = resolve_device(args.device)
    source = resolve_model_source(args.checkpoint)
    model = load_model_for_cli(args, device, source)
    num_classes = model.num_classes
    if num_classes > 0 and args.num is not None:
        raise CLIError(f"this model is conditional ({num_classes} classes): use --per-class N instead of --num")
    if num_classes == 0 and args.per_class is not None:
        raise CLIError("--per-class needs a conditional model; this one is unconditional (use --num)")
    per_class = args.per_class or (1 if args.unroll else 8)
    num = args.num or (8 if args.unroll else 64)
    with_steps = args.unroll or gif is not None
    _check_memory(model, num_classes * per_class or num, with_steps, device)
    originals = _reconstruction_inputs(args, source.path, model, device) if args.reconstruct else None

    pages = _Pages(scale=args.scale, invert=args.invert, image_shape=model.image_shape)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if num_classes > 0:
        y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
        probs, steps = model.sample(y=y, generator=generator, return_steps=with_steps)
        per_row = per_class
    else:
        probs, steps = model.sample(num, generator=generator, return_steps=with_steps)
        per_row = args.nrow
    if args.unroll:
        assert steps is not None, "sampled with return_steps=True"
        files = pages.unrolled(out, steps)
    elif num_classes > 0:
        files = pages.classes(out, probs.view(num_classes, per_class, -1))
    else:
        files = pages.plain(out, probs, args.nrow)
    if originals is not None:
        assert recon_out is not None, "set with --reconstruct"
        x, labels = originals
        recon, _ = model.reconstruct(x, labels, generator=torch.Generator(device=device).manual_seed(args.seed + 1))
        files += pages.reconstructions(recon_out, x, recon)
    if gif is not None:
        assert steps is not None, "sampled with return_steps=True"
        files.append((gif, encode_gif(drawing_frames(steps, per_row, **pages.style))))

    for path, data in files:  # every image is ready: only now touch the files
        print(atomic_write_bytes(path, data))
    return 0


def _check_memory(model: AVME, count: int, with_steps: bool, device: torch.device) -> None:
    """Refuse up front a number of samples whose sampling cannot fit in memory (exit status 2)."""
    c = model.config
    per_sample = c.steps * c.latent_dim + 2 * c.data_dim + 6 * c.dec_hidden  # noise, canvas, output, decoder LSTM
    if with_steps:
        per_sample += 2 * c.steps * c.data_dim  # the canvas of every step and its sigmoid
    what = f"--num {count}" if model.num_classes == 0 else f"--per-class {count // model.num_classes} ({count} images)"
    check_fits(count * per_sample * FLOAT_BYTES, device, what, "ask for fewer images")


class _Pages:
    """The PNG files of one output: its grid, split into numbered files when it would be larger than
    image viewers open (:mod:`avme_ext.cli._png_split`), each encoded as soon as it is laid out."""

    def __init__(self, *, scale: int, invert: bool, image_shape: tuple[int, int, int]) -> None:
        self.scale, self.image_shape = scale, image_shape
        self.style: GridOptions = {"scale": scale, "invert": invert, "image_shape": image_shape}  # make_image_grid's

    def _pixels(self, rows: int, cols: int) -> int:
        from avme_ext.images import grid_size

        height, width = grid_size(rows, cols, scale=self.scale, image_shape=self.image_shape)
        return height * width

    def _files(
        self,
        path: Path,
        option: str,
        total: int,
        unit: str,
        pixels_of: Callable[[int], int],
        grid_of: Callable[[int, int], Tensor],
    ) -> list[tuple[Path, bytes]]:
        """``grid_of(start, stop)`` lays out the items [start, stop) of ``total``; one file per part."""
        from avme_ext.images import encode_png

        per_file = items_per_png(total, pixels_of)
        if per_file < total:
            note = split_note(option, path, total, per_file, unit, pixels_of(total) / 1e6)
            print(f"avme sample: note: {note}", file=sys.stderr, flush=True)
        starts = range(0, total, per_file)
        return [
            (part, encode_png(grid_of(start, min(start + per_file, total))))
            for part, start in zip(numbered_paths(path, len(starts)), starts, strict=True)
        ]

    def plain(self, path: Path, probs: Tensor, nrow: int | None) -> list[tuple[Path, bytes]]:
        """Samples (B, D), ``nrow`` per row (default: about square, in each file)."""
        from avme_ext.images import sample_grid, square_columns

        def pixels(n: int) -> int:
            cols = min(nrow or square_columns(n), n)
            return self._pixels(math.ceil(n / cols), cols)

        return self._files(
            path, "--out", len(probs), "samples", pixels, lambda a, b: sample_grid(probs[a:b], nrow, **self.style)
        )

    def classes(self, path: Path, probs: Tensor) -> list[tuple[Path, bytes]]:
        """Class samples (C, N, D), one row per class; a split cuts the columns."""
        from avme_ext.images import class_grid

        rows = probs.shape[0]
        return self._files(
            path,
            "--out",
            probs.shape[1],
            "samples per class",
            lambda n: self._pixels(rows, n),
            lambda a, b: class_grid(probs[:, a:b], **self.style),
        )

    def unrolled(self, path: Path, steps: Tensor) -> list[tuple[Path, bytes]]:
        """Strips (K, B, D), one row per sample."""
        from avme_ext.images import unrolled_strips_grid

        k = steps.shape[0]
        return self._files(
            path,
            "--out",
            steps.shape[1],
            "strips",
            lambda n: self._pixels(n, k),
            lambda a, b: unrolled_strips_grid(steps[:, a:b], **self.style),
        )

    def reconstructions(self, path: Path, x: Tensor, recon: Tensor) -> list[tuple[Path, bytes]]:
        """Images (B, D) above their reconstructions, 8 per row."""
        from avme_ext.images import reconstructions_grid

        def pixels(n: int) -> int:
            cols = min(_RECON_PER_ROW, n)
            return self._pixels(2 * math.ceil(n / cols), cols)

        return self._files(
            path,
            "--recon-out",
            len(x),
            "images",
            pixels,
            lambda a, b: reconstructions_grid(x[a:b], recon[a:b], _RECON_PER_ROW, **self.style),
        )


#: Images per row of the reconstructions grid.
_RECON_PER_ROW = 8


def _reconstruction_inputs(
    args: argparse.Namespace, checkpoint: Path, model: AVME, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """(x, y) of ``--reconstruct`` random images of ``--split`` of the data the model was trained on (unless the
    data options say otherwise; y None for an unconditional model)."""
    import torch

    split = load_run_images(args, checkpoint, model, " for --reconstruct")
    if args.reconstruct > len(split):
        raise CLIError(f"--reconstruct {args.reconstruct}: {split.name} has only {len(split)} images")
    if model.num_classes > 0 and not split.has_labels:
        raise CLIError(f"{split.name} has no labels, which a conditional model needs to reconstruct")
    pick = torch.Generator().manual_seed(args.seed)
    subset = split.subset(args.reconstruct, pick)
    x, y = subset.batch(torch.arange(len(subset)), generator=pick, device=device)
    return x, (y if model.num_classes > 0 else None)
