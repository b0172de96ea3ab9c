"""Files the package writes: one atomic helper, the user's umask, weights files to ship, and checkpoint
paths resolved (or refused) by what the user gave."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from avme_ext.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    default_file_mode,
    export_weights,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from avme_ext.cli import main
from avme_ext.model import AVME
from helpers import ModelArgs

SIZES: ModelArgs = {"enc_hidden": 16, "dec_hidden": 16, "latent_dim": 4, "steps": 3, "impl": "ref"}


@pytest.fixture
def umask_027():
    """Run with umask 027 (group may read, others nothing), restored afterwards."""
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _model(num_classes: int = 0, seed: int = 0, **sizes) -> AVME:
    torch.manual_seed(seed)
    return AVME(num_classes=num_classes, **{**SIZES, **sizes})


# --------------------------------------------------------------------------- atomic writes and modes
def test_atomic_write_gets_the_umask_mode(tmp_path, umask_027):
    assert default_file_mode() == umask_027
    path = atomic_write_bytes(tmp_path / "sub" / "a.bin", b"abc")
    assert path.read_bytes() == b"abc"
    assert _mode(path) == umask_027
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(b"xyz"))
    assert path.read_bytes() == b"xyz"
    assert _mode(path) == umask_027
    assert [p.name for p in path.parent.iterdir()] == ["a.bin"]  # no temporary file left


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = atomic_write_bytes(tmp_path / "a.bin", b"old")

    def broken(tmp):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_write_fsyncs_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """Durable as well as atomic: the new file's bytes reach the disk before its name replaces the old
    file, and the directory entry after (a power cut leaves the old file or the whole new one)."""
    events: list[tuple[str, int]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_replace(source: str, destination: Path) -> None:
        events.append(("replace", os.stat(source).st_ino))
        replace(source, destination)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = atomic_write_bytes(tmp_path / "a.bin", b"abc")
    written, folder = path.stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", written), ("replace", written), ("fsync", folder)]


def test_every_file_the_commands_write_gets_the_umask_mode(tmp_path, umask_027, capsys):
    """Checkpoints and their twins, eval JSON, PNGs, plots and weights files: all 0666 & ~umask."""
    run = tmp_path / "run"
    save_checkpoint(run / "best.safetensors", _model())
    (run / "metrics.jsonl").write_text(
        '{"kind": "train", "epoch": 1, "step": 5, "loss": 200.0}\n'
        '{"kind": "valid", "epoch": 1, "step": 5, "nelbo": 150.0, "kl_per_step": [1.0, 2.0, 3.0], "best": true}\n'
    )
    assert main(["eval", str(run), "--num-images", "4", "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    assert main(["sample", str(run), "--num", "2", "--reconstruct", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["plot", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "w.safetensors")]) == 0
    capsys.readouterr()
    written = [
        run / "best.safetensors",
        run / "best.json",
        tmp_path / "e.json",
        tmp_path / "s.png",
        tmp_path / "s_recon.png",
        run / "training_curve.png",
        run / "kl_per_step.png",
        tmp_path / "w.safetensors",
    ]
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(umask_027) for p in written}


# --------------------------------------------------------------------------- resolving what the user gave
def test_resolve_refuses_json_twins_and_other_files_naming_the_given_path(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "best.safetensors", _model())
    (run / "config.json").write_text("{}")
    assert resolve_checkpoint(run) == run / "best.safetensors"
    with pytest.raises(CheckpointError, match="not a checkpoint") as error:
        resolve_checkpoint(run / "best.json")
    assert str(run / "best.json") in str(error.value)
    assert str(run / "best.safetensors") in str(error.value)
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(run / "config.json")
    assert str(run / "config.json") in str(error.value)
    assert "config.safetensors" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(run / "other.safetensors")


def test_corrupt_best_names_intact_last(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "best.safetensors", _model())
    save_checkpoint(run / "last.safetensors", _model(seed=1))
    data = (run / "best.safetensors").read_bytes()
    (run / "best.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_model(run)
    assert error.value.alternative == run / "last.safetensors"
    assert str(run / "last.safetensors") in str(error.value)
    # the last checkpoint corrupt as well: no suggestion
    (run / "last.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError) as error:
        load_model(run)
    assert error.value.alternative is None
    assert "is intact" not in str(error.value)


# --------------------------------------------------------------------------- weights files
@pytest.mark.parametrize("num_classes", [0, 10])
def test_export_weights_round_trip(tmp_path, num_classes):
    run = tmp_path / "run"
    model = _model(num_classes)
    optimizer = torch.optim.Adam(model.parameters())
    model.loss(torch.randint(0, 2, (3, 784)).float(), torch.arange(3) if num_classes else None)[0].backward()
    optimizer.step()
    save_checkpoint(
        run / "best.safetensors",
        model,
        optimizer=optimizer,
        trainer_state={"state": {"step": 7, "epoch": 1}, "train": {"lr": 1e-3}},
    )
    path = export_weights(run, tmp_path / "ship" / "w.safetensors")
    tensors = load_file(path)
    assert all(k.startswith("model.") for k in tensors)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    header = _header(path)
    meta = json.loads(header["__metadata__"]["avme"])
    assert meta["format"] == "avme-weights"
    assert meta["dtype"] == "float16"
    assert meta["config"] == model.config.to_dict()
    provenance = meta["provenance"]
    assert provenance["source"] == str(run / "best.safetensors")
    assert len(provenance["source_sha256"]) == 64
    assert provenance["progress"] == {"step": 7, "epoch": 1}
    assert provenance["training"] == {"lr": 1e-3}
    loaded = load_model(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0, msg=name)
    checkpoint = load_checkpoint(path)
    assert checkpoint.weights_only
    assert checkpoint.optimizer_state is None
    assert checkpoint.provenance == provenance
    assert load_model(path, dtype=torch.float64).core.write.weight.dtype == torch.float64


def test_export_float32_is_exact_and_bfloat16_is_stored(tmp_path):
    model = _model()
    source = save_checkpoint(tmp_path / "c.safetensors", model)
    exact = load_model(export_weights(source, tmp_path / "f32.safetensors", dtype="float32"))
    for a, b in zip(model.state_dict().values(), exact.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    bf16 = export_weights(source, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert {v.dtype for v in load_file(bf16).values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype"):
        export_weights(source, tmp_path / "x.safetensors", dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_weights(source, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="source"):
        export_weights(source, source)


def test_paper_sized_float16_weights_are_under_16_mb(tmp_path):
    for num_classes in (0, 10):
        model = AVME(num_classes=num_classes, impl="ref")  # the paper's sizes: 784, 400, 400, 100, K=12
        source = save_checkpoint(tmp_path / f"c{num_classes}.safetensors", model)
        path = export_weights(source, tmp_path / f"w{num_classes}.safetensors")
        size = path.stat().st_size
        parameters = sum(p.numel() for p in model.parameters())
        assert 2 * parameters <= size < 16_000_000, (size, parameters)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("format", "something-else", "not an avme checkpoint"), ("version", 2, "checkpoint version 2 is not supported")],
)
def test_weights_file_is_refused_when_tampered(tmp_path, key, value, message):
    path = export_weights(save_checkpoint(tmp_path / "c.safetensors", _model()), tmp_path / "w.safetensors")
    header = _header(path)
    meta = json.loads(header["__metadata__"]["avme"])
    meta[key] = value
    header["__metadata__"]["avme"] = json.dumps(meta)
    _rewrite_header(path, header)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_export_command(tmp_path, capsys):
    run = tmp_path / "run"
    save_checkpoint(run / "best.safetensors", _model())
    out = tmp_path / "w.safetensors"
    assert main(["export", str(run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert str(out) in capsys.readouterr().out
    assert load_checkpoint(out).weights_only
    assert main(["sample", str(out), "--num", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "w.bin")]) == 2
    assert "--out" in capsys.readouterr().err


def _header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + size])
    return header


def _rewrite_header(path: Path, header: dict[str, Any]) -> None:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    body = data[8 + size :]
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
