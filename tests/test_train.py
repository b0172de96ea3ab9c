"""Tests of ``avme train`` (avme_ext.training and avme_ext.cli.train) on CPU with a tiny model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from avme_ext import training as T
from avme_ext.checkpoint import load_checkpoint, load_model
from avme_ext.cli import main
from avme_ext.config import AVMEConfig
from avme_ext.data import ImageSplit, load_split
from avme_ext.distributed import DistInfo
from avme_ext.model import AVME
from avme_ext.seeds import derive_seed
from helpers import SHARED_DATA, model_args, subset_args

TINY = [*model_args(32, 8, 4), *subset_args(2000, 500), "--no-progress", "--log-every", "5", "--kl-warmup-steps", "10"]
STEPS_PER_EPOCH = 20  # 2000 images / batch 100

TRAIN_KEYS = {"kind", "epoch", "step", "loss", "reconstruction", "kl", "kl_weight", "lr", "examples_per_s", "time"}
VALID_KEYS = {
    "kind",
    "epoch",
    "step",
    "nelbo",
    "nelbo_bits_per_dim",
    "likelihood",
    "reconstruction",
    "kl",
    "kl_per_step",
    "best",
    "time",
}
EPOCH_KEYS = {"kind", "epoch", "step", "seconds", "train_loss", "examples"}
WALL_CLOCK = {"time", "examples_per_s", "seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")


def train_cli(out: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), *TINY, *extra])


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_wall_clock(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]


def assert_same_tensors(a: Path, b: Path, prefix: str = "") -> None:
    ta, tb = load_file(a), load_file(b)
    keys = sorted(k for k in ta if k.startswith(prefix))
    assert keys == sorted(k for k in tb if k.startswith(prefix))
    for key in keys:
        assert torch.equal(ta[key], tb[key]), f"{key} differs between {a} and {b}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run (the reference for every resume test)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    torch.set_num_threads(1)
    assert train_cli(out, "--epochs", "2") == 0
    return out


def test_run_directory_contents(reference: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "last.json"):
        assert (reference / name).is_file(), name
    config = json.loads((reference / "config.json").read_text())
    assert config["model"] == AVMEConfig(enc_hidden=32, dec_hidden=32, latent_dim=8, steps=4).to_dict()
    assert config["train"]["epochs"] == 2
    assert config["train"]["train_subset"] == 2000
    assert config["train"]["lr"] == 1e-3
    assert config["train"]["batch_size"] == 100
    assert config["train"]["clip_grad"] == 10.0
    assert config["world_size"] == 1

    model = load_model(reference)  # best.safetensors
    assert model.config.enc_hidden == 32
    last = load_checkpoint(reference / "last.safetensors")
    assert last.trainer_state["state"]["step"] == 2 * STEPS_PER_EPOCH
    assert last.trainer_state["state"]["epoch"] == 2
    assert last.optimizer_state is not None
    for parameter in load_model(reference / "last.safetensors").parameters():
        assert torch.isfinite(parameter).all()


def test_metrics_schema_and_progress(reference: Path) -> None:
    records = read_metrics(reference)
    kinds = [r["kind"] for r in records]
    assert kinds.count("valid") == 2
    assert kinds.count("epoch") == 2
    for record in records:
        expected = {"train": TRAIN_KEYS, "valid": VALID_KEYS, "epoch": EPOCH_KEYS}[record["kind"]]
        assert set(record) == expected, record
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30, 35, 40]  # --log-every 5
    assert train[-1]["loss"] < train[0]["loss"] - 50, "the loss did not fall"
    # KL warm-up over 10 steps: the weight of the update after s steps is min(1, s / 10)
    assert [r["kl_weight"] for r in train[:3]] == [0.4, 0.9, 1.0]
    assert all(r["lr"] == 1e-3 and r["examples_per_s"] > 0 for r in train)
    valid = [r for r in records if r["kind"] == "valid"]
    assert all(math.isfinite(r["nelbo"]) and len(r["kl_per_step"]) == 4 for r in valid)
    assert valid[1]["nelbo"] < valid[0]["nelbo"]
    assert valid[0]["best"]
    assert valid[1]["best"]
    assert valid[0]["nelbo"] == pytest.approx(valid[0]["reconstruction"] + valid[0]["kl"])
    for record in valid:  # bits per dimension beside nats: nats / (D ln 2), D = 784
        assert record["nelbo_bits_per_dim"] == pytest.approx(record["nelbo"] / (784 * math.log(2)))
        assert record["likelihood"] == "bernoulli"
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["examples"] for e in epochs] == [2000, 2000]
    assert [e["step"] for e in epochs] == [20, 40]
    assert all(e["seconds"] > 0 for e in epochs)
    times = [r["time"] for r in records if "time" in r]
    assert times == sorted(times)


def test_resume_is_bit_identical(reference: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train_cli(out, "--epochs", "1") == 0
    err = capsys.readouterr().err
    # what the run costs: the plan up front, one measured estimate, the summary (singular "1 epoch")
    assert "20 steps per epoch, 20 steps to go (1 epoch) on cpu" in err
    assert err.count("ms per step on cpu: about ") == 1
    assert "for the 20 steps to go" in err
    assert "done: 1 epoch, 20 steps in " in err
    assert "(1 process on cpu)" in err
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert_same_tensors(reference / "last.safetensors", out / "last.safetensors")  # weights + Adam state
    assert_same_tensors(reference / "best.safetensors", out / "best.safetensors", "model.")
    assert without_wall_clock(read_metrics(out)) == without_wall_clock(read_metrics(reference))
    # a finished run resumed again has nothing to do, and its files are left as they are
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ([], ["--epochs", "1"]):
        assert main(["train", "--out", str(out), "--resume", "--no-progress", *extra]) == 0
        assert "nothing to do" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 2


class SimulatedCrashError(Exception):
    pass


def test_mid_epoch_resume_after_crash(reference: Path, tmp_path: Path, monkeypatch) -> None:
    """A crash at step 13 with --checkpoint-every 7 resumes from step 7 and ends like the reference."""
    out = tmp_path / "run"
    original = T.Trainer.train_step

    def crashing(self, *args, **kwargs):
        if self.state.step == 13:
            raise SimulatedCrashError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(T.Trainer, "train_step", crashing)
    with pytest.raises(SimulatedCrashError):
        train_cli(out, "--epochs", "2", "--checkpoint-every", "7")
    state = load_checkpoint(out / "last.safetensors").trainer_state["state"]
    assert (state["step"], state["epoch"], state["batch"]) == (7, 0, 7)
    monkeypatch.setattr(T.Trainer, "train_step", original)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_tensors(reference / "last.safetensors", out / "last.safetensors")
    # records written after the checkpoint by the crashed run were dropped, not duplicated
    assert without_wall_clock(read_metrics(out)) == without_wall_clock(read_metrics(reference))


def test_refuses_to_overwrite_a_run(reference: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert train_cli(out, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err
    assert "--resume" in err
    assert "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite of a run that then cannot start (a subset larger than the split) keeps the old run
    assert train_cli(out, "--epochs", "1", "--overwrite", "--train-subset", "60000") == 2
    assert "--train-subset 60000 is larger than" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "notes.txt").write_text("mine")
    assert train_cli(out, "--epochs", "1", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"  # only run files are replaced
    assert load_checkpoint(out / "last.safetensors").trainer_state["state"]["epoch"] == 1
    assert len([r for r in read_metrics(out) if r["kind"] == "epoch"]) == 1


def test_resume_without_checkpoint_starts_a_new_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train_cli(out, "--resume", "--epochs", "1", "--train-subset", "300", "--valid-subset", "0") == 0
    assert "no checkpoint" in capsys.readouterr().err
    assert (out / "last.safetensors").is_file()
    assert not (out / "best.safetensors").exists()
    assert [r["kind"] for r in read_metrics(out)] == ["train", "epoch"]  # validation disabled


def test_resume_refuses_changed_settings(reference: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.001 (checkpoint) vs 0.01 (this command)" in err
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "steps=4" in err
    assert "steps=6" in err


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--lr",
        "--batch-size",
        "--epochs",
        "--clip-grad",
        "--seed",
        "--device",
        "--impl",
        "--precision",
        "--num-classes",
        "--conditional",
        "--enc-hidden",
        "--dec-hidden",
        "--latent-dim",
        "--steps",
        "--encoder-input",
        "--dataset",
        "--data-root",
        "--download",
        "--train-subset",
        "--valid-subset",
        "--kl-warmup-steps",
        "--out",
        "--tensorboard",
        "--no-tensorboard",
        "--resume",
        "--checkpoint-every",
        "--log-every",
        "--skip-nonfinite",
        "--overwrite",
        "--graph",
        "examples:",
        "torchrun",
    ):
        assert option in text, option
    flat = " ".join(text.split())
    # one style of defaults, never stated twice, and --data-root described as in the other commands
    assert "(default " not in flat
    assert "(default: 50)" in flat
    assert "(default: auto)" in flat
    options = " ".join(text.split("\noptions:")[1].split("\nexamples:")[0].split())
    entries = [entry for entry in options.split(" --") if entry]
    assert len(entries) > 30
    assert all(entry.count("(default:") <= 1 for entry in entries), [e for e in entries if e.count("(default:") > 1]
    from avme_ext.cli._common import DATA_ROOT_HELP

    assert " ".join(DATA_ROOT_HELP.split()) in flat
    # the quick example can be run twice (a fixed --out without --overwrite would be refused the second time)
    quick = [line for line in text.splitlines() if "runs/quick" in line]
    assert quick
    assert all("--overwrite" in line for line in quick)


def test_pure_functions() -> None:
    assert T.kl_weight_at(0, 0) == 1.0
    assert T.kl_weight_at(0, 4) == 0.0
    assert T.kl_weight_at(2, 4) == 0.5
    assert T.kl_weight_at(9, 4) == 1.0
    assert T.batches_per_epoch(2000, 100) == 20
    assert T.batches_per_epoch(2050, 100) == 21
    assert T.batches_per_epoch(2001, 100, world_size=2) == 20  # a 1-example batch cannot be split in 2
    assert T.batches_per_epoch(2002, 100, world_size=2) == 21
    a, b = T.epoch_permutation(50, 3, 1), T.epoch_permutation(50, 3, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, T.epoch_permutation(50, 3, 2))
    assert not torch.equal(a, T.epoch_permutation(50, 4, 1))
    assert sorted(a.tolist()) == list(range(50))
    assert T.TrainState(epoch=1, batch=5).steps_left(3, 20) == 35  # the rest of epoch 2 (15 steps), epoch 3 (20)
    # the training streams' seeds never change (a checkpoint resumes with the same noise in any version)
    assert derive_seed("avme-train", 0, "noise", 1) == 2070960897098411645
    assert derive_seed("avme-train", 0, "epoch", 0) == 8417313910559108253
    assert derive_seed("avme-train", 0, "noise", 1) != derive_seed("avme-train", 0, "noise", 2)


def _train_stream(seed: int, *tags: object) -> torch.Generator:
    """A generator seeded as the training stream ``tags`` of a run with ``seed`` (avme_ext.training's docstring)."""
    return torch.Generator().manual_seed(derive_seed("avme-train", seed, *tags))


class RecordingStep:
    """A :class:`~avme_ext.training.step.TrainStep` that records what every step is given and updates nothing."""

    def __init__(self, model: AVME) -> None:
        self.optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters())
        self.calls: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (x, eps, kl_weight) of every step

    def gradients(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        eps: torch.Tensor,
        global_size: int,
        kl_weight: float,
        stop: bool,
    ) -> T.StepStats:
        self.calls.append((x, eps, kl_weight))
        return T.StepStats(0.0, 0.0, 0.0, 0.0, stop)

    def update(self) -> None:
        pass

    def set_learning_rate(self, lr: float) -> None:
        pass

    def skip(self) -> None:
        pass


def test_each_step_gets_its_batch_binarization_noise_and_kl_weight_from_the_seed(tmp_path: Path) -> None:
    """Step s of a run with seed S: the images at positions [sB, (s+1)B) of the epoch's randperm from (S, "epoch",
    0), binarized from (S, "data", s), noise randn(K, B, Z) from (S, "noise", s), KL weight min(1, s / warm-up)."""
    seed, batch, warmup = 5, 10, 4
    gray = torch.rand(35, 12, generator=torch.Generator().manual_seed(0))
    train = ImageSplit(gray, torch.zeros(35, dtype=torch.int64), False, "gray/train", (1, 3, 4))
    model = AVME(data_dim=12, enc_hidden=6, dec_hidden=6, latent_dim=2, steps=3, image_shape=(1, 3, 4), impl="ref")
    cfg = T.TrainConfig(batch_size=batch, seed=seed, kl_warmup_steps=warmup, progress=False)
    data = T.TrainingData(train, None, T.batches_per_epoch(35, batch))
    step = RecordingStep(model)
    setup = T.TrainingSetup(cfg, DistInfo(), torch.device("cpu"), data, model, step, T.TrainState())
    assert T.Trainer(setup, tmp_path).train_epoch(0, lambda epoch: None)
    order = torch.randperm(35, generator=_train_stream(seed, "epoch", 0))
    assert len(step.calls) == 4
    for s, (x, eps, kl_weight) in enumerate(step.calls):
        rows = order[s * batch : (s + 1) * batch]
        assert torch.equal(x, torch.bernoulli(gray[rows], generator=_train_stream(seed, "data", s))), s
        assert torch.equal(eps, torch.randn(3, len(rows), 2, generator=_train_stream(seed, "noise", s))), s
        assert kl_weight == min(1.0, s / warmup), s


def test_the_subsets_are_drawn_by_the_runs_seed() -> None:
    cfg = T.TrainConfig(train_subset=40, valid_subset=30, seed=7)
    data = T.load_training_data(cfg, AVMEConfig(), DistInfo(), torch.device("cpu"))
    assert data.valid is not None
    for got, name, size in ((data.train, "train", 40), (data.valid, "valid", 30)):
        expected = load_split("binarized_mnist", name).subset(size, _train_stream(7, f"{name}-subset"))
        assert torch.equal(got.images, expected.images), name


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"lr \(--lr\) must be a finite number > 0, got nan"):
        T.TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be an integer >= 1, got 0"):
        T.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"graph \(--graph\) must be one of"):
        T.TrainConfig(graph="yes")
    with pytest.raises(ValueError, match="unknown training options"):
        T.resolve_configs({"learning_rate": 1.0})
    with pytest.raises(T.TrainError, match="divisible"):
        T.build_setup(T.TrainConfig(batch_size=100), AVMEConfig(), DistInfo(0, 3, 0), torch.device("cpu"))


def test_tensorboard_is_optional(tmp_path: Path, capsys) -> None:
    small = ["--train-subset", "200", "--valid-subset", "0", "--epochs", "1"]
    if not T.tensorboard_available():
        assert train_cli(tmp_path / "a", *small, "--tensorboard") == 2
        assert "pip install tensorboard" in capsys.readouterr().err
        assert train_cli(tmp_path / "b", *small) == 0  # the default: on only when importable
        assert not (tmp_path / "b" / "tensorboard").exists()
    else:
        assert train_cli(tmp_path / "a", *small, "--tensorboard") == 0
        assert any((tmp_path / "a" / "tensorboard").iterdir())
    assert train_cli(tmp_path / "c", *small, "--no-tensorboard") == 0
    assert not (tmp_path / "c" / "tensorboard").exists()


def test_patience_stops_after_n_epochs_without_a_better_validation_bound(tmp_path: Path, monkeypatch, capsys) -> None:
    """Validation bounds 100, 99, 99.5, 99.2 with --patience 2: the run ends after epoch 4 (exit 0), keeps
    epoch 2 as best, and a resume with a larger --epochs stops again at once."""
    from avme_ext import evaluation  # the module whose gather_across_ranks the trainer calls

    bounds = iter([100.0, 99.0, 99.5, 99.2, 90.0])
    real = evaluation.gather_across_ranks

    def scripted(result):
        merged = real(result)
        merged.nelbo = torch.full_like(merged.nelbo, next(bounds))
        return merged

    monkeypatch.setattr(evaluation, "gather_across_ranks", scripted)
    out = tmp_path / "run"
    small = ("--train-subset", "200", "--valid-subset", "100")
    assert train_cli(out, *small, "--epochs", "6", "--patience", "2") == 0
    state = load_checkpoint(out / "last.safetensors").trainer_state["state"]
    assert (state["epoch"], state["best_epoch"], state["best_nelbo"]) == (4, 2, 99.0)
    assert load_checkpoint(out / "best.safetensors").trainer_state["state"]["epoch"] == 2
    assert "early stop after epoch 4: no better validation nelbo for 2 epochs (--patience 2)" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--epochs", "8", "--no-progress"]) == 0
    assert "early stop after epoch 4" in capsys.readouterr().err
    assert load_checkpoint(out / "last.safetensors").trainer_state["state"]["step"] == state["step"]
    with pytest.raises(ValueError, match=r"patience \(--patience\) must be an integer >= 0"):
        T.TrainConfig(patience=-1)


MNIST = SHARED_DATA / "mnist"


@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no ../shared/data/mnist")
def test_conditional_dynamic_binarization_resumes_exactly(tmp_path: Path) -> None:
    args = [
        "--conditional",
        "--encoder-input",
        "error",
        "--dataset",
        "mnist_dynamic",
        "--data-root",
        str(MNIST),
        *model_args(16, 4, 3),
        "--train-subset",
        "300",
        "--valid-subset",
        "100",
        "--batch-size",
        "60",
        "--no-progress",
    ]
    assert main(["train", "--out", str(tmp_path / "full"), *args, "--epochs", "2"]) == 0
    assert main(["train", "--out", str(tmp_path / "part"), *args, "--epochs", "1"]) == 0
    assert main(["train", "--out", str(tmp_path / "part"), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert_same_tensors(tmp_path / "full" / "last.safetensors", tmp_path / "part" / "last.safetensors")
    model = load_model(tmp_path / "full")
    assert model.num_classes == 10
    assert model.config.encoder_input == "error"
