"""The taskbox core: one service that every adapter (CLI, MCP, web) calls.

:class:`TaskService` owns the task lifecycle (SPEC §2): it ties together the registry,
the task's workspace and branch, its container, its memory and the hook system. Adapters
only translate input and output.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import queue
import re
import secrets
import stat
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from . import (
    agents,
    caches,
    doctor,
    engine,
    faults,
    files,
    git,
    images,
    live_output,
    liveness,
    network,
    policy,
    pressure,
    projects,
    quota,
    ultrawork,
    workspace,
)
from . import merge as merge_engine
from . import pool as pools
from .audit import AuditLog
from .config import Paths, Settings, default_home, parse_size
from .confine import container_workdir, normalize
from .errors import (
    CommandCancelled,
    CommandTimeout,
    ConcurrentModification,
    Conflict,
    GitError,
    ImageMissing,
    InvalidInput,
    InvalidTransition,
    NotFound,
    PathOutsideWorkspace,
    PolicyDenied,
    SandboxError,
    TaskboxError,
    TaskBusy,
    TaskLocked,
    VolumeError,
    WorkspaceFull,
)
from .memory import TODO_STATUSES, Recovery, TaskMemory
from .models import (
    FINISHED,
    CheckpointRequest,
    ContainerState,
    Lease,
    LockMode,
    Session,
    Status,
    Task,
    check_transition,
    slugify,
)
from .network import MODES as NETWORK_MODES
from .network import EgressRules
from .plugins import make_manager
from .registry import Registry, list_backups, restore_backup, set_aside
from .results import CheckpointRestored, Completed, Detached, Synced, TaskOpened
from .sandbox import (
    CMD_MARK,
    LABEL_HOME,
    LABEL_SCRATCH,
    LABEL_TASK,
    ContainerSpec,
    ExecControl,
    ExecResult,
    Sandbox,
    check_limits,
    host_capacity,
    sandbox_owner,
    weakened,
)
from .secrets import Redactor
from .secrets import resolve as resolve_secrets

if TYPE_CHECKING:
    from .checkpoints import Checkpoints, NewCheckpoint

T = TypeVar("T")
DESCRIPTION_MAX = 2000
NAME_MAX = 64
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TASK_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Tool calls whose operation counts itself in the ``tool_calls`` metric (a command is counted
# with its execution record, also when it comes from the CLI); every other call is counted
# when it is recorded. memory.rebuild counts the same way.
SELF_COUNTING_TOOLS = frozenset({"execute_in_task"})
# One lock per (home, task): merges into a task (and the parent's publish before sub-tasks fork) are serialised.
_ULTRA_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_ULTRA_LOCKS_GUARD = threading.Lock()
# Per (home, parent task): whether its sub-task table is being rendered, and whether it is stale.
_SUBTASK_VIEWS: dict[tuple[str, str], dict[str, bool]] = {}


@dataclass
class AttachResult:
    session: Session
    task: Task
    restored_state: dict[str, Any]
    recovery: Recovery | None = None
    took_over: list[dict[str, Any]] = field(default_factory=list)
    restore_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": True,
            "session_id": self.session.id,
            "task_id": self.task.id,
            "container_id": self.task.container_id,
            "status": str(self.task.status),
            "restored_state": self.restored_state,
            "recovery": self.recovery.to_dict() if self.recovery else None,
            "took_over": self.took_over,
            "restore_ms": self.restore_ms,
        }


def _validate_text(label: str, value: str, limit: int) -> str:
    value = unicodedata.normalize("NFC", value or "").strip()
    if not value:
        raise InvalidInput(f"{label} must not be empty")
    if len(value) > limit:
        raise InvalidInput(f"{label} is {len(value)} characters long; the limit is {limit}")
    if _CONTROL.search(value):
        raise InvalidInput(f"{label} contains control characters")
    return value


def _validate_name(label: str, value: str) -> str:
    value = _validate_text(label, value, NAME_MAX)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@+-]*", value):
        raise InvalidInput(f"{label} {value!r} may contain only letters, digits and . _ @ + -")
    return value


def _clip(value: Any, limit: int = 300) -> Any:
    """A tool argument as logged: long text (file contents, big commands) cut to ``limit``."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}… [{len(value)} characters]"
    if isinstance(value, list | tuple):
        return [_clip(v, limit) for v in value[:50]]
    if isinstance(value, dict):
        return {str(k): _clip(v, limit) for k, v in list(value.items())[:50]}
    return value


class TaskService:
    """All taskbox behaviour. Create one per process; it is safe to share between threads."""

    def __init__(
        self,
        home: Path | str | None = None,
        settings: Settings | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
        *,
        create_registry: bool = False,
    ) -> None:
        self.paths = Paths(Path(home).resolve() if home else default_home())
        self.paths.ensure()
        self.settings = settings or Settings.load(self.paths.home)
        # Secret values never reach a record: every event, memory and audit write passes this.
        self.redactor = Redactor(self.paths.home)
        # A vanished registry is refused, not re-created empty (see taskbox.registry);
        # ``create_registry`` is for a rebuild.
        self.registry = Registry(self.paths.db, burst=self.settings.record_burst,
                                 window=self.settings.record_window, redact=self.redactor,
                                 identity=self.paths.identity, evidence=lambda: doctor.disk_evidence(self.paths),
                                 records=self.paths.records, backups=self.paths.backups,
                                 backup_every=self.settings.backup_interval_minutes * 60,
                                 backup_keep=self.settings.backup_keep, create=create_registry)
        self.audit = AuditLog(self.paths.home / "audit", self.paths.locks, self.registry, self.settings)
        self.output_budgets = live_output.Budgets()  # live exec.output bytes per task (see exec)
        self.pm = plugin_manager or make_manager()
        self.hook = self.pm.hook
        self._sandbox: Sandbox | None = None
        self._checkpoints: Checkpoints | None = None
        # Containers of different TASKBOX_HOMEs on one engine are told apart by this label.
        self.home_label = hashlib.sha256(str(self.paths.home).encode()).hexdigest()[:16]
        # Set by a long-lived server (bind_leases_to_process): its leases die with it.
        self.lease_holder: str | None = None

    def bind_leases_to_process(self) -> None:
        """Tie the leases this service takes, and the commands it starts, to this process:
        when it dies, another agent takes the task over at once and its commands are killed."""
        self.lease_holder = liveness.identity()

    @property
    def lease_holder_token(self) -> str | None:
        return liveness.token(self.lease_holder) if self.lease_holder else None

    # --- plumbing ----------------------------------------------------------------------------

    @property
    def sandbox(self) -> Sandbox:
        """The container layer; connecting raises DockerUnavailable with how to start Docker."""
        if self._sandbox is None:
            self._sandbox = Sandbox(engine.connect())
            if self.settings.exec_agent:
                self._sandbox.agent_home = self.paths.home
            self._sandbox.release_slot = self.pool.release
            self._sandbox.gate_dir = self.paths.locks
        return self._sandbox

    @functools.cached_property
    def pool(self) -> pools.Pool:
        """The warm pool's slots (:mod:`taskbox.pool`)."""
        return pools.Pool(self.paths.pool)

    def get(self, task_id: str) -> Task:
        return self.registry.get_task(task_id)

    def memory(self, task: Task) -> TaskMemory:
        return TaskMemory(self._ws(task), self.paths.locks / f"{task.id}.memory.lock", self.redactor)

    def _ws(self, task: Task) -> Path:
        """The task's workspace for host-side reads and writes, its volume mounted if it has one.

        A workspace that is gone is a one-line error saying how to bring it back.
        """
        ws = Path(task.workspace_path)
        if task.status is not Status.ARCHIVED and self.workspace_lost(task):  # mounts the volume
            how = (f"`taskbox restore-checkpoint {task.id}` (or `taskbox doctor --fix`) brings it back from its "
                   "newest checkpoint" if self.registry.checkpoints(task.id) else "it has no checkpoint to come "
                   "back from")
            image = self.paths.volume(task.id)
            if task.metadata.get("quota") and not image.exists():
                raise VolumeError(f"the workspace volume {image} of task {task.id} is gone; {how}", task_id=task.id)
            raise NotFound(f"the workspace of task {task.id} ({ws}) is gone; {how}", task_id=task.id)
        self._ensure_volume(task)
        return ws

    def workspace_lost(self, task: Task) -> bool:
        """Whether the task's workspace (or its quota volume) is gone."""
        if task.metadata.get("quota") and not self.paths.volume(task.id).exists():
            return True
        ws = Path(task.workspace_path)
        if not ws.is_dir():
            return True
        try:
            self._ensure_volume(task)
            with os.scandir(ws) as it:
                return next(it, None) is None  # emptied: a live workspace has at least its .git
        except (OSError, TaskboxError):
            return False  # unreadable: not taken for lost

    def fix_ownership(self, task_id: str) -> str:
        """Give every entry of the workspace that the sandbox user does not own back to it."""
        task = self.get(task_id)
        _shown, count = files.foreign_owned(self._ws(task), sandbox_owner(), fix=True)
        self.registry.add_event("workspace.reowned", task.id, {"files": count})
        return f"{count} entr{'y' if count == 1 else 'ies'} given back to the sandbox user"

    def restore_workspace(self, task_id: str, by: str, checkpoint_id: str | None = None) -> CheckpointRestored:
        """Bring a lost workspace back from a checkpoint (the newest by default): its quota volume
        made again first, then every file, the branch (its ``.git``) and the memory; the
        container, which bound the old directory, is made again on the next start."""
        task = self.get(task_id)
        if not self.registry.checkpoints(task.id):
            raise NotFound(f"the workspace of task {task.id} is gone and it has no checkpoint to come back from",
                           task_id=task.id)
        ws = Path(task.workspace_path)
        vol = task.metadata.get("quota")
        image = self.paths.volume(task.id)
        made_volume = False
        if vol and not image.exists():  # the volume first, its mount point the workspace
            quota.release(image, ws)  # a stale mount of the lost image, if any
            quota.create_volume(image, ws, vol["disk"], vol["inodes"], sandbox_owner())
            made_volume = True
        elif vol:
            self._ensure_volume(task)
        remade = made_volume
        if not ws.is_dir():
            ws.mkdir(mode=0o755, parents=True)
            if os.geteuid() == 0:
                os.chown(ws, *sandbox_owner())
            remade = True
        cps = self.checkpoints
        with cps.locked(task.id):
            done = cps.restore(task, checkpoint_id, force=True)
        if remade and task.container_id:  # its bind mount names the directory that was lost
            self.sandbox.remove(task.container_id)
            task = self._update(task.id, {"container_id": None, "container_state": ContainerState.NONE},
                                ("container.lost", {"container_id": task.container_id}))
        cp = done.checkpoint
        self.update_state(task, lambda s: s.__setitem__("current_checkpoint", cp["checkpoint_id"]))
        self.registry.add_event("workspace.restored", task.id, {"checkpoint_id": cp["checkpoint_id"], "by": by,
                                                               "volume": made_volume})
        return CheckpointRestored(task.id, cp["checkpoint_id"], cp["name"], done.changed, done.added, done.removed,
                                  False, done.forced, round((time.perf_counter() - done.started) * 1000, 1),
                                  workspace_restored=True, volume_made=made_volume)

    def _ensure_volume(self, task: Task) -> None:
        """Mount the task's workspace volume (its disk and inode quota) unless it is mounted.

        After a reboot the volume is not mounted and the workspace path is the bare, empty,
        immutable directory underneath: a container started then would bind that, and host
        writes would fail. A missing volume is a :class:`VolumeError`, except for an archived
        task whose workspace `cleanup-task --remove-workspace` removed.
        """
        if not task.metadata.get("quota"):
            return
        image = self.paths.volume(task.id)
        if task.status is Status.ARCHIVED and not image.exists():
            return
        if quota.ensure_mounted(image, Path(task.workspace_path)):
            self.registry.add_event("workspace.mounted", task.id, {"image": str(image)})

    def _remove_workspace(self, task: Task) -> None:
        """Delete the task's workspace: first its own volume (unmounted, image deleted), then the directory."""
        ws = Path(task.workspace_path)
        quota.release(self.paths.volume(task.id), ws)
        workspace.remove(ws)

    def workspace_usage(self, task: Task) -> dict[str, Any] | None:
        """Disk and inode use of the task's workspace volume against its quota; None without a quota."""
        vol = task.metadata.get("quota")
        if not vol:
            return None
        image = self.paths.volume(task.id)
        out: dict[str, Any] = {"quota_bytes": vol["disk"], "quota_inodes": vol["inodes"], "image": str(image),
                               "mounted": quota.is_mounted(image, Path(task.workspace_path))}
        try:
            out["host_bytes"] = image.stat().st_blocks * 512  # what the sparse image takes on the host disk
        except FileNotFoundError:
            out["host_bytes"] = 0
        if out["mounted"]:
            out.update(quota.usage(Path(task.workspace_path)))
        return out

    def _workspace_quota(self, project: policy.Policy, disk: str | None, inodes: int | None) -> tuple[int, int]:
        """A new task's workspace quota: (bytes, inodes), or (0, 0) when quotas are off.

        The task's own values win, then the project policy's ``[limits]``, then the settings.
        Only the ``workspace_quota`` setting can turn quotas off.
        """
        if disk is not None:
            size = quota.parse_size(disk)
            if not size:
                raise InvalidInput("a task's disk quota cannot be 0: quotas are turned off only by the "
                                   "workspace_quota setting")
        elif project.limits.disk:
            size = quota.parse_size(project.limits.disk)
        else:
            size = quota.parse_size(self.settings.workspace_quota, "the workspace_quota setting")
        if not size:
            if inodes is not None:
                raise InvalidInput("an inode quota needs a disk quota, and workspace quotas are off "
                                   "(workspace_quota = 0)")
            return 0, 0
        if inodes is not None:
            return size, quota.check_inodes(int(inodes), size)
        count = int(project.limits.inodes or self.settings.workspace_inodes)
        if count and not project.limits.inodes:
            count = min(count, size // quota.BYTES_PER_INODE)  # the default scaled down to a small disk
        return size, quota.check_inodes(count, size)

    def _defaults(self, task: Task) -> dict[str, Any]:
        return {"task_id": task.id, "status": str(task.status), "branch": task.branch, "lock_mode": str(task.lock_mode)}

    def state(self, task_id: str) -> dict[str, Any]:
        """The task's state.json (rebuilt from the logs if damaged)."""
        task = self.get(task_id)
        state, recovery = self.memory(task).load(self._defaults(task))
        if recovery:
            self._report_recovery(task, recovery)
        return state

    def update_state(self, task: Task, fn: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        state, recovery = self.memory(task).update(self._defaults(task), fn)
        if recovery:
            self._report_recovery(task, recovery)
        return state

    def _report_recovery(self, task: Task, recovery: Recovery) -> None:
        self.registry.add_event("memory.recovered", task.id, recovery.to_dict())

    def retry(self, fn: Callable[[], T], attempts: int = 50) -> T:
        """Run a read-modify-write ``fn`` again when it loses an optimistic-locking race."""
        for attempt in range(attempts):
            try:
                return fn()
            except ConcurrentModification:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.005 * (1 + secrets.randbelow(10)))
        raise AssertionError("unreachable")

    def _update(self, task_id: str, changes: dict[str, Any], event: tuple[str, dict[str, Any]] | None = None) -> Task:
        """Re-read the task and apply ``changes`` with optimistic locking, retrying lost races."""

        def attempt() -> Task:
            task = self.get(task_id)
            return self.registry.update_task(task_id, task.version, changes, event)

        return self.retry(attempt)

    def _transition(self, task_id: str, target: Status, changes: dict[str, Any] | None = None, **payload: Any) -> Task:
        def attempt() -> Task:
            task = self.get(task_id)
            check_transition(task.id, task.status, target)
            event = (f"task.{target}", {"from": str(task.status), **payload})
            return self.registry.update_task(task_id, task.version, {"status": target, **(changes or {})}, event)

        task = self.retry(attempt)
        try:
            self.update_state(task, lambda s: s.__setitem__("status", str(target)))
        except (WorkspaceFull, VolumeError, NotFound) as exc:
            # The registry holds the status; state.json only mirrors it. A workspace the agent
            # filled (e.g. its inodes), or that is gone (its volume too), must not stop a pause
            # or a failure from taking effect.
            self.registry.add_event("memory.refused", task.id, {"error": exc.message, "status": str(target)})
        return task

    def update_metadata(self, task_id: str, fn: Callable[[dict[str, Any]], None]) -> Task:
        """Change a task's free-form metadata with ``fn``; concurrent callers never lose updates."""

        def attempt() -> Task:
            task = self.get(task_id)
            meta = dict(task.metadata)
            fn(meta)
            return self.registry.update_task(task_id, task.version, {"metadata": meta})

        return self.retry(attempt)

    # --- hooks: every operation fires them here, under one vocabulary (models.OPERATIONS) -----

    def _before(self, task: Task, op: str, args: dict[str, Any]) -> None:
        """Every plugin's ``pre_tool_call`` for ``op``: a plugin refuses by raising, or asks for
        a checkpoint first (:class:`~taskbox.models.CheckpointRequest`).

        However many plugins ask (a policy rule and the risk score, say), one checkpoint is
        taken. If it fails, a ``required`` request (a policy rule) refuses the operation; the
        others record the failure and let it run.
        """
        answers = self.hook.pre_tool_call(service=self, task=task, tool=op, args=args)
        asks = [a for a in answers if isinstance(a, CheckpointRequest)]
        if not asks or op == "checkpoint":
            return
        reason = "; ".join(dict.fromkeys(a.reason for a in asks))
        try:
            self.create_checkpoint(task.id, None, trigger=asks[0].trigger, reason=reason)
        except TaskboxError as exc:
            required = next((a for a in asks if a.required), None)
            if required is None:
                self.registry.add_event("checkpoint.auto_failed", task.id, {
                    "trigger": asks[0].trigger, "reason": reason[:500], "error": exc.message[:500]})
                return
            self.registry.add_event("policy.checkpoint_failed", task.id,
                                    {"rule": required.rule, "error": exc.message[:300]})
            raise PolicyDenied(f"the policy asks for a checkpoint before this call ({required.rule}), and "
                               f"it failed: {exc.message}", rule=required.rule, tool=op) from exc

    def _after(self, task: Task, op: str, args: dict[str, Any], result: Any) -> None:
        """Every plugin's ``post_tool_call`` for ``op``."""
        self.hook.post_tool_call(service=self, task=task, tool=op, args=args, result=result)

    # --- create ------------------------------------------------------------------------------

    def create_task(
        self,
        repo: str | Path,
        description: str,
        *,
        agent: str = "agent",
        model: str = "unknown",
        title: str | None = None,
        task_id: str | None = None,
        lock_mode: str = "exclusive",
        memory: str | None = None,
        cpus: float | None = None,
        pids_limit: int | None = None,
        disk: str | None = None,
        inodes: int | None = None,
        network: str | None = None,
        allow_domains: list[str] | None = None,
        image: str | None = None,
        base_ref: str | None = None,
        lazy: bool = False,
        metadata: dict[str, Any] | None = None,
        parent_id: str | None = None,
        progress: Callable[[str], None] | None = None,
        memory_on_branch: bool | None = None,
        template: str | None = None,
        publish: list[str] | None = None,
        branch: str | None = None,
    ) -> Task:
        """Register a task, check out its workspace on a new branch and (unless lazy) start its container.

        ``branch`` is the wanted branch name (default: the ``branch_name`` hook's); a taken one
        gets a suffix. ``disk`` and ``inodes`` are the workspace's quota (:mod:`taskbox.quota`).
        ``memory_on_branch`` (default: the setting) commits ``.task-memory/`` and ``Plan.md`` on
        the branch instead of its companion ref (:func:`taskbox.workspace.memory_ref`). Input is
        validated and Docker checked before anything changes; a failure part-way undoes what
        was done. A process killed part-way leaves ``pending_op='create'``,
        which `doctor` reports and repairs.
        """
        say = progress or (lambda _msg: None)
        description = _validate_text("description", description, DESCRIPTION_MAX)
        title = _validate_text("title", title, 200) if title else description.splitlines()[0][:80]
        agent = _validate_name("agent name", agent)
        model = _validate_name("model name", model)
        mode = self._lock_mode(lock_mode)
        repo_path = git.repo_root(Path(repo).expanduser().resolve())
        if repo_path == self.paths.home or self.paths.home in repo_path.parents:
            raise InvalidInput("the repository must not be inside TASKBOX_HOME")
        # The project policy (.taskbox/policy.toml) gives defaults and ceilings (taskbox.policy).
        project = policy.load(repo_path)
        setup = self.project_setup(repo_path, template)  # .taskbox/config.toml, devcontainer.json, template
        copies = projects.read_copies(repo_path, setup.copy)  # a missing file: refused before any change
        mem = memory or project.limits.memory or self.settings.memory
        cpu = float(cpus if cpus is not None else project.limits.cpus or self.settings.cpus)
        pids = int(pids_limit if pids_limit is not None else project.limits.pids or self.settings.pids_limit)
        check_limits(mem, cpu, pids)
        disk_bytes, inode_count = self._workspace_quota(project, disk, inodes)
        project.check_limits(mem, cpu, pids, disk=disk_bytes, inodes=inode_count)
        # The settings' caps and what the machine has; a lazy task is checked against this
        # host now and against the engine when its container is made.
        check_limits(mem, cpu, pids, max_memory=self.settings.max_memory, max_cpus=self.settings.max_cpus,
                     max_pids=self.settings.max_pids,
                     capacity=host_capacity() if lazy else self.sandbox.capacity())
        if disk_bytes:  # not root, no mkfs, a quota larger than the free disk: say so now
            quota.check_supported()
            quota.check_room(self.paths.volumes, disk_bytes)
        metadata = {k: v for k, v in (metadata or {}).items()
                    if k not in ("quota", "memory_on_branch", "ports", "setup_pending", "caches", "project_image")}
        if lazy and setup.commands:  # run when the sandbox first starts (ensure_running), as the file says now
            metadata["setup_pending"] = {"commands": setup.commands, "timeout": setup.timeout}
        if setup.caches:  # mounted read-only into every container the task gets (taskbox.caches)
            metadata["caches"] = list(setup.caches)
        if not image and not setup.image and setup.dockerfile:  # a lazy task builds it when it first starts
            metadata["project_image"] = {"dockerfile": setup.dockerfile, "context": setup.context}
        if self.settings.memory_on_branch if memory_on_branch is None else memory_on_branch:
            metadata["memory_on_branch"] = True
        if publish:  # published by _create_container, so a port already taken undoes the create
            metadata["ports"] = [agents.parse_publish(p) for p in publish]
        if disk_bytes:
            metadata["quota"] = {"disk": disk_bytes, "inodes": inode_count}
        net = network or ("allowlist" if allow_domains else None) or project.network.mode or self.settings.network
        if net not in NETWORK_MODES:
            raise InvalidInput(f"network mode {net!r} is not one of {', '.join(NETWORK_MODES)}")
        if allow_domains:
            if net != "allowlist":
                raise InvalidInput("allowed domains need network mode allowlist")
            EgressRules.build(allow_domains)  # refuse a bad entry before anything changes
            metadata = {**(metadata or {}), "sandbox": {**((metadata or {}).get("sandbox") or {}),
                                                        "allow_domains": list(allow_domains)}}
        if task_id is not None and not _TASK_ID.match(task_id):
            raise InvalidInput(f"task id {task_id!r} must be lowercase letters, digits and dashes (max 63)")
        wanted = branch or self.hook.branch_name(agent=agent, model=model, description=description)
        # One git process answers the start commit, the base ref and whether the wanted branch is taken.
        start = f"{base_ref}^{{commit}}" if base_ref else "HEAD^{commit}"
        names = ["HEAD^{commit}", f"refs/heads/{wanted}", *([start] if base_ref else []), f"{start}^{{tree}}",
                 *(f"{start}:{p}" for p in workspace.MEMORY_PATHS)]  # taskbox paths the start commit tracks
        if "\n" in wanted:
            raise InvalidInput(f"cannot make a valid branch name from {wanted!r}")
        if base_ref and "\n" in base_ref:
            raise InvalidInput(f"base ref {base_ref!r} does not exist in {repo_path}")
        head, wanted_tip, *based = workspace.lookup(repo_path, names)
        start_tree, *found = based[-1 - len(workspace.MEMORY_PATHS):]
        tracked = [bool(sha) for sha in found]
        base_commit = head or None
        if base_ref and base_commit is None:
            raise InvalidInput(f"{repo_path} has no commits, so base ref {base_ref!r} does not exist")
        if base_ref:
            if not based[0]:
                raise InvalidInput(f"base ref {base_ref!r} does not exist in {repo_path}")
            base_commit = based[0]
        image_name = image or setup.image or (
            self.project_image(repo_path, setup, build=not lazy, progress=say) if setup.dockerfile
            else self.settings.image)
        if not lazy:  # Docker down or an image missing: say so before anything changes
            self.sandbox.ensure_image(image_name, f"docker pull {image_name}" if setup.image and not image
                                      else "taskbox image build")
            if net == "allowlist":
                self.sandbox.ensure_image(self.settings.proxy_image, "taskbox image build --proxy")

        now = time.time()
        task: Task | None = None
        for attempt in range(8):
            tid = task_id or self._new_task_id(description, attempt)
            branch = self._unique_branch(repo_path, wanted, attempt, taken=bool(wanted_tip))
            candidate = Task(
                id=tid,
                title=title,
                description=description,
                status=Status.PENDING,
                repo_path=str(repo_path),
                branch=branch,
                base_ref=base_commit or "",
                workspace_path=str(self.paths.workspace(tid)),
                image=image_name,
                agent=agent,
                model=model,
                memory_limit=mem,
                cpu_limit=cpu,
                pids_limit=pids,
                network=net,
                lock_mode=mode,
                parent_id=parent_id,
                task_type="subtask" if parent_id else "main",
                template=template,
                metadata=metadata or {},
                pending_op="create",
                op_pid=os.getpid(),
                created_at=now,
                last_active=now,
            )
            try:
                self.registry.insert_task(candidate, ("task.registering", {"branch": branch}))
                task = candidate
                break
            except Conflict:
                if task_id and self.registry.task_exists(task_id):
                    raise
                continue  # lost a race for the id or the branch name: take a suffixed one
        if task is None:
            raise Conflict("could not find a free task id and branch name; try again")

        try:
            ws = Path(task.workspace_path)
            if ws.exists() or self.paths.volume(task.id).exists():
                self._remove_workspace(task)  # leftover of an earlier crashed create with this id
            if vol := task.metadata.get("quota"):
                say(f"making the workspace volume ({quota.human(vol['disk'])}, {vol['inodes'] or 'default'} inodes)")
                quota.create_volume(self.paths.volume(task.id), ws, vol["disk"], vol["inodes"], sandbox_owner(),
                                    spares=self.paths.volumes)
            say(f"checking out {repo_path} on branch {task.branch}")
            # One flush at the end instead of an fsync per file: until the create is recorded
            # below, a crash leaves it pending, and `doctor` undoes it.
            with files.deferred_sync(ws):
                workspace.create(repo_path, ws, task.branch, base_commit, clean=self._clean_branch(task))
                self.memory(task).init(task.id, str(Status.PENDING), task.branch, str(mode))
                self.hook.task_start(service=self, task=task)
                workspace.commit_fresh(ws, f"taskbox: start task {task.id}\n\n{description}",
                                       clean=self._clean_branch(task), branch=task.branch, tracked=tracked,
                                       tree=start_tree)
                for rel, data, fmode in copies:  # after the first commit: ignored or not, the user's local files
                    files.atomic_write(ws, rel, data, fmode | 0o600)
            faults.point("create.workspace")
            changes: dict[str, Any] = {"pending_op": None, "op_pid": None}
            if not lazy:
                say("starting the sandbox container")
                cid = self._create_container(task, fresh=True)
                faults.point("create.container")
                changes.update(container_id=cid, container_state=ContainerState.RUNNING, status=Status.ACTIVE)
            task = self.registry.update_task(task.id, task.version, changes, ("task.created", {
                "branch": task.branch, "lazy": lazy, "repo": str(repo_path)}))
            if not lazy:
                self.update_state(task, lambda s: s.__setitem__("status", str(Status.ACTIVE)))
            if copies:
                self.registry.add_event("setup.copied", task.id, {"files": [c[0] for c in copies][:50]})
        except BaseException:
            try:
                self._undo_create(task)
            except TaskboxError as exc:  # the row stays (pending_op='create'): `doctor --fix` retries
                self.registry.add_event("task.undo_failed", task.id, {"error": exc.message[:300]})
            raise
        if setup.commands and not lazy:
            say(f"running {len(setup.commands)} setup command(s)")
            task = self._run_setup(task, setup)
        return task

    def project_setup(self, repo: str | Path, template: str | None = None) -> projects.ProjectSetup:
        """A project's setup (``.taskbox/config.toml``, ``devcontainer.json``), under ``template`` if named."""
        own = projects.load(Path(repo))
        return projects.template(self.paths.home, template, self._shipped_templates()).over(own) if template else own

    def _shipped_templates(self) -> dict[str, Any]:
        """The templates plugins ship (``project_templates`` hook); the first plugin to name one wins."""
        out: dict[str, Any] = {}
        for answer in self.hook.project_templates():
            for name, settings in (answer or {}).items() if isinstance(answer, dict) else ():
                out.setdefault(name, settings)
        return out

    def project_image(self, repo: Path, setup: projects.ProjectSetup, *, build: bool = True, force: bool = False,
                      progress: Callable[[str], None] | None = None) -> str:
        """The image of a project's own Dockerfile, built unless already built (or ``build`` is
        false: a lazy task builds nothing at create, and its image when its sandbox first starts)."""
        assert setup.dockerfile
        context = setup.context or str(Path(setup.dockerfile).parent)
        if not build:
            return images.project_image(repo, setup.dockerfile, context)[0]
        return images.build_project(self.sandbox.client, repo=repo, dockerfile=setup.dockerfile, context=context,
                                    force=force, progress=progress).tag

    def build_project_image(self, repo: str | Path, *, force: bool = False,
                            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Build the image of the project at ``repo`` from its own Dockerfile (`image build --repo`);
        ``packages``: its ``[agent] packages`` for the agents layer. ``image`` is None when the
        project names no Dockerfile."""
        root = git.repo_root(Path(repo).expanduser().resolve())
        setup = projects.load(root)
        out: dict[str, Any] = {"repo": str(root), "image": None, "packages": setup.packages}
        if setup.dockerfile and not setup.image:
            assert setup.context
            res = images.build_project(self.sandbox.client, repo=root, dockerfile=setup.dockerfile,
                                       context=setup.context, force=force, progress=progress)
            out["image"] = {"tag": res.tag, "cached": res.cached, "seconds": round(res.seconds, 2)}
        return out

    def templates(self) -> list[dict[str, Any]]:
        """Templates saved under TASKBOX_HOME and those plugins ship."""
        return projects.templates(self.paths.home, self._shipped_templates())

    def show_setup(self, template: str | None = None, repo: str | Path = ".") -> dict[str, Any]:
        """A template's settings, or (no name) the project's own setup at ``repo``."""
        if template:
            return projects.template(self.paths.home, template, self._shipped_templates()).to_dict()
        return projects.load(git.repo_root(Path(repo).expanduser().resolve())).to_dict()

    def save_template(self, name: str, repo: str | Path = ".") -> dict[str, Any]:
        """Save the project's setup at ``repo`` as template ``name`` under TASKBOX_HOME."""
        setup = projects.load(git.repo_root(Path(repo).expanduser().resolve()))
        path = projects.save_template(self.paths.home, name, setup)
        return {"name": name, "path": str(path), **setup.to_dict()}

    def _run_setup(self, task: Task, setup: projects.ProjectSetup) -> Task:
        """Run the project's setup commands once, in order; the first failure fails the task (log kept)."""
        timeout = float(setup.timeout or self.settings.setup_timeout)
        for i, command in enumerate(setup.commands, 1):
            try:
                r = self.exec(task.id, command, timeout=timeout)
                code, why = r.exit_code, f"exited with code {r.exit_code}"
            except (CommandTimeout, CommandCancelled) as exc:
                code, why = -1, exc.message
            self.registry.add_event("setup.command", task.id, {"index": i, "command": command[:200],
                                                               "exit_code": code})
            if code != 0:
                reason = f"setup command {i} `{command[:100]}` {why}"
                self.fail(task.id, reason)
                raise SandboxError(f"task {task.id} failed: {reason}; its output is in `taskbox task-executions "
                                   f"{task.id}`", task_id=task.id, command=command)
        return self.get(task.id)

    def start_task(self, repo: str | Path, description: str, *, attach: bool = True,
                   session_id: str | None = None, **options: Any) -> dict[str, Any]:
        """Create a task and attach its creator (unless ``attach`` is false or the task is lazy).

        Returns the task's record with ``session_id`` and ``warnings`` (how its sandbox is
        weaker than the default profile). ``options`` are :meth:`create_task`'s.
        """
        task = self.create_task(repo, description, **options)
        sid = None
        if attach and not options.get("lazy") and not options.get("metadata", {}).get("run_agent"):
            sid = self.attach(task.id, options.get("agent", "agent"), options.get("model", "unknown"),
                              session_id).session.id
            task = self.get(task.id)
        return {**task.to_dict(), "session_id": sid, "warnings": self.sandbox_warnings(task)}

    def agent_task_options(self, agent: str, options: dict[str, Any], *, secrets: list[str] | None = None,
                           base_url: str | None = None) -> dict[str, Any]:
        """:meth:`create_task` options for a task made to run ``agent`` (``create-task --run``).

        The agents image unless an image is named; network ``allowlist`` (the preset's model
        API hosts are added when the agent starts) unless a mode is named. The run itself is
        :meth:`run_agent`; the creator is not attached (the run attaches). The run's
        ``secrets`` and ``base_url`` are checked here, so bad ones are refused before the task
        is created.
        """
        p = agents.preset(agent)
        if base_url:
            agents.environment(p, base_url=base_url)  # a bad URL, or an agent that takes none
        resolve_secrets(self.paths.home, secrets or [])  # a missing secret
        out = dict(options)
        out["image"] = out.get("image") or self.settings.agents_image
        if not out.get("network") and p.hosts:
            out["network"] = "allowlist"
        if out.get("network") == "allowlist" and p.hosts:
            out["allow_domains"] = list(dict.fromkeys([*(out.get("allow_domains") or []), *p.hosts]))
        out["metadata"] = {**(out.get("metadata") or {}), "run_agent": p.name}
        if out.get("agent") in (None, "agent"):
            out["agent"] = p.name
        return out

    def _undo_create(self, task: Task) -> None:
        """Remove a half-made task: container, workspace volume and directory, then its registry row."""
        try:
            current = self.get(task.id)
        except NotFound:
            return
        if current.container_id:
            try:
                self.sandbox.remove(current.container_id)
            except TaskboxError:
                pass
        else:
            self._remove_labelled_container(task.id)
        self._remove_workspace(current)
        self.registry.delete_task(task.id, reason="interrupted create undone")

    def _remove_labelled_container(self, task_id: str) -> None:
        try:
            for c in self.sandbox.task_containers(self.home_label):
                if c["Labels"].get(LABEL_TASK) == task_id:
                    self.sandbox.remove(c["Id"])
            for slot in pools.owned_by(self.pool, task_id):  # a pool slot's container has no task label
                self.sandbox.remove(slot.container_id)
                self.pool.release(slot.id)
        except TaskboxError:
            pass

    def _new_task_id(self, description: str, attempt: int) -> str:
        base = slugify(description, 40)
        if attempt == 0 and not self.registry.task_exists(base):
            return base
        return f"{base[:35]}-{secrets.token_hex(2)}"

    def _unique_branch(self, repo: Path, wanted: str, attempt: int, *, taken: bool | None = None) -> str:
        """``wanted``, or it with a random suffix when taken; ``taken``: whether ``repo`` has it, if known."""
        in_use = self.registry.branches_in_use(str(repo))
        name = wanted
        if (attempt > 0 or name in in_use
                or (git.ref_exists(repo, f"refs/heads/{name}") if taken is None else taken)):
            for _ in range(20):
                name = f"{wanted}-{secrets.token_hex(3)}"
                if name not in in_use and not git.ref_exists(repo, f"refs/heads/{name}"):
                    break
        if not git.check_ref_format(name):
            raise InvalidInput(f"cannot make a valid branch name from {wanted!r}")
        return name

    def _lock_mode(self, value: str | LockMode) -> LockMode:
        try:
            return LockMode(value)
        except ValueError:
            raise InvalidInput(f"lock mode {value!r} is not one of exclusive, collaborative") from None

    def _container_spec(self, task: Task) -> ContainerSpec:
        spec = ContainerSpec(
            name=f"taskbox-{task.id}-{self.home_label[:6]}",
            image=task.image,
            workspace=Path(task.workspace_path),
            labels={LABEL_TASK: task.id, LABEL_HOME: self.home_label, "taskbox.branch": task.branch},
            memory=task.memory_limit,
            cpus=task.cpu_limit,
            pids_limit=task.pids_limit,
            network=task.network,
        )
        names = [n for n in task.metadata.get("caches") or [] if n in caches.CACHES]
        for name in names:
            spec.ro_binds[str(caches.host_dir(self.paths.home, name))] = caches.get(name).target
        spec.env.update(caches.sandbox_env(names, task.network))
        self.hook.sandbox_spec(service=self, task=task, spec=spec)  # hardening, egress proxy rules
        return spec

    def _create_container(self, task: Task, fresh: bool = False) -> str:
        self._ensure_volume(task)  # never bind the bare directory under an unmounted volume
        spec = self._container_spec(task)
        if not fresh:
            self._remove_labelled_container(task.id)  # e.g. left behind by a crash
        # A free slot of this very profile, whoever filled it (housekeeping or `taskbox pool fill`):
        # for a new task, a lazy one's first start, or a container that was lost.
        taken = pools.take(self.pool, self.sandbox, spec, Path(task.workspace_path), task.id)
        if taken.slot:
            self.registry.add_event("pool.claimed" if taken.container_id else "pool.claim_failed", task.id,
                                    {"slot": taken.slot, "container_id": taken.container_id, "error": taken.error})
        if taken.container_id:
            cid = taken.container_id
        else:
            try:
                cid = self.sandbox.create(spec)
            except SandboxError as exc:
                if "already in use" not in exc.message:
                    raise
                self._remove_labelled_container(task.id)  # a leftover holds the name: replace it
                cid = self.sandbox.create(spec)
        for p in task.metadata.get("ports") or []:  # a new container: its published ports again
            self.sandbox.publish(cid, p["port"], p["host_ip"], p["host_port"], task.image,
                                 {LABEL_TASK: task.id, LABEL_HOME: self.home_label})
        if "npm" in (task.metadata.get("caches") or []):  # npm cannot read a read-only cache: the
            # container starts from a copy of it
            try:
                r = self.sandbox.capture(cid, ["sh", "-c", caches.NPM_SEED], timeout=600)
                error = r.stderr.strip()[-300:] if r.exit_code else None
            except TaskboxError as exc:
                error = exc.message[:300]
            if error is not None:
                self.registry.add_event("cache.seed_failed", task.id, {"cache": "npm", "error": error})
        return cid

    # --- shared host caches (taskbox.caches) ---------------------------------------------------

    def caches(self) -> list[dict[str, Any]]:
        """The shared caches: host directory, size, where sandboxes see them."""
        return caches.usage(self.paths.home)

    def warm_cache(self, name: str, packages: list[str], *, requirements: str | Path | None = None,
                   image: str | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Fill shared cache ``name`` with ``packages`` (and a requirements file's) from a
        throwaway container with network; tasks then read it read-only (:mod:`taskbox.caches`)."""
        say = progress or (lambda _msg: None)
        caches.get(name)
        req: str | None = None
        if requirements is not None:  # the user's own file, passed as text: never a file in the cache
            path = Path(requirements).expanduser()
            try:  # bounded, and never blocking on a FIFO or a device
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise InvalidInput(f"requirements file {path} is not a regular file")
                    data = os.read(fd, caches.REQUIREMENTS_MAX + 1)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise InvalidInput(f"cannot read requirements file {path}: {exc.strerror}") from exc
            if len(data) > caches.REQUIREMENTS_MAX:
                raise InvalidInput(f"requirements file {path} is larger than {caches.REQUIREMENTS_MAX} bytes")
            req = data.decode("utf-8", errors="replace")
        argv = caches.warm_command(name, packages, req is not None)
        image_name = image or self.settings.image
        self.sandbox.ensure_image(image_name)
        folder = caches.host_dir(self.paths.home, name)
        ca = caches.host_ca_file()
        ro = {str(ca.resolve()): "/etc/taskbox-ca.pem"} if ca else {}
        env = caches.warm_env("/etc/taskbox-ca.pem" if ca else None)
        if req is not None:
            env["TASKBOX_REQUIREMENTS"] = req
        say(f"filling the {name} cache in a throwaway container of {image_name}")
        t0 = time.perf_counter()
        with self.sandbox.scratch(image_name, folder, {LABEL_HOME: self.home_label}, network="open",
                                  ro_binds=ro) as cid:
            r = self.sandbox.capture(cid, argv, env=env, timeout=self.settings.setup_timeout, limit=64 * 1024)
        row = next(c for c in caches.usage(self.paths.home) if c["name"] == name)
        self.registry.add_event("cache.warmed", None, {"cache": name, "packages": packages[:50],
                                                       "exit_code": r.exit_code, "bytes": row["bytes"]})
        if r.exit_code != 0:
            tail = (r.stderr.strip() or r.stdout.decode(errors="replace").strip()).splitlines()[-1:] or [""]
            raise SandboxError(f"cache warm {name} failed (exit code {r.exit_code}): {tail[0][:300]}", cache=name)
        return {**row, "packages": packages, "seconds": round(time.perf_counter() - t0, 2)}

    # --- container state ---------------------------------------------------------------------

    def ensure_running(self, task_id: str) -> Task:
        """Make sure the task's container runs (creating or starting it), and the task is active."""
        task = self.get(task_id)
        if task.status in FINISHED and task.status != Status.FAILED:
            raise InvalidTransition(f"task {task.id} is {task.status}; it has no running sandbox",
                                    task_id=task.id, status=str(task.status))
        self._ensure_volume(task)  # e.g. after a reboot: before the container starts on the path
        state = self.sandbox.state(task.container_id)
        if state is ContainerState.RUNNING and task.status is Status.ACTIVE:
            return task
        if state in (ContainerState.NONE, ContainerState.LOST):
            built = task.metadata.get("project_image")
            if built and not self.sandbox.image_exists(task.image):  # a lazy task's own Dockerfile, not built yet
                tag = self.project_image(Path(task.repo_path), projects.ProjectSetup(
                    dockerfile=built["dockerfile"], context=built["context"]))
                if tag != task.image:  # the Dockerfile changed since create: the task gets what it says now
                    task = self._update(task.id, {"image": tag})
            cid = self._create_container(task)
            task = self._update(task.id, {"container_id": cid, "container_state": ContainerState.RUNNING},
                                ("container.created", {"container_id": cid}))
        elif state is not ContainerState.RUNNING:
            assert task.container_id
            if pools.rebind(self.pool, task.container_id, Path(task.workspace_path), task.id):
                self.registry.add_event("pool.rebound", task.id, {"container_id": task.container_id})
            self.sandbox.start(task.container_id)
            task = self._update(task.id, {"container_state": ContainerState.RUNNING},
                                ("container.started", {"container_id": task.container_id}))
        if task.status is not Status.ACTIVE:
            task = self._transition(task.id, Status.ACTIVE, {"last_active": time.time()})
        self._recover_memory(task)
        if task.metadata.get("setup_pending"):
            task = self._run_pending_setup(task)
        return task

    def _run_pending_setup(self, task: Task) -> Task:
        """A lazy task's setup commands, once, when its sandbox first starts: the caller that
        clears the mark runs them; a failure fails the task like a failed setup at create."""
        while (pending := task.metadata.get("setup_pending")):
            meta = {k: v for k, v in task.metadata.items() if k != "setup_pending"}
            try:
                task = self.registry.update_task(task.id, task.version, {"metadata": meta})
            except ConcurrentModification:
                task = self.get(task.id)  # another change (or another caller that runs them): look again
                continue
            return self._run_setup(task, projects.ProjectSetup(commands=list(pending.get("commands") or []),
                                                               timeout=pending.get("timeout")))
        return task

    def kill_orphans(self, task: Task, lease: Lease) -> list[dict[str, Any]]:
        """Kill the commands a dead lease holder (a server that died) left running in the task's
        container, and record each as ``orphaned`` in the execution log. Nothing for a lease
        without a recorded holder, or one whose holder still lives."""
        if not lease.holder or liveness.alive(lease.holder) is not False or not task.container_id:
            return []
        prefix = f"{CMD_MARK}{liveness.token(lease.holder)}-"
        try:
            left = [r for r in self.running_work(task) if r["mark"].startswith(prefix)]
        except TaskboxError:
            return []  # no container to look into: nothing runs there
        for r in left:
            self.sandbox.kill_marked(task.container_id, r["mark"])
            try:
                self.memory(task).log_execution({
                    "session": lease.session_id, "agent": lease.agent, "tool": "exec", "command": r["command"],
                    "exit_code": None, "status": "orphaned",
                    "stderr": "[taskbox] the server that ran this command died; the command was killed when "
                              "another session took the task over"})
            except (TaskboxError, OSError) as exc:
                self.registry.add_event("memory.refused", task.id, {"error": str(exc)[:300],
                                                                    "command": r["command"][:200]})
            self.registry.add_event("exec.orphaned", task.id, {"session_id": lease.session_id,
                                                               "command": r["command"][:200]})
        return left

    def _kill_orphans_of(self, task_id: str, session_id: str) -> None:
        for lease in self.registry.leases(task_id, live_only=False):
            if lease.session_id == session_id:
                self.kill_orphans(self.get(task_id), lease)

    def heal(self, task_id: str, by: str, was: str) -> Task:
        """Bring back a container found stopped or gone while the registry said it runs (as
        ``resume-task`` would), and record it; the task stays as it was otherwise."""
        before = self.get(task_id)
        self.registry.add_event("container.healed", task_id, {"container_id": before.container_id, "was": was,
                                                              "by": by})
        return self.ensure_running(task_id)  # it asks Docker, not the registry

    @staticmethod
    def _clean_branch(task: Task) -> bool:
        """True when the task keeps its memory on the companion ref, off its branch."""
        return not task.metadata.get("memory_on_branch")

    def _recover_memory(self, task: Task) -> None:
        """Bring the memory back from the companion ref when the workspace lost it (e.g. `git clean -x`)."""
        if not self._clean_branch(task) or self.memory(task).exists("state.json"):
            return
        with self.in_sandbox(task) as run:
            if workspace.restore_memory(run, task.branch):
                self.registry.add_event("memory.restored", task.id, {"ref": workspace.memory_ref(task.branch)})

    def pause(self, task_id: str, *, kill_running: bool = False) -> Task:
        """Stop the task's container (its filesystem is kept) and mark the task paused.

        Refused with :class:`TaskBusy` while a command or job runs in it, unless ``kill_running``.
        """
        task = self.get(task_id)
        check_transition(task.id, task.status, Status.PAUSED)
        self._ensure_idle(task, "pause", kill_running)
        if task.container_id:
            self.sandbox.stop(task.container_id)
        self.audit.flush(task.id, force=True)
        return self._transition(task.id, Status.PAUSED, {"container_state": ContainerState.STOPPED})

    def running_work(self, task: Task) -> list[dict[str, Any]]:
        """The agent's commands and background jobs running in the task's container now."""
        if not task.container_id or self.sandbox.state(task.container_id) is not ContainerState.RUNNING:
            return []
        return self.sandbox.running(task.container_id)

    def _ensure_idle(self, task: Task, action: str, kill_running: bool) -> None:
        """Never stop or rewind a container under running work: refuse (:class:`TaskBusy`) or kill it first."""
        busy = self.running_work(task)
        if not busy:
            return
        shown = [{k: r[k] for k in ("kind", "id", "command")} for r in busy[:10]]
        if not kill_running:
            # An interactive `taskbox run` left running: say so, not its tmux command line.
            runs = [f"agent {r.get('agent')} (session {sid})" for sid, r in (task.metadata.get("runs") or {}).items()
                    if isinstance(r, dict) and any(f"-L {agents.tmux_socket(sid)} " in " ".join(
                        str(b.get("command") or "").split()) + " " for b in busy)]
            if runs and len(runs) == len(busy):
                raise TaskBusy(f"cannot {action} task {task.id}: {', '.join(runs)} left running in it; come back "
                               f"to it with `taskbox attach {task.id}` and end it, or {action} with the "
                               "kill_running option", task_id=task.id, running=shown)
            names = "; ".join(f"job {r['id']}: {r['command']}" if r["kind"] == "job" else f"command: {r['command']}"
                              for r in shown[:3])
            raise TaskBusy(f"cannot {action} task {task.id}: {len(busy)} command(s) or job(s) still run in it "
                           f"({names}); wait for them to finish, kill them, or {action} with the kill_running "
                           "option", task_id=task.id, running=shown)
        for r in busy:
            self.sandbox.kill_marked(task.container_id or "", r["mark"])
        self.registry.add_event("task.killed_running", task.id, {"action": action, "running": shown})

    # --- sessions ----------------------------------------------------------------------------

    def attach(
        self,
        task_id: str,
        agent: str,
        model: str = "unknown",
        session_id: str | None = None,
        *,
        lock_mode: str | None = None,
        wait: float = 0.0,
        history: int = 20,
    ) -> AttachResult:
        """Attach an agent session: take the lease, start the sandbox, restore the memory.

        An exclusive lease held by another live session is refused naming its holder (or
        waited for up to ``wait`` seconds); an expired lease is taken over and reported.
        """
        agent = _validate_name("agent name", agent)
        model = _validate_name("model name", model)
        task = self.get(task_id)
        if task.status not in (Status.PENDING, Status.ACTIVE, Status.PAUSED, Status.FAILED):
            raise InvalidTransition(f"task {task.id} is {task.status}; agents can attach only to "
                                    "pending, active, paused or failed tasks", task_id=task.id)
        mode = self._lock_mode(lock_mode) if lock_mode else task.lock_mode
        sid = session_id or f"s-{secrets.token_hex(6)}"
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", sid):
            raise InvalidInput(f"session id {sid!r} may contain only letters, digits and . _ : -")
        existing = self.registry.get_session(sid)
        if existing and existing.task_id != task.id:
            raise InvalidInput(f"session {sid} belongs to task {existing.task_id}")
        args = {"agent": agent, "model": model, "session_id": sid}
        self._before(task, "attach", args)
        deadline = time.monotonic() + wait
        queued = False
        try:
            while True:
                try:
                    _lease, expired = self.registry.acquire_lease(
                        task.id, sid, agent, mode, self.settings.lease_seconds,
                        self.settings.collaborative_max_agents, queued=queued, holder=self.lease_holder)
                    break
                except TaskLocked:
                    if time.monotonic() >= deadline:
                        raise
                    self.registry.join_queue(task.id, sid, agent)  # first come, first served
                    queued = True
                    time.sleep(0.2)
        except BaseException:
            if queued:
                self.registry.leave_queue(task.id, sid)
            raise
        for old in expired:  # the holder stopped renewing: its session is over
            self.registry.end_session(old.session_id, time.time())
        t0 = time.perf_counter()
        try:
            if self.workspace_lost(task) and self.registry.checkpoints(task.id):
                self.restore_workspace(task.id, "attach")
                task = self.get(task.id)
            mem = self.memory(task)  # mounts the workspace volume if it is not (after a reboot)
            self._recover_memory(task)  # lost from the workspace: back from the companion ref first
            # Load (and if damaged, rebuild) the memory first, so the recovery is reported here.
            state, recovery = mem.load(self._defaults(task))
            task = self.ensure_running(task.id)
            for old in expired:
                self.kill_orphans(task, old)
        except BaseException:
            self.registry.release_lease(task.id, sid)
            raise
        session = existing if existing and existing.detached_at is None else Session(
            id=sid, task_id=task.id, agent=agent, model=model, attached_at=time.time())
        if session is not existing:
            self.registry.add_session(session)
        mem.log_conversation({"session": sid, "agent": agent, "role": "system", "kind": "attach", "model": model,
                              "message": f"{agent} ({model}) attached"})

        def on_attach(s: dict[str, Any]) -> None:
            s["current_agent"] = agent
            s["metrics"]["sessions"] += 1
            if agent not in s["metrics"]["agents_used"]:
                s["metrics"]["agents_used"].append(agent)

        state = self.update_state(task, on_attach)
        restored = {
            "todos": state["todos"],
            # Tool-call records would crowd out what agents said; they have their own log.
            "conversations": [c for c in mem.conversations() if c.get("kind") != "tool_call"][-history:],
            "executions": mem.executions(history),
            "metrics": state["metrics"],
            "current_checkpoint": state["current_checkpoint"],
        }
        restore_ms = round((time.perf_counter() - t0) * 1000, 2)
        task = self._update(task.id, {"last_active": time.time()},
                            ("session.attached", {"session_id": sid, "agent": agent, "model": model,
                                                  "took_over": [e.session_id for e in expired]}))
        self.hook.session_start(service=self, task=task, session=session)
        if recovery:
            self._report_recovery(task, recovery)
        result = AttachResult(session, task, restored, recovery, [e.to_dict() for e in expired], restore_ms)
        self._after(task, "attach", args, result)
        return result

    def renew(self, task_id: str, session_id: str) -> bool:
        return self.registry.renew_lease(task_id, session_id, self.settings.lease_seconds)

    def detach(self, task_id: str, session_id: str | None = None, *, save_checkpoint: bool = False,
               checkpoint_name: str | None = None, kill_running: bool = False) -> Detached:
        """End an agent session; commit the work, fetch the branch, pause if nobody is left.

        ``save_checkpoint`` takes a checkpoint (named ``checkpoint_name``) after the commit.
        The last session's detach (which pauses) is refused with :class:`TaskBusy` while a
        command or job runs, unless ``kill_running``.
        """
        task = self.get(task_id)
        open_sessions = self.registry.sessions(task.id, open_only=True)
        if session_id is None:
            if len(open_sessions) != 1:
                names = ", ".join(f"{s.id} ({s.agent})" for s in open_sessions) or "none"
                raise InvalidInput(f"task {task.id} has {len(open_sessions)} attached sessions ({names}); "
                                   "say which one with --session")
            session = open_sessions[0]
        else:
            found = [s for s in open_sessions if s.id == session_id]
            if not found:
                raise NotFound(f"session {session_id} is not attached to task {task.id}", session_id=session_id)
            session = found[0]
        args = {"session_id": session.id, "save_checkpoint": save_checkpoint, "checkpoint_name": checkpoint_name}
        self._before(task, "detach", args)
        if len(open_sessions) == 1 and task.status is Status.ACTIVE:
            self._ensure_idle(task, "detach from (and pause)", kill_running)
        self.registry.release_lease(task.id, session.id)
        self.registry.end_session(session.id, time.time())
        mem = self.memory(task)
        mem.log_conversation({"session": session.id, "agent": session.agent, "role": "system", "kind": "detach",
                              "message": f"{session.agent} detached"})
        remaining = [s for s in open_sessions if s.id != session.id]

        def on_detach(s: dict[str, Any]) -> None:
            s["metrics"]["iterations"] += 1
            s["current_agent"] = remaining[-1].agent if remaining else None

        self.update_state(task, on_detach)
        self.hook.session_end(service=self, task=task, session=session)
        commit, fetched = self._publish(task, f"taskbox: {session.agent} detached ({session.id})")
        checkpoint = self.create_checkpoint(task.id, checkpoint_name, trigger="detach", reason=(
            f"{session.agent} detached (session {session.id})")) if save_checkpoint else None
        self.registry.add_event("session.detached", task.id, {"session_id": session.id, "agent": session.agent,
                                                               "commit": commit})
        paused = False
        if not remaining and self.get(task.id).status is Status.ACTIVE:
            self.pause(task.id, kill_running=kill_running)
            paused = True
        result = Detached(task.id, session.id, paused, fetched, task.branch, [s.id for s in remaining],
                          checkpoint["checkpoint_id"] if checkpoint else None)
        self._after(task, "detach", args, result)
        return result

    # --- exec --------------------------------------------------------------------------------

    def exec(
        self,
        task_id: str,
        command: str | list[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        session_id: str | None = None,
        log: bool = True,
        env: dict[str, str] | None = None,
        output_limit: int | None = None,
        secrets: list[str] | None = None,
        control: ExecControl | None = None,
    ) -> ExecResult:
        """Run a command in the task's sandbox; bounded in time and output, logged in memory.

        ``control`` streams the newest output (redacted) to another thread and lets it cancel
        the command: its processes are killed and it is logged as ``cancelled``.

        ``output_limit`` lowers the bytes of stdout and of stderr returned (an MCP client
        wants far less than a terminal); it never raises the configured limit.
        ``secrets`` names secrets (:mod:`taskbox.secrets`) put into this command's
        environment only; their values are redacted from the output and every record.
        ``log=False`` records nothing of the command, its arguments or its output — not in
        memory, events, the audit log, Plan.md or checkpoint reasons; hooks see
        ``args["log"] is False`` and must keep it that way. Only the tool-call count moves.
        """
        task = self.get(task_id)
        if isinstance(command, str) and not command.strip():
            raise InvalidInput("empty command")
        wd = container_workdir(workdir, Path(task.workspace_path))
        secs = float(timeout if timeout is not None else self.settings.exec_timeout)
        if secs <= 0 or secs > 24 * 3600:
            raise InvalidInput(f"timeout {secs} must be between 0 and 86400 seconds")
        values = resolve_secrets(self.paths.home, secrets or [])
        self.redactor.add(values)
        if task.status is not Status.ACTIVE or task.container_state is not ContainerState.RUNNING:
            task = self.ensure_running(task.id)
        args: dict[str, Any] = {"command": command, "workdir": wd, "timeout": secs}
        if values:
            args["secrets"] = sorted(values)
        if not log:
            args["log"] = False
        self._before(task, "exec", args)
        session = self.registry.get_session(session_id) if session_id else None
        if control is None and log:
            control = ExecControl()
        if control is not None:
            control.redact = self.redactor.output
        # Its output, while it runs, goes to the event log for every reader (the dashboard, any
        # process): bounded, redacted, rate-limited (taskbox.live_output). Nothing with log=False.
        live = live_output.start(task.id, command, control, self.redactor,
                                 functools.partial(self._record_output, task.id),
                                 self.output_budgets) if log and control is not None else None
        exit_code: int | None = None

        def run(cid: str) -> ExecResult:
            return self.sandbox.exec(cid, command, workdir=wd, timeout=secs,
                                     output_limit=min(output_limit or self.settings.exec_output_limit,
                                                      self.settings.exec_output_limit),
                                     env={**(env or {}), **values}, control=control,
                                     owner=self.lease_holder_token)

        try:
            try:
                result = run(task.container_id or "")
            except SandboxError as exc:
                if not exc.details.get("container_down"):
                    raise
                # Stopped or removed behind taskbox's back (docker stop, rm -f, an engine
                # restart): nothing ran, so it is started or recreated and the command runs.
                task = self.heal(task.id, "exec", exc.details["container_down"])
                result = run(task.container_id or "")
            exit_code = result.exit_code
        except TaskboxError as exc:
            if live is not None:
                live.close(None)
            self._redact_error(exc)  # in place: it reaches the caller
            partial = exc.details.get("result")
            if partial:
                self._log_exec(task, session, command, wd, ExecResult(**partial), log)
            raise
        finally:
            if live is not None:
                live.close(exit_code)
        result = self._redact_result(result)
        self._log_exec(task, session, command, wd, result, log)
        self._after(task, "exec", args, result)
        return result

    def _record_output(self, task_id: str, payload: dict[str, Any]) -> None:
        # Bounded by live_output's own budget, so past the registry's per-type limiter (its
        # burst a minute would cut a live stream after a few seconds).
        self.registry.add_event("exec.output", task_id, payload, limited=False)
        if payload.get("done"):  # a command ended: only the task's newest live output stays in the log
            self.registry.trim_events(task_id, "exec.output", live_output.KEEP_EVENTS)

    def _redact_result(self, result: ExecResult) -> ExecResult:
        if not self.redactor.active:
            return result
        return dataclasses.replace(result, stdout=self.redactor.output(result.stdout),
                                   stderr=self.redactor.output(result.stderr))

    def _redact_error(self, exc: TaskboxError) -> None:
        """The error with secret values taken out of its message and partial output (it reaches the caller)."""
        if not self.redactor.active:
            return
        exc.message = self.redactor.text(exc.message)
        exc.args = (exc.message,)
        partial = exc.details.get("result")
        if isinstance(partial, dict):
            clean = self._redact_result(ExecResult(**partial))
            exc.details["result"] = clean.to_dict()
        exc.details = self.redactor(exc.details)

    def _log_exec(self, task: Task, session: Session | None, command: str | list[str], wd: str,
                  result: ExecResult, log: bool = True) -> None:
        if result.cancelled:
            self.registry.add_event("exec.cancelled", task.id, {
                "command": (command if isinstance(command, str) else " ".join(command))[:200] if log else None,
                "duration_ms": result.duration_ms})
        if not log:  # nothing of the command: only that one ran
            self._update(task.id, {"last_active": time.time()}, ("task.exec", {"logged": False}))
            self.update_state(task, lambda s: s["metrics"].__setitem__("tool_calls", s["metrics"]["tool_calls"] + 1))
            return
        limit = self.settings.log_output_limit
        cmd_text = command if isinstance(command, str) else " ".join(command)
        try:
            self._write_exec_log(task, session, cmd_text, wd, result, limit)
        except (PathOutsideWorkspace, WorkspaceFull, OSError) as exc:
            # The agent broke its own memory folder (e.g. made it a link out) or filled its
            # workspace. The command's result still reaches the caller; the refusal is recorded
            # where the agent cannot edit.
            self.registry.add_event("memory.refused", task.id, {"error": str(exc), "command": cmd_text[:200]})
        self._update(task.id, {"last_active": time.time()},
                     ("task.exec", {"command": cmd_text[:200], "exit_code": result.exit_code,
                                    "duration_ms": result.duration_ms, "timed_out": result.timed_out,
                                    "oom_killed": result.oom_killed,
                                    **({"output_incomplete": True} if result.output_incomplete else {})}))

    def _write_exec_log(self, task: Task, session: Session | None, cmd_text: str, wd: str,
                        result: ExecResult, limit: int) -> None:
        self.memory(task).log_execution({
            "session": session.id if session else None,
            "agent": session.agent if session else None,
            "tool": "exec",
            "command": cmd_text,
            "workdir": wd,
            "exit_code": result.exit_code,
            "duration_ms": result.duration_ms,
            "stdout": result.stdout[-limit:],
            "stderr": result.stderr[-limit:],
            "truncated": result.truncated or len(result.stdout) > limit or len(result.stderr) > limit,
            "timed_out": result.timed_out,
            "oom_killed": result.oom_killed,
            "output_incomplete": result.output_incomplete,
            "status": ("cancelled" if result.cancelled else "timed_out" if result.timed_out
                       else "oom_killed" if result.oom_killed
                       else "output_incomplete" if result.output_incomplete else "exited"),
        })
        self.update_state(task, lambda s: s["metrics"].__setitem__("tool_calls", s["metrics"]["tool_calls"] + 1))

    # --- background jobs (they live in the container; see Sandbox.start_job) ------------------

    def start_job(self, task_id: str, command: str, *, workdir: str | None = None, timeout: float | None = None,
                  session_id: str | None = None, log: bool = True) -> dict[str, Any]:
        """Start ``command`` in the task's sandbox in the background; return its job id at once.

        The job runs in the container until it ends, is killed, or the container stops; it
        outlives this process. Its output is read with :meth:`job_output`.
        """
        task = self.get(task_id)
        if not command.strip():
            raise InvalidInput("empty command")
        wd = container_workdir(workdir, Path(task.workspace_path))
        if timeout is not None and not 0 < timeout <= 24 * 3600:
            raise InvalidInput(f"timeout {timeout} must be between 0 and 86400 seconds")
        if task.status is not Status.ACTIVE or task.container_state is not ContainerState.RUNNING:
            task = self.ensure_running(task.id)
        args: dict[str, Any] = {"command": command, "workdir": wd, "timeout": timeout, "background": True}
        if not log:
            args["log"] = False
        self._before(task, "exec", args)  # the policy sees it like any command
        job_id = f"j-{secrets.token_hex(4)}"
        self.sandbox.start_job(task.container_id or "", job_id, command, workdir=wd, timeout=timeout)
        session = self.registry.get_session(session_id) if session_id else None
        if log:
            try:
                self.memory(task).log_execution({
                    "session": session.id if session else None, "agent": session.agent if session else None,
                    "tool": "exec", "command": command, "workdir": wd, "job_id": job_id, "background": True,
                    "status": "started", "exit_code": None, "duration_ms": 0, "stdout": "", "stderr": ""})
            except (PathOutsideWorkspace, WorkspaceFull, OSError) as exc:
                self.registry.add_event("memory.refused", task.id, {"error": str(exc), "job_id": job_id})
        self._update(task.id, {"last_active": time.time()},
                     ("job.started", {"job_id": job_id, "command": command[:200] if log else None}))
        self.update_state(task, lambda s: s["metrics"].__setitem__("tool_calls", s["metrics"]["tool_calls"] + 1))
        result = {"task_id": task.id, "job_id": job_id, "status": "running", "background": True,
                  "command": command if log else None}
        self._after(task, "exec", args, result)
        return result

    def _job_container(self, task_id: str) -> tuple[Task, str]:
        task = self.get(task_id)
        if not task.container_id or self.sandbox.state(task.container_id) is not ContainerState.RUNNING:
            raise NotFound(f"task {task.id}'s sandbox is not running, so it has no running jobs and their "
                           "output cannot be read", task_id=task.id)
        return task, task.container_id

    def jobs(self, task_id: str) -> list[dict[str, Any]]:
        """The task's background jobs (newest first); empty when its sandbox is not running."""
        task = self.get(task_id)
        if not task.container_id or self.sandbox.state(task.container_id) is not ContainerState.RUNNING:
            return []
        return [self._redact_job(j) for j in self.sandbox.jobs(task.container_id)]

    def job(self, task_id: str, job_id: str) -> dict[str, Any]:
        _task, cid = self._job_container(task_id)
        return self._redact_job(self.sandbox.job(cid, job_id))

    def _redact_job(self, job: dict[str, Any]) -> dict[str, Any]:
        return {**job, "command": self.redactor.text(job["command"])} if self.redactor.active else job

    def job_output(self, task_id: str, job_id: str, offset: int = 0, limit: int = 64 * 1024) -> dict[str, Any]:
        """Up to ``limit`` bytes of a job's output from byte ``offset`` (bounded: the file is the agent's)."""
        if offset < 0:
            raise InvalidInput("offset must be 0 or more")
        if not 1 <= limit <= 1024 * 1024:
            raise InvalidInput("limit must be between 1 and 1048576 bytes")
        task, cid = self._job_container(task_id)
        args = {"job_id": job_id, "offset": offset, "limit": limit}
        self._before(task, "job_output", args)
        job = self.sandbox.job(cid, job_id)
        data, size = self.sandbox.job_output(cid, job_id, offset, limit)
        text = self.redactor.output(data.decode(errors="replace"))
        result = {"task_id": task_id, **self._redact_job(job), "offset": offset, "next_offset": offset + len(data),
                  "output": text, "output_bytes": size, "more": offset + len(data) < size}
        self._after(task, "job_output", args, result)
        return result

    def wait_job(self, task_id: str, job_id: str, timeout: float = 30, stop: threading.Event | None = None,
                 tail: int = 4096) -> dict[str, Any]:
        """Wait up to ``timeout`` seconds (at most 600) for a job to end; its state and newest output."""
        if not 0 <= timeout <= 600:
            raise InvalidInput("timeout must be between 0 and 600 seconds")
        task, cid = self._job_container(task_id)
        self._before(task, "job_wait", {"job_id": job_id, "timeout": timeout})
        deadline = time.monotonic() + timeout
        job = self.sandbox.job(cid, job_id)
        while job["status"] == "running" and time.monotonic() < deadline and not (stop and stop.is_set()):
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            job = self.sandbox.job(cid, job_id)
        start = max(0, job["output_bytes"] - tail)
        data, size = self.sandbox.job_output(cid, job_id, start, tail)
        return {"task_id": task_id, **self._redact_job(job), "finished": job["status"] != "running",
                "output_tail": self.redactor.output(data.decode(errors="replace")), "output_bytes": size}

    def kill_job(self, task_id: str, job_id: str) -> dict[str, Any]:
        """Kill a background job's whole process tree in the container; logged as cancelled."""
        task, cid = self._job_container(task_id)
        self._before(task, "job_kill", {"job_id": job_id})
        job = self.sandbox.job(cid, job_id)
        killed = self.sandbox.kill_job(cid, job_id) if job["status"] == "running" else 0
        if job["status"] == "running":
            try:
                self.memory(task).log_execution({"tool": "exec", "command": self.redactor.text(job["command"]),
                                                 "job_id": job_id, "background": True, "status": "cancelled",
                                                 "exit_code": None, "stdout": "", "stderr": ""})
            except (PathOutsideWorkspace, WorkspaceFull, OSError) as exc:
                self.registry.add_event("memory.refused", task.id, {"error": str(exc), "job_id": job_id})
            self.registry.add_event("job.killed", task.id, {"job_id": job_id, "processes": killed})
        return {"task_id": task.id, **self._redact_job(self.sandbox.job(cid, job_id)), "killed": killed > 0 or
                job["status"] == "running"}


    # --- agents inside the sandbox (taskbox.agents) ----------------------------------------------

    def run_agent(self, task_id: str, agent: str | None = None, *, prompt: str | None = None,
                  args: list[str] | None = None, model: str | None = None, secrets: list[str] | None = None,
                  allow_domains: list[str] | None = None, base_url: str | None = None,
                  session_id: str | None = None, timeout: float | None = None,
                  terminal: agents.Terminal | None = None, echo: Callable[[bytes], object] | None = None,
                  checkpoint: bool | None = None, control: ExecControl | None = None) -> dict[str, Any]:
        """Run an agent CLI inside the task's sandbox as an attached agent session.

        With ``prompt`` it runs non-interactively (print mode), its output streamed to ``echo``
        and recorded (redacted) like a command (``control`` shows its progress and cancels it, as
        for :meth:`exec`); otherwise it runs on ``terminal`` under a tmux
        server in the container, so the user can detach (``Ctrl-b d``) and come back with
        :meth:`attach_agent`. ``secrets`` go into the agent's process environment only; the
        preset's model API hosts (plus ``allow_domains`` and the ``base_url`` host) are allowed
        through the egress proxy. When the agent ends, the session detaches: the work is
        committed, the branch fetched and (``checkpoint``, or the ``run_checkpoint`` setting) a
        checkpoint taken.
        """
        if agent is None:  # the project's default, else the task's own agent if it names a preset, else a shell
            current = self.get(task_id)
            agent = self.project_setup(current.repo_path, current.template).agent or current.agent
            agent = agent if agent in agents.PRESETS else "shell"
        p = agents.preset(agent)
        if prompt is not None:
            prompt = _validate_text("prompt", prompt, 100_000)
        if prompt is None and terminal is None:
            raise InvalidInput("an interactive run needs a terminal; give a prompt to run without one")
        extra = [str(a) for a in (args or [])]
        env = agents.environment(p, base_url=base_url, model=model)
        values = resolve_secrets(self.paths.home, secrets or [])  # a missing secret: refused before any change
        self.redactor.add(values)
        task = self.get(task_id)
        hosts = [*p.hosts, *(allow_domains or []), *([agents.base_url_host(base_url)] if base_url else [])]
        self._check_agent_hosts(task, p, hosts)  # refused here; added only once the run is let through
        task = self.ensure_running(task.id)
        probe = self.sandbox.exec(task.container_id or "", ["sh", "-c", f"command -v {p.binary}; command -v tmux"],
                                  timeout=30)
        found = probe.stdout.split()
        if not any(f.endswith("/" + p.binary) for f in found):
            raise ImageMissing(f"agent {p.name} ({p.binary}) is not installed in image {task.image}; run "
                               f"`taskbox image build --agents` and create the task with --image "
                               f"{self.settings.agents_image} (`create-task --run {p.name}` does)",
                               agent=p.name, image=task.image)
        has_tmux = any(f.endswith("/tmux") for f in found)
        argv = p.command(prompt, [*agents.options(p, base_url=base_url, model=model), *extra])
        try:
            res = self.attach(task.id, p.name, model or "unknown", session_id)
        except TaskLocked as exc:  # often the caller's own session: say what to do about it
            raise TaskLocked(f"{exc.message}; a run is an agent session of its own, so detach the session that "
                             "holds the task first (or use a collaborative task)", **exc.details) from exc
        sid = res.session.id
        task = res.task
        mode = "prompt" if prompt is not None else "interactive"
        run_args: dict[str, Any] = {"agent": p.name, "mode": mode, "session_id": sid, "args": extra}
        if prompt is not None:
            run_args["prompt"] = prompt
        if values:
            run_args["secrets"] = sorted(values)
        try:
            self._before(task, "run", run_args)
            task = self._allow_agent_hosts(task, p, hosts)
        except BaseException:
            self.detach(task.id, sid)
            raise
        self.registry.add_event("agent.started", task.id, {"session_id": sid, "agent": p.name, "mode": mode,
                                                           "detachable": has_tmux and prompt is None})
        if prompt is not None:
            self.memory(task).log_conversation({"session": sid, "agent": p.name, "role": "user", "kind": "prompt",
                                                "message": prompt})
        renewer = self._renew_while(task.id, sid)
        started = time.monotonic()
        try:
            if prompt is not None:
                control = control or ExecControl()
                if echo:
                    control.echo = lambda chunk: echo(self.redactor.output(chunk.decode(errors="replace")).encode())
                try:
                    result = self.exec(task.id, argv, env=env, secrets=list(values), session_id=sid,
                                       timeout=timeout or self.settings.run_timeout, control=control)
                    code = result.exit_code
                    tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [""]
                except TaskboxError:  # timed out, cancelled, the container gone: the session still ends
                    self._finish_run(task.id, p.name, sid, mode, -1, time.monotonic() - started, checkpoint)
                    raise
                detached = False
            else:
                assert terminal is not None
                self.update_metadata(task.id, lambda m: m.setdefault("runs", {}).__setitem__(sid, {
                    "agent": p.name, "started": time.time(), "detachable": has_tmux}))
                wrapped = agents.detachable(sid, argv) if has_tmux else argv
                try:
                    tty = self.sandbox.exec_tty(task.container_id or "", wrapped, env={**env, **values},
                                                mark=f"cmd-agent-{os.urandom(4).hex()}", size=terminal.size())
                except TaskboxError:
                    self._finish_run(task.id, p.name, sid, mode, -1, time.monotonic() - started, checkpoint)
                    raise
                code = tty.relay(terminal.stdin_fd, terminal.stdout_fd, size=terminal.size)
                detached = has_tmux and self._agent_alive(task, sid)
                if has_tmux and not detached:
                    code = self._agent_exit_code(task, sid, code)
                tail = [""]
        finally:
            renewer.set()
        if detached:
            self.registry.add_event("agent.detached", task.id, {"session_id": sid, "agent": p.name})
            return {"task_id": task.id, "session_id": sid, "agent": p.name, "mode": mode, "detached": True,
                    "exit_code": None, "attach": f"taskbox attach {task.id}"}
        out = self._finish_run(task.id, p.name, sid, mode, code, time.monotonic() - started, checkpoint)
        return {**out, "last_line": self.redactor.text(tail[0])[:500]}

    def attach_agent(self, task_id: str, terminal: agents.Terminal, session_id: str | None = None,
                     checkpoint: bool | None = None) -> dict[str, Any]:
        """Come back to an interactive agent run left running (detached) in the task's sandbox."""
        task = self.get(task_id)
        runs = {sid: r for sid, r in (task.metadata.get("runs") or {}).items()
                if isinstance(r, dict) and r.get("detachable")}
        open_ids = {s.id for s in self.registry.sessions(task.id, open_only=True)}
        live = [sid for sid in runs if sid in open_ids]
        if session_id is not None:
            live = [sid for sid in live if sid == session_id]
        if not live:
            raise NotFound(f"task {task.id} has no detached agent run to attach to"
                           + (f" with session {session_id}" if session_id else "") + "; start one with `taskbox run`",
                           task_id=task.id)
        if len(live) > 1:
            raise InvalidInput(f"task {task.id} has {len(live)} detached agent runs ({', '.join(live)}); "
                               "say which with --session")
        sid = live[0]
        agent = runs[sid].get("agent", "agent")
        if task.status is not Status.ACTIVE or not self._agent_alive(task, sid):
            # The container stopped, or the agent ended while nobody watched: close the run.
            out = self._finish_run(task.id, agent, sid, "interactive",
                                   self._agent_exit_code(task, sid, -1) if task.status is Status.ACTIVE else -1,
                                   0.0, checkpoint)
            return {**out, "note": "the agent had already ended"}
        args = {"agent": agent, "session_id": sid}
        self._before(task, "agent_attach", args)
        self.renew(task.id, sid)
        renewer = self._renew_while(task.id, sid)
        started = time.monotonic()
        try:
            tty = self.sandbox.exec_tty(task.container_id or "", agents.tmux_attach(sid), size=terminal.size())
            code = tty.relay(terminal.stdin_fd, terminal.stdout_fd, size=terminal.size)
        finally:
            renewer.set()
        if self._agent_alive(task, sid):
            self._after(task, "agent_attach", args, {"detached": True})
            return {"task_id": task.id, "session_id": sid, "agent": agent, "detached": True, "exit_code": None}
        out = self._finish_run(task.id, agent, sid, "interactive", self._agent_exit_code(task, sid, code),
                               time.monotonic() - started, checkpoint)
        self._after(task, "agent_attach", args, out)
        return out

    def ports(self, task_id: str, action: str = "ls", spec: str | None = None) -> dict[str, Any]:
        """Publish (``add``), unpublish (``rm``) or list (``ls``) a task's ports on the host.

        ``spec`` is ``[HOST_ADDRESS:][HOST_PORT:]PORT``; the address is host loopback unless one
        is named (a warning says the port is then reachable from elsewhere). Ports are served by
        two small forwarder containers (:meth:`Sandbox.publish`): added and removed while the
        task runs, in every network mode, kept across pause and resume.
        """
        task = self.get(task_id)
        warnings: list[str] = []
        if action == "ls":
            live = {p["port"]: p for p in self.sandbox.forwarders(task.container_id)} if task.container_id else {}
            rows = [{**p, "running": bool(live.get(p["port"], {}).get("running"))}
                    for p in task.metadata.get("ports") or []]
            return {"task_id": task.id, "ports": rows}
        if action not in ("add", "rm") or not spec:
            raise InvalidInput("ports: say `add [HOST_ADDRESS:][HOST_PORT:]PORT`, `rm PORT` or `ls`")
        wanted = agents.parse_publish(spec)
        self._before(task, "ports", {"action": action, **wanted})
        if action == "add":
            if wanted["host_ip"] not in ("127.0.0.1", "::1"):
                warnings.append(f"port {wanted['port']} is published on {wanted['host_ip']}: reachable from other "
                                "machines, not only this one")
            task = self.ensure_running(task.id)
            self.sandbox.publish(task.container_id or "", wanted["port"], wanted["host_ip"], wanted["host_port"],
                                 task.image, {LABEL_TASK: task.id, LABEL_HOME: self.home_label})
            self.update_metadata(task.id, lambda m: m.__setitem__("ports", [
                *[p for p in m.get("ports") or [] if p["port"] != wanted["port"]], wanted]))
            self.registry.add_event("port.published", task.id, {**wanted, "warnings": warnings})
        else:
            if not any(p["port"] == wanted["port"] for p in task.metadata.get("ports") or []):
                raise NotFound(f"port {wanted['port']} of task {task.id} is not published", port=wanted["port"])
            if task.container_id:
                self.sandbox.unpublish(task.container_id, wanted["port"])
            self.update_metadata(task.id, lambda m: m.__setitem__("ports", [
                p for p in m.get("ports") or [] if p["port"] != wanted["port"]]))
            self.registry.add_event("port.unpublished", task.id, {"port": wanted["port"]})
        result = {**self.ports(task.id), "warnings": warnings}
        self._after(self.get(task.id), "ports", {"action": action, **wanted}, result)
        return result

    def watch_run(self, task_id: str, session_id: str, stop: threading.Event | None = None,
                  every: float | None = None) -> dict[str, Any] | None:
        """Look after an interactive run left running (detached) until its agent ends.

        While the agent runs its lease is renewed every third of ``lease_seconds`` (so no other
        agent takes the task over from under it); the agent is looked at every ``every`` seconds
        (at most 5); when it ends — or its container stops — the run is finished as if someone
        had been attached: ``agent.exited``, the session detached (work committed, the branch
        fetched, a checkpoint by the ``run_checkpoint`` setting). Returns that result, or None
        when the run was finished elsewhere (``taskbox attach``) or ``stop`` was set.
        ``taskbox run`` and ``taskbox attach`` start ``taskbox watch-run`` for this when they detach.
        """
        renew_every = max(1.0, self.settings.lease_seconds / 3)
        every = every or min(5.0, renew_every)  # how soon an ended agent is noticed
        started = renewed = time.monotonic()
        while True:
            try:
                task = self.get(task_id)
            except NotFound:
                return None
            run = (task.metadata.get("runs") or {}).get(session_id)
            if not isinstance(run, dict) or session_id not in {s.id for s in self.registry.sessions(
                    task.id, open_only=True)}:
                return None
            running = task.status is Status.ACTIVE and task.container_id is not None and \
                self.sandbox.state(task.container_id) is ContainerState.RUNNING
            if running and self._agent_alive(task, session_id):
                if time.monotonic() - renewed >= renew_every - every / 2:
                    self.renew(task.id, session_id)
                    renewed = time.monotonic()
            else:
                code = self._agent_exit_code(task, session_id, -1) if running else -1
                began = run.get("started")
                seconds = time.time() - began if isinstance(began, (int, float)) else time.monotonic() - started
                return self._finish_run(task.id, str(run.get("agent") or "agent"), session_id, "interactive", code,
                                        seconds, None)
            if (stop or threading.Event()).wait(every):
                return None

    def _finish_run(self, task_id: str, agent: str, sid: str, mode: str, code: int, seconds: float,
                    checkpoint: bool | None) -> dict[str, Any]:
        # One finisher per run: `taskbox attach` and the watcher of a detached run may both see it end.
        with files.locked(self.paths.locks / f"{task_id}.run.lock"):
            task = self.get(task_id)
            if sid not in {s.id for s in self.registry.sessions(task.id, open_only=True)}:
                return {"task_id": task.id, "session_id": sid, "agent": agent, "mode": mode, "detached": False,
                        "exit_code": code, "seconds": round(seconds, 2), "branch": task.branch, "commit": None,
                        "checkpoint_id": None, "note": "the run had already been recorded"}
            return self._finish_run_locked(task, agent, sid, mode, code, seconds, checkpoint)

    def _finish_run_locked(self, task: Task, agent: str, sid: str, mode: str, code: int, seconds: float,
                           checkpoint: bool | None) -> dict[str, Any]:
        self.registry.add_event("agent.exited", task.id, {"session_id": sid, "agent": agent, "exit_code": code,
                                                          "seconds": round(seconds, 2)})
        if sid in (task.metadata.get("runs") or {}):
            self.update_metadata(task.id, lambda m: (m.get("runs") or {}).pop(sid, None))
        take = bool(self.settings.run_checkpoint) if checkpoint is None else checkpoint
        detached = self.detach(task.id, sid, save_checkpoint=take, kill_running=True)
        result = {"task_id": task.id, "session_id": sid, "agent": agent, "mode": mode, "detached": False,
                  "exit_code": code, "seconds": round(seconds, 2), "branch": detached["branch"],
                  "commit": detached["commit"], "checkpoint_id": detached["checkpoint_id"]}
        self._after(task, "run", {"agent": agent, "mode": mode, "session_id": sid}, result)
        return result

    def _renew_while(self, task_id: str, sid: str) -> threading.Event:
        """Renew the run's lease in the background until the returned event is set."""
        stop = threading.Event()
        every = max(1.0, self.settings.lease_seconds / 3)

        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.renew(task_id, sid)
                except TaskboxError:
                    return

        threading.Thread(target=loop, name=f"taskbox-renew-{sid}", daemon=True).start()
        return stop

    def _agent_alive(self, task: Task, sid: str) -> bool:
        try:
            r = self.sandbox.exec(task.container_id or "", agents.tmux_alive(sid), timeout=15)
        except TaskboxError:
            return False
        return r.exit_code == 0

    def _agent_exit_code(self, task: Task, sid: str, default: int) -> int:
        try:
            r = self.sandbox.exec(task.container_id or "", ["cat", agents.exit_file(sid)], timeout=15,
                                  output_limit=64)
        except TaskboxError:
            return default
        # The file is the container's: only an exit status (0-255, ASCII digits) is taken from it.
        text = r.stdout.strip()
        ok = r.exit_code == 0 and 0 < len(text) <= 3 and all(c in "0123456789" for c in text) and int(text) < 256
        return int(text) if ok else default

    def _check_agent_hosts(self, task: Task, p: agents.Preset, hosts: list[str]) -> None:
        """Refuse, before anything changes, hosts :meth:`_allow_agent_hosts` could not add."""
        if hosts and task.network == "none":
            self._allow_agent_hosts(task, p, hosts)  # raises, saying what to do
        if hosts and task.network == "allowlist":
            # A run adds host names only: an address or network in the allowlist weakens the
            # sandbox (taskbox.sandbox.weakened), which create-task warns about and a run would not.
            own = EgressRules.build((task.metadata.get("sandbox") or {}).get("allow_domains") or []).allow
            for rule in EgressRules.build(hosts).allow:
                if rule.kind == "address" and rule not in own:  # one the user allowed at create is fine
                    raise InvalidInput(f"{rule.text} is an IP address or network; a run only adds host names to "
                                       "the task's allowlist (give addresses at create-task with --allow-domain, "
                                       "where the weaker sandbox is warned about)", task_id=task.id)

    def _allow_agent_hosts(self, task: Task, p: agents.Preset, hosts: list[str]) -> Task:
        """Allow the agent's model API hosts through the task's egress proxy (allowlist mode).

        Only for a run already let through (attached, its ``run`` hooks passed): a refused
        caller leaves the task's allowlist as it was."""
        if not hosts:
            return task
        if task.network == "none":
            raise InvalidInput(f"task {task.id} has no network (mode none), so {p.name} could not reach its "
                               f"model ({', '.join(hosts)}); create the task with --network allowlist "
                               f"(`create-task --run {p.name}` does)", task_id=task.id)
        if task.network != "allowlist":
            return task
        own = dict(task.metadata.get("sandbox") or {})
        current = list(own.get("allow_domains") or [])
        missing = [h for h in dict.fromkeys(hosts) if h not in current]
        if not missing:
            return task
        EgressRules.build(missing)  # a bad --allow-domain is refused before anything changes

        def add(meta: dict[str, Any]) -> None:
            sb = dict(meta.get("sandbox") or {})
            sb["allow_domains"] = list(dict.fromkeys([*(sb.get("allow_domains") or []), *missing]))
            meta["sandbox"] = sb

        task = self.update_metadata(task.id, add)
        self.registry.add_event("agent.egress_allowed", task.id, {"agent": p.name, "hosts": missing})
        if task.container_id and self.sandbox.state(task.container_id) is not ContainerState.NONE:
            self.sandbox.set_egress(task.container_id, network.EgressConfig(
                self.egress_rules(task), outside_network=self.settings.egress_network,
                image=self.settings.proxy_image))
        return task

    # --- todos and decisions -----------------------------------------------------------------

    def update_todos(self, task_id: str, todos: list[dict[str, Any]], session_id: str | None = None) -> list[dict[str, Any]]:
        """Add or change todos (matched by id); ``{"id": X, "deleted": true}`` removes one."""
        task = self.get(task_id)
        session = self.registry.get_session(session_id) if session_id else None
        agent = session.agent if session else None
        completed: list[dict[str, Any]] = []
        clean: list[dict[str, Any]] = []
        for raw in todos:
            if not isinstance(raw, dict):
                raise InvalidInput("each todo must be an object with at least an id or a text")
            todo = dict(raw)
            if todo.get("status", "pending") not in TODO_STATUSES:
                raise InvalidInput(f"todo status {todo.get('status')!r} is not one of {', '.join(TODO_STATUSES)}")
            if "text" in todo:
                todo["text"] = _validate_text("todo text", str(todo["text"]), 500)
            clean.append(todo)
        self._before(task, "update_todos", {"todos": clean})

        def apply(s: dict[str, Any]) -> None:
            by_id = {t["id"]: t for t in s["todos"]}
            for todo in clean:
                tid = str(todo.get("id") or f"t{len(by_id) + 1}")
                while "id" not in todo and tid in by_id:
                    tid = f"t{int(tid[1:]) + 1}" if tid[1:].isdigit() else f"{tid}-1"
                if todo.get("deleted"):
                    by_id.pop(tid, None)
                    continue
                old = by_id.get(tid)
                if old is None and "text" not in todo:
                    raise NotFound(f"no todo {tid!r} in task {task.id}")
                new = {"id": tid, "text": "", "status": "pending", "major": False, "weight": 1,
                       "priority": "normal", "progress": 0, **(old or {}),
                       **{k: v for k, v in todo.items() if k != "id"}}
                if new["status"] == "completed":
                    new["progress"] = 100
                    if not old or old.get("status") != "completed":
                        completed.append(new)
                by_id[tid] = new
                todo["id"] = tid
            s["todos"] = list(by_id.values())

        state = self.update_state(task, apply)
        mem = self.memory(task)
        for todo in clean:
            mem.log_conversation({"session": session_id, "agent": agent, "role": "system", "kind": "todo",
                                  "todo": next((t for t in state["todos"] if t["id"] == todo["id"]),
                                               {"id": todo["id"], "deleted": True})})
        self._after(task, "update_todos", {"todos": clean}, {"todos": state["todos"]})
        self.registry.add_event("todos.updated", task.id, {
            "changed": [str(t["id"]) for t in clean][:50], "total": len(state["todos"]),
            "completed": sum(1 for t in state["todos"] if t.get("status") == "completed")})
        for todo in completed:
            self.registry.add_event("todo.completed", task.id, {"todo": todo})
            self.hook.todo_complete(service=self, task=task, todo=todo)
        return state["todos"]

    def log_decision(self, task_id: str, decision: str, *, context: str = "", rationale: str = "",
                     alternatives: str = "", agent: str = "user") -> dict[str, Any]:
        """Record a design decision (the ``decision`` operation, with its hooks)."""
        task = self.get(task_id)
        decision = _validate_text("decision", decision, 4000)
        args = {"decision": decision, "context": context, "rationale": rationale, "alternatives": alternatives}
        self._before(task, "decision", args)
        entry = self.record_decision(task, decision, context=context, rationale=rationale,
                                     alternatives=alternatives, agent=agent)
        self._after(task, "decision", args, entry)
        return entry

    def record_decision(self, task: Task, decision: str, *, context: str = "", rationale: str = "",
                        alternatives: str = "", agent: str = "taskbox") -> dict[str, Any]:
        """Write a decision taskbox made itself (a checkpoint's reason, say): no operation, no hooks."""
        entry = self.memory(task).add_decision(agent, context or "-", decision, rationale, alternatives)
        self.registry.add_event("decision.logged", task.id, entry)
        return entry

    # --- complete / abort / cleanup ----------------------------------------------------------

    def complete(self, task_id: str, summary: str = "", *, cleanup: bool = False,
                 final_checkpoint: bool = True, kill_running: bool = False) -> Completed:
        """Finish a task: final Plan.md summary and checkpoint, commit, fetch the branch, stop the container.

        Marked ``pending_op='complete'`` while it runs, so a crash part-way is finished by
        `doctor --fix`. The container is kept for the retention period unless ``cleanup``.
        The final checkpoint is taken by the built-in auto-checkpoint plugin unless
        ``final_checkpoint`` is false. Refused with :class:`TaskBusy` while a command or job
        runs in the task, unless ``kill_running``.
        """
        task = self.get(task_id)
        args = {"summary": summary, "cleanup": cleanup, "final_checkpoint": final_checkpoint}
        if task.pending_op != "complete":
            check_transition(task.id, task.status, Status.COMPLETED)
            self._before(task, "complete", args)
            self._ensure_idle(task, "complete", kill_running)
            task = self._update(task.id, {"pending_op": "complete", "op_pid": os.getpid()})
        self.hook.task_complete(service=self, task=task, summary=summary, final_checkpoint=final_checkpoint)
        self.update_state(task, lambda s: s.update(status=str(Status.COMPLETED), current_agent=None))
        commit, head = self._publish(task, f"taskbox: complete task {task.id}\n\n{summary}".strip())
        faults.point("complete.fetched")
        self._end_sessions(task.id)
        if task.container_id:
            self.sandbox.stop(task.container_id)
        self.audit.flush(task.id, force=True)
        task = self.retry(lambda: self.registry.update_task(
            task.id, self.get(task.id).version,
            {"status": Status.COMPLETED, "pending_op": None, "op_pid": None, "completed_at": time.time(),
             "container_state": ContainerState.STOPPED if task.container_id else ContainerState.NONE},
            ("task.completed", {"branch": task.branch, "commit": head, "summary": summary})))
        removed = False
        if cleanup:
            self.cleanup(task.id)
            removed = True
        finals = [c for c in self.list_checkpoints(task.id) if c["trigger"] == "final"]
        result = Completed(task.id, task.branch, head, commit, removed,
                           finals[-1]["checkpoint_id"] if finals and final_checkpoint else None,
                           str(self.get(task.id).status))
        self._after(task, "complete", args, result)
        return result

    def abort(self, task_id: str, reason: str = "") -> Task:
        task = self.get(task_id)
        check_transition(task.id, task.status, Status.ABORTED)
        self._before(task, "abort", {"reason": reason})
        self._end_sessions(task.id)
        if task.container_id:
            self.sandbox.stop(task.container_id)
        self.audit.flush(task.id, force=True)
        task = self._transition(task.id, Status.ABORTED, {"container_state": ContainerState.STOPPED
                                if task.container_id else ContainerState.NONE}, reason=reason)
        self._after(task, "abort", {"reason": reason}, task)
        return task

    def _end_sessions(self, task_id: str) -> None:
        """Release every lease and end every open session of a finishing task."""
        for s in self.registry.sessions(task_id, open_only=True):
            self.registry.release_lease(task_id, s.id)
            self.registry.end_session(s.id, time.time())

    def fail(self, task_id: str, reason: str) -> Task:
        return self._transition(task_id, Status.FAILED, reason=reason)

    def cleanup(self, task_id: str, *, remove_workspace: bool = False) -> Task:
        """Remove a finished task's container now (archiving it); branch and memory are kept."""
        task = self.get(task_id)
        if task.status not in FINISHED:
            raise InvalidTransition(f"task {task.id} is {task.status}; complete or abort it before cleanup",
                                    task_id=task.id, status=str(task.status))
        if task.container_id:
            self.sandbox.remove(task.container_id)
        else:
            self._remove_labelled_container(task.id)
        changes: dict[str, Any] = {"container_id": None, "container_state": ContainerState.NONE}
        if task.status is not Status.ARCHIVED:
            task = self._transition(task.id, Status.ARCHIVED, changes)
        else:
            task = self._update(task.id, changes)
        if remove_workspace:
            self._remove_workspace(task)
            self.registry.add_event("workspace.removed", task.id, {"volume": bool(task.metadata.get("quota"))})
        return task

    def gc(self) -> list[str]:
        """Archive completed tasks whose retention period is over; return their ids."""
        cutoff = time.time() - self.settings.retention_days * 86400
        done = []
        for task in self.registry.list_tasks([str(Status.COMPLETED), str(Status.ABORTED), str(Status.FAILED)]):
            finished = task.completed_at or task.last_active
            if finished < cutoff:
                self.cleanup(task.id)
                done.append(task.id)
        self.gc_checkpoints()
        return done

    # --- checkpoints (the engine is taskbox.checkpoints) ---------------------------------------

    @property
    def checkpoints(self) -> Checkpoints:
        """The checkpoint engine (made on first use: most commands never need it)."""
        from .checkpoints import Checkpoints

        if self._checkpoints is None:
            # The sandbox is passed as a getter: files-only checkpoints work with Docker down.
            self._checkpoints = Checkpoints(self.paths, self.registry, lambda: self.sandbox, self.settings,
                                            self.home_label)
        return self._checkpoints

    def create_checkpoint(self, task_id: str, name: str | None = None, description: str = "", *,
                          include_filesystem: bool = False, trigger: str = "manual", pinned: bool = False,
                          reason: str = "") -> dict[str, Any]:
        """Checkpoint the task's whole workspace (and, if asked, its container's filesystem).

        A ``manual`` checkpoint is an operation (``checkpoint``) with its hooks; automatic
        ones (``trigger`` anything else) are taken on behalf of another operation. The
        checkpoint is recorded (decisions.md, the ``checkpoint_start`` hook — Plan.md's
        iteration log —, the conversation log, state.json) before it is taken, so it holds
        its own record; a failure is recorded in the same places.
        """
        task = self.get(task_id)
        args = {"name": name, "description": description, "include_filesystem": include_filesystem}
        if trigger == "manual":
            self._before(task, "checkpoint", args)
        self._ensure_volume(task)
        cps = self.checkpoints
        with cps.locked(task.id):
            new = cps.begin(task, name, description, include_filesystem=include_filesystem, trigger=trigger,
                            pinned=pinned, reason=reason)
            new.parent_id = self.state(task.id).get("current_checkpoint")
            self.record_decision(task, f"Checkpoint `{new.name}` ({new.checkpoint_id}) taken",
                              context=f"trigger: {new.trigger}", rationale=new.reason)
            self.hook.checkpoint_start(service=self, task=task, checkpoint=new)
            self.memory(task).log_conversation({"role": "system", "kind": "checkpoint",
                                                "checkpoint_id": new.checkpoint_id, "name": new.name,
                                                "trigger": new.trigger})

            def mark(s: dict[str, Any]) -> None:
                s["current_checkpoint"] = new.checkpoint_id
                s["metrics"]["checkpoints"] = s["metrics"].get("checkpoints", 0) + 1

            self.update_state(task, mark)
            try:
                result = cps.take(task, new)
            except BaseException as exc:
                self._checkpoint_failed(task, new, exc)
                raise
        if trigger == "manual":
            self._after(task, "checkpoint", args, result)
        return result

    def _checkpoint_failed(self, task: Task, new: NewCheckpoint, exc: BaseException) -> None:
        msg = exc.message if isinstance(exc, TaskboxError) else f"{type(exc).__name__}: {exc}"

        def unmark(s: dict[str, Any]) -> None:
            if s.get("current_checkpoint") == new.checkpoint_id:
                s["current_checkpoint"] = new.parent_id
                s["metrics"]["checkpoints"] = max(0, s["metrics"].get("checkpoints", 1) - 1)

        try:
            self.update_state(task, unmark)
            self.record_decision(task, f"Checkpoint `{new.name}` ({new.checkpoint_id}) failed",
                              context="checkpoint", rationale=msg[:500])
            self.hook.checkpoint_failed(service=self, task=task, checkpoint=new, error=msg[:200])
            self.registry.add_event("checkpoint.failed", task.id,
                                    {"checkpoint_id": new.checkpoint_id, "error": msg[:500]})
        except (TaskboxError, OSError):
            pass  # the original error matters more than the record of it

    def restore_checkpoint(self, task_id: str, checkpoint_id: str | None = None, force: bool = False, *,
                           session_id: str | None = None, kill_running: bool = False) -> CheckpointRestored:
        """Make the workspace exactly the checkpoint's (the newest if none is named).

        Refused while an agent other than ``session_id`` is attached, unless ``force``; and
        while a command or job runs in the task (:class:`TaskBusy`), unless ``kill_running``. A
        checkpoint with the container's filesystem brings the container back from its image
        (Docker down: :class:`DockerUnavailable`, before any file is touched).
        """
        task = self.get(task_id)
        args = {"checkpoint_id": checkpoint_id, "force": force}
        self._before(task, "restore", args)
        if self.workspace_lost(task):  # nothing to lose: it comes back whole
            result = self.restore_workspace(task.id, "restore", checkpoint_id)
            self.registry.add_event("checkpoint.restored", task.id, result.to_dict())
            self._after(task, "restore", args, result)
            return result
        self._ensure_volume(task)
        self._ensure_idle(task, "restore a checkpoint of", kill_running)
        cps = self.checkpoints
        with cps.locked(task.id):
            done = cps.restore(task, checkpoint_id, force=force, session_id=session_id)
            if done.image:
                self._restore_container(task, done.image)
        self._recover_memory(task)
        cp = done.checkpoint

        def mark(s: dict[str, Any]) -> None:
            s["current_checkpoint"] = cp["checkpoint_id"]

        self.update_state(task, mark)
        self.record_decision(task, f"Restored checkpoint `{cp['name']}` ({cp['checkpoint_id']})",
                          context="restore" + (" (forced while agents were attached)" if done.forced else ""),
                          rationale=f"{done.changed} changed, {done.added} brought back, "
                                    f"{done.removed} removed")
        result = CheckpointRestored(task.id, cp["checkpoint_id"], cp["name"], done.changed, done.added, done.removed,
                                    bool(done.image), done.forced,
                                    round((time.perf_counter() - done.started) * 1000, 1))
        self.registry.add_event("checkpoint.restored", task.id, result.to_dict())
        self._after(task, "restore", args, result)
        return result

    def _restore_container(self, task: Task, image: str) -> None:
        """Replace the task's container with one made from a checkpoint's image (started if it ran)."""
        was_running = self.sandbox.state(task.container_id) is ContainerState.RUNNING
        if task.container_id:
            self.sandbox.remove(task.container_id)
        self._update(task.id, {"image": image, "container_id": None, "container_state": ContainerState.NONE},
                     ("container.removed", {"reason": "checkpoint restore", "image": image}))
        if was_running:
            self.ensure_running(task.id)

    def list_checkpoints(self, task_id: str) -> list[dict[str, Any]]:
        task = self.get(task_id)
        return self.checkpoints.rows(task.id, current=self.state(task.id).get("current_checkpoint"))

    def checkpoint_diff(self, task_id: str, a: str, b: str) -> dict[str, Any]:
        """Files changed between checkpoints ``a`` and ``b`` (``current`` is the workspace now)."""
        return self.checkpoints.diff(self.get(task_id), a, b)

    def export_checkpoint(self, task_id: str, checkpoint_id: str, path: str | Path) -> dict[str, Any]:
        return self.checkpoints.export(task_id, checkpoint_id, path)

    def import_checkpoint(self, task_id: str, path: str | Path) -> dict[str, Any]:
        task = self.get(task_id)
        row = self.checkpoints.import_(task, path)
        self.record_decision(task, f"Imported checkpoint `{row['name']}` ({row['checkpoint_id']}) from "
                                   f"{Path(path).name}", context="import")
        return row

    def prune_checkpoints(self, task_id: str) -> list[str]:
        """Apply the retention settings to one task's checkpoints; return the pruned ids."""
        return self.checkpoints.prune(task_id)

    def delete_checkpoint(self, task_id: str, checkpoint_id: str) -> dict[str, Any]:
        return self.checkpoints.delete(task_id, checkpoint_id)

    def gc_checkpoints(self) -> dict[str, Any]:
        """Retention for every task and the space of pruned checkpoints reclaimed."""
        return self.checkpoints.gc()

    def risky_operations(self, repo: str | Path, *, add: str | None = None, remove: str | None = None,
                         test: tuple[str, str] | None = None, reset: bool = False, high_only: bool | None = None,
                         threshold: str | None = None, category: str = "custom",
                         weight: int | None = None) -> dict[str, Any]:
        """Show or change a project's risk patterns, or score a command (SPEC §5)."""
        from . import risk

        root = git.repo_root(Path(repo).expanduser().resolve())
        out: dict[str, Any] = {}
        if reset:
            risk.reset(root)
            out["reset"] = True
        if add:
            out["added"] = risk.add_pattern(root, add, category=category, weight=weight).__dict__
        if remove:
            out["removed"] = risk.remove_pattern(root, remove).__dict__
        if high_only is not None or threshold is not None:
            risk.set_options(root, high_only=high_only, threshold=threshold)
        cfg = risk.load(root)
        if test:
            out["test"] = cfg.assess(test[0], test[1]).to_dict()
        return {**cfg.to_dict(), **out}

    # --- queries -----------------------------------------------------------------------------

    def list_tasks(self, statuses: list[str] | None = None, query: str | None = None) -> list[Task]:
        for s in statuses or []:
            if s not in Status.__members__.values():
                raise InvalidInput(f"status {s!r} is not one of {', '.join(Status)}")
        return self.registry.list_tasks(statuses, query)

    def current_agents(self, task_id: str) -> list[str]:
        return [lease.agent for lease in self.registry.leases(task_id)]

    def history(self, task_id: str, limit: int = 200) -> dict[str, Any]:
        task = self.get(task_id)
        return {"task_id": task.id, "sessions": [s.to_dict() for s in self.registry.sessions(task.id)],
                "conversations": self.memory(task).conversations(limit),
                "events": self.registry.events(task.id, limit=limit)}

    def events(self, task_id: str | None = None, after_id: int = 0, limit: int = 1000, *, newest: bool = False,
               types: list[str] | tuple[str, ...] = (), exclude: list[str] | tuple[str, ...] = ()
               ) -> list[dict[str, Any]]:
        """Events after ``after_id`` from the durable event log, oldest first (every process's):
        the first ``limit`` of them, or with ``newest`` the last ``limit``; only of ``types``,
        none of ``exclude``."""
        if after_id < 0 or not 1 <= limit <= 10_000:
            raise InvalidInput("after_id must be 0 or more and limit between 1 and 10000")
        if task_id:
            self.get(task_id)
        return self.registry.events(task_id, after_id=after_id, limit=limit, newest=newest, types=types,
                                    exclude=exclude)

    def last_event_id(self) -> int:
        """The newest event's id (0 when there is none)."""
        return self.registry.last_event_id()

    def resource_usage(self, task_id: str) -> dict[str, Any] | None:
        """A running task's memory use, processes and CPU time so far (None when its container
        does not run); read from the container's cgroup, never the engine's slow stats call."""
        task = self.get(task_id)
        if not task.container_id or task.container_state is not ContainerState.RUNNING:
            return None
        mem = self.sandbox.memory_usage(task.container_id, engine=False)
        if mem is None:
            return None
        return {"task_id": task.id, "memory_bytes": mem["usage"], "memory_limit": mem["limit"],
                "memory_percent": round(100.0 * mem["usage"] / mem["limit"], 2) if mem["limit"] else None,
                "pids": mem["pids"], "cpu_seconds": self.sandbox.cpu_seconds(task.container_id),
                "pressure": (task.metadata.get("pressure") or {}).get("level", "ok")}

    def audit_log(self, task_id: str, limit: int | None = None, decision: str | None = None) -> list[dict[str, Any]]:
        """A task's audit log (policy, egress and sandbox decisions), with the latest proxy decisions
        and the aggregated records of rate-limited ones written first."""
        task = self.get(task_id)
        self.sync_egress_log(task)
        self.audit.flush(task.id, force=True)
        return self.audit.read(task.id, limit, decision)

    def executions(self, task_id: str, limit: int = 50) -> list[dict[str, Any]]:
        task = self.get(task_id)
        return self.memory(task).executions(limit)

    def decisions(self, task_id: str) -> list[dict[str, str]]:
        task = self.get(task_id)
        return self.memory(task).decisions()

    def stats(self, task_id: str | None = None) -> dict[str, Any]:
        if task_id:
            task = self.get(task_id)
            state = self.state(task.id)
            todos = state["todos"]
            execs = self.memory(task).executions()
            durations = [e.get("duration_ms", 0) for e in execs]
            return {"task_id": task.id, "status": str(task.status), "metrics": state["metrics"],
                    "todos_total": len(todos), "todos_done": sum(t.get("status") == "completed" for t in todos),
                    "executions": len(execs), "failed_executions": sum(e.get("exit_code") != 0 for e in execs),
                    "exec_ms_total": round(sum(durations), 1),
                    "age_s": round(time.time() - task.created_at, 1)}
        tasks = self.registry.list_tasks()
        by_status: dict[str, int] = {}
        for t in tasks:
            by_status[str(t.status)] = by_status.get(str(t.status), 0) + 1
        return {"tasks": len(tasks), "by_status": by_status,
                "live_leases": len(self.registry.leases())}

    @contextmanager
    def in_sandbox(self, task: Task) -> Iterator[workspace.Runner]:
        """A runner for taskbox's own commands on the workspace, inside a sandbox.

        The task's container when it runs, else a throwaway one mounting only the workspace:
        the agent-written repository is never read by a git process on the host.
        """
        ws = self._ws(task)
        if not ws.is_dir():
            raise NotFound(f"task {task.id} has no workspace at {ws}", task_id=task.id)
        timeout = self.settings.sandbox_git_timeout
        if task.container_id and self.sandbox.state(task.container_id) is ContainerState.RUNNING:
            yield functools.partial(self.sandbox.capture, task.container_id, timeout=timeout)
            return
        labels = {LABEL_TASK: task.id, LABEL_HOME: self.home_label}
        with self.sandbox.scratch(task.image, ws, labels) as cid:
            yield functools.partial(self.sandbox.capture, cid, timeout=timeout)

    def _publish(self, task: Task, message: str) -> tuple[str | None, str]:
        """Commit the workspace (in the sandbox) and fetch the branch into the user's repository."""
        with self.in_sandbox(task) as run:
            return workspace.publish(run, Path(task.repo_path), task.branch, message,
                                     clean=self._clean_branch(task), base=task.base_ref or None,
                                     scratch=self.paths.home / "tmp",
                                     limit=parse_size(self.settings.fetch_limit, "fetch_limit"))

    def diff(self, task_id: str, stat: bool = False) -> str:
        """The task's changes against the commit it started from (committed or not)."""
        task = self.get(task_id)
        self._before(task, "diff", {"stat": stat})
        with self.in_sandbox(task) as run:
            text = workspace.diff(run, task.base_ref or None, stat=stat)
        self._after(task, "diff", {"stat": stat}, text)
        return text

    def git_log(self, task_id: str, limit: int = 50) -> list[dict[str, str]]:
        """The commits of the task branch since it started."""
        task = self.get(task_id)
        self._before(task, "log", {"limit": limit})
        with self.in_sandbox(task) as run:
            rows = workspace.log(run, task.base_ref or None, limit)
        self._after(task, "log", {"limit": limit}, rows)
        return rows

    def sync(self, task_id: str, message: str = "taskbox: sync") -> Synced:
        """Commit the workspace and fetch the task branch into the user's repository now."""
        task = self.get(task_id)
        self._before(task, "sync", {"message": message})
        commit, head = self._publish(task, message)
        self.registry.add_event("task.synced", task.id, {"commit": head})
        result = Synced(task.id, task.branch, head, commit)
        self._after(task, "sync", {"message": message}, result)
        return result

    # --- workspace files (confined) ----------------------------------------------------------

    def read_file(self, task_id: str, path: str, limit: int = 1_000_000) -> bytes:
        """The first ``limit`` bytes of a workspace file (sized first; never more is read)."""
        task = self.get(task_id)
        args = {"path": path}
        self._before(task, "read_file", args)
        data, size = files.read_head(self._ws(task), path, limit)
        self._after(task, "read_file", args, {"path": path, "size": size})
        return data

    def write_file(self, task_id: str, path: str, data: bytes) -> str:
        task = self.get(task_id)
        self._before(task, "write_file", {"path": path})
        with self._file_lock(task):
            rel = files.atomic_write(self._ws(task), path, data)
        self._after(task, "write_file", {"path": path}, {"path": rel, "size": len(data)})
        return rel

    def read_text(self, task_id: str, path: str, start_line: int = 1, max_lines: int | None = None,
                  max_bytes: int = 256_000) -> dict[str, Any]:
        """A workspace text file, or a range of its lines, bounded to ``max_bytes``."""
        if start_line < 1:
            raise InvalidInput("start_line counts from 1")
        if max_lines is not None and max_lines < 1:
            raise InvalidInput("max_lines must be at least 1")
        task = self.get(task_id)
        args = {"path": path}
        # The same tool names as the project policy's file rules (taskbox.policy.FILE_TOOLS).
        self._before(task, "read_file", args)
        # Sized before reading, and never more than the window asked for is read: a sparse
        # 1 GiB file costs the server ``max_bytes`` of memory, not a gigabyte.
        window = max_bytes + 1 if start_line == 1 else max(max_bytes * 4, files.READ_LIMIT)
        data, size = files.read_head(self._ws(task), path, window)
        if b"\0" in data[:8192]:
            raise InvalidInput(f"{path!r} is a binary file ({size} bytes); inspect it with a command")
        partial = len(data) < size
        if partial:  # drop the last, possibly cut line
            data = data[: data.rfind(b"\n") + 1] or data
        lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
        end = len(lines) if max_lines is None else min(len(lines), start_line - 1 + max_lines)
        content = "".join(lines[start_line - 1:end])
        if len(content.encode()) > max_bytes:  # cut at a line end, so no line comes back half
            content = content.encode()[:max_bytes].decode("utf-8", errors="ignore")
            content = content[: content.rfind("\n") + 1] or content
            end = start_line - 1 + content.count("\n")
        result = {"path": path, "content": content, "start_line": start_line, "end_line": end,
                  "total_lines": None if partial else len(lines), "size": size,
                  "truncated": end < len(lines) or partial}
        self._after(task, "read_file", args, result)
        return result

    def edit_file(self, task_id: str, path: str, old: str, new: str, *, replace_all: bool = False) -> dict[str, Any]:
        """Replace ``old`` with ``new`` in a workspace text file.

        ``old`` must occur exactly once unless ``replace_all``, so an edit never lands in the
        wrong place; the file is rewritten atomically under a per-task lock.
        """
        if not old:
            raise InvalidInput("the text to replace must not be empty (write the file to create it)")
        if old == new:
            raise InvalidInput("the replacement is the same as the text to replace")
        task = self.get(task_id)
        root = self._ws(task)
        args = {"path": path, "old": old, "new": new, "replace_all": replace_all}
        self._before(task, "edit_file", args)
        with self._file_lock(task):
            raw = files.read_bytes(root, path)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"{path!r} is not UTF-8 text; edit it with a command") from None
            count = text.count(old)
            if count == 0:
                raise NotFound(f"the text to replace does not occur in {path!r}; read the file and copy "
                               "the exact text, whitespace included", path=path)
            if count > 1 and not replace_all:
                raise InvalidInput(f"the text to replace occurs {count} times in {path!r}; include more "
                                   "surrounding lines to make it unique, or set replace_all", path=path)
            data = (text.replace(old, new) if replace_all else text.replace(old, new, 1)).encode()
            rel = files.atomic_write(root, path, data)
        result = {"path": rel,
                  "replacements": count if replace_all else 1, "size": len(data)}
        self._after(task, "edit_file", args, result)
        return result

    def list_files(self, task_id: str, path: str = ".", *, recursive: bool = False,
                   limit: int = 1000) -> dict[str, Any]:
        """Entries of a workspace directory (``.git`` left out; links listed, never followed)."""
        if limit < 1:
            raise InvalidInput("limit must be at least 1")
        task = self.get(task_id)
        args = {"path": path, "recursive": recursive}
        self._before(task, "list_files", args)
        entries = files.listing(self._ws(task), path, recursive, limit + 1)
        result = {"path": path, "entries": entries[:limit], "truncated": len(entries) > limit}
        self._after(task, "list_files", args, result)
        return result

    def delete_file(self, task_id: str, path: str) -> dict[str, Any]:
        """Delete a file, link or directory tree in the workspace (never .git or .task-memory)."""
        task = self.get(task_id)
        root = self._ws(task)
        rel = normalize(path, allow_root=False)
        if rel.split("/")[0] in (".git", ".task-memory"):
            raise InvalidInput(f"{rel.split('/')[0]} belongs to taskbox and cannot be deleted", path=path)
        args = {"path": path}
        self._before(task, "delete_file", args)
        with self._file_lock(task):
            files.delete(root, path)
        result = {"path": rel, "deleted": True}
        self._after(task, "delete_file", args, result)
        return result

    def _file_lock(self, task: Task) -> AbstractContextManager[None]:
        """Serialises the file tools of one task, so an edit never loses a concurrent write."""
        return files.locked(self.paths.locks / f"{task.id}.files.lock")

    # --- agent tool calls (MCP) --------------------------------------------------------------

    def create_or_resume_task(self, repo: str | Path, description: str, *, task_id: str | None = None,
                              resume_if_exists: bool = False, **options: Any) -> TaskOpened:
        """Create a task, or with ``resume_if_exists`` pick up the matching one and start its sandbox.

        The match is the task with ``task_id`` if given, else the most recently active
        unfinished task of the same repository with the same description. Without
        ``resume_if_exists`` an existing ``task_id`` is a :class:`Conflict`.
        """
        repo_path = str(git.repo_root(Path(repo).expanduser().resolve()))
        existing: Task | None = None
        if task_id is not None and self.registry.task_exists(task_id):
            existing = self.get(task_id)
            if not resume_if_exists:
                raise Conflict(f"a task with id {task_id!r} already exists; resume it with resume_if_exists "
                               "or attach to it", task_id=task_id)
            if existing.repo_path != repo_path:
                raise InvalidInput(f"task {task_id} works on {existing.repo_path}, not {repo_path}", task_id=task_id)
        elif task_id is None and resume_if_exists:
            wanted = unicodedata.normalize("NFC", description or "").strip()
            open_ = [str(s) for s in (Status.PENDING, Status.ACTIVE, Status.PAUSED, Status.FAILED)]
            matches = [t for t in self.registry.list_tasks(open_)
                       if t.repo_path == repo_path and t.description == wanted]
            existing = max(matches, key=lambda t: t.last_active) if matches else None
        if existing is None:
            task = self.create_task(repo, description, task_id=task_id, **options)
            outcome, had_container = "created", False
        else:
            had_container = self.sandbox.state(existing.container_id) in (ContainerState.RUNNING,
                                                                          ContainerState.STOPPED)
            task = self.ensure_running(existing.id)
            self.registry.add_event("task.resumed", task.id, {"container_kept": had_container})
            outcome = "resumed"
        return TaskOpened(task.id, outcome, str(task.status), task.container_id, had_container, task.branch,
                          task.workspace_path, task.repo_path)

    def status(self, task_id: str, recent: int = 5) -> dict[str, Any]:
        """A task's record with its live state: agents, todos, metrics, recent commands."""
        task = self.get(task_id)
        self._before(task, "status", {"recent": recent})
        state = self.state(task.id)
        try:
            jobs: list[dict[str, Any]] | None = self.jobs(task.id)
        except SandboxError:  # the container is frozen for a checkpoint this instant: jobs unknown
            jobs = None
        result = {**task.to_dict(), "current_agents": self.current_agents(task.id),
                  "current_agent": state.get("current_agent"), "todos": state["todos"],
                  "metrics": state["metrics"], "current_checkpoint": state.get("current_checkpoint"),
                  "recent_executions": self.memory(task).executions(recent),
                  "workspace_usage": self.workspace_usage(task), "jobs": jobs,
                  "ports": task.metadata.get("ports") or []}
        self._after(task, "status", {"recent": recent}, result)
        return result

    def run_tool(self, task_id: str, tool: str, args: dict[str, Any], fn: Callable[[], T], *,
                 session_id: str | None = None, log: bool = True) -> T:
        """Run one agent tool call on a task (``fn``, a service operation, fires the hooks),
        then record it in the task's memory.

        A call by an attached session renews its lease. ``log=False`` records only that the
        tool was called: no arguments, no error text.
        """
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return fn()
        except BaseException as exc:
            failure = exc
            raise
        finally:
            try:
                self.record_tool_call(task_id, tool, args, session_id=session_id, error=failure,
                                      duration_ms=(time.perf_counter() - started) * 1000, log=log)
            except (TaskboxError, OSError) as exc:  # a failed log line must not hide the tool's outcome
                self.registry.add_event("tool_call.unlogged", task_id, {"tool": tool, "reason": str(exc)[:200]})

    def record_tool_call(self, task_id: str, tool: str, args: dict[str, Any], *, session_id: str | None = None,
                         error: BaseException | None = None, duration_ms: float | None = None,
                         log: bool = True) -> None:
        """Log an agent tool call in the task's ``conversations.jsonl`` (long arguments cut).

        ``log=False``: the tool's name, outcome and error code only — nothing of its arguments.
        """
        try:
            task = self.get(task_id)
        except NotFound:
            return
        session = self.registry.get_session(session_id) if session_id else None
        if session and session.detached_at is None:
            self.renew(task.id, session.id)
        entry: dict[str, Any] = {"session": session_id, "agent": session.agent if session else None,
                                 "role": "tool", "kind": "tool_call", "tool": tool,
                                 "args": {k: _clip(v) for k, v in args.items()} if log else {},
                                 "ok": error is None}
        if not log:
            entry["logged"] = False
        if duration_ms is not None:
            entry["duration_ms"] = round(duration_ms, 2)
        if isinstance(error, TaskboxError):
            entry["error"] = {"code": error.code, "message": error.message[:500]} if log else {"code": error.code}
        elif error is not None:
            entry["error"] = ({"code": "internal_error", "message": f"{type(error).__name__}: {error}"[:500]} if log
                              else {"code": "internal_error"})
        self.memory(task).log_conversation(entry)
        if tool not in SELF_COUNTING_TOOLS:  # every call counts once in the metrics
            self.update_state(task, lambda s: s["metrics"].__setitem__("tool_calls", s["metrics"]["tool_calls"] + 1))

    # --- agent-side guard ---------------------------------------------------------------------

    def guard(self, directory: str | Path, tool: str, server: str = "taskbox") -> dict[str, Any]:
        """Should an agent's *host-side* ``tool`` run in ``directory``?

        While a task of that repository has an attached agent, only read-only host tools and
        the tools of taskbox's own MCP server ``server`` run (an allow-list, :mod:`taskbox.guard`);
        everything else is refused — unknown tools too — so the work happens in the sandbox
        (SPEC §8). Agents' own hook mechanisms ask this through `taskbox guard` (see
        `taskbox integrate --guard`).
        """
        from .guard import allowed_while_attached

        if allowed_while_attached(tool, server):
            return {"allowed": True, "reason": "read-only or taskbox tool", "tasks": []}
        try:
            root = git.repo_root(Path(directory).expanduser().resolve())
        except InvalidInput:
            return {"allowed": True, "reason": "not inside a git repository", "tasks": []}
        attached = [t for t in self.registry.list_tasks([str(Status.ACTIVE)])
                    if t.repo_path == str(root) and self.registry.leases(t.id)]
        if not attached:
            return {"allowed": True, "reason": "no task attached", "tasks": []}
        ids = ", ".join(t.id for t in attached)
        return {"allowed": False, "tasks": [t.id for t in attached],
                "reason": f"taskbox task {ids} is attached in this repository: while it is, only read-only host "
                          f"tools run here. Run commands and change files in its sandbox with the taskbox MCP "
                          f"tools (execute_in_task, write_task_file, edit_task_file) instead of the host-side "
                          f"{tool} tool"}

    # --- housekeeping --------------------------------------------------------------------------

    def tick(self) -> None:
        """Periodic housekeeping: every plugin's ``tick`` (pressure sampling, idle pause, …),
        then the warm pool topped up (setting ``pool_size``)."""
        self.hook.tick(service=self)
        if self.settings.pool_size > 0 and not pools.supported():
            try:
                self.pool_fill()
            except TaskboxError as exc:
                self.registry.add_event("pool.fill_failed", None, {"error": exc.message[:300]})

    @contextmanager
    def housekeeping(self, interval: float | None = None) -> Iterator[None]:
        """Run :meth:`tick` every ``interval`` seconds (``pressure_interval``) in a thread while
        the block runs; long-running adapters (the MCP server, the web server) use this."""
        seconds = float(interval if interval is not None else self.settings.pressure_interval)
        def report(error: str) -> None:
            self.registry.add_event("resource.monitor_error", None, {"error": error[:300]})

        monitor = pressure.Monitor(self.tick, seconds, report).start()
        try:
            yield
        finally:
            monitor.stop()

    # --- the warm pool (the slots and their claims are taskbox.pool; docs/speed.md) ------------

    def _pool_spec(self, image: str | None = None, memory: str | None = None, cpus: float | None = None,
                   network: str | None = None) -> ContainerSpec:
        """The container spec a new task of this profile gets (the settings' defaults unless named),
        made as for a task: so a slot is exactly what a cold create makes."""
        net = network or self.settings.network
        mem = memory or self.settings.memory
        cpu = float(cpus if cpus is not None else self.settings.cpus)
        check_limits(mem, cpu, self.settings.pids_limit, max_memory=self.settings.max_memory,
                     max_cpus=self.settings.max_cpus, max_pids=self.settings.max_pids)
        if net not in pools.POOLED_NETWORKS:
            raise InvalidInput(f"network mode {net} is not pooled (only {', '.join(pools.POOLED_NETWORKS)})")
        template = Task(id="pool-slot", title="", description="", status=Status.PENDING, repo_path="",
                        branch="", base_ref="", workspace_path=str(self.paths.pool), image=image or self.settings.image,
                        agent="agent", model="unknown", memory_limit=mem, cpu_limit=cpu,
                        pids_limit=self.settings.pids_limit, network=net)
        return self._container_spec(template)

    def pool_fill(self, size: int | None = None, *, image: str | None = None, memory: str | None = None,
                  cpus: float | None = None, network: str | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Top the warm pool up to ``size`` (default: the ``pool_size`` setting) free slots of a
        profile (default: the settings'), removing slots that cannot serve first."""
        why = pools.supported()
        if why:
            raise SandboxError(why)
        count = self.settings.pool_size if size is None else int(size)
        if count < 0:
            raise InvalidInput("a pool size cannot be negative")
        spec = self._pool_spec(image, memory, cpus, network)
        self.sandbox.ensure_image(spec.image)
        out = pools.fill(self.pool, self.sandbox, spec, count, self.home_label, progress or (lambda _m: None))
        if out["made"] or out["removed"]:
            self.registry.add_event("pool.filled", None, {"profile": out["profile"], "made": len(out["made"]),
                                                          "removed": len(out["removed"])})
        # Workspace volumes of the settings' quota made ahead too: a create then mounts one
        # instead of running mkfs (taskbox.quota.make_spares).
        spares: dict[str, Any] | None = None
        try:  # an optional saving: a create without a spare makes its volume itself
            size, inodes = self._workspace_quota(policy.Policy(), None, None)
            if size:
                spares = {**quota.make_spares(self.paths.volumes, size, inodes, sandbox_owner(), count)}
        except TaskboxError as exc:
            spares = {"error": exc.message[:300]}
        return {**out, **self.pool_status(), "spare_volumes": spares}

    def _finish_claim(self, task_id: str, sid: str) -> None:
        task, slot = self.get(task_id), self.pool.slot(sid)
        self._ensure_volume(task)  # bind the volume, never the bare directory under it
        if slot is not None:
            self.pool.bind(slot, Path(task.workspace_path), task.id)

    def pool_drain(self) -> dict[str, Any]:
        """Remove every free slot of the warm pool (claimed ones belong to their tasks)."""
        removed = pools.drain(self.pool, self.sandbox) if self.paths.pool.is_dir() else []
        quota.drain_spares(self.paths.volumes)
        if removed:
            self.registry.add_event("pool.drained", None, {"removed": len(removed)})
        return {"removed": removed, **self.pool_status()}

    def pool_status(self) -> dict[str, Any]:
        """The warm pool's setting, its default profile and every slot with its state."""
        try:
            profile = pools.key_of(self._pool_spec(), self.sandbox)
        except InvalidInput:
            profile = None  # the default network is not pooled
        slots = [s.to_dict() for s in self.pool.slots()]
        return {"size": self.settings.pool_size, "unsupported": pools.supported(), "profile": profile,
                "free": sum(1 for s in slots if s["state"] == "free" and s["profile"] == profile),
                "slots": slots}

    # --- resource pressure (the measurements and decisions are taskbox.pressure) ---------------

    def sample_pressure(self, task: Task, *, engine: bool = True) -> pressure.Sample | None:
        """The task's memory use now (None when its container does not run)."""
        return pressure.sample(self.sandbox, task, pressure.thresholds(self.settings), engine=engine)

    def check_pressure(self, task: Task, current: pressure.Sample | None = None, *,
                       engine: bool = True) -> pressure.Sample | None:
        """Sample one task and act on a level it newly reached: an event; at critical a
        checkpoint; at emergency a checkpoint and the task paused (see :mod:`taskbox.pressure`)."""
        current = current or self.sample_pressure(task, engine=engine)
        if current is None and not engine:
            return None  # no fast reading here: leave the level to the next full sample
        change = pressure.transition(task, current)
        if change is None:
            return current
        self._remember_pressure(task.id, change.remember, current)
        if change.action == "recovered":
            if current is not None:
                self.registry.add_event("resource.recovered", task.id, {"from": change.previous, **current.to_dict()})
            return current
        assert current is not None
        detail = {"from": change.previous, **current.to_dict()}
        self.registry.add_event(f"resource.{change.level}", task.id, detail)
        if change.action in ("checkpoint", "pause"):
            trigger, note = (("resource-pressure", "") if change.action == "checkpoint" else ("emergency", ": emergency"))
            try:
                self.create_checkpoint(task.id, None, trigger=trigger,
                                       reason=f"memory at {current.percent}% of the limit{note}")
            except TaskboxError as exc:
                self.registry.add_event("resource.checkpoint_failed", task.id,
                                        {"trigger": trigger, "error": exc.message[:300]})
        if change.action == "pause":
            try:
                if self.get(task.id).status is Status.ACTIVE:
                    self.pause(task.id, kill_running=True)  # the running work is what overflows
                    self.registry.add_event("resource.paused", task.id, detail)
            except TaskboxError as exc:
                self.registry.add_event("resource.pause_failed", task.id, {"error": exc.message[:300]})
        return current

    def check_pressure_all(self) -> list[pressure.Sample]:
        """Sample every running task of this home and act on new levels."""
        out = []
        for task in self.registry.list_tasks([str(Status.ACTIVE)]):
            if task.container_state is not ContainerState.RUNNING:
                continue
            found = self.check_pressure(task)
            if found is not None:
                out.append(found)
        return out

    def _remember_pressure(self, task_id: str, level: str, current: pressure.Sample | None) -> None:
        def apply(meta: dict[str, Any]) -> None:
            meta["pressure"] = {"level": level, "at": time.time(), "percent": current.percent if current else None}

        try:
            self.update_metadata(task_id, apply)
        except TaskboxError:
            pass

    # --- the sandbox profile and egress -------------------------------------------------------

    def policy_for(self, task: Task) -> policy.Policy:
        """The task's project policy; an invalid one refuses everything (and is reported once per call)."""
        try:
            return policy.for_task(task)
        except PolicyDenied as exc:
            self.registry.add_event("policy.invalid", task.id, {"error": str(exc.details.get("invalid", ""))})
            raise

    def egress_rules(self, task: Task) -> EgressRules:
        """The task's effective egress rules: its project policy plus its own domains."""
        return network.task_rules(self.policy_for(task).network, task)

    def sync_egress_log(self, task: Task) -> list[dict[str, Any]]:
        """Copy the task's new egress-proxy decisions into its audit log (denials also as events)."""
        return network.sync_log(self.sandbox.egress_log, self.audit, task)

    def sandbox_warnings(self, task: Task) -> list[str]:
        """How the task's sandbox is weaker than the default profile, one sentence each."""
        meta = task.metadata if isinstance(task.metadata, dict) else {}
        own: dict[str, Any] = meta["sandbox"] if isinstance(meta.get("sandbox"), dict) else {}
        spec = ContainerSpec(name=task.id, image=task.image, workspace=Path(task.workspace_path), labels={},
                             memory=task.memory_limit, cpus=task.cpu_limit, pids_limit=task.pids_limit,
                             network=task.network, runtime=own.get("runtime") or self.settings.runtime,
                             cap_add=list(own.get("cap_add") or []), seccomp=own.get("seccomp", "default"))
        out = weakened(spec, default_pids=max(self.settings.pids_limit, 512), default_memory=self.settings.memory)
        if not meta.get("quota"):
            out.append("the workspace has no disk or inode quota (workspace_quota = 0): "
                       "the task can fill the host disk")
        if task.network == "allowlist":
            rules = self.egress_rules(task)
            if any(r.kind == "address" for r in rules.allow) or rules.allow_private:
                out.append("the allowlist lets the task reach IP addresses or private networks directly")
        return out

    def doctor(self, fix: bool = False) -> list[dict[str, Any]]:
        """Find (and with ``fix``, repair) what crashes and manual changes left inconsistent.

        Detection is the doctor engine's (:func:`taskbox.doctor.detect`); the repairs it names
        are this service's (:meth:`_repair`).
        """
        self.tick()
        found = doctor.detect(self, self._repair if fix else None)
        self.registry.add_event("doctor.run", None, {"fix": fix, "findings": len(found)})
        return list(found)

    def _repair(self, name: str, p: dict[str, Any]) -> Callable[[], Any]:
        """The action behind a repair the doctor engine named."""
        reg = self.registry

        def forget_container() -> str:
            task = self.get(p["task_id"])
            self._update(task.id, {"container_id": None, "container_state": ContainerState.LOST},
                         ("container.lost", {"container_id": task.container_id}))
            if task.status is Status.ACTIVE:
                self._transition(task.id, Status.PAUSED)
                return "forgotten; task paused (a new container is made on next use)"
            return "forgotten (a new container is made on next use)"

        def sync_state() -> str:
            actual = p["state"]
            task = self._update(p["task_id"], {"container_state": actual}, ("container.state", {"state": str(actual)}))
            if actual is not ContainerState.RUNNING and task.status is Status.ACTIVE:
                if actual is ContainerState.OOM_KILLED:
                    reg.add_event("container.oom_killed", task.id, {})
                self._transition(task.id, Status.PAUSED)
                return f"recorded {actual}; task paused"
            return f"recorded {actual}"

        def rebuild_memory() -> str:
            task = self.get(p["task_id"])
            _state, recovery = self.memory(task).load(self._defaults(task))
            if recovery:
                self._report_recovery(task, recovery)
                return f"rebuilt from logs, damaged copy kept as {recovery.corrupted_copy}"
            return "already sound"

        def then(message: str, *steps: Callable[[], Any]) -> Callable[[], str]:
            def run() -> str:
                for step in steps:
                    step()
                return message
            return run

        actions: dict[str, Callable[[], Any]] = {
            "undo-create": then("removed", lambda: self._undo_create(self.get(p["task_id"]))),
            "finish-complete": then("completed", lambda: self.complete(p["task_id"])),
            "mount-volume": then("mounted", lambda: self._ensure_volume(self.get(p["task_id"]))),
            "mark-failed": then("marked failed", lambda: self.fail(p["task_id"], p.get("reason", ""))),
            "release-lease": then("released", lambda: self._kill_orphans_of(p["task_id"], p["session_id"]),
                                  lambda: reg.release_lease(p["task_id"], p["session_id"]),
                                  lambda: reg.end_session(p["session_id"], time.time())),
            "end-session": then("ended", lambda: reg.end_session(p["session_id"], time.time())),
            "fix-ownership": lambda: self.fix_ownership(p["task_id"]),
            "restore-workspace": lambda: "restored from checkpoint {checkpoint_id}".format(
                **self.restore_workspace(p["task_id"], "doctor")),
            "forget-container": forget_container,
            "sync-state": sync_state,
            "stop-container": then("stopped", lambda: self.sandbox.stop(p["container_id"])),
            "trash-container": lambda: doctor.trash_container(self.paths, self.sandbox, p["task_id"],
                                                              p["container_id"]),
            "trash-workspace": lambda: doctor.trash(self.paths, p["name"]),
            "purge-trash": lambda: doctor.purge(self.paths, p["path"], lambda: self.sandbox),
            "rebuild-memory": rebuild_memory,
            "backup-registry": lambda: f"backed up to {reg.backup().name}",
            "recover-ultrawork": lambda: self._recover_run(p["task_id"]),
            "pool-remove-slot": then("removed", lambda: self.sandbox.remove(p["container_id"] or ""),
                                     lambda: self.pool.release(p["slot"])),
            "pool-finish-claim": then("bound", lambda: self._finish_claim(p["task_id"], p["slot"])),
        }
        return actions[name]

    # --- ultrawork: sub-tasks merged back in dependency order (SPEC §7) -------------------------
    # The plan and the scheduler's decisions are taskbox.ultrawork's; the merge is taskbox.merge's.

    def _subtasks_changed(self, parent: Task) -> None:
        """Tell the plugins (Plan.md's live table) the parent's sub-tasks changed.

        One thread at a time tells them, with the registry's rows as they are then; a change made
        meanwhile by another thread only marks the view stale, and the telling thread tells them
        again before it returns (the rows it reads then hold that change too). So a burst of
        changes costs one or two renderings, and none waits for another's.
        """
        with _ULTRA_LOCKS_GUARD:
            view = _SUBTASK_VIEWS.setdefault((str(self.paths.home), parent.id), {"stale": False, "busy": False})
            view["stale"] = True
            if view["busy"]:
                return
            view["busy"] = True
        try:
            while True:
                with _ULTRA_LOCKS_GUARD:
                    if not view["stale"]:
                        view["busy"] = False
                        return
                    view["stale"] = False
                rows = self.registry.subtasks(parent.id)
                try:
                    self.hook.subtasks_changed(service=self, task=parent, subtasks=rows)
                except (TaskboxError, OSError) as exc:  # Plan.md is a view: the run goes on
                    self.registry.add_event("memory.refused", parent.id, {"error": str(exc)[:300]})
        except BaseException:
            with _ULTRA_LOCKS_GUARD:
                view["busy"] = False
            raise

    def _ultra_lock(self, parent_id: str) -> threading.Lock:
        with _ULTRA_LOCKS_GUARD:
            return _ULTRA_LOCKS.setdefault((str(self.paths.home), parent_id), threading.Lock())

    def _set_subtask(self, parent: Task, sid: str, changes: dict[str, Any], *, expect: list[str] | None = None,
                     event: tuple[str, dict[str, Any]] | None = None,
                     wake: threading.Event | None = None) -> dict[str, Any] | None:
        """Record a sub-task's change (then ``wake`` the orchestrator), then update the views."""
        row = self.registry.update_subtask(parent.id, sid, changes, expect=expect, event=event)
        if wake is not None:
            wake.set()
        if row is not None:
            self._subtasks_changed(parent)
        return row

    def create_subtasks(self, parent_id: str, plan: ultrawork.Plan | dict[str, Any]) -> dict[str, Any]:
        """Record a parent's sub-tasks from a plan, validated whole first (nothing is made on an error)."""
        parent = self.get(parent_id)
        if parent.status in FINISHED:
            raise InvalidTransition(f"task {parent.id} is {parent.status}; sub-tasks need a live parent",
                                    task_id=parent.id, status=str(parent.status))
        if parent.task_type == "subtask":
            raise InvalidInput(f"task {parent.id} is itself a sub-task; split its parent instead")
        if isinstance(plan, dict):
            plan = ultrawork.parse_plan(plan)
        for s in plan.subtasks:
            if s.agent != "shell":
                raise InvalidInput(f"sub-task {s.id!r} asks for agent {s.agent}, which runs through `taskbox run` "
                                   "(issue 13), not built yet; use agent = \"shell\" with a command")
        args = {"subtasks": [s.id for s in plan.subtasks], "parallel": plan.parallel}
        self._before(parent, "create_subtasks", args)
        parallel = plan.parallel or self.settings.ultrawork_parallel
        sandboxes = {s.id: s.sandbox for s in plan.subtasks if s.sandbox}

        def keep(meta: dict[str, Any]) -> None:  # durable with the parent's row, for --resume
            meta["subtask_sandboxes"] = sandboxes

        self.update_metadata(parent.id, keep)
        self.registry.insert_subtasks(parent.id, [s.to_dict() for s in plan.subtasks],
                                      ("subtasks.created", {"subtasks": [s.id for s in plan.subtasks],
                                                            "parallel": parallel}))
        self.registry.set_run(parent.id, status="created", parallel=parallel, merge=1, pid=None,
                              started_at=time.time(), finished_at=None)
        self._subtasks_changed(parent)
        result = self.subtask_status(parent.id)
        self._after(parent, "create_subtasks", args, result)
        return result

    def subtask_status(self, parent_id: str) -> dict[str, Any]:
        """The parent's sub-tasks (status, branch, times, merge commit or conflicting files) and progress."""
        parent = self.get(parent_id)
        rows = self.registry.subtasks(parent.id)
        run = self.registry.run(parent.id)
        now = time.time()
        for r in rows:
            end = r["finished_at"] or (now if r["status"] == ultrawork.RUNNING else None)
            r["duration_s"] = round(end - r["started_at"], 2) if r["started_at"] and end else None
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        if run is not None and run["status"] == "running" and not liveness.pid_alive(run["pid"]):
            run = {**run, "status": "interrupted"}
        final = sum(counts.get(s, 0) for s in ultrawork.FINAL)
        return {"parent": parent.id, "branch": parent.branch, "run": run, "subtasks": rows, "counts": counts,
                "total": len(rows), "finished": final, "merged": counts.get(ultrawork.MERGED, 0),
                "progress": round(final / len(rows), 3) if rows else 1.0}

    def run_subtasks(self, parent_id: str, *, parallel: int | None = None, merge: bool = True,
                     resume: bool = False, progress: Callable[[str], None] | None = None,
                     stop: threading.Event | None = None) -> dict[str, Any]:
        """Run a parent's sub-tasks to the end: start each once its dependencies are merged (at
        most ``parallel`` at once), merge each into the parent as it succeeds, block the
        dependents of what fails, times out or conflicts.

        Durable: every step is recorded in the registry first, so a run killed at any moment
        continues with ``resume`` — nothing finished is redone, nothing merged twice, and
        sub-tasks left running are reset (their child task aborted, its container stopped).
        """
        say = progress or (lambda _msg: None)
        parent = self.get(parent_id)
        rows = self.registry.subtasks(parent.id)
        if not rows:
            raise NotFound(f"task {parent.id} has no sub-tasks; give a plan (`taskbox ultrawork {parent.id} --plan "
                           "FILE`)", task_id=parent.id)
        run = self.registry.run(parent.id) or {}
        if run.get("status") == "running":
            if liveness.pid_alive(run.get("pid")) and run.get("pid") != os.getpid():
                raise TaskBusy(f"an ultrawork run of {parent.id} is going on (pid {run['pid']}); watch it with "
                               f"`taskbox subtask-status {parent.id} --watch`", task_id=parent.id)
            if not resume:
                raise InvalidInput(f"the last ultrawork run of {parent.id} was interrupted; continue it with "
                                   f"`taskbox ultrawork {parent.id} --resume`")
        if parallel is not None and not 1 <= parallel <= 64:
            raise InvalidInput(f"parallel {parallel} must be from 1 to 64")
        par = int(parallel or run.get("parallel") or self.settings.ultrawork_parallel)
        args = {"parallel": par, "merge": merge, "resume": resume}
        self._before(parent, "run_subtasks", args)
        began = time.time()
        self.registry.set_run(parent.id, status="running", parallel=par, merge=int(merge), pid=os.getpid(),
                              started_at=began, finished_at=None)
        self.registry.add_event("ultrawork.started", parent.id, {"parallel": par, "merge": merge, "resume": resume,
                                                                 "pid": os.getpid()})
        self.recover_subtasks(parent.id)
        parent = self.ensure_running(parent.id)
        wake = threading.Event()
        workers: dict[str, threading.Thread] = {}
        closers: list[threading.Thread] = []
        for r in self.registry.subtasks(parent.id):  # merged before a crash, child not completed yet
            if (r["status"] == ultrawork.MERGED and r["task_id"] and self.registry.task_exists(r["task_id"])
                    and self.get(r["task_id"]).status not in FINISHED):
                closers += self._close_child(r, ultrawork.MERGED)
        # Merges run one at a time on a thread of their own, in the order they are queued
        # (dependency order), so a merge never holds up the start of a sub-task whose slot is free.
        merges: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        queued: set[str] = set()  # queued once per run: a merge's outcome is final
        halt = threading.Event()
        failure: list[BaseException] = []

        def merger() -> None:
            last = False
            while not last:
                batch = [merges.get()]  # then whatever else is queued: merged in one go, in order
                while not merges.empty():
                    batch.append(merges.get())
                last = None in batch
                try:
                    if halt.is_set() or failure:
                        continue
                    rows = [r for sid in batch if sid is not None
                            and (r := self.registry.subtask(parent.id, sid))["status"] == ultrawork.SUCCEEDED]
                    for row, out in zip(rows, self._merge_subtasks(parent, rows), strict=True):
                        say(f"{row['id']}: {out}")
                        closers.extend(self._close_child(row, out))
                except BaseException as exc:  # the orchestrator raises it
                    failure.append(exc)
                finally:
                    wake.set()

        merging = threading.Thread(target=merger, name=f"merge-{parent.id}", daemon=True)
        merging.start()
        interrupted = False
        base: str | None = None  # the parent's commit new sub-tasks fork from
        in_base: set[str] = set()  # the sub-tasks whose merge that commit holds
        try:
            while True:
                wake.clear()  # before reading: a wake-up from now on is not lost
                if failure:
                    raise failure[0]
                rows = self.registry.subtasks(parent.id)
                d = ultrawork.decide(rows, par, merge)
                for sid, by in d.block.items():
                    if self._set_subtask(parent, sid, {"status": ultrawork.BLOCKED, "error": f"blocked by {by}"},
                                         expect=[ultrawork.PENDING],
                                         event=("subtask.blocked", {"subtask": sid, "by": by})):
                        say(f"{sid}: blocked by {by}")
                by_id = {r["id"]: r for r in rows}
                if d.start:  # first fill the free slots: merges need no slot
                    if stop is not None and stop.is_set():
                        interrupted = True
                        halt.set()  # merges queued but not begun wait for the next run
                        break
                    # A sub-task forks from the parent's branch as last committed and published, if
                    # that holds the merges of all its dependencies; else the parent is committed and
                    # published again first (independent sub-tasks need no new fork point), never
                    # while a merge moves the parent's branch.
                    needs = {dep for sid in d.start for dep in by_id[sid]["depends_on"]}
                    if base is None or not needs <= in_base:
                        with self._ultra_lock(f"merge:{parent.id}"):
                            merged = {r["id"] for r in self.registry.subtasks(parent.id)
                                      if r["status"] == ultrawork.MERGED}
                            _commit, base = self._publish(parent, "taskbox: before starting sub-tasks "
                                                                  + ", ".join(d.start))
                        in_base = merged
                    for sid in d.start:
                        row = self.registry.update_subtask(parent.id, sid, {
                            "status": ultrawork.RUNNING, "started_at": time.time(), "finished_at": None, "error": "",
                            "exit_code": None}, expect=[ultrawork.PENDING])
                        if row is None:
                            continue
                        say(f"{sid}: starting")
                        t = threading.Thread(target=self._run_subtask, args=(parent, row, base, wake),
                                             name=f"subtask-{sid}", daemon=True)
                        workers[sid] = t
                        t.start()
                    self._subtasks_changed(parent)  # one Plan.md update for the sub-tasks started together
                # then queue the merges of what succeeded, in dependency order
                ready = [sid for sid in d.merge if sid not in queued]
                for sid in ready:
                    queued.add(sid)
                    merges.put(sid)
                if d.block or d.start:
                    continue
                workers = {k: t for k, t in workers.items() if t.is_alive()}
                if d.done and not workers:
                    break
                wake.wait(0.5)
            merges.put(None)
            merging.join()
            if failure:
                raise failure[0]
            if merge and not interrupted:  # the parent's branch reaches the user's repository
                self._publish(parent, "taskbox: sub-tasks merged")
        finally:
            halt.set()
            merges.put(None)
            for t in workers.values():
                t.join()
            merging.join()
            for t in list(closers):
                t.join()
            for r in self.registry.subtasks(parent.id):  # not merged (--no-merge, stopped): container stopped
                if r["status"] == ultrawork.SUCCEEDED and r["task_id"] and self.registry.task_exists(r["task_id"]):
                    try:
                        self._park_child(r["task_id"])
                    except TaskboxError as exc:
                        self.registry.add_event("task.undo_failed", r["task_id"], {"error": exc.message[:300]})
            status = self.subtask_status(parent.id)
            self.registry.set_run(parent.id, status="interrupted" if interrupted else "finished",
                                  finished_at=time.time(), pid=None)
            self.registry.add_event("ultrawork.finished", parent.id, {
                "counts": status["counts"], "duration_s": round(time.time() - began, 2),
                "interrupted": interrupted})
        result = self.subtask_status(parent.id)
        result["duration_s"] = round(time.time() - began, 2)
        self._after(parent, "run_subtasks", args, result)
        return result

    def _run_subtask(self, parent: Task, row: dict[str, Any], base: str, wake: threading.Event) -> None:
        """A worker thread: make the sub-task's child task on a branch forked at ``base``, run its command."""
        sid = row["id"]
        child: Task | None = None
        started = time.monotonic()
        try:
            child = self._create_child(parent, row, base)
            self._set_subtask(parent, sid, {"task_id": child.id, "branch": child.branch},
                              event=("subtask.started", {"subtask": sid, "task_id": child.id, "branch": child.branch,
                                                         "base": base}))
            timeout = row["timeout"] or self.settings.exec_timeout
            try:
                result = self.exec(child.id, row["command"], timeout=timeout)
            except CommandTimeout:
                self._end_child(child, failed=f"timed out after {timeout:g}s")
                self._set_subtask(parent, sid, {"status": ultrawork.TIMED_OUT, "finished_at": time.time(),
                                                "error": f"timed out after {timeout:g}s"},
                                  event=("subtask.timed_out", {"subtask": sid, "task_id": child.id, "timeout": timeout,
                                                               "duration_ms": round((time.monotonic() - started) * 1000)}),
                                  wake=wake)
                return
            if result.exit_code != 0:
                reason = f"exit code {result.exit_code}" + (" (out of memory)" if result.oom_killed else "")
                self._end_child(child, failed=reason)
                self._set_subtask(parent, sid, {"status": ultrawork.FAILED, "finished_at": time.time(),
                                                "exit_code": result.exit_code, "error": reason},
                                  event=("subtask.failed", {"subtask": sid, "task_id": child.id,
                                                            "exit_code": result.exit_code,
                                                            "duration_ms": result.duration_ms, "error": reason}),
                                  wake=wake)
                return
            tip = self._end_child(child)
            self._set_subtask(parent, sid, {"status": ultrawork.SUCCEEDED, "finished_at": time.time(), "exit_code": 0,
                                            "tip": tip},
                              event=("subtask.succeeded", {"subtask": sid, "task_id": child.id, "exit_code": 0,
                                                           "duration_ms": result.duration_ms, "tip": tip}),
                              wake=wake)  # its slot is free and its merge can be queued now
        except TaskboxError as exc:
            if child is not None:
                try:
                    self._end_child(child, failed=exc.message)
                except TaskboxError:
                    pass
            self._set_subtask(parent, sid, {"status": ultrawork.FAILED, "finished_at": time.time(),
                                            "error": exc.message[:500]},
                              event=("subtask.failed", {"subtask": sid, "task_id": child.id if child else None,
                                                        "exit_code": None, "error": exc.message[:300],
                                                        "duration_ms": round((time.monotonic() - started) * 1000)}),
                              wake=wake)
        finally:
            wake.set()

    def _create_child(self, parent: Task, row: dict[str, Any], base: str) -> Task:
        """The sub-task's child task, forked at ``base``: the parent's image, limits and network,
        unless the plan overrides them (``image``, ``memory``, ``cpus``, ``network``)."""
        own = (parent.metadata.get("subtask_sandboxes") or {}).get(row["id"]) or {}
        network = own.get("network", parent.network)
        domains = (parent.metadata.get("sandbox") or {}).get("allow_domains") if network == "allowlist" else None
        description = f"{parent.id} {row['id']}: {row['title']}\n\nSub-task {row['id']} of {parent.id}."
        if row["command"]:
            description += f"\n\nCommand: {row['command'][:1000]}"
        stem = f"{parent.id[:50]}-{row['id']}"[:60].strip("-")
        for attempt in range(20):
            tid = stem if attempt == 0 else f"{stem[:57]}-{attempt + 1}"
            if self.registry.task_exists(tid):
                continue
            try:
                return self.create_task(parent.repo_path, description[:DESCRIPTION_MAX], agent=parent.agent,
                                        model=parent.model, title=row["title"], task_id=tid, base_ref=base,
                                        memory=own.get("memory", parent.memory_limit),
                                        cpus=own.get("cpus", parent.cpu_limit), pids_limit=parent.pids_limit,
                                        network=network, image=own.get("image", parent.image),
                                        parent_id=parent.id, metadata={"subtask": row["id"]},
                                        allow_domains=domains, branch=f"{parent.branch}-{row['id']}")
            except Conflict:
                if not self.registry.task_exists(tid):
                    raise
        raise Conflict(f"no free task id for sub-task {row['id']} of {parent.id}")

    def _end_child(self, child: Task, failed: str | None = None) -> str | None:
        """Finish a child's run. Success: commit and fetch its branch; its container keeps running
        until the merge (completing it then is quick). Failure: stop its container and mark it
        failed (it can be repaired and merged later). Returns the branch's commit."""
        child = self.get(child.id)
        if failed is None:
            _commit, tip = self._publish(child, f"taskbox: sub-task {child.metadata.get('subtask', child.id)} done")
            return tip
        if child.container_id:
            self.sandbox.stop(child.container_id)
        if child.status not in FINISHED:
            self._update(child.id, {"container_state": ContainerState.STOPPED if child.container_id
                                    else ContainerState.NONE})
            self._end_sessions(child.id)
            self._transition(child.id, Status.FAILED, reason=failed[:300])
        return None

    def _park_child(self, task_id: str) -> None:
        """Stop a child task's container, keeping the task (paused) so it can be fixed and merged later."""
        child = self.get(task_id)
        if child.status is Status.ACTIVE:
            self._end_sessions(child.id)
            self.pause(child.id, kill_running=True)

    def _close_child(self, row: dict[str, Any], outcome: str) -> list[threading.Thread]:
        """After a merge attempt, in the background: a merged child task is completed; one that
        conflicted or could not be merged is paused (container stopped) for repair."""
        if not row.get("task_id"):
            return []

        def close() -> None:
            try:
                child = self.get(row["task_id"])
                if child.status in FINISHED:
                    return
                if outcome == ultrawork.MERGED:
                    self.complete(child.id, f"merged into {child.parent_id}", final_checkpoint=False)
                else:
                    self._park_child(child.id)
            except TaskboxError as exc:
                self.registry.add_event("task.undo_failed", row["task_id"], {"error": exc.message[:300]})

        t = threading.Thread(target=close, name=f"close-{row['id']}", daemon=True)
        t.start()
        return [t]

    def _merge_subtasks(self, parent: Task, rows: list[dict[str, Any]]) -> list[str]:
        """Merge succeeded sub-tasks into the parent in this order, in one sandbox command; record each
        as merged, conflict (with files) or a failed merge; return their outcomes."""
        if not rows:
            return []
        error: TaskboxError | None
        try:
            items = [(self.get(r["task_id"]), r["tip"], f"taskbox: merge sub-task {r['id']}: {r['title']}")
                     for r in rows]
            faults.point("ultrawork.merging")
            done, error = self._merge_many_into_task(parent, items)
            faults.point("ultrawork.merged")  # the parent's branch moved; the registry does not know yet
        except TaskboxError as exc:
            if len(rows) > 1:  # say which one it was
                return [out for r in rows for out in self._merge_subtasks(parent, [r])]
            done, error = [], exc
        outcomes = [self._record_merge(parent, r, out) for r, out in zip(rows, done, strict=False)]
        if error is not None:
            r = rows[len(done)]
            message = f"merge failed: {error.message}"
            self._set_subtask(parent, r["id"], {"status": ultrawork.FAILED, "error": message[:500]},
                              expect=[ultrawork.SUCCEEDED],
                              event=("subtask.failed", {"subtask": r["id"], "task_id": r["task_id"],
                                                        "error": message[:300]}))
            outcomes.append(ultrawork.FAILED)
            outcomes += self._merge_subtasks(parent, rows[len(done) + 1:])  # the rest were not tried
        return outcomes

    def _record_merge(self, parent: Task, row: dict[str, Any], out: merge_engine.Outcome) -> str:
        sid = row["id"]
        if out.status == "conflict":
            self._set_subtask(parent, sid, {"status": ultrawork.CONFLICT, "conflict_files": out.files,
                                            "error": "merge conflict"},
                              event=("subtask.conflict", {"subtask": sid, "task_id": row["task_id"], "files": out.files}))
            return ultrawork.CONFLICT
        self._set_subtask(parent, sid, {"status": ultrawork.MERGED, "merge_commit": out.commit, "merged_at": time.time(),
                                        "conflict_files": [], "error": ""},
                          event=("subtask.merged", {"subtask": sid, "task_id": row["task_id"], "commit": out.commit,
                                                    "already": out.status == "already"}))
        return ultrawork.MERGED

    def _merge_into_task(self, target: Task, source: Task, tip: str, message: str,
                         squash: bool = False) -> merge_engine.Outcome:
        """Merge commit ``tip`` of ``source``'s branch (already fetched into the user's repository) into
        ``target``'s branch, inside ``target``'s sandbox."""
        done, error = self._merge_many_into_task(target, [(source, tip, message)], squash)
        if error is not None:
            raise error
        return done[0]

    def _merge_many_into_task(self, target: Task, items: list[tuple[Task, str, str]], squash: bool = False
                              ) -> tuple[list[merge_engine.Outcome], GitError | None]:
        """Merge each ``(source, tip, message)`` into ``target``'s branch in turn, in one command in
        ``target``'s sandbox (see :func:`taskbox.merge.in_workspace_many`). One merge into a task at a time."""
        repo = Path(target.repo_path)
        for source, _tip, _message in items:
            if Path(source.repo_path) != repo:
                raise InvalidInput(f"tasks {source.id} and {target.id} work on different repositories")
        scratch = self.paths.home / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        limit = parse_size(self.settings.fetch_limit, "fetch_limit")
        with self._ultra_lock(f"merge:{target.id}"):
            fd, name = tempfile.mkstemp(prefix="merge-", suffix=".bundle", dir=scratch)
            os.close(fd)
            bundle = Path(name)
            try:
                merge_engine.bundle_from(repo, bundle, [tip for _s, tip, _m in items],
                                         [source.base_ref for source, _t, _m in items])
                if bundle.stat().st_size > limit:
                    names = ", ".join(source.id for source, _t, _m in items)
                    raise GitError(f"the branch of {names} bundles to more than {limit} bytes; refusing to merge "
                                   "it (raise the fetch_limit setting if this is expected)")
                files.atomic_write(self._ws(target), merge_engine.INCOMING, bundle.read_bytes())
            finally:
                bundle.unlink(missing_ok=True)
            with self.in_sandbox(target) as run:
                return merge_engine.in_workspace_many(run, target.branch, [(tip, message) for _s, tip, message in items],
                                                      squash=squash)

    def _merge_into_branch(self, source: Task, branch: str, tip: str, message: str,
                           squash: bool = False) -> merge_engine.Outcome:
        """Merge ``tip`` into ``branch`` of the user's repository: computed in a throwaway sandbox on a
        bare copy, brought back as a checked bundle, the ref moved by compare-and-swap only."""
        repo = Path(source.repo_path)
        if not git.check_ref_format(branch):
            raise InvalidInput(f"{branch!r} is not a valid branch name")
        ref = f"refs/heads/{branch}"
        proc = git.run(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=repo, check=False)
        old = proc.stdout.strip()
        if proc.returncode != 0 or not old:
            raise NotFound(f"branch {branch} does not exist in {repo} (and no task has that id)")
        if git.run(["symbolic-ref", "--quiet", "HEAD"], cwd=repo, check=False).stdout.strip() == ref:
            raise GitError(f"branch {branch} is checked out in {repo}; taskbox never touches your work tree: switch "
                           "to another branch there, or merge into another branch", branch=branch)
        scratch = Path(tempfile.mkdtemp(prefix="merge-", dir=self.paths.home / "tmp"))
        try:
            merge_engine.bare_copy(repo, scratch / "repo.git", [old, tip])
            workspace.hand_over(scratch)
            labels = {LABEL_TASK: source.id, LABEL_HOME: self.home_label}
            with self.sandbox.scratch(source.image, scratch, labels) as cid:
                run = functools.partial(self.sandbox.capture, cid, timeout=self.settings.sandbox_git_timeout)
                out = merge_engine.in_bare(run, old, tip, message, squash=squash)
                if out.status != "merged":
                    return out
                new = workspace.import_bundle(run, merge_engine.result_bundle(old, tip), repo, merge_engine.RESULT_REF,
                                              scratch=self.paths.home / "tmp",
                                              limit=parse_size(self.settings.fetch_limit, "fetch_limit"),
                                              what=f"the merge of {source.id} into {branch}")[merge_engine.RESULT_REF]
            parents = git.run(["rev-list", "--parents", "-n", "1", new], cwd=repo).stdout.split()[1:]
            if parents != ([old] if squash else [old, tip]) or new != out.commit:
                raise GitError(f"the merge of {source.id} into {branch} came back with unexpected parents; "
                               "the branch was not moved")
            git.run(["update-ref", "-m", f"taskbox: merge {source.id}", ref, new, old], cwd=repo)
            out.old = old
            return out
        finally:
            files.remove_tree(scratch)

    def merge_task(self, task_id: str, into: str | None = None, *, squash: bool = False) -> dict[str, Any]:
        """Merge a task's branch into its parent (default), another task (``into`` a task id) or a branch
        of the user's repository (``into`` a branch name). A conflict changes nothing and names the files."""
        task = self.get(task_id)
        args = {"into": into, "squash": squash}
        self._before(task, "merge", args)
        target: Task | None = None
        if into is None:
            if not task.parent_id:
                raise InvalidInput(f"task {task.id} has no parent; say where to merge it with --into BRANCH_OR_TASK")
            target = self.get(task.parent_id)
        elif self.registry.task_exists(into):
            target = self.get(into)
        if target is not None and target.id == task.id:
            raise InvalidInput("a task cannot be merged into itself")
        if target is not None and target.status in FINISHED:
            raise InvalidTransition(f"task {target.id} is {target.status}; it can no longer take a merge",
                                    task_id=target.id, status=str(target.status))
        _commit, tip = self._publish(task, f"taskbox: merge {task.id}")
        message = f"taskbox: merge {task.id}: {task.title}"
        row = self.registry.subtask_of(task.id)
        if target is not None:
            out = self._merge_into_task(target, task, tip, message, squash)
            if row is not None and row["parent_id"] == target.id:
                self.registry.update_subtask(target.id, row["id"], {"tip": tip})
                self._record_merge(target, {**row, "tip": tip}, out)
                if out.status != "conflict":
                    for t in self._close_child(row, ultrawork.MERGED):
                        t.join()
        else:
            assert into is not None
            out = self._merge_into_branch(task, into, tip, message, squash)
        where = target.id if target is not None else into
        self.registry.add_event("task.merged", task.id, {"into": where, "commit": out.commit, "status": out.status,
                                                          "files": out.files, "squash": squash, "tip": tip})
        result = {"task_id": task.id, "into": where, "into_type": "task" if target is not None else "branch",
                  "tip": tip, "squash": squash, **out.to_dict()}
        self._after(task, "merge", args, result)
        return result

    def _recover_run(self, parent_id: str) -> str:
        """The doctor's repair of an interrupted run: reconcile it and mark it interrupted (resume continues it)."""
        done = self.recover_subtasks(parent_id)
        self.registry.set_run(parent_id, status="interrupted", pid=None, finished_at=time.time())
        self.registry.add_event("ultrawork.finished", parent_id, {"counts": self.subtask_status(parent_id)["counts"],
                                                                   "interrupted": True})
        return (f"reconciled ({len(done)} sub-task(s) reset or kept); continue with "
                f"`taskbox ultrawork {parent_id} --resume`")

    def recover_subtasks(self, parent_id: str) -> list[dict[str, Any]]:
        """Reconcile a parent's sub-tasks after an interrupted run; return what was done.

        A sub-task left ``running`` whose child finished its work (its branch was fetched) is
        recorded as succeeded; any other is reset to pending,
        its child task aborted and its container stopped (it runs again from a fresh fork).
        Blocked sub-tasks go back to pending (they are blocked again if still blocked), and
        no child task of the parent keeps a running container.
        """
        parent = self.get(parent_id)
        done: list[dict[str, Any]] = []
        rows = self.registry.subtasks(parent.id)
        live = {r["task_id"] for r in rows if r["task_id"] and r["status"] in (ultrawork.SUCCEEDED, ultrawork.CONFLICT,
                                                                                 ultrawork.MERGED)}
        for r in rows:
            if r["status"] == ultrawork.BLOCKED:
                self.registry.update_subtask(parent.id, r["id"], {"status": ultrawork.PENDING, "error": ""},
                                             expect=[ultrawork.BLOCKED])
            if r["status"] != ultrawork.RUNNING:
                continue
            action = "reset"
            child = self.get(r["task_id"]) if r["task_id"] and self.registry.task_exists(r["task_id"]) else None
            # its branch reaches the user's repository only after its command exited 0
            if child is not None and child.status in (Status.ACTIVE, Status.PAUSED) and not child.pending_op:
                tip = git.run(["rev-parse", "--verify", "--quiet", f"refs/heads/{child.branch}^{{commit}}"],
                              cwd=Path(child.repo_path), check=False).stdout.strip()
                if tip:
                    self.registry.update_subtask(parent.id, r["id"], {"status": ultrawork.SUCCEEDED, "tip": tip,
                                                                      "finished_at": time.time(), "exit_code": 0},
                                                 expect=[ultrawork.RUNNING])
                    live.add(child.id)
                    action = "kept (its work was done)"
            if action == "reset":
                self.registry.update_subtask(parent.id, r["id"], {"status": ultrawork.PENDING, "task_id": None,
                                                                  "branch": None, "started_at": None,
                                                                  "error": "reset after an interrupted run"},
                                             expect=[ultrawork.RUNNING])
            self.registry.add_event("ultrawork.recovered", parent.id, {"subtask": r["id"], "task_id": r["task_id"],
                                                                       "action": action})
            done.append({"subtask": r["id"], "task_id": r["task_id"], "action": action})
        for child in self.registry.list_tasks(parent_id=parent.id):
            if child.status in FINISHED:
                continue
            if child.id in live:
                self._park_child(child.id)
                continue
            if child.pending_op == "create":
                try:
                    self._undo_create(child)
                except TaskboxError:
                    pass
                continue
            if child.container_id:
                self.sandbox.stop(child.container_id)
            self._update(child.id, {"container_state": ContainerState.STOPPED if child.container_id
                                    else ContainerState.NONE})
            self._end_sessions(child.id)
            self._transition(child.id, Status.ABORTED, reason="interrupted ultrawork run; the sub-task runs again")
        # throwaway containers a killed run left behind (their `with` never ended): no orphan stays
        family = {parent.id, *(t.id for t in self.registry.list_tasks(parent_id=parent.id))}
        for c in self.sandbox.task_containers(self.home_label):
            labels = c.get("Labels") or {}
            if labels.get(LABEL_SCRATCH) and labels.get(LABEL_TASK) in family:
                self.sandbox.remove(c["Id"])
        if done:
            self._subtasks_changed(parent)
        return done

    # --- registry recovery ---------------------------------------------------------------------

    def backup_registry(self) -> dict[str, Any]:
        """Take an online backup of the registry now."""
        path = self.registry.backup()
        return {"backup": str(path), "size_bytes": path.stat().st_size}

    def list_registry_backups(self) -> list[dict[str, Any]]:
        return [{"name": b.name, "path": str(b), "size_bytes": b.stat().st_size, "created_at": b.stat().st_mtime}
                for b in list_backups(self.paths.backups)]

    def _containers_or_none(self) -> list[dict[str, Any]] | None:
        try:
            return self.sandbox.task_containers(self.home_label)
        except TaskboxError:
            return None

    def adopt(self, name: str) -> Task:
        """Take an orphan workspace or container (``name``: its task id) back into the registry."""
        if self.registry.task_exists(name):
            raise Conflict(f"task {name!r} is already in the registry", task_id=name)
        task = doctor.adoptable(self.paths, self.settings, self._containers_or_none(), name)
        self._adopt(task)
        return self.get(task.id)

    def _adopt(self, task: Task) -> None:
        try:
            if task.metadata.get("quota"):
                self._ensure_volume(task)
        except TaskboxError:
            pass  # reported by `doctor` (unmounted or missing volume)
        self.registry.insert_task(task, ("task.adopted", {"from": task.metadata.get("rebuilt_from")}))
        for row in doctor.checkpoint_rows(self.paths, task.id):
            self.registry.insert_checkpoint_row(row)

    def adopt_all(self) -> dict[str, Any]:
        """Adopt every task on disk the registry does not know (after a restore or for a rebuild)."""
        containers = self._containers_or_none()
        for img in sorted(self.paths.volumes.glob("*.img")) if self.paths.volumes.is_dir() else []:
            try:  # a volume holds its workspace's memory: mount it to read it
                quota.ensure_mounted(img, self.paths.workspace(img.name.removesuffix(".img")))
            except TaskboxError:
                pass
        tasks, notes = doctor.discover(self.paths, self.settings, containers)
        adopted, refreshed = [], []
        for task in sorted(tasks.values(), key=lambda t: (t.created_at, t.id)):
            if self.registry.task_exists(task.id):
                # a restored backup is older than the records the registry kept writing since
                if task.metadata.get("rebuilt_from") == "record" and task.version > self.get(task.id).version:
                    task.metadata = {k: v for k, v in task.metadata.items() if k != "rebuilt_from"}
                    self.registry.overwrite_task(task)
                    refreshed.append(task.id)
                continue
            if task.parent_id and task.parent_id not in tasks and not self.registry.task_exists(task.parent_id):
                task.parent_id = None
            try:
                self._adopt(task)
            except Conflict as exc:
                notes.append(exc.message)
                continue
            adopted.append(task.id)
        if containers is None:
            notes.append("Docker is unavailable: container labels were not read")
        return {"adopted": adopted, "refreshed": refreshed, "notes": notes}

    @classmethod
    def restore_registry(cls, home: Path | str | None = None, backup: str | None = None) -> dict[str, Any]:
        """Restore the registry from the newest (or the named) backup, then adopt what is on disk
        but not in that backup; with no backup at all, rebuild it from disk."""
        paths = Paths(Path(home).resolve() if home else default_home())
        if not backup and not list_backups(paths.backups):
            return {**cls.rebuild_registry(home), "restored_from": None}
        info = restore_backup(paths.db, paths.backups, backup)
        svc = cls(home)
        return {**info, **svc.adopt_all()}

    @classmethod
    def rebuild_registry(cls, home: Path | str | None = None) -> dict[str, Any]:
        """Make a new registry from what lives on disk; the old file (if any) is kept aside."""
        paths = Paths(Path(home).resolve() if home else default_home())
        kept = set_aside(paths.db)
        svc = cls(home, create_registry=True)
        return {"damaged_copy": kept, **svc.adopt_all()}
