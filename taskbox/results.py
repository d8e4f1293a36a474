"""Typed results of the core's operations: the service returns these, each adapter renders them.

A result is a dataclass: code reads its attributes; :meth:`Result.to_dict` gives the plain
JSON-ready form the CLI (``--json``), the MCP server and the web API print. A result can also
be read like a read-only mapping (``res["branch"]``), so callers written against the dicts
the service used to return keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any


class Result:
    """Base of the typed results: attributes, ``to_dict()``, and read-only mapping access."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def __getitem__(self, key: str) -> Any:
        data = self.to_dict()
        if key not in data:
            raise KeyError(key)
        return data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def keys(self) -> Iterator[str]:
        return iter(self.to_dict())


@dataclass
class Detached(Result):
    """An agent session ended: the work committed and the branch fetched; the task paused if nobody is left."""

    task_id: str
    session_id: str
    paused: bool
    commit: str | None
    branch: str
    remaining_sessions: list[str] = field(default_factory=list)
    checkpoint_id: str | None = None


@dataclass
class Completed(Result):
    """A task finished: final checkpoint, final commit, branch fetched, sandbox stopped."""

    task_id: str
    branch: str
    commit: str | None
    new_commit: str | None
    container_removed: bool
    final_checkpoint_id: str | None
    status: str


@dataclass
class Synced(Result):
    """The workspace committed and the task branch fetched into the user's repository now."""

    task_id: str
    branch: str
    commit: str | None
    new_commit: str | None


def plain(value: Any) -> Any:
    """``json.dumps``'s ``default=`` for the adapters: a result (or record) by its ``to_dict()``,
    anything else (paths, enums) as text."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)


@dataclass
class CheckpointRestored(Result):
    """A workspace made exactly a checkpoint's (or, when it was lost, brought back from one)."""

    task_id: str
    checkpoint_id: str
    name: str
    files_changed: int
    files_restored: int
    files_removed: int
    container_restored: bool
    forced: bool
    duration_ms: float
    workspace_restored: bool = False  # the workspace was lost and came back whole
    volume_made: bool = False  # its quota volume had to be made again


@dataclass
class TaskOpened(Result):
    """A task created, or an unfinished one resumed (create-or-resume)."""

    task_id: str
    status: str  # "created" or "resumed"
    task_status: str
    container_id: str | None
    existing_container: bool
    branch: str
    workspace_path: str
    repo_path: str
