"""``avme sample``: PNG grids of samples, unrolled drawing steps and reconstructions."""

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
    cli_message,
    load_model_for_cli,
    nonnegative_int,
    positive_int,
    resolve_device,
)

if TYPE_CHECKING:
    import torch

DESCRIPTION = """\
Draw images from a trained model's prior and save them as a PNG grid.

An unconditional model gives a grid of --num samples (--nrow per row). A conditional model
gives one row per class with --per-class samples each. --unroll instead writes one strip per
row showing the canvas sigmoid(s_t) after every drawing step t = 1..K (the paper's Figures 8
and 9). --reconstruct N also saves N random images of --split (odd rows) above their
reconstructions (even rows). Images are white on black (--invert: black on white), scaled up
by --scale with nearest-neighbour upsampling.

Everything is checked (model, data set, output names) and every image drawn before any file
is written; files are replaced atomically, so a failed or interrupted command leaves the old
files as they were. Prints the path of every file written."""

EPILOG = """\
examples:
  avme sample runs/mnist --out samples.png                 # 8x8 grid of 64 samples
  avme sample runs/mnist --unroll --num 8 --out steps.png  # 8 strips of K steps
  avme sample runs/cond/best.safetensors --per-class 10    # 10 rows (digits 0-9) of 10
  avme sample runs/mnist --reconstruct 16 --seed 3

""" + EXIT_STATUS_HELP


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
    parser.add_argument("--invert", action="store_true", help="black digits on white")
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
    add_data_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..images import class_grid, reconstructions_grid, sample_grid, unrolled_strips_grid, write_png

    out = check_output_path(args.out, "--out", suffix=".png")
    recon_out = None
    if args.reconstruct:
        recon_out = Path(args.recon_out) if args.recon_out else out.with_name(f"{out.stem}_recon.png")
        check_output_path(recon_out, "--recon-out", suffix=".png")
        if recon_out.resolve() == out.resolve():
            raise CLIError(f"--recon-out {recon_out} is the same file as --out; give another name")
    elif args.recon_out:
        raise CLIError("--recon-out needs --reconstruct N")
    device = resolve_device(args.device)
    model = load_model_for_cli(args, device)
    num_classes = model.num_classes
    if num_classes > 0 and args.num is not None:
        raise CLIError(f"this model is conditional ({num_classes} classes): use --per-class N instead of --num")
    if num_classes == 0 and args.per_class is not None:
        raise CLIError("--per-class needs a conditional model; this one is unconditional (use --num)")
    originals = _reconstruction_inputs(args, model, device) if args.reconstruct else None

    style = {"scale": args.scale, "invert": args.invert}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if num_classes > 0:
        per_class = args.per_class or (1 if args.unroll else 8)
        y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
        probs, steps = model.sample(y=y, generator=generator, return_steps=args.unroll)
        grid = unrolled_strips_grid(steps, **style) if args.unroll else class_grid(
            probs.view(num_classes, per_class, -1), **style)
    else:
        num = args.num or (8 if args.unroll else 64)
        probs, steps = model.sample(num, generator=generator, return_steps=args.unroll)
        grid = unrolled_strips_grid(steps, **style) if args.unroll else sample_grid(probs, args.nrow, **style)
    grids = [(out, grid)]
    if originals is not None:
        x, y = originals
        recon, _ = model.reconstruct(x, y, generator=torch.Generator(device=device).manual_seed(args.seed + 1))
        grids.append((recon_out, reconstructions_grid(x, recon, **style)))

    for path, image in grids:  # every image is ready: only now touch the files
        print(write_png(image, path))
    return 0


def _reconstruction_inputs(args: argparse.Namespace, model, device: torch.device):
    """(x, y) of ``--reconstruct`` random images of ``--split`` (y None for an unconditional model)."""
    import torch

    from ..data import load_split

    try:
        split = load_split(args.dataset, args.split, args.data_root, args.download, args.seed)
    except (FileNotFoundError, ValueError) as error:
        raise CLIError(f"cannot load {args.dataset}/{args.split} for --reconstruct: {cli_message(error)}") from None
    if args.reconstruct > len(split):
        raise CLIError(f"--reconstruct {args.reconstruct}: {split.name} has only {len(split)} images")
    if model.num_classes > 0 and not split.has_labels:
        raise CLIError(f"{split.name} has no labels, which a conditional model needs to reconstruct")
    pick = torch.Generator().manual_seed(args.seed)
    subset = split.subset(args.reconstruct, pick)
    x, y = subset.batch(torch.arange(len(subset)), generator=pick, device=device)
    return x, (y if model.num_classes > 0 else None)
