"""``avme sample``: PNG grids of samples, unrolled drawing steps and reconstructions; the drawing as a GIF."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import (
    EXIT_STATUS_HELP,
    CLIError,
    RawDefaultsFormatter,
    add_checkpoint_argument,
    add_data_arguments,
    add_device_arguments,
    add_seed_argument,
    check_output_path,
    load_model_for_cli,
    nonnegative_int,
    positive_int,
    resolve_device,
    resolve_model_source,
)
from ._data_options import datasets_epilog, load_run_images

if TYPE_CHECKING:
    import torch

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
black (--invert: black on white), scaled up by --scale with nearest-neighbour upsampling.

Everything is checked (model, data set, output names) and every image drawn before any file
is written; files are replaced atomically, so a failed or interrupted command leaves the old
files as they were. Prints the path of every file written."""

EPILOG = """\
examples:
  avme sample runs/mnist --out samples.png                 # 8x8 grid of 64 samples
  avme sample runs/mnist --unroll --num 8 --out steps.png  # 8 strips of K steps
  avme sample runs/cond/best.safetensors --per-class 10    # 10 rows (digits 0-9) of 10
  avme sample runs/mnist --reconstruct 16 --seed 3
  avme sample runs/cifar --num 16 --out samples.png --gif drawing.gif   # grid and animation

""" + datasets_epilog() + "\n\n" + EXIT_STATUS_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="save a PNG grid of samples (or unrolled drawing steps, reconstructions)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RawDefaultsFormatter,
    )
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--num", type=positive_int, default=None,
        help="samples from an unconditional model (default: 64; 8 with --unroll)",
    )
    parser.add_argument(
        "--per-class", type=positive_int, default=None, metavar="N",
        help="conditional model: N samples for every class, one row per class (default: 8; 1 with --unroll)",
    )
    parser.add_argument("--out", default="samples.png", help="PNG file to write")
    parser.add_argument("--unroll", action="store_true", help="one strip per row showing sigmoid(s_t), t = 1..K")
    parser.add_argument("--nrow", type=positive_int, default=None,
                        help="tiles per row of a plain grid (default: about the square root of the number)")
    parser.add_argument("--scale", type=positive_int, default=2, help="integer upscaling factor (nearest neighbour)")
    parser.add_argument("--invert", action="store_true", help="black digits on white (colours: their complements)")
    parser.add_argument("--gif", default=None, metavar="FILE",
                        help="also save the K drawing steps of the samples as an animated GIF")
    parser.add_argument(
        "--reconstruct", type=nonnegative_int, default=0, metavar="N",
        help="also save N random images of --split above their reconstructions",
    )
    parser.add_argument(
        "--recon-out", default=None, help="PNG for --reconstruct (default: <--out stem>_recon.png)",
    )
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"), help="images for --reconstruct")
    add_seed_argument(parser)
    add_device_arguments(parser)
    add_data_arguments(parser, from_run=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..images import (
        class_grid,
        drawing_frames,
        reconstructions_grid,
        sample_grid,
        unrolled_strips_grid,
        write_gif,
        write_png,
    )

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
    originals = _reconstruction_inputs(args, source.path, model, device) if args.reconstruct else None

    style = {"scale": args.scale, "invert": args.invert, "image_shape": model.image_shape}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with_steps = args.unroll or gif is not None
    if num_classes > 0:
        per_class = args.per_class or (1 if args.unroll else 8)
        y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
        probs, steps = model.sample(y=y, generator=generator, return_steps=with_steps)
        grid = unrolled_strips_grid(steps, **style) if args.unroll else class_grid(
            probs.view(num_classes, per_class, -1), **style)
        per_row = per_class
    else:
        num = args.num or (8 if args.unroll else 64)
        probs, steps = model.sample(num, generator=generator, return_steps=with_steps)
        grid = unrolled_strips_grid(steps, **style) if args.unroll else sample_grid(probs, args.nrow, **style)
        per_row = args.nrow
    frames = drawing_frames(steps, per_row, **style) if gif is not None else None
    grids = [(out, grid)]
    if originals is not None:
        x, y = originals
        recon, _ = model.reconstruct(x, y, generator=torch.Generator(device=device).manual_seed(args.seed + 1))
        grids.append((recon_out, reconstructions_grid(x, recon, **style)))

    for path, image in grids:  # every image is ready: only now touch the files
        print(write_png(image, path))
    if frames is not None:
        print(write_gif(frames, gif))
    return 0


def _reconstruction_inputs(args: argparse.Namespace, checkpoint: Path, model, device: torch.device):
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
