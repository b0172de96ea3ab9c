"""``avme export``: a small weights-only file of a run's model, to ship or to register as pretrained."""

from __future__ import annotations

import argparse

from ..choices import EXPORT_DTYPE_NAMES
from ._common import (
    EXIT_STATUS_HELP,
    CLIError,
    RawDefaultsFormatter,
    check_output_path,
    checkpoint_cli_error,
)

DESCRIPTION = """\
Write the weights of a run's model (its best checkpoint, or the checkpoint file given) to a
single safetensors file: the weights cast to --dtype, the model config and the provenance
(source checkpoint and its SHA-256, training options, step and epoch, versions) in the header,
and no optimizer or generator state. At the paper's sizes a float16 file is about 10 MB.

'avme sample FILE', 'avme eval FILE' and avme_ext.checkpoint.load_model(FILE) read it (the
weights come back as float32), without pickle. The file is written atomically."""

EPILOG = """\
examples:
  avme export runs/mnist --out mnist-fp16.safetensors
  avme export runs/mnist/last.safetensors --out last-fp32.safetensors --dtype float32

""" + EXIT_STATUS_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a small weights-only file of a run's model (float16 by default)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RawDefaultsFormatter,
    )
    parser.add_argument("run", metavar="RUN",
                        help="a run directory (its best.safetensors, else last.safetensors) or a .safetensors checkpoint")
    parser.add_argument("--out", metavar="FILE", required=True, help="the .safetensors file to write")
    parser.add_argument("--dtype", default="float16", choices=EXPORT_DTYPE_NAMES,
                        help="dtype of the stored weights")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError, export_weights, resolve_checkpoint

    out = check_output_path(args.out, "--out", suffix=".safetensors")
    try:
        source = resolve_checkpoint(args.run)
        if out.exists() and out.resolve() == source.resolve():
            raise CLIError(f"--out {out} is the checkpoint being exported; give another file name")
        path = export_weights(source, out, dtype=args.dtype)
    except (FileNotFoundError, CheckpointError) as error:
        raise checkpoint_cli_error(args, args.run, error) from None
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {args.dtype})")
    return 0
