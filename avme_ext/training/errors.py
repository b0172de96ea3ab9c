"""The errors of a training run; each message says what went wrong and what to do, in terms of
the options of ``avme train``.

Each class carries the exit status the ``avme`` command reports it with (``exit_code``):
2 when the run cannot start as asked (nothing was trained or written), 1 when it failed while
training (outputs are left as the last checkpoint wrote them).
"""

from __future__ import annotations

__all__ = ["TrainError", "NonFiniteError", "RunDirError", "OptionError"]


class TrainError(RuntimeError):
    """A training run cannot start or continue; the message says why and what to do."""

    exit_code = 2


class NonFiniteError(TrainError):
    """A non-finite loss or gradient norm (the message names the step and epoch)."""

    exit_code = 1


class RunDirError(TrainError):
    """The output directory cannot be used as asked (e.g. it holds a run and neither --resume nor --overwrite)."""


class OptionError(ValueError):
    """An option has a value a run cannot use (the message names the option, e.g. ``--graph on``)."""

    exit_code = 2
