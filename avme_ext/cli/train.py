"""``avme train``: train an AVME model with Adam; checkpoints, metrics, exact resume, DDP under torchrun.

Errors are raised, never printed here: TrainError (exit status 2, NonFiniteError 1), OptionError
(a ValueError, 2), CheckpointError, DataFormatError, FileNotFoundError, with messages in terms of
the command's options; the ``avme`` wrapper (``cli._common.run_subcommand``) reports them as one
line, and Ctrl-C while the run starts as one line with exit status 130.
"""

from __future__ import annotations

import argparse
from typing import Any

from avme_ext.choices import ENCODER_INPUTS, LIKELIHOODS
from avme_ext.config import AVMEConfig
from avme_ext.training.config import CLASSES_FROM_DATA, GRAPH_MODES, LR_SCHEDULES, MODEL_FIELDS, TrainConfig

from ._common import (
    EXIT_STATUS_HELP,
    RawDefaultsFormatter,
    add_device_arguments,
    add_switch,
    check_output_dir,
    nonnegative_int,
    positive_int,
)
from ._data_options import add_data_options, datasets_epilog

__all__ = ["given_options", "register", "run"]

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
(--batch-size, --lr, --lr-schedule, --lr-final, --lr-decay-epochs, --lr-hold-epochs, --clip-grad,
--seed, --kl-warmup-steps, the data options but --data-root and --download, --train-subset,
--valid-subset, --valid-batch-size, and the model options) cannot be changed; --epochs can be raised.
metrics.jsonl is truncated to the checkpoint, so records written after it by a killed run are
dropped and written again. --resume without a checkpoint in DIR yet starts a new run (with a
notice; with the settings of DIR/config.json when a launch that died before its first checkpoint
left one, options given now taking precedence), so 'torchrun --max-restarts N ... --resume' works
from the first launch.

Data: --dataset names the images (list below); the model's image shape (channels x height x width)
is the data's, and --conditional takes its classes. --likelihood bernoulli models 0/1 pixels: grey
images are binarized (--binarize; dynamic by default, a fresh seeded draw for every batch, so a resumed
run draws the same); colour images are refused (--channels 1 makes them grey). --likelihood logistic
models the 8-bit levels k/255 of grey or colour images. A data set without a validation split holds
one out of its training images by --split-seed (--valid-fraction); an image folder or npz file without
splits is split into train, valid and test the same way. config.json and every checkpoint record the
data options and the split (sizes, seed, rule, and a fingerprint of an image folder or npz file), so
'avme eval RUN' and 'avme sample RUN' find the same test images without being told.

Batches: the global batch i of an epoch is positions [i*B, (i+1)*B) of the epoch's permutation;
the final partial batch is kept (with N processes, unless it has fewer than N examples). At the
start the run prints its steps per epoch and, after its first few steps, the measured time per
epoch and for the whole run on the device it found; at the end, the seconds per epoch (training
and validation), also logged in the "epoch" records.

Speed on a GPU: with --graph auto (the default) a single-process run on CUDA records each training
step (forward, loss, backward, gradient clipping, Adam) in CUDA graphs once and replays them, with
no per-kernel launch cost; the last, smaller batch of an epoch runs eagerly. Several runs can share
one GPU: start one 'avme train' process per run (each with its own --out, and --device cuda:N to
choose the GPU); nothing in a run locks the device.

Signals: SIGINT (Ctrl-C) or SIGTERM save a checkpoint at the next step boundary and exit with
code 130 or 143; a second signal stops at once. A non-finite loss or gradient norm stops the run
(exit code 1, the message names the step and epoch) without touching the last checkpoint, unless
--skip-nonfinite (then the update is skipped, counted and reported).

Distributed: launch with torchrun; --batch-size is the global batch, split over the processes
(it must be divisible by their number). NCCL on GPUs (one per process, cuda:LOCAL_RANK), gloo on
CPUs. Each example gets the same data and noise whatever the number of processes, so N processes
train like one process with the same --batch-size (to float tolerance). Only rank 0 writes files.
Steps under torchrun run eagerly (--graph on is refused there).
"""

EPILOG = (
    """\
examples:
  avme train --out runs/mnist                       # 50 epochs on binarized MNIST (vendored)
  avme train --out runs/quick --overwrite --epochs 1 --train-subset 2000 --valid-subset 500 \\
      --enc-hidden 64 --dec-hidden 64 --latent-dim 16 --steps 4   # a first look; --overwrite: rerun at will
  avme train --out runs/mnist --resume --epochs 80   # continue (and extend) a run
  avme train --out runs/cond --conditional --kl-warmup-steps 5000 --checkpoint-every 200
  avme train --out runs/mnist-iwae --dataset mnist --binarize dynamic --download
  avme train --out runs/mnist-grey --dataset mnist --likelihood logistic --download
  avme train --out runs/cifar --dataset cifar10 --likelihood logistic --data-root data --download
  avme train --out runs/faces --dataset imagefolder --data-root faces/ --image-size 32 --likelihood logistic
  avme train --out runs/gpu1 --device cuda:1         # one of several runs sharing the GPUs
  torchrun --nproc_per_node=4 -m avme_ext train --out runs/ddp --batch-size 400
  torchrun --nnodes=2 --nproc_per_node=8 --max-restarts 3 --rdzv-backend=c10d \\
      --rdzv-endpoint=HOST:29500 -m avme_ext train --out /shared/runs/big --resume

"""
    + datasets_epilog()
    + "\n\n"
    + EXIT_STATUS_HELP
)


def _default(value: object) -> str:
    """The ``(default: X)`` of a help text: every option defaults to None ("not given"), so the
    formatter cannot show the value that applies."""
    return f"(default: {value})"


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run directory")
    run.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="run directory; an existing run is only continued with --resume or replaced with "
        "--overwrite " + _default("runs/NAME with --name, else a new runs/<timestamp>"),
    )
    run.add_argument("--name", default=None, help="name of the default run directory runs/NAME")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue DIR/last.safetensors exactly (a new run, with a notice, if there is none yet)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run files (config, metrics, checkpoints, tensorboard) of an existing DIR",
    )
    run.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        metavar="N",
        default=None,
        help="also write DIR/last.safetensors every N optimizer steps, mid-epoch; 0: only at epoch "
        "ends " + _default(_T.checkpoint_every),
    )
    run.add_argument(
        "--log-every",
        type=positive_int,
        metavar="N",
        default=None,
        help="write a 'train' record averaged over the last N steps (and at epoch end) " + _default(_T.log_every),
    )
    add_switch(
        run,
        "--tensorboard",
        default=None,
        help="write TensorBoard events to DIR/tensorboard; --tensorboard fails if torch.utils.tensorboard "
        "cannot be imported " + _default("on when it can"),
    )
    add_switch(run, "--progress", default=None, help="show a tqdm progress bar with the running loss " + _default("on"))


def _add_optimisation_options(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=None, help="total epochs " + _default(_T.epochs))
    optim.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="GLOBAL batch size, split across torchrun processes " + _default(_T.batch_size),
    )
    optim.add_argument("--lr", type=float, default=None, help="Adam learning rate " + _default(f"{_T.lr:g}"))
    optim.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=None,
        help="learning rate of each step: constant (--lr throughout) or cosine (--lr for "
        "--lr-hold-epochs, then down to --lr-final along half a cosine over --lr-decay-epochs, "
        "then --lr-final) " + _default(_T.lr_schedule),
    )
    optim.add_argument(
        "--lr-final",
        type=float,
        metavar="LR",
        default=None,
        help="cosine only: the rate at the end of the decay, in [0, --lr] " + _default("0"),
    )
    optim.add_argument(
        "--lr-decay-epochs",
        type=positive_int,
        metavar="N",
        default=None,
        help="cosine only: epochs of the decay, fixed when the run starts (a resume with a larger "
        "--epochs keeps it) " + _default("--epochs of the first launch minus --lr-hold-epochs"),
    )
    optim.add_argument(
        "--lr-hold-epochs",
        type=nonnegative_int,
        metavar="N",
        default=None,
        help="cosine only: epochs at --lr before the decay starts " + _default("0"),
    )
    optim.add_argument(
        "--clip-grad",
        type=float,
        metavar="NORM",
        default=None,
        help="clip the global gradient norm to NORM; 0 disables " + _default(f"{_T.clip_grad:g}"),
    )
    optim.add_argument(
        "--kl-warmup-steps",
        type=nonnegative_int,
        metavar="N",
        default=None,
        help="KL weight rises linearly from 0 to 1 over the first N steps; 0: always 1 " + _default(_T.kl_warmup_steps),
    )
    optim.add_argument(
        "--seed",
        type=nonnegative_int,
        default=None,
        help="seed of the initialisation, data order, noise and subsets " + _default(_T.seed),
    )
    optim.add_argument(
        "--patience",
        type=nonnegative_int,
        metavar="N",
        default=None,
        help="early stopping: end the run once N epochs have passed without a better validation "
        "negative ELBO (best.safetensors keeps the best epoch); 0: never " + _default(_T.patience),
    )
    optim.add_argument(
        "--skip-nonfinite",
        action="store_const",
        const=True,
        default=None,
        help="skip (and count) updates with a non-finite loss or gradient instead of stopping",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--num-classes",
        type=nonnegative_int,
        metavar="C",
        default=None,
        help="C > 0: conditional on labels 0..C-1; 0: unconditional " + _default(_M.num_classes),
    )
    model.add_argument(
        "--conditional",
        dest="num_classes",
        action="store_const",
        const=CLASSES_FROM_DATA,
        help="conditional on the data set's labels: --num-classes set to its number of classes",
    )
    model.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        default=None,
        help="p(x|z) of a pixel: bernoulli (0/1 pixels: binary or binarized grey images) or logistic "
        "(a discretized logistic on 8-bit grey or colour levels), both with mean sigmoid(s_K) "
        + _default(_M.likelihood),
    )
    for option, what, default in (
        ("--enc-hidden", "encoder LSTM units", _M.enc_hidden),
        ("--dec-hidden", "decoder LSTM units", _M.dec_hidden),
        ("--latent-dim", "latent size per step", _M.latent_dim),
        ("--steps", "drawing steps K", _M.steps),
    ):
        model.add_argument(option, type=positive_int, default=None, help=f"{what} " + _default(default))
    model.add_argument(
        "--encoder-input",
        choices=ENCODER_INPUTS,
        default=None,
        help="what the encoder reads besides x: the canvas (the paper's) or DRAW's error image "
        + _default(_M.encoder_input),
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    add_data_options(data, given_only=True)
    data.add_argument(
        "--train-subset",
        type=positive_int,
        metavar="N",
        default=None,
        help="train on a random subset of N training images (quick runs) " + _default("all"),
    )
    data.add_argument(
        "--valid-subset",
        type=nonnegative_int,
        metavar="N",
        default=None,
        help="validate on a random subset of N validation images; 0 disables validation " + _default("all"),
    )
    data.add_argument(
        "--valid-batch-size",
        type=positive_int,
        metavar="N",
        default=None,
        help="images per validation chunk " + _default(_T.valid_batch_size),
    )


def _add_hardware_options(parser: argparse.ArgumentParser) -> None:
    hw = parser.add_argument_group("hardware")
    add_device_arguments(hw, given_only=True)
    hw.add_argument(
        "--graph",
        choices=GRAPH_MODES,
        default=None,
        help="record the training step in CUDA graphs and replay it: auto (on CUDA in a single "
        "process), on (an error elsewhere), off " + _default(_T.graph),
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    """Every option defaults to None: None means "not given" (defaults, or the checkpoint's on --resume)."""
    _add_run_options(parser)
    _add_optimisation_options(parser)
    _add_model_options(parser)
    _add_data_options(parser)
    _add_hardware_options(parser)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train a model (checkpoints, metrics, --resume, torchrun)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RawDefaultsFormatter,
    )
    _add_options(parser)
    parser.set_defaults(func=run, memory_advice="use a smaller --batch-size or --valid-batch-size")


_NOT_OPTIONS = {"out", "name", "resume", "overwrite", "func", "command"}


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training and model options given explicitly on the command line."""
    known = set(TrainConfig.field_names()) | set(MODEL_FIELDS)
    return {k: v for k, v in vars(args).items() if k in known and k not in _NOT_OPTIONS and v is not None}


def run(args: argparse.Namespace) -> int:
    """Run ``avme train``; returns the exit code (0, or 130/143 after a signal). Errors are raised."""
    import os
    from pathlib import Path

    from avme_ext.training import train

    if os.environ.get("RANK", "0") == "0":  # only rank 0 writes the run directory
        given = args.out is not None
        out = Path(args.out) if given else Path("runs", args.name or "<timestamp>")
        check_output_dir(out, "--out" if given else "the default --out")
    return train(given_options(args), out=args.out, name=args.name, resume=args.resume, overwrite=args.overwrite)
