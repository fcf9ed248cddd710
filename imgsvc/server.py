"""The HTTP server: uvicorn with httptools, a limit on the request line and headers, and the
errors the server answers itself (unparseable request, headers too large) in the service's JSON
error shape rather than plain text."""

from __future__ import annotations

import json
import secrets
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from imgsvc.routes.errors import error_body_for

STATUS_LINES = {
    400: b"HTTP/1.1 400 Bad Request\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}


class HeadersTooLarge(Exception):
    """Raised inside the parser's callbacks; the parser reports it as a parse error."""


class LimitedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol that counts the bytes of each request's line and headers, also while
    they arrive in pieces, and refuses a request past `max_header_bytes` with a 431."""

    max_header_bytes = 32 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # line and headers of the request being parsed
        self._unparsed_head = 0  # bytes received while a request's head is still incomplete
        self._in_head = True
        self._too_large = False

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        self._unparsed_head = self._unparsed_head + len(data) if self._in_head else 0
        if self._unparsed_head > self.max_header_bytes:
            self._send_error(431, "headers_too_large", self._too_large_message())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._unparsed_head = 0
        super().on_headers_complete()

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_header_bytes:
            self._too_large = True
            raise HeadersTooLarge

    def _too_large_message(self) -> str:
        return f"the request line and headers pass {self.max_header_bytes} bytes"

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._send_error(431, "headers_too_large", self._too_large_message())
        else:
            self._send_error(400, "bad_request", "the request is not valid HTTP/1.1")

    def _send_error(self, status: int, code: str, message: str) -> None:
        rid = f"req_{secrets.token_hex(12)}"
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        body = json.dumps(error_body_for(path, code, message, rid)).encode()
        head = [STATUS_LINES[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"x-request-id: " + rid.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def protocol_with_limit(max_header_bytes: int) -> type[LimitedHttpProtocol]:
    return type("HttpProtocol", (LimitedHttpProtocol,), {"max_header_bytes": max_header_bytes})


def serve(app: Any, *, host: str, port: int, max_header_bytes: int, **options: Any) -> None:
    """Run `app` on host:port until stopped (uvicorn.run with the limited protocol)."""
    uvicorn.run(app, host=host, port=port, http=protocol_with_limit(max_header_bytes), **options)
