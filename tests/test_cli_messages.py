"""What a user meets when a request cannot be done: one line, the right exit status, the paths and
options the user gave, before any work where it can be known: argument errors, requests that cannot
fit in memory, read-only outputs, unwritable --json targets, recovery advice, huge grids."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from avme_ext.checkpoint import atomic_write_bytes
from avme_ext.cli import _common, _memory, _png_split
from avme_ext.model import AVME
from cli_helpers import one_error_line, run_cli, tiny_run_dir
from helpers import model_args, run_in_repo, subprocess_env, subset_args

TINY_TRAIN = ["--epochs", "1", *subset_args(20, 0), *model_args(8, 2, 2), "--batch-size", "10", "--no-progress"]
TIMEOUT = 120
_run, _one_error_line = run_cli, one_error_line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run_dir(tmp_path_factory.mktemp("run") / "quick")


# --------------------------------------------------------------------------- argument errors: one line
@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["train", "--out", "r", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
        (["train", "--lr-schedule", "linear"], "argument --lr-schedule: invalid choice"),
        (["sample"], "the following arguments are required: CHECKPOINT"),
        (["eval", "RUN", "--samples", "-1"], "argument --samples"),
        (["eval", "RUN", "--bogus"], "unrecognized arguments: --bogus"),
        (["plot"], "the following arguments are required"),
        (["export", "RUN"], "the following arguments are required: --out"),
        (["list-pretrained", "--jsn"], "unrecognized arguments: --jsn"),
    ],
)
def test_argument_errors_are_one_line_naming_the_command(argv, wanted, capsys):
    code, out, err = _run(argv, capsys)
    line = _one_error_line(err, argv[0])
    assert code == 2
    assert wanted in line
    assert not out
    assert line.endswith(f"(see 'avme {argv[0]} --help')")


def test_top_level_argument_errors_are_one_line(capsys):
    for argv in ([], ["--threads", "0", "plot", "x"], ["no-such-command"]):
        code, _, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1, err
        assert lines[0].startswith("avme: error: "), err


# --------------------------------------------------------------------------- memory
def test_a_sample_request_that_cannot_fit_is_refused_before_the_work(run_dir, tmp_path):
    """The command of the issue, in a real process: one line, exit 2, before any sampling."""
    out = tmp_path / "big.png"
    done = run_in_repo(
        [sys.executable, "-m", "avme_ext", "sample", str(run_dir), "--num", "1000000000", "--out", str(out)],
        env=subprocess_env(),
        timeout=TIMEOUT,
    )
    line = _one_error_line(done.stderr, "sample")
    assert done.returncode == 2, done.stderr
    assert re.search(
        r"--num 1000000000: needs at least [\d.]+ TB of memory, [\d.]+ \w+ are available on cpu; ask "
        r"for fewer images$",
        line,
    ), line
    assert not out.exists()


def test_an_eval_request_that_cannot_fit_is_refused_before_the_work(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(_memory, "available_memory", lambda device: 10**9)
    code, out, err = _run(["eval", run_dir, "--samples", 1000000, "--num-images", 1, "--max-rows", 1000000000], capsys)
    line = _one_error_line(err, "eval")
    assert code == 2
    assert not out
    assert "--max-rows 1000000000 with --samples 1000000 (1000000 trajectories at once): needs at least" in line
    assert "1 GB are available on cpu; lower --max-rows" in line


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
            "tried to allocate 4800000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"),
        MemoryError(),
    ],
)
def test_an_allocation_that_fails_while_working_is_one_line_and_exit_1(run_dir, tmp_path, capsys, monkeypatch, failure):
    def allocate(*args, **kwargs):
        raise failure

    monkeypatch.setattr(AVME, "sample", allocate)
    code, _, err = _run(["sample", run_dir, "--num", 4, "--out", tmp_path / "s.png"], capsys)
    line = _one_error_line(err, "sample")
    assert code == 1
    assert "out of memory" in line
    assert "ask for fewer images" in line
    if "4800000000000" in str(failure):
        assert "tried to allocate 4.8 TB" in line
    assert not (tmp_path / "s.png").exists()


def test_memory_limits_are_read(monkeypatch):
    """An address-space limit (ulimit -v) bounds what is available, as free RAM and cgroups do."""
    import resource

    available = _memory.available_memory(torch.device("cpu"))
    assert available is not None
    assert available > 0
    monkeypatch.setattr(resource, "getrlimit", lambda which: (2 * 10**9, resource.RLIM_INFINITY))
    limited = _memory.available_memory(torch.device("cpu"))
    assert limited is not None
    assert limited < 2 * 10**9


# --------------------------------------------------------------------------- outputs that cannot be written
@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"), (errno.EPERM, "permission denied")],
)
def test_unwritable_output_names_the_reason(run_dir, tmp_path, capsys, monkeypatch, code, reason):
    """The errno of a failed write decides the wording, in every command (train included, exit 2)."""

    def refuse(directory, *, make_dir):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_common, "_probe_write", refuse)
    commands = {  # command: (argv, the option and path its message names)
        "train": (["train", "--out", tmp_path / "r", *TINY_TRAIN], f"--out {tmp_path / 'r'}"),
        "sample": (["sample", run_dir, "--out", tmp_path / "s.png"], f"--out {tmp_path / 's.png'}"),
        "eval": (["eval", run_dir, "--json", tmp_path / "e.json"], f"--json {tmp_path / 'e.json'}"),
        "export": (["export", run_dir, "--out", tmp_path / "w.safetensors"], f"--out {tmp_path / 'w.safetensors'}"),
        "plot": (
            ["plot", tmp_path / "metrics.jsonl", "--out-dir", tmp_path / "plots"],
            f"--out-dir {tmp_path / 'plots' / 'training_curve.png'}",
        ),
    }
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    for command, (argv, given) in commands.items():
        exit_code, _, err = _run(argv, capsys)
        line = _one_error_line(err, command)
        assert exit_code == 2
        assert line == f"avme {command}: error: {given}: cannot write in {tmp_path} ({reason})"
    assert not (tmp_path / "r").exists()


def _mount_read_only(directory: Path) -> bool:
    directory.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_read_only_file_system_is_named_as_such(run_dir, tmp_path, capsys):
    """A real read-only mount (needs root with CAP_SYS_ADMIN; the wording itself is tested above)."""
    ro = tmp_path / "ro"
    if not _mount_read_only(ro):
        pytest.skip("cannot mount a read-only tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        for argv in (["train", "--out", ro / "r", *TINY_TRAIN], ["sample", run_dir, "--out", ro / "s.png"]):
            code, _, err = _run(argv, capsys)
            line = _one_error_line(err, argv[0])
            assert code == 2, line
            assert line.endswith(f"cannot write in {ro} (read-only file system)"), line
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True, timeout=30, check=False)


def test_json_target_that_cannot_be_created_fails_before_the_work_naming_it(run_dir, capsys, monkeypatch):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    import avme_ext.evaluation

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(avme_ext.evaluation, "evaluate", never)
    monkeypatch.setattr(avme_ext.evaluation, "estimate_cost", never)
    code, out, err = _run(["eval", run_dir, "--num-images", 2, "--json", "/proc/e.json"], capsys)
    line = _one_error_line(err, "eval")
    assert code == 2
    assert not out
    assert line == "avme eval: error: --json /proc/e.json: cannot write in /proc (files cannot be created there)"


def test_atomic_write_errors_name_the_file_asked_for_not_the_temporary_one(tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    with pytest.raises(OSError, match=r"/proc/e\.json") as error:
        atomic_write_bytes("/proc/e.json", b"{}")
    assert error.value.filename == "/proc/e.json"
    assert ".tmp" not in str(error.value)


# --------------------------------------------------------------------------- recovery advice
def test_every_command_gives_the_same_recovery_command_for_a_corrupt_best(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes((run_dir / "last.safetensors").read_bytes())
    (run / "best.safetensors").write_bytes((run_dir / "best.safetensors").read_bytes()[:300])
    last = run / "last.safetensors"
    commands = (
        ["sample", run, "--num", "4", "--out", tmp_path / "s.png"],
        ["eval", run, "--num-images", "2"],
        ["export", run, "--out", tmp_path / "w.safetensors"],
    )
    advice = set()
    for argv in commands:
        code, _, err = _run(argv, capsys)
        line = _one_error_line(err, argv[0])
        expected = "avme " + " ".join(str(last) if a == run else str(a) for a in argv)
        assert code == 2, line
        assert line.endswith(f"; the run's last checkpoint {last} is intact, use it: {expected}"), line
        assert "load_model(" not in line
        advice.add(line.split(": error: ", 1)[1].split("; ")[1].split(": avme")[0])
        code, _, _ = _run(expected.split()[1:], capsys)  # the suggested command works
        assert code == 0
    assert len(advice) == 1, advice  # the same words in every command


# --------------------------------------------------------------------------- huge grids
def test_a_grid_larger_than_viewers_open_is_split_with_one_note(run_dir, tmp_path, capsys, monkeypatch):
    from PIL import Image

    limit = 300_000
    monkeypatch.setattr(_png_split, "MAX_PNG_PIXELS", limit)
    out = tmp_path / "samples.png"
    code, stdout, err = _run(["sample", run_dir, "--num", 1000, "--out", out, "--scale", 1], capsys)
    assert code == 0, err
    written = [Path(line) for line in stdout.split()]
    assert [p.name for p in written] == [f"samples-{i}.png" for i in range(1, len(written) + 1)]
    assert len(written) > 1
    notes = err.strip().splitlines()
    assert len(notes) == 1, err
    assert notes[0].startswith(f"avme sample: note: --out {out}: 1000 samples make a "), err
    assert f"written as {len(written)} files of at most" in notes[0]
    assert "samples-1.png ..." in notes[0]
    tiles = 0
    for path in written:
        width, height = Image.open(path).size
        assert width * height <= limit
        tiles += (width // 30) * (height // 30)  # 28 + 2 pixels of padding per tile
    assert tiles >= 1000
    assert not out.exists()


def test_the_issue_grid_splits_under_pillows_limit():
    """--num 100000 at the default --scale 2 (361 megapixels in one file): files under Pillow's warning."""
    from PIL import Image

    from avme_ext.images import grid_size

    def pixels(n: int) -> int:
        cols = int(-(-(n**0.5) // 1))
        height, width = grid_size(-(-n // cols), cols, scale=2)
        return height * width

    per_file = _png_split.items_per_png(100_000, pixels)
    assert pixels(100_000) > 300e6
    assert Image.MAX_IMAGE_PIXELS == _png_split.MAX_PNG_PIXELS
    assert pixels(per_file) <= _png_split.MAX_PNG_PIXELS
    assert -(-100_000 // per_file) == 5
    assert per_file == 20_000


@pytest.mark.slow
def test_split_files_open_without_a_decompression_warning(run_dir, tmp_path, capsys):
    """The real limit, end to end, on a small request it splits (--scale 8: more than 1,500 samples)."""
    from PIL import Image

    code, stdout, err = _run(["sample", run_dir, "--num", 2000, "--scale", 8, "--out", tmp_path / "s.png"], capsys)
    assert code == 0, err
    assert "note:" in err, err
    written = stdout.split()
    assert len(written) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for path in written:
            Image.open(path).load()
