"""What every ``avme`` subcommand shares: its options, its help format, its errors and exit codes.

* :func:`run_subcommand` runs a parsed subcommand: it applies ``--threads``, turns SIGINT and
  SIGTERM into a one-line message and exit status 130 / 143, and reports errors as one line
  ``avme <command>: error: <message>`` with the exit status of :data:`EXIT_STATUS_HELP`.
* :class:`CLIError` is an error the user can fix (``exit_code`` 2 by default). Any exception with
  an integer ``exit_code`` attribute is reported the same way; an exception with a ``cli_hint``
  attribute is reported with that command-line wording instead of its Python wording.
* :class:`CommandParser` is the parser of every subcommand: argument errors are one line too.
* :class:`RawDefaultsFormatter` is the one help formatter: ``(default: X)`` after every option
  that has a default, ``on``/``off`` for switches, description line breaks kept.
* Argument helpers: :func:`add_checkpoint_argument`,
  :func:`add_device_arguments`, :func:`add_seed_argument`, :func:`add_switch`,
  :func:`add_threads_argument`; argparse types :func:`positive_int`, :func:`nonnegative_int`.
* :func:`load_model_for_cli` loads a run directory, a checkpoint or weights file, or a
  pretrained model by name; :func:`checkpoint_cli_error` words a checkpoint that cannot be read
  the same in every command (with the exact command that uses an intact ``last.safetensors``).
* :func:`check_output_path` and :func:`check_output_dir` refuse an output that cannot be written
  before any work starts, naming the reason (read-only file system, permission denied, ...).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from avme_ext.choices import IMPLS, PRECISIONS

from ._memory import out_of_memory_message

if TYPE_CHECKING:
    import torch

    from avme_ext.checkpoint import CheckpointError
    from avme_ext.model import AVME

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_STATUS_HELP",
    "EXIT_USAGE",
    "CLIError",
    "CommandParser",
    "ModelSource",
    "RawDefaultsFormatter",
    "add_checkpoint_argument",
    "add_device_arguments",
    "add_seed_argument",
    "add_switch",
    "add_threads_argument",
    "apply_threads",
    "check_output_dir",
    "check_output_path",
    "checkpoint_cli_error",
    "cli_message",
    "fail",
    "load_model_for_cli",
    "parse_and_run",
    "nonnegative_int",
    "positive_int",
    "resolve_device",
    "resolve_model_source",
    "run_subcommand",
    "write_error_reason",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # the command failed while working (non-finite loss, disk full, ...)
EXIT_USAGE = 2  # bad arguments or unusable input files (argparse uses 2 as well)
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

EXIT_STATUS_HELP = """\
exit status (every command):
  0    done
  1    failed while working (e.g. a non-finite loss, a full disk); outputs are left as they were
  2    bad arguments or unusable input files (missing, corrupt, of the wrong kind); nothing written
  130  interrupted by SIGINT (Ctrl-C); 143: stopped by SIGTERM
errors are one line on stderr: 'avme <command>: error: <message>'"""


class CLIError(Exception):
    """A problem the user can fix, reported as one line without a traceback.

    Args:
        message: what is wrong and what to do, in command-line terms (option names, commands).
        exit_code: :data:`EXIT_USAGE` (bad arguments or input files, the default) or
            :data:`EXIT_FAILURE` (a failure while working).
    """

    def __init__(self, message: object, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(str(message))
        self.exit_code = exit_code


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM while a subcommand runs (like KeyboardInterrupt for SIGINT)."""


# --------------------------------------------------------------------------- parser
class CommandParser(argparse.ArgumentParser):
    """The parser of ``avme`` and of every subcommand (``add_subparsers`` makes its subparsers of
    the same class): an argument error is one line on stderr,
    ``avme <command>: error: <message> (see 'avme <command> --help')``, and exit status 2, the
    convention of every other error (argparse itself prints the usage first)."""

    def parse_args(  # type: ignore[override]  # one signature for typeshed's two overloads
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse's, but an unrecognized argument is reported by the subcommand it was given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._chosen_subparser(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _chosen_subparser(self, namespace: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen: argparse.ArgumentParser | None = action.choices.get(getattr(namespace, action.dest, None) or "")
                if chosen is not None:
                    return chosen
        return self

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{_rank_prefix()}{self.prog}: error: {text} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- help
class RawDefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The help format of every subcommand: ``(default: X)`` after each option that has a default, the
    description and epilog line breaks kept (for examples).

    A switch (:func:`add_switch`) shows ``(default: on)`` or ``(default: off)``; a plain flag
    (``store_true``) and an option whose default is None show nothing unless their help states
    ``(default: ...)`` itself, which is how an option whose default depends on others says so.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is False or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


def add_switch(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *, default: bool | None, help: str
) -> argparse.Action:
    """Add ``--name`` / ``--no-name`` (``argparse.BooleanOptionalAction``), shown as ``(default: on|off)``."""
    action = parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help)
    action.help = help  # Python < 3.13 appends its own "(default: True)"; the formatter writes on/off
    return action


# --------------------------------------------------------------------------- argument types and helpers
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _parsed_int(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _parsed_int(text, 0)


def _parsed_int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """Add ``--threads N``: CPU threads of PyTorch's operators, applied by :func:`run_subcommand`.

    On the top-level parser it defaults to None; on a subcommand it is only set when given, so
    ``avme --threads 2 eval ...`` and ``avme eval ... --threads 2`` both work.
    """
    parser.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        default=None if top_level else argparse.SUPPRESS,
        help="CPU threads for PyTorch's operators (torch.set_num_threads), set before any work; on a shared "
        "machine a value at or below your share of the cores avoids oversubscription "
        f"(default: PyTorch's: OMP_NUM_THREADS, {_omp_num_threads()}, else one per physical core)",
    )


def _omp_num_threads() -> str:
    """How ``--threads``'s help shows ``OMP_NUM_THREADS`` here (read without importing torch)."""
    value = os.environ.get("OMP_NUM_THREADS")
    return f"{value} here" if value else "unset here"


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given; None leaves PyTorch's default."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def add_device_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, precision: bool = True, given_only: bool = False
) -> None:
    """Add ``--device``, ``--impl`` (and ``--precision`` unless ``precision=False``).

    ``given_only=True`` makes every default None ("not given"), for a subcommand that fills in
    defaults later (``avme train --resume`` takes them from the checkpoint); the help text then
    states the default.
    """
    parser.add_argument(
        "--device",
        default=None if given_only else "auto",
        help="torch device: 'auto' (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:1', ...; under "
        "torchrun a CUDA device is cuda:LOCAL_RANK" + (" (default: auto)" if given_only else ""),
    )
    parser.add_argument(
        "--impl",
        default=None if given_only else "auto",
        choices=IMPLS,
        help="K-step loop: 'cuda' fused kernels (an error when not built), 'ref' pure PyTorch, 'auto' the fused "
        "kernels where the committed benchmark measured them faster on this GPU, batch size and model size, "
        "else pure PyTorch" + (" (default: auto)" if given_only else ""),
    )
    if precision:
        parser.add_argument(
            "--precision",
            default=None if given_only else PRECISIONS[0],
            choices=PRECISIONS,
            help="matrix-product precision of the fused CUDA ops (the reference computes in fp32)"
            + (f" (default: {PRECISIONS[0]})" if given_only else ""),
        )


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"``/None → ``cuda`` if available else ``cpu``; otherwise ``torch.device(name)``
    (see :func:`avme_ext.distributed.resolve_device`, which this wraps for one process).

    Raises:
        CLIError: the name is not a device, or names a CUDA device that is not present.
    """
    from avme_ext.distributed import DistInfo
    from avme_ext.distributed import resolve_device as resolve_for_process

    try:
        return resolve_for_process("auto" if name is None else str(name), DistInfo())
    except ValueError as error:
        raise CLIError(str(error)) from None


def add_seed_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: int | None = 0) -> None:
    """Add ``--seed`` (an integer; None: "not given", with the default stated by the caller's help)."""
    parser.add_argument("--seed", type=int, default=default, help="random seed: results are reproducible given it")


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """Add the positional ``CHECKPOINT``: a run directory, a ``.safetensors`` file, or a pretrained model's name."""
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a run directory (its best.safetensors, else last.safetensors), a .safetensors checkpoint or "
        "weights file, or the name of a pretrained model (see 'avme list-pretrained')",
    )


#: How ``--data-root`` is described wherever it appears.
DATA_ROOT_HELP = (
    "where the data files are: binarized_mnist reads DIR/binarized_mnist.npz instead of the copy vendored in the "
    "package; imagefolder reads the folder DIR; npz reads the file DIR; the other data sets read (and download) "
    "their files under DIR in torchvision's layout (default: the run's for eval, sample and --resume; else the "
    "vendored copy for binarized_mnist, and $AVME_DATA_ROOT, else ~/.cache/avme_data, for the others)"
)


def check_output_path(path: str | os.PathLike[str], option: str, *, suffix: str | None = None) -> Path:
    """Refuse an output file that could not be written, before any work starts.

    Args:
        path: the file to write later (its directory is created then if missing).
        option: the option that named it (for the message), e.g. ``"--out"``.
        suffix: the required suffix (e.g. ``".png"``), compared case-insensitively.

    Raises:
        CLIError: wrong suffix, an existing directory, or no writable directory to create it in
            (see :func:`check_output_dir`); the message names ``path`` as the user gave it.
    """
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise CLIError(f"{option} {path}: must be a {suffix} file")
    if path.is_dir():
        raise CLIError(f"{option} {path}: is a directory; give a file name")
    _check_writable_dir(path.parent, option, path)
    return path


def check_output_dir(path: str | os.PathLike[str], option: str) -> Path:
    """Refuse an output directory that could not be written (or created), before any work starts.

    The check creates and removes a file in the directory (a directory in its nearest existing
    ancestor when it does not exist yet), so it sees what a write would see: a read-only file
    system, missing permissions, a pseudo file system such as /proc.

    Raises:
        CLIError: ``path`` is a file, or nothing can be written there:
            ``--out DIR: cannot write in ANCESTOR (read-only file system)``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path}: is a file, not a directory")
    _check_writable_dir(path, option, path)
    return path


#: How an output check words the errno of a failed write.
WRITE_ERROR_REASONS = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "files cannot be created there",
}


def write_error_reason(error: OSError) -> str:
    """Why a write failed, in a few words: ``"read-only file system"``, ``"permission denied"``, ..."""
    return WRITE_ERROR_REASONS.get(error.errno or 0) or (error.strerror or str(error)).lower()


def _check_writable_dir(directory: Path, option: str, given: Path) -> None:
    """Refuse ``given`` (named by ``option``) unless a file can be created in ``directory`` (or, when
    ``directory`` does not exist, ``directory`` itself can be created)."""
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CLIError(f"{option} {given}: {ancestor} is not a directory")
    try:
        _probe_write(ancestor, make_dir=ancestor != directory)
    except OSError as error:
        raise CLIError(f"{option} {given}: cannot write in {ancestor} ({write_error_reason(error)})") from None


def _probe_write(directory: Path, *, make_dir: bool) -> None:
    """Create and remove a hidden file (or directory) in ``directory``; raises the OSError a write would."""
    if make_dir:
        os.rmdir(tempfile.mkdtemp(prefix=".avme-write-check.", dir=directory))
        return
    fd, name = tempfile.mkstemp(prefix=".avme-write-check.", dir=directory)
    os.close(fd)
    os.unlink(name)


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSource:
    """Where a subcommand's model comes from.

    Attributes:
        given: the CHECKPOINT argument as the user typed it.
        path: the checkpoint or weights file it resolves to.
        pretrained: the pretrained model's name when ``given`` named one, else None.
    """

    given: str
    path: Path
    pretrained: str | None = None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def resolve_model_source(given: str) -> ModelSource:
    """Resolve a CHECKPOINT argument: an existing path first, then a pretrained model's name.

    Raises:
        CLIError: nothing usable under that name (the message names what the user gave).
    """
    from avme_ext.checkpoint import CheckpointError, resolve_checkpoint

    path = Path(given)
    if path.exists():
        try:
            return ModelSource(given, resolve_checkpoint(path))
        except (FileNotFoundError, CheckpointError) as error:
            raise CLIError(cli_message(error)) from None
    if _NAME.fullmatch(given) and path.suffix not in (".safetensors", ".json"):
        from avme_ext.pretrained import PretrainedError, list_pretrained, pretrained_path

        try:
            return ModelSource(given, pretrained_path(given), given)
        except PretrainedError as error:
            if list_pretrained():
                raise CLIError(f"{given}: no such run directory or checkpoint file, and {error}") from None
            raise CLIError(
                f"{given}: no such run directory or checkpoint file, and no pretrained models are installed in "
                "this version; pass a run directory or a .safetensors checkpoint"
            ) from None
    raise CLIError(f"checkpoint {given} does not exist; pass a run directory or a .safetensors checkpoint")


def load_model_for_cli(args: argparse.Namespace, device: torch.device, source: ModelSource | None = None) -> AVME:
    """Load ``args.checkpoint`` (or ``source``) onto ``device`` with ``--impl``/``--precision``.

    A corrupt ``best.safetensors`` whose run has an intact ``last.safetensors`` is reported with
    the exact command that uses the latter.

    Raises:
        CLIError: the model cannot be loaded.
    """
    from avme_ext.checkpoint import CheckpointError, load_model

    source = source or resolve_model_source(args.checkpoint)
    try:
        return load_model(
            source.path,
            device=device,
            impl=getattr(args, "impl", None) or "auto",
            precision=getattr(args, "precision", None) or PRECISIONS[0],
        )
    except (FileNotFoundError, CheckpointError) as error:
        raise checkpoint_cli_error(args, source.given, error) from None


def checkpoint_cli_error(args: argparse.Namespace, given: str, error: FileNotFoundError | CheckpointError) -> CLIError:
    """The :class:`CLIError` of a checkpoint that cannot be read, the same in every command.

    A corrupt ``best.safetensors`` whose run has an intact ``last.safetensors``
    (``error.alternative``) gets the exact command line that uses the latter: this invocation
    with ``given`` (the argument as the user typed it) replaced.
    """
    from avme_ext.checkpoint import CheckpointError  # loaded already: the checkpoint was being read

    if not isinstance(error, CheckpointError) or error.alternative is None:
        return CLIError(cli_message(error))
    command = _command_with(args, given, str(error.alternative))
    return CLIError(f"{error.reason}; the run's last checkpoint {error.alternative} is intact, use it: {command}")


def _command_with(args: argparse.Namespace, old: str, new: str) -> str:
    """The command line of this invocation with the argument ``old`` replaced by ``new``."""
    argv = list(getattr(args, "argv", None) or [args.command, old])
    if old in argv:
        argv[argv.index(old)] = new
    return "avme " + shlex.join(argv)


# --------------------------------------------------------------------------- errors
def cli_message(error: BaseException) -> str:
    """An exception's message in command-line terms, on one line.

    An exception's ``cli_hint`` attribute, when set, replaces its message (the data loaders
    set it so that their errors name the command-line flag, not the Python argument).
    """
    text = getattr(error, "cli_hint", None) or str(error)
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _rank_prefix() -> str:
    """``"[rank R] "`` under torchrun with several processes, else empty."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f"[rank {rank}] " if world.isdigit() and int(world) > 1 else ""


def fail(command: str, message: object, code: int = EXIT_USAGE) -> int:
    """Print ``avme <command>: error: <message>`` (one line) to stderr and return ``code``."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"{_rank_prefix()}avme {command}: error: {text}", file=sys.stderr, flush=True)
    return code


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean an unusable input file or name (exit status 2)."""
    from avme_ext.checkpoint import CheckpointError
    from avme_ext.data import DataFormatError
    from avme_ext.pretrained import PretrainedError

    types: list[type[BaseException]] = [
        CheckpointError,
        DataFormatError,
        PretrainedError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
    ]
    plotting = sys.modules.get(f"{__package__.rpartition('.')[0]}.plotting")  # only a command that plotted
    if plotting is not None:
        types.append(plotting.MetricsError)
    return tuple(types)


def _exit_code_of(error: Exception) -> int | None:
    code = getattr(error, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(error, _input_errors()):
        return EXIT_USAGE
    if isinstance(error, OSError):
        return EXIT_FAILURE
    return None


def run_subcommand(args: argparse.Namespace) -> int:
    """Run ``args.func(args)`` the way every subcommand runs, and return the exit status.

    ``--threads`` is applied first. SIGINT (KeyboardInterrupt) and SIGTERM print one line and
    return 130 / 143; a subcommand that handles them itself (``avme train`` checkpoints and
    returns 130 / 143) keeps doing so. A :class:`CLIError`, an exception with an ``exit_code``
    attribute, an unusable input file (exit 2) or an OS error while working (exit 1) print
    ``avme <command>: error: <message>``; so does an allocation that failed while working (exit 1,
    with the subcommand's ``args.memory_advice``); anything else is a bug and keeps its traceback.
    """
    command = getattr(args, "command", None) or "?"
    previous = _install_sigterm()
    try:
        apply_threads(getattr(args, "threads", None))
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}avme {command}: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    except _Terminated:
        print(f"{_rank_prefix()}avme {command}: stopped (SIGTERM)", file=sys.stderr, flush=True)
        return EXIT_SIGTERM
    except Exception as error:
        memory = out_of_memory_message(error)
        if memory is not None:
            advice = getattr(args, "memory_advice", None)
            return fail(command, memory + (f"; {advice}" if advice else ""), EXIT_FAILURE)
        code = _exit_code_of(error)
        if code is None:
            raise
        return fail(command, cli_message(error), code)
    finally:
        _restore_sigterm(previous)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _install_sigterm() -> Any:
    """Make SIGTERM raise :class:`_Terminated` (main thread only); returns the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def parse_and_run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and :func:`run_subcommand` it; keeps ``argv`` in
    ``args.argv`` for messages that suggest a corrected command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run_subcommand(args)
