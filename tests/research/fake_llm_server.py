"""A stand-in LLM API: a real HTTP server on 127.0.0.1 speaking one API's wire format.

``FakeLLMServer("openai")`` answers ``POST /v1/chat/completions`` the way OpenAI-compatible servers
do; ``FakeLLMServer("anthropic")`` answers ``POST /v1/messages`` the way Anthropic's API does. It
checks requests as the real services would (method, path, JSON body, required fields, the key's
header, ``anthropic-version``) and refuses streaming, so a proposer that gets an answer from it
spoke the protocol. Tests script its replies -- success, error statuses with ``Retry-After``,
truncated bodies, malformed JSON, delays -- and read back every request it received.

It is a named stand-in for the network service, not a mock of our code: the proposer under test
runs unchanged, over real sockets, through httpx.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Api = Literal["openai", "anthropic"]
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


@dataclass
class Received:
    """One request as the server saw it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() on arrival

    @property
    def prompt(self) -> str:
        """Every message's text, system included, as one string."""
        if not isinstance(self.body, dict):
            return ""
        parts = [self.body.get("system") or ""]
        for message in self.body.get("messages") or []:
            content = message.get("content")
            parts.append(content if isinstance(content, str) else json.dumps(content))
        return "\n".join(parts)


@dataclass
class Reply:
    """What the server does with one request. Build with the class methods."""

    kind: Literal["text", "error", "raw"]
    status: int = 200
    text: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""
    claimed_length: int | None = None  # a Content-Length larger than the body: truncated
    delay_s: float = 0.0
    usage: tuple[int, int] = (1200, 300)
    finish: str = ""

    @classmethod
    def answer(cls, text: str, *, usage: tuple[int, int] = (1200, 300), delay_s: float = 0.0,
               finish: str = "") -> Reply:
        return cls("text", text=text, usage=usage, delay_s=delay_s, finish=finish)

    @classmethod
    def error(cls, status: int, message: str = "", *, retry_after: str | None = None) -> Reply:
        """An error in the API's own error format; ``{key}`` in the message is replaced by the key
        the request carried (as real services echo a masked key back)."""
        headers = {"retry-after": retry_after} if retry_after is not None else {}
        return cls("error", status=status, text=message or f"error {status}", headers=headers)

    @classmethod
    def truncated(cls, text: str) -> Reply:
        """A 200 whose body stops half-way: Content-Length promises more, then the socket closes."""
        return cls("text", text=text, claimed_length=-1)

    @classmethod
    def bytes_(cls, raw: bytes, status: int = 200, content_type: str = "application/json") -> Reply:
        return cls("raw", status=status, raw=raw, headers={"content-type": content_type})


Responder = Callable[[Received], str]


class FakeLLMServer:
    """``with FakeLLMServer("openai", key="sk-...") as server: ... server.base_url ...``

    Replies come from ``script`` (consumed in order) and, once it is empty, from ``responder``,
    which turns a request into the answer's text.
    """

    def __init__(self, api: Api, *, key: str | None = None, model: str = "fake-model",
                 responder: Responder | None = None) -> None:
        self.api = api
        self.key = key
        self.model = model
        self.responder = responder
        self.script: list[Reply] = []
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        # A short poll interval: shutdown() waits for the loop to notice, 0.5 s by default.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """What goes in ``base_url``: OpenAI clients append ``/chat/completions`` to a ``/v1`` URL,
        Anthropic clients append ``/v1/messages`` to the host."""
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.api == "openai" else root

    def __enter__(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def then(self, *replies: Reply) -> FakeLLMServer:
        with self._lock:
            self.script.extend(replies)
        return self

    # -- the wire format -------------------------------------------------------------------------
    def success_body(self, reply: Reply, model: str) -> dict[str, Any]:
        tokens_in, tokens_out = reply.usage
        if self.api == "openai":
            return {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish or "stop"}],
                "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                          "total_tokens": tokens_in + tokens_out},
            }
        return {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": reply.text}],
            "stop_reason": reply.finish or "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
                529: "overloaded_error"}.get(status, "api_error")
        if self.api == "openai":
            return {"error": {"message": message, "type": kind, "code": None}}
        return {"type": "error", "error": {"type": kind, "message": message}}

    def check(self, request: Received) -> tuple[int, str] | None:
        """What the real service would refuse, as (status, message); None if the request is good."""
        if request.method != "POST" or request.path != PATHS[self.api]:
            return 404, f"no route for {request.method} {request.path}"
        body = request.body
        if not isinstance(body, dict):
            return 400, "the body must be a JSON object"
        if body.get("stream"):
            return 400, "this server does not stream"
        if not body.get("model") or not isinstance(body.get("messages"), list) or not body["messages"]:
            return 400, "model and messages are required"
        sent = self.sent_key(request)
        if self.key is not None and sent != self.key:
            return 401, "Incorrect API key provided"
        if self.api == "anthropic":
            if "anthropic-version" not in request.headers:
                return 400, "anthropic-version header is required"
            if not isinstance(body.get("max_tokens"), int):
                return 400, "max_tokens is required"
            if any(m.get("role") == "system" for m in body["messages"]):
                return 400, "system goes in the top-level 'system' field"
        return None

    def sent_key(self, request: Received) -> str:
        if self.api == "openai":
            return request.headers.get("authorization", "").removeprefix("Bearer ")
        return request.headers.get("x-api-key", "")

    def _next(self, request: Received) -> Reply:
        with self._lock:
            if self.script:
                return self.script.pop(0)
        if self.responder is None:
            return Reply.error(500, "the fake server has no reply scripted")
        return Reply.answer(self.responder(request))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a truncated body ends it

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                request = Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                   body, time.monotonic())
                with server._lock:
                    server.requests.append(request)
                refused = server.check(request)
                if refused is not None:
                    self._json(refused[0], server.error_body(*refused))
                    return
                reply = server._next(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.kind == "error":
                    message = reply.text.replace("{key}", server.sent_key(request))
                    self._json(reply.status, server.error_body(reply.status, message), reply.headers)
                elif reply.kind == "raw":
                    self._send(reply.status, reply.raw, reply.headers)
                else:
                    data = json.dumps(server.success_body(reply, request.body["model"])).encode()
                    if reply.claimed_length is not None:
                        self._send(200, data[: len(data) // 2], {"content-type": "application/json"},
                                   claimed=len(data))
                    else:
                        self._send(200, data, {"content-type": "application/json"})

            def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(body).encode(), {"content-type": "application/json",
                                                               **(headers or {})})

            def _send(self, status: int, data: bytes, headers: dict[str, str],
                      claimed: int | None = None) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(claimed if claimed is not None else len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

        return Handler
