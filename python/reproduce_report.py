"""Local stages of the reproduction (no GPU needed): figures, ``docs/results.json`` and ``docs/results.md``,
and the float16 weights of the best models for the package's pretrained registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from reproduce_eval import StageOrderError, load_pass, passes_for
from reproduce_state import Layout, Manifest, ModelSpec, Plan, atomic_write_text

#: What each reported number is.
KINDS = {
    "test_nelbo": "bound: negative ELBO, >= -log p(x) (one noise draw per image)",
    "test_iwae": "bound: importance-weighted, >= -log p(x) (-log p(x|y) for a conditional model)",
    "test_reconstruction": "reconstruction term -log p(x|z): not a likelihood",
    "test_kl_per_step": "KL of each drawing step (terms of the negative ELBO)",
    "test_nll_given_y": "bound: importance-weighted, >= -log p(x|y), true labels",
    "test_nll_marginal": "bound: >= -log p(x) under a uniform label prior, one importance-weighted bound per class",
}
FIGURES = ("training_curve.png", "kl_per_step.png", "samples.png", "reconstructions.png", "unrolled.png")


def _avme(*args: str) -> int:
    """Run an ``avme`` subcommand in this process (the package's own figures)."""
    from avme_ext.cli import main

    print("$ avme", " ".join(args), flush=True)
    try:
        return int(main(list(args)) or 0)
    except SystemExit as stop:  # argparse errors
        return int(stop.code or 0)


# --------------------------------------------------------------------------- figures
def figures_stage(layout: Layout, manifest: Manifest, figures_dir: Path, log) -> None:
    """Training curve (Figure 7) and per-step KL of the validation split from the metrics; samples (per
    class for a conditional model: Figure 9), unrolled drawing steps (Figure 8) and test-set
    reconstructions from the selected weights. Existing files are kept."""
    if not manifest.all_trained():
        raise StageOrderError(f"figures need every model trained; still training: {manifest.untrained()}")
    plan = manifest.plan
    for spec in plan.specs:
        folder = figures_dir / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        weights = str(layout.weights(spec.name))
        common = ["--seed", str(plan.seed), "--device", "cpu"]
        jobs = [
            (("training_curve.png", "kl_per_step.png"), ["plot", str(layout.metrics(spec.name)), "--out-dir", str(folder)]),
            (("samples.png", "reconstructions.png"),
             ["sample", weights, "--out", str(folder / "samples.png"), "--reconstruct", "16",
              "--recon-out", str(folder / "reconstructions.png"), *common]),
            (("unrolled.png",), ["sample", weights, "--unroll", "--out", str(folder / "unrolled.png"), *common]),
        ]
        for outputs, command in jobs:
            if all((folder / name).is_file() for name in outputs):
                continue
            if _avme(*command) != 0:
                raise RuntimeError(f"{spec.name}: avme {' '.join(command)} failed")
        log(f"{spec.name}: figures in {folder}")


# --------------------------------------------------------------------------- results
def _model_steps(layout: Layout, name: str) -> int:
    from avme_ext.checkpoint import load_checkpoint

    return int(load_checkpoint(layout.weights(name)).config.steps)


def collect_record(layout: Layout, manifest: Manifest, spec: ModelSpec) -> dict[str, Any]:
    """One object of ``docs/results.json``: the test-split numbers of a model, what each is, and how it was made."""
    plan = manifest.plan
    passes = {p.name: p for p in passes_for(spec, plan)}
    main, main_meta = load_pass(layout, spec.name, passes["main"], plan)
    summary = main.summary()
    entry = manifest.model(spec.name)
    record: dict[str, Any] = {
        "name": spec.name,
        "conditional": spec.conditional,
        "encoder_input": spec.encoder_input,
        "steps": _model_steps(layout, spec.name),
        "num_images": summary["num_images"],
        "test_nelbo": summary["nelbo"],
        "test_nelbo_sem": summary["nelbo_sem"],
        "test_iwae": summary.get("iwae_nll"),
        "test_iwae_sem": summary.get("iwae_nll_sem"),
        "iwae_samples": summary.get("iwae_samples"),
        "test_reconstruction": summary["reconstruction"],
        "test_kl": summary["kl"],
        "test_kl_per_step": summary["kl_per_step"],
    }
    evaluation = {"seed": plan.seed, "batch_size": plan.eval_batch_size, "max_rows": plan.max_rows,
                  "device_names": sorted({m["device_name"] for m in main_meta}),
                  "seconds": round(sum(m["seconds"] for m in main_meta), 3)}
    if spec.conditional:
        record["test_nll_given_y"] = summary.get("nll_given_y")
        record["test_nll_marginal"] = None
        record["marginal_samples_per_class"] = None
        if "marginal" in passes:
            marginal, marginal_meta = load_pass(layout, spec.name, passes["marginal"], plan)
            record["test_nll_marginal"] = marginal.summary().get("nll_marginal")
            record["marginal_samples_per_class"] = passes["marginal"].samples
            evaluation["marginal_seconds"] = round(sum(m["seconds"] for m in marginal_meta), 3)
    record["kinds"] = {key: KINDS[key] for key in KINDS if key in record}
    record["training"] = {
        "epochs": entry["epochs_done"], "epoch_cap": entry["epochs_target"], "best_epoch": entry["best_epoch"],
        "best_valid_nelbo": entry["best_valid_nelbo"], "stop_reason": entry["stop_reason"],
        "lr": plan.lr, "lr_schedule": plan.lr_schedule, "lr_final": plan.lr_final,
        "lr_decay_fraction": plan.lr_decay_fraction, "patience": plan.patience, "batch_size": plan.batch_size,
        "seconds": entry["train_seconds"], "selection": "best validation negative ELBO (validation split only)",
    }
    record["weights"] = {**entry["weights"], "path": layout.rel(layout.weights(spec.name)), "dtype": "float16"}
    record["evaluation"] = evaluation
    return record


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def describe_schedule(plan: Plan) -> str:
    """``"constant learning rate 0.001"``, or the held rate and its cosine decay."""
    if plan.lr_schedule == "constant":
        return f"constant learning rate {plan.lr:g}"
    return (f"learning rate {plan.lr:g}, decayed to {plan.lr_final:g} along a {plan.lr_schedule} over the last "
            f"{plan.lr_decay_fraction:.0%} of each model's epoch cap")


def render_details(records: list[dict[str, Any]], manifest: Manifest, figures_rel: str) -> str:
    """The sections of ``docs/results.md`` after the table: how the numbers were made, training, KL, figures."""
    plan = manifest.plan
    calls = manifest.data["calls"]
    devices = sorted({c.get("device_name", "?") for c in calls if c.get("stage") in ("auto", "train", "eval", "all")})
    commits = sorted({c.get("commit", "?") for c in calls})
    images = records[0]["num_images"] if records else 0
    lines = [
        "## How these numbers were made",
        "",
        (f"- Test images: {images}{' (the whole test split)' if images == 10_000 else ' (a seeded random subset)'}; "
         f"IWAE with S={plan.samples} whole trajectories per image; for the conditional models -log p(x) uses "
         f"{plan.marginal_samples} trajectories per class ({plan.marginal_samples * 10} per image in all)."),
        (f"- Training: Adam, {describe_schedule(plan)}, batch {plan.batch_size}, gradient-norm clip "
         f"{plan.clip_grad:g}, seed {plan.seed}; each model stops at its epoch cap or after {plan.patience} epochs "
         "without a better validation negative ELBO, and its best validation epoch is kept. The test split was "
         "read only after every model had finished training."),
        "- Weights evaluated: the float16 files (`weights.fp16.safetensors`) that are shipped, loaded as float32.",
        f"- Devices: {', '.join(devices) or 'n/a'}. Commits: {', '.join(commits)}.",
        "",
        "## Training",
        "",
        "| model | epochs | epoch cap | best epoch | best validation -ELBO (bound) | stopped | training seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        t = r["training"]
        lines.append(f"| {r['name']} | {t['epochs']} | {t['epoch_cap']} | {t['best_epoch']} | {_fmt(t['best_valid_nelbo'])} | "
                     f"{t['stop_reason']} | {t['seconds']:.0f} |")
    lines += ["", "## KL of each drawing step on the test split (nats)", ""]
    if records:
        steps = len(records[0]["test_kl_per_step"])
        lines.append("| model | " + " | ".join(f"t={t}" for t in range(1, steps + 1)) + " |")
        lines.append("| --- " * (steps + 1) + "|")
        for r in records:
            lines.append(f"| {r['name']} | " + " | ".join(_fmt(v) for v in r["test_kl_per_step"]) + " |")
    lines += ["", "## Figures", ""]
    for r in records:
        lines.append(f"- {r['name']}: " + ", ".join(f"[{name}]({figures_rel}/{r['name']}/{name})" for name in FIGURES))
    lines.append("")
    return "\n".join(lines)


def report_stage(layout: Layout, manifest: Manifest, docs: Path, command: str, log) -> list[dict[str, Any]]:
    """Write ``docs/results.json`` (a list of records), ``docs/results.md`` and a copy of the manifest
    (``docs/reproduction-manifest.json``: every call's timings, devices and commits)."""
    from avme_ext.results import render_results_markdown

    records = [collect_record(layout, manifest, spec) for spec in manifest.plan.specs]
    docs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(docs / "results.json", json.dumps(records, indent=2) + "\n")
    text = render_results_markdown(records, command=command) + "\n" + render_details(records, manifest, "figures")
    atomic_write_text(docs / "results.md", text)
    atomic_write_text(docs / "reproduction-manifest.json", json.dumps(manifest.data, indent=2) + "\n")
    log(f"wrote {docs / 'results.json'}, {docs / 'results.md'} and {docs / 'reproduction-manifest.json'}")
    return records


# --------------------------------------------------------------------------- pretrained weights
def select_best(manifest: Manifest) -> dict[str, str]:
    """The model with the best validation negative ELBO among the unconditional ones and among the conditional ones."""
    chosen: dict[str, str] = {}
    for kind, conditional in (("unconditional", False), ("conditional", True)):
        candidates = [(manifest.model(s.name)["best_valid_nelbo"], s.name) for s in manifest.plan.specs
                      if s.conditional == conditional and manifest.model(s.name)["best_valid_nelbo"] is not None]
        if candidates:
            chosen[kind] = min(candidates)[1]
    return chosen


def publish_stage(layout: Layout, manifest: Manifest, docs: Path, pretrained_dir: Path, log) -> list[Path]:
    """Put the float16 weights of the best unconditional and the best conditional model (chosen on the
    validation split) into the pretrained registry ``pretrained_dir``, with their test results."""
    results_path = docs / "results.json"
    if not results_path.is_file():
        raise StageOrderError(f"{results_path} does not exist: run the report stage first")
    records = {r["name"]: r for r in json.loads(results_path.read_text(encoding="utf-8"))}
    try:
        from avme_ext.pretrained import register_pretrained
    except ImportError:
        register_pretrained = None
    written = []
    for kind, name in select_best(manifest).items():
        spec_record = records.get(name, {})
        description = (f"AVME on binarized MNIST, {kind}, encoder input {spec_record.get('encoder_input')}, "
                       f"K={spec_record.get('steps')}: the reproduction's best {kind} model by validation ELBO")
        if register_pretrained is not None:
            entry = register_pretrained(name, layout.weights(name), description=description, results=spec_record,
                                        directory=pretrained_dir)
            written.append(pretrained_dir / entry.file)
        else:
            pretrained_dir.mkdir(parents=True, exist_ok=True)
            target = pretrained_dir / f"{name}.safetensors"
            shutil.copyfile(layout.weights(name), target)
            written.append(target)
            log("avme_ext.pretrained is not available: copied the weights file without a registry entry")
        log(f"{kind}: {name} -> {written[-1]}")
    return written
