"""Crashes in the middle of create and complete (a real SIGKILL), then `doctor` repairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskbox import Status, TaskService

from .conftest import git, run_cli


@pytest.mark.parametrize("point", ["create.workspace", "create.container"])
def test_killed_create_is_rolled_back(svc: TaskService, repo: Path, docker_engine, point: str) -> None:
    r = run_cli("create-task", "doomed", "--repo", str(repo), env={"TASKBOX_CRASH_AT": point})
    assert r.returncode == -9  # really killed
    [task] = svc.list_tasks()
    assert task.pending_op == "create"
    findings = svc.doctor(fix=False)
    assert [f["kind"] for f in findings if f["task_id"] == task.id] == ["interrupted-create"]
    findings = json.loads(run_cli("doctor", "--fix", "--json").stdout)
    assert any(f["kind"] == "interrupted-create" and f["fixed"] for f in findings)
    assert svc.list_tasks() == []
    assert not Path(task.workspace_path).exists()
    assert not docker_engine.api.containers(all=True, filters={"label": f"taskbox.task={task.id}"})
    assert svc.doctor() == []
    # the same description can be used again afterwards
    assert svc.create_task(repo, "doomed").status is Status.ACTIVE


def test_killed_complete_is_finished(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "almost done")
    svc.exec(task.id, "echo result > out.txt")
    r = run_cli("complete-task", task.id, env={"TASKBOX_CRASH_AT": "complete.fetched"})
    assert r.returncode == -9
    assert svc.get(task.id).pending_op == "complete"
    kinds = [f["kind"] for f in svc.doctor(fix=True)]
    assert "interrupted-complete" in kinds
    done = svc.get(task.id)
    assert done.status is Status.COMPLETED and done.pending_op is None
    assert git(repo, "show", f"{task.branch}:out.txt") == "result\n"


def test_lost_and_orphan_containers(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "lost container")
    docker_engine.api.remove_container(task.container_id, force=True)
    orphan = svc.create_task(repo, "orphan")
    svc.registry.delete_task(orphan.id)  # e.g. a registry restored from an old backup
    kinds = {f["kind"] for f in svc.doctor(fix=True)}
    assert {"lost-container", "orphan-container", "orphan-workspace"} <= kinds
    assert svc.get(task.id).status is Status.PAUSED and svc.get(task.id).container_id is None
    assert svc.exec(task.id, "echo back").stdout == "back\n"  # a new container on next use
    # the registry removed that task (a tombstone): its container is stopped and put in the trash
    [left] = docker_engine.api.containers(all=True, filters={"id": orphan.container_id})
    assert left["State"] != "running"
    assert svc.doctor() == []  # the trash is not an orphan
    svc.settings.trash_days = 0
    purged = [f for f in svc.doctor(fix=True) if f["kind"] == "trash-expired"]
    assert len(purged) == 2 and all(f["fixed"] for f in purged)  # the workspace and the container
    assert not docker_engine.api.containers(all=True, filters={"id": orphan.container_id})
    assert svc.doctor() == []


def test_stopped_container_is_noticed(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "stopped behind our back")
    docker_engine.api.stop(task.container_id, timeout=0)
    [f] = [f for f in svc.doctor(fix=True) if f["task_id"] == task.id]
    assert f["kind"] == "container-state" and f["fixed"]
    assert svc.get(task.id).status is Status.PAUSED
