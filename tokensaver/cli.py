"""The ``tokensaver`` command: list runs, render reports, and dispatch to the other tools.

``runs`` and ``report`` live here. Every other subcommand lives in its own module, imported when
the parser is built; a module that fails to import only disables its own subcommand, which then
says why instead of running. Errors tokensaver raises itself print as one line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import TokensaverError

# subcommand -> (module, function adding its arguments, function running it, help)
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "emulator": ("tokensaver.emulator.cli", "add_arguments", "run", "run the offline Messages API emulator"),
    "replay": ("tokensaver.replay", "add_replay_arguments", "run_replay", "replay traces through tokensaver"),
    "demo": ("tokensaver.replay", "add_demo_arguments", "run_demo", "replay a bundled demo and show the report"),
    "plugins": ("tokensaver.cli", "add_plugins_arguments", "cmd_plugins", "list installed and enabled plugins"),
    "bench": ("tokensaver.bench", "add_arguments", "run", "measure savings and overhead over traces"),
    "proxy": ("tokensaver.proxy", "add_arguments", "run", "serve the Messages API through tokensaver over HTTP"),
    "claude": ("tokensaver.launch", "add_claude_arguments", "run_claude", "run Claude Code through a proxy"),
    "openclaw": ("tokensaver.launch", "add_openclaw_arguments", "run_openclaw", "run OpenClaw through a proxy"),
    "run": ("tokensaver.launch", "add_run_arguments", "run_command", "run a command through a proxy"),
}  # fmt: skip
# launchers: their own options come first, everything after goes to the agent untouched
LAUNCHERS = ("claude", "openclaw", "run")
FORMATS = ("table", "md", "html", "json")


def _add_runs(sub: Any) -> None:
    p = sub.add_parser(
        "runs", help="list recorded runs, newest first", description="List recorded runs, newest first."
    )
    p.add_argument("--runs-dir", help="directory of run ledgers (default: config runs_dir)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_runs)


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="render the report of a run", description="Render the report of a run.")
    p.add_argument("run", nargs="?", help="run name or path to its .jsonl (default: the newest run)")
    p.add_argument("--format", "-f", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("--runs-dir", help="directory of run ledgers (default: config runs_dir)")
    p.set_defaults(func=cmd_report)


def add_plugins_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver plugins``."""
    p.add_argument("--config", help="config file (TOML) to read on top of the usual sources")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the settings reference of the installed plugins (the README's is made by this)",
    )


def _unavailable(cmd: str, error: str) -> Callable[[argparse.Namespace], int]:
    def stub(args: argparse.Namespace) -> int:
        print(f"tokensaver {cmd} is unavailable: {error}", file=sys.stderr)
        return 2

    return stub


def _add_delegated(sub: Any, cmd: str, spec: tuple[str, str, str, str]) -> None:
    module_name, add_name, run_name, help_text = spec
    try:
        import importlib

        module = importlib.import_module(module_name)
        add_arguments = getattr(module, add_name)
        run = getattr(module, run_name)
    except Exception as exc:  # any failure only disables this subcommand
        p = sub.add_parser(cmd, help=f"{help_text} (unavailable)", description=help_text)
        # swallow the subcommand's own arguments so the stub can say why it cannot run
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=_unavailable(cmd, f"{type(exc).__name__}: {exc}"), unavailable=True)
        return
    p = sub.add_parser(cmd, help=help_text, description=help_text)
    add_arguments(p)
    p.set_defaults(func=run)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``tokensaver`` argument parser with every subcommand registered.

    With ``only`` (the subcommand about to run), only that subcommand's module is imported; the others
    are listed by name and help alone. ``tokensaver proxy`` then starts without importing the anthropic
    SDK, the bench or the emulator (about 1.7 s of imports on this machine).
    """
    parser = argparse.ArgumentParser(
        prog="tokensaver",
        description="Cut what Claude calls cost, and prove it in dollars.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_runs(sub)
    _add_report(sub)
    for cmd, spec in SUBCOMMANDS.items():
        if only is None or cmd == only:
            _add_delegated(sub, cmd, spec)
        else:
            sub.add_parser(cmd, help=spec[3], description=spec[3])
    return parser


def cmd_runs(args: argparse.Namespace) -> int:
    """``tokensaver runs``: the recorded runs, newest first."""
    from .report import fmt_pct, fmt_time, fmt_usd, text_table
    from .run import list_runs, resolve_runs_dir

    directory = resolve_runs_dir(args.runs_dir)
    runs = list_runs(directory)
    if getattr(args, "json", False):
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print(f"no runs in {directory}")
        return 0
    rows = []
    for r in runs:
        t = _run_totals(r["path"])
        pct = t.get("saved_pct")
        rows.append(
            [
                r["name"],
                fmt_time(r["created"]),
                f"{r['calls']:,}",
                fmt_usd(t.get("cost_usd")),
                fmt_usd(t.get("counterfactual_usd")),
                fmt_usd(r["saved_usd"]) + (f" ({fmt_pct(pct)})" if pct is not None else ""),
                fmt_usd(t.get("saved_vs_auto_usd")),
            ]
        )
    head = ["run", "created", "calls", "cost [billed]", "without [est.]", "saved", "vs auto caching [est.]"]
    print("\n".join(text_table(head, rows, right={2, 3, 4, 5, 6})))
    print("saved = what your own requests would have been billed without tokensaver (estimated) - cost")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """``tokensaver plugins``: what is installed, what is enabled, and each plugin's settings
    (value, type, default and doc from its declared schema)."""
    from .config import load_config
    from .plugins import get_plugin_manager, installed, origin, problem, schemas, settings_reference
    from .settings import shown_default

    pm = get_plugin_manager()
    if args.markdown:
        print(settings_reference(pm), end="")
        return 0
    cfg = load_config(args.config, pm=pm)
    rows: list[dict[str, Any]] = []
    declared = schemas(pm)
    for name in installed(pm):
        plugin = pm.get_plugin(name)
        module = getattr(plugin, "__name__", type(plugin).__name__)
        enabled = name in cfg.plugins
        schema = declared.get(name)
        settings = cfg.plugin_settings.get(name)
        if settings is None and schema is not None:
            settings = schema.defaults()
        rows.append(
            {
                "name": name,
                "enabled": enabled,
                "position": cfg.plugins.index(name) + 1 if enabled else None,
                "module": module,
                "origin": origin(pm, name),
                "settings": settings or {},
                "schema": schema.rows() if schema is not None else None,
                "error": problem(pm, plugin),
            }
        )
    if args.json:
        print(json.dumps({"sources": cfg.sources, "plugins": rows}, indent=2, default=str))
        return 0
    print(f"config sources: {', '.join(cfg.sources) or 'defaults only'}")
    print(f"pipeline order: {' -> '.join(cfg.plugins) or '(no plugins enabled)'}")
    for row in rows:
        mark = f"[{row['position']}]" if row["enabled"] else "[ ]"
        print(f"{mark:5} {row['name']:14} {row['module']}")
        if row["error"]:
            print(f"      cannot be enabled: {row['error']}")
        values = row["settings"]
        for item in row["schema"] or []:
            key = item["key"]
            value = shown_default(values.get(key, item["default"]))
            print(f"      {key} = {value}  [{item['type']}, default {shown_default(item['default'])}]")
            print(f"          {item['doc']}")
        for key, value in sorted(values.items()):
            if not row["schema"] or key not in {i["key"] for i in row["schema"]}:
                print(f"      {key} = {json.dumps(value, default=str)}")
    return 0


def _run_totals(path: str) -> dict[str, Any]:
    """A run's report totals (empty when its ledger cannot be read)."""
    from .report import run_summary
    from .run import load_run

    try:
        return run_summary(load_run(path).records())
    except (OSError, TokensaverError):
        return {}


def cmd_report(args: argparse.Namespace) -> int:
    """``tokensaver report``: a run's report as a table, Markdown, HTML or JSON."""
    from .run import latest_run, load_run

    run = load_run(args.run, args.runs_dir) if args.run else latest_run(args.runs_dir)
    report = run.report()
    text = {
        "table": report.to_table,
        "md": report.to_markdown,
        "html": report.to_html,
        "json": report.to_json,
    }[args.format]()
    write_output(text, args.output, f"{args.format} report of {run.name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tokensaver`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    agent_args: list[str] | None = None
    if argv and argv[0] in LAUNCHERS:
        from .launch import split_argv

        argv, agent_args = split_argv(argv)
    # a disabled subcommand accepts anything, so that it can say why it is disabled
    args, extra = parser.parse_known_args(argv)
    if agent_args is not None:
        args.agent_args = agent_args
    if extra and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except TokensaverError as exc:
        print(f"tokensaver: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``tokensaver report | head``): not an error worth a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("tokensaver: interrupted", file=sys.stderr)
        return 130


def write_output(text: str, output: str | None, what: str) -> None:
    """Print ``text``, or write it to ``output`` (0600, new folders 0700) and say so on stderr."""
    from ._files import write_private

    if not text.endswith("\n"):
        text += "\n"
    if not output:
        sys.stdout.write(text)
        return
    out = Path(output)
    try:
        # a report quotes prompts (cache busts, moved lines, errors): owner-only, like the ledger
        write_private(out, text)
    except OSError as exc:
        raise TokensaverError(f"cannot write {out}: {exc.strerror or exc}") from exc
    print(f"wrote {what} to {out}", file=sys.stderr)
