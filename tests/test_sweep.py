"""``python/sweep.py --smoke``: the whole sweep (train, evaluate, table, plots) on a CPU, and its resume."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from avme_ext.plotting import MetricsError, sweep_figure
from helpers import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sweep():
    return load_script("sweep")


def counting_avme(sweep, monkeypatch) -> list[str]:
    """Record the subcommand of every avme call the sweep makes (and still run it)."""
    calls: list[str] = []
    run = sweep.avme

    def counted(argv):
        calls.append(argv[0])
        return run(argv)

    monkeypatch.setattr(sweep, "avme", counted)
    return calls


@pytest.mark.slow
def test_smoke_sweep_trains_evaluates_tabulates_plots_and_resumes(sweep, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["--smoke", "--out", str(out), "--steps", "1", "3", "--hidden", "8"]
    calls = counting_avme(sweep, monkeypatch)
    assert sweep.main(argv) == 0
    assert calls == ["train", "eval"] * 2
    document = json.loads((out / "sweep.json").read_text())
    records = document["records"]
    assert [(r["steps"], r["enc_hidden"], r["dec_hidden"]) for r in records] == [(1, 8, 8), (3, 8, 8)]
    for record in records:
        assert record["epochs"] == 1
        assert record["train_seconds"] > 0
        assert record["parameters"] > 0
        assert record["bound_name"] == "IWAE bound (S=2)"
        assert record["test_images"] == 20
        assert record["bound"] == record["test_iwae"]
        assert record["likelihood"] == "bernoulli"
        assert record["bound_bits_per_dim"] == pytest.approx(record["bound"] / (784 * 0.6931471805599453))
        assert record["dataset"] == "binarized_mnist"
    assert records[0]["parameters"] == records[1]["parameters"]  # K does not change the weights
    markdown = (out / "sweep.md").read_text()
    assert "| K01_H8 | 1 | 8/8 |" in markdown
    assert "| K03_H8 | 3 | 8/8 |" in markdown
    for name in ("bound_vs_steps.png", "bound_vs_parameters.png", "bound_vs_time.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.size[0] > 400
    printed = capsys.readouterr().out
    assert str(out / "sweep.md") in printed

    calls.clear()  # the same command again: every run is done
    (out / "sweep.md").unlink()
    assert sweep.main(argv) == 0
    assert calls == []
    assert (out / "sweep.md").is_file()

    calls.clear()  # a larger grid: only the new run trains; a run killed before its record continues
    (out / "runs" / "K03_H8" / sweep.RECORD).unlink()
    assert sweep.main([*argv[:-1], "8", "12"]) == 0
    assert calls == ["train", "eval"] * 3
    names = [r["name"] for r in json.loads((out / "sweep.json").read_text())["records"]]
    assert names == ["K01_H8", "K03_H8", "K01_H12", "K03_H12"]


def test_options_the_sweep_sets_are_refused(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--out", str(tmp_path), "--", "--epochs", "1", "--steps", "4"])
    assert stop.value.code == 2
    assert "the sweep sets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path), "--steps", "0"])
    assert not list(tmp_path.iterdir())


def test_a_failed_run_stops_the_sweep_with_its_name(sweep, tmp_path, capsys):
    code = sweep.main(["--smoke", "--out", str(tmp_path), "--steps", "2", "--hidden", "8", "--", "--lr", "-1"])
    assert code == 1
    assert "K02_H8: avme train failed" in capsys.readouterr().err
    assert not (tmp_path / "sweep.json").exists()


def test_sweep_plots_refuse_mixed_records():
    record = {
        "steps": 1,
        "enc_hidden": 8,
        "dec_hidden": 8,
        "parameters": 10,
        "train_seconds": 1.0,
        "bound": 80.0,
        "bound_name": "negative ELBO",
        "data_dim": 784,
    }
    sweep_figure([record], "steps")  # fine
    with pytest.raises(MetricsError, match="different data_dim"):
        sweep_figure([record, {**record, "data_dim": 3072}], "steps")
    with pytest.raises(MetricsError, match="lacks"):
        sweep_figure([{k: v for k, v in record.items() if k != "bound"}], "steps")
    with pytest.raises(MetricsError, match="x must be one of"):
        sweep_figure([record], "epochs")
