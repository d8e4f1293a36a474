"""Ultrawork plans and the scheduler's decisions (SPEC §7).

An engine: it parses and validates a plan (TOML), and given the sub-tasks' recorded
statuses says what may start now, what is blocked and what is ready to merge. It runs
nothing; :class:`~taskbox.service.TaskService` acts on its decisions.

Plan file::

    parallel = 4                 # optional; default from settings
    agent = "shell"              # shell | opencode | claude-code | codex
    timeout = "30m"              # optional per sub-task

    [[subtask]]
    id = "api"                   # lowercase, digits, dashes; unique in the plan
    title = "Add the /users endpoint"
    command = "python3 gen_api.py"     # agent = "shell": run in the sub-task's sandbox
    # prompt = "..."                   # an agent runner: the instruction given to the agent
    depends_on = []              # ids whose merged work this one needs
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInput
from .network import MODES as NETWORK_MODES

AGENTS = ("shell", "opencode", "claude-code", "codex")
# Sub-task statuses, in the registry's ``subtasks`` table.
PENDING, RUNNING, SUCCEEDED, FAILED, TIMED_OUT = "pending", "running", "succeeded", "failed", "timed_out"
BLOCKED, MERGED, CONFLICT = "blocked", "merged", "conflict"
STATUSES = (PENDING, RUNNING, SUCCEEDED, FAILED, TIMED_OUT, BLOCKED, MERGED, CONFLICT)
# A sub-task in one of these blocks its dependents.
BLOCKING = (FAILED, TIMED_OUT, BLOCKED, CONFLICT)
FINAL = (MERGED, FAILED, TIMED_OUT, BLOCKED, CONFLICT)
PLAN_LIMIT = 1 << 20  # bytes of a plan file read
MAX_SUBTASKS = 200
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
# The sandbox a sub-task gets: its parent's image, limits and network, unless the plan (for all
# sub-tasks) or the sub-task's own entry overrides them with these keys.
SANDBOX_KEYS = ("image", "memory", "cpus", "network")
_PLAN_KEYS = {"parallel", "agent", "timeout", "subtask", *SANDBOX_KEYS}
_SUBTASK_KEYS = {"id", "title", "command", "prompt", "depends_on", "agent", "timeout", "description", *SANDBOX_KEYS}


def parse_duration(value: Any, what: str = "timeout") -> float:
    """``30m`` / ``90s`` / ``2h`` / a number of seconds, as seconds."""
    if isinstance(value, bool):
        raise InvalidInput(f"{what} {value!r} is not a duration like 90s, 30m or 2h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise InvalidInput(f"{what} {value!r} is not a duration like 90s, 30m or 2h")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]
    if not 0 < seconds <= 24 * 3600:
        raise InvalidInput(f"{what} {value!r} must be more than 0 and at most 24h")
    return seconds


@dataclass(frozen=True)
class SubtaskSpec:
    """One sub-task as the plan gives it."""

    id: str
    title: str
    command: str = ""
    prompt: str = ""
    depends_on: tuple[str, ...] = ()
    agent: str = "shell"
    timeout: float | None = None
    sandbox: dict[str, Any] = field(default_factory=dict)  # overrides of the parent's (SANDBOX_KEYS)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "command": self.command, "prompt": self.prompt,
                "depends_on": list(self.depends_on), "agent": self.agent, "timeout": self.timeout}


@dataclass(frozen=True)
class Plan:
    """A validated plan: sub-tasks in plan order, every dependency known, no cycle."""

    subtasks: tuple[SubtaskSpec, ...]
    parallel: int | None = None
    agent: str = "shell"
    timeout: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # network, memory, cpus, image

    def order(self) -> list[str]:
        """The ids in dependency order (plan order among independent ones)."""
        return topological_order({s.id: list(s.depends_on) for s in self.subtasks})


def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a path that ends where it starts (``[a, b, a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in deps.get(node, []):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in deps:
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def topological_order(deps: dict[str, list[str]]) -> list[str]:
    """Ids so that each comes after its dependencies; ties kept in the given order."""
    done: list[str] = []
    seen: set[str] = set()
    remaining = list(deps)
    while remaining:
        ready = [n for n in remaining if all(d in seen for d in deps[n])]
        if not ready:
            raise InvalidInput("the plan has a dependency cycle")
        for n in ready:
            seen.add(n)
            done.append(n)
        remaining = [n for n in remaining if n not in seen]
    return done


def _text(entry: dict[str, Any], key: str, where: str, limit: int) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: {key} must be a string")
    if len(value) > limit:
        raise InvalidInput(f"{where}: {key} is {len(value)} characters long; the limit is {limit}")
    return value.strip()


def parse_plan(data: dict[str, Any]) -> Plan:
    """Validate a plan given as data (from TOML or from an agent's tool call); raise InvalidInput."""
    if not isinstance(data, dict):
        raise InvalidInput("a plan is a table with [[subtask]] entries")
    unknown = sorted(set(data) - _PLAN_KEYS)
    if unknown:
        raise InvalidInput(f"unknown plan key(s): {', '.join(unknown)}")
    agent = data.get("agent", "shell")
    if agent not in AGENTS:
        raise InvalidInput(f"agent {agent!r} is not one of {', '.join(AGENTS)}")
    parallel = data.get("parallel")
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int)
                                 or not 1 <= parallel <= 64):
        raise InvalidInput(f"parallel {parallel!r} must be a whole number from 1 to 64")
    timeout = parse_duration(data["timeout"]) if data.get("timeout") is not None else None
    plan_sandbox = _sandbox(data, "the plan")
    entries = data.get("subtask")
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("the plan has no [[subtask]] entries")
    if len(entries) > MAX_SUBTASKS:
        raise InvalidInput(f"the plan has {len(entries)} sub-tasks; at most {MAX_SUBTASKS} are allowed")
    specs: list[SubtaskSpec] = []
    seen: set[str] = set()
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise InvalidInput(f"subtask #{n} is not a table")
        sid = entry.get("id")
        where = f"subtask {sid!r}" if isinstance(sid, str) else f"subtask #{n}"
        bad = sorted(set(entry) - _SUBTASK_KEYS)
        if bad:
            raise InvalidInput(f"{where}: unknown key(s) {', '.join(bad)}")
        if not isinstance(sid, str) or not _ID.match(sid):
            raise InvalidInput(f"{where}: id must be lowercase letters, digits and dashes (at most 40)")
        if sid in seen:
            raise InvalidInput(f"duplicate sub-task id {sid!r}")
        seen.add(sid)
        title = _text(entry, "title", where, 200) or _text(entry, "description", where, 2000)[:80] or sid
        sub_agent = entry.get("agent", agent)
        if sub_agent not in AGENTS:
            raise InvalidInput(f"{where}: agent {sub_agent!r} is not one of {', '.join(AGENTS)}")
        command = _text(entry, "command", where, 100_000)
        prompt = _text(entry, "prompt", where, 100_000)
        if sub_agent == "shell" and not command:
            raise InvalidInput(f"{where}: agent shell needs a command")
        if sub_agent != "shell" and not prompt:
            raise InvalidInput(f"{where}: agent {sub_agent} needs a prompt")
        deps = entry.get("depends_on", [])
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise InvalidInput(f"{where}: depends_on must be a list of sub-task ids")
        if len(set(deps)) != len(deps):
            raise InvalidInput(f"{where}: depends_on names an id twice")
        sub_timeout = parse_duration(entry["timeout"], f"{where}: timeout") if entry.get("timeout") else timeout
        specs.append(SubtaskSpec(id=sid, title=title, command=command, prompt=prompt, depends_on=tuple(deps),
                                 agent=sub_agent, timeout=sub_timeout,
                                 sandbox={**plan_sandbox, **_sandbox(entry, where)}))
    for s in specs:
        for d in s.depends_on:
            if d not in seen:
                raise InvalidInput(f"subtask {s.id!r} depends on unknown id {d!r}")
    cycle = find_cycle({s.id: list(s.depends_on) for s in specs})
    if cycle:
        raise InvalidInput(f"the plan has a dependency cycle: {' -> '.join(cycle)}")
    return Plan(subtasks=tuple(specs), parallel=parallel, agent=agent, timeout=timeout, overrides=plan_sandbox)


def _sandbox(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The sandbox overrides in a plan or sub-task table, checked for type (the limits themselves
    are checked against the settings, the host and the project policy when the sub-task is made)."""
    out: dict[str, Any] = {}
    for key in SANDBOX_KEYS:
        if key not in data:
            continue
        value = data[key]
        if key == "cpus":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidInput(f"{where}: cpus {value!r} must be a positive number")
            out[key] = float(value)
        elif not isinstance(value, str) or not value.strip() or len(value) > 200:
            raise InvalidInput(f"{where}: {key} must be a non-empty string")
        elif key == "network" and value not in NETWORK_MODES:
            raise InvalidInput(f"{where}: network {value!r} is not one of {', '.join(NETWORK_MODES)}")
        else:
            out[key] = value.strip()
    return out


def parse_toml(text: str) -> Plan:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"the plan is not valid TOML: {exc}") from exc
    return parse_plan(data)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (the user's own file, read bounded)."""
    p = Path(path).expanduser()
    try:
        with p.open("rb") as fh:
            raw = fh.read(PLAN_LIMIT + 1)
    except FileNotFoundError as exc:
        raise InvalidInput(f"plan file {p} does not exist") from exc
    except OSError as exc:
        raise InvalidInput(f"cannot read plan file {p}: {exc.strerror}") from exc
    if len(raw) > PLAN_LIMIT:
        raise InvalidInput(f"plan file {p} is larger than {PLAN_LIMIT} bytes")
    return parse_toml(raw.decode("utf-8", errors="replace"))


# --- the scheduler's decisions -----------------------------------------------------------------


@dataclass
class Decision:
    """What the orchestrator should do now, given the recorded statuses."""

    start: list[str] = field(default_factory=list)  # start these (dependencies merged, a slot free)
    merge: list[str] = field(default_factory=list)  # merge these into the parent, in this order
    block: dict[str, str] = field(default_factory=dict)  # id -> the dependency that blocks it
    waiting: list[str] = field(default_factory=list)  # pending: dependencies not merged yet
    running: list[str] = field(default_factory=list)
    done: bool = False  # nothing runs and nothing more can start or merge


def decide(rows: list[dict[str, Any]], parallel: int, merge: bool = True) -> Decision:
    """The next step for sub-tasks ``rows`` (dicts with ``id``, ``status``, ``depends_on``, in plan order).

    A pending sub-task starts once every dependency is merged, at most ``parallel`` running;
    one whose dependency failed, timed out, conflicted or was blocked is blocked (the
    blocking travels down the graph one step per call). Succeeded sub-tasks are merged in
    dependency order; with ``merge`` false nothing is merged and dependents wait.
    """
    status = {r["id"]: r["status"] for r in rows}
    deps = {r["id"]: list(r["depends_on"]) for r in rows}
    order = topological_order(deps)
    out = Decision()
    out.running = [i for i in order if status[i] == RUNNING]
    slots = max(0, parallel - len(out.running))
    for sid in order:
        st = status[sid]
        if st == SUCCEEDED and merge:
            out.merge.append(sid)
        if st != PENDING:
            continue
        bad = next((d for d in deps[sid] if status.get(d) in BLOCKING), None)
        if bad is not None:
            out.block[sid] = bad
        elif all(status.get(d) == MERGED for d in deps[sid]):
            if slots > 0:
                out.start.append(sid)
                slots -= 1
            else:
                out.waiting.append(sid)
        else:
            out.waiting.append(sid)
    out.done = not (out.running or out.start or out.merge or out.block
                    or any(status[w] == PENDING and _can_progress(w, status, deps, merge) for w in out.waiting))
    return out


def _can_progress(sid: str, status: dict[str, str], deps: dict[str, list[str]], merge: bool) -> bool:
    """Whether a waiting sub-task can still start in this run (its dependencies are not stuck)."""
    for d in deps[sid]:
        st = status.get(d)
        if st in BLOCKING:
            return True  # it will be blocked next step
        if st == SUCCEEDED and not merge:
            return False
        if st == PENDING and not _can_progress(d, status, deps, merge):
            return False
    return True
