"""One run per directory: a second ``avme train`` on a directory in use is refused naming the process
that holds it, a lock left by a killed process blocks nothing, and a torchrun job holds it once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from avme_ext.cli import main
from avme_ext.training.errors import RunDirError
from avme_ext.training.run_lock import LOCK_NAME, RunLock
from cli_helpers import one_error_line
from helpers import REPO, free_port, model_args, run_in_repo, subprocess_env, subset_args

TIMEOUT = 180
TINY = [*subset_args(40, 0), *model_args(8, 2, 2), "--batch-size", "10", "--no-progress"]


def test_a_second_lock_on_a_directory_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_NAME).is_file()
        with pytest.raises(
            RunDirError,
            match=rf"--out {tmp_path / 'run'}: another avme train is using this run "
            rf"directory \(pid {os.getpid()}, started .*\); one run per directory",
        ):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists()  # created by the lock, left empty: removed again
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept"):
        (tmp_path / "kept" / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["metrics.jsonl"]  # no lock file left


def test_a_launch_that_cannot_start_leaves_no_directory_and_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--resume", "--overwrite", "--epochs", "1", *TINY]) == 2
    assert "contradict" in one_error_line(capsys.readouterr().err, "train")
    assert not out.exists()


def _start_training(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avme_ext",
            "train",
            "--out",
            str(out),
            "--resume",
            "--epochs",
            "100000",
            "--checkpoint-every",
            "1",
            *TINY,
            *extra,
        ],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"training did not write {path}: {process.communicate()[1]}")
        time.sleep(0.1)


def test_second_run_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start_training(out)
    try:
        _wait_for(out / "last.safetensors", first)
        assert main(["train", "--out", str(out), "--resume", "--epochs", "100000", *TINY]) == 2
        line = one_error_line(capsys.readouterr().err, "train")
        assert f"--out {out}: another avme train is using this run directory (pid {first.pid}, started " in line
        assert "python -m avme_ext train --out" in line  # the holder's command
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=TIMEOUT)
    assert (out / LOCK_NAME).exists()  # a SIGKILLed run leaves its lock file behind ...
    # ... which blocks nothing: the next launch resumes the run (and finishes its first epoch, if need be)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "1", *TINY]) == 0
    assert "another avme train" not in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


DDP_WRAPPER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from avme_ext.training import run_lock

    record = Path(sys.argv.pop(1))
    acquire = run_lock.RunLock.acquire

    def counted(self):
        with record.open("a") as handle:
            handle.write(os.environ["RANK"] + "\\n")
        return acquire(self)

    run_lock.RunLock.acquire = counted
    from avme_ext.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_torchrun_job_holds_the_lock_once_on_rank_0(tmp_path):
    script, record, out = tmp_path / "wrapper.py", tmp_path / "acquired.txt", tmp_path / "ddp"
    script.write_text(DDP_WRAPPER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        str(record),
        "train",
        "--out",
        str(out),
        "--epochs",
        "1",
        *TINY,
    ]
    done = run_in_repo(command, env=subprocess_env(), timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert record.read_text().split() == ["0"]
    assert (out / "last.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()
