"""``python -m avme_ext``: the same as the ``avme`` command."""

from .cli import main

raise SystemExit(main())
