"""Registry schema: migrations applied on open, from the oldest (empty) schema, idempotently."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from taskbox import migrations
from taskbox.registry import Registry


def test_migrations_from_empty_database(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    Registry(db).close()
    conn = sqlite3.connect(db)
    applied = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]
    assert applied == [name for name, _ in migrations.MIGRATIONS]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tasks", "agent_sessions", "leases", "checkpoints", "events"} <= tables
    cols = {r[1] for r in conn.execute("PRAGMA table_info(tasks)")}
    for spec_field in ("id", "title", "description", "status", "branch", "workspace_path", "container_id",
                       "image", "memory_limit", "cpu_limit", "network", "lock_mode", "parent_id", "task_type",
                       "dependencies", "integration_target", "template", "created_at", "last_active",
                       "metadata", "version"):
        assert spec_field in cols
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_applies_nothing_new(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    Registry(db).close()
    conn = sqlite3.connect(db)
    conn.isolation_level = None
    assert migrations.apply(conn) == []


def test_each_migration_applies_on_top_of_the_previous_ones(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "step.db")
    conn.isolation_level = None
    full = list(migrations.MIGRATIONS)
    try:
        for i in range(1, len(full) + 1):
            migrations.MIGRATIONS[:] = full[:i]
            assert migrations.apply(conn) == [full[i - 1][0]]
    finally:
        migrations.MIGRATIONS[:] = full
