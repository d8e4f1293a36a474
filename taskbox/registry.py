"""The task registry: SQLite in WAL mode, every write transactional and version-checked.

Events are bounded per task and kind: :meth:`Registry.admit` lets a burst through per
window (settings ``record_burst`` per ``record_window`` seconds) and only counts the rest,
which become one aggregated record (``"aggregated": true`` with a ``count``) when the window
closes or is flushed. The window state is a row of ``rate_windows``, so short-lived
processes (every CLI call) share it. The same limiter bounds the audit log
(:func:`taskbox.policy.audit`). Every event payload passes through ``redact`` (secrets).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import events, migrations
from .errors import ConcurrentModification, Conflict, TaskLocked, TaskNotFound
from .models import Lease, LockMode, Session, Task

_TASK_COLUMNS = tuple(Task.__dataclass_fields__)
WAITER_STALE_SECONDS = 5.0  # a waiter polls every 0.2 s; silence this long means it is gone
MAX_SAMPLES = 5  # distinct examples an aggregated record keeps of what it counts


class Registry:
    """Access to the registry database. Safe to share between threads (one connection each)."""

    def __init__(self, path: Path, *, burst: int = 20, window: float = 60.0,
                 redact: Callable[[Any], Any] | None = None) -> None:
        self.path = path
        self.burst = burst
        self.window = window
        self.redact = redact or (lambda value: value)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        migrations.apply(self._conn())

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: taken with the write lock up front, rolled back on any error."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # --- tasks -----------------------------------------------------------------------------

    def insert_task(self, task: Task, event: tuple[str, dict[str, Any]] | None = None) -> None:
        row = task.to_row()
        cols = ", ".join(_TASK_COLUMNS)
        marks = ", ".join(f":{c}" for c in _TASK_COLUMNS)
        try:
            with self.tx() as conn:
                conn.execute(f"INSERT INTO tasks ({cols}) VALUES ({marks})", row)
                if event:
                    self._event(conn, event[0], task.id, event[1])
        except sqlite3.IntegrityError as exc:
            if "tasks.id" in str(exc):
                raise Conflict(f"a task with id {task.id!r} already exists", task_id=task.id) from exc
            raise Conflict(
                f"branch {task.branch!r} is already used by another task", branch=task.branch
            ) from exc

    def get_task(self, task_id: str) -> Task:
        row = self._conn().execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise TaskNotFound(task_id)
        return Task.from_row(row)

    def task_exists(self, task_id: str) -> bool:
        return bool(self._conn().execute("SELECT 1 FROM tasks WHERE id = ?", (task_id,)).fetchone())

    def list_tasks(
        self, statuses: list[str] | None = None, query: str | None = None, parent_id: str | None = None
    ) -> list[Task]:
        sql = "SELECT * FROM tasks WHERE 1=1"
        args: list[Any] = []
        if statuses:
            sql += f" AND status IN ({', '.join('?' * len(statuses))})"
            args += statuses
        if query:
            sql += " AND (id LIKE ? OR title LIKE ? OR description LIKE ? OR branch LIKE ?)"
            args += [f"%{query}%"] * 4
        if parent_id:
            sql += " AND parent_id = ?"
            args.append(parent_id)
        sql += " ORDER BY created_at, id"
        return [Task.from_row(r) for r in self._conn().execute(sql, args)]

    def branches_in_use(self, repo_path: str) -> set[str]:
        rows = self._conn().execute("SELECT branch FROM tasks WHERE repo_path = ?", (repo_path,))
        return {r[0] for r in rows}

    def update_task(
        self,
        task_id: str,
        expected_version: int,
        changes: dict[str, Any],
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> Task:
        """Apply ``changes`` if the row still has ``expected_version``; bump the version.

        A row changed by someone else since it was read raises
        :class:`ConcurrentModification` and changes nothing.
        """
        probe = self.get_task(task_id)  # serialises the new values the same way as inserts
        for key, value in changes.items():
            setattr(probe, key, value)
        row = probe.to_row()
        values = {k: row[k] for k in changes}
        sets = ", ".join(f"{k} = :{k}" for k in values)
        with self.tx() as conn:
            cur = conn.execute(
                f"UPDATE tasks SET {sets}, version = version + 1 WHERE id = :_id AND version = :_v",
                {**values, "_id": task_id, "_v": expected_version},
            )
            if cur.rowcount != 1:
                if not conn.execute("SELECT 1 FROM tasks WHERE id = ?", (task_id,)).fetchone():
                    raise TaskNotFound(task_id)
                raise ConcurrentModification(
                    f"task {task_id} was modified concurrently (expected version "
                    f"{expected_version}); re-read it and retry",
                    task_id=task_id,
                )
            if event:
                self._event(conn, event[0], task_id, event[1])
            row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return Task.from_row(row)

    def delete_task(self, task_id: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            conn.execute("DELETE FROM rate_windows WHERE task_id = ?", (task_id,))
            self._event(conn, "task.deleted", task_id, {})

    # --- sessions ----------------------------------------------------------------------------

    def add_session(self, session: Session) -> None:
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO agent_sessions (id, task_id, agent, model, attached_at, detached_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (session.id, session.task_id, session.agent, session.model, session.attached_at, None),
            )

    def end_session(self, session_id: str, when: float) -> None:
        with self.tx() as conn:
            conn.execute(
                "UPDATE agent_sessions SET detached_at = ? WHERE id = ? AND detached_at IS NULL",
                (when, session_id),
            )

    def get_session(self, session_id: str) -> Session | None:
        row = self._conn().execute("SELECT * FROM agent_sessions WHERE id = ?", (session_id,)).fetchone()
        return Session(**dict(row)) if row else None

    def sessions(self, task_id: str, open_only: bool = False) -> list[Session]:
        sql = "SELECT * FROM agent_sessions WHERE task_id = ?"
        if open_only:
            sql += " AND detached_at IS NULL"
        sql += " ORDER BY attached_at"
        return [Session(**dict(r)) for r in self._conn().execute(sql, (task_id,))]

    # --- leases ------------------------------------------------------------------------------

    def acquire_lease(
        self,
        task_id: str,
        session_id: str,
        agent: str,
        mode: LockMode,
        ttl: float,
        max_holders: int,
        now: float | None = None,
        queued: bool = False,
    ) -> tuple[Lease, list[Lease]]:
        """Take a lease on a task in one transaction; return it and the expired leases it replaced.

        Exclusive: refused while any other live lease exists. Collaborative: refused while an
        exclusive lease is live or ``max_holders`` collaborative leases are. Agents queued with
        :meth:`join_queue` are served first come, first served: a ``queued`` caller is refused
        while someone queued before it; any other newcomer while anyone is queued.
        """
        now = time.time() if now is None else now
        with self.tx() as conn:
            conn.execute("DELETE FROM lease_waiters WHERE task_id = ? AND seen_at <= ?",
                         (task_id, now - WAITER_STALE_SECONDS))
            holding = conn.execute("SELECT 1 FROM leases WHERE task_id = ? AND session_id = ? AND expires_at > ?",
                                   (task_id, session_id, now)).fetchone()
            if not holding:
                mine = conn.execute("SELECT enqueued_at FROM lease_waiters WHERE task_id = ? AND session_id = ?",
                                    (task_id, session_id)).fetchone()
                ahead = [r[0] for r in conn.execute(
                    "SELECT agent FROM lease_waiters WHERE task_id = ? AND session_id != ? AND enqueued_at <= ?"
                    " ORDER BY enqueued_at", (task_id, session_id, mine[0] if queued and mine else now + 1e9))]
                if ahead:
                    raise TaskLocked(
                        f"task {task_id} has {len(ahead)} agent(s) waiting before you ({', '.join(ahead)}); "
                        "wait in turn with --wait",
                        task_id=task_id,
                        waiting=ahead,
                    )
            expired = [
                _lease(r)
                for r in conn.execute(
                    "SELECT * FROM leases WHERE task_id = ? AND expires_at <= ?", (task_id, now)
                )
            ]
            conn.execute("DELETE FROM leases WHERE task_id = ? AND expires_at <= ?", (task_id, now))
            live = [
                _lease(r)
                for r in conn.execute(
                    "SELECT * FROM leases WHERE task_id = ? AND session_id != ?", (task_id, session_id)
                )
            ]
            if live:
                holders = ", ".join(f"{lease.agent} (session {lease.session_id})" for lease in live)
                if mode is LockMode.EXCLUSIVE or any(le.mode is LockMode.EXCLUSIVE for le in live):
                    raise TaskLocked(
                        f"task {task_id} is locked by {holders}; lease expires in "
                        f"{max(le.expires_at for le in live) - now:.0f}s",
                        task_id=task_id,
                        holders=[le.to_dict() for le in live],
                    )
                if len(live) >= max_holders:
                    raise TaskLocked(
                        f"task {task_id} already has {len(live)} collaborative agents "
                        f"(maximum {max_holders}): {holders}",
                        task_id=task_id,
                        holders=[le.to_dict() for le in live],
                    )
            lease = Lease(task_id, session_id, agent, mode, now, now + ttl)
            conn.execute("DELETE FROM lease_waiters WHERE task_id = ? AND session_id = ?", (task_id, session_id))
            conn.execute(
                "INSERT OR REPLACE INTO leases (task_id, session_id, agent, mode, acquired_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (task_id, session_id, agent, str(mode), now, now + ttl),
            )
        return lease, expired

    def join_queue(self, task_id: str, session_id: str, agent: str) -> None:
        """Queue (or stay queued) for a task's lease; call again at least every few seconds."""
        now = time.time()
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO lease_waiters (task_id, session_id, agent, enqueued_at, seen_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (task_id, session_id) DO UPDATE SET seen_at = excluded.seen_at",
                (task_id, session_id, agent, now, now),
            )

    def leave_queue(self, task_id: str, session_id: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM lease_waiters WHERE task_id = ? AND session_id = ?", (task_id, session_id))

    def renew_lease(self, task_id: str, session_id: str, ttl: float) -> bool:
        with self.tx() as conn:
            cur = conn.execute(
                "UPDATE leases SET expires_at = ? WHERE task_id = ? AND session_id = ?",
                (time.time() + ttl, task_id, session_id),
            )
        return cur.rowcount == 1

    def release_lease(self, task_id: str, session_id: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM leases WHERE task_id = ? AND session_id = ?", (task_id, session_id))

    def leases(self, task_id: str | None = None, live_only: bool = True) -> list[Lease]:
        sql = "SELECT * FROM leases WHERE 1=1"
        args: list[Any] = []
        if task_id:
            sql += " AND task_id = ?"
            args.append(task_id)
        if live_only:
            sql += " AND expires_at > ?"
            args.append(time.time())
        return [_lease(r) for r in self._conn().execute(sql, args)]

    def purge_expired_leases(self) -> list[Lease]:
        now = time.time()
        with self.tx() as conn:
            gone = [_lease(r) for r in conn.execute("SELECT * FROM leases WHERE expires_at <= ?", (now,))]
            conn.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))
        return gone

    # --- checkpoints -------------------------------------------------------------------------

    _CHECKPOINT_COLUMNS = ("id", "task_id", "name", "description", "trigger", "ref", "parent_id", "pinned",
                           "size_bytes", "metadata", "created_at")

    def add_checkpoint(self, row: dict[str, Any]) -> None:
        """Record a checkpoint: the table's columns, ``metadata`` a dict (stored as JSON)."""
        values = {**row, "pinned": int(bool(row["pinned"])), "metadata": json.dumps(row["metadata"], sort_keys=True)}
        cols = ", ".join(self._CHECKPOINT_COLUMNS)
        marks = ", ".join(f":{c}" for c in self._CHECKPOINT_COLUMNS)
        with self.tx() as conn:
            conn.execute(f"INSERT INTO checkpoints ({cols}) VALUES ({marks})",
                         {c: values[c] for c in self._CHECKPOINT_COLUMNS})

    def checkpoint(self, checkpoint_id: str) -> dict[str, Any] | None:
        """One checkpoint's row (``metadata`` decoded), or None."""
        row = self._conn().execute("SELECT * FROM checkpoints WHERE id = ?", (checkpoint_id,)).fetchone()
        return _checkpoint(row) if row is not None else None

    def checkpoints(self, task_id: str) -> list[dict[str, Any]]:
        """A task's checkpoint rows, oldest first (``metadata`` decoded)."""
        rows = self._conn().execute("SELECT * FROM checkpoints WHERE task_id = ? ORDER BY created_at, id",
                                    (task_id,))
        return [_checkpoint(r) for r in rows]

    def delete_checkpoint(self, checkpoint_id: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM checkpoints WHERE id = ?", (checkpoint_id,))

    def checkpoint_images(self) -> set[str]:
        """The container images that checkpoints of every task still name."""
        rows = self._conn().execute("SELECT metadata FROM checkpoints")
        return {image for r in rows if (image := json.loads(r[0] or "{}").get("image"))}

    # --- events ------------------------------------------------------------------------------

    def _event(self, conn: sqlite3.Connection, type_: str, task_id: str | None, payload: dict[str, Any]) -> None:
        if events.strict():
            events.check(type_, payload)  # the catalogue (taskbox.events) names every type and field
        conn.execute(
            "INSERT INTO events (type, task_id, ts, payload) VALUES (?, ?, ?, ?)",
            (type_, task_id, time.time(), json.dumps(self.redact(payload), sort_keys=True, default=str)),
        )

    def add_event(self, type_: str, task_id: str | None, payload: dict[str, Any] | None = None, *,
                  sample: str | None = None) -> bool:
        """Record an event, unless its task already had a burst of this type in this window.

        Returns whether it was written; one that is not is counted, and ends up in an
        aggregated event of the same type (``sample`` is what it keeps as an example).
        """
        return self.add_events(type_, task_id, [payload or {}], [sample]) == 1

    def add_events(self, type_: str, task_id: str | None, payloads: Sequence[dict[str, Any]],
                   samples: Sequence[str | None] = ()) -> int:
        """Record a batch of events of one type (e.g. the denials of one proxy log read); return how many were written."""
        if not payloads:
            return 0
        with self.tx() as conn:
            take, closed = self._admit(conn, "event", task_id, type_, len(payloads), samples, time.time())
            if closed:
                self._event(conn, type_, task_id, closed)
            for payload in payloads[:take]:
                self._event(conn, type_, task_id, payload)
        return take

    def admit(self, stream: str, task_id: str | None, key: str, count: int = 1,
              samples: Sequence[str | None] = ()) -> tuple[int, dict[str, Any] | None]:
        """How many of ``count`` new records of ``key`` may be written now, and the aggregate of a closed window.

        The rest are counted (with up to five distinct ``samples``, one per record) and come
        back as the aggregate when the window has closed: write it before the new records.
        """
        with self.tx() as conn:
            return self._admit(conn, stream, task_id, key, count, samples, time.time())

    def _admit(self, conn: sqlite3.Connection, stream: str, task_id: str | None, key: str, count: int,
               samples: Sequence[str | None], now: float) -> tuple[int, dict[str, Any] | None]:
        tid = task_id or ""
        row = conn.execute("SELECT * FROM rate_windows WHERE task_id = ? AND stream = ? AND key = ?",
                           (tid, stream, key)).fetchone()
        closed = None
        if row is None or now >= row["started_at"] + self.window:
            if row is not None and row["suppressed"]:
                closed = self._aggregate(row)
            started, admitted, suppressed, first, last, kept = now, 0, 0, None, None, []
        else:
            started, admitted, suppressed = row["started_at"], row["admitted"], row["suppressed"]
            first, last, kept = row["first_at"], row["last_at"], json.loads(row["samples"])
        take = min(count, max(self.burst - admitted, 0))
        rest = count - take
        if rest:
            suppressed += rest
            first = first if first is not None else now
            last = now
            for sample in list(samples)[take:]:
                if len(kept) >= MAX_SAMPLES:
                    break
                text = self.redact(str(sample))[:200] if sample is not None else None
                if text is not None and text not in kept:
                    kept.append(text)
        conn.execute(
            "INSERT INTO rate_windows (task_id, stream, key, started_at, admitted, suppressed, first_at, last_at,"
            " samples) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id, stream, key) DO UPDATE SET"
            " started_at = excluded.started_at, admitted = excluded.admitted, suppressed = excluded.suppressed,"
            " first_at = excluded.first_at, last_at = excluded.last_at, samples = excluded.samples",
            (tid, stream, key, started, admitted + take, suppressed, first, last, json.dumps(kept)))
        return take, closed

    def _aggregate(self, row: sqlite3.Row) -> dict[str, Any]:
        return {"aggregated": True, "count": row["suppressed"], "first": row["first_at"], "last": row["last_at"],
                "samples": json.loads(row["samples"]), "window_seconds": self.window,
                "note": f"{row['suppressed']} more past the burst of {self.burst}; not recorded one by one"}

    def flush_windows(self, stream: str, task_id: str | None = None,
                      force: bool = False) -> list[tuple[str | None, str, dict[str, Any]]]:
        """Take the aggregates of counted records: of closed windows, or of every window with ``force``.

        Returns ``(task id, key, aggregate)``; a forced flush keeps an open window's burst used
        up, so flushing often never lets more records through.
        """
        with self.tx() as conn:
            return self._flush(conn, stream, task_id, force)

    def _flush(self, conn: sqlite3.Connection, stream: str, task_id: str | None,
               force: bool) -> list[tuple[str | None, str, dict[str, Any]]]:
        now = time.time()
        out: list[tuple[str | None, str, dict[str, Any]]] = []
        sql = "SELECT * FROM rate_windows WHERE stream = ? AND suppressed > 0"
        args: list[Any] = [stream]
        if task_id is not None:
            sql += " AND task_id = ?"
            args.append(task_id)
        for row in conn.execute(sql, args).fetchall():
            if not force and now < row["started_at"] + self.window:
                continue
            out.append((row["task_id"] or None, row["key"], self._aggregate(row)))
            conn.execute("UPDATE rate_windows SET suppressed = 0, first_at = NULL, last_at = NULL, samples = '[]'"
                         " WHERE task_id = ? AND stream = ? AND key = ?", (row["task_id"], stream, row["key"]))
        return out

    def flush_events(self, task_id: str | None = None, force: bool = False) -> int:
        """Write the aggregated events of closed (or, with ``force``, all) windows; return how many."""
        with self.tx() as conn:
            found = self._flush(conn, "event", task_id, force)
            for tid, key, aggregate in found:
                self._event(conn, key, tid, aggregate)
        return len(found)

    def events(
        self, task_id: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if task_id:
            sql += " AND task_id = ?"
            args.append(task_id)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        return [
            {**dict(r), "payload": json.loads(r["payload"])} for r in self._conn().execute(sql, args)
        ]


def _checkpoint(row: sqlite3.Row) -> dict[str, Any]:
    return {**dict(row), "metadata": json.loads(row["metadata"] or "{}")}


def _lease(row: sqlite3.Row) -> Lease:
    data = dict(row)
    data["mode"] = LockMode(data["mode"])
    return Lease(**data)
