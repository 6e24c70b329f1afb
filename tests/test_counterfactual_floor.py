"""The estimated counterfactual is a price: never below what the call's output cost."""

from __future__ import annotations

from typing import Any

from tokensaver.billing import ShadowCaches
from tokensaver.pricing import PriceTable


def _body(cache_control: bool) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": "word " * 1300}
    if cache_control:
        block["cache_control"] = {"type": "ephemeral"}
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": [block]}],
    }


def test_a_bill_far_from_the_estimate_never_makes_the_counterfactual_negative() -> None:
    """A stage added a breakpoint (the model: a cache write instead of plain input), and the API billed
    mostly cache reads of a prefix 70x what the model counts (its cache held a history the shadow
    never saw): scaled to the billed tokens, the correction exceeds the whole bill."""
    prices = PriceTable()
    model = prices.get("claude-sonnet-4-6")
    usage = {
        "input_tokens": 8,
        "cache_creation_input_tokens": 1087,
        "cache_read_input_tokens": 94330,
        "output_tokens": 1,
    }
    est = ShadowCaches(prices).estimate(
        "key", 1_700_000_000.0, model, _body(False), [_body(True)], usage=usage, sent=True
    )
    out_usd = usage["output_tokens"] * model.output / 1e6
    assert est.stage_usd[0] < -model.input_cost(usage)  # the stage priced as dearer than the whole bill
    assert est.counterfactual_usd >= out_usd and est.auto_usd >= out_usd
