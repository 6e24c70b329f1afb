"""Every private anthropic SDK name tokensaver touches lives here, behind small functions.

``tests/test_sdk_contract.py`` fails loudly if the SDK changes any of them.
"""

from __future__ import annotations

from typing import Any

import httpx2
from anthropic import AsyncAPIResponse
from anthropic._middleware import Middleware  # public in spirit: documented as the middleware contract
from anthropic._request import APIRequest
from anthropic._response import APIResponse

__all__ = [
    "APIRequest",
    "Middleware",
    "synthetic_response",
    "replace_body_stream",
    "client_secret",
    "is_async_client",
]


def _absolute_url(client: Any, url: str) -> httpx2.URL:
    u = httpx2.URL(url)
    if u.is_absolute_url:
        return u
    base = str(client.base_url).rstrip("/")
    return httpx2.URL(base + "/" + url.lstrip("/"))


def synthetic_response(
    client: Any,
    request: APIRequest,
    *,
    content: bytes,
    content_type: str,
    headers: dict[str, str],
    asynchronous: bool,
) -> Any:
    """An SDK response object for an answer served without the network (a short-circuit)."""
    http_request = httpx2.Request(request.method.upper(), _absolute_url(client, request.url))
    raw = httpx2.Response(
        status_code=200,
        headers={"content-type": content_type, **headers},
        content=content,
        request=http_request,
    )
    cls = AsyncAPIResponse if asynchronous else APIResponse
    return cls(
        raw=raw,
        cast_to=request.cast_to,
        client=client,
        stream=request.stream,
        stream_cls=request.stream_cls,
        options=request.options,
        retries_taken=request.retries_taken,
    )


def replace_body_stream(response: Any, stream: httpx2.SyncByteStream | httpx2.AsyncByteStream) -> Any:
    """The same SDK response with its body replaced by ``stream`` (used to observe SSE on the way)."""
    original: httpx2.Response = response.http_response
    headers = original.headers.copy()
    for name in ("content-encoding", "content-length"):
        if name in headers:
            del headers[name]
    raw = httpx2.Response(
        status_code=original.status_code, headers=headers, stream=stream, request=original.request
    )
    return type(response)(
        raw=raw,
        cast_to=response._cast_to,
        client=response._client,
        stream=True,
        stream_cls=response._stream_cls,
        options=response._options,
        retries_taken=response.retries_taken,
    )


def client_secret(client: Any) -> str:
    """The credential that identifies the caller (never stored: only hashed)."""
    parts = []
    for attr in (
        "api_key",
        "auth_token",
        "aws_access_key",
        "aws_profile",
        "aws_region",
        "project_id",
        "region",
    ):
        value = getattr(client, attr, None)
        if isinstance(value, str) and value:
            parts.append(f"{attr}={value}")
    return "|".join(parts)


def is_async_client(client: Any) -> bool:
    """Whether ``client`` is one of the SDK's async clients."""
    from anthropic._base_client import AsyncAPIClient

    return isinstance(client, AsyncAPIClient)


def is_client(obj: Any) -> bool:
    """Whether ``obj`` is an anthropic SDK client (Anthropic, Bedrock, Vertex, sync or async)."""
    from anthropic._base_client import BaseClient

    return isinstance(obj, BaseClient)


def client_middleware(client: Any) -> tuple[Any, ...]:
    """The client's middleware tuple (public property in anthropic 2.x)."""
    return tuple(client.middleware)
