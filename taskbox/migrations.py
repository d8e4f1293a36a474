"""Registry schema migrations, applied in order when the registry is opened.

Each migration is a function registered with :func:`migration`; its name is recorded in the
``_migrations`` table once applied. Never edit an applied migration: add a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


def pending(conn: sqlite3.Connection) -> tuple[list[str], bool]:
    """The migrations not yet applied, and whether the database already holds a schema."""
    has = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'").fetchone()
    applied = {r[0] for r in conn.execute("SELECT name FROM _migrations")} if has else set()
    return [name for name, _ in MIGRATIONS if name not in applied], bool(applied)


def apply(conn: sqlite3.Connection) -> list[str]:
    """Apply every migration not yet applied, each in its own transaction; return their names."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    applied = {r[0] for r in conn.execute("SELECT name FROM _migrations")}
    done = []
    for name, fn in MIGRATIONS:
        if name in applied:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have applied it while we waited for the write lock.
            if conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone():
                conn.execute("ROLLBACK")
                continue
            fn(conn)
            conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, strftime('%s','now'))",
                (name,),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        done.append(name)
    return done


@migration
def m001_initial(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            description TEXT NOT NULL,
            status TEXT NOT NULL,
            repo_path TEXT NOT NULL,
            branch TEXT NOT NULL,
            base_ref TEXT NOT NULL,
            workspace_path TEXT NOT NULL,
            image TEXT NOT NULL,
            agent TEXT NOT NULL,
            model TEXT NOT NULL,
            container_id TEXT,
            container_state TEXT NOT NULL DEFAULT 'none',
            memory_limit TEXT NOT NULL,
            cpu_limit REAL NOT NULL,
            pids_limit INTEGER NOT NULL,
            network TEXT NOT NULL DEFAULT 'none',
            lock_mode TEXT NOT NULL DEFAULT 'exclusive',
            parent_id TEXT REFERENCES tasks(id),
            task_type TEXT NOT NULL DEFAULT 'main',
            dependencies TEXT NOT NULL DEFAULT '[]',
            integration_target TEXT,
            template TEXT,
            metadata TEXT NOT NULL DEFAULT '{}',
            pending_op TEXT,
            op_pid INTEGER,
            created_at REAL NOT NULL,
            last_active REAL NOT NULL,
            completed_at REAL,
            version INTEGER NOT NULL DEFAULT 1
        )
        """
    )
    # One branch per repository: two tasks racing for a name cannot both win it.
    conn.execute("CREATE UNIQUE INDEX tasks_repo_branch ON tasks (repo_path, branch)")
    conn.execute("CREATE INDEX tasks_status ON tasks (status)")
    conn.execute(
        """
        CREATE TABLE agent_sessions (
            id TEXT PRIMARY KEY,
            task_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
            agent TEXT NOT NULL,
            model TEXT NOT NULL,
            attached_at REAL NOT NULL,
            detached_at REAL
        )
        """
    )
    conn.execute("CREATE INDEX sessions_task ON agent_sessions (task_id)")
    conn.execute(
        """
        CREATE TABLE leases (
            task_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
            session_id TEXT NOT NULL,
            agent TEXT NOT NULL,
            mode TEXT NOT NULL,
            acquired_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (task_id, session_id)
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE checkpoints (
            id TEXT PRIMARY KEY,
            task_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            trigger TEXT NOT NULL DEFAULT 'manual',
            ref TEXT NOT NULL,
            parent_id TEXT,
            pinned INTEGER NOT NULL DEFAULT 0,
            size_bytes INTEGER NOT NULL DEFAULT 0,
            metadata TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX checkpoints_task ON checkpoints (task_id, created_at)")
    conn.execute(
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            type TEXT NOT NULL,
            task_id TEXT,
            ts REAL NOT NULL,
            payload TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    conn.execute("CREATE INDEX events_task ON events (task_id, id)")


@migration
def m002_lease_waiters(conn: sqlite3.Connection) -> None:
    # Agents waiting for a held task, served first come, first served. A waiter that stops
    # refreshing `seen_at` (it gave up or crashed) drops out of the queue.
    conn.execute(
        """
        CREATE TABLE lease_waiters (
            task_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
            session_id TEXT NOT NULL,
            agent TEXT NOT NULL,
            enqueued_at REAL NOT NULL,
            seen_at REAL NOT NULL,
            PRIMARY KEY (task_id, session_id)
        )
        """
    )


@migration
def m003_rate_windows(conn: sqlite3.Connection) -> None:
    # Per task, per stream ("event" or "audit") and per kind: the current rate-limit window.
    # Records past the burst are only counted here, and written as one aggregated record
    # when the window closes or is flushed (taskbox.registry.Registry.admit).
    conn.execute(
        """
        CREATE TABLE rate_windows (
            task_id TEXT NOT NULL,
            stream TEXT NOT NULL,
            key TEXT NOT NULL,
            started_at REAL NOT NULL,
            admitted INTEGER NOT NULL DEFAULT 0,
            suppressed INTEGER NOT NULL DEFAULT 0,
            first_at REAL,
            last_at REAL,
            samples TEXT NOT NULL DEFAULT '[]',
            PRIMARY KEY (task_id, stream, key)
        )
        """
    )


@migration
def m004_tombstones(conn: sqlite3.Connection) -> None:
    # What the registry knew about a task it removed: a workspace or container left behind
    # with a tombstone is a known orphan (`doctor --fix` may trash it); one without is not
    # (it may be a task the registry lost, and is only reported).
    conn.execute(
        """
        CREATE TABLE tombstones (
            task_id TEXT PRIMARY KEY,
            branch TEXT NOT NULL DEFAULT '',
            workspace_path TEXT NOT NULL DEFAULT '',
            container_id TEXT,
            reason TEXT NOT NULL DEFAULT '',
            removed_at REAL NOT NULL
        )
        """
    )


@migration
def m005_subtasks(conn: sqlite3.Connection) -> None:
    # Ultrawork (taskbox.ultrawork): a parent's sub-tasks and their orchestration state, so a
    # run killed at any moment resumes without redoing or re-merging anything.
    conn.execute(
        """
        CREATE TABLE subtasks (
            parent_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
            id TEXT NOT NULL,
            position INTEGER NOT NULL,
            title TEXT NOT NULL,
            agent TEXT NOT NULL DEFAULT 'shell',
            command TEXT NOT NULL DEFAULT '',
            prompt TEXT NOT NULL DEFAULT '',
            depends_on TEXT NOT NULL DEFAULT '[]',
            timeout REAL,
            status TEXT NOT NULL DEFAULT 'pending',
            task_id TEXT,
            branch TEXT,
            tip TEXT,
            exit_code INTEGER,
            started_at REAL,
            finished_at REAL,
            merged_at REAL,
            merge_commit TEXT,
            conflict_files TEXT NOT NULL DEFAULT '[]',
            error TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL,
            PRIMARY KEY (parent_id, id)
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE ultrawork_runs (
            parent_id TEXT PRIMARY KEY REFERENCES tasks(id) ON DELETE CASCADE,
            status TEXT NOT NULL,
            parallel INTEGER NOT NULL,
            merge INTEGER NOT NULL DEFAULT 1,
            pid INTEGER,
            started_at REAL NOT NULL,
            finished_at REAL
        )
        """
    )


@migration
def m006_lease_holders(conn: sqlite3.Connection) -> None:
    # The process holding a lease, when it is a long-lived one (the MCP server):
    # "host|boot id|pid|start time" (taskbox.liveness). A lease whose holder is dead is taken
    # over at once, not after it expires.
    conn.execute("ALTER TABLE leases ADD COLUMN holder TEXT")
