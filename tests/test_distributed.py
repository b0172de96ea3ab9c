"""Tests of avme_ext.distributed: two-process gloo training under torchrun equals one process,
and sharded evaluation equals unsharded evaluation (CPU, subprocesses with timeouts)."""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avme_ext import distributed as D
from avme_ext.checkpoint import load_model
from avme_ext.data import load_split
from avme_ext.evaluation import evaluate, gather_across_ranks
from helpers import REPO, SHARED_DATA, free_port, model_args, run_in_repo, subprocess_env, subset_args

TIMEOUT = 180
MNIST = SHARED_DATA / "mnist"
# the harder data path when the official MNIST files are there: labels (conditional model) and a fresh
# Bernoulli draw of every batch (dynamic binarization), which must not depend on the sharding either
DATA = (
    ["--dataset", "mnist_dynamic", "--data-root", str(MNIST)]
    if (MNIST / "train-images-idx3-ubyte.gz").is_file()
    else ["--dataset", "binarized_mnist"]
)
TINY = [
    *model_args(32, 8, 4),
    *subset_args(1000, 300),
    "--valid-batch-size",
    "100",
    "--batch-size",
    "50",
    "--epochs",
    "1",
    "--log-every",
    "5",
    "--no-progress",
    "--conditional",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]
    result = run_in_repo(command, env=subprocess_env(), timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_two_process_training_equals_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_in_repo(
        [sys.executable, "-m", "avme_ext", "train", "--out", str(one), *TINY], env=subprocess_env(), timeout=TIMEOUT
    )
    assert single.returncode == 0, single.stderr
    # --resume on a fresh directory: what an elastic job (--max-restarts) does from its first launch
    ddp = torchrun("--max-restarts=1", "-m", "avme_ext", "train", "--out", str(two), "--resume", *TINY)
    assert "no checkpoint" in ddp.stderr
    assert "2 process" in ddp.stderr

    a, b = load_file(one / "last.safetensors"), load_file(two / "last.safetensors")
    model_keys = [k for k in a if k.startswith("model.")]
    assert model_keys
    assert sorted(a) == sorted(b)
    for key in model_keys:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=f"{key} differs")

    metrics = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["kind"] for r in metrics[0]] == [r["kind"] for r in metrics[1]]
    for r1, r2 in zip(*metrics, strict=True):
        assert r1["step"] == r2["step"]
        for key in ("loss", "nelbo", "train_loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5), (key, r1, r2)
        if "examples" in r1:
            assert r1["examples"] == r2["examples"] == 1000
    assert json.loads((two / "config.json").read_text())["world_size"] == 2


# --------------------------------------------------------------------------- elastic restart

#: 2 epochs of 20 global batches (1000 images, batch 50), a checkpoint every 5 steps: the kill lands mid-epoch
ELASTIC = [*TINY, "--epochs", "2", "--checkpoint-every", "5"]
ELASTIC_STEPS = 40


def _wait_for(what: str, predicate, timeout: float, proc: subprocess.Popen[bytes], log: Path, poll: float = 0.01):
    """Poll ``predicate()`` until it returns something truthy; fail clearly on timeout or when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()}")
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()}")


def _checkpoint_step(out: Path) -> int | None:
    """The trainer's step counter in ``out/last.json`` (None while there is no complete checkpoint)."""
    if not (out / "last.safetensors").is_file():
        return None
    try:
        return int(json.loads((out / "last.json").read_text())["trainer"]["state"]["step"])
    except (OSError, ValueError, KeyError, TypeError):  # absent, or replaced between the two reads
        return None


def _worker_pids(agent: int) -> dict[int, int]:
    """{RANK: pid} of the torchrun agent's worker processes (its children with RANK in their environment)."""
    workers = {}
    for children in Path(f"/proc/{agent}/task").glob("*/children"):
        try:
            pids = [int(pid) for pid in children.read_text().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                env = dict(
                    item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
                )
            except OSError:
                continue
            if "RANK" in env:
                workers[int(env["RANK"])] = pid
    return workers


@pytest.mark.slow
def test_elastic_restart_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL one worker of a ``--max-restarts=1`` job mid-training: torchrun restarts the worker group,
    ``--resume`` picks up the last mid-epoch checkpoint, and the final weights equal an uninterrupted run's."""
    out, reference, log = tmp_path / "elastic", tmp_path / "reference", tmp_path / "torchrun.log"
    # c10d rendezvous with torchrun's default shared TCP store, as in `avme train --help`: the store outlives
    # the first attempt, so this also checks that distributed.setup gives each attempt its own keys (without
    # that the restarted workers' gloo init reads the dead workers' addresses and fails).
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m",
        "avme_ext",
        "train",
        "--out",
        str(out),
        "--resume",
        *ELASTIC,
    ]
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            command, env=subprocess_env(LOGLEVEL="INFO"), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        killed_after = _wait_for(
            "a mid-run checkpoint", lambda: (s := _checkpoint_step(out)) and s < ELASTIC_STEPS and s, TIMEOUT, proc, log
        )
        workers = _wait_for(
            "two worker processes", lambda: (w := _worker_pids(proc.pid)) and len(w) == 2 and w, 10, proc, log
        )
        os.kill(workers[1], signal.SIGKILL)  # rank 1: rank 0 then fails in its next collective
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun did not finish within {TIMEOUT} s after the kill:\n{log.read_text()}")
    finally:
        if proc.poll() is None:  # a failed wait: leave no processes behind
            for pid in _worker_pids(proc.pid).values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(timeout=30)
    output = log.read_text()
    assert proc.returncode == 0, output
    # the agent saw the failure and restarted the group once; the first launch started a new run and the
    # second resumed the checkpoint written before the kill (or a later one), mid-run
    assert "will restart worker group" in output, output
    assert output.count("no checkpoint") == 1, output
    resumed = [int(s) for s in re.findall(r"resuming \S+last\.safetensors at step (\d+)", output)]
    assert len(resumed) == 1, (killed_after, output)
    assert killed_after <= resumed[0] < ELASTIC_STEPS, (killed_after, output)
    assert _checkpoint_step(out) == ELASTIC_STEPS

    torchrun("-m", "avme_ext", "train", "--out", str(reference), *ELASTIC)
    # same world size, single-threaded: the weights and Adam's state are bit for bit those of the uninterrupted
    # run, and the metrics (truncated to the checkpoint on resume, then rewritten) agree apart from wall times
    a, b = load_file(reference / "last.safetensors"), load_file(out / "last.safetensors")
    assert any(k.startswith("model.") for k in a)
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{key} differs")
    wall = ("time", "examples_per_s", "seconds")
    metrics = [
        [
            {k: v for k, v in json.loads(line).items() if k not in wall}
            for line in (d / "metrics.jsonl").read_text().splitlines()
        ]
        for d in (reference, out)
    ]
    assert metrics[0] == metrics[1]


SHARDED_EVAL = textwrap.dedent("""
    import json, sys, torch
    from avme_ext import distributed as D
    from avme_ext.checkpoint import load_model
    from avme_ext.data import load_split
    from avme_ext.evaluation import evaluate, gather_across_ranks
    info = D.detect()
    D.setup(info, torch.device("cpu"))
    model = load_model(sys.argv[1])
    split = load_split("binarized_mnist", "valid").subset(250, torch.Generator().manual_seed(1))
    part = evaluate(model, split, batch_size=40, seed=7, shard=(info.rank, info.world_size))
    merged = gather_across_ranks(part)
    if info.rank == 0:
        json.dump({"part": len(part), "indices": merged.indices.tolist(), "nelbo": merged.nelbo.tolist(),
                   "kl": merged.kl.tolist(), "summary": merged.summary()}, open(sys.argv[2], "w"))
    D.teardown()
""")


@pytest.mark.slow
def test_sharded_evaluation_equals_unsharded(tmp_path: Path) -> None:
    from avme_ext.checkpoint import save_checkpoint
    from avme_ext.model import AVME

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.safetensors", AVME(enc_hidden=16, dec_hidden=16, latent_dim=4, steps=3))
    script = tmp_path / "sharded_eval.py"
    script.write_text(SHARDED_EVAL)
    torchrun(str(script), str(tmp_path / "model.safetensors"), str(tmp_path / "out.json"))
    sharded = json.loads((tmp_path / "out.json").read_text())

    model = load_model(tmp_path / "model.safetensors")
    split = load_split("binarized_mnist", "valid").subset(250, torch.Generator().manual_seed(1))
    full = gather_across_ranks(evaluate(model, split, batch_size=40, seed=7))  # single process: merge of one
    assert sharded["part"] == 130  # rank 0 holds chunks 0, 2, 4, 6 of 7 (40 + 40 + 40 + 10 images)
    assert sharded["indices"] == list(range(250)) == full.indices.tolist()
    assert sharded["nelbo"] == full.nelbo.tolist()  # exact, not approximate
    assert sharded["kl"] == full.kl.tolist()
    assert sharded["summary"]["nelbo"] == full.summary()["nelbo"]


def test_detect_reads_the_torchrun_environment() -> None:
    assert D.detect({}) == D.DistInfo(0, 1, 0)
    assert not D.DistInfo().distributed
    assert D.DistInfo().is_main
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
    assert sorted(functools.reduce(operator.iadd, rows, [])) == list(range(10))
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        D.local_rows(10, 3, 3)


def test_single_process_helpers_are_no_ops() -> None:
    assert not D.is_initialized()
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_gather_objects(5) == [5]
    assert D.any_true(True, torch.device("cpu"))
    assert not D.any_true(False, torch.device("cpu"))
    t = torch.ones(2)
    assert D.all_reduce_sum(t) is t
    D.barrier()
    D.teardown()
    assert D.resolve_device("cpu", D.DistInfo()) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"not a device|only cpu and cuda"):
        D.resolve_device("tpu", D.DistInfo())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.resolve_device("cuda", D.DistInfo())
