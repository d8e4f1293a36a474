"""A new workspace's checkout and first commits, made with as few git processes as they allow.

Real git throughout: the shortcuts (one ``fast-import`` for the companion memory ref, one
``git add`` with exclude pathspecs, plain branch names checked without git) must give exactly
what the longer ways give.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from taskbox import TaskService, quota, workspace
from taskbox import git as taskgit
from taskbox.confine import sandbox_owner
from taskbox.pool import Pool
from taskbox.sandbox import LABEL_HOME
from taskbox.workspace import memory_ref

from .conftest import git as git_in


def git(repo: Path, *args: str) -> str:
    """git as the test's user in a workspace handed over to the sandbox user."""
    return git_in(repo, "-c", "safe.directory=*", *args)


def tree(repo: Path, ref: str) -> list[str]:
    """``mode type sha\tpath`` of every entry under ``ref``, recursively."""
    return git(repo, "ls-tree", "-r", "--full-tree", ref).splitlines()


def fresh(repo: Path, dest: Path, branch: str = "task/one", *, clean: bool = True) -> Path:
    workspace.create(repo, dest, branch, git(repo, "rev-parse", "HEAD").strip(), clean=clean)
    return dest


def write_memory(ws: Path, odd: bool = False) -> None:
    mem = ws / ".task-memory"
    (mem / "notes" / "deep").mkdir(parents=True)
    (mem / "state.json").write_text('{"status": "pending"}\n')
    (mem / "conversations.jsonl").write_bytes(b"")
    (mem / "notes" / "deep" / "a b.md").write_text("spaces in a name\n")
    (mem / "run.sh").write_text("#!/bin/sh\n")
    (mem / "run.sh").chmod(0o755)
    os.symlink("state.json", mem / "link")
    (ws / "Plan.md").write_text("# Plan\n")
    if odd:  # names a fast-import stream cannot carry unquoted
        (mem / "line\nbreak").write_text("x\n")
        (mem / '"quoted').write_text("y\n")


@pytest.mark.parametrize("odd", [False, True])
def test_the_memory_ref_holds_what_git_add_would_commit(repo: Path, tmp_path: Path, odd: bool) -> None:
    ws = fresh(repo, tmp_path / "ws")
    write_memory(ws, odd)
    twin = tmp_path / "twin"
    shutil.copytree(ws, twin, symlinks=True)
    workspace._save_memory_host(ws, memory_ref("task/one"))  # fast-import (or the index, for odd names)
    workspace._save_memory_index(twin, memory_ref("task/one"))  # add --force, write-tree, commit-tree
    ref = memory_ref("task/one")
    assert tree(ws, ref) == tree(twin, ref)
    assert any(line.startswith("100755 ") and line.endswith("run.sh") for line in tree(ws, ref))
    assert any(line.startswith("120000 ") and line.endswith("link") for line in tree(ws, ref))
    assert git(ws, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%s|%P", ref) == \
        "taskbox <taskbox@localhost>|taskbox <taskbox@localhost>|taskbox: task memory|\n"
    assert git(ws, "show", f"{ref}:Plan.md") == "# Plan\n"
    if not odd:  # kept as one pack: no `unpack-objects` process into loose objects
        sha = git(ws, "rev-parse", ref).strip()
        assert not (ws / ".git" / "objects" / sha[:2] / sha[2:]).exists()


def test_the_first_commit_takes_new_work_and_leaves_memory_and_bytecode_out(repo: Path, tmp_path: Path) -> None:
    ws = fresh(repo, tmp_path / "ws")
    write_memory(ws)
    (ws / "new.txt").write_text("from a task_start hook\n")
    (ws / "README.md").write_text("# changed\n")
    (ws / "pkg" / "__pycache__").mkdir(parents=True)
    (ws / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    (ws / "x.pyc").write_bytes(b"\0")
    start_tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    assert workspace.commit_fresh(ws, "taskbox: start", clean=True, branch="task/one", tracked=[False, False],
                                  tree=start_tree)
    on_branch = git(ws, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert sorted(on_branch) == ["README.md", "app.py", "new.txt"]
    assert git(ws, "log", "-1", "--format=%s", "HEAD") == "taskbox: start\n"
    assert "Plan.md" in git(ws, "ls-tree", "-r", "--name-only", memory_ref("task/one")).split()
    # nothing new: no commit, and the branch stays at the start commit
    ws2 = fresh(repo, tmp_path / "ws2", "task/two")
    write_memory(ws2)
    assert not workspace.commit_fresh(ws2, "taskbox: start", clean=True, branch="task/two",
                                      tracked=[False, False], tree=start_tree)
    assert git(ws2, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")


def test_a_tracked_plan_stays_at_its_start_commit(repo: Path, tmp_path: Path) -> None:
    (repo / "Plan.md").write_text("# the project's plan\n")
    git(repo, "add", "Plan.md")
    git(repo, "commit", "-qm", "plan")
    ws = fresh(repo, tmp_path / "ws")
    write_memory(ws)  # overwrites Plan.md with taskbox's notes
    (ws / "new.txt").write_text("work\n")
    assert workspace.commit_fresh(ws, "taskbox: start", clean=True, branch="task/one")
    assert git(ws, "show", "HEAD:Plan.md") == "# the project's plan\n"
    assert "new.txt" in git(ws, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert ".task-memory/state.json" not in git(ws, "ls-tree", "-r", "--name-only", "HEAD").split()


def test_memory_on_the_branch_is_committed_there(repo: Path, tmp_path: Path) -> None:
    ws = fresh(repo, tmp_path / "ws", clean=False)
    write_memory(ws)
    (ws / "x.pyc").write_bytes(b"\0")
    assert workspace.commit_fresh(ws, "taskbox: start", clean=False, branch="task/one")
    on_branch = git(ws, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert "Plan.md" in on_branch and ".task-memory/state.json" in on_branch and "x.pyc" not in on_branch
    assert subprocess.run(["git", "-c", "safe.directory=*", "rev-parse", "--verify", "--quiet", memory_ref("task/one")], cwd=ws,
                          capture_output=True).returncode != 0


NAMES = ["main", "agent/claude-fix-login", "a.b/c_d-e", "x.lockx", "a..b", "a/.b", ".a", "a.lock", "a/b.lock/c",
         "a.", "a/", "a//b", "-a", "HEAD", "a@{b", "@", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b",
         "a/-b", "Ünï", "a\tb", "/a", "a/b/"]


@pytest.mark.parametrize("name", NAMES)
def test_branch_names_checked_without_git_agree_with_git(name: str) -> None:
    by_git = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True).returncode == 0
    assert taskgit.check_ref_format(name) == by_git


# --- spare workspace volumes (made ahead by the pool's filler) --------------------------------

MIB = 1 << 20


def spares_of(volumes: Path) -> list[Path]:
    return sorted((volumes / quota.SPARES).glob("*/*.img"))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_create_takes_a_spare_volume_and_the_filler_tops_up_and_tidies(tmp_path: Path) -> None:
    volumes, workspaces = tmp_path / "volumes", tmp_path / "workspaces"
    owner = sandbox_owner()
    try:
        assert quota.make_spares(volumes, 64 * MIB, 2000, owner, 2) == {"made": 2, "removed": 0}
        inodes = {p.stat().st_ino for p in spares_of(volumes)}
        image, ws = volumes / "t1.img", workspaces / "t1"
        quota.create_volume(image, ws, 64 * MIB, 2000, owner, spares=volumes)
        assert image.stat().st_ino in inodes and len(spares_of(volumes)) == 1  # renamed, not made
        assert quota.is_mounted(image, ws) and os.listdir(ws) == []  # empty: no lost+found
        assert (ws.stat().st_uid, ws.stat().st_gid) == owner
        (ws / "work.txt").write_text("mine\n")
        # another profile has no spare: made with mkfs as before
        quota.create_volume(volumes / "t2.img", workspaces / "t2", 128 * MIB, 2000, owner, spares=volumes)
        assert len(spares_of(volumes)) == 1
        # leftovers of a filler and a taker that died, and a spare of a profile no longer wanted
        folder = spares_of(volumes)[0].parent
        pid = dead_pid()
        for name in (f".fill.{pid}.ab.tmp", f".claim.{pid}.cd"):
            (folder / name).write_bytes(b"")
        (folder / f".fill.{os.getpid()}.live.tmp").write_bytes(b"")  # a live filler's: kept
        other = volumes / quota.SPARES / "1-2-3-4"
        other.mkdir()
        (other / "x.img").write_bytes(b"")
        assert quota.make_spares(volumes, 64 * MIB, 2000, owner, 2) == {"made": 1, "removed": 3}
        assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".img")) == \
            [f".fill.{os.getpid()}.live.tmp"]
        assert not other.exists() and len(spares_of(volumes)) == 2
        assert (ws / "work.txt").read_text() == "mine\n"  # the task's volume is nobody's spare
        assert quota.drain_spares(volumes) == 2 and spares_of(volumes) == []
    finally:
        quota.release_all(volumes, workspaces)


def test_the_pool_keeps_spare_volumes_and_a_create_mounts_one(home: Path, repo: Path, docker_engine: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKBOX_POOL_SIZE", "1")
    monkeypatch.setenv("TASKBOX_MEMORY", "256m")
    monkeypatch.setenv("TASKBOX_WORKSPACE_QUOTA", "64m")
    service = TaskService(home)
    try:
        out = service.pool_fill()
        assert out["spare_volumes"] == {"made": 1, "removed": 0}
        spare = spares_of(service.paths.volumes)[0].stat().st_ino
        task = service.create_task(repo, "from a spare", lazy=True)
        image = service.paths.volume(task.id)
        assert image.stat().st_ino == spare and spares_of(service.paths.volumes) == []
        assert quota.is_mounted(image, Path(task.workspace_path))
        assert (Path(task.workspace_path) / "README.md").read_text() == "# demo\n"
        second = service.create_task(repo, "no spare left", lazy=True)  # made with mkfs, as before
        assert quota.is_mounted(service.paths.volume(second.id), Path(second.workspace_path))
        assert service.pool_fill()["spare_volumes"] == {"made": 1, "removed": 0}
        service.pool_drain()
        assert spares_of(service.paths.volumes) == []
    finally:
        for c in docker_engine.api.containers(all=True, filters={"label": f"{LABEL_HOME}={service.home_label}"}):
            service.sandbox.remove(c["Id"])
        pool = Pool(service.paths.pool)
        for s in pool.slots():
            pool.release(s.id)
        pool.close()
