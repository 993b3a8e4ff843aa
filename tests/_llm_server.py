"""A local HTTP server that speaks the OpenAI Chat Completions and Anthropic Messages protocols.

The real ``openai`` and ``anthropic`` SDKs are pointed at it through ``base_url``, so the
tests see exactly what the SDKs send and the SDKs parse exactly what a provider would send
back (JSON bodies, and SSE streams with the events each protocol defines).

It runs in a background thread (``http.server`` with HTTP/1.1 keep-alive; streams use
chunked transfer encoding), records every request, and answers from a per-test script::

    with LLMServer() as server:
        server.script(Answer("hello"), Answer(status=429, headers={"retry-after": "0.1"}))
        OpenAI(base_url=server.openai_url, api_key="k")  # .../v1
        Anthropic(base_url=server.anthropic_url, api_key="k")

When the script is empty, ``server.default`` answers (by default an echo of the last user
message). ``server.hold()`` keeps requests waiting until ``server.release()``, so a test can
observe how many are in flight at once without sleeping.

``server.batches`` (``_llm_batch_server``) adds OpenAI's Files + Batches and Anthropic's
Message Batches endpoints, whose jobs end when the test says so.
"""

from __future__ import annotations

import http.server
import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import attrs

__all__ = ["Answer", "LLMServer", "Request"]


@attrs.frozen
class Request:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # the parsed JSON body

    @property
    def protocol(self) -> str:
        return "anthropic" if self.path.endswith("/messages") else "openai"

    @property
    def streamed(self) -> bool:
        return bool(isinstance(self.body, dict) and self.body.get("stream"))

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.body.get("messages", [])):
            if message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                return content
            texts = [b.get("text", "") for b in content if b.get("type") == "text"]
            if texts:
                return " ".join(texts)
        return ""


@attrs.frozen
class Answer:
    """What the server sends back for one request.

    ``tool_calls`` are ``(name, arguments)`` pairs the model asks for; ``data`` is a
    structured answer (OpenAI: the JSON text of the message; Anthropic: the input of the
    one tool the request forces). A ``status`` other than 200 sends a protocol error body
    with ``error`` as its message. ``drop=True`` closes the connection without answering.
    """

    text: str = "ok"
    tool_calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    data: Any = None
    status: int = 200
    error: str = "something went wrong"
    headers: dict[str, str] = attrs.field(factory=dict)
    delay: float = 0.0
    input_tokens: int = 11
    output_tokens: int | None = None  # default: one per word of the text
    chunk: int = 3  # characters per streamed text delta
    drop: bool = False


def echo(request: Request) -> Answer:
    return Answer(f"echo: {request.last_user_text}")


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class LLMServer:
    """A scripted fake of both providers' HTTP APIs, for the real SDKs to talk to."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.default: Callable[[Request], Answer] = echo
        self._script: deque[Answer] = deque()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._gate = threading.Event()
        self._gate.set()
        self.in_flight = 0
        self.max_in_flight = 0
        self._ids = itertools.count(1)
        from _llm_batch_server import BatchJobs

        self.batches = BatchJobs(self)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # --- lifetime -------------------------------------------------------------------------

    def start(self) -> LLMServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_url(self) -> str:
        return self.url

    # --- scripting ------------------------------------------------------------------------

    def script(self, *answers: Answer) -> None:
        """Answer the next requests with *answers*, in order."""
        with self._lock:
            self._script.extend(answers)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._script.clear()
            self.default = echo
            self.max_in_flight = 0
        self.batches.reset()

    def hold(self) -> None:
        """Keep every request waiting (after it is recorded) until :meth:`release`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def wait_for(self, predicate: Callable[[LLMServer], bool], timeout: float = 10.0) -> None:
        """Block this thread until *predicate(server)* holds (a test runs it in a thread)."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError("the LLM server never reached the awaited state")

    def count(self, protocol: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if protocol is None or r.protocol == protocol)

    # --- called by the handler threads -----------------------------------------------------

    def _receive(self, request: Request) -> Answer:
        with self._changed:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            answer = self._script.popleft() if self._script else None
            self._changed.notify_all()
        return answer if answer is not None else self.default(request)

    def _done(self) -> None:
        with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def _next_id(self) -> int:
        return next(self._ids)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: LLMServer


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm on, the second
    # waits for the client's delayed ACK (40 ms a response).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        self.server.owner.batches.get(self, self.path.split("?")[0])

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        path = self.path.split("?")[0]
        if owner.batches.handles(path):
            owner.batches.post(self, path, raw)
            return
        body = json.loads(raw) if raw else None
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = Request("POST", self.path.split("?")[0], headers, body)
        answer = owner._receive(request)
        try:
            owner._gate.wait()
            if answer.delay:
                time.sleep(answer.delay)
            if answer.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if answer.status != 200:
                self._send_error(request, answer)
            elif request.protocol == "anthropic":
                _AnthropicReply(self, request, answer, owner._next_id()).send()
            else:
                _OpenAIReply(self, request, answer, owner._next_id()).send()
        finally:
            owner._done()

    def _send_error(self, request: Request, answer: Answer) -> None:
        kind = _ERROR_TYPES.get(answer.status, "api_error")
        if request.protocol == "anthropic":
            error = {"type": kind, "message": answer.error}
            body: dict[str, Any] = {"type": "error", "error": error}
        else:
            body = {"error": {"message": answer.error, "type": kind, "code": None, "param": None}}
        self.send_json(answer.status, body, answer.headers)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def send_event(self, data: Any, event: str | None = None) -> None:
        text = "" if event is None else f"event: {event}\n"
        text += f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
        payload = text.encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _pieces(text: str, size: int) -> Iterator[str]:
    for i in range(0, len(text), max(1, size)):
        yield text[i : i + size]


def _output_tokens(answer: Answer, text: str) -> int:
    return answer.output_tokens if answer.output_tokens is not None else len(text.split())


def _forced_tool(request: Request) -> str | None:
    choice = request.body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool":
        return str(choice["name"])
    return None


@attrs.define
class _OpenAIReply:
    handler: _Handler
    request: Request
    answer: Answer
    n: int

    @property
    def text(self) -> str:
        if self.answer.data is not None:
            return json.dumps(self.answer.data)
        return "" if self.answer.tool_calls else self.answer.text

    def calls(self) -> list[dict[str, Any]]:
        return [
            {
                "id": f"call_{self.n}_{i}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)},
            }
            for i, (name, args) in enumerate(self.answer.tool_calls)
        ]

    def usage(self) -> dict[str, int]:
        out = _output_tokens(self.answer, self.text)
        inp = self.answer.input_tokens
        return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}

    def send(self) -> None:
        if self.request.streamed:
            self.stream()
            return
        self.handler.send_json(200, self.body())

    def body(self) -> dict[str, Any]:
        """The chat completion, as a non-streamed answer (or a batch job's line) holds it."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.answer.tool_calls:
            message["tool_calls"] = self.calls()
        body = {
            "id": f"chatcmpl-{self.n}",
            "object": "chat.completion",
            "created": 1700000000,
            "model": self.request.body.get("model", "?"),
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish()}],
            "usage": self.usage(),
        }
        return body

    def finish(self) -> str:
        return "tool_calls" if self.answer.tool_calls else "stop"

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{self.n}",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": self.request.body.get("model", "?"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def stream(self) -> None:
        h = self.handler
        h.start_stream()
        h.send_event(self.chunk({"role": "assistant", "content": ""}))
        for piece in _pieces(self.text, self.answer.chunk):
            h.send_event(self.chunk({"content": piece}))
        for i, call in enumerate(self.calls()):
            head = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            h.send_event(self.chunk({"tool_calls": [head]}))
            for piece in _pieces(call["function"]["arguments"], 5):
                h.send_event(
                    self.chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
                )
        h.send_event(self.chunk({}, self.finish()))
        options = self.request.body.get("stream_options") or {}
        if options.get("include_usage"):
            last = self.chunk({})
            last["choices"] = []
            last["usage"] = self.usage()
            h.send_event(last)
        h.send_event("[DONE]")
        h.end_stream()


@attrs.define
class _AnthropicReply:
    handler: _Handler
    request: Request
    answer: Answer
    n: int

    def blocks(self) -> list[dict[str, Any]]:
        forced = _forced_tool(self.request)
        if self.answer.data is not None and forced is not None:
            return [
                {
                    "type": "tool_use",
                    "id": f"toolu_{self.n}_0",
                    "name": forced,
                    "input": self.answer.data,
                }
            ]
        blocks: list[dict[str, Any]] = []
        if self.answer.text and not self.answer.tool_calls:
            blocks.append({"type": "text", "text": self.answer.text})
        for i, (name, args) in enumerate(self.answer.tool_calls):
            blocks.append(
                {"type": "tool_use", "id": f"toolu_{self.n}_{i}", "name": name, "input": args}
            )
        return blocks

    def stop_reason(self, blocks: list[dict[str, Any]]) -> str:
        return "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"

    def out_tokens(self, blocks: list[dict[str, Any]]) -> int:
        text = " ".join(b.get("text", "") or json.dumps(b.get("input")) for b in blocks)
        return _output_tokens(self.answer, text)

    def message(self, blocks: list[dict[str, Any]], output_tokens: int) -> dict[str, Any]:
        return {
            "id": f"msg_{self.n}",
            "type": "message",
            "role": "assistant",
            "model": self.request.body.get("model", "?"),
            "content": blocks,
            "stop_reason": self.stop_reason(blocks) if blocks else None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.answer.input_tokens, "output_tokens": output_tokens},
        }

    def send(self) -> None:
        blocks = self.blocks()
        if self.request.streamed:
            self.stream(blocks)
            return
        self.handler.send_json(200, self.body())

    def body(self) -> dict[str, Any]:
        """The message, as a non-streamed answer (or a batch job's result) holds it."""
        blocks = self.blocks()
        return self.message(blocks, self.out_tokens(blocks))

    def stream(self, blocks: list[dict[str, Any]]) -> None:
        h = self.handler
        h.start_stream()
        start = self.message([], 1)
        start["stop_reason"] = None
        h.send_event({"type": "message_start", "message": start}, "message_start")
        h.send_event({"type": "ping"}, "ping")
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                first = {"type": "text", "text": ""}
                deltas = [
                    {"type": "text_delta", "text": p}
                    for p in _pieces(block["text"], self.answer.chunk)
                ]
            else:
                first = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                deltas = [
                    {"type": "input_json_delta", "partial_json": p}
                    for p in _pieces(json.dumps(block["input"]), 5)
                ]
            h.send_event(
                {"type": "content_block_start", "index": index, "content_block": first},
                "content_block_start",
            )
            for delta in deltas:
                h.send_event(
                    {"type": "content_block_delta", "index": index, "delta": delta},
                    "content_block_delta",
                )
            h.send_event({"type": "content_block_stop", "index": index}, "content_block_stop")
        h.send_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason(blocks), "stop_sequence": None},
                "usage": {"output_tokens": self.out_tokens(blocks)},
            },
            "message_delta",
        )
        h.send_event({"type": "message_stop"}, "message_stop")
        h.end_stream()
