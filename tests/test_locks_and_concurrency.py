"""Leases (exclusive / collaborative), optimistic locking and races on real registries."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from taskbox import ConcurrentModification, TaskLocked, TaskService
from taskbox.errors import SandboxError

from .conftest import git


def test_second_exclusive_attach_is_refused_naming_the_holder(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "exclusive work")
    svc.attach(task.id, "alice", "m1", "s-alice")
    with pytest.raises(TaskLocked) as err:
        svc.attach(task.id, "bob", "m2", "s-bob")
    assert "alice" in err.value.message and "s-alice" in err.value.message
    assert [le.agent for le in svc.registry.leases(task.id)] == ["alice"]
    assert [s.agent for s in svc.registry.sessions(task.id, open_only=True)] == ["alice"]


def test_waiting_attach_gets_the_task_when_released(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "queue")
    svc.attach(task.id, "alice", session_id="s-a")
    timer = threading.Timer(0.5, lambda: svc.detach(task.id, "s-a"))
    timer.start()
    res = svc.attach(task.id, "bob", session_id="s-b", wait=10)
    timer.join(30)  # the detach finishes (commit and fetch) before the containers are removed
    assert res.session.agent == "bob"


def test_waiters_are_served_first_come_first_served(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "popular task")
    svc.attach(task.id, "alice", session_id="s-a")
    order: list[str] = []

    def wait_for(agent: str) -> None:
        res = TaskService(svc.paths.home).attach(task.id, agent, session_id=f"s-{agent}", wait=20)
        order.append(res.session.agent)
        time.sleep(0.5)  # work a little, then hand over
        TaskService(svc.paths.home).detach(task.id, f"s-{agent}")

    bob = threading.Thread(target=wait_for, args=("bob",))
    bob.start()
    time.sleep(0.6)  # bob is queued first
    carol = threading.Thread(target=wait_for, args=("carol",))
    carol.start()
    time.sleep(0.6)
    with pytest.raises(TaskLocked, match="waiting before you"):  # no jumping the queue
        svc.attach(task.id, "dave", session_id="s-dave")
    svc.detach(task.id, "s-a")
    bob.join(30)
    carol.join(30)
    assert order == ["bob", "carol"]
    assert svc.registry._conn().execute("SELECT COUNT(*) FROM lease_waiters").fetchone()[0] == 0


def test_a_waiter_that_gives_up_leaves_the_queue(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "impatient")
    svc.attach(task.id, "alice", session_id="s-a")
    with pytest.raises(TaskLocked):
        svc.attach(task.id, "bob", session_id="s-b", wait=0.5)
    svc.detach(task.id, "s-a")
    assert svc.attach(task.id, "carol", session_id="s-c").session.agent == "carol"


def test_collaborative_allows_several_agents_up_to_the_limit(svc: TaskService, repo: Path) -> None:
    svc.settings.collaborative_max_agents = 2
    task = svc.create_task(repo, "pairing", lock_mode="collaborative")
    svc.attach(task.id, "alice", session_id="s1")
    svc.attach(task.id, "bob", session_id="s2")
    assert sorted(svc.current_agents(task.id)) == ["alice", "bob"]
    with pytest.raises(TaskLocked, match="maximum 2"):
        svc.attach(task.id, "carol", session_id="s3")
    out = svc.detach(task.id, "s1")
    assert not out["paused"] and out["remaining_sessions"] == ["s2"]


def test_stale_lease_is_taken_over(svc: TaskService, repo: Path) -> None:
    svc.settings.lease_seconds = 1
    task = svc.create_task(repo, "crashy agent")
    svc.attach(task.id, "crashed", session_id="s-dead")
    time.sleep(1.2)  # the crashed agent never renews
    res = svc.attach(task.id, "rescuer", session_id="s-new")
    assert [t["session_id"] for t in res.took_over] == ["s-dead"]
    dead = svc.registry.get_session("s-dead")
    assert dead is not None and dead.detached_at is not None


def test_renewed_lease_is_not_taken_over(svc: TaskService, repo: Path) -> None:
    svc.settings.lease_seconds = 1
    task = svc.create_task(repo, "alive agent")
    svc.attach(task.id, "alive", session_id="s-alive")
    time.sleep(0.6)
    assert svc.renew(task.id, "s-alive")
    time.sleep(0.6)
    with pytest.raises(TaskLocked):
        svc.attach(task.id, "intruder", session_id="s-x")


def test_stale_version_is_a_concurrent_modification(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "versions", lazy=True)
    svc.registry.update_task(task.id, task.version, {"title": "first"})
    with pytest.raises(ConcurrentModification, match="retry"):
        svc.registry.update_task(task.id, task.version, {"title": "lost"})
    assert svc.get(task.id).title == "first"


def test_twenty_concurrent_writers_lose_no_update(svc: TaskService, repo: Path, home: Path) -> None:
    task = svc.create_task(repo, "hot row", lazy=True)
    # ten threads in this process ...
    def bump(_: int) -> None:
        for _ in range(5):
            svc.update_metadata(task.id, lambda m: m.__setitem__("n", m.get("n", 0) + 1))

    # ... and ten separate processes, each with its own connection to the same database
    script = (
        "import sys; from taskbox import TaskService\n"
        "s = TaskService(sys.argv[1])\n"
        "for _ in range(5): s.update_metadata(sys.argv[2], lambda m: m.__setitem__('n', m.get('n', 0) + 1))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(home), task.id]) for _ in range(10)]
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(bump, range(10)))
    assert all(p.wait(timeout=120) == 0 for p in procs)
    final = svc.get(task.id)
    assert final.metadata["n"] == 20 * 5
    assert final.version == task.version + 100


def test_concurrent_execs_are_all_logged(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "parallel commands")
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: svc.exec(task.id, f"echo {i}").stdout, range(20)))
    assert outs == [f"{i}\n" for i in range(20)]
    assert len(svc.executions(task.id, limit=100)) == 20
    assert svc.state(task.id)["metrics"]["tool_calls"] == 20


def test_same_description_at_the_same_moment_gets_distinct_branches(svc: TaskService, repo: Path) -> None:
    def make(_: int):
        return TaskService(svc.paths.home).create_task(repo, "Fix the login bug", agent="a", model="m",
                                                       lazy=True)

    with ThreadPoolExecutor(5) as pool:
        tasks = list(pool.map(make, range(5)))
    branches = {t.branch for t in tasks}
    assert len(branches) == 5 and len({t.id for t in tasks}) == 5
    assert "a-m/fix-the-login-bug" in branches
    for t in tasks:
        svc.sync(t.id)  # the branches reach the user's repository side by side
    for b in branches:
        assert git(repo, "rev-parse", "--verify", f"refs/heads/{b}").strip()
        assert subprocess.run(["git", "check-ref-format", "--branch", b]).returncode == 0


def test_branch_taken_in_the_repo_gets_a_suffix(svc: TaskService, repo: Path) -> None:
    git(repo, "branch", "a-m/existing-work")
    task = svc.create_task(repo, "existing work", agent="a", model="m", lazy=True)
    assert task.branch.startswith("a-m/existing-work-") and task.branch != "a-m/existing-work"
    assert os.path.isdir(task.workspace_path)


@pytest.mark.parametrize("agent", ["0", "1"])
def test_an_exec_from_another_process_waits_out_a_checkpoint_freeze(svc: TaskService, repo: Path,
                                                                    agent: str) -> None:
    """A `docker exec` started across a pause can wedge the engine for the container (its
    `runc init` frozen in the cgroup); so an exec from any taskbox process waits for the
    freeze to end, then runs, instead of racing it. With the exec agent on, the frozen agent
    does not answer and the command falls back to `docker exec`, which waits the same way."""
    task = svc.create_task(repo, "freeze gate")
    cid = task.container_id or ""
    svc.sandbox.pause(cid)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "taskbox", "exec", task.id, "--", "echo", "ran-after-thaw"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TASKBOX_EXEC_AGENT": agent})
        time.sleep(4)  # the CLI starts and reaches the gate (with the agent: after its 2 s check)
        assert proc.poll() is None, proc.communicate()
        assert svc.sandbox.container_state(cid)["Paused"]
    finally:
        svc.sandbox.unpause(cid)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "ran-after-thaw" in out
    # a pause is refused, not forced, while an exec is being started (the gate is shared-held)
    fd = os.open(svc.paths.locks / f"freeze-{cid[:12]}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        svc.sandbox.freeze_wait = 0.2
        with pytest.raises(SandboxError, match="commands kept starting"):
            svc.sandbox.pause(cid)
        assert not svc.sandbox.container_state(cid)["Paused"]
    finally:
        os.close(fd)
    svc.sandbox.pause(cid)
    svc.sandbox.unpause(cid)
    svc.sandbox.remove(cid)
    assert not (svc.paths.locks / f"freeze-{cid[:12]}.lock").exists()
