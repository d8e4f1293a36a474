"""The audit log: every policy, egress, resource and sandbox decision about a task, one JSON line each.

A task's log is ``$TASKBOX_HOME/audit/<task>.jsonl`` — outside the workspace, out of the
agent's reach. Writes are bounded: per task, kind and decision a burst of ``record_burst``
entries per ``record_window`` seconds is written one by one and the rest are counted by the
registry's limiter and written as one ``aggregated`` entry with their ``count``; past
``audit_max_bytes`` the log rotates to ``<task>.jsonl.1`` (so a task's log never takes more
than twice that). Every entry passes the registry's redactor (secret values).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import files
from .config import Settings
from .registry import Registry

NOT_LOGGED = "[not logged]"  # what is recorded instead of a command run with log=False


class AuditLog:
    """The audit logs of one taskbox home."""

    def __init__(self, directory: Path, locks: Path, registry: Registry, settings: Settings) -> None:
        self.directory = directory
        self.locks = locks
        self.registry = registry
        self.settings = settings

    @property
    def max_bytes(self) -> int:
        return int(self.settings.audit_max_bytes)

    def path(self, task_id: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / f"{task_id}.jsonl"

    def record(self, task_id: str, *, kind: str, decision: str, rule: str, subject: str, **extra: Any) -> None:
        """Append one decision to the task's audit log (rate-limited, see :meth:`batch`)."""
        self.batch(task_id, [{"kind": kind, "decision": decision, "rule": rule, "subject": subject, **extra}])

    def batch(self, task_id: str, entries: list[dict[str, Any]], sample: str = "subject") -> int:
        """Append decisions (dicts with kind, decision, rule, subject …) to the task's audit log.

        Per task, kind and decision, a burst is written one by one; the rest are counted and
        written as one ``aggregated`` entry (``entry[sample]`` of a few kept as examples).
        Returns how many entries were written one by one.
        """
        now = time.time()
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            groups.setdefault(f"{e['kind']}:{e['decision']}", []).append(i)
        keep: set[int] = set()
        lines: list[bytes] = []
        for key, idx in groups.items():
            take, closed = self.registry.admit("audit", task_id, key, len(idx),
                                               [str(entries[i].get(sample) or "") for i in idx])
            keep.update(idx[:take])
            if closed:
                lines.append(self._aggregate_line(task_id, key, closed))
        for i, e in enumerate(entries):
            if i in keep:
                entry = {"time": now, "task_id": task_id, **{k: v for k, v in e.items() if v is not None}}
                entry["subject"] = str(entry.get("subject", ""))[:1000]
                lines.append(self._line(entry))
        self._append(task_id, b"".join(lines))
        return len(keep)

    def flush(self, task_id: str | None = None, force: bool = False) -> None:
        """Write the aggregated audit entries and events of closed rate-limit windows (all, with ``force``)."""
        for tid, key, aggregate in self.registry.flush_windows("audit", task_id, force):
            if tid:
                self._append(tid, self._aggregate_line(tid, key, aggregate))
        self.registry.flush_events(task_id, force)

    def read(self, task_id: str, limit: int | None = None, decision: str | None = None) -> list[dict[str, Any]]:
        """The task's audit entries, oldest first (the last ``limit``; only ``decision`` if given)."""
        path = self.path(task_id)
        data = _tail(path.with_name(path.name + ".1"), self.max_bytes) + _tail(path, self.max_bytes)
        out = []
        for line in data.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and (decision is None or entry.get("decision") == decision):
                out.append(entry)
        return out[-limit:] if limit else out

    def _aggregate_line(self, task_id: str, key: str, aggregate: dict[str, Any]) -> bytes:
        kind, _, decision = key.partition(":")
        entry = {"time": time.time(), "task_id": task_id, "kind": kind, "decision": decision, "rule": "aggregated",
                 "subject": f"{aggregate['count']} more {kind} {decision} decisions", **aggregate}
        return self._line(entry)

    def _line(self, entry: dict[str, Any]) -> bytes:
        return (json.dumps(self.registry.redact(entry), sort_keys=True, default=str) + "\n").encode()

    def _append(self, task_id: str, data: bytes) -> None:
        """Append with one ``write`` (safe across processes); rotate past ``max_bytes``."""
        if not data:
            return
        path = self.path(task_id)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            if os.fstat(fd).st_size + len(data) > self.max_bytes:
                with files.locked(self.locks / f"{task_id}.audit.lock"):
                    try:
                        current = os.stat(path, follow_symlinks=False)
                    except FileNotFoundError:
                        current = None
                    # Another process may have rotated it while we waited for the lock.
                    if current is not None and current.st_ino == os.fstat(fd).st_ino \
                            and current.st_size + len(data) > self.max_bytes:
                        os.replace(path, path.with_name(path.name + ".1"))
                    os.close(fd)
                    fd = os.open(path, flags, 0o600)
            os.write(fd, data)
        finally:
            os.close(fd)


def _tail(path: Path, limit: int) -> bytes:
    """The last ``limit`` bytes of ``path``, from a line start (the log is bounded, the read is too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        if size <= limit:
            return fh.read(limit)
        fh.seek(size - limit)
        data = fh.read(limit)
        return data[data.find(b"\n") + 1:]
