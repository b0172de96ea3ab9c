"""What ``impl="auto"`` runs: the fused ops only where a committed benchmark measured them faster.

The choice comes from :data:`CROSSOVER`, a table written by ``bench/crossover.py`` from a results
file of ``bench/run.py`` (the training step, every reference mode against every fused design).
For a GPU, a parameter dtype and a matrix-product precision, the table lists batch-size ranges
and, for each, the fastest fused design or ``"ref"``; a range names a fused design only where
that design was measured faster than every reference mode (eager, TF32, bf16 autocast,
``torch.compile``, a CUDA graph) at the batch sizes bounding it. Everything else runs the
reference: the CPU, a GPU, dtype or precision the table does not hold, batch sizes outside the
measured ones, and models of other sizes. So ``"auto"`` never picks a path that was measured slower
than the reference, and never one that was not measured.

Lookup of a batch size B in a list ``[(max_1, choice_1), (max_2, choice_2), ...]`` (max
ascending): the first entry with ``B <= max_i`` gives the choice; B above the last max gives
``"ref"``.

Each (GPU, dtype, precision) entry holds for the model it was measured at
(:data:`CROSSOVER_MODELS`: D, C, He, Hd and Z exactly, K within the measured steps; the benchmark's
default is the paper's model, D = 784, C = 0, He = Hd = 400, Z = 100, K = 12 and 64). The speed of
each path depends on these sizes (how the weights tile shared memory, how full the GEMMs are), so a
model of any other size runs the reference under ``"auto"``. To let ``"auto"`` choose the fused ops
for your sizes, measure them (``python bench/run.py --model-size D,He,Hd,Z`` and
``python bench/crossover.py``), or ask for them with ``impl="cuda"``.

A design the table names is passed to the ops as a preference (``"auto:<design>"``, see
:func:`avme_ext.ops.preferring`): should it not fit the call on this device after all (another
GPU matching the same name pattern with less shared memory), the host runs its own choice, never an
error.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import torch

from . import ops
from .loop_types import DESIGNS, PRECISIONS

__all__ = [
    "REF",
    "DESIGN_NAMES",
    "CROSSOVER",
    "CROSSOVER_SOURCES",
    "CROSSOVER_MODELS",
    "MODEL_FIELDS",
    "TableBlock",
    "model_key",
    "measured_for",
    "TABLE_START",
    "TABLE_END",
    "auto_impl",
    "auto_design",
    "choose",
    "check_table",
    "parse_table",
    "marker_span",
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
#: The model sizes an entry was measured at: the fields of :data:`MODEL_FIELDS`, and ``"steps"``,
#: the ascending list of the K measured.
MeasuredModel = dict[str, object]
#: The sizes that must equal the measured ones (K need only lie within the measured steps).
MODEL_FIELDS: tuple[str, ...] = ("data_dim", "num_classes", "enc_hidden", "dec_hidden", "latent_dim")

# The table is generated: run `python bench/crossover.py bench/results/<file>.json` to replace it.
# Keys: (GPU name as torch.cuda.get_device_name reports it, a glob pattern; parameter dtype;
# precision). Values: [(max batch size, fastest fused design or "ref"), ...], max ascending.
# CROSSOVER_MODELS: the model each key was measured at.
# fmt: off
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
CROSSOVER_MODELS: dict[TableKey, MeasuredModel] = {
    ("NVIDIA H100 80GB HBM3", "float32", "fp32"): {"data_dim": 784, "num_classes": 0, "enc_hidden": 400, "dec_hidden": 400, "latent_dim": 100, "steps": [12]},
    ("NVIDIA H100 80GB HBM3", "float32", "bf16"): {"data_dim": 784, "num_classes": 0, "enc_hidden": 400, "dec_hidden": 400, "latent_dim": 100, "steps": [12]},
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
# fmt: on


def check_table(table: Table) -> None:
    """Raise ValueError unless ``table`` is well formed (keys, ascending max batches, known choices)."""
    if not isinstance(table, Mapping):
        raise ValueError(f"the crossover table must be a dict, got {type(table).__name__}")  # noqa: TRY004 - a malformed file
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
                raise ValueError(
                    f"crossover entry {entry!r} of {key!r}: choice must be {REF!r} or one of {DESIGN_NAMES}"
                )
            previous = max_batch


def check_models(models: Mapping[TableKey, MeasuredModel], table: Table) -> None:
    """Raise ValueError unless ``models`` holds one well-formed measured model per key of ``table``."""
    if not isinstance(models, Mapping):
        raise ValueError(f"CROSSOVER_MODELS must be a dict, got {type(models).__name__}")  # noqa: TRY004 - a malformed file
    if set(models) != set(table):
        raise ValueError(
            f"CROSSOVER_MODELS must have the keys of CROSSOVER: missing {sorted(set(table) - set(models))}, "
            f"extra {sorted(set(models) - set(table))}"
        )
    for key, model in models.items():
        expected = (*MODEL_FIELDS, "steps")
        if not isinstance(model, Mapping) or set(model) != set(expected):
            raise ValueError(f"CROSSOVER_MODELS[{key!r}]: expected a dict of {expected}, got {model!r}")
        for name in MODEL_FIELDS:
            value = model[name]
            minimum = 0 if name == "num_classes" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"CROSSOVER_MODELS[{key!r}][{name!r}]: expected an integer >= {minimum}, got {value!r}"
                )
        steps = model["steps"]
        if (
            not isinstance(steps, (list, tuple))
            or not steps
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps)
            or list(steps) != sorted(set(steps))
        ):
            raise ValueError(
                f"CROSSOVER_MODELS[{key!r}]['steps']: expected the measured K, ascending integers >= 1, got {steps!r}"
            )


def marker_span(source: str) -> tuple[int, int]:
    """(start, end) offsets of the text between the marker lines of ``source`` (each a whole line)."""
    start = re.search(rf"^{re.escape(TABLE_START)}[ \t]*\n", source, re.MULTILINE)
    end = re.search(rf"^{re.escape(TABLE_END)}[ \t]*$", source, re.MULTILINE)
    if start is None or end is None or end.start() < start.end():
        raise ValueError(f"the crossover table needs the lines {TABLE_START!r} and {TABLE_END!r}, in this order")
    return start.end(), end.start()


class TableBlock(NamedTuple):
    """The three literals of the generated block (see :func:`parse_table`)."""

    sources: dict[TableKey, str]
    models: dict[TableKey, MeasuredModel]
    table: dict[TableKey, list[tuple[int, str]]]


_BLOCK_NAMES = ("CROSSOVER_SOURCES", "CROSSOVER_MODELS", "CROSSOVER")


def parse_table(source: str) -> TableBlock:
    """The literals between :data:`TABLE_START` and :data:`TABLE_END` of ``source``.

    ``source`` is the text of this module; the block holds three assignments of Python literals,
    ``CROSSOVER_SOURCES = {...}``, ``CROSSOVER_MODELS = {...}`` and ``CROSSOVER = {...}``.

    Raises:
        ValueError: markers missing or out of order, or a block that is not the three literals.
    """
    start, end = marker_span(source)
    block = source[start:end]
    try:
        module = ast.parse(block)
    except SyntaxError as error:
        raise ValueError(f"the crossover table block is not valid Python: {error}") from None
    values: dict[str, object] = {}
    for node in module.body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        if not isinstance(target, ast.Name) or value is None:
            raise ValueError(f"the crossover table block may only assign {', '.join(_BLOCK_NAMES)}")
        try:
            values[target.id] = ast.literal_eval(value)
        except ValueError:
            raise ValueError(f"{target.id} in the crossover table block is not a literal") from None
    if set(values) != set(_BLOCK_NAMES):
        raise ValueError(f"the crossover table block must assign {', '.join(_BLOCK_NAMES)}, found {sorted(values)}")
    crossover, models, sources = values["CROSSOVER"], values["CROSSOVER_MODELS"], values["CROSSOVER_SOURCES"]
    if not isinstance(crossover, dict):
        raise ValueError("CROSSOVER must be a dict")  # noqa: TRY004 - a malformed file
    table = {key: [tuple(entry) for entry in entries] for key, entries in crossover.items()}
    check_table(table)
    if not isinstance(models, dict):
        raise ValueError("CROSSOVER_MODELS must be a dict")  # noqa: TRY004 - a malformed file
    check_models(models, table)
    if not isinstance(sources, dict):
        raise ValueError("CROSSOVER_SOURCES must be a dict")  # noqa: TRY004 - a malformed file
    return TableBlock(dict(sources), {key: dict(model) for key, model in models.items()}, table)


check_table(CROSSOVER)
check_models(CROSSOVER_MODELS, CROSSOVER)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the dtype as the table spells it."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return str(dtype).removeprefix("torch.")


class ModelSizes(Protocol):
    """What the lookup reads of a model: an :class:`~avme_ext.config.AVMEConfig` has it."""

    @property
    def data_dim(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def enc_hidden(self) -> int: ...
    @property
    def dec_hidden(self) -> int: ...
    @property
    def latent_dim(self) -> int: ...
    @property
    def steps(self) -> int: ...


def model_key(model: ModelSizes) -> tuple[int, ...]:
    """(D, C, He, Hd, Z, K) of ``model``: the values of :data:`MODEL_FIELDS`, then the steps."""
    return (*(int(getattr(model, name)) for name in MODEL_FIELDS), int(model.steps))


def measured_for(measured: Mapping[str, object], sizes: tuple[int, ...]) -> bool:
    """Whether a table entry measured at ``measured`` (a :data:`CROSSOVER_MODELS` value) holds for a
    model of ``sizes`` (:func:`model_key`): the same D, C, He, Hd and Z, and K within the measured steps."""
    *layers, steps = sizes
    measured_steps = measured["steps"]
    if not isinstance(measured_steps, (list, tuple)) or not measured_steps:
        return False
    same_layers = all(measured[name] == value for name, value in zip(MODEL_FIELDS, layers, strict=True))
    return same_layers and min(measured_steps) <= steps <= max(measured_steps)


def key_for(table: Table, gpu_name: str, dtype: str, precision: str) -> TableKey | None:
    """The first key of ``table`` whose pattern matches ``gpu_name`` for ``dtype`` and ``precision``."""
    for key in table:
        pattern, key_dtype, key_precision = key
        if key_dtype == dtype and key_precision == precision and fnmatch.fnmatchcase(gpu_name, pattern):
            return key
    return None


def choose(entries: Sequence[tuple[int, str]], batch_size: int | torch.SymInt) -> str:
    """The choice of ``entries`` (see the module docstring) for ``batch_size`` rows; ``"ref"`` outside."""
    for max_batch, choice in entries:
        if batch_size <= max_batch:
            return choice
    return REF


_ENTRY_CACHE: dict[tuple[int, str, str, tuple[int, ...]], tuple[tuple[int, str], ...]] = {}


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]  # torch leaves it unannotated
def _device_entries(index: int, dtype: str, precision: str, sizes: tuple[int, ...]) -> tuple[tuple[int, str], ...]:
    """The table entries for CUDA device ``index`` (-1: the current one) and a model of ``sizes``
    (:func:`model_key`): empty where the entry was measured at another model. Cached, constant
    under compile."""
    key = (torch.cuda.current_device() if index < 0 else index, dtype, precision, sizes)
    if key not in _ENTRY_CACHE:
        table_key = key_for(CROSSOVER, torch.cuda.get_device_name(key[0]), dtype, precision)
        if table_key is None or not measured_for(CROSSOVER_MODELS[table_key], sizes):
            _ENTRY_CACHE[key] = ()
        else:
            _ENTRY_CACHE[key] = tuple((int(m), str(c)) for m, c in CROSSOVER[table_key])
    return _ENTRY_CACHE[key]


def auto_design(
    device: torch.device, dtype: torch.dtype, precision: str, batch_size: int | torch.SymInt, model: ModelSizes
) -> str:
    """The fused design ``impl="auto"`` should run for these inputs, or ``"ref"`` for the reference.

    Args:
        device: where the inputs live.
        dtype: the parameters' dtype.
        precision: the module's matrix-product precision (``"fp32"``, ``"tf32"``, ``"bf16"``).
        batch_size: B, the rows of the call (an int, or a SymInt while torch.compile traces).
        model: the model's sizes (an :class:`~avme_ext.config.AVMEConfig`); a model of sizes the
            table was not measured at gives ``"ref"``.

    Returns:
        ``"ref"``, or a design of :data:`CROSSOVER` (one of ``avme_ext.ops.DESIGNS`` when the host
        exposes them: a design it no longer has gives ``"ref"``).
    """
    device = torch.device(device)
    name = dtype_name(dtype)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, torch.SymInt))
        or (isinstance(batch_size, int) and batch_size < 0)
    ):
        raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
    if device.type != "cuda" or not ops.is_available():
        return REF
    sizes = model_key(model)
    entries = _device_entries(-1 if device.index is None else device.index, name, precision, sizes)
    choice = choose(entries, batch_size)
    if choice != REF and choice not in DESIGN_NAMES:
        return REF
    return choice


def auto_impl(
    device: torch.device, dtype: torch.dtype, precision: str, batch_size: int | torch.SymInt, model: ModelSizes
) -> str:
    """The implementation ``AVMECore(impl="auto")`` runs for these inputs: ``"cuda"`` or ``"ref"``.

    Args:
        device: where the inputs live.
        dtype: the parameters' dtype.
        precision: the module's matrix-product precision (``"fp32"``, ``"tf32"``, ``"bf16"``).
        batch_size: B, the rows of the call.
        model: the model's sizes (an :class:`~avme_ext.config.AVMEConfig`).
    """
    return REF if auto_design(device, dtype, precision, batch_size, model) == REF else "cuda"
