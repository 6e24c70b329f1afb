"""Replay recorded conversations through a wrapped client: ``tokensaver replay`` and ``tokensaver demo``.

Each call of a conversation is sent, in order, through ``tokensaver.wrap()`` to the offline
emulator (or, with ``--live``, to the real API with ``ANTHROPIC_API_KEY``). The emulator answers
each call with what the real model answered there, and its cache clock follows the recorded call
times where the trace has them, so the billed usage is what the API would have billed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic

from .cli import write_output
from .emulator import Emulator
from .errors import TokensaverError
from .middleware import wrap
from .pricing import PriceTable, normalize_usage
from .report import summarize
from .traces import Conversation, fixtures_dir, load_conversations

DEFAULT_GAP = 15.0  # seconds between calls when a trace has no timestamps


@dataclass
class ReplayResult:
    """What one replay produced: the run (pipeline records), billed totals, rejections."""

    label: str
    run: Any = None
    records: list[dict[str, Any]] = field(default_factory=list)
    billed: list[dict[str, Any]] = field(default_factory=list)  # per call: conversation, usage, cost
    rejected: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)  # bodies that reached the wire (when kept)

    def totals(self) -> dict[str, float]:
        """Billed tokens and dollars summed over every call."""
        keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
        out: dict[str, float] = {k: 0 for k in keys}
        out["cost_usd"] = out["input_cost_usd"] = 0.0
        for b in self.billed:
            for k in keys:
                out[k] += b["usage"].get(k, 0)
            out["cost_usd"] += b["cost_usd"]
            out["input_cost_usd"] += b["input_cost_usd"]
        out["calls"] = len(self.billed)
        out["rejected"] = len(self.rejected)
        return out


def strip_thinking(body: dict[str, Any]) -> dict[str, Any]:
    """Drop thinking blocks (recorded signatures are redacted, the live API would reject them)."""
    msgs = []
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, list):
            content = [
                b
                for b in content
                if not (isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking"))
            ]
            if not content:
                content = [{"type": "text", "text": "(thinking)"}]
        msgs.append({**m, "content": content})
    return {**body, "messages": msgs}


def auto_cache(body: dict[str, Any]) -> dict[str, Any]:
    """The API's automatic caching alone: a top-level ``cache_control`` (the baseline to beat)."""
    return {**body, "cache_control": {"type": "ephemeral"}}


def replay(
    conversations: list[Conversation],
    *,
    config: dict[str, Any] | str | None = None,
    run: Any = None,
    wrap_client: bool = True,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    live: bool = False,
    stream: bool = False,
    label: str = "tokensaver",
    emulator: Any = None,
    keep_bodies: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Send every call of ``conversations`` in order; return billed usage and the run.

    :param wrap_client: False sends bodies without tokensaver (baselines); ``prepare`` then
        rewrites each body first (e.g. :func:`auto_cache`).
    :param emulator: a running :class:`tokensaver.emulator.Emulator` to reuse (its cache is reset).
    """
    result = ReplayResult(label=label)
    prices = PriceTable()
    owned = None
    clock_now = [0.0]
    if live:
        key = os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise TokensaverError("--live needs ANTHROPIC_API_KEY in the environment")
        base = anthropic.Anthropic(api_key=key)
    else:
        if emulator is None:
            owned = emulator = Emulator(virtual_clock=True)
            emulator.start()
        else:
            emulator.reset()
        base = anthropic.Anthropic(base_url=emulator.url, api_key="tokensaver-replay", max_retries=0)
    client: Any = base
    if wrap_client:
        client = wrap(base, config=config, run=run, clock=lambda: clock_now[0])
        result.run = client.tokensaver.run
    total = sum(len(c.calls) for c in conversations)
    accepted = set(inspect.signature(client.messages.create).parameters)
    done = 0
    try:
        t_virtual = 1_700_000_000.0
        for conv in conversations:
            for call in conv.calls:
                t_virtual = call.t if call.t is not None else t_virtual + DEFAULT_GAP
                clock_now[0] = t_virtual
                body = strip_thinking(call.body) if live else dict(call.body)
                if prepare is not None:
                    body = prepare(body)
                if not live:
                    emulator.clock.set(t_virtual)
                    emulator.reply(call.reply or [{"type": "text", "text": "OK."}])
                params = _create_params(accepted, body)
                try:
                    if stream:
                        with client.messages.stream(**params) as s:
                            message = s.get_final_message()
                    else:
                        # an explicit timeout: the SDK refuses large max_tokens without streaming otherwise
                        message = client.messages.create(**params, timeout=600)
                except anthropic.BadRequestError as exc:
                    result.rejected.append({"conversation": conv.id, "call": done, "error": str(exc)})
                    done += 1
                    continue
                usage = normalize_usage(message.usage.model_dump() if message.usage else {})
                # billed at the model that answered (a routing plugin may have sent it to another)
                model = prices.get(str(getattr(message, "model", "") or body.get("model", "")))
                result.billed.append(
                    {
                        "conversation": conv.id,
                        "source": conv.source,
                        "t": t_virtual,
                        "usage": usage,
                        "cost_usd": model.cost(usage),
                        "input_cost_usd": model.input_cost(usage),
                        "model": model.name,
                    }
                )
                if keep_bodies and not live and emulator.requests:
                    result.sent.append(emulator.requests[-1]["body"])
                done += 1
                if progress:
                    progress(done, total)
    finally:
        if owned is not None:
            owned.stop()
    if wrap_client:
        result.records = list(client.tokensaver.records)
    return result


def _create_params(accepted: set[str], body: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``messages.create``; body fields the SDK has no parameter for go in extra_body."""
    params = {k: v for k, v in body.items() if k in accepted and k != "stream"}
    extra = {k: v for k, v in body.items() if k not in accepted and k != "stream"}
    if extra:
        params["extra_body"] = extra
    return params


# -- CLI -------------------------------------------------------------------------------------


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver replay``."""
    parser.add_argument("traces", nargs="+", help="conversation files (.json) or JSONL of bodies, or folders")
    parser.add_argument("--config", help="tokensaver config file (TOML)")
    parser.add_argument("--live", action="store_true", help="send to the real API (needs ANTHROPIC_API_KEY)")
    parser.add_argument("--stream", action="store_true", help="send every call as a stream")
    parser.add_argument("--run", help="run name (default: a new one)")
    parser.add_argument("--format", choices=["table", "md", "html", "json"], default="table")
    parser.add_argument("-o", "--output", help="write the report to this file")


def run_replay(args: argparse.Namespace) -> int:
    """``tokensaver replay``."""
    conversations = load_conversations(args.traces)
    result = replay(conversations, config=args.config, run=args.run, live=args.live, stream=args.stream)
    _emit(result, args.format, args.output)
    return 0 if not result.rejected else 1


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver demo``."""
    parser.add_argument("--format", choices=["table", "md", "html", "json"], default="table")
    parser.add_argument("-o", "--output", help="write the report to this file")
    parser.add_argument("--config", help="tokensaver config file (TOML); default: the default plugins")


def demo(conversations: list[Conversation], config: dict[str, Any] | str | None = None) -> dict[str, Any]:
    """Replay ``conversations`` with automatic caching alone and with tokensaver, on one emulator.

    The headline is the run report's saving against automatic caching alone (the reference line,
    estimated beside the API); ``auto_billed_usd`` is what the automatic-caching replay was really
    billed, so the two can be compared.
    """
    with Emulator(virtual_clock=True) as emu:
        base = replay(
            conversations, wrap_client=False, prepare=auto_cache, label="automatic caching", emulator=emu
        )
        ours = replay(conversations, config=config, emulator=emu, label="tokensaver")
    totals = summarize(ours.records)["totals"]
    saved, pct = totals["saved_vs_auto_usd"], totals["saved_vs_auto_pct"]
    # what tokensaver can change is the input side (the answers are the same either way); the
    # report's figure is of the whole bill, output included, so both are given
    auto_input = base.totals()["input_cost_usd"]
    input_pct = 100 * saved / auto_input if auto_input else None
    headline = (
        f"tokensaver saved ${saved:,.4f} against the API's automatic caching alone on these calls"
        + (f": {input_pct:.1f}% of the input side" if input_pct is not None else "")
        + (f" ({pct:.1f}% of the whole bill, output included)" if pct is not None else "")
    )
    return {
        "base": base,
        "ours": ours,
        "headline": headline,
        "headline_saved_usd": saved,
        "headline_saved_pct": pct,
        "headline_saved_input_pct": input_pct,
        "auto_billed_usd": base.totals()["cost_usd"],
        "billed_usd": ours.totals()["cost_usd"],
    }


def run_demo(args: argparse.Namespace) -> int:
    """``tokensaver demo``: the bundled conversations, with and without tokensaver, offline."""
    folder = fixtures_dir()
    if folder is None:
        raise TokensaverError("no fixtures/ folder found (run the demo from a source checkout)")
    conversations = load_conversations([folder])
    n_calls = sum(len(c.calls) for c in conversations)
    print(
        f"tokensaver demo: {len(conversations)} recorded agent conversations, {n_calls} calls, replayed offline"
    )
    print("through the Messages API emulator (billing and prompt caching as the API does).\n")
    out = demo(conversations, config=args.config)
    base, ours = out["base"], out["ours"]
    cfg_plugins = (ours.run.meta.get("config") or {}).get("plugins", []) if ours.run is not None else []
    if not cfg_plugins:
        print("No transform plugins are enabled (or installed): nothing is transformed yet.\n")
    print(out["headline"] + ".\n")
    _emit(ours, args.format, args.output)
    b, o = base.totals(), ours.totals()
    print()
    print(out["headline"] + ".")
    print("Billed, same conversations (the check of that figure):")
    print(f"  API automatic caching alone : ${b['cost_usd']:.4f}  (input side ${b['input_cost_usd']:.4f})")
    print(f"  with tokensaver             : ${o['cost_usd']:.4f}  (input side ${o['input_cost_usd']:.4f})")
    if b["cost_usd"] and b["input_cost_usd"]:
        pct = 100 * (1 - o["cost_usd"] / b["cost_usd"])
        pct_in = 100 * (1 - o["input_cost_usd"] / b["input_cost_usd"])
        print(
            f"  saving                      : {pct_in:.1f}% of the input side, {pct:.1f}% of the whole bill"
            f"  (requests rejected: {o['rejected']:.0f})"
        )
    print('The report\'s "saved" is against these conversations as recorded, which set no cache_control.')
    return 0 if not ours.rejected else 1


def _emit(result: ReplayResult, fmt: str, output: str | None) -> None:
    if result.run is None:
        return
    report = result.run.report()
    text = {
        "table": report.to_table,
        "md": report.to_markdown,
        "html": report.to_html,
        "json": report.to_json,
    }[fmt]()
    write_output(text, output, f"{fmt} report of run {result.run.name}")
    if result.rejected:
        print(f"WARNING: the API rejected {len(result.rejected)} request(s):", file=sys.stderr)
        for r in result.rejected[:5]:
            print(f"  {r['conversation']} call {r['call']}: {r['error'][:200]}", file=sys.stderr)
