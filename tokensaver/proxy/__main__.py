"""``python -m tokensaver.proxy [ARGS]``: the same as ``tokensaver proxy [ARGS]``."""

from __future__ import annotations

import argparse
import sys

from ..errors import TokensaverError
from .server import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    """Parse ``tokensaver proxy`` arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m tokensaver.proxy", description="the tokensaver proxy")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except TokensaverError as exc:
        print(f"tokensaver: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
