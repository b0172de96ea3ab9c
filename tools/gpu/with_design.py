#!/usr/bin/env python
"""Run a Python script with the fused ops forced to one design: ``with avme_ext.ops.design(DESIGN)``.

Usage::

    python3 tools/gpu/with_design.py persistent tests/sanitizer_case.py
    compute-sanitizer --tool memcheck python3 tools/gpu/with_design.py stagewise tests/sanitizer_case.py

``auto`` runs the script as it is where the extension has no ``avme_ext.ops.design``; any
other design there exits with code 3 and says why.
"""

from __future__ import annotations

import contextlib
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    design, script, *rest = argv
    sys.path.insert(0, str(ROOT))
    from avme_ext import ops

    override = getattr(ops, "design", None)
    if override is None and design != "auto":
        print(
            f"with_design: avme_ext.ops.design is not present in this build: cannot force {design!r}", file=sys.stderr
        )
        return 3
    context = override(design) if override is not None else contextlib.nullcontext()
    sys.argv = [script, *rest]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python3 SCRIPT` would
    with context:
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code
            return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
