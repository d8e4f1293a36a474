"""The reconciler behind `taskbox doctor`: compares the registry, Docker and the disk.

Each finding names what is inconsistent and, with ``fix``, what was done about it:
interrupted creates are rolled back, interrupted completions finished, lost containers
forgotten (recreated on next use), workspace volumes that are not mounted (after a reboot)
mounted again, orphan containers, volumes and workspaces removed, stale leases and their
sessions ended, container states re-read from the engine, and interrupted checkpoint
restores finished (see :meth:`taskbox.checkpoints.Checkpoints.reconcile`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import quota, workspace
from .errors import TaskboxError
from .models import FINISHED, ContainerState, Status
from .sandbox import LABEL_TASK

if TYPE_CHECKING:
    from .service import TaskService


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Findings(list[dict[str, Any]]):
    """What a reconciler found; with ``fix`` each finding's repair action is run as it is added."""

    def __init__(self, fix: bool) -> None:
        super().__init__()
        self.fix = fix

    def __call__(self, kind: str, task_id: str | None, detail: str,
                 action: Callable[..., Any] | None = None) -> None:
        entry: dict[str, Any] = {"kind": kind, "task_id": task_id, "detail": detail, "fixed": False}
        if self.fix and action is not None:
            try:
                entry["action"] = action()
                entry["fixed"] = True
            except TaskboxError as exc:
                entry["error"] = exc.message
        self.append(entry)


def reconcile(svc: TaskService, fix: bool) -> list[dict[str, Any]]:
    findings = found = Findings(fix)

    tasks = svc.registry.list_tasks()
    known = {t.id for t in tasks}
    unmounted: set[str] = set()  # tasks whose workspace volume is (still) not mounted, or gone

    for task in tasks:
        if task.pending_op and not _alive(task.op_pid):
            if task.pending_op == "create":
                found("interrupted-create", task.id, "create was interrupted; the half-made task will be removed",
                      lambda t=task: _then("removed", lambda: svc._undo_create(t)))
            elif task.pending_op == "complete":
                found("interrupted-complete", task.id, "complete was interrupted; it will be finished",
                      lambda t=task: _then("completed", lambda: svc.complete(t.id)))
            continue
        image = svc.paths.volume(task.id)
        if task.metadata.get("quota") and not task.pending_op:
            if image.exists():
                if not quota.is_mounted(image, Path(task.workspace_path)):
                    unmounted.add(task.id)
                    found("unmounted-workspace", task.id,
                          f"workspace volume {image} is not mounted at {task.workspace_path} (e.g. after a reboot)",
                          lambda t=task: _mount(svc, t, unmounted))
                continue
            if task.status is not Status.ARCHIVED:
                unmounted.add(task.id)
                found("missing-volume", task.id, f"workspace volume {image} is gone",
                      lambda t=task: _then("marked failed", lambda: svc.fail(t.id, "workspace volume missing"))
                      if t.status in (Status.ACTIVE, Status.PAUSED) else None)
                continue
        if not Path(task.workspace_path).is_dir() and task.status is not Status.ARCHIVED:
            found("missing-workspace", task.id, f"workspace {task.workspace_path} is gone",
                  lambda t=task: _then("marked failed", lambda: svc.fail(t.id, "workspace missing"))
                  if t.status in (Status.ACTIVE, Status.PAUSED) else None)

    leases = svc.registry.leases(live_only=False)
    now = time.time()
    for lease in leases:
        if lease.expires_at <= now:
            found("stale-lease", lease.task_id,
                  f"lease of {lease.agent} (session {lease.session_id}) expired {now - lease.expires_at:.0f}s ago",
                  lambda le=lease: _then("released", lambda: svc.registry.release_lease(le.task_id, le.session_id),
                                        lambda: svc.registry.end_session(le.session_id, time.time())))
    live = {(le.task_id, le.session_id) for le in leases if le.expires_at > now}
    for task in tasks:
        for s in svc.registry.sessions(task.id, open_only=True):
            if (task.id, s.id) not in live and not any(le.session_id == s.id for le in leases):
                found("orphan-session", task.id, f"session {s.id} ({s.agent}) is open but holds no lease",
                      lambda sid=s.id: _then("ended", lambda: svc.registry.end_session(sid, time.time())))

    try:
        sandbox = svc.sandbox
        containers = sandbox.task_containers(svc.home_label)
    except TaskboxError as exc:
        findings.append({"kind": "docker-unavailable", "task_id": None, "detail": exc.message, "fixed": False})
        containers = None

    if containers is not None:
        by_id = {c["Id"]: c for c in containers}
        for c in containers:
            tid = c["Labels"].get(LABEL_TASK)
            if tid not in known:
                found("orphan-container", tid, f"container {c['Id'][:12]} has no task in the registry",
                      lambda cid=c["Id"]: _then("removed", lambda: sandbox.remove(cid)))
        for task in svc.registry.list_tasks():
            if task.pending_op or not task.container_id:
                continue
            if task.container_id not in by_id:
                found("lost-container", task.id, f"container {task.container_id[:12]} no longer exists",
                      lambda t=task: _forget_container(svc, t.id))
                continue
            actual = sandbox.state(task.container_id)
            if actual is not task.container_state:
                found("container-state", task.id, f"registry says {task.container_state}, Docker says {actual}",
                      lambda t=task, a=actual: _sync_state(svc, t.id, a))
            elif actual is ContainerState.RUNNING and task.status in FINISHED:
                found("running-finished", task.id, f"task is {task.status} but its container runs",
                      lambda t=task: _then("stopped", lambda: sandbox.stop(t.container_id or "")))

    if svc.paths.volumes.is_dir():
        for img in sorted(svc.paths.volumes.iterdir()):
            tid = img.name.removesuffix(".img")
            if img.name.endswith(".img") and tid not in known:
                found("orphan-volume", None, f"workspace volume {img} has no task",
                      lambda i=img, t=tid: _then("unmounted and removed",
                                                 lambda: quota.release(i, svc.paths.workspace(t))))
    if svc.paths.workspaces.is_dir():
        for d in sorted(svc.paths.workspaces.iterdir()):
            if d.name not in known:
                found("orphan-workspace", None, f"workspace {d} has no task",
                      lambda d=d: _then("removed", lambda: quota.release(svc.paths.volume(d.name), d),
                                        lambda: workspace.remove(d)))

    for task in svc.registry.list_tasks():
        if (task.status is Status.ARCHIVED or not Path(task.workspace_path).is_dir() or task.pending_op
                or task.id in unmounted):
            continue
        mem = svc.memory(task)
        try:
            _state, recovery = mem.load(svc._defaults(task))
        except TaskboxError as exc:
            findings.append({"kind": "memory-unreadable", "task_id": task.id, "detail": exc.message, "fixed": False})
            continue
        if recovery:
            svc._report_recovery(task, recovery)
            findings.append({"kind": "memory-recovered", "task_id": task.id,
                             "detail": f"{recovery.reason}; rebuilt from logs, damaged copy kept as "
                                       f"{recovery.corrupted_copy}", "fixed": True})
    svc.checkpoints.reconcile(found)  # interrupted restores, frozen containers, lost checkpoints
    svc.registry.add_event("doctor.run", None, {"fix": fix, "findings": len(findings)})
    return findings


def _then(message: str, *steps: Callable[[], Any]) -> str:
    for step in steps:
        step()
    return message


def _mount(svc: TaskService, task: Any, unmounted: set[str]) -> str:
    svc._ensure_volume(task)
    unmounted.discard(task.id)
    return "mounted"


def _forget_container(svc: TaskService, task_id: str) -> str:
    task = svc.get(task_id)
    changes: dict[str, Any] = {"container_id": None, "container_state": ContainerState.LOST}
    svc._update(task_id, changes, ("container.lost", {"container_id": task.container_id}))
    if task.status is Status.ACTIVE:
        svc._transition(task_id, Status.PAUSED)
        return "forgotten; task paused (a new container is made on next use)"
    return "forgotten (a new container is made on next use)"


def _sync_state(svc: TaskService, task_id: str, actual: ContainerState) -> str:
    task = svc._update(task_id, {"container_state": actual}, ("container.state", {"state": str(actual)}))
    if actual is not ContainerState.RUNNING and task.status is Status.ACTIVE:
        if actual is ContainerState.OOM_KILLED:
            svc.registry.add_event("container.oom_killed", task_id, {})
        svc._transition(task_id, Status.PAUSED)
        return f"recorded {actual}; task paused"
    return f"recorded {actual}"
