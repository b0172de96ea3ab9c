"""Tests of avme_ext.distributed: two-process gloo training under torchrun equals one process,
and sharded evaluation equals unsharded evaluation (CPU, subprocesses with timeouts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avme_ext import distributed as D
from avme_ext.checkpoint import load_model
from avme_ext.data import load_split
from avme_ext.evaluation import evaluate

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180
MNIST = REPO.parent / "shared" / "data" / "mnist"
# the harder data path when the official MNIST files are there: labels (conditional model) and a fresh
# Bernoulli draw of every batch (dynamic binarization), which must not depend on the sharding either
DATA = (["--dataset", "mnist_dynamic", "--data-root", str(MNIST)]
        if (MNIST / "train-images-idx3-ubyte.gz").is_file() else ["--dataset", "binarized_mnist"])
TINY = ["--enc-hidden", "32", "--dec-hidden", "32", "--latent-dim", "8", "--steps", "4", "--train-subset", "1000",
        "--valid-subset", "300", "--valid-batch-size", "100", "--batch-size", "50", "--epochs", "1",
        "--log-every", "5", "--no-progress", "--conditional", *DATA]


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded CPU math, like the subprocesses (OMP_NUM_THREADS=1): results then match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    result = subprocess.run(command, env=env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_two_process_training_equals_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "avme_ext", "train", "--out", str(one), *TINY],
                            env=env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr
    # --resume on a fresh directory: what an elastic job (--max-restarts) does from its first launch
    ddp = torchrun("--max-restarts=1", "-m", "avme_ext", "train", "--out", str(two), "--resume", *TINY)
    assert "no checkpoint" in ddp.stderr and "2 process" in ddp.stderr

    a, b = load_file(one / "last.safetensors"), load_file(two / "last.safetensors")
    model_keys = [k for k in a if k.startswith("model.")]
    assert model_keys and sorted(a) == sorted(b)
    for key in model_keys:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=f"{key} differs")

    metrics = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["kind"] for r in metrics[0]] == [r["kind"] for r in metrics[1]]
    for r1, r2 in zip(*metrics):
        assert r1["step"] == r2["step"]
        for key in ("loss", "nelbo", "train_loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5), (key, r1, r2)
        if "examples" in r1:
            assert r1["examples"] == r2["examples"] == 1000
    assert json.loads((two / "config.json").read_text())["world_size"] == 2


SHARDED_EVAL = textwrap.dedent("""
    import json, sys, torch
    from avme_ext import distributed as D
    from avme_ext.checkpoint import load_model
    from avme_ext.data import load_split
    from avme_ext.evaluation import evaluate
    info = D.detect()
    D.setup(info, torch.device("cpu"))
    model = load_model(sys.argv[1])
    split = load_split("binarized_mnist", "valid").subset(250, torch.Generator().manual_seed(1))
    part = evaluate(model, split, batch_size=40, seed=7, shard=(info.rank, info.world_size))
    merged = D.gather_eval_result(part)
    if info.rank == 0:
        json.dump({"part": len(part), "indices": merged.indices.tolist(), "nelbo": merged.nelbo.tolist(),
                   "kl": merged.kl.tolist(), "summary": merged.summary()}, open(sys.argv[2], "w"))
    D.teardown()
""")


def test_sharded_evaluation_equals_unsharded(tmp_path: Path) -> None:
    from avme_ext.model import AVME
    from avme_ext.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.safetensors", AVME(enc_hidden=16, dec_hidden=16, latent_dim=4, steps=3))
    script = tmp_path / "sharded_eval.py"
    script.write_text(SHARDED_EVAL)
    torchrun(str(script), str(tmp_path / "model.safetensors"), str(tmp_path / "out.json"))
    sharded = json.loads((tmp_path / "out.json").read_text())

    model = load_model(tmp_path / "model.safetensors")
    split = load_split("binarized_mnist", "valid").subset(250, torch.Generator().manual_seed(1))
    full = D.gather_eval_result(evaluate(model, split, batch_size=40, seed=7))  # single process: merge of one
    assert sharded["part"] == 130  # rank 0 holds chunks 0, 2, 4, 6 of 7 (40 + 40 + 40 + 10 images)
    assert sharded["indices"] == list(range(250)) == full.indices.tolist()
    assert sharded["nelbo"] == full.nelbo.tolist()  # exact, not approximate
    assert sharded["kl"] == full.kl.tolist()
    assert sharded["summary"]["nelbo"] == full.summary()["nelbo"]


def test_detect_reads_the_torchrun_environment() -> None:
    assert D.detect({}) == D.DistInfo(0, 1, 0) and not D.DistInfo().distributed and D.DistInfo().is_main
    info = D.detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.distributed, info.is_main) == (3, 4, 1, True, False)
    with pytest.raises(RuntimeError, match="incomplete torchrun environment"):
        D.detect({"RANK": "0"})
    with pytest.raises(RuntimeError, match="not an integer"):
        D.detect({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(RuntimeError, match="inconsistent"):
        D.detect({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_local_rows_partition_the_global_batch() -> None:
    rows = [list(range(10))[D.local_rows(10, r, 3)] for r in range(3)]
    assert rows == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(rows, [])) == list(range(10))
    with pytest.raises(ValueError):
        D.local_rows(10, 3, 3)


def test_single_process_helpers_are_no_ops() -> None:
    assert not D.is_initialized()
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_object(5) == [5]
    assert D.any_true(True, torch.device("cpu")) and not D.any_true(False, torch.device("cpu"))
    t = torch.ones(2)
    assert D.all_reduce_sum(t) is t
    D.barrier()
    D.teardown()
    assert D.resolve_device("cpu", D.DistInfo()) == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device|only cpu and cuda"):
        D.resolve_device("tpu", D.DistInfo())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.resolve_device("cuda", D.DistInfo())
