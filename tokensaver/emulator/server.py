"""The emulator over HTTP: a threaded HTTP/1.1 server handing every request to an app's ``handle``.

JSON answers get a ``content-length``; SSE answers (a list of chunks) go out chunked, flushed per
chunk. The app is anything with :meth:`~tokensaver.emulator.Emulator.handle`.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol


class App(Protocol):
    """What the server serves: one HTTP request in, ``(status, headers, body or body chunks)`` out."""

    def handle(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes | list[bytes]]: ...


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: App


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # small responses would otherwise wait ~40 ms each for Nagle + delayed ACK
    disable_nagle_algorithm = True
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, headers, payload = self.server.app.handle(self.command, self.path, dict(self.headers), raw)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if isinstance(payload, bytes):
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:
            self.send_header("transfer-encoding", "chunked")
            self.send_header("cache-control", "no-cache")
            self.end_headers()
            for chunk in payload:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_POST = _serve
    do_GET = _serve
    do_PUT = _serve
    do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_server(app: App, host: str, port: int) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve ``app`` on ``host:port`` (0: a free port) from a daemon thread."""
    server = _Server((host, port), _Handler)
    server.app = app
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.02},
        name="tokensaver-emulator",
        daemon=True,
    )
    thread.start()
    return server, thread


def stop_server(server: ThreadingHTTPServer, thread: threading.Thread | None) -> None:
    """Stop serving and close the socket (waits up to 5 s for the thread)."""
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(timeout=5)
