"""An offline stand-in for the Anthropic Messages API: validation, prompt-cache billing, SSE, a clock.

``with Emulator() as emu: anthropic.Anthropic(base_url=emu.url, api_key="x")``. Every module measures
its savings against the usage this server bills, so its prompt-cache billing follows the API's rules.
Those rules (blocks, level settings, breakpoints, lookback, TTLs, minimum cacheable length, automatic
caching, context-management edits) live in :mod:`tokensaver.billing`, the one implementation shared
with the pipeline's counterfactual; this package adds validation, replies, SSE and the HTTP server:

* :mod:`~tokensaver.emulator.validation`: where the API answers 400 (:func:`validate`, :class:`EmulatorError`);
* :mod:`~tokensaver.emulator.cache`: the clocks and the cache rules applied to a call;
* :mod:`~tokensaver.emulator.core`: :class:`Emulator` (scripted replies, recorded requests, ``handle``);
* :mod:`~tokensaver.emulator.threads`: message threads (a continue rebuilt into the whole conversation);
* :mod:`~tokensaver.emulator.binding`: preserved thinking: the prefix check and the model check on thinking
  blocks sent back (``Emulator(preserved_thinking=False)`` turns both off);
* :mod:`~tokensaver.emulator.server`: HTTP; :mod:`~tokensaver.emulator.cli`: ``tokensaver emulator``.

The emulator imports only ``tokensaver.billing``, ``tokensaver.model_rules``, ``tokensaver.tokens``,
``tokensaver.pricing`` and ``tokensaver.sse``.
"""

from __future__ import annotations

from ..billing import (
    CLEARED_PLACEHOLDER,
    LOOKBACK,
    TTL_SECONDS,
    PromptBlock,
    apply_context_management,
    prompt_blocks,
)
from .cache import DEFAULT_START, VirtualClock, WallClock, count_tokens
from .cli import serve
from .core import DEFAULT_REPLY, Emulator, RecordedRequest, Reply
from .validation import (
    ALLOWED_FIELDS,
    COUNT_TOKENS_FIELDS,
    EmulatorError,
    model_version,
    refuses_budget_thinking,
    refuses_prefill,
    refuses_sampling,
    refuses_temperature_with_top_p,
    supports_adaptive_thinking,
    validate,
)

__all__ = [
    "ALLOWED_FIELDS",
    "CLEARED_PLACEHOLDER",
    "COUNT_TOKENS_FIELDS",
    "DEFAULT_REPLY",
    "DEFAULT_START",
    "LOOKBACK",
    "TTL_SECONDS",
    "Emulator",
    "EmulatorError",
    "PromptBlock",
    "RecordedRequest",
    "Reply",
    "VirtualClock",
    "WallClock",
    "apply_context_management",
    "count_tokens",
    "model_version",
    "prompt_blocks",
    "refuses_budget_thinking",
    "refuses_prefill",
    "refuses_sampling",
    "refuses_temperature_with_top_p",
    "serve",
    "supports_adaptive_thinking",
    "validate",
]
