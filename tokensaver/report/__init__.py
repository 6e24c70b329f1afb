"""Run reports: what a run cost, what it would have cost, and which stage saved what.

``Report`` aggregates a run's call records (schema in ``docs/DESIGN.md``) and renders them as a
terminal table, Markdown, self-contained HTML (inline CSS and SVG, no scripts, no remote loads)
or JSON. Figures are either **billed** (summed from the API's ``usage`` and priced: input, cache
writes/reads, output tokens, ``cost_usd``) or **estimated**: local tiktoken counts (tokens before and
after tokensaver, per-stage tokens saved) and what the caller's own requests would have been billed
without tokensaver (``counterfactual_usd``) or with the API's automatic caching added to them (``auto_usd``: their own breakpoints kept, the
top-level line added where a slot of the 4 is left),
from the billing model of :mod:`tokensaver.billing` run beside the API. ``saved_usd`` =
``counterfactual_usd`` - ``cost_usd``. ``estimate_error_*`` says how far the model's figure for what
was sent was from the billed usage, on the calls where both exist. Short-circuited calls never
reached the API, so their usage is not counted as billed.

``Report.to_json()`` keys (stable; new keys may be added, none renamed):

- ``schema``: ``"tokensaver-report/1"``
- ``run``: ``{name, created, config}``
- ``totals``: ``{calls, state_lost, thinking_unbound, short_circuited, api_errors, tokens_original, tokens_sent, tokens_saved,
  usage: {input_tokens, cache_creation_input_tokens, cache_creation_5m, cache_creation_1h,
  cache_read_input_tokens, output_tokens}, cost_usd, counterfactual_usd, auto_usd, saved_usd,
  saved_pct, saved_vs_auto_usd, saved_vs_auto_pct, estimated_calls, estimate_error_usd,
  estimate_error_pct}`` (``saved_pct`` of ``counterfactual_usd``; ``estimate_error_usd`` = the sum
  of each call's distance between the estimated and the billed input side, ``estimate_error_pct``
  that over the billed input side of those calls; ``thinking_unbound``: calls sent without thinking
  blocks the API refused as bound to a different conversation, see :func:`tokensaver.exchange.unbound_retry`)
- ``cache``: ``{input_tokens, write_tokens, write_5m, write_1h, read_tokens, hit_rate}``
  (``hit_rate`` = cache reads / all billed input-side tokens, null without any)
- ``latency``: ``{samples, overhead_p50_ms, overhead_p95_ms, overhead_max_ms}`` (nearest rank)
- ``stages``: ``[{plugin, calls, touched, short_circuits, saved_tokens, saved_usd,
  short_circuit_usd, model_calls_usd, errors, ms}]`` (``saved_usd`` includes ``short_circuit_usd``
  and is net of ``model_calls_usd``, what the plugin's own model calls cost)
- ``short_circuits``: ``[{id, conversation, plugin, model, tokens_sent, saved_usd}]``
- ``errors``: ``[{call, plugin, hook, error}]`` (plugin errors; the call went on without the plugin)
- ``api_errors``: ``[{call, status, error}]``
- ``price_warnings``: ``[{warning, calls}]``
- ``conversations``: ``[{conversation, calls, short_circuited, tokens_original, tokens_sent,
  cache_read_input_tokens, cost_usd, counterfactual_usd, auto_usd, saved_usd}]``
- ``calls``: ``[{id, t, conversation, model, tokens_original, tokens_sent, input_tokens,
  cache_creation_input_tokens, cache_read_input_tokens, output_tokens, cost_usd, counterfactual_usd,
  auto_usd, saved_usd, estimate_error_usd, short_circuit, overhead_ms}]``
- ``sections``: ``[{plugin, title, summary, columns, rows, error}]`` (contributed by plugins)

The package, one module per seam: :mod:`~tokensaver.report.aggregate` (the figures, from the
records), :mod:`~tokensaver.report.sections` (plugin sections), :mod:`~tokensaver.report.charts`
(SVG geometry), :mod:`~tokensaver.report.render` (:class:`Report` and its templates) and
:mod:`~tokensaver.report.formatting` (the formatters the bench and ``tokensaver runs`` share).
"""

from __future__ import annotations

from .aggregate import TRANSFORM_HOOK, USAGE_KEYS, percentile, run_summary, summarize
from .charts import MAX_BARS
from .formatting import fmt_int, fmt_ms, fmt_pct, fmt_rate, fmt_time, fmt_usd, fmt_value, md_cell, text_table
from .render import BILLED_NOTE, ESTIMATED_NOTE, SCHEMA, Report, auto_line, estimate_line
from .sections import collect_sections, normalize_section, section_plugins

__all__ = [
    "BILLED_NOTE",
    "ESTIMATED_NOTE",
    "MAX_BARS",
    "SCHEMA",
    "TRANSFORM_HOOK",
    "USAGE_KEYS",
    "Report",
    "auto_line",
    "collect_sections",
    "estimate_line",
    "fmt_int",
    "fmt_ms",
    "fmt_pct",
    "fmt_rate",
    "fmt_time",
    "fmt_usd",
    "fmt_value",
    "md_cell",
    "normalize_section",
    "percentile",
    "run_summary",
    "section_plugins",
    "summarize",
    "text_table",
]
