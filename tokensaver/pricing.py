"""Prices and model facts (context window, minimum cacheable length), from a shipped data file.

Unknown models fall back by family (``opus``, ``sonnet``, ``haiku``, ...) with a warning that the
report shows. Any field can be overridden in config under ``[prices.<model>]``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
PER = 1_000_000


@dataclass(frozen=True)
class ModelInfo:
    """Per-model prices (USD per million tokens) and limits."""

    name: str
    family: str
    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    min_cache: int
    context_window: int
    fallback_from: str | None = None  # the requested model, when this row is a family fallback

    def cost(self, usage: dict[str, Any]) -> float:
        """Dollars billed for one ``usage`` object (input, cache writes by TTL, cache reads, output)."""
        u = normalize_usage(usage)
        return (
            u["input_tokens"] * self.input
            + u["cache_creation_5m"] * self.cache_write_5m
            + u["cache_creation_1h"] * self.cache_write_1h
            + u["cache_read_input_tokens"] * self.cache_read
            + u["output_tokens"] * self.output
        ) / PER

    def input_cost(self, usage: dict[str, Any]) -> float:
        """Dollars for the input side only (input + cache writes + cache reads)."""
        u = dict(normalize_usage(usage))
        u["output_tokens"] = 0
        return self.cost(u)


def normalize_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    """A usage dict with every field present; the 5m/1h split filled in when the API omitted it."""
    usage = usage or {}
    cc = usage.get("cache_creation") or {}
    total_write = int(usage.get("cache_creation_input_tokens") or 0)
    # a usage normalized already keeps its split (pricing one must not turn 1h writes into 5m ones)
    w1h = int(cc.get("ephemeral_1h_input_tokens") or usage.get("cache_creation_1h") or 0)
    w5m = int(cc.get("ephemeral_5m_input_tokens") or usage.get("cache_creation_5m") or 0)
    if w1h + w5m != total_write:
        w5m = max(0, total_write - w1h)
    return {
        "input_tokens": int(usage.get("input_tokens") or 0),
        "cache_creation_input_tokens": total_write,
        "cache_creation_5m": w5m,
        "cache_creation_1h": w1h,
        "cache_read_input_tokens": int(usage.get("cache_read_input_tokens") or 0),
        "output_tokens": int(usage.get("output_tokens") or 0),
    }


_DATE_SUFFIX = re.compile(r"(-\d{8}|-latest|@\d{8}|-v\d+(:\d+)?|\[1m\])$")


class PriceTable:
    """Looks up ``ModelInfo`` by model id, with overrides and family fallback."""

    def __init__(self, overrides: dict[str, dict[str, Any]] | None = None) -> None:
        raw = json.loads(resources.files("tokensaver").joinpath("data/models.json").read_text())
        self._models: dict[str, dict[str, Any]] = {k: dict(v) for k, v in raw["models"].items()}
        for name, fields in (overrides or {}).items():
            self._models.setdefault(name, {}).update(fields)
        self._family_default: dict[str, str] = raw["family_default"]
        self._default: str = raw["default"]
        self.warnings: list[str] = []

    def known(self) -> list[str]:
        """Model ids with a row in the table."""
        return sorted(self._models)

    def get(self, model: str) -> ModelInfo:
        """The row for ``model``; a family fallback (recorded in ``warnings``) when it has none."""
        name = _canonical(model)
        if name in self._models and _complete(self._models[name]):
            return _info(name, self._models[name])
        # longest known prefix, e.g. "claude-sonnet-4-5-20250929" -> "claude-sonnet-4-5"
        for known in sorted(self._models, key=len, reverse=True):
            if name.startswith(known) and _complete(self._models[known]):
                return _info(known, self._models[known])
        family = next((f for f in self._family_default if f in name), None)
        fallback = self._family_default.get(family or "", self._default)
        msg = f"unknown model {model!r}: priced as {fallback}" + (f" (family {family})" if family else "")
        if msg not in self.warnings:
            self.warnings.append(msg)
        return replace(_info(fallback, self._models[fallback]), fallback_from=model)


def _canonical(model: str) -> str:
    name = model.strip().lower()
    # Bedrock / Vertex ids: "anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5@20250929"
    name = name.split("/")[-1]
    if "." in name and name.split(".", 1)[0] in ("anthropic", "us", "eu", "apac", "global"):
        name = name.rsplit("anthropic.", 1)[-1]
    prev = None
    while prev != name:
        prev = name
        name = _DATE_SUFFIX.sub("", name)
    return name


def _complete(fields: dict[str, Any]) -> bool:
    return all(k in fields for k in (*PRICE_FIELDS, "min_cache", "context_window"))


def _info(name: str, f: dict[str, Any]) -> ModelInfo:
    return ModelInfo(
        name=name,
        family=str(f.get("family", "")),
        input=float(f["input"]),
        output=float(f["output"]),
        cache_write_5m=float(f["cache_write_5m"]),
        cache_write_1h=float(f["cache_write_1h"]),
        cache_read=float(f["cache_read"]),
        min_cache=int(f["min_cache"]),
        context_window=int(f["context_window"]),
    )
