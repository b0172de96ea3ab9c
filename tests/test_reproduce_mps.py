"""python/reproduce_mps.py: the private MPS daemon of the training stage, with a stand-in control program
(no GPU here): started with its own pipe and log folders, checked by a probe client, always quit,
and never in the way of training when it cannot be used (``auto``)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "python"))

from reproduce_mps import MpsError, mps_daemon

OK_PROBE = (sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ.get('CUDA_MPS_PIPE_DIRECTORY') else 5)")
FAILING_PROBE = (sys.executable, "-c", "import sys; print('no device'); sys.exit(3)")


def fake_control(tmp_path: Path, start_code: int = 0) -> tuple[Path, Path]:
    """A stand-in nvidia-cuda-mps-control that records its calls (arguments, stdin, pipe folder)."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "nvidia-cuda-mps-control"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "-d" ]; then echo "start $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY" >> {calls}; exit {start_code}; fi
read line; echo "stdin $line" >> {calls}
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, calls


def test_a_working_daemon_is_started_probed_and_quit(tmp_path: Path) -> None:
    control, calls = fake_control(tmp_path)
    messages: list[str] = []
    with mps_daemon("auto", "cuda", messages.append, control=str(control), probe=OK_PROBE) as session:
        assert session.active
        assert session.reason == "MPS daemon of this run"
        pipe, logs = session.env["CUDA_MPS_PIPE_DIRECTORY"], session.env["CUDA_MPS_LOG_DIRECTORY"]
        assert os.path.isdir(pipe)
        assert os.path.isdir(logs)
        assert "avme-mps-" in pipe
        assert calls.read_text().splitlines() == [f"start {pipe} {logs}"]  # its own folders, not the system's
    assert calls.read_text().splitlines()[-1] == "stdin quit"
    assert not os.path.exists(pipe)  # the temporary folders are removed
    assert any("MPS daemon started" in m for m in messages)


@pytest.mark.parametrize(
    ("start_code", "probe", "why"), [(1, OK_PROBE, "-d exited with 1"), (0, FAILING_PROBE, "probe client failed")]
)
def test_auto_trains_without_mps_when_it_cannot_be_used(tmp_path: Path, start_code, probe, why) -> None:
    control, calls = fake_control(tmp_path, start_code)
    messages: list[str] = []
    with mps_daemon("auto", "cuda:0", messages.append, control=str(control), probe=probe) as session:
        assert not session.active
        assert session.env == {}
        assert why in session.reason
    assert any("training without MPS" in m and why in m for m in messages)
    quits = [line for line in calls.read_text().splitlines() if line.startswith("stdin")]
    assert quits == ([] if start_code else ["stdin quit"])  # a started daemon is always quit


def test_on_fails_and_off_or_cpu_never_start(tmp_path: Path) -> None:
    with (
        pytest.raises(MpsError, match="--mps on: nvidia-cuda-mps-control-missing not found"),
        mps_daemon("on", "cuda", print, control="nvidia-cuda-mps-control-missing"),
    ):
        pass
    control, calls = fake_control(tmp_path)
    with (
        pytest.raises(MpsError, match="probe client failed"),
        mps_daemon("on", "cuda", print, control=str(control), probe=FAILING_PROBE),
    ):
        pass
    assert calls.read_text().splitlines()[-1] == "stdin quit"
    calls.unlink()
    for mode, device in (("off", "cuda"), ("auto", "cpu"), ("on", "cpu")):
        with mps_daemon(mode, device, print, control=str(control), probe=OK_PROBE) as session:
            assert not session.active
    assert not calls.exists()
    with pytest.raises(ValueError, match="mps mode must be one of"), mps_daemon("yes", "cuda", print):
        pass


def test_training_processes_get_the_daemon_variables(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    from reproduce_plan import Layout, make_plan
    from reproduce_train import start_child

    seen = {}

    class FakePopen:
        def __init__(self, command, cwd, env, stdout, stderr, start_new_session, pass_fds):
            seen.update(env)
            seen["command"] = command

    monkeypatch.setattr(subprocess, "Popen", FakePopen)  # the module reproduce_train starts its children with
    child = start_child(
        Layout(tmp_path),
        make_plan(smoke=True, impl="ref"),
        "avme-canvas",
        device="cuda",
        threads=4,
        lock_fd=None,
        client_env={"CUDA_MPS_PIPE_DIRECTORY": "/tmp/x"},
    )
    assert seen["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/x"
    assert seen["OMP_NUM_THREADS"] == "4"
    assert child.name == "avme-canvas"
    assert "--device" in seen["command"]
    assert "train" in seen["command"]
