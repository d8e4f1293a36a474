"""A task's durable memory: the ``.task-memory/`` folder at the root of its workspace.

Layers (SPEC §3): ``state.json`` (fast-restore snapshot with a SHA-256 checksum, written
atomically), ``conversations.jsonl`` and ``executions.jsonl`` (append-only logs), and
``decisions.md`` (human-readable decision log). A damaged ``state.json`` is rebuilt from
the logs; the damaged copy is kept beside it and the recovery reported.

The folder lives in an agent-writable workspace, so every host-side access goes through
:mod:`taskbox.files` (confined, atomic, never following links). Writers serialise on a lock file kept under
``TASKBOX_HOME`` where the sandbox cannot touch it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import files
from .errors import InvalidInput, MemoryCorrupted

DIRNAME = ".task-memory"
STATE = "state.json"
CONVERSATIONS = "conversations.jsonl"
EXECUTIONS = "executions.jsonl"
DECISIONS = "decisions.md"
SCHEMA_VERSION = 1
LOG_ENTRIES = 20_000  # the most log entries parsed on the host at once (a rebuild uses the newest)
STATE_LIMIT = 16 << 20  # a larger state.json is damaged (the agent can write anything there)
TODO_STATUSES = ("pending", "in_progress", "completed", "cancelled")

_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "schema": int,
    "task_id": str,
    "status": str,
    "branch": str,
    "current_agent": (str, type(None)),
    "lock_mode": str,
    "todos": list,
    "metrics": dict,
    "current_checkpoint": (str, type(None)),
    "updated_at": (int, float),
}


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of ``state`` without its checksum fields."""
    body = {k: v for k, v in state.items() if k not in ("checksum", "checksum_algorithm")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def empty_metrics() -> dict[str, Any]:
    return {"sessions": 0, "iterations": 0, "tool_calls": 0, "agents_used": [], "checkpoints": 0}


def validate(state: Any) -> str | None:
    """Return why ``state`` is not a valid state.json document, or None if it is."""
    if not isinstance(state, dict):
        return "not a JSON object"
    for key, typ in _STATE_TYPES.items():
        if key not in state:
            return f"missing field {key!r}"
        if not isinstance(state[key], typ):
            return f"field {key!r} has the wrong type"
    if state.get("checksum") != checksum(state):
        return "checksum mismatch"
    for todo in state["todos"]:
        if not isinstance(todo, dict) or not isinstance(todo.get("id"), str):
            return "malformed todo"
    return None


def read_state(workspace: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Read and validate a workspace's ``state.json`` without writing anything: ``(state, None)`` or ``(None, why)``.

    Bounded and by descriptor (:mod:`taskbox.files`): the workspace is hostile. A valid
    document is only *well-formed*; its values are the agent's and checked by the caller.
    """
    try:
        raw = files.read_optional(workspace, f"{DIRNAME}/{STATE}", STATE_LIMIT)
    except InvalidInput as exc:
        return None, f"state.json cannot be read: {exc.message}"
    except OSError as exc:
        return None, f"state.json cannot be read: {exc}"
    if raw is None:
        return None, "state.json is missing"
    try:
        state = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"state.json is not valid JSON ({exc})"[:300]
    why = validate(state)
    return (state, None) if why is None else (None, why)


@dataclass
class Recovery:
    """What happened when a damaged ``state.json`` was rebuilt."""

    reason: str
    corrupted_copy: str | None
    rebuilt_from: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "corrupted_copy": self.corrupted_copy, "rebuilt_from": self.rebuilt_from}


class TaskMemory:
    """Reads and writes one task's ``.task-memory/`` folder."""

    def __init__(self, workspace: Path, lock_file: Path, redact: Callable[[Any], Any] | None = None) -> None:
        self.workspace = workspace
        self.lock_file = lock_file
        # Every write passes through it: secret values never reach a memory file (taskbox.secrets).
        self.redact = redact or (lambda value: value)

    # --- paths and low-level I/O ----------------------------------------------------------

    def exists(self, name: str) -> bool:
        return files.exists(self.workspace, f"{DIRNAME}/{name}")

    @contextmanager
    def locked(self) -> Iterator[None]:
        with files.locked(self.lock_file):
            yield

    def write_atomic(self, name: str, data: bytes) -> None:
        files.atomic_write(self.workspace, f"{DIRNAME}/{name}", data)

    def _append(self, name: str, entry: dict[str, Any]) -> None:
        line = json.dumps(self.redact(entry), sort_keys=True, ensure_ascii=False, default=str) + "\n"
        files.append(self.workspace, f"{DIRNAME}/{name}", line.encode())

    def _read_bytes(self, name: str) -> bytes | None:
        """A memory file, read whole; one larger than :data:`STATE_LIMIT` counts as damaged."""
        try:
            return files.read_optional(self.workspace, f"{DIRNAME}/{name}", STATE_LIMIT)
        except InvalidInput:
            return b"\0 (too large)"

    def _read_log(self, name: str) -> bytes:
        """The newest part of an append-only log: the agent can grow it without bound."""
        data = files.read_tail(self.workspace, f"{DIRNAME}/{name}", files.READ_LIMIT) or b""
        if len(data) >= files.READ_LIMIT:  # cut at the front: drop the partial first line
            data = data[data.find(b"\n") + 1:]
        return data

    def read_jsonl(self, name: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest entries of a log (at most ``limit``, and never more than LOG_ENTRIES)."""
        want = min(limit or LOG_ENTRIES, LOG_ENTRIES)
        out: list[dict[str, Any]] = []
        for line in reversed(self._read_log(name).splitlines()):
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a torn or hand-edited line never hides the rest of the log
            if isinstance(entry, dict):
                out.append(entry)
                if len(out) >= want:
                    break
        out.reverse()
        return out

    # --- state.json -----------------------------------------------------------------------

    def initial_state(self, task_id: str, status: str, branch: str, lock_mode: str) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "task_id": task_id,
            "status": status,
            "branch": branch,
            "current_agent": None,
            "lock_mode": lock_mode,
            "todos": [],
            "metrics": empty_metrics(),
            "current_checkpoint": None,
            "updated_at": time.time(),
        }

    def init(self, task_id: str, status: str, branch: str, lock_mode: str) -> dict[str, Any]:
        """Create the memory folder of a new task."""
        with self.locked():
            state = self.initial_state(task_id, status, branch, lock_mode)
            self._save(state)
            for name in (CONVERSATIONS, EXECUTIONS):
                if not self.exists(name):
                    self.write_atomic(name, b"")
            if not self.exists(DECISIONS):
                self.write_atomic(DECISIONS, f"# Decisions — {task_id}\n".encode())
            return state

    def _save(self, state: dict[str, Any]) -> None:
        state.update(self.redact({k: v for k, v in state.items() if k in ("todos", "current_agent")}))
        state["updated_at"] = time.time()
        state["checksum_algorithm"] = "sha256"
        state["checksum"] = checksum(state)
        self.write_atomic(STATE, json.dumps(state, indent=2, sort_keys=True, ensure_ascii=False).encode())

    def load(self, defaults: dict[str, Any] | None = None) -> tuple[dict[str, Any], Recovery | None]:
        """Load ``state.json``; rebuild it from the logs if it is missing or damaged."""
        with self.locked():
            return self._load(defaults)

    def _load(self, defaults: dict[str, Any] | None) -> tuple[dict[str, Any], Recovery | None]:
        raw = self._read_bytes(STATE)
        reason: str | None
        if raw is None:
            reason = "state.json is missing"
        else:
            try:
                state = json.loads(raw)
                reason = validate(state)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                reason = f"state.json is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
            if reason is None:
                return state, None
        if defaults is None:
            raise MemoryCorrupted(f"{reason} and no task record to rebuild it from")
        copy = None
        if raw is not None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            copy = f"{DIRNAME}/{STATE}.corrupted.{stamp}"
            self.write_atomic(f"{STATE}.corrupted.{stamp}", raw)
        state = self.rebuild(defaults)
        self._save(state)
        return state, Recovery(reason=reason, corrupted_copy=copy, rebuilt_from=[CONVERSATIONS, EXECUTIONS])

    def rebuild(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """Reconstruct the state from the append-only logs (todos, metrics, agents)."""
        state = self.initial_state(
            defaults["task_id"], defaults["status"], defaults["branch"], defaults["lock_mode"]
        )
        conversations = self.read_jsonl(CONVERSATIONS)
        executions = self.read_jsonl(EXECUTIONS)
        todos: dict[str, dict[str, Any]] = {}
        metrics = empty_metrics()
        agents: list[str] = []
        for entry in conversations:
            kind = entry.get("kind")
            agent = entry.get("agent")
            if agent and agent not in agents:
                agents.append(agent)
            if kind == "todo" and isinstance(entry.get("todo"), dict):
                todo = entry["todo"]
                if todo.get("deleted"):
                    todos.pop(str(todo.get("id")), None)
                else:
                    todos[str(todo.get("id"))] = {k: v for k, v in todo.items() if k != "deleted"}
            elif kind == "attach":
                metrics["sessions"] += 1
                state["current_agent"] = agent
            elif kind == "detach":
                metrics["iterations"] += 1
                state["current_agent"] = None
            elif kind == "tool_call" and entry.get("tool") != "execute_in_task":  # as service.record_tool_call
                metrics["tool_calls"] += 1
            elif kind == "checkpoint":
                metrics["checkpoints"] += 1
                state["current_checkpoint"] = entry.get("checkpoint_id")
        for entry in executions:
            metrics["tool_calls"] += 1
            agent = entry.get("agent")
            if agent and agent not in agents:
                agents.append(agent)
        metrics["agents_used"] = agents
        state["todos"] = list(todos.values())
        state["metrics"] = metrics
        return state

    def update(
        self, defaults: dict[str, Any], fn: Callable[[dict[str, Any]], Any]
    ) -> tuple[dict[str, Any], Recovery | None]:
        """Load, change with ``fn`` and save the state under the memory lock."""
        with self.locked():
            state, recovery = self._load(defaults)
            fn(state)
            self._save(state)
            return state, recovery

    # --- logs -----------------------------------------------------------------------------

    def log_conversation(self, entry: dict[str, Any]) -> None:
        with self.locked():
            self._append(CONVERSATIONS, {"ts": time.time(), **entry})

    def log_execution(self, entry: dict[str, Any]) -> None:
        with self.locked():
            self._append(EXECUTIONS, {"ts": time.time(), **entry})

    def conversations(self, limit: int | None = None) -> list[dict[str, Any]]:
        return self.read_jsonl(CONVERSATIONS, limit)

    def executions(self, limit: int | None = None) -> list[dict[str, Any]]:
        return self.read_jsonl(EXECUTIONS, limit)

    def add_decision(
        self,
        agent: str,
        context: str,
        decision: str,
        rationale: str = "",
        alternatives: str = "",
    ) -> dict[str, Any]:
        entry = self.redact({
            "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "agent": agent,
            "context": context,
            "decision": decision,
            "rationale": rationale,
            "alternatives": alternatives,
        })
        agent, context, decision = entry["agent"], entry["context"], entry["decision"]
        rationale, alternatives = entry["rationale"], entry["alternatives"]
        block = (
            f"\n## {entry['time']} — {agent}\n\n"
            f"- **Context:** {context}\n- **Decision:** {decision}\n"
            + (f"- **Rationale:** {rationale}\n" if rationale else "")
            + (f"- **Alternatives:** {alternatives}\n" if alternatives else "")
        )
        with self.locked():
            files.append(self.workspace, f"{DIRNAME}/{DECISIONS}", block.encode())
        return entry

    def decisions(self) -> list[dict[str, str]]:
        """Parse ``decisions.md`` back into entries."""
        text = self._read_log(DECISIONS).decode(errors="replace")
        out: list[dict[str, str]] = []
        for block in text.split("\n## ")[1:]:
            head, _, body = block.partition("\n")
            when, _, agent = head.partition(" — ")
            entry = {"time": when.strip(), "agent": agent.strip()}
            for line in body.splitlines():
                if line.startswith("- **") and ":** " in line:
                    key, _, value = line[4:].partition(":** ")
                    entry[key.lower()] = value
            out.append(entry)
        return out
