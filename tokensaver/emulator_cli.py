"""``tokensaver emulator``: the offline Messages API in the foreground."""

from __future__ import annotations

import argparse


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
    from .emulator import DEFAULT_REPLY, serve

    serve(args.host, args.port, strict_roles=not args.loose_roles, default_reply=args.reply or DEFAULT_REPLY)
    return 0
