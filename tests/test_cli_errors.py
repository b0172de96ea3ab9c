"""The conventions every ``avme`` subcommand shares: one-line errors, one exit-status rule, signals,
nothing written by a command that fails, messages that name what the user gave."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from avme_ext.cli import main
from cli_helpers import one_error_line, run_cli, tiny_run_dir
from helpers import REPO, run_in_repo, subprocess_env

TIMEOUT = 120
_run, _one_error_line = run_cli, one_error_line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with best and last checkpoints (and their .json twins) and a config.json."""
    root = tiny_run_dir(tmp_path_factory.mktemp("run") / "quick")
    (root / "config.json").write_text("{}\n")
    return root


# --------------------------------------------------------------------------- exit status and wording
def test_missing_checkpoint_same_convention_in_every_command(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    for command in (
        ["sample", missing, "--out", tmp_path / "s.png"],
        ["eval", missing],
        ["export", missing, "--out", tmp_path / "w.safetensors"],
    ):
        code, _, err = _run(command, capsys)
        line = _one_error_line(err, command[0])
        assert code == 2
        assert str(missing) in line
        assert "does not exist" in line
    assert not any(tmp_path.iterdir())


def test_data_errors_use_command_line_wording(run_dir, tmp_path, capsys, monkeypatch):
    """A missing downloadable data set says '--download', not the Python 'download=True', on one line."""
    monkeypatch.setenv("AVME_DATA_ROOT", str(tmp_path / "empty"))
    out = tmp_path / "r2.png"
    code, _, err = _run(["sample", run_dir, "--reconstruct", 4, "--dataset", "mnist_static", "--out", out], capsys)
    line = _one_error_line(err, "sample")
    assert code == 2
    assert "--download" in line
    assert "download=True" not in line
    assert not out.exists()
    assert not (tmp_path / "r2_recon.png").exists()
    code, _, err = _run(["eval", run_dir, "--dataset", "mnist_static", "--json", tmp_path / "e.json"], capsys)
    line = _one_error_line(err, "eval")
    assert code == 2
    assert "--download" in line
    assert "download=True" not in line
    assert not (tmp_path / "e.json").exists()


def test_failing_sample_leaves_existing_outputs_untouched(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AVME_DATA_ROOT", str(tmp_path / "empty"))
    out = tmp_path / "samples.png"
    out.write_bytes(b"the user's previous file")
    code, _, _ = _run(["sample", run_dir, "--reconstruct", 2, "--dataset", "mnist_static", "--out", out], capsys)
    assert code == 2
    assert out.read_bytes() == b"the user's previous file"


@pytest.mark.parametrize(
    ("name", "hint"),
    [("best.json", "best.safetensors"), ("last.json", "last.safetensors"), ("config.json", "run directory")],
)
def test_json_twin_or_other_file_is_refused_naming_it(run_dir, tmp_path, capsys, name, hint):
    given = run_dir / name
    out = tmp_path / "samples.png"
    code, _, err = _run(["sample", given, "--out", out], capsys)
    line = _one_error_line(err, "sample")
    assert code == 2
    assert str(given) in line
    assert hint in line
    assert "not a checkpoint" in line
    assert "config.safetensors" not in line  # never a path the user did not give
    assert not out.exists()


def test_corrupt_best_points_to_intact_last_with_the_exact_command(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.safetensors", "last.safetensors"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    (run / "best.safetensors").write_bytes((run_dir / "best.safetensors").read_bytes()[:300])
    out = tmp_path / "s.png"
    code, _, err = _run(["sample", run, "--num", 4, "--out", out], capsys)
    line = _one_error_line(err, "sample")
    assert code == 2
    assert "best.safetensors" in line
    command = f"avme sample {run / 'last.safetensors'} --num 4 --out {out}"
    assert line.endswith(command), line
    assert main(command.split()[1:]) == 0
    assert out.is_file()


def test_corrupt_best_without_intact_last_gives_no_false_hint(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"garbage" * 10)
    (run / "last.safetensors").write_bytes(b"garbage too" * 10)
    code, _, err = _run(["eval", run], capsys)
    line = _one_error_line(err, "eval")
    assert code == 2
    assert "best.safetensors" in line
    assert "is intact" not in line


def test_bad_option_values_exit_2_with_the_subcommand_prefix(run_dir, tmp_path, capsys):
    for argv in (["eval", run_dir, "--samples", "-1"], ["sample", run_dir, "--num", "zero"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in argv])
        assert exit_info.value.code == 2
        assert f"avme {argv[0]}: error:" in capsys.readouterr().err
    code, _, err = _run(["sample", run_dir, "--out", tmp_path / "x.jpg"], capsys)
    assert code == 2
    assert "--out" in _one_error_line(err, "sample")
    code, _, err = _run(["eval", run_dir, "--json", tmp_path / "missing-dir-is-fine" / "x.txt"], capsys)
    assert code == 2
    assert ".json" in _one_error_line(err, "eval")


def test_working_failure_exits_1(run_dir, tmp_path, capsys, monkeypatch):
    """An OS error while writing (here: a full disk) is a failure while working: exit 1, one line."""
    from avme_ext import checkpoint

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full_disk)
    code, _, err = _run(["sample", run_dir, "--num", 2, "--out", tmp_path / "s.png"], capsys)
    assert code == 1
    assert "No space left" in _one_error_line(err, "sample")


def test_rank_prefix_under_torchrun(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    from avme_ext.cli._common import fail

    assert fail("eval", "bad thing") == 2
    assert capsys.readouterr().err == "[rank 1] avme eval: error: bad thing\n"


# --------------------------------------------------------------------------- signals
BLOCKING = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    marker = Path(sys.argv.pop(1))
    target = sys.argv.pop(1)

    def block(*args, **kwargs):
        marker.write_text("working")
        time.sleep(60)
        raise AssertionError("the signal did not stop the command")

    import avme_ext.data.sources, avme_ext.model
    if target == "sample":
        avme_ext.model.AVME.sample = block
    elif target == "train":
        avme_ext.data.sources.DataSource.split = block  # the run is starting: it loads its data
    from avme_ext.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


def _start_blocked(tmp_path: Path, target: str, *argv: str) -> tuple[subprocess.Popen[str], Path]:
    marker = tmp_path / "marker"
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCKING, str(marker), target, *argv],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the command did not start its work: {process.communicate()[1]}")
        time.sleep(0.05)
    return process, marker


def _finish(process: subprocess.Popen[str]) -> str:
    """The stderr of ``process`` once it ends (killed, and the test failed, if it does not end in time)."""
    try:
        return process.communicate(timeout=TIMEOUT)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("the command did not stop after the signal") from None


def _first_stderr_line(process: subprocess.Popen[str]) -> str:
    """The first line the process writes to stderr (the process is killed if none comes in time)."""
    lines: queue.Queue[str] = queue.Queue()
    stderr = process.stderr
    assert stderr is not None, "started with stderr=PIPE"
    threading.Thread(target=lambda: lines.put(stderr.readline()), daemon=True).start()
    try:
        return lines.get(timeout=TIMEOUT)
    except queue.Empty:
        process.kill()
        process.communicate()
        raise AssertionError("nothing printed to stderr before the work started") from None


def _assert_one_line_exit(process: subprocess.Popen[str], signum: int, command: str) -> None:
    process.send_signal(signum)
    err = _finish(process)
    code = 128 + signum
    assert process.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"avme {command}: ")
    assert signal.Signals(signum).name in lines[0]


def test_ctrl_c_during_sample_is_one_line_and_130(run_dir, tmp_path):
    out = tmp_path / "s.png"
    process, _ = _start_blocked(tmp_path, "sample", "sample", str(run_dir), "--out", str(out))
    _assert_one_line_exit(process, signal.SIGINT, "sample")
    assert not out.exists()


def test_ctrl_c_while_train_starts_is_one_line_and_130(tmp_path):
    out = tmp_path / "run"
    process, _ = _start_blocked(tmp_path, "train", "train", "--out", str(out), "--epochs", "1", "--no-progress")
    _assert_one_line_exit(process, signal.SIGINT, "train")


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_during_eval_work_is_one_line_and_nothing_written(run_dir, tmp_path, signum):
    """A real, long evaluation (S = 10^6 trajectories per image): the signal lands inside the work."""
    json_out = tmp_path / "eval.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avme_ext",
            "eval",
            str(run_dir),
            "--samples",
            "1000000",
            "--num-images",
            "20",
            "--no-progress",
            "--json",
            str(json_out),
        ],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = _first_stderr_line(process)  # the cost estimate, printed once before the work starts
    if not first.startswith("avme eval: IWAE S=1000000 on 20 images: about "):
        process.kill()
        process.communicate()
        raise AssertionError(f"expected the cost estimate first, got {first!r}")
    time.sleep(0.5)
    process.send_signal(signum)
    err = _finish(process)
    assert process.returncode == 128 + signum, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("avme eval: ")
    assert signal.Signals(signum).name in lines[0]
    assert not json_out.exists()
    assert not list(tmp_path.glob(".eval.json.*"))


IMPORT_BLOCKING = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    marker = Path(sys.argv.pop(1))

    class SlowImport:  # the command line's import takes its time, as torch's start-up does
        def find_spec(self, name, path=None, target=None):
            if name == "avme_ext.cli":
                marker.write_text("importing")
                time.sleep(60)
            return None

    sys.meta_path.insert(0, SlowImport())
    from avme_ext.entry import main
    raise SystemExit(main())
""")


def test_ctrl_c_while_the_command_imports_is_one_line_and_130(tmp_path):
    """The console entry point (avme_ext.entry) catches Ctrl-C during the imports themselves:
    ``import avme_ext`` does not import torch, so nothing runs before the handler is in place."""
    marker = tmp_path / "marker"
    process = subprocess.Popen(
        [sys.executable, "-c", IMPORT_BLOCKING, str(marker), "train", "--help"],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the command did not start in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    err = _finish(process)
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip() == "avme: interrupted (SIGINT) while starting", err


def test_importing_the_package_does_not_import_torch():
    code = "import sys, avme_ext; assert 'torch' not in sys.modules; print(avme_ext.AVMECore.__name__)"
    done = run_in_repo([sys.executable, "-c", code], env=subprocess_env(), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "AVMECore", done.stderr
