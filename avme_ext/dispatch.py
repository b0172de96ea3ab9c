"""What ``impl="auto"`` runs: the fused ops only where a committed benchmark measured them faster.

The choice comes from :data:`CROSSOVER`, a table written by ``bench/crossover.py`` from a results
file of ``bench/run.py`` (the training step, every reference mode against every fused design).
For a GPU, a parameter dtype and a matrix-product precision, the table lists batch-size ranges
and, for each, the fastest fused design or ``"ref"``; a range names a fused design only where
that design was measured faster than every reference mode (eager, TF32, bf16 autocast,
``torch.compile``, a CUDA graph) at the batch sizes bounding it. Everything else runs the
reference: the CPU, a GPU, dtype or precision the table does not hold, and batch sizes outside the
measured ones. So ``"auto"`` never picks a path that was measured slower than the reference.

Lookup of a batch size B in a list ``[(max_1, choice_1), (max_2, choice_2), ...]`` (max
ascending): the first entry with ``B <= max_i`` gives the choice; B above the last max gives
``"ref"``.

The benchmark measures one model size (the paper's: D = 784, H = 400, Z = 100). A design the table
names is therefore passed to the ops as a preference (``"auto:<design>"``, see
:func:`avme_ext.ops.preferring`): where it cannot run a call's sizes on its device (e.g. colour
images, D = 3 x 32 x 32 = 3072, whose weight slices may not fit the persistent design's shared
memory), the host runs its own choice, a design that can (the stagewise design runs every size),
never an error.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections.abc import Mapping, Sequence

import torch

from . import ops
from .loop_types import DESIGNS, PRECISIONS

__all__ = [
    "REF",
    "DESIGN_NAMES",
    "CROSSOVER",
    "CROSSOVER_SOURCES",
    "TABLE_START",
    "TABLE_END",
    "auto_impl",
    "auto_design",
    "choose",
    "check_table",
    "parse_table",
    "marker_span",
    "entries_for",
    "dtype_name",
]

#: The choice meaning "run the reference implementation".
REF = "ref"
#: The fused designs a table may name (``avme_ext.ops.DESIGNS`` once the host exposes it).
DESIGN_NAMES: tuple[str, ...] = DESIGNS
#: The markers around the generated table below (``bench/crossover.py`` rewrites what is between).
TABLE_START = "# crossover-table:start"
TABLE_END = "# crossover-table:end"

TableKey = tuple[str, str, str]
Table = Mapping[TableKey, Sequence[tuple[int, str]]]

# The table is generated: run `python bench/crossover.py bench/results/<file>.json` to replace it.
# Keys: (GPU name as torch.cuda.get_device_name reports it, a glob pattern; parameter dtype;
# precision). Values: [(max batch size, fastest fused design or "ref"), ...], max ascending.
# crossover-table:start
CROSSOVER_SOURCES: dict[TableKey, str] = {
    ("NVIDIA H100 80GB HBM3", "float32", "fp32"): (
        "H100 run at commit 5f9afe8, torch 2.11, rowtile kernels (no results file committed): "
        "training step, K=12, B=100/1024/4096: fused slower than the best reference mode at every B"
    ),
    ("NVIDIA H100 80GB HBM3", "float32", "bf16"): (
        "H100 run at commit 5f9afe8, torch 2.11, rowtile kernels (no results file committed): "
        "training step, K=12, B=100/1024/4096: fused slower than the best reference mode at every B"
    ),
}
CROSSOVER: dict[TableKey, list[tuple[int, str]]] = {
    # H100 run at commit 5f9afe8, torch 2.11, rowtile kernels (no results file committed): training step, K=12,
    # B=100/1024/4096: fused slower than the best reference mode at every B
    ("NVIDIA H100 80GB HBM3", "float32", "fp32"): [(4096, "ref")],
    # H100 run at commit 5f9afe8, torch 2.11, rowtile kernels (no results file committed): training step, K=12,
    # B=100/1024/4096: fused slower than the best reference mode at every B
    ("NVIDIA H100 80GB HBM3", "float32", "bf16"): [(4096, "ref")],
}
# crossover-table:end


def check_table(table: Table) -> None:
    """Raise ValueError unless ``table`` is well formed (keys, ascending max batches, known choices)."""
    if not isinstance(table, Mapping):
        raise ValueError(f"the crossover table must be a dict, got {type(table).__name__}")
    for key, entries in table.items():
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, str) and k for k in key)):
            raise ValueError(f"crossover key {key!r}: expected (GPU name pattern, dtype, precision), three strings")
        if key[2] not in PRECISIONS:
            raise ValueError(f"crossover key {key!r}: precision must be one of {PRECISIONS}")
        if not isinstance(entries, (list, tuple)) or not entries:
            raise ValueError(f"crossover entries of {key!r}: expected a non-empty list of (max batch, choice)")
        previous = 0
        for entry in entries:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise ValueError(f"crossover entry {entry!r} of {key!r}: expected (max batch, choice)")
            max_batch, choice = entry
            if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch <= previous:
                raise ValueError(
                    f"crossover entry {entry!r} of {key!r}: max batch must be an integer above the previous "
                    f"entry's ({previous})"
                )
            if choice != REF and choice not in DESIGN_NAMES:
                raise ValueError(f"crossover entry {entry!r} of {key!r}: choice must be {REF!r} or one of "
                                 f"{DESIGN_NAMES}")
            previous = max_batch


def marker_span(source: str) -> tuple[int, int]:
    """(start, end) offsets of the text between the marker lines of ``source`` (each a whole line)."""
    start = re.search(rf"^{re.escape(TABLE_START)}[ \t]*\n", source, re.MULTILINE)
    end = re.search(rf"^{re.escape(TABLE_END)}[ \t]*$", source, re.MULTILINE)
    if start is None or end is None or end.start() < start.end():
        raise ValueError(f"the crossover table needs the lines {TABLE_START!r} and {TABLE_END!r}, in this order")
    return start.end(), end.start()


def parse_table(source: str) -> tuple[dict[TableKey, str], dict[TableKey, list[tuple[int, str]]]]:
    """The (sources, table) literals between :data:`TABLE_START` and :data:`TABLE_END` of ``source``.

    ``source`` is the text of this module; the block holds two assignments,
    ``CROSSOVER_SOURCES = {...}`` and ``CROSSOVER = {...}``, of Python literals.

    Raises:
        ValueError: markers missing or out of order, or a block that is not the two literals.
    """
    start, end = marker_span(source)
    block = source[start:end]
    try:
        module = ast.parse(block)
    except SyntaxError as error:
        raise ValueError(f"the crossover table block is not valid Python: {error}") from None
    values: dict[str, object] = {}
    for node in module.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if not isinstance(target, ast.Name) or node.value is None:
            raise ValueError("the crossover table block may only assign CROSSOVER_SOURCES and CROSSOVER")
        try:
            values[target.id] = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"{target.id} in the crossover table block is not a literal") from None
    if set(values) != {"CROSSOVER_SOURCES", "CROSSOVER"}:
        raise ValueError(f"the crossover table block must assign CROSSOVER_SOURCES and CROSSOVER, found {sorted(values)}")
    table = {key: [tuple(entry) for entry in entries] for key, entries in values["CROSSOVER"].items()}  # type: ignore[union-attr]
    check_table(table)
    sources = values["CROSSOVER_SOURCES"]
    if not isinstance(sources, dict):
        raise ValueError("CROSSOVER_SOURCES must be a dict")
    return dict(sources), table


check_table(CROSSOVER)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the dtype as the table spells it."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return str(dtype).removeprefix("torch.")


def entries_for(table: Table, gpu_name: str, dtype: str, precision: str) -> tuple[tuple[int, str], ...]:
    """The entries of the first key of ``table`` whose pattern matches ``gpu_name`` (empty if none)."""
    for (pattern, key_dtype, key_precision), entries in table.items():
        if key_dtype == dtype and key_precision == precision and fnmatch.fnmatchcase(gpu_name, pattern):
            return tuple((int(m), str(c)) for m, c in entries)
    return ()


def choose(entries: Sequence[tuple[int, str]], batch_size: int) -> str:
    """The choice of ``entries`` (see the module docstring) for ``batch_size`` rows; ``"ref"`` outside."""
    for max_batch, choice in entries:
        if batch_size <= max_batch:
            return choice
    return REF


_ENTRY_CACHE: dict[tuple[int, str, str], tuple[tuple[int, str], ...]] = {}


@torch.compiler.assume_constant_result
def _device_entries(index: int, dtype: str, precision: str) -> tuple[tuple[int, str], ...]:
    """The table entries for CUDA device ``index`` (-1: the current one); cached, constant under compile."""
    key = (torch.cuda.current_device() if index < 0 else index, dtype, precision)
    if key not in _ENTRY_CACHE:
        _ENTRY_CACHE[key] = entries_for(CROSSOVER, torch.cuda.get_device_name(key[0]), dtype, precision)
    return _ENTRY_CACHE[key]


def auto_design(device: torch.device, dtype: torch.dtype, precision: str, batch_size: int) -> str:
    """The fused design ``impl="auto"`` should run for these inputs, or ``"ref"`` for the reference.

    Args:
        device: where the inputs live.
        dtype: the parameters' dtype.
        precision: the module's matrix-product precision (``"fp32"``, ``"tf32"``, ``"bf16"``).
        batch_size: B, the rows of the call (an int, or a SymInt while torch.compile traces).

    Returns:
        ``"ref"``, or a design of :data:`CROSSOVER` (one of ``avme_ext.ops.DESIGNS`` when the host
        exposes them: a design it no longer has gives ``"ref"``).
    """
    device = torch.device(device)
    name = dtype_name(dtype)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, torch.SymInt)) or (
            isinstance(batch_size, int) and batch_size < 0):
        raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
    if device.type != "cuda" or not ops.is_available():
        return REF
    choice = choose(_device_entries(-1 if device.index is None else device.index, name, precision), batch_size)
    if choice != REF and choice not in DESIGN_NAMES:
        return REF
    return choice


def auto_impl(device: torch.device, dtype: torch.dtype, precision: str, batch_size: int) -> str:
    """The implementation ``AVMECore(impl="auto")`` runs for these inputs: ``"cuda"`` or ``"ref"``.

    Args:
        device: where the inputs live.
        dtype: the parameters' dtype.
        precision: the module's matrix-product precision (``"fp32"``, ``"tf32"``, ``"bf16"``).
        batch_size: B, the rows of the call.
    """
    return REF if auto_design(device, dtype, precision, batch_size) == REF else "cuda"
