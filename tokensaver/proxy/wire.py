"""What the proxy reads and writes on the wire: headers, paths, request bodies, API-shaped errors.

No state: plain functions over aiohttp's types, used by the application (``app``) and the server.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import aiohttp
import orjson
from aiohttp import web
from aiohttp.helpers import basicauth_from_netrc, get_env_proxy_for_url, netrc_from_env
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict
from yarl import URL

from ..exchange import CONTROL_PREFIX, MESSAGES_PATH, encode

log = logging.getLogger("tokensaver.proxy")

TOKEN_HEADER = "x-tokensaver-proxy-token"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
MAX_BODY = 32 * 1024 * 1024  # the API refuses Messages requests over 32 MB (413 request_too_large)
# the proxy adds none of its own: the client's user agent (or none) goes upstream
SKIP_AUTO_HEADERS = ("User-Agent",)


# a Messages request on a base path that repeats the version (LiteLLM's api_base=".../v1" sends
# /v1/v1/messages): the same request, optimized and sent on the API's own path
_MESSAGES_ROUTE = re.compile(r"^(?:/v1)+/messages$")
CHAT_COMPLETIONS = "/chat/completions"  # the OpenAI-compatible endpoint: forwarded as it is
_SECRET_PARAM = re.compile(r"key|token|secret|auth|sig|password", re.IGNORECASE)


def messages_route(path: str) -> bool:
    """Whether a (decoded) path carries a Messages request: ``/v1/messages``, the version repeated or not."""
    return _MESSAGES_ROUTE.match(path) is not None


def upstream_tail(tail: str) -> str:
    """The path a request goes upstream on: a Messages route as ``/v1/messages``, any other as it came."""
    return MESSAGES_PATH if messages_route(unquote(tail)) else tail


def shown_target(path: str, query: str) -> str:
    """A request target for the log: the path, and the query with credential-like values left out."""
    if not query:
        return path[:200]
    pairs = parse_qsl(query, keep_blank_values=True)
    shown = "&".join(f"{k}=..." if _SECRET_PARAM.search(k) else f"{k}={v}" for k, v in pairs)
    return f"{path}?{shown}"[:200]


def not_optimized(method: str, path: str, target: str, status: int | str) -> tuple[int, str]:
    """The log level and line of a forwarded request: path, status, "not optimized" and why."""
    if path.rstrip("/").endswith(CHAT_COMPLETIONS):
        return logging.WARNING, (
            f"{method} {target} -> {status} not optimized: the OpenAI-compatible endpoint is forwarded as "
            f"it is; tokensaver optimizes the Anthropic Messages API ({MESSAGES_PATH})"
        )
    return logging.INFO, f"{method} {target} -> {status} not optimized (forwarded as it is)"


def forward_headers(headers: Mapping[str, str], *, drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """Request headers to send upstream: minus hop-by-hop, host/length and tokensaver control headers."""
    items = list(headers.items())
    connection = {
        t.strip().lower() for k, v in items if k.lower() == "connection" for t in v.split(",") if t.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        low = name.lower()
        if (
            low in HOP_BY_HOP
            or low in connection
            or low in ("host", "content-length")
            or (low == "content-encoding" and decoded_here(value))
            or low in drop
            or low.startswith(CONTROL_PREFIX)
        ):
            continue
        out.add(name, value)
    return out


def response_headers(headers: Mapping[str, str], *, decoded: bool) -> CIMultiDict[str]:
    """Upstream response headers to send back (length/encoding dropped when the body was decoded)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or (decoded and low in ("content-length", "content-encoding")):
            continue
        out.add(name, value)
    return out


def api_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in the Messages API's shape, made by the proxy itself."""
    payload = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(payload, status=status, headers=headers)


ERROR_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_kind(status: int) -> str:
    """The API's error type for a status (its docs: other 4xx are ``invalid_request_error``)."""
    return ERROR_KINDS.get(status, "invalid_request_error" if status < 500 else "api_error")


def too_large() -> web.Response:
    return api_error(
        413,
        "request_too_large",
        f"tokensaver proxy: the request body is over the Messages API's {MAX_BODY // 2**20} MB limit",
    )


def decoded_here(content_encoding: str) -> bool:
    """Whether aiohttp decodes a request body sent with this encoding as it reads it (we forward plain bytes)."""
    return content_encoding.lower() in ("gzip", "deflate", "br", "zstd")


def _unquoted(segment: str) -> str | None:
    """A path segment percent-decoded until nothing changes (``None``: not UTF-8, or still encoded after four rounds)."""
    for _ in range(4):
        try:  # an invalid UTF-8 escape (an overlong %C0%AE for '.') is no path the API has
            decoded = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            return None
        if decoded == segment:
            return segment
        segment = decoded
    return None


def confined_path(raw_path: str) -> str | None:
    """``raw_path`` as it is forwarded under the upstream's base path, or ``None`` if it cannot be.

    Empty and ``.`` segments are dropped and ``..`` removes the segment before it (``%2e`` is a
    dot: RFC 3986 6.2.2.2); other segments are kept as sent. Refused, because a server that reads
    paths leniently could still climb out of the base with them: a ``..`` above the root, an
    encoded slash, a backslash (raw or encoded), a control character, an escape that is not
    UTF-8 (``%C0%AE``), a dot-segment with parameters (``..;``) or encoded twice (``%252e``).
    """
    out: list[str] = []
    segments = raw_path.split("/")
    trailing = False
    for segment in segments:
        trailing = not segment
        if not segment:
            continue
        full = _unquoted(segment)
        once = unquote(segment)
        if full is None or "/" in full or "\\" in full or any(c < " " or c == "\x7f" for c in full):
            return None
        if full.split(";", 1)[0] in (".", ".."):
            if once != full or once not in (".", ".."):
                return None
            if once == "..":
                if not out:
                    return None
                out.pop()
            trailing = True
            continue
        out.append(segment)
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


# parsing more than this would hold the event loop for milliseconds (orjson: ~2 ms a MiB; a body
# orjson refuses, rare, is parsed by the stdlib, slower); a ~50k-token body (200-450 KB) is parsed
# on the loop, with no thread hop
PARSE_ON_LOOP_BYTES = 1024 * 1024
# an integer of 20 digits or more (2**64 has 20), which orjson would read as a float: a run of 20
# digits after what can come before a number (":", ",", "[", "-", whitespace), found by one search
# of the body mapped to three bytes (a run in text, rare, only costs the slower parse)
_DIGIT_MAP = bytes(0x39 if 0x30 <= i <= 0x39 else 0x23 if i in b":,[- \t\r\n" else 0x5F for i in range(256))
_LONG_INTEGER = b"#" + b"9" * 20


def parse_messages_body(raw: bytes, content_type: str = "") -> tuple[dict[str, Any] | None, str | None]:
    """A Messages request body as a JSON object, or why it is not one (the proxy answers that as a 400).

    orjson parses it; what orjson refuses (NaN, a lone surrogate escape, UTF-16, a byte order mark,
    invalid JSON) or may read otherwise (an integer of 20 digits or more: orjson makes a float of one
    past 64 bits) is parsed as before by the stdlib, which accepts the same bodies as before and
    words the same refusals.
    """
    if not raw.strip():
        return None, "the request body is empty; the Messages API takes a JSON object"
    if _LONG_INTEGER in raw.translate(_DIGIT_MAP):  # orjson reads an integer past 64 bits as a float
        return _parse_stdlib(raw, content_type)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_stdlib(raw, content_type)
    if not isinstance(body, dict):
        return None, f"the request body must be a JSON object, not {_json_kind(body)}"
    return body, None


def _parse_stdlib(raw: bytes, content_type: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        body = json.loads(raw)
    except RecursionError:  # the C decoder counts its depth against the recursion limit: no stack overflow
        return None, "the request body nests too deeply to parse"
    except ValueError as exc:  # UnicodeDecodeError included
        where = (
            f"{exc.msg} at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else "not UTF-8"
        )
        mime = content_type.split(";", 1)[0].strip().lower()
        hint = (
            ""
            if mime in ("", "application/json") or mime.endswith("+json")
            else f"; the Messages API takes application/json, not {mime}"
        )
        return None, f"the request body is not valid JSON ({where}){hint}"
    if not isinstance(body, dict):
        return None, f"the request body must be a JSON object, not {_json_kind(body)}"
    return body, None


# orjson writes what the stdlib writes (same escapes, key order, integers, and float digits)
# except: a float under 1e-4 (stdlib "1e-05", orjson "0.00001"; "2.5e-07" / "2.5e-7"), NaN and
# infinities (orjson: null), and types the stdlib refuses (refused here too, see encode_body)
_NULL = re.compile(rb"null")
_TINY = (re.compile(rb"e-[0-9]"), re.compile(rb"0\.0000"))
_ORJSON_EXACT = (
    orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
)
_NUMBER_CHARS = frozenset(b"0123456789.")


def _a_value_at(out: bytes, j: int) -> bool:
    """Whether a token starting at ``out[j]`` may be a value (not text inside a string).

    In orjson's compact output a value follows ``:``, ``,`` or ``[``; a ``:`` outside strings
    follows a key's closing quote, which is not escaped (an even run of backslashes before it).
    A ``,`` or ``[`` in text passes too: that only costs the slower path.
    """
    if j == 0:
        return True
    c = out[j - 1]
    if c in b",[":
        return True
    if c != 0x3A or j < 2 or out[j - 2] != 0x22:  # not ':' after a quote: inside a string
        return False
    k = j - 3
    while k >= 0 and out[k] == 0x5C:
        k -= 1
    return (j - 3 - k) % 2 == 0


def _may_differ(out: bytes) -> bool:
    """Whether orjson's ``out`` may hold a value the stdlib writes otherwise: a null in a value's
    place (NaN or an infinity became one) or a float under 1e-4 (some text passes as one: it only
    costs the slower path)."""
    for m in _NULL.finditer(out):
        j = m.start()
        if out[j + 4 : j + 5] in (b",", b"]", b"}") and _a_value_at(out, j):
            return True
    for pattern in _TINY:
        for m in pattern.finditer(out):
            j = m.start()  # back to where the number would begin
            while j > 0 and out[j - 1] in _NUMBER_CHARS:
                j -= 1
            if not out[j : j + 1].isdigit():  # no digit before "e-": no number
                continue
            if j > 0 and out[j - 1] == 0x2D:  # its minus sign
                j -= 1
            if _a_value_at(out, j):
                return True
    return False


def encode_body(body: dict[str, Any]) -> bytes:
    """The bytes :func:`tokensaver.exchange.encode` gives for ``body``, made by orjson when they are
    sure to be the same (about 25x faster), else by ``encode`` itself (which also raises what it
    raised: a type JSON has no form for, a lone surrogate)."""
    try:
        out = orjson.dumps(body, option=_ORJSON_EXACT)
    except TypeError:  # orjson.JSONEncodeError: a subclass, a big integer, a non-str key, deep nesting
        return encode(body)
    return encode(body) if _may_differ(out) else out


def env_route(url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None, aiohttp.BasicAuth | None]:
    """What aiohttp's ``trust_env`` looks up on every request, once: the environment's proxy for
    ``url`` (``HTTPS_PROXY``/``NO_PROXY``...) with its credentials, and ``url``'s netrc login.

    Blocking (reads files): call it off the event loop.
    """
    try:
        proxy, proxy_auth = get_env_proxy_for_url(url)
    except LookupError:
        proxy, proxy_auth = None, None
    login = None
    if url.host:
        try:
            login = basicauth_from_netrc(netrc_from_env(), url.host)
        except LookupError:
            login = None
    return proxy, proxy_auth, login


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Errors raised while serving a request (aiohttp's own included), answered in the API's JSON shape."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return api_error(exc.status, error_kind(exc.status), f"tokensaver proxy: {exc.reason}", kept)
    except ConnectionResetError:  # the client went away: nobody to answer
        raise
    except Exception:
        if request.writer.output_size > 0:  # an answer is under way: aiohttp closes the connection
            raise
        log.exception("%s %s failed in the proxy", request.method, request.path_qs[:200])
        # the upstream may have answered (and billed) already: a retry could pay twice
        return api_error(500, "api_error", "tokensaver proxy: internal error", {"x-should-retry": "false"})


class ApiErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering a request it cannot parse as HTTP with a JSON error."""

    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs the traceback; raises if under way
            text = "tokensaver proxy: internal error"
        else:
            # not aiohttp's log line: its message can quote the start of a header value (a key)
            if request.writer.output_size > 0:
                raise ConnectionError("an answer is under way: cannot send an error")
            kind = type(exc).__name__ if exc is not None else HTTPStatus(status).phrase
            log.warning("unparsable request from %s: %s", request.remote, kind)
            text = f"tokensaver proxy: the request is not valid HTTP ({kind})"
        response = api_error(status, error_kind(status), text)
        response.force_close()
        return response


class ApiErrorServer(web.Server):
    # aiohttp takes no handler class: build its own, then give it ours (same slots, one method more)
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = ApiErrorHandler
        return handler


def header_int(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


MODEL_CALL_DROP = frozenset({"accept-encoding", "accept"})  # a plugin's own call wants JSON
# an upstream answer that breaks off while it is read (cut short of its length, reset, timed out)
UPSTREAM_BROKE = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)


class UpstreamBroke(Exception):
    """Reading the upstream's answer failed: the upstream's fault, never our client's."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(type(exc).__name__)
        self.exc = exc


async def upstream_chunks(up: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The upstream's body as it arrives; a read that breaks off raises :class:`UpstreamBroke`.

    Told apart by where it happened, not by the exception's class: a reset while reading the
    upstream and a reset while writing to our client are both ConnectionResetErrors.
    """
    chunks = up.content.iter_any()
    while True:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except UPSTREAM_BROKE as exc:
            raise UpstreamBroke(exc) from exc
        yield chunk


async def upstream_body(up: aiohttp.ClientResponse) -> bytes:
    try:
        return await up.read()
    except UPSTREAM_BROKE as exc:
        raise UpstreamBroke(exc) from exc
