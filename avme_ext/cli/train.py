"""``avme train``: train an AVME model with Adam; checkpoints, metrics, exact resume, DDP under torchrun."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..checkpoint import CheckpointError
from ..config import AVMEConfig
from ..core import IMPLS
from ..data import DATASETS, DataFormatError
from ..ops import PRECISIONS
from ..loop_types import ENCODER_INPUTS
from ..train import MODEL_FIELDS, TrainConfig, TrainError

__all__ = ["register", "run", "given_options"]

_T = TrainConfig()
_M = AVMEConfig()

DESCRIPTION = """\
Train an AVME model (a recurrent VAE drawing an image over K steps) with Adam on the negative ELBO.

Every epoch the run directory (--out) gets the validation ELBO, metrics.jsonl (JSON lines of kind
"train", "valid" and "epoch"), last.safetensors and, when validation improves, best.safetensors
(best by validation negative ELBO); config.json holds the model config and every training argument.
Checkpoints are single safetensors files written atomically: a run killed at any moment keeps its
last complete checkpoint. TensorBoard events go to DIR/tensorboard when torch.utils.tensorboard is
importable (pip install tensorboard).

Resume: --resume continues DIR exactly where it stopped; on CPU the final weights equal an
uninterrupted run's bit for bit. The epoch order is a function of (seed, epoch) and the noise of a
step a function of (seed, step), so a mid-epoch checkpoint (--checkpoint-every) resumes mid-epoch.
Options left out on --resume are taken from the checkpoint; those that define the trajectory
(--batch-size, --lr, --clip-grad, --seed, --kl-warmup-steps, --dataset, --train-subset,
--valid-subset, --valid-batch-size, and the model sizes) cannot be changed; --epochs can be raised.
metrics.jsonl is truncated to the checkpoint, so records written after it by a killed run are
dropped and written again. --resume without a checkpoint in DIR yet starts a new run (with a
notice; with the settings of DIR/config.json when a launch that died before its first checkpoint
left one, options given now taking precedence), so 'torchrun --max-restarts N ... --resume' works
from the first launch.

Batches: the global batch i of an epoch is positions [i*B, (i+1)*B) of the epoch's permutation;
the final partial batch is kept (with N processes, unless it has fewer than N examples). At the
end the run prints the seconds per epoch (training and validation), also logged in the "epoch"
records.

Signals: SIGINT (Ctrl-C) or SIGTERM save a checkpoint at the next step boundary and exit with
code 130 or 143; a second signal stops at once. A non-finite loss or gradient norm stops the run
(exit code 1, the message names the step and epoch) without touching the last checkpoint, unless
--skip-nonfinite (then the update is skipped, counted and reported).

Distributed: launch with torchrun; --batch-size is the global batch, split over the processes
(it must be divisible by their number). NCCL on GPUs (one per process, cuda:LOCAL_RANK), gloo on
CPUs. Each example gets the same data and noise whatever the number of processes, so N processes
train like one process with the same --batch-size (to float tolerance). Only rank 0 writes files.
"""

EPILOG = """\
examples:
  avme train --out runs/mnist                       # 50 epochs on binarized MNIST (vendored)
  avme train --out runs/quick --epochs 1 --train-subset 2000 --valid-subset 500 \\
      --enc-hidden 64 --dec-hidden 64 --latent-dim 16 --steps 4
  avme train --out runs/mnist --resume --epochs 80   # continue (and extend) a run
  avme train --out runs/cond --conditional --kl-warmup-steps 5000 --checkpoint-every 200
  torchrun --nproc_per_node=4 -m avme_ext train --out runs/ddp --batch-size 400
  torchrun --nnodes=2 --nproc_per_node=8 --max-restarts 3 --rdzv-backend=c10d \\
      --rdzv-endpoint=HOST:29500 -m avme_ext train --out /shared/runs/big --resume
"""


def _add_options(parser: argparse.ArgumentParser) -> None:
    """Every option defaults to None: None means "not given" (defaults, or the checkpoint's on --resume)."""
    run = parser.add_argument_group("run directory")
    run.add_argument("--out", metavar="DIR", default=None,
                     help="run directory (default: runs/<--name or a timestamp>); an existing run is only "
                          "continued with --resume or replaced with --overwrite")
    run.add_argument("--name", default=None, help="name of the default run directory runs/NAME")
    run.add_argument("--resume", action="store_true",
                     help="continue DIR/last.safetensors exactly (a new run, with a notice, if there is none yet)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run files (config, metrics, checkpoints, tensorboard) of an existing DIR")
    run.add_argument("--checkpoint-every", type=int, metavar="N", default=None,
                     help="also write DIR/last.safetensors every N optimizer steps (mid-epoch; default 0: "
                          "only at epoch ends)")
    run.add_argument("--log-every", type=int, metavar="N", default=None,
                     help=f"write a 'train' record averaged over the last N steps (and at epoch end) "
                          f"(default {_T.log_every})")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                     help="write TensorBoard events to DIR/tensorboard (default: when torch.utils.tensorboard "
                          "is importable; --tensorboard fails if it is not)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a tqdm progress bar with the running loss (default: on)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=None, help=f"total epochs (default {_T.epochs})")
    optim.add_argument("--batch-size", type=int, default=None,
                       help=f"GLOBAL batch size, split across torchrun processes (default {_T.batch_size})")
    optim.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {_T.lr:g})")
    optim.add_argument("--clip-grad", type=float, metavar="NORM", default=None,
                       help=f"clip the global gradient norm to NORM; 0 disables (default {_T.clip_grad:g})")
    optim.add_argument("--kl-warmup-steps", type=int, metavar="N", default=None,
                       help="KL weight rises linearly from 0 to 1 over the first N steps (default 0: always 1)")
    optim.add_argument("--seed", type=int, default=None,
                       help=f"seed of the initialisation, data order, noise and subsets (default {_T.seed})")
    optim.add_argument("--skip-nonfinite", action="store_const", const=True, default=None,
                       help="skip (and count) updates with a non-finite loss or gradient instead of stopping")

    model = parser.add_argument_group("model")
    model.add_argument("--num-classes", type=int, choices=(0, 10), default=None,
                       help="10: conditional on the digit label; 0: unconditional (default)")
    model.add_argument("--conditional", dest="num_classes", action="store_const", const=10,
                       help="same as --num-classes 10")
    model.add_argument("--enc-hidden", type=int, default=None, help=f"encoder LSTM units (default {_M.enc_hidden})")
    model.add_argument("--dec-hidden", type=int, default=None, help=f"decoder LSTM units (default {_M.dec_hidden})")
    model.add_argument("--latent-dim", type=int, default=None, help=f"latent size per step (default {_M.latent_dim})")
    model.add_argument("--steps", type=int, default=None, help=f"drawing steps K (default {_M.steps})")
    model.add_argument("--encoder-input", choices=ENCODER_INPUTS, default=None,
                       help="what the encoder reads besides x: the canvas (paper, default) or DRAW's error image")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=None, help=f"data set (default {_T.dataset}, vendored)")
    data.add_argument("--data-root", metavar="DIR", default=None,
                      help="where the data files are (default: vendored copy / $AVME_DATA_ROOT or ~/.cache/avme_data)")
    data.add_argument("--download", action="store_const", const=True, default=None,
                      help="download missing data files")
    data.add_argument("--train-subset", type=int, metavar="N", default=None,
                      help="train on a random subset of N training images (quick runs)")
    data.add_argument("--valid-subset", type=int, metavar="N", default=None,
                      help="validate on a random subset of N validation images; 0 disables validation "
                           "(default: all)")
    data.add_argument("--valid-batch-size", type=int, metavar="N", default=None,
                      help=f"images per validation chunk (default {_T.valid_batch_size})")

    hw = parser.add_argument_group("hardware")
    hw.add_argument("--device", default=None,
                    help="auto (CUDA when present, default), cpu, cuda; under torchrun CUDA means cuda:LOCAL_RANK")
    hw.add_argument("--impl", choices=IMPLS, default=None,
                    help="auto (fused CUDA ops when built, default), cuda (fused, error if unavailable), ref")
    hw.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="matrix-product precision of the fused ops (default fp32)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train a model (checkpoints, metrics, --resume, torchrun)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_options(parser)
    parser.set_defaults(func=run)


_NOT_OPTIONS = {"out", "name", "resume", "overwrite", "func", "command"}


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training and model options given explicitly on the command line."""
    known = set(TrainConfig.field_names()) | set(MODEL_FIELDS)
    return {k: v for k, v in vars(args).items() if k in known and k not in _NOT_OPTIONS and v is not None}


def run(args: argparse.Namespace) -> int:
    """Run ``avme train``; returns the exit code (errors are printed, exit code 1)."""
    from .. import distributed
    from ..train import train

    try:
        return train(given_options(args), out=args.out, name=args.name, resume=args.resume,
                     overwrite=args.overwrite)
    except (TrainError, CheckpointError, DataFormatError, FileNotFoundError, ValueError) as error:
        try:
            info = distributed.detect()
            prefix = f"[rank {info.rank}] " if info.distributed else ""
        except RuntimeError:
            prefix = ""
        print(f"{prefix}avme train: error: {error}", file=sys.stderr, flush=True)
        return 1
