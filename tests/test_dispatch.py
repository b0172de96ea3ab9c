"""impl="auto": the crossover table in avme_ext/dispatch.py, its lookup, and its generator bench/crossover.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from avme_ext import dispatch, ops
from avme_ext.config import AVMEConfig
from helpers import REPO, run_in_repo

if str(REPO) not in sys.path:  # bench/ is imported as a package from the checkout
    sys.path.append(str(REPO))

from bench import crossover

FAKE = "Fake GPU 80GB"
TABLE = {
    (FAKE, "float32", "fp32"): [
        (99, "ref"),
        (100, "persistent"),
        (1024, "stagewise"),
        (4095, "ref"),
        (4096, "stagewise"),
    ],
    ("Fake GPU*", "float32", "bf16"): [(4096, "rowtile")],
}
#: The model every entry of TABLE was measured at: the paper's sizes, K = 12 and 64.
PAPER = AVMEConfig()
PAPER_MEASURED = {
    "data_dim": 784,
    "num_classes": 0,
    "enc_hidden": 400,
    "dec_hidden": 400,
    "latent_dim": 100,
    "steps": [12, 64],
}
MODELS = dict.fromkeys(TABLE, PAPER_MEASURED)


def _measure_everything(monkeypatch, table):
    """Make ``table`` the crossover table, every entry measured at the paper's model."""
    monkeypatch.setattr(dispatch, "CROSSOVER", table)
    monkeypatch.setattr(dispatch, "CROSSOVER_MODELS", dict.fromkeys(table, PAPER_MEASURED))
    monkeypatch.setattr(dispatch, "_ENTRY_CACHE", {})


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine whose CUDA device 0 is named FAKE, with the fused ops 'available' and TABLE as the table."""
    names = {0: FAKE, 1: "Other GPU"}
    monkeypatch.setattr(ops, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: names[0 if index is None else index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _measure_everything(monkeypatch, TABLE)
    return names


CUDA0 = torch.device("cuda", 0)


# --------------------------------------------------------------------------- the committed table


def test_committed_table_reads_back_from_the_source():
    text = (REPO / "avme_ext" / "dispatch.py").read_text()
    sources, models, table = dispatch.parse_table(text)
    assert table == {k: list(v) for k, v in dispatch.CROSSOVER.items()}
    assert sources == dispatch.CROSSOVER_SOURCES
    assert models == dispatch.CROSSOVER_MODELS
    assert set(sources) == set(table) == set(models)
    assert all(sources[k] for k in table)
    dispatch.check_table(table)
    dispatch.check_models(models, table)
    # until a results file replaces it: the H100 measurement of the rowtile kernels, reference everywhere
    for key, entries in table.items():
        assert all(choice == "ref" for _, choice in entries), key


def test_parse_table_refuses_what_is_not_the_table():
    good = (REPO / "avme_ext" / "dispatch.py").read_text()
    start, end = dispatch.marker_span(good)
    with pytest.raises(ValueError, match="crossover-table:start"):
        dispatch.parse_table(good.replace(dispatch.TABLE_START + "\n", ""))
    with pytest.raises(ValueError, match="not a literal"):
        dispatch.parse_table(
            good[:start] + "CROSSOVER_SOURCES = {}\nCROSSOVER_MODELS = {}\nCROSSOVER = dict()\n" + good[end:]
        )
    with pytest.raises(ValueError, match="must assign"):
        dispatch.parse_table(good[:start] + "CROSSOVER = {}\n" + good[end:])
    with pytest.raises(ValueError, match="only assign"):
        dispatch.parse_table(good[:start] + "import os\n" + good[end:])
    bad_entries = {
        "[(100, 'ref'), (100, 'rowtile')]": "above the previous",
        "[(0, 'ref')]": "above the previous",
        "[(100, 'fast')]": "choice must be",
        "[]": "non-empty",
        "[(True, 'ref')]": "max batch must be an integer",
    }
    for entries, message in bad_entries.items():
        block = (
            f"CROSSOVER_SOURCES = {{}}\nCROSSOVER_MODELS = {{}}\nCROSSOVER = {{('X', 'float32', 'fp32'): {entries}}}\n"
        )
        with pytest.raises(ValueError, match=message):
            dispatch.parse_table(good[:start] + block + good[end:])
    with pytest.raises(ValueError, match="precision must be one of"):
        dispatch.check_table({("X", "float32", "fp16"): [(1, "ref")]})


def test_check_models_refuses_what_does_not_name_the_measured_model():
    key = ("X", "float32", "fp32")
    table = {key: [(100, "persistent")]}
    dispatch.check_models({key: PAPER_MEASURED}, table)
    with pytest.raises(ValueError, match="keys of CROSSOVER"):
        dispatch.check_models({}, table)  # an entry without its model
    bad_models = {
        "expected a dict of": {k: v for k, v in PAPER_MEASURED.items() if k != "latent_dim"},
        "'data_dim'.*integer >= 1": {**PAPER_MEASURED, "data_dim": 0},
        "'num_classes'.*integer >= 0": {**PAPER_MEASURED, "num_classes": -1},
        "'enc_hidden'.*integer": {**PAPER_MEASURED, "enc_hidden": 400.0},
        "'steps'": {**PAPER_MEASURED, "steps": [64, 12]},
    }
    for message, model in bad_models.items():
        with pytest.raises(ValueError, match=message):
            dispatch.check_models({key: model}, table)
    with pytest.raises(ValueError, match="'steps'"):
        dispatch.check_models({key: {**PAPER_MEASURED, "steps": []}}, table)


def test_choose_follows_the_ranges():
    entries = TABLE[(FAKE, "float32", "fp32")]
    expected = {
        1: "ref",
        99: "ref",
        100: "persistent",
        101: "stagewise",
        1024: "stagewise",
        1025: "ref",
        4095: "ref",
        4096: "stagewise",
        4097: "ref",
        10**6: "ref",
    }
    assert {b: dispatch.choose(entries, b) for b in expected} == expected
    assert dispatch.choose((), 5) == "ref"


# --------------------------------------------------------------------------- auto_impl / auto_design


def test_cpu_is_ref_whatever_the_table_says(monkeypatch):
    _measure_everything(monkeypatch, {("*", "float32", p): [(10**9, "rowtile")] for p in ops.PRECISIONS})
    monkeypatch.setattr(ops, "is_available", lambda: True)
    for precision in ops.PRECISIONS:
        for batch in (0, 1, 100, 4096):
            assert dispatch.auto_impl(torch.device("cpu"), torch.float32, precision, batch, PAPER) == "ref"
            assert dispatch.auto_design(torch.device("cpu"), torch.float32, precision, batch, PAPER) == "ref"


def test_cuda_without_the_extension_is_ref(monkeypatch):
    _measure_everything(monkeypatch, {("*", "float32", "fp32"): [(10**9, "rowtile")]})
    monkeypatch.setattr(ops, "is_available", lambda: False)
    assert dispatch.auto_impl(CUDA0, torch.float32, "fp32", 100, PAPER) == "ref"


def test_measured_gpu_follows_the_table(fake_gpu):
    assert dispatch.auto_design(CUDA0, torch.float32, "fp32", 100, PAPER) == "persistent"
    assert dispatch.auto_impl(CUDA0, torch.float32, "fp32", 100, PAPER) == "cuda"
    assert dispatch.auto_design(CUDA0, torch.float32, "fp32", 512, PAPER) == "stagewise"
    assert dispatch.auto_impl(CUDA0, torch.float32, "fp32", 64, PAPER) == "ref"  # below the smallest measured B
    assert dispatch.auto_impl(CUDA0, torch.float32, "fp32", 2048, PAPER) == "ref"  # the range where the reference won
    assert dispatch.auto_impl(CUDA0, torch.float32, "fp32", 8192, PAPER) == "ref"  # above the largest measured B
    assert (
        dispatch.auto_design(torch.device("cuda"), torch.float32, "bf16", 7, PAPER) == "rowtile"
    )  # glob pattern, current device


def test_never_measured_configurations_are_ref(fake_gpu):
    assert dispatch.auto_impl(torch.device("cuda", 1), torch.float32, "fp32", 100, PAPER) == "ref"  # unknown GPU
    assert dispatch.auto_impl(CUDA0, torch.float64, "fp32", 100, PAPER) == "ref"  # dtype never measured
    assert dispatch.auto_impl(CUDA0, torch.float32, "tf32", 100, PAPER) == "ref"  # precision never measured


def test_models_of_other_sizes_are_ref(fake_gpu):
    """The table holds for the model it was measured at: any other size runs the reference."""
    assert dispatch.auto_design(CUDA0, torch.float32, "fp32", 100, PAPER) == "persistent"
    for steps in (12, 30, 64):  # K within the measured steps
        assert dispatch.auto_design(CUDA0, torch.float32, "fp32", 100, AVMEConfig(steps=steps)) == "persistent"
    others = {
        "K below the measured": AVMEConfig(steps=8),
        "K above the measured": AVMEConfig(steps=65),
        "colour images": AVMEConfig(data_dim=3 * 32 * 32),
        "conditional": AVMEConfig(num_classes=10),
        "smaller encoder": AVMEConfig(enc_hidden=256),
        "smaller decoder": AVMEConfig(dec_hidden=256),
        "larger latent": AVMEConfig(latent_dim=128),
    }
    for what, model in others.items():
        assert dispatch.auto_design(CUDA0, torch.float32, "fp32", 100, model) == "ref", what
        assert dispatch.auto_impl(CUDA0, torch.float32, "fp32", 512, model) == "ref", what
    # the measured model again, after the lookups of other sizes (the cache is per size)
    assert dispatch.auto_design(CUDA0, torch.float32, "fp32", 512, PAPER) == "stagewise"


def test_a_design_the_package_no_longer_has_is_ref(fake_gpu, monkeypatch):
    monkeypatch.setattr(dispatch, "DESIGN_NAMES", ("auto", "rowtile", "stagewise"))
    assert dispatch.auto_impl(CUDA0, torch.float32, "fp32", 100, PAPER) == "ref"  # persistent is gone
    assert dispatch.auto_impl(CUDA0, torch.float32, "fp32", 512, PAPER) == "cuda"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="precision"):
        dispatch.auto_impl(torch.device("cpu"), torch.float32, "fp16", 10, PAPER)
    with pytest.raises(TypeError, match="dtype"):
        dispatch.auto_impl(torch.device("cpu"), "float32", "fp32", 10, PAPER)  # type: ignore[arg-type]  # a dtype name, not a dtype, on purpose
    for batch in (-1, True, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            dispatch.auto_impl(torch.device("cpu"), torch.float32, "fp32", batch, PAPER)  # type: ignore[arg-type]  # 2.0 is not an int, on purpose


def test_choice_traces_under_torch_compile_without_graph_breaks(fake_gpu):
    torch._dynamo.reset()

    def pick(x: torch.Tensor) -> torch.Tensor:
        fused = dispatch.auto_impl(CUDA0, torch.float32, "fp32", x.shape[0], PAPER) == "cuda"
        return x * 2 if fused else x * 3

    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    try:
        for batch, factor in ((100, 2), (50, 3), (512, 2), (2048, 3)):  # later calls trace B as a SymInt
            x = torch.ones(batch, 2)
            assert torch.equal(compiled(x), x * factor), batch
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- the generator


def _record(impl: str, batch: int, steps: int, value: float | None, skipped: str | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {
        "workload": "train",
        "impl": impl,
        "batch": batch,
        "steps": steps,
        "value": value,
        "unit": "samples/s",
    }
    if skipped:
        r["skipped"] = skipped
    return r


def _results(records: list[dict[str, Any]], device: str = FAKE) -> dict[str, Any]:
    return {
        "device": device,
        "device_type": "cuda",
        "date": "2026-01-02",
        "torch": "2.11.0",
        "git_commit": "a" * 40,
        "git_dirty": False,
        "records": records,
        "config": {
            "smoke": False,
            "steps": [12, 64],
            "model_size": {"data_dim": 784, "enc_hidden": 400, "dec_hidden": 400, "latent_dim": 100, "num_classes": 0},
        },
    }


def _refs(batch: int, steps: int, best: float) -> list[dict[str, Any]]:
    return [
        _record("ref-eager", batch, steps, best / 3),
        _record("ref-compile", batch, steps, best / 2),
        _record("ref-cudagraph", batch, steps, best),
    ]


def test_decisions_are_conservative():
    records = [
        *_refs(100, 12, 1000.0),
        _record("fused-persistent-fp32", 100, 12, 5000.0),
        _record("fused-rowtile-fp32", 100, 12, 900.0),
        _record("fused-auto-fp32", 100, 12, 4000.0),
        _record("fused-auto-fp32-graph", 100, 12, 800.0),
        # B=256: a reference mode left out by the budget: nothing is known
        *_refs(256, 12, 1000.0)[:2],
        _record("ref-cudagraph", 256, 12, None, "time budget (--budget-s 5) spent"),
        _record("fused-persistent-fp32", 256, 12, 9000.0),
        # B=1024: persistent wins at K=12 but loses at K=64; stagewise wins at both; a failed design does not count
        *_refs(1024, 12, 1000.0),
        *_refs(1024, 64, 200.0),
        _record("fused-persistent-fp32", 1024, 12, 3000.0),
        _record("fused-persistent-fp32", 1024, 64, 150.0),
        _record("fused-stagewise-fp32", 1024, 12, 2000.0),
        _record("fused-stagewise-fp32", 1024, 64, 300.0),
        _record("fused-rowtile-fp32", 1024, 12, 5000.0),
        _record("fused-rowtile-fp32", 1024, 64, None, "failed while timing: RuntimeError: boom"),
    ]
    data = _results(records)
    by_b = {p.batch: p for p in crossover.decide(data)["fp32"]}
    assert by_b[100].winners == {"persistent": 5000.0}  # auto's graph variant is slower than ref-cudagraph
    assert by_b[256].choice == "ref"
    assert "time budget" in by_b[256].notes[0]
    assert by_b[1024].winners == {"stagewise": 2000.0}
    assert crossover.entries_from_points(list(by_b.values())) == [
        (99, "ref"),
        (100, "persistent"),
        (1023, "ref"),
        (1024, "stagewise"),
    ]
    assert all(p.choice == "ref" for p in crossover.decide(data)["bf16"])  # no bf16 record: never faster
    # a margin: faster, but not by enough
    assert crossover.decide_point(records, 100, "fp32", margin=6.0).choice == "ref"


def test_gaps_between_measured_sizes():
    P = crossover.PointDecision
    points = [
        P(100, {"persistent": 10.0, "rowtile": 5.0}),
        P(256, {"rowtile": 4.0, "persistent": 3.0}),
        P(1024, {"stagewise": 9.0}),
        P(4096, {"stagewise": 8.0}),
    ]
    assert crossover.entries_from_points(points) == [
        (99, "ref"),
        (100, "persistent"),
        (256, "rowtile"),
        (1023, "ref"),
        (4096, "stagewise"),
    ]
    assert crossover.entries_from_points([P(100), P(4096)]) == [(4096, "ref")]


def test_generator_round_trip(tmp_path: Path):
    """Synthetic results -> bench/crossover.py -> a dispatch module whose table gives the measured choices."""
    records = []
    for batch, (persistent, stagewise) in {
        100: (9000.0, 500.0),
        256: (7000.0, 2000.0),
        1024: (900.0, 5000.0),
        4096: (100.0, 900.0),
    }.items():
        records += _refs(batch, 12, 1000.0)
        records += [
            _record("fused-persistent-bf16", batch, 12, persistent),
            _record("fused-stagewise-bf16", batch, 12, stagewise),
            _record("fused-auto-bf16-graph", batch, 12, max(persistent, stagewise)),
            _record("fused-rowtile-fp32", batch, 12, 10.0),
        ]
    results = tmp_path / "2026-01-02-fake-gpu.json"
    results.write_text(json.dumps(_results(records)))
    source = REPO / "avme_ext" / "dispatch.py"
    out = tmp_path / "dispatch.py"
    proc = run_in_repo(
        [
            sys.executable,
            str(REPO / "bench" / "crossover.py"),
            str(results),
            "--dispatch",
            str(source),
            "--out",
            str(out),
            "--print",
        ],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before, after = source.read_text(), out.read_text()
    start, end = dispatch.marker_span(before)
    new_start, new_end = dispatch.marker_span(after)
    assert after[:new_start] == before[:start]
    assert after[new_end:] == before[end:]
    sources, models, table = dispatch.parse_table(after)
    for key, entries in dispatch.CROSSOVER.items():  # other GPUs' entries are kept
        assert table[key] == list(entries)
        assert sources[key] == dispatch.CROSSOVER_SOURCES[key]
        assert models[key] == dispatch.CROSSOVER_MODELS[key]
    # the model the results file measured (its --model-size and the K of its training records)
    assert models[(FAKE, "float32", "bf16")] == {**PAPER_MEASURED, "steps": [12]}
    # auto's graph variant is as fast as persistent at B=100: the named designs are preferred to "auto"
    assert table[(FAKE, "float32", "bf16")] == [(99, "ref"), (256, "persistent"), (1024, "stagewise"), (4096, "ref")]
    assert table[(FAKE, "float32", "fp32")] == [(4096, "ref")]  # rowtile never faster
    assert table[(FAKE, "float32", "tf32")] == [(4096, "ref")]  # never measured
    assert results.name in sources[(FAKE, "float32", "bf16")]
    assert "aaaaaaaaaaaa" in sources[(FAKE, "float32", "bf16")]
    compile(after, str(out), "exec")

    # the written table drives auto_impl as measured
    dispatch_table = dict(table.items())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "is_available", lambda: True)
        mp.setattr(torch.cuda, "get_device_name", lambda index=None: FAKE)
        mp.setattr(torch.cuda, "current_device", lambda: 0)
        mp.setattr(dispatch, "CROSSOVER", dispatch_table)
        mp.setattr(dispatch, "CROSSOVER_MODELS", models)
        mp.setattr(dispatch, "_ENTRY_CACHE", {})
        sizes = (50, 100, 200, 256, 500, 1024, 2048, 8192)
        got = {b: dispatch.auto_design(CUDA0, torch.float32, "bf16", b, PAPER) for b in sizes}
        assert got == {
            50: "ref",
            100: "persistent",
            200: "persistent",
            256: "persistent",
            500: "stagewise",
            1024: "stagewise",
            2048: "ref",
            8192: "ref",
        }
        assert dispatch.auto_impl(CUDA0, torch.float32, "fp32", 100, PAPER) == "ref"
        assert dispatch.auto_design(CUDA0, torch.float32, "bf16", 100, AVMEConfig(data_dim=3072)) == "ref"

    # running it again on its own output changes nothing
    again = tmp_path / "again.py"
    assert crossover.main([str(results), "--dispatch", str(out), "--out", str(again)]) == 0
    assert again.read_text() == after


def test_generator_refuses_smoke_and_cpu_files(tmp_path: Path):
    data = _results(_refs(4, 3, 10.0))
    data["device_type"] = "cpu"
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit):
        crossover.main([str(path), "--out", str(tmp_path / "d.py")])
    assert not (tmp_path / "d.py").exists()
    assert crossover.main([str(path), "--out", str(tmp_path / "d.py"), "--allow-smoke"]) == 0
    assert dispatch.parse_table((tmp_path / "d.py").read_text()).table[(FAKE, "float32", "fp32")] == [(4, "ref")]


def test_generator_refuses_a_file_without_the_model_size(tmp_path: Path):
    data = _results(_refs(100, 12, 10.0))
    del data["config"]["model_size"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="model size"):
        crossover.main([str(path), "--out", str(tmp_path / "d.py")])
    assert not (tmp_path / "d.py").exists()
