"""``--help`` says what happens: defaults in one format, switches as on/off, shared options described
once, choices from the modules that define them; ``--threads`` is applied before any work."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from avme_ext import loop_types
from avme_ext.checkpoint import save_checkpoint
from avme_ext.cli import build_parser, main
from avme_ext.cli._common import DATA_ROOT_HELP
from avme_ext.model import AVME

MY_COMMANDS = ("sample", "eval", "plot", "export", "list-pretrained")


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_switches_read_as_what_happens(capsys):
    text = _help("eval", capsys)
    assert "--marginal, --no-marginal" in text
    assert "--progress, --no-progress" in text
    assert "(default: True)" not in text
    assert "(default: False)" not in text
    assert re.search(r"--progress, --no-progress show a progress bar on stderr \(default: on\)", text), text
    assert re.search(r"--marginal, --no-marginal conditional model .*\(default: on\)", text)


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_defaults_are_shown_once_in_one_format(command, capsys):
    text = _help(command, capsys)
    assert re.search(r"--seed SEED [^-]*\(default: 0\)", text), text
    if command == "eval":
        assert re.search(r"--samples S [^-]*\(default: 0\)", text)
    assert not re.search(r"\(default [^:]", text)  # never "(default 50)"
    for match in re.finditer(r"\(default: [^)]*\)", text):
        assert "default" not in text[match.end() : match.end() + 12], text[match.start() : match.end() + 40]


def test_every_option_with_a_default_shows_it():
    for command, parser in _subparsers().items():
        formatter = parser.formatter_class(prog=parser.prog)
        for action in parser._actions:
            switch = isinstance(action, argparse.BooleanOptionalAction)
            if action.default is None or action.default is argparse.SUPPRESS or (action.nargs == 0 and not switch):
                continue  # "not given" (the help states the default in words), or a plain flag
            help_string = formatter._get_help_string(action)
            assert help_string is not None, (command, action.dest)
            rendered = help_string % {"default": action.default}
            assert "(default: " in rendered, (command, action.dest, rendered)


def test_data_root_is_described_the_same_everywhere():
    parsers = _subparsers()
    texts = {}
    for command, parser in parsers.items():
        for action in parser._actions:
            if "--data-root" in action.option_strings:
                texts[command] = action.help
    assert {"sample", "eval"} <= set(texts)
    assert set(texts.values()) == {DATA_ROOT_HELP}, texts


def test_choices_come_from_the_defining_module():
    parsers = _subparsers()
    for command in ("sample", "eval"):
        actions = {a.dest: a for a in parsers[command]._actions}
        assert actions["impl"].choices is not None
        assert actions["precision"].choices is not None
        assert tuple(actions["impl"].choices) == loop_types.IMPLS
        assert tuple(actions["precision"].choices) == loop_types.PRECISIONS


def test_every_command_documents_the_exit_status(capsys):
    for command in MY_COMMANDS:
        text = _help(command, capsys)
        assert "exit status" in text
        assert "130" in text
        assert "avme <command>: error: <message>" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "exit status" in capsys.readouterr().out


@pytest.mark.parametrize("position", ["before", "after"])
def test_threads_is_applied_before_the_work(tmp_path, capsys, monkeypatch, position):
    path = save_checkpoint(
        tmp_path / "c.safetensors", AVME(enc_hidden=8, dec_hidden=8, latent_dim=2, steps=2, impl="ref")
    )
    seen = []
    original = AVME.sample

    def sample(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AVME, "sample", sample)
    threads = torch.get_num_threads()
    try:
        wanted = 1 if threads != 1 else 2
        command = ["sample", str(path), "--num", "2", "--out", str(tmp_path / "s.png")]
        argv = ["--threads", str(wanted), *command] if position == "before" else [*command, "--threads", str(wanted)]
        assert main(argv) == 0
        assert seen == [wanted]
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit):
        main(["--threads", "0", "plot", str(tmp_path)])
    assert "--threads" in capsys.readouterr().err


def test_threads_help_says_what_it_does(capsys):
    text = _help("eval", capsys)
    assert "--threads N" in text
    assert "torch.set_num_threads" in text
    assert "OMP_NUM_THREADS" in text
