"""Task, session and lease records, and the task state machine (SPEC §2)."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from .errors import InvalidTransition, TaskboxError


class Status(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"
    ARCHIVED = "archived"


class ContainerState(StrEnum):
    NONE = "none"
    RUNNING = "running"
    STOPPED = "stopped"
    OOM_KILLED = "oom-killed"
    LOST = "lost"


class LockMode(StrEnum):
    EXCLUSIVE = "exclusive"
    COLLABORATIVE = "collaborative"


TRANSITIONS: dict[Status, frozenset[Status]] = {
    # pending→aborted is our one addition to SPEC §2: a lazily created task that is never
    # started must still be cancellable.
    Status.PENDING: frozenset({Status.ACTIVE, Status.ABORTED}),
    Status.ACTIVE: frozenset({Status.PAUSED, Status.COMPLETED, Status.FAILED, Status.ABORTED}),
    Status.PAUSED: frozenset({Status.ACTIVE, Status.COMPLETED, Status.FAILED, Status.ABORTED}),
    Status.COMPLETED: frozenset({Status.ARCHIVED}),
    Status.FAILED: frozenset({Status.ACTIVE, Status.ARCHIVED}),
    Status.ABORTED: frozenset({Status.ARCHIVED}),
    Status.ARCHIVED: frozenset(),
}

FINISHED = frozenset({Status.COMPLETED, Status.FAILED, Status.ABORTED, Status.ARCHIVED})


def check_transition(task_id: str, current: Status, target: Status) -> None:
    """Raise :class:`InvalidTransition` unless ``current → target`` is allowed."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (final state)"
        raise InvalidTransition(
            f"task {task_id} is {current}; it cannot become {target} (allowed: {allowed})",
            task_id=task_id,
            status=str(current),
            target=str(target),
        )


@dataclass
class Task:
    id: str
    title: str
    description: str
    status: Status
    repo_path: str
    branch: str
    base_ref: str
    workspace_path: str
    image: str
    agent: str
    model: str
    container_id: str | None = None
    container_state: ContainerState = ContainerState.NONE
    memory_limit: str = "2g"
    cpu_limit: float = 1.0
    pids_limit: int = 512
    network: str = "none"
    lock_mode: LockMode = LockMode.EXCLUSIVE
    parent_id: str | None = None
    task_type: str = "main"
    dependencies: list[str] = field(default_factory=list)
    integration_target: str | None = None
    template: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    pending_op: str | None = None
    op_pid: int | None = None
    created_at: float = 0.0
    last_active: float = 0.0
    completed_at: float | None = None
    version: int = 1

    JSON_FIELDS = ("dependencies", "metadata")

    @classmethod
    def from_row(cls, row: Any) -> Task:
        data = dict(row)
        for key in cls.JSON_FIELDS:
            data[key] = json.loads(data[key]) if data[key] else ([] if key == "dependencies" else {})
        data["status"] = Status(data["status"])
        data["container_state"] = ContainerState(data["container_state"])
        data["lock_mode"] = LockMode(data["lock_mode"])
        return cls(**data)

    def to_row(self) -> dict[str, Any]:
        data = asdict(self)
        for key in self.JSON_FIELDS:
            data[key] = json.dumps(data[key], sort_keys=True)
        for key in ("status", "container_state", "lock_mode"):
            data[key] = str(data[key])
        return data

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("status", "container_state", "lock_mode"):
            data[key] = str(data[key])
        data["task_id"] = data.pop("id")
        return data


@dataclass
class Session:
    id: str
    task_id: str
    agent: str
    model: str
    attached_at: float
    detached_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Lease:
    task_id: str
    session_id: str
    agent: str
    mode: LockMode
    acquired_at: float
    expires_at: float
    holder: str | None = None  # the process it dies with (taskbox.liveness), if any

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mode"] = str(self.mode)
        return data


# --- operations: the one vocabulary hooks, policy rules and records use ---------------------------

#: Every operation on a task, as the core names it in ``pre_tool_call``/``post_tool_call``, with
#: the names the adapters give it (an MCP tool, a CLI command). A policy rule's ``tools`` may
#: use any of these names; the core always passes the operation's own.
OPERATIONS: dict[str, tuple[str, ...]] = {
    "attach": ("attach_agent_to_task", "resume-task"),
    "detach": ("detach_agent_from_task",),
    "complete": ("complete_task", "complete-task"),
    "abort": (),
    "exec": ("execute_in_task",),
    "job_output": ("read_task_job_output", "job output"),
    "job_wait": ("wait_for_task_job", "job wait"),
    "job_kill": ("kill_task_job", "job kill"),
    "read_file": ("read_task_file",),
    "write_file": ("write_task_file",),
    "edit_file": ("edit_task_file",),
    "list_files": ("list_task_files",),
    "delete_file": ("delete_task_file",),
    "diff": ("task_diff",),
    "log": (),
    "sync": (),
    "status": ("get_task_status", "show"),
    "update_todos": ("update_task_todos", "todo"),
    "decision": ("log_task_decision", "task-decisions"),
    "checkpoint": ("create_task_checkpoint", "checkpoint create"),
    "restore": ("restore_task_checkpoint", "restore-checkpoint"),
    "create_subtasks": (),
    "run_subtasks": ("ultrawork",),
    "subtask_status": ("subtask-status",),
    "merge": ("merge_task",),
    "run": ("run_agent_in_task",),
    "agent_attach": (),
    "ports": (),
}
_OPERATION_ALIASES = {alias: op for op, names in OPERATIONS.items() for alias in (op, *names)}


def operation(name: str) -> str:
    """The core's name of an operation given any of its names (unknown names stay as they are)."""
    return _OPERATION_ALIASES.get(name, name)


@dataclass(frozen=True)
class CheckpointRequest:
    """A plugin's answer to ``pre_tool_call``: take a checkpoint before this operation runs.

    However many plugins ask, the core takes one checkpoint. ``required`` (a policy rule)
    refuses the operation if that checkpoint fails; otherwise the failure is recorded.
    """

    trigger: str
    reason: str
    required: bool = False
    rule: str = ""


# --- names ------------------------------------------------------------------------------------

SLUG_MAX = 50


def clean_name(text: str, allowed: str) -> str:
    # Fold accents (é -> e) so non-English descriptions keep readable slugs.
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(f"[^{allowed}]+", "-", text.lower())
    text = re.sub(r"-{2,}", "-", text)
    text = re.sub(r"\.{2,}", ".", text)
    return text.strip("-.")


def slugify(text: str, limit: int = SLUG_MAX) -> str:
    """Lowercase ``a-z0-9-`` slug of at most ``limit`` characters, cut at a word boundary."""
    slug = clean_name(text, "a-z0-9")
    if len(slug) > limit:
        cut = slug[:limit]
        slug = cut.rsplit("-", 1)[0] if "-" in cut[limit // 2 :] else cut
    return slug.strip("-") or "task"
# A repair, as a reconciler describes it: a callable of the engine that found the problem,
# or the name of a repair the service performs (with the finding's ``params``).
Repair = Callable[[], Any] | str
ResolveRepair = Callable[[str, dict[str, Any]], Callable[[], Any]]


class Findings(list[dict[str, Any]]):
    """What a reconciler (`taskbox doctor`) found: JSON-ready entries, each with its repair.

    ``found(kind, task_id, detail, repair, **params)`` records a finding. A repair is a
    callable of the engine that found it, or the name of a repair the service performs;
    ``resolve`` (the service's) turns a name and its ``params`` into a callable. With a
    ``resolve``, each repair runs as its finding is added — what is detected next sees the
    repaired state, as a person fixing things one by one would — so the detecting engine
    never runs the core's use cases itself; without one, nothing is repaired.
    """

    def __init__(self, fix: bool = False, resolve: ResolveRepair | None = None) -> None:
        super().__init__()
        self.fix = fix
        self.resolve = resolve

    def __call__(self, kind: str, task_id: str | None, detail: str, action: Repair | None = None, /,
                 **params: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": kind, "task_id": task_id, "detail": detail, "fixed": False,
                                 "fixable": action is not None}
        if isinstance(action, str):
            entry["repair"] = action
        self.append(entry)
        if self.fix and action is not None:
            self._run(entry, action, params)
        return entry

    def _run(self, entry: dict[str, Any], action: Repair, params: dict[str, Any]) -> None:
        """Run one repair; a :class:`TaskboxError` is recorded on its finding, not raised."""
        try:
            if isinstance(action, str):
                if self.resolve is None:
                    raise TaskboxError(f"no one to perform the repair {action!r}")
                action = self.resolve(action, params)
            entry["action"] = action()
            entry["fixed"] = True
        except TaskboxError as exc:
            entry["error"] = exc.message
