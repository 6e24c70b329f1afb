"""Fails loudly when the anthropic SDK changes a private name tokensaver relies on (tokensaver/_sdk.py)."""

from __future__ import annotations

import inspect

import anthropic


def test_private_names_exist() -> None:
    from anthropic._base_client import AsyncAPIClient, BaseClient
    from anthropic._middleware import Middleware
    from anthropic._request import APIRequest
    from anthropic._response import APIResponse

    params = set(inspect.signature(APIResponse.__init__).parameters)
    assert {"raw", "cast_to", "client", "stream", "stream_cls", "options", "retries_taken"} <= params
    assert {"copy", "json", "url", "method", "headers"} <= set(dir(APIRequest))
    assert {"options", "cast_to", "stream", "stream_cls", "retries_taken"} <= set(
        inspect.signature(APIRequest.__init__).parameters
    )
    assert hasattr(Middleware, "handle") and hasattr(Middleware, "handle_async")
    assert issubclass(anthropic.Anthropic, BaseClient) and issubclass(
        anthropic.AsyncAnthropic, AsyncAPIClient
    )
    for name in ("_cast_to", "_client", "_stream_cls", "_options"):
        assert name in inspect.getsource(APIResponse.__mro__[1].__init__)


def test_with_middleware_and_copy_are_public() -> None:
    client = anthropic.Anthropic(api_key="k")
    assert callable(client.with_middleware) and callable(client.copy)
    assert client.with_options == client.copy or callable(client.with_options)
    assert isinstance(client.middleware, tuple)


def test_bedrock_and_vertex_clients_accept_middleware() -> None:
    import tokensaver

    for cls, kw in (
        (
            anthropic.AnthropicBedrock,
            {"aws_region": "us-east-1", "aws_access_key": "a", "aws_secret_key": "b"},
        ),
        (anthropic.AnthropicVertex, {"region": "us-east5", "project_id": "p", "access_token": "t"}),
    ):
        client = cls(**kw)
        wrapped = tokensaver.wrap(client, config={"plugins": [], "record": False})
        assert isinstance(wrapped, cls)
        assert any(isinstance(m, tokensaver.middleware.TokensaverMiddleware) for m in wrapped.middleware)
