"""Registry safety (issue 11): nothing the registry does not know is destroyed, the registry is
backed up and verifiable, and every registry fault is one line and an exit code.

Everything is real: SQLite files are deleted, truncated and overwritten, the home is made
immutable (root ignores permission bits, not ``chattr +i``), a tiny tmpfs holds a home and is
filled up, and the CLI and the MCP server run as subprocesses against real Docker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from taskbox import RegistryLocked, Status, TaskService, migrations
from taskbox.registry import Registry, list_backups
from taskbox.sandbox import LABEL_HOME

from .conftest import run_cli
from .test_mcp import stdio_params

REPAIR_HINT = "taskbox doctor --"


def one_line(r: subprocess.CompletedProcess[str], code: int = 10, *words: str) -> str:
    """The command failed with ``code`` and said so in exactly one line on stderr, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def drop_files(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)


def containers_of(docker_engine: Any, cid: str | None) -> list[dict[str, Any]]:
    return list(docker_engine.api.containers(all=True, filters={"id": cid})) if cid else []


# --- never destroy what the registry does not know ----------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_vanished_registry_destroys_nothing_and_comes_back(svc: TaskService, repo: Path, docker_engine,
                                                           how: str) -> None:
    a = svc.create_task(repo, "first task")
    b = svc.create_task(repo, "second task", lazy=True)
    svc.update_todos(a.id, [{"text": "keep me"}])
    svc.registry.close()
    db = svc.paths.db
    if how == "deleted":
        drop_files(db)
    else:
        db.write_bytes(b"")
    one_line(run_cli("list-tasks"), 10, "registry", REPAIR_HINT)
    line = one_line(run_cli("doctor", "--fix"), 10, "nothing was changed")
    assert "--restore-registry" in line and "home.json" in line
    assert Path(a.workspace_path, "Plan.md").is_file() and Path(b.workspace_path, "Plan.md").is_file()
    assert containers_of(docker_engine, a.container_id), "doctor --fix removed a container it did not know"
    r = run_cli("doctor", "--restore-registry", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["restored_from"] and b.id in res["adopted"] + res["refreshed"] + [a.id]
    fresh = TaskService(svc.paths.home)
    got = {t.id: t for t in fresh.list_tasks()}
    assert set(got) == {a.id, b.id}
    assert got[a.id].status is Status.ACTIVE and got[a.id].pending_op is None  # newer than the backup
    assert got[a.id].container_id == a.container_id and got[b.id].status is Status.PENDING
    assert [t["text"] for t in fresh.state(a.id)["todos"]] == ["keep me"]
    assert fresh.exec(a.id, "echo alive").stdout == "alive\n"
    assert not [f for f in fresh.doctor(fix=False) if f["kind"].startswith("orphan")]


def test_orphans_the_registry_did_not_remove_are_kept_and_adopted(svc: TaskService, repo: Path,
                                                                  docker_engine) -> None:
    task = svc.create_task(repo, "lost from the registry")
    svc.registry.close()
    conn = sqlite3.connect(svc.paths.db)  # the row vanishes without a tombstone (e.g. an old backup)
    conn.execute("DELETE FROM tasks WHERE id = ?", (task.id,))
    conn.commit()
    conn.close()
    r = run_cli("doctor", "--fix", "--json")
    assert r.returncode == 0, r.stderr
    orphans = {f["kind"]: f for f in json.loads(r.stdout) if f["task_id"] == task.id}
    assert set(orphans) == {"orphan-workspace", "orphan-container", "orphan-volume"}
    assert not any(f["fixed"] or f["fixable"] for f in orphans.values())
    assert "--adopt" in orphans["orphan-workspace"]["detail"]
    assert Path(task.workspace_path, ".task-memory", "state.json").is_file()
    [c] = containers_of(docker_engine, task.container_id)
    assert c["State"] == "running"
    r = run_cli("doctor", "--adopt", task.id, "--json")
    assert r.returncode == 0, r.stderr
    fresh = TaskService(svc.paths.home)
    back = fresh.get(task.id)
    assert (back.title, back.branch, back.container_id) == (task.title, task.branch, task.container_id)
    assert fresh.exec(task.id, "head -1 Plan.md").stdout.startswith("# Plan")
    one_line(run_cli("doctor", "--adopt", task.id), 4, "already")


def test_removed_tasks_leftovers_go_to_the_trash_then_are_purged(svc: TaskService, repo: Path,
                                                                 docker_engine) -> None:
    task = svc.create_task(repo, "tombstoned")
    svc.exec(task.id, "echo precious > work.txt")
    svc.registry.delete_task(task.id, reason="test")  # the registry removed it: a tombstone
    found = {f["kind"]: f for f in svc.doctor(fix=True) if f["task_id"] == task.id}
    assert found["orphan-workspace"]["fixed"] and found["orphan-container"]["fixed"]
    assert not Path(task.workspace_path).exists()
    [entry] = [d for d in svc.paths.trash.iterdir() if (d / "workspace").exists()]
    assert (entry / "volume.img").is_file()  # the workspace's data, unmounted and kept
    [c] = containers_of(docker_engine, task.container_id)
    assert c["State"] != "running"
    assert svc.doctor() == []  # the trash is not reported again
    for d in svc.paths.trash.iterdir():  # eight days pass
        data = json.loads((d / "entry.json").read_text())
        data["trashed_at"] -= 8 * 86400
        (d / "entry.json").write_text(json.dumps(data))
    purged = [f for f in svc.doctor(fix=True) if f["kind"] == "trash-expired"]
    assert len(purged) == 2 and all(f["fixed"] for f in purged)
    assert list(svc.paths.trash.iterdir()) == []
    assert not containers_of(docker_engine, task.container_id)


# --- backups, damage, restore and rebuild ----------------------------------------------------------


def test_damaged_registry_is_one_line_everywhere_and_restored(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "survives damage")
    svc.update_todos(task.id, [{"text": "after the backup"}])
    svc.registry.close()
    with open(svc.paths.db, "r+b") as fh:
        fh.write(b"\xde\xad\xbe\xef" * 25)  # the first bytes overwritten
    for args in (["list-tasks"], ["show", task.id], ["todo", task.id, "--add", "more"],
                 ["exec", task.id, "--", "true"], ["doctor"], ["doctor", "--fix"], ["checkpoint", "list", task.id]):
        one_line(run_cli(*args), 10, "damaged", "--restore-registry")

    async def tools() -> None:
        async with Client(stdio_params()) as client:
            for tool, args in (("list_active_tasks", {}), ("get_task_status", {"task_id": task.id}),
                               ("execute_in_task", {"task_id": task.id, "command": "true"}),
                               ("update_task_todos", {"task_id": task.id, "todos": [{"text": "x"}]})):
                res = await client.call_tool(tool, args)
                assert res.is_error, tool
                text = res.content[0].text
                assert "damaged" in text and "--restore-registry" in text and "\n" not in text, text
                assert res.structured_content["error"] == "registry_damaged"

    anyio.run(tools)
    r = run_cli("doctor", "--restore-registry")
    assert r.returncode == 0, r.stderr
    assert "kept as" in r.stdout
    damaged = list(svc.paths.home.glob("registry.db.damaged.*"))
    assert damaged and damaged[0].read_bytes().startswith(b"\xde\xad\xbe\xef")
    fresh = TaskService(svc.paths.home)
    assert fresh.get(task.id).status is Status.ACTIVE
    assert fresh.exec(task.id, "echo ok").stdout == "ok\n"
    assert not [f for f in fresh.doctor(fix=False) if f["kind"] in ("registry-damaged", "orphan-workspace")]


@pytest.mark.parametrize("records", ["kept", "lost"])
def test_rebuild_from_disk_without_backups(svc: TaskService, repo: Path, records: str) -> None:
    a = svc.create_task(repo, "alpha feature")
    b = svc.create_task(repo, "beta fix", lazy=True)
    c = svc.create_task(repo, "gamma cleanup")
    svc.abort(c.id, "not needed")
    svc.create_checkpoint(a.id, "before-rebuild")
    svc.registry.close()
    shutil.rmtree(svc.paths.backups)
    drop_files(svc.paths.db)
    if records == "lost":
        shutil.rmtree(svc.paths.records)
    one_line(run_cli("show", a.id), 10, "no backup exists", "--rebuild-registry")
    r = run_cli("doctor", "--restore-registry", "--json")  # no backup: rebuilt from disk
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["adopted"]) == {a.id, b.id, c.id}
    fresh = TaskService(svc.paths.home)
    for old in (a, b, c):
        new = fresh.get(old.id)
        assert (new.id, new.title, new.branch) == (old.id, old.title, old.branch)
    if records == "kept":  # the registry's own records: everything, statuses exact
        assert [fresh.get(t.id).status for t in (a, b, c)] == [Status.ACTIVE, Status.PENDING, Status.ABORTED]
        assert fresh.get(a.id).repo_path == a.repo_path
    else:  # the workspaces' memory and the container labels: no agent is attached any more
        assert fresh.get(a.id).status is Status.PAUSED and fresh.get(a.id).container_id == a.container_id
    assert [cp["name"] for cp in fresh.list_checkpoints(a.id)] == ["before-rebuild"]
    assert fresh.exec(a.id, "echo rebuilt").stdout == "rebuilt\n"
    fresh.doctor(fix=True)
    assert Path(a.workspace_path).is_dir() and Path(b.workspace_path).is_dir()


def test_backups_are_online_rotated_and_taken_before_migrations(tmp_path: Path) -> None:
    db, backups = tmp_path / "registry.db", tmp_path / "backups"
    full = list(migrations.MIGRATIONS)
    try:  # the oldest schema, holding rows
        migrations.MIGRATIONS[:] = full[:1]
        Registry(db).close()
    finally:
        migrations.MIGRATIONS[:] = full
    conn = sqlite3.connect(db)
    now = time.time()
    for i in range(3):
        conn.execute("INSERT INTO tasks (id, title, description, status, repo_path, branch, base_ref, workspace_path,"
                     " image, agent, model, memory_limit, cpu_limit, pids_limit, created_at, last_active) VALUES"
                     " (?, ?, '', 'paused', '/r', ?, 'main', '/w', 'img', 'a', 'm', '2g', 1, 512, ?, ?)",
                     (f"t{i}", f"task {i}", f"b/{i}", now, now))
    conn.execute("INSERT INTO events (type, task_id, ts, payload) VALUES ('x', 't0', 1, '{}')")
    conn.commit()
    conn.close()
    reg = Registry(db, backups=backups, backup_keep=2)  # migrates: m002.. on top of rows
    assert [t.title for t in reg.list_tasks()] == ["task 0", "task 1", "task 2"]
    assert reg.events("t0")[0]["type"] == "x"
    assert reg.tombstones() == {}
    [before] = list_backups(backups)
    old = sqlite3.connect(before)
    assert [r[0] for r in old.execute("SELECT name FROM _migrations")] == [full[0][0]]
    assert old.execute("SELECT count(*) FROM tasks").fetchone()[0] == 3
    old.close()
    for _ in range(3):
        reg.backup()
    kept = list_backups(backups)
    assert len(kept) == 2 and before not in kept
    assert reg.check(quick=False) == []


def test_scheduled_backup_on_write(tmp_path: Path) -> None:
    backups = tmp_path / "b"
    reg = Registry(tmp_path / "r.db", backups=backups, backup_every=3600)
    assert list_backups(backups) == []
    reg.add_event("task.synced", None, {"commit": "one"})
    [first] = list_backups(backups)
    reg.add_event("task.synced", None, {"commit": "two"})  # within the interval: no new backup
    assert list_backups(backups) == [first]
    copy = sqlite3.connect(first)
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r[0] for r in copy.execute("SELECT type FROM events")] == ["task.synced"]


# --- one line per fault ------------------------------------------------------------------------


def test_locked_registry_is_a_registry_locked_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    holder = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        reg._conn().execute("PRAGMA busy_timeout=200")
        with pytest.raises(RegistryLocked) as err:
            reg.add_event("blocked", None)
        assert "locked" in err.value.message and err.value.exit_code == 10
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_registry_is_one_line(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "read only home", lazy=True)
    svc.registry.close()
    with immutable(svc.paths.home):
        for args in (["list-tasks"], ["show", task.id], ["todo", task.id, "--add", "x"],
                     ["exec", task.id, "--", "true"], ["doctor"]):
            one_line(run_cli(*args), 10, "cannot be opened or written")
    with immutable(svc.paths.db):  # the directory is writable, the file is not
        one_line(run_cli("todo", task.id, "--add", "x"), 10, "registry")


@pytest.fixture
def small_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docker_engine) -> Iterator[Path]:
    """TASKBOX_HOME on its own 48 MiB tmpfs (plain workspace directories: no loop volumes)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], check=True)
    monkeypatch.setenv("TASKBOX_HOME", str(mnt / "home"))
    monkeypatch.setenv("TASKBOX_WORKSPACE_QUOTA", "0")
    try:
        yield mnt / "home"
    finally:
        label = hashlib.sha256(str((mnt / "home").resolve()).encode()).hexdigest()[:16]
        for c in docker_engine.api.containers(all=True, filters={"label": f"{LABEL_HOME}={label}"}):
            docker_engine.api.remove_container(c["Id"], force=True)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_line(small_home: Path, repo: Path) -> None:
    svc = TaskService(small_home)
    task = svc.create_task(repo, "full disk")
    svc.registry.close()
    fd = os.open(small_home / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # fill the file system up to the last block
        for size in (1 << 20, 4096, 512):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    for args in (["todo", task.id, "--add", "no room"], ["exec", task.id, "--", "echo", "hi"],
                 ["checkpoint", "create", task.id, "full"]):
        r = run_cli(*args)
        assert r.returncode != 0, (args, r.stdout)
        line = one_line(r, r.returncode)
        assert "internal error" not in line and ("full" in line or "space" in line.lower()), line
    (small_home / "filler").unlink()
    r = run_cli("todo", task.id, "--add", "room again")
    assert r.returncode == 0, r.stderr
    os.sync()
