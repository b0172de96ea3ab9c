"""The ``avme`` command's entry point: imports the command line, answering Ctrl-C during the
import (torch's start-up takes a second or two) with one line and exit status 130."""

from __future__ import annotations

import sys


def main() -> int:
    """Run the ``avme`` command line (:func:`avme_ext.cli.main`); returns the exit status."""
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("avme: interrupted (SIGINT) while starting", file=sys.stderr)
        return 130
    return cli_main()
