"""``MetricsLog``: the run's ``metrics.jsonl`` (one JSON record per line) and its TensorBoard mirror."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

__all__ = ["MetricsLog", "tensorboard_available"]


class MetricsLog:
    """Appends JSON records to metrics.jsonl and, optionally, scalars to TensorBoard (rank 0 only).

    Args:
        path: the metrics.jsonl file (created when missing).
        truncate_to: cut the file to this many bytes first (a resumed run drops the records a killed
            launch wrote after its checkpoint); None keeps it whole.
        tensorboard_dir: where to write TensorBoard events, or None for none.
        purge_step: TensorBoard drops the events from this step on (the same records, in TensorBoard).
    """

    def __init__(
        self,
        path: Path,
        *,
        truncate_to: int | None = None,
        tensorboard_dir: Path | None = None,
        purge_step: int | None = None,
    ) -> None:
        self.path = path
        if truncate_to is not None and path.exists() and path.stat().st_size > truncate_to:
            with open(path, "r+b") as handle:
                handle.truncate(truncate_to)
        self.handle: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the log's life, close() closes it
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (one line) and mirror its numbers to TensorBoard."""
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            kind, step = record["kind"], record["step"]
            for key, value in record.items():
                if key in ("kind", "step", "epoch", "best") or not isinstance(value, (int, float, list)):
                    continue
                if isinstance(value, list):
                    for t, v in enumerate(value):
                        self.writer.add_scalar(f"{kind}/{key}/{t + 1}", v, step)
                else:
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def sync(self) -> int:
        """Flush to disk and return the file's size (stored in checkpoints)."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        if self.writer is not None:
            self.writer.flush()
        return self.handle.tell()

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


def tensorboard_available() -> bool:
    """True when ``torch.utils.tensorboard`` can be imported (needs the ``tensorboard`` package)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
