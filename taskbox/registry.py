"""The task registry: SQLite in WAL mode, every write transactional and version-checked.

Events are bounded per task and kind: :meth:`Registry.admit` lets a burst through per
window (settings ``record_burst`` per ``record_window`` seconds) and only counts the rest,
which become one aggregated record (``"aggregated": true`` with a ``count``) when the window
closes or is flushed. The window state is a row of ``rate_windows``, so short-lived
processes (every CLI call) share it. The same limiter bounds the audit log
(:func:`taskbox.policy.audit`). Every event payload passes through ``redact`` (secrets).

**Safety.** Every SQLite error is translated here, at the boundary, into a
:class:`~taskbox.errors.RegistryError` that says what to do (:func:`translate`): a locked,
damaged, full or unwritable database is one line and exit code 10, never a traceback. A
registry that vanished (deleted, or truncated to 0 bytes) is never silently re-created empty
while the home's identity file says one existed, or while workspaces and checkpoint stores
are there (:class:`~taskbox.errors.RegistryMissing`): an empty registry would make every
task look like an orphan. Online backups (SQLite's backup API) are taken before migrations
and at most every ``backup_every`` seconds when a command writes, kept rotated; a damaged
registry is restored from one (:func:`restore_backup`) or rebuilt from what is on disk
(``taskbox doctor --rebuild-registry``). Each task row is mirrored as a JSON record under
``TASKBOX_HOME/records`` (outside every workspace, so trusted) for that rebuild. A removed
task leaves a tombstone: only what the registry knows it removed is ever an orphan to trash.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from . import events, files, liveness, migrations
from .errors import (
    ConcurrentModification,
    Conflict,
    InvalidInput,
    NotFound,
    RegistryDamaged,
    RegistryError,
    RegistryFull,
    RegistryLocked,
    RegistryMissing,
    RegistryPermission,
    TaskLocked,
    TaskNotFound,
)
from .models import Lease, LockMode, Session, Task

_TASK_COLUMNS = tuple(Task.__dataclass_fields__)
WAITER_STALE_SECONDS = 5.0  # a waiter polls every 0.2 s; silence this long means it is gone
MAX_SAMPLES = 5  # distinct examples an aggregated record keeps of what it counts
BACKUP_CHECK_SECONDS = 30.0  # how often one process looks at the age of the newest backup
SQLITE_HEADER = b"SQLite format 3\x00"
F = TypeVar("F", bound=Callable[..., Any])


def _restore_hint(path: Path, backups: Path | None) -> str:
    newest = list_backups(backups)[:1] if backups else []
    if newest:
        return (f"restore it with `taskbox doctor --restore-registry` (newest backup {newest[0].name}; "
                "name another to pick it)")
    return "no backup exists: rebuild it from the workspaces, checkpoints and containers with " \
           "`taskbox doctor --rebuild-registry`"


def translate(exc: sqlite3.Error, path: Path, backups: Path | None = None) -> RegistryError:
    """The :class:`RegistryError` for an SQLite error on the registry at ``path``: one line, with what to do."""
    msg = str(exc).strip() or type(exc).__name__
    low = msg.lower()
    if "locked" in low or "busy" in low:
        return RegistryLocked(f"the registry {path} is locked by another process ({msg}); retry in a moment",
                              path=str(path))
    if "full" in low or "disk i/o" in low or "no space" in low:
        return RegistryFull(f"the registry {path} could not be written ({msg}): is the disk holding "
                            f"{path.parent} full or failing? Free space and retry", path=str(path))
    if "readonly" in low or "read-only" in low or "unable to open" in low or "permission" in low \
            or "authoriz" in low:
        return RegistryPermission(f"the registry {path} cannot be opened or written ({msg}): check that it "
                                  f"and {path.parent} are readable and writable by this user", path=str(path))
    if "not a database" in low or "malformed" in low or "corrupt" in low or "integrity" in low:
        return RegistryDamaged(f"the registry {path} is damaged ({msg}); {_restore_hint(path, backups)}",
                               path=str(path))
    return RegistryError(f"the registry {path} failed: {msg}", path=str(path))


def _guarded(fn: F) -> F:
    """Translate SQLite errors raised by a :class:`Registry` method at the boundary."""

    @functools.wraps(fn)
    def wrapper(self: Registry, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise translate(exc, self.path, self.backups) from exc

    return wrapper  # type: ignore[return-value]


def file_state(path: Path) -> str:
    """``absent``, ``empty`` (0 bytes), ``damaged`` (not an SQLite header) or ``present``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "present"  # unreadable: opening it reports the permission problem
    if not head:
        return "empty"
    return "present" if head == SQLITE_HEADER else "damaged"


class Registry:
    """Access to the registry database. Safe to share between threads (one connection each).

    ``identity`` (the home's identity file), ``evidence`` (what on disk says tasks exist),
    ``records`` (the per-task JSON mirror) and ``backups`` (with ``backup_every`` seconds
    between scheduled backups and ``backup_keep`` kept) are how a :class:`TaskService` opens
    it; a bare ``Registry(path)`` has none of them. ``create`` opens a missing registry
    anyway (a rebuild).
    """

    def __init__(self, path: Path, *, burst: int = 20, window: float = 60.0,
                 redact: Callable[[Any], Any] | None = None, identity: Path | None = None,
                 evidence: Callable[[], list[str]] | None = None, records: Path | None = None,
                 backups: Path | None = None, backup_every: float = 0.0, backup_keep: int = 10,
                 create: bool = False) -> None:
        self.path = path
        self.burst = burst
        self.window = window
        self.redact = redact or (lambda value: value)
        self.identity = identity
        self.records = records
        self.backups = backups
        self.backup_every = backup_every
        self.backup_keep = backup_keep
        self._next_backup_check = 0.0
        self._local = threading.local()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryPermission(f"cannot create {path.parent}: {exc.strerror}", path=str(path)) from exc
        state = file_state(path)
        if state in ("absent", "empty") and not create:
            why = []
            if identity is not None and identity.exists():
                why.append(f"{identity.name} records that this home had a registry")
            why += evidence() if evidence else []
            if why:
                word = "missing" if state == "absent" else "empty (0 bytes)"
                raise RegistryMissing(
                    f"the registry {path} is {word} but {'; '.join(why)}: it was not re-created empty and "
                    f"nothing was changed; {_restore_hint(path, backups)}"
                    + (", or rebuild it from disk with `taskbox doctor --rebuild-registry`"
                       if list_backups(backups) else ""),
                    path=str(path))
        if state == "damaged":
            raise RegistryDamaged(f"the registry {path} is damaged (its header is not SQLite's); "
                                  f"{_restore_hint(path, backups)}", path=str(path))
        try:
            conn = self._conn()
            todo, has_schema = migrations.pending(conn)
            if todo and has_schema and backups is not None:
                self.backup(reason="before-migration")  # a migration that goes wrong can be undone
            migrations.apply(conn)
        except sqlite3.Error as exc:
            self.close()
            raise translate(exc, path, backups) from exc
        if identity is not None and not identity.exists():
            try:
                files.write_durably(identity, json.dumps(
                    {"home_id": uuid.uuid4().hex, "registry": path.name, "created_at": time.time()},
                    indent=2).encode() + b"\n", 0o600)
            except OSError:
                pass  # written by the next command that can

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error as exc:
                raise translate(exc, self.path, self.backups) from exc
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: taken with the write lock up front, rolled back on any error.

        SQLite errors (from this or from the caller's statements) leave as :class:`RegistryError`.
        """
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise translate(exc, self.path, self.backups) from exc
        try:
            yield conn
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the failed statement may have ended the transaction already
            if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                raise translate(exc, self.path, self.backups) from exc
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise translate(exc, self.path, self.backups) from exc
        self._scheduled_backup()

    # --- tasks -----------------------------------------------------------------------------

    def insert_task(self, task: Task, event: tuple[str, dict[str, Any]] | None = None) -> None:
        row = task.to_row()
        cols = ", ".join(_TASK_COLUMNS)
        marks = ", ".join(f":{c}" for c in _TASK_COLUMNS)
        try:
            with self.tx() as conn:
                conn.execute(f"INSERT INTO tasks ({cols}) VALUES ({marks})", row)
                conn.execute("DELETE FROM tombstones WHERE task_id = ?", (task.id,))
                if event:
                    self._event(conn, event[0], task.id, event[1])
        except sqlite3.IntegrityError as exc:
            if "tasks.id" in str(exc):
                raise Conflict(f"a task with id {task.id!r} already exists", task_id=task.id) from exc
            raise Conflict(
                f"branch {task.branch!r} is already used by another task", branch=task.branch
            ) from exc
        self._record(task)

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
        task = Task.from_row(row)
        self._record(task)
        return task

    def delete_task(self, task_id: str, reason: str = "removed") -> None:
        """Delete a task's row, leaving a tombstone: what it leaves behind is a known orphan."""
        with self.tx() as conn:
            row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO tombstones (task_id, branch, workspace_path, container_id, reason,"
                    " removed_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (task_id, row["branch"], row["workspace_path"], row["container_id"], reason, time.time()))
            conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            conn.execute("DELETE FROM rate_windows WHERE task_id = ?", (task_id,))
            conn.execute("DELETE FROM events WHERE task_id = ? AND type = 'exec.output'", (task_id,))  # live only
            self._event(conn, "task.deleted", task_id, {"reason": reason})
        if self.records is not None:
            try:
                (self.records / f"{task_id}.json").unlink(missing_ok=True)
            except OSError:
                pass

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
        holder: str | None = None,
    ) -> tuple[Lease, list[Lease]]:
        """Take a lease on a task in one transaction; return it and the expired leases it replaced.

        A lease whose ``holder`` process is dead (see :mod:`taskbox.liveness`) counts as
        expired. ``holder`` ties the new lease to a process in the same way.

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
            expired, live = [], []
            for r in conn.execute("SELECT * FROM leases WHERE task_id = ?", (task_id,)).fetchall():
                le = _lease(r)
                if le.expires_at <= now or (le.session_id != session_id and liveness.alive(le.holder) is False):
                    expired.append(le)
                    conn.execute("DELETE FROM leases WHERE task_id = ? AND session_id = ?", (task_id, le.session_id))
                elif le.session_id != session_id:
                    live.append(le)
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
            lease = Lease(task_id, session_id, agent, mode, now, now + ttl, holder)
            conn.execute("DELETE FROM lease_waiters WHERE task_id = ? AND session_id = ?", (task_id, session_id))
            conn.execute(
                "INSERT OR REPLACE INTO leases (task_id, session_id, agent, mode, acquired_at, expires_at, holder)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (task_id, session_id, agent, str(mode), now, now + ttl, holder),
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
        found = [_lease(r) for r in self._conn().execute(sql, args)]
        # Live only: a lease whose holder process died is not (it is taken over on the next attach).
        return [le for le in found if not live_only or liveness.alive(le.holder) is not False]

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

    # --- ultrawork: sub-tasks and their orchestration runs (taskbox.ultrawork) -------------------

    _SUBTASK_JSON = ("depends_on", "conflict_files")

    def insert_subtasks(self, parent_id: str, rows: Sequence[dict[str, Any]],
                        event: tuple[str, dict[str, Any]] | None = None) -> None:
        """Record a parent's sub-tasks, all or none; a parent that has some already is a Conflict."""
        now = time.time()
        with self.tx() as conn:
            if conn.execute("SELECT 1 FROM subtasks WHERE parent_id = ?", (parent_id,)).fetchone():
                raise Conflict(f"task {parent_id} already has sub-tasks; run `taskbox ultrawork {parent_id} "
                               "--resume` or `taskbox subtask-status` to see them", task_id=parent_id)
            for pos, r in enumerate(rows):
                conn.execute(
                    "INSERT INTO subtasks (parent_id, id, position, title, agent, command, prompt, depends_on,"
                    " timeout, status, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                    (parent_id, r["id"], pos, r["title"], r["agent"], r["command"], r["prompt"],
                     json.dumps(list(r["depends_on"])), r.get("timeout"), now))
            if event:
                self._event(conn, event[0], parent_id, event[1])

    def subtasks(self, parent_id: str) -> list[dict[str, Any]]:
        """A parent's sub-tasks in plan order (``depends_on`` and ``conflict_files`` decoded)."""
        rows = self._conn().execute("SELECT * FROM subtasks WHERE parent_id = ? ORDER BY position", (parent_id,))
        return [_subtask(r) for r in rows]

    def subtask(self, parent_id: str, sid: str) -> dict[str, Any]:
        row = self._conn().execute("SELECT * FROM subtasks WHERE parent_id = ? AND id = ?",
                                   (parent_id, sid)).fetchone()
        if row is None:
            raise NotFound(f"task {parent_id} has no sub-task {sid!r}", task_id=parent_id)
        return _subtask(row)

    def subtask_of(self, task_id: str) -> dict[str, Any] | None:
        """The sub-task row whose child task is ``task_id``, if any."""
        row = self._conn().execute("SELECT * FROM subtasks WHERE task_id = ?", (task_id,)).fetchone()
        return _subtask(row) if row is not None else None

    def update_subtask(self, parent_id: str, sid: str, changes: dict[str, Any], *,
                       expect: Sequence[str] | None = None,
                       event: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """Change a sub-task's row; with ``expect``, only while its status is one of those (else None)."""
        values = {k: json.dumps(v) if k in self._SUBTASK_JSON else v for k, v in changes.items()}
        values["updated_at"] = time.time()
        sets = ", ".join(f"{k} = :{k}" for k in values)
        sql = f"UPDATE subtasks SET {sets} WHERE parent_id = :_p AND id = :_i"
        args: dict[str, Any] = {**values, "_p": parent_id, "_i": sid}
        if expect is not None:
            sql += f" AND status IN ({', '.join(f':_e{n}' for n in range(len(expect)))})"
            args.update({f"_e{n}": s for n, s in enumerate(expect)})
        with self.tx() as conn:
            if conn.execute(sql, args).rowcount != 1:
                return None
            if event:
                self._event(conn, event[0], parent_id, event[1])
            row = conn.execute("SELECT * FROM subtasks WHERE parent_id = ? AND id = ?", (parent_id, sid)).fetchone()
        return _subtask(row)

    def delete_subtasks(self, parent_id: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM subtasks WHERE parent_id = ?", (parent_id,))
            conn.execute("DELETE FROM ultrawork_runs WHERE parent_id = ?", (parent_id,))

    def set_run(self, parent_id: str, **fields: Any) -> None:
        """Create or change a parent's orchestration run (status, parallel, merge, pid, times)."""
        with self.tx() as conn:
            if conn.execute("SELECT 1 FROM ultrawork_runs WHERE parent_id = ?", (parent_id,)).fetchone():
                if fields:
                    sets = ", ".join(f"{k} = :{k}" for k in fields)
                    conn.execute(f"UPDATE ultrawork_runs SET {sets} WHERE parent_id = :_p", {**fields, "_p": parent_id})
            else:
                row = {"status": "running", "parallel": 1, "merge": 1, "pid": None, "started_at": time.time(),
                       "finished_at": None, **fields, "parent_id": parent_id}
                conn.execute("INSERT INTO ultrawork_runs (parent_id, status, parallel, merge, pid, started_at,"
                             " finished_at) VALUES (:parent_id, :status, :parallel, :merge, :pid, :started_at,"
                             " :finished_at)", row)

    def run(self, parent_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM ultrawork_runs WHERE parent_id = ?", (parent_id,)).fetchone()
        return dict(row) if row is not None else None

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM ultrawork_runs", []
        if status:
            sql, args = sql + " WHERE status = ?", [status]
        return [dict(r) for r in self._conn().execute(sql, args)]

    # --- events ------------------------------------------------------------------------------

    def _event(self, conn: sqlite3.Connection, type_: str, task_id: str | None, payload: dict[str, Any]) -> None:
        if events.strict():
            events.check(type_, payload)  # the catalogue (taskbox.events) names every type and field
        conn.execute(
            "INSERT INTO events (type, task_id, ts, payload) VALUES (?, ?, ?, ?)",
            (type_, task_id, time.time(), json.dumps(self.redact(payload), sort_keys=True, default=str)),
        )

    def add_event(self, type_: str, task_id: str | None, payload: dict[str, Any] | None = None, *,
                  sample: str | None = None, limited: bool = True) -> bool:
        """Record an event, unless its task already had a burst of this type in this window.

        Returns whether it was written; one that is not is counted, and ends up in an
        aggregated event of the same type (``sample`` is what it keeps as an example).
        ``limited=False`` is for a writer that bounds its events itself (live command output).
        """
        if not limited:
            with self.tx() as conn:
                self._event(conn, type_, task_id, payload or {})
            return True
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
        self, task_id: str | None = None, after_id: int = 0, limit: int = 1000, *, newest: bool = False,
        types: Sequence[str] = (), exclude: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Events after ``after_id``, oldest first: the first ``limit`` of them, or with
        ``newest`` the last ``limit``; only of ``types``, none of ``exclude``."""
        sql = "SELECT * FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if task_id:
            sql += " AND task_id = ?"
            args.append(task_id)
        if types:
            sql += f" AND type IN ({', '.join('?' * len(types))})"
            args.extend(types)
        if exclude:
            sql += f" AND type NOT IN ({', '.join('?' * len(exclude))})"
            args.extend(exclude)
        sql += f" ORDER BY id {'DESC' if newest else ''} LIMIT ?"
        args.append(limit)
        rows = [{**dict(r), "payload": json.loads(r["payload"])} for r in self._conn().execute(sql, args)]
        return rows[::-1] if newest else rows


    def trim_events(self, task_id: str, type_: str, keep: int) -> int:
        """Delete a task's events of ``type_`` but the newest ``keep`` (live command output,
        whose whole result is in its ``task.exec`` event and the execution log); return how
        many went. Ids are never reused (AUTOINCREMENT), so a reader's cursor stays valid."""
        with self.tx() as conn:
            row = conn.execute("SELECT id FROM events WHERE task_id = ? AND type = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                               (task_id, type_, max(0, keep))).fetchone()
            if row is None:
                return 0
            return int(conn.execute("DELETE FROM events WHERE task_id = ? AND type = ? AND id <= ?",
                                    (task_id, type_, row[0])).rowcount)

    def last_event_id(self) -> int:
        """The id of the newest event (0 when there is none): where a live reader starts."""
        row = self._conn().execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    # --- records, tombstones and checkpoint rows (what a rebuild and doctor rely on) ------------

    def _record(self, task: Task) -> None:
        """Mirror a task row to ``records/<id>.json`` (best effort: the row is what counts)."""
        if self.records is None:
            return
        try:
            self.records.mkdir(mode=0o700, parents=True, exist_ok=True)
            data = json.dumps(task.to_row(), sort_keys=True).encode()
            tmp = self.records / f".{task.id}.json.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.records / f"{task.id}.json")
        except OSError:
            pass  # e.g. a full disk: the rebuild then falls back to the workspace's memory

    def overwrite_task(self, task: Task) -> None:
        """Replace a row with a newer copy of it (its record, after restoring an older backup)."""
        row = task.to_row()
        sets = ", ".join(f"{c} = :{c}" for c in _TASK_COLUMNS if c != "id")
        with self.tx() as conn:
            conn.execute(f"UPDATE tasks SET {sets} WHERE id = :id", row)
            self._event(conn, "task.refreshed", task.id, {"version": task.version})

    def tombstones(self) -> dict[str, dict[str, Any]]:
        """Tasks the registry removed, by id: their leftovers are known orphans."""
        return {r["task_id"]: dict(r) for r in self._conn().execute("SELECT * FROM tombstones")}

    def forget_tombstone(self, task_id: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM tombstones WHERE task_id = ?", (task_id,))

    def checkpoint_ids(self, task_id: str) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT id FROM checkpoints WHERE task_id = ?", (task_id,))}

    def insert_checkpoint_row(self, row: dict[str, Any]) -> bool:
        """Insert a checkpoint's row as found in its store (a rebuild); False if it was there already."""
        with self.tx() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO checkpoints (id, task_id, name, description, trigger, ref, parent_id, pinned,"
                " size_bytes, metadata, created_at) VALUES (:id, :task_id, :name, :description, :trigger, :ref,"
                " :parent_id, :pinned, :size_bytes, :metadata, :created_at)", row)
        return cur.rowcount == 1

    # --- backups and integrity -------------------------------------------------------------------

    def backup(self, reason: str = "manual") -> Path:
        """An online backup (SQLite's backup API) into ``backups``, written atomically, then rotated."""
        if self.backups is None:
            raise InvalidInput("this registry has no backup directory")
        try:
            self.backups.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryPermission(f"cannot create {self.backups}: {exc.strerror}") from exc
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"
        final = self.backups / f"registry-{stamp}.db"
        n = 1
        while final.exists():
            n += 1
            final = self.backups / f"registry-{stamp}-{n}.db"
        tmp = self.backups / f".{final.name}.{os.getpid()}.tmp"
        try:
            copy_database(self._conn(), tmp, final)
        except (sqlite3.Error, OSError) as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, sqlite3.Error):
                raise translate(exc, self.path, self.backups) from exc
            raise RegistryFull(f"could not write a backup of the registry to {self.backups}: {exc}") from exc
        for old in list_backups(self.backups)[max(self.backup_keep, 1):]:
            old.unlink(missing_ok=True)
        return final

    def _scheduled_backup(self) -> None:
        """After a write: a backup if the newest one is older than ``backup_every`` (checked now and then)."""
        if self.backups is None or self.backup_every <= 0:
            return
        now = time.time()
        if now < self._next_backup_check:
            return
        self._next_backup_check = now + min(BACKUP_CHECK_SECONDS, self.backup_every)
        newest = list_backups(self.backups)[:1]
        try:
            if not newest or now - newest[0].stat().st_mtime >= self.backup_every:
                self.backup(reason="scheduled")
        except (RegistryError, OSError):
            pass  # never fail the write that triggered it; `doctor` reports the age of the newest backup

    def check(self, quick: bool = True) -> list[str]:
        """``PRAGMA quick_check`` (or the full ``integrity_check``): the problems found, empty if sound."""
        pragma = "quick_check" if quick else "integrity_check"
        rows = [r[0] for r in self._conn().execute(f"PRAGMA {pragma}")]
        return [] if rows == ["ok"] else rows


def copy_database(src: sqlite3.Connection, tmp: Path, final: Path) -> None:
    """Copy an open database to ``final`` atomically and durably: SQLite's online backup into
    ``tmp`` (one self-contained file, no WAL), fsync, rename over ``final``, fsync the directory."""
    dst = sqlite3.connect(tmp)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
    finally:
        dst.close()
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def list_backups(backups: Path | None) -> list[Path]:
    """The registry backups in ``backups``, newest first."""
    if backups is None or not backups.is_dir():
        return []
    return sorted((p for p in backups.glob("registry-*.db") if p.is_file()), key=lambda p: p.name, reverse=True)


def verify_backup(path: Path) -> int:
    """Open ``path`` read-only and check it completely; return how many tasks it holds."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            if rows != ["ok"]:
                raise RegistryDamaged(f"backup {path.name} is damaged too ({rows[0]})", path=str(path))
            return int(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise RegistryDamaged(f"backup {path} cannot be used: {exc}", path=str(path)) from exc


def set_aside(db: Path) -> str | None:
    """Move a damaged (non-empty) registry and its WAL files aside as ``<name>.damaged.<time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = None
    for suffix in ("", "-wal", "-shm"):
        src = db.with_name(db.name + suffix)
        try:
            if suffix == "" and src.stat().st_size == 0:
                src.unlink()
                continue
            dst = db.with_name(f"{db.name}.damaged.{stamp}{suffix}")
            os.replace(src, dst)
            if suffix == "":
                kept = str(dst)
        except FileNotFoundError:
            continue
    return kept


def restore_backup(db: Path, backups: Path, name: str | None = None) -> dict[str, Any]:
    """Put the newest (or the named) verified backup in place of ``db``, keeping the damaged file aside."""
    candidates = list_backups(backups)
    if name:
        given = Path(name).expanduser()
        chosen = given if given.is_file() else backups / name
        if not chosen.is_file():
            raise NotFound(f"no backup {name!r} in {backups} (see `taskbox doctor --list-backups`)")
    elif candidates:
        chosen = candidates[0]
    else:
        raise NotFound(f"there is no backup in {backups}; rebuild the registry from disk with "
                       "`taskbox doctor --rebuild-registry`")
    tasks = verify_backup(chosen)
    kept = set_aside(db)
    tmp = db.with_name(f".{db.name}.restore.{os.getpid()}.tmp")
    try:
        src = sqlite3.connect(f"file:{chosen}?mode=ro", uri=True)
        try:
            copy_database(src, tmp, db)
        finally:
            src.close()
    except (sqlite3.Error, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise RegistryError(f"could not restore {chosen.name} to {db}: {exc}") from exc
    return {"restored_from": str(chosen), "damaged_copy": kept, "tasks": tasks}


# Every public method translates SQLite errors at the boundary (see `translate`).
for _name, _fn in list(vars(Registry).items()):
    if callable(_fn) and not _name.startswith("_") and _name not in ("tx", "close"):
        setattr(Registry, _name, _guarded(_fn))


def _subtask(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for key in Registry._SUBTASK_JSON:
        d[key] = json.loads(d[key] or "[]")
    return d


def _checkpoint(row: sqlite3.Row) -> dict[str, Any]:
    return {**dict(row), "metadata": json.loads(row["metadata"] or "{}")}


def _lease(row: sqlite3.Row) -> Lease:
    data = dict(row)
    data["mode"] = LockMode(data["mode"])
    return Lease(**data)
