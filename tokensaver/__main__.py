"""``python -m tokensaver``: the ``tokensaver`` command."""

from .cli import main

raise SystemExit(main())
