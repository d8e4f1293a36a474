"""Attacks on the warm pool (taskbox.pool): real Docker, real mounts.

A slot's container runs before any task owns it, and after a claim it runs the task's
(hostile) code in a container whose /workspace was a shared pool directory a moment ago.
These tests are what such code tries: write or plant links in the slot directory before the
claim, reach the directory under the bind, see another slot's or task's workspace, and make a
cleanup unmount or delete something that is not its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from taskbox import TaskService

from .test_pool import _mounts_under, _sh, pooled  # noqa: F401 - the fixture


def test_a_slot_cannot_be_prepared_before_its_claim(pooled: TaskService, repo: Path) -> None:  # noqa: F811
    svc = pooled
    svc.tick()
    free = [s for s in svc.pool.slots() if s.state == "free"]
    assert len(free) == 2
    # The unclaimed container is the sandbox user: its /workspace (the slot's ws/) is root's.
    r = svc.sandbox.capture(free[0].container_id, ["sh", "-c",
                            "touch /workspace/planted; ln -s / /workspace/root; mkdir /workspace/d; "
                            "ls -A /workspace | wc -l"], timeout=60)
    assert r.stdout.decode().split()[-1] == "0", r
    assert r.stderr.count("Permission denied") == 3, r.stderr
    assert os.listdir(free[0].ws) == []


def test_a_claimed_slot_sees_its_own_workspace_only(pooled: TaskService, repo: Path) -> None:  # noqa: F811
    svc = pooled
    svc.tick()
    a = svc.create_task(repo, "pooled a")
    b = svc.create_task(repo, "pooled b")
    slots = {s.task_id: s for s in svc.pool.slots()}
    assert set(slots) >= {a.id, b.id}
    Path(b.workspace_path, "b-only.txt").write_text("b\n")
    # Processes started before the claim (init, the exec agent) still have the slot's own
    # directory as their working directory: what is under the bind is empty and read-only.
    out = _sh(svc, a.id, "for p in /proc/[0-9]*; do ls -A $p/cwd/ 2>/dev/null; done | sort -u; "
                         "touch /proc/1/cwd/x 2>&1; true")
    assert "b-only.txt" not in out and "Permission denied" in out
    # No other slot, no other workspace, no pool directory in its mounts or its file system.
    mounts = _sh(svc, a.id, "cat /proc/self/mountinfo")
    assert slots[b.id].id not in mounts and b.workspace_path not in mounts
    assert _sh(svc, a.id, "find / -xdev -name b-only.txt 2>/dev/null; find /workspace -name b-only.txt; true") == ""
    # Its writes land in its own workspace only.
    _sh(svc, a.id, "echo a > a-only.txt")
    assert Path(a.workspace_path, "a-only.txt").read_text() == "a\n"
    assert not Path(b.workspace_path, "a-only.txt").exists() and os.listdir(slots[b.id].path / "ws") != []


def test_a_task_s_cleanup_unmounts_its_own_slot_only(pooled: TaskService, repo: Path) -> None:  # noqa: F811
    svc = pooled
    svc.tick()
    a = svc.create_task(repo, "cleaned")
    b = svc.create_task(repo, "kept")
    slot_a = next(s for s in svc.pool.slots() if s.task_id == a.id)
    slot_b = next(s for s in svc.pool.slots() if s.task_id == b.id)
    # The task writes links and look-alike names into its workspace first: none is followed.
    _sh(svc, a.id, f"ln -s {slot_b.ws} ws; ln -s / claimed; mkdir -p {slot_b.id}/ws; ln -s /workspace free")
    svc.abort(a.id, "done with it")
    svc.cleanup(a.id)
    assert not slot_a.path.exists()
    assert str(slot_a.ws) not in _mounts_under(svc.paths.pool)
    assert str(slot_b.ws) in _mounts_under(svc.paths.pool)
    assert svc.pool.bound(slot_b, Path(b.workspace_path))
    assert _sh(svc, b.id, "cat app.py") == "print('hello')\n"
    assert Path(a.workspace_path, "app.py").exists()  # its workspace was unmounted from the slot, not deleted
