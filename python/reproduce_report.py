"""Figures and results of the reproduction: ``DOCS/images/<model>/*.png``, ``DOCS/results.json`` and
``DOCS/results.md``, beside the published numbers (each labelled as an exact NLL, an estimate or a bound)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reproduce_eval import load_pass
from reproduce_plan import MODELS, Layout, Plan
from reproduce_train import Interrupted

RESULTS_FORMAT = "avme-reproduction-results"
#: What each reported number is.
KINDS = {
    "test_nelbo": "bound: negative ELBO, >= -log p(x) (one noise draw per image)",
    "test_iwae": "bound: importance-weighted, >= -log p(x) (-log p(x|y) for a conditional model)",
    "test_reconstruction": "reconstruction term -log p(x|z): not a likelihood",
    "test_kl_per_step": "KL of each drawing step (terms of the negative ELBO)",
    "test_nll_given_y": "bound: importance-weighted, >= -log p(x|y), true labels",
    "test_nll_marginal": "bound: >= -log p(x) under a uniform label prior, one importance-weighted bound per class",
}
#: The figures of each model: the paper's Figure 7 (training curve), 8 (unrolled steps), 9 (samples per class).
FIGURES = ("training_curve.png", "kl_per_step.png", "samples.png", "unrolled.png", "reconstructions.png")


def command_line(plan: Plan) -> str:
    """The command that makes these results (without machine-specific paths)."""
    return ("python python/reproduce_paper.py --out DIR" + (" --smoke" if plan.smoke else "")
            + (f" --impl {plan.impl}" if plan.impl != "ref" else ""))


# --------------------------------------------------------------------------- figures
def _avme(*args: str) -> None:
    """Run an ``avme`` subcommand in this process (the package's own figures), without its output."""
    import contextlib
    import io

    from avme_ext.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = int(main(list(args)) or 0)
    if code in (130, 143):
        raise Interrupted(code - 128)
    if code != 0:
        raise RuntimeError(f"avme {' '.join(args)} failed with exit status {code}")


def _stale(outputs: list[Path], source: Path) -> bool:
    return not all(p.is_file() and p.stat().st_mtime_ns >= source.stat().st_mtime_ns for p in outputs)


def make_figures(layout: Layout, plan: Plan, names: list[str], images: Path, log) -> None:
    """Per model: ``avme plot`` of its training curve and per-step KL, ``avme sample`` of samples (one row
    per class for a conditional model), unrolled drawing steps and test-set reconstructions. A figure
    newer than its source is kept."""
    for name in names:
        folder = images / name
        folder.mkdir(parents=True, exist_ok=True)
        weights = str(layout.weights(name))
        common = ["--seed", str(plan.seed), "--device", "cpu"]
        jobs = [
            (["training_curve.png", "kl_per_step.png"], layout.metrics(name),
             ["plot", str(layout.metrics(name)), "--out-dir", str(folder)]),
            (["samples.png", "reconstructions.png"], layout.weights(name),
             ["sample", weights, "--out", str(folder / "samples.png"), "--reconstruct", "16",
              "--recon-out", str(folder / "reconstructions.png"), *common]),
            (["unrolled.png"], layout.weights(name), ["sample", weights, "--unroll", "--out", str(folder / "unrolled.png"),
                                                      *common]),
        ]
        for outputs, source, command in jobs:
            if _stale([folder / o for o in outputs], source):
                _avme(*command)
        log(f"{name}: figures in {folder}")


# --------------------------------------------------------------------------- results
def model_record(layout: Layout, plan: Plan, name: str, training: dict[str, Any]) -> dict[str, Any]:
    """One model's entry of ``results.json``: its test numbers, what each is, and how it was made."""
    spec = MODELS[name]
    passes = {p.name: p for p in plan.passes(name)}
    main, main_meta = load_pass(layout, plan, name, passes["main"])
    summary = main.summary()
    record: dict[str, Any] = {
        "name": name, "conditional": spec.conditional, "encoder_input": spec.encoder_input, "steps": plan.steps,
        "num_images": summary["num_images"],
        "test_nelbo": summary["nelbo"], "test_nelbo_sem": summary["nelbo_sem"],
        "test_iwae": summary.get("iwae_nll"), "test_iwae_sem": summary.get("iwae_nll_sem"),
        "iwae_samples": summary.get("iwae_samples"),
        "test_reconstruction": summary["reconstruction"], "test_kl": summary["kl"],
        "test_kl_per_step": summary["kl_per_step"],
    }
    evaluation = {"devices": sorted({m["device"] for m in main_meta}),
                  "seconds": round(sum(m["seconds"] for m in main_meta), 1)}
    if spec.conditional:
        record["test_nll_given_y"] = summary.get("nll_given_y")
        record["test_nll_marginal"] = None
        record["marginal_samples_per_class"] = None
        if "marginal" in passes:
            marginal, marginal_meta = load_pass(layout, plan, name, passes["marginal"])
            record["test_nll_marginal"] = marginal.summary().get("nll_marginal")
            record["marginal_samples_per_class"] = passes["marginal"].samples
            evaluation["marginal_seconds"] = round(sum(m["seconds"] for m in marginal_meta), 1)
    record["kinds"] = {key: KINDS[key] for key in KINDS if key in record}
    record["training"] = {k: training[k] for k in ("epochs", "epoch_cap", "stop_reason", "best_epoch", "best_valid_nelbo",
                                                   "selection", "seconds", "seconds_per_epoch", "device")}
    record["weights"] = training["weights"]
    record["evaluation"] = evaluation
    return record


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def protocol(plan: Plan) -> dict[str, Any]:
    """The plan's training and evaluation settings, as ``results.json`` records them."""
    return {"epoch_caps": plan.epochs, "patience": plan.patience, "optimizer": "Adam", "lr": plan.lr,
            "lr_schedule": f"held, then a cosine decay to {plan.lr_final:g} over the last "
                           f"{plan.lr_decay_fraction:.0%} of each epoch cap",
            "clip_grad": plan.clip_grad, "batch_size": plan.batch_size, "seed": plan.seed, "impl": plan.impl,
            "sizes": {"enc_hidden": plan.enc_hidden, "dec_hidden": plan.dec_hidden, "latent_dim": plan.latent_dim,
                      "steps": plan.steps},
            "train_subset": plan.train_subset, "valid_subset": plan.valid_subset, "test_images": plan.test_images,
            "iwae_samples": plan.samples, "marginal_samples_per_class": plan.marginal_samples,
            "eval_batch_size": plan.eval_batch_size, "max_rows": plan.max_rows}


def render_details(records: list[dict[str, Any]], plan: Plan, commit: str) -> str:
    """The sections of ``results.md`` after the tables: how the numbers were made, training, KL, figures."""
    hold, decay = plan.schedule(plan.models[0])
    devices = sorted({r["training"]["device"] for r in records} | {d for r in records for d in r["evaluation"]["devices"]})
    lines = [
        "## How these numbers were made",
        "",
        (f"- Test images: {plan.test_images}{' (the whole test split)' if plan.test_images == 10_000 else ' (a seeded random subset)'}; "
         f"IWAE with S={plan.samples} whole trajectories per image; for the conditional models -log p(x) uses "
         f"{plan.marginal_samples} trajectories per class ({plan.marginal_samples * 10} per image in all)."),
        (f"- Training: Adam, learning rate {plan.lr:g} held for the first two thirds of each model's epoch cap, then a "
         f"cosine decay to {plan.lr_final:g} over the last third ({hold} + {decay} epochs for a cap of "
         f"{plan.epochs[plan.models[0]]}), batch {plan.batch_size}, gradient-norm clip {plan.clip_grad:g}, seed "
         f"{plan.seed}, `--impl {plan.impl}`; a model stops at its cap or after {plan.patience} epochs without a better "
         "validation negative ELBO, and its best validation epoch is kept. The test split is read only once every "
         "model is trained."),
        "- Weights evaluated: the float16 files (`avme export` format), loaded as float32.",
        f"- Devices: {', '.join(devices)}. Commit: {commit}.",
        "",
        "## Training",
        "",
        "| model | epochs | epoch cap | stopped | best epoch | best validation -ELBO (bound) | seconds | seconds per epoch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        t = r["training"]
        lines.append(f"| {r['name']} | {t['epochs']} | {t['epoch_cap']} | {t['stop_reason']} | {t['best_epoch']} | "
                     f"{_fmt(t['best_valid_nelbo'])} | {t['seconds']:.0f} | {_fmt(t['seconds_per_epoch'])} |")
    lines += ["", "## KL of each drawing step on the test split (nats)", ""]
    lines.append("| model | " + " | ".join(f"t={t}" for t in range(1, plan.steps + 1)) + " |")
    lines.append("| --- " * (plan.steps + 1) + "|")
    for r in records:
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(v) for v in r["test_kl_per_step"]) + " |")
    lines += ["", "## Figures", ""]
    for r in records:
        lines.append(f"- {r['name']}: " + ", ".join(f"[{f}](images/{r['name']}/{f})" for f in FIGURES))
    lines.append("")
    return "\n".join(lines)


def write_results(layout: Layout, plan: Plan, trained: dict[str, dict[str, Any]], docs: Path, commit: str) -> list[
        dict[str, Any]]:
    """Write ``docs/results.json`` and ``docs/results.md`` (each only when its content changes)."""
    from avme_ext.checkpoint import atomic_write_bytes
    from avme_ext.results import PUBLISHED, render_results_markdown

    records = [model_record(layout, plan, name, trained[name]) for name in plan.models if name in trained]
    document = {"format": RESULTS_FORMAT, "version": 1, "smoke": plan.smoke, "command": command_line(plan),
                "commit": commit, "protocol": protocol(plan), "models": records,
                "published": [p._asdict() for p in PUBLISHED]}
    smoke = ("> A smoke run (`--smoke`): tiny models trained for a few epochs on a few hundred images; these "
             "numbers test the pipeline and say nothing about the paper.\n\n") if plan.smoke else ""
    text = render_results_markdown(records, command=command_line(plan))
    text = text.replace("\n\n", "\n\n" + smoke, 1) + "\n" + render_details(records, plan, commit)
    for path, content in ((docs / "results.json", json.dumps(document, indent=2) + "\n"), (docs / "results.md", text)):
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            atomic_write_bytes(path, content.encode("utf-8"))
    return records

