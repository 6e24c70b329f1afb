"""Bedrock and Vertex clients: the middleware sees the plain Messages body before the platform rewrites it.

These clients cannot reach the emulator (their URLs and bodies differ), so the SDK's httpx2
MockTransport stands in for the platform and we assert on the bodies it received.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest

import tokensaver


class SystemSetter:
    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {**body, "system": "tokensaver was here"}


PLATFORMS = [
    (
        anthropic.AnthropicBedrock,
        {"aws_region": "us-east-1", "aws_access_key": "a", "aws_secret_key": "b"},
        "/invoke",
    ),
    (
        anthropic.AnthropicVertex,
        {"region": "us-east5", "project_id": "p", "access_token": "t"},
        ":rawPredict",
    ),
]


@pytest.mark.parametrize(("cls", "kwargs", "suffix"), PLATFORMS)
def test_platform_clients_are_transformed_and_recorded(cls: Any, kwargs: dict[str, Any], suffix: str) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append((str(request.url), json.loads(request.content)))
        usage = {"input_tokens": 12, "output_tokens": 3}
        message = {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "x",
            "content": [{"type": "text", "text": "ok"}],
        }
        return httpx2.Response(
            200, json={**message, "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}
        )

    client = cls(**kwargs, http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    pm = tokensaver.get_plugin_manager({"setter": SystemSetter()}, load_entrypoints=False)
    wrapped = tokensaver.wrap(client, config={"plugins": ["setter"], "record": False}, plugin_manager=pm)
    assert isinstance(wrapped, cls)
    msg = wrapped.messages.create(
        model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.content[0].text == "ok"
    url, body = seen[-1]
    assert url.endswith(suffix)  # the platform's own URL and body shape...
    assert (
        body["system"] == "tokensaver was here" and "anthropic_version" in body
    )  # ...with our transform inside
    record = wrapped.tokensaver.records[-1]
    assert record["status"] == 200 and record["usage"]["input_tokens"] == 12
