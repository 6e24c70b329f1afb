"""Every private anthropic SDK name tokensaver touches lives here, behind small functions.

``tests/test_sdk_contract.py`` fails loudly if the SDK changes any of them.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx2
from anthropic import AsyncAPIResponse
from anthropic._compat import model_copy
from anthropic._middleware import Middleware  # public in spirit: documented as the middleware contract
from anthropic._request import APIRequest
from anthropic._response import APIResponse

__all__ = [
    "APIRequest",
    "Middleware",
    "synthetic_response",
    "replace_body_stream",
    "with_body",
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


def with_body(request: APIRequest, body: Any, headers: dict[str, Any]) -> APIRequest:
    """``request.copy(body=body, headers=headers)`` without its deep copy of the old body.

    ``APIRequest.copy`` deep-copies ``json_data`` (and ``extra_json`` and ``params``) before
    replacing it: for a 200k-token request that is over a millisecond spent on a copy thrown away.
    Here only the body is replaced (the transformed body is the pipeline's own), and ``extra_json``
    and ``params`` are still copied, as the SDK does.
    """
    options = model_copy(request.options)
    options.json_data = body
    options.extra_json = copy.deepcopy(options.extra_json)
    options.params = copy.deepcopy(options.params)
    options.headers = headers
    return APIRequest(
        options=options,
        cast_to=request.cast_to,
        stream=request.stream,
        stream_cls=request.stream_cls,
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
