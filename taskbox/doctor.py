"""Doctor detection: compares the registry, Docker and the disk, and says what is wrong.

An engine (STYLE rule 2): it reads and returns :class:`~taskbox.models.Findings`, each with
its repair described as data (a repair name and parameters the service acts on, see
``TaskService.doctor``) — it never runs the core's use cases itself and imports nothing
above the engines. Findings: interrupted creates and completions, lost containers,
unmounted or missing workspace volumes, stale leases and sessions, container states,
orphans, damaged task memory, interrupted ultrawork runs, a damaged registry, stale backups, expired trash, and (from
the checkpoint engine) interrupted restores.

**Orphans are never destroyed on a guess.** A workspace, volume or container the registry
does not know is offered for removal only when the registry is sound (``quick_check``) and
holds a *tombstone* for that task (it removed the task itself); a container must also carry
this home's label. Removal moves it to the trash (``TASKBOX_HOME/trash``), purged after
``trash_days``. Anything else is reported with how to take it back: ``taskbox doctor --adopt
ID``. :func:`discover` reads what is on disk (task records, workspaces' memory, container
labels, checkpoint stores) to re-adopt a task or rebuild the whole registry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import files, git, liveness, memory, quota
from . import pool as pools
from .config import Paths, Settings
from .confine import sandbox_owner
from .errors import InvalidInput, NotFound, TaskboxError
from .models import FINISHED, ContainerState, Findings, LockMode, ResolveRepair, Status, Task
from .registry import Registry, list_backups
from .sandbox import LABEL_HOME, LABEL_POOL, LABEL_TASK, Sandbox

__all__ = ["Findings", "detect", "discover", "disk_evidence", "purge", "trash", "trash_entries"]

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}$")
TITLE_LIMIT = 200
PLAN_HEAD = 4096  # bytes of Plan.md read for a task's title


class Context(Protocol):
    """What detection reads (a ``TaskService`` provides it); detection only reads through it."""

    registry: Registry
    paths: Paths
    settings: Settings
    home_label: str

    @property
    def sandbox(self) -> Sandbox: ...

    @property
    def checkpoints(self) -> Any: ...


def disk_evidence(paths: Paths) -> list[str]:
    """What under ``paths.home`` says tasks exist (so an empty registry there is a lost one)."""
    out = []
    for what, d, pattern in (("workspaces", paths.workspaces, "*"), ("checkpoint stores", paths.checkpoint_stores,
                                                                      "*.git"),
                             ("task records", paths.records, "*.json"), ("workspace volumes", paths.volumes, "*.img")):
        try:
            n = sum(1 for _ in d.glob(pattern)) if d.is_dir() else 0
        except OSError:
            n = 0
        if n:
            out.append(f"{d} holds {n} {what}")
    return out


# --- detection ------------------------------------------------------------------------------


def detect(ctx: Context, resolve: ResolveRepair | None = None) -> Findings:
    """Everything inconsistent between the registry, Docker and the disk, with each repair as data.

    With ``resolve`` (the service's repairs, by name) each repair is run as it is found.
    """
    found = Findings(fix=resolve is not None, resolve=resolve)
    reg = ctx.registry
    problems = reg.check(quick=True)
    healthy = not problems
    if problems:
        found("registry-damaged", None, f"the registry fails its integrity check ({problems[0][:200]}); "
              "restore it with `taskbox doctor --restore-registry` or rebuild it with "
              "`taskbox doctor --rebuild-registry`; no orphan is removed meanwhile")
    _backups(ctx, found)

    tasks = reg.list_tasks()
    known = {t.id for t in tasks}
    tombs = reg.tombstones() if healthy else {}
    unmounted: set[str] = set()  # tasks whose workspace volume is (still) not mounted, or gone

    for task in tasks:
        if task.pending_op and not liveness.pid_alive(task.op_pid):
            if task.pending_op == "create":
                found("interrupted-create", task.id, "create was interrupted; the half-made task will be removed",
                      "undo-create", task_id=task.id)
            elif task.pending_op == "complete":
                found("interrupted-complete", task.id, "complete was interrupted; it will be finished",
                      "finish-complete", task_id=task.id)
            continue
        image = ctx.paths.volume(task.id)
        if task.metadata.get("quota") and not task.pending_op:
            if image.exists():
                if not quota.is_mounted(image, Path(task.workspace_path)):
                    unmounted.add(task.id)
                    found("unmounted-workspace", task.id,
                          f"workspace volume {image} is not mounted at {task.workspace_path} (e.g. after a reboot)",
                          "mount-volume", task_id=task.id)
                    continue
            elif task.status is not Status.ARCHIVED:
                if reg.checkpoints(task.id):
                    found("missing-volume", task.id, f"workspace volume {image} is gone: it will be made again "
                          "and the workspace restored from the newest checkpoint", "restore-workspace",
                          task_id=task.id)
                    continue
                unmounted.add(task.id)
                found("missing-volume", task.id, f"workspace volume {image} is gone",
                      "mark-failed" if task.status in (Status.ACTIVE, Status.PAUSED) else None,
                      task_id=task.id, reason="workspace volume missing")
                continue
        if task.status is not Status.ARCHIVED and _lost(Path(task.workspace_path)):
            unmounted.add(task.id)  # no memory to judge either
            if reg.checkpoints(task.id):
                found("missing-workspace", task.id, f"workspace {task.workspace_path} is gone: it will be restored "
                      "from the newest checkpoint (files, branch and memory)", "restore-workspace", task_id=task.id)
            else:
                found("missing-workspace", task.id, f"workspace {task.workspace_path} is gone and has no checkpoint",
                      "mark-failed" if task.status in (Status.ACTIVE, Status.PAUSED) else None,
                      task_id=task.id, reason="workspace missing")

    for run in reg.runs("running"):
        if not liveness.pid_alive(run["pid"]):  # the orchestrator was killed: reconcile, then resume
            found("ultrawork-interrupted", run["parent_id"], f"the ultrawork run (pid {run['pid']}) was interrupted; "
                  "sub-tasks left running will be reset and their containers stopped; continue with "
                  f"`taskbox ultrawork {run['parent_id']} --resume`", "recover-ultrawork", task_id=run["parent_id"])

    leases = reg.leases(live_only=False)
    now = time.time()
    dead = set()
    for lease in leases:
        if lease.expires_at <= now:
            found("stale-lease", lease.task_id,
                  f"lease of {lease.agent} (session {lease.session_id}) expired {now - lease.expires_at:.0f}s ago",
                  "release-lease", task_id=lease.task_id, session_id=lease.session_id)
        elif liveness.alive(lease.holder) is False:
            dead.add((lease.task_id, lease.session_id))
            found("stale-lease", lease.task_id,
                  f"lease of {lease.agent} (session {lease.session_id}) is held by a process that died; its "
                  "commands still running will be killed", "release-lease", task_id=lease.task_id,
                  session_id=lease.session_id)
    live = {(le.task_id, le.session_id) for le in leases
            if le.expires_at > now and (le.task_id, le.session_id) not in dead}
    for task in tasks:
        for s in reg.sessions(task.id, open_only=True):
            if (task.id, s.id) not in live and not any(le.session_id == s.id for le in leases):
                found("orphan-session", task.id, f"session {s.id} ({s.agent}) is open but holds no lease",
                      "end-session", session_id=s.id)

    trashed = trash_entries(ctx.paths)
    try:
        sandbox = ctx.sandbox
        containers: list[dict[str, Any]] | None = sandbox.task_containers(ctx.home_label)
    except TaskboxError as exc:
        found("docker-unavailable", None, exc.message)
        containers = None

    tasks = reg.list_tasks()  # repairs so far may have removed some
    if containers is not None:
        in_trash = {e.get("container_id") for e in trashed}
        by_id = {c["Id"]: c for c in containers}
        for c in containers:
            tid = (c.get("Labels") or {}).get(LABEL_TASK)
            if tid in known or c["Id"] in in_trash or (c.get("Labels") or {}).get(LABEL_POOL):
                continue  # a pool slot's container: _pool below
            ours = (c.get("Labels") or {}).get(LABEL_HOME) == ctx.home_label
            if ours and tid in tombs:
                found("orphan-container", tid, f"container {c['Id'][:12]} belongs to task {tid}, which was "
                      "removed: it will be stopped and put in the trash", "trash-container",
                      task_id=tid, container_id=c["Id"])
            else:
                found("orphan-container", tid, f"container {c['Id'][:12]} (task {tid}) is not in the registry and "
                      f"was not removed by it: kept; `taskbox doctor --adopt {tid}` takes it back")
        for task in tasks:
            if task.pending_op or not task.container_id:
                continue
            if task.container_id not in by_id:
                found("lost-container", task.id, f"container {task.container_id[:12]} no longer exists",
                      "forget-container", task_id=task.id)
                continue
            actual = sandbox.state(task.container_id)
            if actual is not task.container_state:
                found("container-state", task.id, f"registry says {task.container_state}, Docker says {actual}",
                      "sync-state", task_id=task.id, state=actual)
            elif actual is ContainerState.RUNNING and task.status in FINISHED:
                found("running-finished", task.id, f"task is {task.status} but its container runs",
                      "stop-container", container_id=task.container_id)

    if containers is not None:
        _pool(ctx, found, containers, tombs, unmounted)

    # Listed before any is repaired: trashing a volume takes its workspace along.
    orphans = []
    if ctx.paths.volumes.is_dir():
        orphans += [("orphan-volume", img.name.removesuffix(".img"), f"workspace volume {img}")
                    for img in sorted(ctx.paths.volumes.iterdir()) if img.name.endswith(".img")]
    if ctx.paths.workspaces.is_dir():
        orphans += [("orphan-workspace", d.name, f"workspace {d}") for d in sorted(ctx.paths.workspaces.iterdir())]
    for kind, tid, what in orphans:
        if tid not in known:
            _orphan(found, kind, tid, what, tid in tombs)

    for task in reg.list_tasks():
        if (task.status is Status.ARCHIVED or not Path(task.workspace_path).is_dir() or task.pending_op
                or task.id in unmounted):
            continue
        _state, why = memory.read_state(Path(task.workspace_path))
        if why is not None:
            found("memory-damaged", task.id, f"{why}; it will be rebuilt from the logs (the damaged copy is kept)",
                  "rebuild-memory", task_id=task.id)

    days = ctx.settings.trash_days
    for entry in trashed:
        if now - float(entry.get("trashed_at") or 0) >= days * 86400:
            found("trash-expired", entry.get("task_id"), f"{entry['path']} has been in the trash over {days} day(s): "
                  "it will be deleted", "purge-trash", path=entry["path"])
    ctx.checkpoints.reconcile(found)  # interrupted restores, frozen containers, lost checkpoints
    if os.geteuid() == 0:  # as another user taskbox could not have made a file foreign, nor fix it
        _ownership(ctx, found, unmounted)
    return found


def _pool(ctx: Context, found: Findings, containers: list[dict[str, Any]], tombs: dict[str, Any],
          unmounted: set[str]) -> None:
    """Warm pool slots (:mod:`taskbox.pool`) that cannot serve or were left half-claimed, and
    slot containers without a slot. A claimed slot of a task the registry does not know is
    only removed when the registry removed that task (its tombstone); otherwise it is kept."""
    pool = pools.Pool(ctx.paths.pool)
    slots = pool.slots()
    running = {c["Id"]: str(c.get("State", "")).lower() == "running" for c in containers}
    tasks = {t.id: t for t in ctx.registry.list_tasks()}
    users = {t.container_id: t for t in tasks.values() if t.container_id}
    now = time.time()
    for s in slots:
        user = users.get(s.container_id)
        owner = tasks.get(s.task_id)
        if s.state == "half-claimed" and s.claimer and liveness.pid_alive(s.claimer):
            continue  # a create is claiming it right now
        if s.state == "claimed" and user is None and owner is not None and owner.pending_op:
            continue  # its create has not recorded the container yet (or `undo-create` takes it)
        if s.state == "half-claimed":
            if user is not None:
                found("pool-half-claimed", user.id, f"pool slot {s.id} was claimed by task {user.id} but its claim "
                      "was not finished: its workspace will be bound into it", "pool-finish-claim",
                      task_id=user.id, slot=s.id)
            else:
                found("pool-half-claimed", None, f"pool slot {s.id} was claimed by a create that did not finish: "
                      "it will be removed", "pool-remove-slot", slot=s.id, container_id=s.container_id)
        elif s.state == "free" and not running.get(s.container_id):
            found("pool-dead-slot", None, f"pool slot {s.id}'s container is {'stopped' if s.container_id in running else 'gone'} "
                  "(e.g. after an engine restart or a reboot): it will be removed", "pool-remove-slot", slot=s.id,
                  container_id=s.container_id)
        elif s.state == "starting" and now - s.created_at > pools.STARTING_GRACE and s.container_id not in users:
            found("pool-dead-slot", None, f"pool slot {s.id} was left by a fill that did not finish: it will be removed",
                  "pool-remove-slot", slot=s.id, container_id=s.container_id)
        elif s.state == "claimed" and user is None:
            if s.container_id in running and ((owner is None and s.task_id not in tombs)
                                              or (owner is not None and not owner.container_id)):
                why = "the registry does not know it" if owner is None else "the registry records no container for it"
                found("pool-orphan-slot", s.task_id, f"pool slot {s.id} serves task {s.task_id}, but {why}: kept; "
                      f"`taskbox doctor --adopt {s.task_id}` takes it back")
            else:  # the task was removed, or moved on to another container (its slot's was lost or replaced)
                found("pool-orphan-slot", s.task_id, f"pool slot {s.id} of task {s.task_id} is no longer its "
                      "container: it will be removed", "pool-remove-slot", slot=s.id,
                      container_id=s.container_id if s.container_id in running else "")
        elif (s.state == "claimed" and user is not None and user.id == s.task_id and s.container_id in running
              and user.id not in unmounted and not pool.bound(s, Path(user.workspace_path))):
            found("pool-unbound", user.id, f"the workspace of task {user.id} is not bound into its pool slot {s.id} "
                  "(e.g. after a reboot; a running container sees an empty directory): it will be bound again",
                  "pool-finish-claim", task_id=user.id, slot=s.id)
    have = {s.container_id for s in slots}
    for c in containers:
        labels = c.get("Labels") or {}
        if labels.get(LABEL_POOL) and labels.get(LABEL_HOME) == ctx.home_label and c["Id"] not in have \
                and c["Id"] not in users:
            found("pool-dead-slot", None, f"container {c['Id'][:12]} of pool slot {labels[LABEL_POOL]} has no slot "
                  "left: it will be removed", "pool-remove-slot", slot=labels[LABEL_POOL], container_id=c["Id"])


def _ownership(ctx: Context, found: Findings, skip: set[str]) -> None:
    """Workspace entries the sandbox user does not own (e.g. left by a restore killed part-way):
    the agent could not write them."""
    owner = sandbox_owner()
    for task in ctx.registry.list_tasks():
        ws = Path(task.workspace_path)
        if (task.status is Status.ARCHIVED or task.pending_op or task.id in skip or _lost(ws)
                or ctx.checkpoints.busy(task.id)):
            continue
        try:
            shown, count = files.foreign_owned(ws, owner)
        except (OSError, TaskboxError):
            continue  # unreadable now (e.g. unmounted meanwhile): another finding says why
        if count:
            found("workspace-ownership", task.id,
                  f"{count} entr{'y' if count == 1 else 'ies'} of the workspace not owned by the sandbox user "
                  f"({', '.join(shown[:3])}{' …' if count > 3 else ''}): the agent cannot write them; they will "
                  "be given back to it", "fix-ownership", task_id=task.id)


def _lost(ws: Path) -> bool:
    """A workspace that is gone or emptied (a live one holds at least its ``.git``)."""
    try:
        with os.scandir(ws) as it:
            return next(it, None) is None
    except NotADirectoryError:
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _orphan(found: Findings, kind: str, tid: str, what: str, tombstoned: bool) -> None:
    if tombstoned:
        found(kind, tid, f"{what} belongs to task {tid}, which was removed: it will be moved to the trash",
              "trash-workspace", name=tid)
    else:
        found(kind, tid, f"{what} is not in the registry and was not removed by it: kept; "
              f"`taskbox doctor --adopt {tid}` takes it back")


def _backups(ctx: Context, found: Findings) -> None:
    every = ctx.settings.backup_interval_minutes * 60
    if every <= 0 or not ctx.registry.list_tasks():
        return
    newest = list_backups(ctx.paths.backups)[:1]
    age = time.time() - newest[0].stat().st_mtime if newest else None
    if age is None or age > 2 * every + 3600:
        found("registry-backup-stale", None, "the registry has no backup" if age is None else
              f"the newest registry backup is {age / 3600:.1f} h old", "backup-registry")


# --- the trash -----------------------------------------------------------------------------


def trash_entries(paths: Paths) -> list[dict[str, Any]]:
    """What is in the trash: each entry's ``entry.json`` (our own file) plus its ``path``."""
    out: list[dict[str, Any]] = []
    if not paths.trash.is_dir():
        return out
    for d in sorted(paths.trash.iterdir()):
        try:
            data = json.loads((d / "entry.json").read_text())
        except (OSError, ValueError):
            data = {"kind": "unknown", "trashed_at": d.stat().st_mtime}
        if isinstance(data, dict):
            out.append({**data, "path": str(d)})
    return out


def _entry_dir(paths: Paths, name: str) -> Path:
    paths.trash.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    d = paths.trash / f"{stamp}-{name}"
    n = 1
    while d.exists():
        n += 1
        d = paths.trash / f"{stamp}-{name}-{n}"
    d.mkdir(mode=0o700)
    return d


def _write_entry(d: Path, data: dict[str, Any]) -> None:
    files.write_durably(d / "entry.json", json.dumps({**data, "trashed_at": time.time()}, indent=2).encode(), 0o600)


def trash(paths: Paths, name: str) -> str:
    """Move an orphan workspace (and its volume, unmounted) into the trash; say what was moved."""
    ws, image = paths.workspace(name), paths.volume(name)
    if not ws.exists() and not ws.is_symlink() and not image.exists():
        return "already gone"
    d = _entry_dir(paths, name)
    moved = []
    if image.exists():
        quota.unmount(image, ws)
        os.replace(image, d / "volume.img")
        moved.append("volume")
    if ws.exists() or ws.is_symlink():
        os.rename(ws, d / "workspace")  # the same file system: the directory itself, nothing inside followed
        moved.append("workspace")
    _write_entry(d, {"kind": "workspace", "task_id": name, "moved": moved})
    return f"moved to the trash ({d})"


def trash_container(paths: Paths, sandbox: Sandbox, task_id: str, container_id: str) -> str:
    """Stop an orphan container and record it in the trash (removed when the trash is purged)."""
    sandbox.stop(container_id)
    d = _entry_dir(paths, f"{task_id}-container")
    _write_entry(d, {"kind": "container", "task_id": task_id, "container_id": container_id})
    return f"stopped and put in the trash ({d.name})"


def purge(paths: Paths, path: str, sandbox: Callable[[], Sandbox]) -> str:
    """Delete one trash entry for good (its container too)."""
    d = Path(path)
    if d.parent != paths.trash:
        raise InvalidInput(f"{path} is not a trash entry")
    entry = next((e for e in trash_entries(paths) if e["path"] == str(d)), None)
    if entry and entry.get("container_id"):
        sandbox().remove(str(entry["container_id"]))
    ws = d / "workspace"
    if ws.exists() or ws.is_symlink():
        files.remove_tree(ws)
    shutil.rmtree(d)  # what is left is ours: entry.json, volume.img
    return "deleted"


# --- what lives on disk (re-adoption and rebuild) -------------------------------------------------


def _title(ws: Path, fallback: str) -> str:
    """The title from the workspace's Plan.md (``# Plan — TITLE``), checked; ``fallback`` otherwise."""
    try:
        head, _size = files.read_head(ws, "Plan.md", PLAN_HEAD)
    except (TaskboxError, OSError):
        return fallback
    first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    title = first.removeprefix("# Plan — ").strip() if first.startswith("# Plan — ") else ""
    if not title or len(title) > TITLE_LIMIT or any(ord(ch) < 32 or ch == "\x7f" for ch in title):
        return fallback
    return title


def _from_record(path: Path) -> Task | None:
    try:
        row = json.loads(path.read_text())
        task = Task.from_row(row)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return task if task.id == path.stem and _ID.match(task.id) else None


def _from_workspace(paths: Paths, name: str, settings: Settings) -> tuple[Task | None, str]:
    ws = paths.workspace(name)
    state, why = memory.read_state(ws)
    if state is None:
        return None, f"workspace {ws}: {why}"
    if state["task_id"] != name:
        return None, f"workspace {ws}: its memory names task {str(state['task_id'])[:60]!r}"
    branch = state["branch"]
    if not _BRANCH.match(branch) or ".." in branch or branch.endswith((".lock", "/")):
        return None, f"workspace {ws}: its memory names an invalid branch"
    try:
        status = Status(state["status"])
        lock = LockMode(state["lock_mode"])
    except ValueError:
        return None, f"workspace {ws}: its memory has an unknown status or lock mode"
    if status in (Status.ACTIVE, Status.PENDING):
        status = Status.PAUSED  # no agent is attached after a rebuild; `resume-task` starts it
    title = _title(ws, name)
    now = time.time()
    meta: dict[str, Any] = {"rebuilt_from": "workspace memory"}
    image = paths.volume(name)
    if image.exists():
        meta["quota"] = {"disk": image.stat().st_size, "inodes": 0}
    return Task(id=name, title=title, description=title, status=status, repo_path="", branch=branch,
                base_ref="", workspace_path=str(ws), image=settings.image, agent="agent", model="unknown",
                lock_mode=lock, memory_limit=settings.memory, cpu_limit=settings.cpus, pids_limit=settings.pids_limit,
                metadata=meta, created_at=float(state.get("updated_at") or now), last_active=now), ""


def discover(paths: Paths, settings: Settings, containers: list[dict[str, Any]] | None,
             only: str | None = None) -> tuple[dict[str, Task], list[str]]:
    """The tasks what lives on disk describes, by id, and notes on what could not be used.

    Sources, most trusted first: the registry's own records (``TASKBOX_HOME/records``), each
    workspace's ``.task-memory/state.json`` (hostile: read bounded by descriptor, validated),
    container labels (this home's only), and checkpoint stores (a task with nothing else left
    comes back archived). ``only`` limits it to one task id.
    """
    tasks: dict[str, Task] = {}
    notes: list[str] = []
    if paths.records.is_dir():
        for rec in sorted(paths.records.glob("*.json")):
            if only and rec.stem != only:
                continue
            task = _from_record(rec)
            if task is None:
                notes.append(f"record {rec.name} is unreadable")
            else:
                task.metadata = {**task.metadata, "rebuilt_from": "record"}
                tasks[task.id] = task
    if paths.workspaces.is_dir():
        for d in sorted(paths.workspaces.iterdir()):
            if d.name in tasks or (only and d.name != only):
                continue
            if not _ID.match(d.name):
                notes.append(f"workspace {d.name!r} has no valid task id as its name")
                continue
            task, why = _from_workspace(paths, d.name, settings)
            if task is None:
                notes.append(why)
            else:
                tasks[task.id] = task
    pool = pools.Pool(paths.pool)
    for c in containers or []:
        labels = c.get("Labels") or {}
        tid = labels.get(LABEL_TASK)
        if not tid and labels.get(LABEL_POOL):  # a claimed pool slot: its task is in its claim file
            slot = pool.slot(str(labels[LABEL_POOL]))
            tid = slot.task_id if slot is not None and slot.container_id == c["Id"] else None
        if not tid or not _ID.match(tid) or (only and tid != only):
            continue
        running = str(c.get("State", "")).lower() == "running"
        task = tasks.get(tid)
        if task is None:
            branch = labels.get("taskbox.branch", "")
            if not _BRANCH.match(branch):
                notes.append(f"container {c['Id'][:12]} of task {tid} has no valid branch label")
                continue
            now = time.time()
            task = tasks[tid] = Task(
                id=tid, title=tid, description=tid, status=Status.PAUSED, repo_path="", branch=branch, base_ref="",
                workspace_path=str(paths.workspace(tid)), image=str(c.get("Image") or settings.image), agent="agent",
                model="unknown", metadata={"rebuilt_from": "container labels"}, created_at=float(c.get("Created") or now),
                last_active=now)
        task.container_id = c["Id"]
        task.container_state = ContainerState.RUNNING if running else ContainerState.STOPPED
        if task.status is Status.ACTIVE and not running:
            task.status = Status.PAUSED
    for tid in sorted(_stores(paths)):
        if tid in tasks or (only and tid != only) or not _ID.match(tid):
            continue
        now = time.time()
        tasks[tid] = Task(id=tid, title=tid, description=tid, status=Status.ARCHIVED, repo_path="",
                          branch=f"taskbox-recovered/{tid}", base_ref="", workspace_path=str(paths.workspace(tid)),
                          image=settings.image, agent="agent", model="unknown",
                          metadata={"rebuilt_from": "checkpoint store"}, created_at=now, last_active=now)
    for task in tasks.values():
        if task.pending_op and task.pending_op not in ("create", "complete"):
            task.pending_op = None
    return tasks, notes


def _stores(paths: Paths) -> list[str]:
    d = paths.checkpoint_stores
    return [p.name.removesuffix(".git") for p in d.glob("*.git")] if d.is_dir() else []


def checkpoint_rows(paths: Paths, task_id: str) -> list[dict[str, Any]]:
    """The checkpoint rows a task's store describes (its refs and their manifests), oldest first."""
    store = paths.checkpoint_stores / f"{task_id}.git"
    if not store.is_dir():
        return []
    try:
        refs = git.run(["for-each-ref", "--format=%(refname:lstrip=2) %(objectname)", "refs/checkpoints/"],
                       cwd=store, harden=True, env={"GIT_DIR": str(store)}).stdout.split("\n")
    except TaskboxError:
        return []
    rows: list[dict[str, Any]] = []
    for line in refs:
        cp_id, _, commit = line.partition(" ")
        if not cp_id.startswith("cp-") or not commit:
            continue
        try:
            manifest = json.loads(git.run(["cat-file", "blob", f"{commit}:manifest.json"], cwd=store, harden=True,
                                          env={"GIT_DIR": str(store)}).stdout)
        except (TaskboxError, ValueError):
            continue
        if not isinstance(manifest, dict) or manifest.get("task_id") != task_id:
            continue
        meta = {"named": False, "commit": commit, "image": manifest.get("image"), "reason": "rebuilt from the store",
                "units": [{"path": u.get("path"), "kind": u.get("kind"), "tree": u.get("tree")}
                          for u in manifest.get("units", []) if isinstance(u, dict)]}
        rows.append({"id": cp_id, "task_id": task_id, "name": str(manifest.get("name") or cp_id)[:64],
                     "description": "", "trigger": str(manifest.get("trigger") or "manual"),
                     "ref": f"refs/checkpoints/{cp_id}", "parent_id": None, "pinned": 0, "size_bytes": 0,
                     "metadata": json.dumps(meta, sort_keys=True),
                     "created_at": float(manifest.get("created_at") or 0)})
    rows.sort(key=lambda r: r["created_at"])
    return rows


def adoptable(paths: Paths, settings: Settings, containers: list[dict[str, Any]] | None,
              name: str) -> Task:
    """The task an orphan workspace or container named ``name`` describes (for ``doctor --adopt``)."""
    tasks, notes = discover(paths, settings, containers, only=name)
    if name not in tasks:
        why = "; ".join(notes) or "no workspace, record, container or checkpoint store has that name"
        raise NotFound(f"nothing on disk to adopt as task {name!r}: {why}")
    return tasks[name]
