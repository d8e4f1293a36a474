"""`taskbox mcp` over stdio: answer the client's ``initialize`` at once, then relay to the SDK.

Importing the MCP SDK (its pydantic models) takes a second or more on a busy machine, and
agents wait only so long for their MCP servers (Claude Code about 2 s, for all of them at
once). So this module, which imports nothing heavy, reads the client's first message
itself: an ``initialize`` for a protocol version it knows is answered straight away with the
same result the SDK gives (a test compares the two for every version listed here), while the
SDK and the server load on the main thread. The SDK server then runs on a pair of pipes:
everything the client sends is relayed to it — the ``initialize`` too, so its session is
initialised as usual — and everything it writes is relayed back, except its own answer to
that ``initialize``, which the client already has. Any other first message (another protocol
version, a client that starts differently) just waits for the SDK.

The task service is not opened before the first tool call either (see ``mcp_server``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from . import __version__
from .mcp_instructions import INSTRUCTIONS

# Versions for which the SDK echoes the client's version (taskbox's pinned SDK); anything
# else goes through the SDK, which negotiates it itself.
FAST_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
CAPABILITIES = {"prompts": {"listChanged": False}, "resources": {"listChanged": False, "subscribe": False},
                "tools": {"listChanged": False}}
SERVER_INFO = {"name": "taskbox", "title": "taskbox", "version": __version__}
DIRECT_ENV = "TASKBOX_MCP_DIRECT"  # "1": no relay, the SDK reads stdin itself (for comparison)


def initialize_result(version: str) -> dict[str, Any]:
    """What the taskbox server answers to ``initialize`` with protocol ``version`` (one of FAST_VERSIONS)."""
    return {"capabilities": CAPABILITIES, "instructions": INSTRUCTIONS, "protocolVersion": version,
            "serverInfo": SERVER_INFO}


def fast_reply(line: bytes) -> tuple[bytes, Any] | None:
    """The reply to ``line`` if it is an ``initialize`` request this module may answer, and its id."""
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    if not isinstance(msg, dict) or msg.get("method") != "initialize" or "id" not in msg:
        return None
    params = msg.get("params")
    version = params.get("protocolVersion") if isinstance(params, dict) else None
    if version not in FAST_VERSIONS:
        return None
    reply = {"jsonrpc": "2.0", "id": msg["id"], "result": initialize_result(version)}
    return (json.dumps(reply, separators=(",", ":")) + "\n").encode(), msg["id"]


def _is_reply_to(line: bytes, request_id: Any) -> bool:
    try:
        msg = json.loads(line)
    except ValueError:
        return False
    return isinstance(msg, dict) and "method" not in msg and msg.get("id") == request_id and "result" in msg


def serve() -> None:
    """Serve MCP on stdin/stdout until the client closes stdin (see the module docstring)."""
    if os.environ.get(DIRECT_ENV) == "1":
        from .mcp_server import serve_stdio

        serve_stdio()
        return
    client_in = os.fdopen(os.dup(0), "rb", buffering=0)
    client_out = os.fdopen(os.dup(1), "wb", buffering=0)
    to_sdk_r, to_sdk_w = os.pipe()
    from_sdk_r, from_sdk_w = os.pipe()
    os.dup2(to_sdk_r, 0)  # the SDK's stdin and stdout are now the pipes
    os.dup2(from_sdk_w, 1)
    os.close(to_sdk_r)
    os.close(from_sdk_w)
    out_lock = threading.Lock()
    answered: list[Any] = []  # the id of the initialize answered here, while its SDK reply is due

    def send(data: bytes) -> None:
        with out_lock:
            client_out.write(data)

    def client_to_sdk() -> None:
        sdk = os.fdopen(to_sdk_w, "wb", buffering=0)
        first = True
        try:
            for line in client_in:
                if first:
                    first = False
                    fast = fast_reply(line)
                    if fast is not None:
                        answered.append(fast[1])
                        send(fast[0])
                sdk.write(line)
        except OSError:
            pass  # the SDK is gone: nothing left to relay to
        finally:
            try:
                sdk.close()  # the client closed stdin: the SDK sees end of input and stops
            except OSError:
                pass

    def sdk_to_client() -> None:
        with os.fdopen(from_sdk_r, "rb", buffering=0) as sdk:
            for line in sdk:
                if answered and _is_reply_to(line, answered[0]):
                    answered.clear()  # the client has this answer already
                    continue
                try:
                    send(line)
                except OSError:
                    return

    reader = threading.Thread(target=client_to_sdk, name="mcp-stdin-relay", daemon=True)
    writer = threading.Thread(target=sdk_to_client, name="mcp-stdout-relay", daemon=True)
    reader.start()
    writer.start()
    try:
        from .mcp_server import serve_stdio

        serve_stdio()
    finally:
        sys.stdout.flush()
        os.close(1)  # the SDK's end of the output pipe: the relay drains what is left, then ends
        writer.join(10)


def fast_path(argv: list[str]) -> bool:
    """Run `taskbox mcp` (stdio, no options) without loading the CLI; False for any other command."""
    if argv != ["mcp"]:
        return False
    from .errors import TaskboxError

    try:
        serve()
    except TaskboxError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        pass
    return True
