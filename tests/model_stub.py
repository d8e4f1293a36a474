"""A scripted model endpoint, standard library only, so it runs in any container with python3.

It answers OpenAI-style chat completions (``POST …/chat/completions``, SSE when asked to
stream: OpenCode), the OpenAI Responses API (``POST …/responses``, SSE: Codex) and Anthropic
Messages (``POST …/messages``, SSE: Claude Code). A *script* (JSON) drives the conversation:
each step is a tool call — the first of its ``tool`` names that the client offers, with
``args`` — and after the last step the model says ``final``. A Responses API tool offered
inside a namespace (Codex puts each MCP server's tools in one) is named
``<namespace>__<tool>``, e.g. ``mcp__taskbox__execute_in_task``. Requests outside the scripted
conversation (title generation, probes: no tools, or no ``marker`` in the first user message)
get a short text. Each request is printed to stdout as one JSON line (path, Host header,
offered tools, calls so far; never a header value), which a test reads from the container's
log.

The host-side scripted model (``tests/scripted_model.py``) takes its Responses API support
from here (:func:`responses_tools`, :func:`responses_calls`, :func:`responses_events` …), so
this file stays the one copy and remains a single self-contained script.

Run: ``python3 model_stub.py PORT`` with the script in the ``MODEL_STUB_SCRIPT`` environment
variable, e.g. ``{"marker": "TBX", "steps": [{"tool": ["bash", "Bash"], "args": {…}}],
"final": "done"}``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_LOCK = threading.Lock()


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text of each of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(content_text(c.get("text", c.get("content", ""))) if isinstance(c, dict) else str(c)
                         for c in content)
    return "" if content is None else str(content)


def _first_user(messages: list[dict[str, Any]]) -> str:
    return "\n".join(content_text(m.get("content")) for m in messages if m.get("role") == "user")


#: Responses API input items that are calls the model made (Codex sends them back each turn).
CALL_ITEMS = ("function_call", "custom_tool_call", "local_shell_call")
#: Responses API input items that are the results of those calls.
OUTPUT_ITEMS = ("function_call_output", "custom_tool_call_output", "local_shell_call_output")


def qualified(name: str, namespace: str | None) -> str:
    """A tool's name as the script sees it: ``<namespace>__<name>`` inside a namespace.

    Codex offers each MCP server's tools in a namespace (``mcp__taskbox``), so they read as
    ``mcp__taskbox__create_task_sandbox``, as Claude Code names them.
    """
    return f"{namespace}__{name}" if namespace else name


def responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A Responses API request's ``input`` as chat-like messages: user text, the calls so far
    (``tool_calls``, each the input item) and their results (``role: tool``)."""
    items = body.get("input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") in CALL_ITEMS:
            out.append({"role": "assistant", "tool_calls": [item]})
        elif item.get("type") in OUTPUT_ITEMS:
            out.append({"role": "tool", "content": content_text(item.get("output"))})
        elif item.get("role") == "user":
            out.append({"role": "user", "content": item.get("content")})
    return out


def responses_calls(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The calls made so far in a Responses API conversation: (qualified name, arguments)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for m in responses_messages(body):
        for item in m.get("tool_calls") or []:
            if item.get("type") == "function_call":
                args = json.loads(item.get("arguments") or "{}")
            else:
                args = {"input": item.get("input", item.get("action"))}
            out.append((qualified(str(item.get("name")), item.get("namespace")), args))
    return out


def _responses_functions(body: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    found: list[tuple[str | None, dict[str, Any]]] = []
    for t in body.get("tools") or []:
        if not isinstance(t, dict):
            continue
        if t.get("type") == "namespace":
            found += [(t.get("name"), tool) for tool in t.get("tools") or [] if isinstance(tool, dict)]
        else:
            found.append((None, t))
    return [(ns, tool) for ns, tool in found if tool.get("type") == "function" and tool.get("name")]


def responses_tools(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The function tools a Responses API request offers, by qualified name (see :func:`qualified`)."""
    return {qualified(tool["name"], ns): tool.get("parameters") or {} for ns, tool in _responses_functions(body)}


def responses_namespaces(body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Qualified name -> (namespace, name) of the tools offered inside a namespace."""
    return {qualified(tool["name"], ns): (ns, tool["name"]) for ns, tool in _responses_functions(body) if ns}


def _calls_so_far(messages: list[dict[str, Any]]) -> int:
    n = 0
    for m in messages:
        n += len(m.get("tool_calls") or [])
        content = m.get("content")
        if isinstance(content, list):
            n += sum(1 for b in content if isinstance(b, dict) and b.get("type") == "tool_use")
    return n


def decide(script: dict[str, Any], tools: dict[str, dict[str, Any]],
           messages: list[dict[str, Any]]) -> tuple[str, dict[str, Any]] | str:
    """The next action: ``(tool name, args)`` or the final text.

    ``tools`` maps each offered tool to its JSON schema; a step's ``args`` may name the
    arguments of several CLIs' tools at once, only those the chosen tool's schema has are sent.
    """
    if not tools or script.get("marker", "") not in _first_user(messages):
        return "ok"
    step = _calls_so_far(messages)
    steps = script.get("steps", [])
    if step >= len(steps):
        return str(script.get("final", "done"))
    wanted = steps[step]
    names = wanted["tool"] if isinstance(wanted["tool"], list) else [wanted["tool"]]
    name = next((n for n in names if n in tools), None)
    if name is None:
        return f"no tool among {names} is offered (offered: {sorted(tools)})"
    props = (tools[name] or {}).get("properties")
    args = wanted.get("args", {})
    return name, {k: v for k, v in args.items() if props is None or k in props}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: dict[str, Any] = {}
    counter = 0

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._record({})
        self._json({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self._record(body)
        path = self.path.split("?", 1)[0]
        if path.endswith("/count_tokens"):
            self._json({"input_tokens": 100})
        elif path.endswith("/chat/completions"):
            self._openai(body)
        elif path.endswith("/messages"):
            self._anthropic(body)
        elif path.endswith("/responses"):
            self._responses(body)
        else:
            self.send_error(404)

    def _record(self, body: dict[str, Any]) -> None:
        tools = [t.get("name") or (t.get("function") or {}).get("name") for t in body.get("tools") or []]
        messages = body.get("messages") or (responses_messages(body) if "input" in body else [])
        with _LOCK:
            print(json.dumps({"at": time.time(), "method": self.command, "path": self.path,
                              "host": self.headers.get("Host"), "tools": tools,
                              "calls": _calls_so_far(messages)}), flush=True)

    def _json(self, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, chunks: list[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(chunk.encode())
            self.wfile.flush()
        self.close_connection = True

    def _next(self) -> int:
        with _LOCK:
            Handler.counter += 1
            return Handler.counter

    def _openai(self, body: dict[str, Any]) -> None:
        tools = {(t.get("function") or {}).get("name"): (t.get("function") or {}).get("parameters") or {}
                 for t in body.get("tools") or []}
        action = decide(self.script, tools, body.get("messages") or [])
        n = self._next()
        base = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "scripted")}
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if isinstance(action, str):
            delta: dict[str, Any] = {"role": "assistant", "content": action}
            finish = "stop"
        else:
            delta = {"role": "assistant", "content": None, "tool_calls": [{
                "index": 0, "id": f"call_{n}", "type": "function",
                "function": {"name": action[0], "arguments": json.dumps(action[1])}}]}
            finish = "tool_calls"
        if not body.get("stream"):
            self._json({**base, "object": "chat.completion", "usage": usage,
                        "choices": [{"index": 0, "message": delta, "finish_reason": finish}]})
            return
        chunks = [{**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
                  {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "usage": usage}]
        self._sse([f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"])

    def _anthropic(self, body: dict[str, Any]) -> None:
        tools = {t.get("name"): t.get("input_schema") or {} for t in body.get("tools") or []}
        action = decide(self.script, tools, body.get("messages") or [])
        n = self._next()
        usage = {"input_tokens": 10, "output_tokens": 5}
        if isinstance(action, str):
            block: dict[str, Any] = {"type": "text", "text": ""}
            delta: dict[str, Any] = {"type": "text_delta", "text": action}
            full: dict[str, Any] = {"type": "text", "text": action}
            stop = "end_turn"
        else:
            block = {"type": "tool_use", "id": f"toolu_{n:04d}", "name": action[0], "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(action[1])}
            full = {**block, "input": action[1]}
            stop = "tool_use"
        message = {"id": f"msg_{n:04d}", "type": "message", "role": "assistant", "model": body.get("model", "m"),
                   "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            self._json({**message, "content": [full], "stop_reason": stop})
            return
        events = [("message_start", {"type": "message_start", "message": message}),
                  ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
                  ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                  ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": 5}}),
                  ("message_stop", {"type": "message_stop"})]
        self._sse([f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events])


    def _responses(self, body: dict[str, Any]) -> None:
        action = decide(self.script, responses_tools(body), responses_messages(body))
        self._sse(responses_events(action, self._next(), body.get("model", "scripted"), responses_namespaces(body)))


def responses_events(action: tuple[str, dict[str, Any]] | str, n: int, model: str,
                     namespaces: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """One Responses API turn as SSE: created, the output item (a function call or a message), completed.

    A call of a tool offered inside a namespace (``namespaces``, from :func:`responses_namespaces`)
    names its namespace, as the API does: Codex finds no tool by the bare or the qualified name.
    """
    if isinstance(action, str):
        item: dict[str, Any] = {"type": "message", "id": f"msg_{n}", "role": "assistant", "status": "completed",
                                "content": [{"type": "output_text", "text": action, "annotations": []}]}
        deltas = [{"type": "response.output_text.delta", "item_id": f"msg_{n}", "output_index": 0,
                   "content_index": 0, "delta": action}]
    else:
        namespace, name = (namespaces or {}).get(action[0], (None, action[0]))
        item = {"type": "function_call", "id": f"fc_{n}", "call_id": f"call_{n}", "name": name,
                "arguments": json.dumps(action[1]), "status": "completed"}
        if namespace:
            item["namespace"] = namespace
        deltas = []
    response = {"id": f"resp_{n}", "object": "response", "created_at": int(time.time()), "model": model,
                "status": "in_progress", "output": []}
    usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}
    events = [{"type": "response.created", "response": response},
              {"type": "response.output_item.added", "output_index": 0, "item": {**item, "status": "in_progress"}},
              *deltas,
              {"type": "response.output_item.done", "output_index": 0, "item": item},
              {"type": "response.completed", "response": {**response, "status": "completed", "output": [item],
                                                          "usage": usage}}]
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events]


def serve(port: int, script: dict[str, Any]) -> None:
    Handler.script = script
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 80, json.loads(os.environ.get("MODEL_STUB_SCRIPT") or "{}"))
