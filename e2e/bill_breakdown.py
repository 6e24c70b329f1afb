"""Where an e2e session's billed input side goes: per request and per kind of content.

``e2e/agents.py --keep`` leaves ``requests-<agent>-<route>.jsonl`` (what the emulator received, with the
usage it billed) in its work folder. This bills them again on a fresh ``CacheModel`` (the emulator's
own rules; each line's usage is checked against it) and splits every request's input-side dollars by
where they were spent:

- per request: the static part (tools + system) written / read, the conversation written / read, the
  tokens sent uncached, and ``rewrite``: conversation blocks written again though an earlier request
  already wrote the same content (a bust, a moved breakpoint, content that changed form);
- per kind of content over the session: tools, system, a system-role message, the first user
  message, tool results, tool calls, texts, thinking, later user texts; each as its writes, reads and
  uncached input.

    python e2e/bill_breakdown.py /tmp/tokensaver-e2e-XXXX/requests-openclaw-direct.jsonl [...]
    python e2e/bill_breakdown.py --quiet DIR   (every requests-*.jsonl in DIR, totals only)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from tokensaver.billing import CacheModel, Prepared, PromptBlock
from tokensaver.pricing import PriceTable


def kind_of(body: dict[str, Any], pb: PromptBlock) -> str:
    section, i, _ = pb.where
    if section != "messages":
        return section
    message = body["messages"][i]
    block = pb.block
    kind = block.get("type") if isinstance(block, dict) else "text"
    if message.get("role") == "system":
        return "system-message"
    if i == 0:
        return "first-user"
    if message.get("role") == "user" and kind == "text":
        return "user-text"
    return str(kind)


def breakdown(path: Path, per_request: bool = True) -> dict[str, float]:
    """Print the tables for one requests file; the session's totals by column, in dollars."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cache, prices = CacheModel(), PriceTable()
    ever_written: set[bytes] = set()
    totals: dict[str, float] = defaultdict(float)
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    if per_request:
        print(f"{path.name}: tokens per request")
        print(" req  static-w  static-r  conv-w  conv-r  rewrite  input")
    for n, row in enumerate(rows):
        if row.get("status") != 200:
            continue
        body = row["body"]
        model = prices.get(str(body.get("model") or ""))
        prepared = Prepared.of(body)
        billed = cache.bill(body, 1000.0 + n)
        usage = row.get("usage") or {}
        if (billed.cache_read, billed.write_5m + billed.write_1h) != (
            usage.get("cache_read_input_tokens"),
            usage.get("cache_creation_input_tokens"),
        ):
            print(f"  request {n}: billed again {billed}, the emulator said {usage}", file=sys.stderr)
        blocks = prepared.blocks
        static = sum(1 for pb in blocks if pb.where[0] in ("tools", "system"))
        hit = billed.hit_at if billed.hit_at is not None else -1
        last = max(billed.written_at) if billed.written_at else hit
        tok = dict.fromkeys(("static_w", "static_r", "conv_w", "conv_r", "rewrite", "input"), 0)
        for k, pb in enumerate(blocks):
            part = "static" if k < static else "conv"
            where = "r" if k <= hit else "w" if k <= last else "i"
            if where == "i":
                tok["input"] += pb.tokens
            else:
                tok[f"{part}_{where}"] += pb.tokens
            if where == "w" and part == "conv" and pb.digest in ever_written:
                tok["rewrite"] += pb.tokens
            price = {"r": model.cache_read, "w": model.cache_write_5m, "i": model.input}[where]
            kinds[kind_of(body, pb)]["rwi".index(where)] += pb.tokens * price / 1e6
        ever_written.update(blocks[k].digest for k in range(hit + 1, last + 1))
        w, r, i = model.cache_write_5m / 1e6, model.cache_read / 1e6, model.input / 1e6
        for key, value in tok.items():
            totals[key] += value * (
                w if key.endswith("_w") or key == "rewrite" else r if key.endswith("_r") else i
            )
        if per_request:
            print(
                f" {n:3d}  {tok['static_w']:8,d}  {tok['static_r']:8,d}  {tok['conv_w']:6,d}  {tok['conv_r']:6,d}"
                f"  {tok['rewrite']:7,d}  {tok['input']:5,d}"
            )
    whole = sum(v for k, v in totals.items() if k != "rewrite")
    print(
        f"{path.name}: ${whole:.4f} billed input side: "
        + ", ".join(f"{k} ${v:.4f} ({100 * v / whole:.0f}%)" for k, v in totals.items() if whole)
    )
    print("  by kind of content (writes / reads / uncached input):")
    for name, (read, write, sent) in sorted(kinds.items(), key=lambda kv: -sum(kv[1])):
        spent = read + write + sent
        print(
            f"    {name:15s} ${spent:.4f} {100 * spent / whole:5.1f}%  "
            f"(${write:.4f} / ${read:.4f} / ${sent:.4f})"
        )
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="requests-*.jsonl files, or folders holding them")
    parser.add_argument("--quiet", action="store_true", help="no per-request table")
    args = parser.parse_args(argv)
    files = [f for p in args.paths for f in (sorted(p.glob("requests-*.jsonl")) if p.is_dir() else [p])]
    for f in files:
        breakdown(f, per_request=not args.quiet)
    return 0 if files else 1


if __name__ == "__main__":
    sys.exit(main())
