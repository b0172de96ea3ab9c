"""``python -m avme_ext``: the same as the ``avme`` command."""

from .entry import main

raise SystemExit(main())
