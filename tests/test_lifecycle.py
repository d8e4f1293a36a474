"""The whole task lifecycle on real Docker and git."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskbox import InvalidTransition, Status, TaskService
from taskbox.models import ContainerState
from taskbox.sandbox import LABEL_TASK

from .conftest import git


def container(docker_engine, cid):
    return docker_engine.api.inspect_container(cid)


def test_full_lifecycle(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "Add OAuth login", agent="sisyphus", model="claude-opus-4.5")
    assert task.status is Status.ACTIVE
    assert task.branch == "sisyphus-claude-opus-4.5/add-oauth-login"
    info = container(docker_engine, task.container_id)
    assert info["State"]["Running"]
    assert info["Config"]["Labels"][LABEL_TASK] == task.id
    ws = Path(task.workspace_path)
    assert (ws / "Plan.md").read_text().startswith("# Plan — Add OAuth login")
    assert json.loads((ws / ".task-memory/state.json").read_text())["task_id"] == task.id

    a = svc.attach(task.id, "sisyphus", "claude-opus-4.5")
    res = svc.exec(task.id, "echo hi > notes.txt && cat notes.txt && echo err >&2 && exit 3",
                   session_id=a.session.id)
    assert (res.stdout, res.stderr, res.exit_code) == ("hi\n", "err\n", 3)
    assert (ws / "notes.txt").read_text() == "hi\n"
    svc.update_todos(task.id, [{"text": "write handler", "major": True}, {"text": "tests"}])

    out = svc.detach(task.id, a.session.id)
    assert out["paused"]
    assert svc.get(task.id).status is Status.PAUSED
    assert not container(docker_engine, task.container_id)["State"]["Running"]
    # the detach committed the work and fetched it into the user's repository
    assert git(repo, "show", f"{task.branch}:notes.txt") == "hi\n"

    b = svc.attach(task.id, "codex", "gpt-5")
    assert svc.get(task.id).status is Status.ACTIVE
    assert [t["text"] for t in b.restored_state["todos"]] == ["write handler", "tests"]
    assert b.restored_state["executions"][-1]["exit_code"] == 3
    assert any(c.get("kind") == "detach" for c in b.restored_state["conversations"])
    assert svc.exec(task.id, "cat notes.txt").stdout == "hi\n"  # same filesystem after restart

    done = svc.complete(task.id, "login works")
    assert done["success"] and svc.get(task.id).status is Status.COMPLETED
    # the branch holds the work only; memory and Plan.md travel on the companion ref beside it
    assert git(repo, "ls-tree", "-r", "--name-only", task.branch).split() == ["README.md", "app.py", "notes.txt"]
    memory = f"refs/taskbox/{task.branch}/memory"
    plan = git(repo, "show", f"{memory}:Plan.md")
    assert "login works" in plan and "codex (gpt-5) attached" in plan
    state = json.loads(git(repo, "show", f"{memory}:.task-memory/state.json"))
    assert state["status"] == "completed" and state["metrics"]["agents_used"] == ["sisyphus", "codex"]
    # the container is kept (stopped) for the retention period
    assert not container(docker_engine, task.container_id)["State"]["Running"]

    archived = svc.cleanup(task.id)
    assert archived.status is Status.ARCHIVED and archived.container_id is None
    assert not docker_engine.api.containers(all=True, filters={"id": task.container_id})
    events = [e["type"] for e in svc.registry.events(task.id)]
    for expected in ("task.created", "session.attached", "task.exec", "session.detached", "task.paused",
                     "task.active", "task.completed", "task.archived"):
        assert expected in events


def test_lazy_task_gets_its_container_on_first_use(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "lazy one", lazy=True)
    assert task.status is Status.PENDING and task.container_id is None
    assert svc.exec(task.id, "pwd").stdout.strip() == "/workspace"
    task = svc.get(task.id)
    assert task.status is Status.ACTIVE and task.container_state is ContainerState.RUNNING


def test_invalid_transitions_change_nothing(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "transitions", lazy=True)
    with pytest.raises(InvalidTransition):
        svc.complete(task.id)
    with pytest.raises(InvalidTransition):
        svc.cleanup(task.id)
    assert svc.get(task.id).status is Status.PENDING
    svc.abort(task.id, "not needed")
    with pytest.raises(InvalidTransition):
        svc.attach(task.id, "a")
    assert svc.get(task.id).status is Status.ABORTED


def test_abort_and_failed_retry(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "to fail")
    svc.fail(task.id, "broken toolchain")
    assert svc.get(task.id).status is Status.FAILED
    svc.attach(task.id, "fixer")  # failed -> active: retry after repair
    assert svc.get(task.id).status is Status.ACTIVE
    svc.abort(task.id)
    assert svc.get(task.id).status is Status.ABORTED
    assert not container(docker_engine, task.container_id)["State"]["Running"]


def test_exec_timeout_kills_background_children(svc: TaskService, repo: Path) -> None:
    from taskbox import CommandTimeout

    task = svc.create_task(repo, "timeouts")
    with pytest.raises(CommandTimeout) as err:
        svc.exec(task.id, "(sleep 300 &) ; sleep 100 & echo started; wait", timeout=1)
    assert err.value.details["result"]["stdout"] == "started\n"
    ps = svc.exec(task.id, "ps -eo args").stdout
    assert "sleep 100" not in ps and "sleep 300" not in ps
    logged = svc.executions(task.id)[-2]
    assert logged["timed_out"] is True


def test_exec_output_is_bounded(svc: TaskService, repo: Path) -> None:
    svc.settings.exec_output_limit = 10_000
    task = svc.create_task(repo, "flood")
    res = svc.exec(task.id, "head -c 5000000 /dev/zero | tr '\\0' x")
    assert res.truncated and len(res.stdout) == 10_000 and res.exit_code == 0


def test_limits_are_applied(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "limits", memory="256m", cpus=0.5, pids_limit=64)
    hc = container(docker_engine, task.container_id)["HostConfig"]
    assert hc["Memory"] == 256 * 1024**2 and hc["MemorySwap"] == 256 * 1024**2
    assert hc["NanoCpus"] == 500_000_000 and hc["PidsLimit"] == 64


def test_idle_task_is_paused_by_tick_but_not_while_attached(svc: TaskService, repo: Path, docker_engine) -> None:
    svc.settings.idle_pause_minutes = 1
    idle = svc.create_task(repo, "forgotten task")
    busy = svc.create_task(repo, "attached task")
    svc.attach(busy.id, "worker")
    for t in (idle, busy):  # both last active two minutes ago
        svc.registry.update_task(t.id, svc.get(t.id).version, {"last_active": svc.get(t.id).last_active - 120})
    svc.tick()
    assert svc.get(idle.id).status is Status.PAUSED
    assert not container(docker_engine, idle.container_id)["State"]["Running"]
    assert "task.idle_paused" in [e["type"] for e in svc.registry.events(idle.id)]
    assert svc.get(busy.id).status is Status.ACTIVE  # a live lease keeps it running
    assert svc.exec(idle.id, "echo awake").stdout == "awake\n"  # and it starts again on use
