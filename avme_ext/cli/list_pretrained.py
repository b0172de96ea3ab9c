"""``avme list-pretrained``: the pretrained models installed with the package."""

from __future__ import annotations

import argparse
import json

from ._common import EXIT_STATUS_HELP, RawDefaultsFormatter

DESCRIPTION = """\
List the pretrained models shipped with this version of the package: name, description and
the results recorded when each was made. Pass a name wherever a command takes a run
directory: 'avme sample NAME', 'avme eval NAME'; in Python,
avme_ext.pretrained.load_pretrained(NAME). Each file is checked against its SHA-256 before
it is loaded."""

EPILOG = (
    """\
examples:
  avme list-pretrained
  avme list-pretrained --json

"""
    + EXIT_STATUS_HELP
)

NONE_INSTALLED = "no pretrained models are installed in this version"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "list-pretrained",
        help="list the pretrained models shipped with the package (usable by name in sample and eval)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RawDefaultsFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the registry entries as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from avme_ext.pretrained import list_pretrained

    models = list_pretrained()
    if args.json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return 0
    if not models:
        print(NONE_INSTALLED)
        return 0
    width = max(len(m.name) for m in models)
    for model in models:
        print(f"{model.name:<{width}}  {model.description}")
        summary = model.results.get("summary", model.results)
        numbers = [
            f"{key} {summary[key]:.2f}"
            for key in ("nelbo", "iwae_nll", "nll_marginal")
            if isinstance(summary.get(key), (int, float))
        ]
        if numbers:
            print(f"{'':<{width}}  {', '.join(numbers)} (nats)")
    return 0
