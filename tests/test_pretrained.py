"""Pretrained models by name: the registry, its checks, and the command line using names."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import avme_ext.pretrained as P
from avme_ext.checkpoint import save_checkpoint
from avme_ext.cli import main
from avme_ext.model import AVME
from helpers import REPO, ModelArgs

SIZES: ModelArgs = {"enc_hidden": 16, "dec_hidden": 16, "latent_dim": 4, "steps": 3, "impl": "ref"}


@pytest.fixture
def registry(tmp_path: Path, monkeypatch) -> Path:
    """An empty registry directory standing in for the package's assets."""
    directory = tmp_path / "pretrained"
    directory.mkdir()
    monkeypatch.setattr(P, "ASSET_DIR", directory)
    return directory


@pytest.fixture
def tiny_run(tmp_path) -> tuple[Path, AVME]:
    torch.manual_seed(0)
    model = AVME(num_classes=10, **SIZES)
    run = tmp_path / "run"
    save_checkpoint(run / "best.safetensors", model)
    return run, model


def test_the_shipped_registry_is_readable_and_empty():
    assert (P.ASSET_DIR / "index.json").is_file()
    assert P.list_pretrained() == []
    with pytest.raises(P.PretrainedError, match="no pretrained models are installed in this version"):
        P.load_pretrained("paper-unconditional")


def test_package_data_ships_the_registry():
    """pyproject.toml installs the registry's weights and index with the package."""
    if sys.version_info < (3, 11):
        pytest.skip("reads pyproject.toml with tomllib, new in Python 3.11")
    else:
        import tomllib

        config = tomllib.loads((REPO / "pyproject.toml").read_text())
        patterns = config["tool"]["setuptools"]["package-data"]["avme_ext"]
        assert "assets/pretrained/*.safetensors" in patterns
        assert "assets/pretrained/*.json" in patterns


def test_register_list_and_load(registry, tiny_run):
    run, model = tiny_run
    results = {"summary": {"nelbo": 123.4, "iwae_nll": 120.5}}
    entry = P.register_pretrained("tiny-conditional", run, description="a tiny test model", results=results)
    assert (registry / "tiny-conditional.safetensors").is_file()
    assert len(entry.sha256) == 64
    index = json.loads((registry / "index.json").read_text())
    assert [m["name"] for m in index["models"]] == ["tiny-conditional"]
    assert index["models"][0]["results"] == results
    assert [m.name for m in P.list_pretrained()] == ["tiny-conditional"]
    loaded = P.load_pretrained("tiny-conditional")
    assert loaded.config == model.config
    assert not loaded.training
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0)
    # registering again replaces the entry, another name adds one
    P.register_pretrained("tiny-conditional", run, description="replaced")
    P.register_pretrained("tiny-2", run, description="second", dtype="float32")
    assert [(m.name, m.description) for m in P.list_pretrained()] == [
        ("tiny-conditional", "replaced"),
        ("tiny-2", "second"),
    ]
    with pytest.raises(P.PretrainedError, match="installed: tiny-conditional, tiny-2"):
        P.pretrained_info("other")
    with pytest.raises(ValueError, match="name"):
        P.register_pretrained("Bad Name", run, description="x")


def test_damaged_file_is_refused_by_its_sha256(registry, tiny_run):
    P.register_pretrained("tiny", tiny_run[0], description="tiny")
    path = registry / "tiny.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one weight bit: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(P.PretrainedError, match="SHA-256"):
        P.load_pretrained("tiny")
    path.unlink()
    with pytest.raises(P.PretrainedError, match="missing"):
        P.load_pretrained("tiny")


def test_unreadable_index_is_a_clear_error(registry):
    (registry / "index.json").write_text("{not json")
    with pytest.raises(P.PretrainedError, match=r"index\.json"):
        P.list_pretrained()


def test_command_line_uses_names(registry, tiny_run, tmp_path, capsys):
    P.register_pretrained(
        "tiny-conditional", tiny_run[0], description="a tiny test model", results={"summary": {"nelbo": 123.4}}
    )
    assert main(["list-pretrained"]) == 0
    out = capsys.readouterr().out
    assert "tiny-conditional" in out
    assert "a tiny test model" in out
    assert "nelbo 123.40" in out
    png = tmp_path / "classes.png"
    assert main(["sample", "tiny-conditional", "--per-class", "2", "--out", str(png)]) == 0
    assert png.is_file()
    report = tmp_path / "e.json"
    assert main(["eval", "tiny-conditional", "--num-images", "5", "--no-progress", "--json", str(report)]) == 0
    provenance = json.loads(report.read_text())["provenance"]
    assert provenance["pretrained"] == "tiny-conditional"
    assert provenance["checkpoint"] == str((registry / "tiny-conditional.safetensors").resolve())
    capsys.readouterr()
    assert main(["sample", "other-name", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "other-name" in err
    assert "installed: tiny-conditional" in err


def test_command_line_says_when_no_models_are_installed(registry, tmp_path, capsys):
    assert main(["list-pretrained"]) == 0
    assert capsys.readouterr().out.strip() == "no pretrained models are installed in this version"
    for command in (["sample", "paper-unconditional", "--out", str(tmp_path / "s.png")], ["eval", "paper-conditional"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"avme {command[0]}: error: {command[1]}: ")
        assert "no pretrained models are installed in this version" in err
    assert not any(tmp_path.glob("*.png"))


def test_a_run_directory_of_the_same_name_wins(registry, tiny_run, tmp_path, capsys, monkeypatch):
    P.register_pretrained("tiny", tiny_run[0], description="tiny")
    local = tmp_path / "work"
    torch.manual_seed(5)
    save_checkpoint(local / "tiny" / "best.safetensors", AVME(**SIZES))  # unconditional, unlike the registered one
    monkeypatch.chdir(local)
    assert main(["sample", "tiny", "--num", "2", "--out", "s.png"]) == 0  # --num: only an unconditional model
