"""Smoke test of python/reproduce_paper.py: train, evaluate, figures and the results files, on tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, subprocess_env

from avme_ext.results import PUBLISHED, render_results_markdown


def test_reproduce_script_end_to_end(tmp_path):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    command = [
        sys.executable, str(REPO / "python" / "reproduce_paper.py"), "--out", str(runs), "--docs", str(docs),
        "--models", "avme-canvas-conditional", "--epochs", "1", "--samples", "2", "--num-images", "20",
        "--device", "cpu", "--",
        "--train-subset", "300", "--valid-subset", "100", "--enc-hidden", "16", "--dec-hidden", "16",
        "--latent-dim", "4", "--no-progress",
    ]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = json.loads((docs / "results.json").read_text())
    assert len(records) == 1
    record = records[0]
    assert record["name"] == "avme-canvas-conditional" and record["conditional"] and record["encoder_input"] == "canvas"
    for key in ("test_nelbo", "test_iwae", "test_reconstruction", "test_nll_given_y", "test_nll_marginal"):
        assert isinstance(record[key], float) and record[key] > 0, key
    assert record["iwae_samples"] == 2 and record["num_images"] == 20
    assert record["test_reconstruction"] < record["test_nelbo"]
    table = (docs / "results.md").read_text()
    assert "avme-canvas-conditional" in table and "80.50" in table and "not a likelihood" in table
    for name in ("samples.png", "reconstructions.png", "unrolled.png", "training_curve.png", "kl_per_step.png"):
        assert (docs / "figures" / "avme-canvas-conditional" / name).is_file(), name
    # A second invocation finds every stage done and only rewrites the results.
    again = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "avme_ext eval" not in again.stdout


def test_published_numbers_are_labelled():
    kinds = {p.model: p.kind for p in PUBLISHED}
    assert kinds["AVME (paper's Table 1)"].startswith("reconstruction term")
    assert kinds["NADE"] == "exact NLL" and kinds["DRAW, with attention"].startswith("bound")
    text = render_results_markdown([])
    assert all(f"{p.nats:.2f}" in text for p in PUBLISHED)
