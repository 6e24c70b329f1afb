"""``tokensaver emulator``: the offline Messages API in the foreground."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .core import DEFAULT_REPLY, Emulator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver emulator``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=8787, help="port (default 8787; 0 picks a free one)")
    parser.add_argument("--reply", default=None, help="the text every call is answered with")
    parser.add_argument(
        "--loose-roles", action="store_true", help="accept consecutive same-role messages, as the API does"
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    serve(args.host, args.port, strict_roles=not args.loose_roles, default_reply=args.reply or DEFAULT_REPLY)
    return 0


def serve(host: str = "127.0.0.1", port: int = 8787, **kwargs: Any) -> None:
    """Run an emulator in the foreground until interrupted (``tokensaver emulator --port N``)."""
    emu = Emulator(host=host, port=port, **kwargs).start()
    print(f"tokensaver emulator listening on {emu.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
