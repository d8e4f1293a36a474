"""A scripted model endpoint on loopback for driving real agent CLIs in tests.

It speaks OpenAI-style chat completions (``POST /v1/chat/completions``, streamed as SSE, for
OpenCode's custom provider), Anthropic Messages (``POST /v1/messages``, streamed as SSE,
for Claude Code with ``ANTHROPIC_BASE_URL``) and the OpenAI Responses API (``POST
/v1/responses``, streamed as SSE, for Codex with a custom provider; the parsing and the
events are tests/model_stub.py's, which the sandbox tests serve in a container). A *script* decides each turn: given the tools
the client offers and the results of the calls made so far in the conversation, it returns
the next tool call or a final text. Requests that are not the scripted conversation (title
generation, quota probes: no tools, or no marker in the first user message) get a short text.
Every request is recorded, so a test can check what the client offered and sent back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .model_stub import (
    content_text,
    responses_calls,
    responses_events,
    responses_messages,
    responses_namespaces,
    responses_tools,
)

MARKER = "TASKBOX-SCRIPT"


@dataclass
class Turn:
    """What the script sees: the offered tools (name -> JSON schema) and earlier results, in order."""

    tools: dict[str, dict[str, Any]]
    results: list[str]
    calls: list[tuple[str, dict[str, Any]]]


@dataclass
class Call:
    name: str
    args: dict[str, Any]


Step = Callable[[Turn], "Call | str"]  # a tool call, or the final text


@dataclass
class Script:
    """Steps run in order, one per model turn; ``plan`` may add steps once the tools are known."""

    steps: list[Step]
    plan: Callable[[Turn], list[Step]] | None = None
    planned: bool = False
    log: list[dict[str, Any]] = field(default_factory=list)

    def next(self, turn: Turn) -> Call | str:
        if self.plan is not None and not self.planned:
            self.steps = self.steps + self.plan(turn)
            self.planned = True
        i = len(turn.calls)
        if i >= len(self.steps):
            return "done"
        return self.steps[i](turn)


def _openai_turn(body: dict[str, Any]) -> tuple[Turn, str]:
    tools = {t["function"]["name"]: t["function"].get("parameters") or {} for t in body.get("tools") or []}
    calls, results, first = [], [], ""
    for m in body.get("messages", []):
        if m.get("role") == "user" and not first:
            first = content_text(m.get("content"))
        for tc in m.get("tool_calls") or []:
            calls.append((tc["function"]["name"], json.loads(tc["function"].get("arguments") or "{}")))
        if m.get("role") == "tool":
            results.append(content_text(m.get("content")))
    return Turn(tools, results, calls), first


def _anthropic_turn(body: dict[str, Any]) -> tuple[Turn, str]:
    tools = {t["name"]: t.get("input_schema") or {} for t in body.get("tools") or [] if "name" in t}
    calls, results, first = [], [], ""
    for m in body.get("messages", []):
        content = m.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        for b in blocks:
            if not isinstance(b, dict):
                continue
            if m.get("role") == "user" and b.get("type") == "text" and MARKER in (b.get("text") or ""):
                first = first or b["text"]
            if b.get("type") == "tool_use":
                calls.append((b["name"], b.get("input") or {}))
            if b.get("type") == "tool_result":
                results.append(content_text(b.get("content")) + ("\n[is_error]" if b.get("is_error") else ""))
    return Turn(tools, results, calls), first


def _responses_turn(body: dict[str, Any]) -> tuple[Turn, str]:
    messages = responses_messages(body)
    first = "\n".join(content_text(m.get("content")) for m in messages if m.get("role") == "user")
    results = [str(m.get("content")) for m in messages if m.get("role") == "tool"]
    return Turn(responses_tools(body), results, responses_calls(body)), first


class ScriptedModel:
    """The loopback server; ``url`` is its base (``http://127.0.0.1:PORT``)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.counter = 0
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # model listings
                self._json({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                path = self.path.split("?", 1)[0]
                with model.lock:
                    model.requests.append({"path": path, "body": body, "at": time.time()})
                if path.endswith("/count_tokens"):
                    self._json({"input_tokens": 100})
                elif path.endswith("/chat/completions"):
                    model._openai(self, body)
                elif path.endswith("/messages"):
                    model._anthropic(self, body)
                elif path.endswith("/responses"):
                    model._responses(self, body)
                else:
                    self.send_error(404)

            def _json(self, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ScriptedModel:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _decide(self, turn: Turn, first: str) -> Call | str:
        if not turn.tools or MARKER not in first:
            return "ok"
        with self.lock:
            try:
                action = self.script.next(turn)
            except Exception as exc:  # noqa: BLE001 - end the conversation; the test reads the log
                action = f"script error: {type(exc).__name__}: {exc}"
            self.script.log.append({"calls": len(turn.calls), "action": action if isinstance(action, str)
                                    else {"name": action.name, "args": action.args}})
            self.counter += 1
            return action

    def _sse(self, handler: BaseHTTPRequestHandler, chunks: list[str]) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        for chunk in chunks:
            handler.wfile.write(chunk.encode())
            handler.wfile.flush()
        handler.close_connection = True

    def _openai(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        turn, first = _openai_turn(body)
        action = self._decide(turn, first)
        n = self.counter
        base = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "scripted")}
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if isinstance(action, str):
            delta: dict[str, Any] = {"role": "assistant", "content": action}
            finish = "stop"
        else:
            delta = {"role": "assistant", "content": None, "tool_calls": [{
                "index": 0, "id": f"call_{n}", "type": "function",
                "function": {"name": action.name, "arguments": json.dumps(action.args)}}]}
            finish = "tool_calls"
        chunks = [{**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
                  {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "usage": usage}]
        if not body.get("stream"):
            message = {k: v for k, v in delta.items() if k != "index"}
            handler._json({"id": base["id"], "object": "chat.completion", "created": base["created"],  # type: ignore[attr-defined]
                           "model": base["model"], "usage": usage,
                           "choices": [{"index": 0, "message": message, "finish_reason": finish}]})
            return
        self._sse(handler, [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"])

    def _responses(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        turn, first = _responses_turn(body)
        action = self._decide(turn, first)
        act = action if isinstance(action, str) else (action.name, action.args)
        self._sse(handler, responses_events(act, self.counter, body.get("model", "scripted"),
                                            responses_namespaces(body)))

    def _anthropic(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        turn, first = _anthropic_turn(body)
        action = self._decide(turn, first)
        n = self.counter
        usage = {"input_tokens": 10, "output_tokens": 5}
        if isinstance(action, str):
            block: dict[str, Any] = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": action}
            full: dict[str, Any] = {"type": "text", "text": action}
            stop = "end_turn"
        else:
            block = {"type": "tool_use", "id": f"toolu_{n:04d}", "name": action.name, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(action.args)}
            full = {**block, "input": action.args}
            stop = "tool_use"
        message = {"id": f"msg_{n:04d}", "type": "message", "role": "assistant", "model": body.get("model", "m"),
                   "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            handler._json({**message, "content": [full], "stop_reason": stop})  # type: ignore[attr-defined]
            return
        events = [("message_start", {"type": "message_start", "message": message}),
                  ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
                  ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                  ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": 5}}),
                  ("message_stop", {"type": "message_stop"})]
        self._sse(handler, [f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events])


def sample_args(schema: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
    """Arguments that satisfy ``schema``'s required properties (``hints`` by property name first)."""
    props = schema.get("properties") or {}
    out: dict[str, Any] = {}
    for name in schema.get("required") or []:
        spec = props.get(name) or {}
        if name in hints:
            out[name] = hints[name]
        elif "enum" in spec:
            out[name] = spec["enum"][0]
        else:
            kind = spec.get("type")
            kind = kind[0] if isinstance(kind, list) else kind
            out[name] = {"string": "x", "integer": 1, "number": 1, "boolean": False, "array": [],
                         "object": {}}.get(kind or "string", "x")
    return out
