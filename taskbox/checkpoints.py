"""The checkpoint lifecycle (SPEC §5): create, restore, diff, list, prune, delete, export, import.

A checkpoint is a snapshot of a task's workspace in its private store
(:mod:`taskbox.snapshots`), a registry row (its name, trigger, parent, pinning and size)
and, if asked for, an image of the task's container filesystem. This engine owns those
three; the task itself (its state, decisions, Plan.md, its container's lifecycle) is the
service's: :class:`~taskbox.service.TaskService` records a checkpoint before it is taken
(:meth:`Checkpoints.begin` then :meth:`Checkpoints.take`) and acts on what a restore
returns (:class:`Restored`).

A restore journal is written under ``TASKBOX_HOME`` before anything in the workspace is
touched; a restore interrupted by a crash is finished by the next checkpoint operation on
the task or by ``taskbox doctor --fix``. The task's append-only history
(``conversations.jsonl``, ``executions.jsonl``, ``decisions.md``) is kept as it is: a
restore is part of that history, not a reason to forget it.

Docker is reached only through :class:`~taskbox.sandbox.Sandbox` (its errors translated
there): with the engine down, files-only checkpoints still work, and a checkpoint that needs
the container's filesystem fails with :class:`~taskbox.errors.DockerUnavailable`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import archive, checkpoint_archive, files
from .confine import rooted
from .errors import CheckpointCorrupted, GitError, InvalidInput, NotFound, TaskboxError, TaskLocked
from .snapshots import (
    EMPTY_TREE,
    Store,
    Unit,
    apply_restore,
    corrupted,
    join,
    plan_restore,
    restore_blobs,
)

if TYPE_CHECKING:
    from .config import Paths, Settings
    from .models import Task
    from .registry import Registry
    from .sandbox import Sandbox

TRIGGERS = ("manual", "major-todo", "risky-command", "policy", "detach", "resource-pressure", "emergency",
            "final", "import")
# The task's append-only history: a restore keeps these as they are now.
KEEP_ON_RESTORE = (".task-memory/conversations.jsonl", ".task-memory/executions.jsonl",
                   ".task-memory/decisions.md")
IMAGE_REPO = "taskbox-checkpoint"

# How `taskbox doctor` is told of a finding: kind, task id, what is wrong, and the repair
# (run when fixing; it returns what it did).
Report = Callable[[str, str | None, str, Callable[[], str] | None], None]


@dataclass
class NewCheckpoint:
    """A checkpoint about to be taken; the service records it first, so the checkpoint holds its own record."""

    task_id: str
    checkpoint_id: str
    name: str
    named: bool  # named by the caller (kept by retention), not numbered by taskbox
    description: str
    trigger: str
    reason: str
    pinned: bool
    include_filesystem: bool
    parent_id: str | None = None  # the task's current checkpoint (set by the service)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Restored:
    """What a restore did to the workspace; the service restores the container and records it."""

    checkpoint: dict[str, Any]  # the checkpoint's row
    changed: int
    added: int
    removed: int
    forced: bool  # restored while another agent was attached
    image: str | None  # the container image to bring back, if the checkpoint has one
    started: float


def _now_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class Checkpoints:
    """Checkpoint operations on tasks; the service's checkpoint methods call these."""

    def __init__(self, paths: Paths, registry: Registry, sandbox: Callable[[], Sandbox], settings: Settings,
                 home_label: str) -> None:
        self.paths = paths
        self.registry = registry
        self.sandbox = sandbox  # connects on first call (DockerUnavailable when the engine is down)
        self.settings = settings
        self.home_label = home_label  # tells this home's checkpoint images apart on a shared engine
        self.root = paths.home / "checkpoints"

    # --- helpers ---------------------------------------------------------------------------

    def store(self, task_id: str) -> Store:
        return Store(self.root / f"{task_id}.git", read_limit=self._read_limit(task_id))

    def _read_limit(self, task_id: str) -> int:
        """What a capture may read: the workspace's disk quota (more could never be restored into
        it), else the bound of an imported archive."""
        try:
            quota = (self.registry.get_task(task_id).metadata or {}).get("quota") or {}
        except NotFound:
            quota = {}
        disk = quota.get("disk") if isinstance(quota, dict) else None
        return int(disk) if isinstance(disk, int) and disk > 0 else int(self.settings.archive_max_bytes)

    @contextmanager
    def locked(self, task_id: str) -> Iterator[None]:
        """One checkpoint operation per task at a time (across processes)."""
        self.paths.locks.mkdir(parents=True, exist_ok=True)
        with open(self.paths.locks / f"{task_id}.checkpoint.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def busy(self, task_id: str) -> bool:
        """Whether another process is in the middle of a checkpoint operation on the task."""
        self.paths.locks.mkdir(parents=True, exist_ok=True)
        with open(self.paths.locks / f"{task_id}.checkpoint.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    def _container(self, task: Task) -> dict[str, Any] | None:
        if not task.container_id:
            return None
        try:
            return self.sandbox().container_state(task.container_id)
        except TaskboxError:  # Docker unreachable (translated by the sandbox): work on the files alone
            return None

    @contextmanager
    def _frozen(self, task: Task) -> Iterator[bool]:
        """Freeze the task's container (if running) so nothing writes while files are read or put back."""
        cid = task.container_id or ""
        paused = False
        state: dict[str, Any] | None = None
        if cid:
            try:
                self.sandbox().pause(cid)  # the common case, in one call to the engine
                paused = True
            except TaskboxError as exc:
                # Why not: stopped, gone, left frozen, or the engine down (files only, then).
                state = self._container(task)
                if state and state.get("Running") and not state.get("Paused"):
                    # a container that cannot pause is still checkpointed
                    self.registry.add_event("checkpoint.unpaused", task.id, {"reason": exc.message[:200]})
        try:
            yield paused
        finally:
            if paused or (state and state.get("Paused")):
                try:
                    self.sandbox().unpause(cid)
                except TaskboxError as exc:
                    self.registry.add_event("checkpoint.unpause_failed", task.id, {"reason": exc.message[:200]})

    def _workspace(self, task: Task) -> Path:
        ws = Path(task.workspace_path)
        if not _is_real_dir(ws):
            raise InvalidInput(f"task {task.id} has no workspace at {ws}", task_id=task.id)
        return ws

    # --- registry rows ---------------------------------------------------------------------

    def _rows(self, task_id: str) -> list[dict[str, Any]]:
        return [self._row(r) for r in self.registry.checkpoints(task_id)]

    @staticmethod
    def _row(r: dict[str, Any]) -> dict[str, Any]:
        meta = r["metadata"]
        return {"checkpoint_id": r["id"], "task_id": r["task_id"], "name": r["name"],
                "description": r["description"], "trigger": r["trigger"], "ref": r["ref"],
                "parent_id": r["parent_id"], "pinned": bool(r["pinned"]), "size_bytes": r["size_bytes"],
                "created_at": r["created_at"], "named": bool(meta.get("named")),
                "files": meta.get("files", 0), "bytes_added": r["size_bytes"],
                "duration_ms": meta.get("duration_ms"), "commit": meta.get("commit"),
                "image": meta.get("image"), "include_filesystem": bool(meta.get("image")),
                "changes": meta.get("changes", {}), "units": meta.get("units", []),
                "reason": meta.get("reason", "")}

    def get(self, task_id: str, ref: str) -> dict[str, Any]:
        """A checkpoint of ``task_id`` by id or by name (the newest with that name)."""
        self.registry.get_task(task_id)  # TaskNotFound first
        row = self.registry.checkpoint(ref)
        if row is not None:
            if row["task_id"] != task_id:
                raise NotFound(f"checkpoint {ref} belongs to task {row['task_id']}, not {task_id}",
                               checkpoint_id=ref, task_id=task_id)
            return self._row(row)
        named = [r for r in self._rows(task_id) if r["name"] == ref]
        if named:
            return named[-1]
        raise NotFound(f"task {task_id} has no checkpoint {ref!r} (see `taskbox checkpoint list {task_id}`)",
                       checkpoint_id=ref, task_id=task_id)

    def rows(self, task_id: str, current: str | None = None) -> list[dict[str, Any]]:
        """The task's checkpoints, oldest first; ``current`` (an id) is flagged."""
        self.registry.get_task(task_id)
        return [{**r, "current": r["checkpoint_id"] == current} for r in self._rows(task_id)]

    # --- create ----------------------------------------------------------------------------

    def begin(self, task: Task, name: str | None = None, description: str = "", *,
              include_filesystem: bool = False, trigger: str = "manual", pinned: bool = False,
              reason: str = "") -> NewCheckpoint:
        """Check a checkpoint request and give it an id and a name (called with :meth:`locked` held).

        An interrupted restore is finished first. Nothing is captured yet: see :meth:`take`.
        """
        started = time.perf_counter()
        trigger = {"completion": "final", "on-detach": "detach"}.get(trigger, trigger)
        pinned = pinned or trigger == "final"
        if trigger not in TRIGGERS:
            raise InvalidInput(f"trigger {trigger!r} is not one of {', '.join(TRIGGERS)}")
        named = name is not None
        if name is not None:
            name = _check_name(name)
        description = _check_text("description", description or "", 2000)
        self._workspace(task)
        if include_filesystem and not task.container_id:
            raise InvalidInput(f"task {task.id} has no container, so its filesystem cannot be captured; "
                               "start it first or checkpoint without --include-filesystem", task_id=task.id)
        self._finish_interrupted(task)
        self.store(task.id).ensure()
        rows = self._rows(task.id)
        why = reason or {"manual": "requested", "detach": "saved on detach",
                         "final": "task completed"}.get(trigger, trigger)
        return NewCheckpoint(task.id, f"cp-{secrets.token_hex(6)}", name or f"{trigger}-{len(rows) + 1}", named,
                             description, trigger, why, pinned, include_filesystem, started=started)

    def take(self, task: Task, new: NewCheckpoint) -> dict[str, Any]:
        """Capture the workspace (and the container's filesystem, if asked) as ``new`` (with :meth:`locked` held).

        Returns the checkpoint's row, with ``pruned``: the checkpoints retention removed.
        A failure leaves no row and gives back the space a half-written capture took.
        """
        store = self.store(task.id)
        rows = self._rows(task.id)
        cp_id = new.checkpoint_id
        try:
            image = None
            with self._frozen(task):
                units = store.capture(self._workspace(task))
                if new.include_filesystem:
                    image = self.sandbox().commit(
                        task.container_id or "", IMAGE_REPO, f"{self.home_label[:8]}-{cp_id}",
                        f"taskbox checkpoint {cp_id} of task {task.id}")
            commit = store.commit(units, {"task_id": task.id, "checkpoint_id": cp_id, "name": new.name,
                                          "created_at": time.time(), "trigger": new.trigger, "image": image},
                                  f"{new.name}\n\n{new.description}".strip())
            store.set_ref(cp_id, commit)
        except OSError as exc:  # e.g. the disk filled up: say so, as a taskbox error
            store.drop_temporaries()
            raise TaskboxError(f"could not take checkpoint {cp_id} of task {task.id}: {exc}") from exc
        except BaseException:
            store.drop_temporaries()  # space a failed write took is given back at once
            raise
        stats = self._stats(store, rows[-1] if rows else None, units)
        meta = {"named": new.named, "commit": commit, "files": stats["files"], "changes": stats["changes"],
                "duration_ms": _now_ms(new.started), "image": image, "reason": new.reason,
                "units": [{"path": u.path, "kind": u.kind, "tree": u.tree} for u in units]}
        self.registry.add_checkpoint({
            "id": cp_id, "task_id": task.id, "name": new.name, "description": new.description,
            "trigger": new.trigger, "ref": f"refs/checkpoints/{cp_id}", "parent_id": new.parent_id,
            "pinned": new.pinned, "size_bytes": stats["bytes_added"], "metadata": meta, "created_at": time.time()})
        self.registry.add_event("checkpoint.created", task.id, {
            "checkpoint_id": cp_id, "name": new.name, "trigger": new.trigger, "files": stats["files"],
            "bytes_added": stats["bytes_added"], "duration_ms": meta["duration_ms"]})
        pruned = self._prune(task.id)
        row = self.get(task.id, cp_id)
        row["duration_ms"] = _now_ms(new.started)
        row["pruned"] = pruned
        return row

    def _stats(self, store: Store, parent: dict[str, Any] | None, units: list[Unit]) -> dict[str, Any]:
        before = {f"{u['kind']}:{u['path']}": u["tree"] for u in (parent or {}).get("units", [])}
        changes = {"added": 0, "modified": 0, "deleted": 0}
        added = store.last_capture_bytes  # what this checkpoint's capture wrote: new content only
        files_total = 0
        for u in units:
            old = before.get(u.key)
            if old is None:
                if u.kind == "files":
                    files_total += u.entries if u.entries is not None else store.count_entries(u.tree)
                if parent is None:
                    continue
            for _om, _nm, _sha, status, _path in store.diff(old or EMPTY_TREE, u.tree):
                if status == "D":
                    changes["deleted"] += 1 if u.kind == "files" else 0
                    continue
                if u.kind == "files" and old is not None:
                    changes["added" if status == "A" else "modified"] += 1
        if parent is not None:
            files_total += parent.get("files", 0) + changes["added"] - changes["deleted"]
            files_total -= sum(store.count_entries(before[k]) for k in before
                               if k.startswith("files:") and k not in {u.key for u in units})
        if parent is None:  # a first checkpoint: everything in the store is new
            added = sum(os.lstat(os.path.join(d, f)).st_size
                        for d, _, fs in os.walk(store.path / "objects") for f in fs)
        return {"files": files_total, "changes": changes, "bytes_added": added}

    # --- restore ---------------------------------------------------------------------------

    def _journal(self, task_id: str) -> Path:
        return self.store(task_id).meta / "restore.json"

    def restore(self, task: Task, ref: str | None = None, *, force: bool = False,
                session_id: str | None = None) -> Restored:
        """Make the task's workspace exactly the checkpoint's (the newest if ``ref`` is None).

        Called with :meth:`locked` held. Refused while an agent other than ``session_id`` is
        attached, unless ``force``. A checkpoint with a container image is checked for it
        first (all of the restore or none); bringing the container back is the caller's.
        """
        t0 = time.perf_counter()
        if ref is None:
            rows = self._rows(task.id)
            if not rows:
                raise NotFound(f"task {task.id} has no checkpoints yet", task_id=task.id)
            cp = rows[-1]
        else:
            cp = self.get(task.id, ref)
        others = [le for le in self.registry.leases(task.id) if le.session_id != session_id]
        if others and not force:
            names = ", ".join(f"{le.agent} (session {le.session_id})" for le in others)
            raise TaskLocked(f"task {task.id} has an agent attached: {names}; detach it first or restore "
                             "with --force", task_id=task.id, holders=[le.to_dict() for le in others])
        ws = self._workspace(task)
        store = self.store(task.id)
        self._finish_interrupted(task)
        commit = store.resolve(cp["checkpoint_id"])
        if commit is None:
            raise CheckpointCorrupted(f"checkpoint {cp['checkpoint_id']} is in the registry but not in the "
                                      f"store {store.path}; run `taskbox doctor`")
        if cp.get("image"):
            self._check_image(cp["image"])  # before any file changes: all of the restore or none
        try:
            with self._frozen(task):
                stats = self._restore_files(task, ws, store, cp["checkpoint_id"], commit)
        except BaseException:
            store.drop_temporaries()
            raise
        return Restored(cp, stats["changed"], stats["added"], stats["removed"], bool(others), cp.get("image"), t0)

    def _restore_files(self, task: Task, ws: Path, store: Store, cp_id: str, commit: str,
                       keep: dict[str, str | None] | None = None) -> dict[str, int]:
        manifest = store.manifest(commit)
        target: list[Unit] = manifest["units"]
        # One descriptor of the root for the whole restore: every path below it is resolved
        # from there, link by link refused (see taskbox.snapshots).
        with rooted(ws) as rfd:
            current = store.scan(rfd)
            # Every object the checkpoint needs that the workspace lacks is read in full first:
            # a damaged store is reported while the workspace is still untouched.
            try:
                plans = plan_restore(store, current, target)
                store.verify_blobs(restore_blobs(plans))  # chunk lists were read whole by the plan
            except GitError as exc:
                raise corrupted(f"checkpoint {cp_id} cannot be restored", exc,
                                "; the workspace was not changed") from exc
            journal = self._journal(task.id)
            if keep is None:
                keep = self._preserve(ws, store)
            _write_json(journal, {"checkpoint_id": cp_id, "commit": commit, "keep": keep,
                                  "started_at": time.time(), "pid": os.getpid()})
            # The history kept as it is now is not written with the checkpoint's older copy
            # only to be put back after: it is left alone.
            for p in plans:
                if p.unit.key == "files:":
                    p.write = [path for path in p.write if not keep.get(path)]
            try:
                stats = apply_restore(store, rfd, current, plans)
            except GitError as exc:
                raise corrupted(f"restore of checkpoint {cp_id} failed part-way; `taskbox doctor --fix` "
                                "finishes it", exc) from exc
            except OSError as exc:
                raise TaskboxError(f"restore of checkpoint {cp_id} failed part-way ({exc.strerror or exc}); "
                                   "`taskbox doctor --fix` finishes it") from exc
        self._put_back(ws, store, keep)
        journal.unlink(missing_ok=True)
        return stats

    def _preserve(self, ws: Path, store: Store) -> dict[str, str | None]:
        """Copy the append-only history aside (under TASKBOX_HOME) before the restore."""
        keep_dir = store.meta / "keep"
        shutil.rmtree(keep_dir, ignore_errors=True)
        keep_dir.mkdir(parents=True)
        kept: dict[str, str | None] = {}
        for i, rel in enumerate(KEEP_ON_RESTORE):
            try:
                data = files.read_optional(ws, rel)
            except TaskboxError:
                data = None  # e.g. replaced by a link: not copied, the checkpoint's version wins
            if data is None:
                kept[rel] = None
                continue
            files.write_durably(keep_dir / str(i), data)  # a replayed journal puts these back
            kept[rel] = str(i)
        return kept

    def _put_back(self, ws: Path, store: Store, keep: dict[str, str | None]) -> None:
        for rel, name in keep.items():
            if name is None:
                continue
            data = (store.meta / "keep" / name).read_bytes()
            try:
                if files.read_optional(ws, rel) == data:
                    continue  # left alone by the restore (or already put back by an earlier run)
                files.atomic_write(ws, rel, data)
            except TaskboxError:
                continue

    def _finish_interrupted(self, task: Task) -> str | None:
        """Finish a restore a crash interrupted (called with the task's lock held)."""
        journal = self._journal(task.id)
        if not journal.exists():
            return None
        try:
            data = json.loads(journal.read_text())
        except (OSError, ValueError) as exc:
            # Moved aside (not deleted) so the next restore can run and make the workspace whole.
            aside = journal.with_name(f"{journal.name}.unreadable.{int(time.time())}")
            journal.replace(aside)
            self.registry.add_event("checkpoint.journal_unreadable", task.id, {"kept_as": str(aside)})
            raise CheckpointCorrupted(
                f"an interrupted restore left an unreadable journal (kept as {aside}): {exc}; the workspace "
                "may be half restored, so restore a checkpoint again", task_id=task.id) from exc
        store = self.store(task.id)
        with self._frozen(task):
            self._restore_files(task, Path(task.workspace_path), store, data["checkpoint_id"], data["commit"],
                                keep=data.get("keep") or {})
        self.registry.add_event("checkpoint.restore_finished", task.id, {"checkpoint_id": data["checkpoint_id"]})
        return str(data["checkpoint_id"])

    def _check_image(self, image: str) -> None:
        # Docker down is DockerUnavailable (from the sandbox), not a damaged checkpoint.
        if not self.sandbox().image_exists(image):
            raise CheckpointCorrupted(f"the container image {image} of this checkpoint is gone")

    # --- diff ------------------------------------------------------------------------------

    def _units_of(self, task: Task, ref: str) -> tuple[str, list[Unit]]:
        if ref in ("current", "workspace"):
            store = self.store(task.id)
            store.ensure()
            with self.locked(task.id):
                return "current", store.capture(self._workspace(task))
        cp = self.get(task.id, ref)
        commit = self.store(task.id).resolve(cp["checkpoint_id"])
        if commit is None:
            raise CheckpointCorrupted(f"checkpoint {cp['checkpoint_id']} is missing from the store")
        return cp["checkpoint_id"], self.store(task.id).manifest(commit)["units"]

    def diff(self, task: Task, a: str, b: str, *, patch: bool = True, limit: int = 200_000) -> dict[str, Any]:
        """What changed between two checkpoints (``current`` is the workspace as it is now)."""
        a_id, ua = self._units_of(task, a)
        b_id, ub = self._units_of(task, b)
        store = self.store(task.id)
        left = {u.key: u for u in ua}
        right = {u.key: u for u in ub}
        changes: list[dict[str, str]] = []
        git_changes = 0
        for key in sorted(set(left) | set(right)):
            unit = right.get(key) or left[key]
            old = left[key].tree if key in left else EMPTY_TREE
            new = right[key].tree if key in right else EMPTY_TREE
            for _om, _nm, _sha, status, path in store.diff(old, new):
                if unit.kind == "gitdir":
                    git_changes += 1
                else:
                    changes.append({"status": {"A": "added", "D": "deleted"}.get(status, "modified"),
                                    "path": join(unit.path, path)})
            if unit.kind == "files":
                before = set(left[key].empty_dirs) if key in left else set()
                after = set(right[key].empty_dirs) if key in right else set()
                changes += [{"status": "added", "path": join(unit.path, d) + "/"} for d in sorted(after - before)]
                changes += [{"status": "deleted", "path": join(unit.path, d) + "/"} for d in sorted(before - after)]
        text = ""
        root_a, root_b = left.get("files:"), right.get("files:")
        if patch and root_a and root_b and root_a.tree != root_b.tree:
            text = store.git(["diff-tree", "-p", "--no-ext-diff", "--no-textconv", "--no-color", "--stat",
                              root_a.tree, root_b.tree]).stdout
            if len(text) > limit:
                text = text[:limit] + f"\n[… diff cut at {limit} characters]\n"
        counts = {s: sum(c["status"] == s for c in changes) for s in ("added", "modified", "deleted")}
        return {"task_id": task.id, "a": a_id, "b": b_id, "changes": changes, **counts,
                "git_changes": git_changes, "patch": text}

    # --- retention -------------------------------------------------------------------------

    def _prune(self, task_id: str, *, now: float | None = None) -> list[str]:
        """Apply retention (called with the task's lock held); return the pruned ids."""
        rows = self._rows(task_id)
        if not rows:
            return []
        now = time.time() if now is None else now
        max_n = max(1, int(self.settings.checkpoint_max_per_task))
        max_age = float(self.settings.checkpoint_max_age_days) * 86400
        newest = rows[-1]["checkpoint_id"]
        keep = {r["checkpoint_id"] for r in rows if r["pinned"] or r["named"] or r["checkpoint_id"] == newest}
        doomed = [r for r in rows if r["checkpoint_id"] not in keep and max_age > 0
                  and now - r["created_at"] > max_age]
        left = [r for r in rows if r not in doomed]
        for r in left:  # oldest first
            if len(left) - len([d for d in left if d in doomed]) <= max_n:
                break
            if r["checkpoint_id"] not in keep:
                doomed.append(r)
        store = self.store(task_id)
        for r in doomed:
            self._delete(store, r)
        if doomed:
            self.registry.add_event("checkpoint.pruned", task_id,
                                    {"checkpoints": [r["checkpoint_id"] for r in doomed]})
        return [r["checkpoint_id"] for r in doomed]

    def _delete(self, store: Store, row: dict[str, Any]) -> None:
        store.delete_ref(row["checkpoint_id"])
        self.registry.delete_checkpoint(row["checkpoint_id"])
        if row.get("image"):
            self._remove_image(row["image"])

    def _remove_image(self, image: str) -> bool:
        try:
            return self.sandbox().remove_image(image)
        except TaskboxError:  # Docker unreachable: a later gc removes it
            return False

    def prune(self, task_id: str) -> list[str]:
        self.registry.get_task(task_id)
        with self.locked(task_id):
            return self._prune(task_id)

    def delete(self, task_id: str, ref: str) -> dict[str, Any]:
        row = self.get(task_id, ref)
        with self.locked(task_id):
            self._delete(self.store(task_id), row)
        self.registry.add_event("checkpoint.deleted", task_id, {"checkpoint_id": row["checkpoint_id"]})
        return row

    def gc(self) -> dict[str, Any]:
        """Retention for every task, stores of deleted tasks removed, space reclaimed."""
        out: dict[str, Any] = {"pruned": [], "stores_removed": [], "bytes_before": 0, "bytes_after": 0}
        if not self.root.is_dir():
            return out
        known = {t.id for t in self.registry.list_tasks()}
        for path in sorted(self.root.glob("*.git")):
            task_id = path.name[: -len(".git")]
            store = Store(path)
            out["bytes_before"] += store.size()
            if task_id not in known:
                shutil.rmtree(path, ignore_errors=True)
                out["stores_removed"].append(task_id)
                continue
            with self.locked(task_id):
                out["pruned"] += self._prune(task_id)
                if store.exists():
                    store.drop_temporaries()
                    store.gc()
            out["bytes_after"] += store.size()
        self._gc_images()
        self.registry.add_event("checkpoint.gc", None, {k: v for k, v in out.items()})
        return out

    def _gc_images(self) -> None:
        try:
            tags = self.sandbox().image_tags(IMAGE_REPO)
        except TaskboxError:  # Docker unreachable: images are left for the next gc
            return
        used = self.registry.checkpoint_images()
        prefix = f"{IMAGE_REPO}:{self.home_label[:8]}-"
        for tag in tags:
            if tag.startswith(prefix) and tag not in used:
                self._remove_image(tag)

    # --- export / import -------------------------------------------------------------------

    def export(self, task_id: str, ref: str, path: str | Path) -> dict[str, Any]:
        """Write a checkpoint as a portable ``.tar.gz`` (see :mod:`taskbox.checkpoint_archive`)."""
        cp = self.get(task_id, ref)
        store = self.store(task_id)
        commit = store.resolve(cp["checkpoint_id"])
        if commit is None:
            raise CheckpointCorrupted(f"checkpoint {cp['checkpoint_id']} is missing from the store")
        manifest = store.manifest(commit)
        out = Path(path).expanduser()
        if out.is_dir():
            out = out / f"{task_id}-{cp['name']}-{cp['checkpoint_id']}.tar.gz"
        if not out.parent.is_dir():
            raise InvalidInput(f"directory {out.parent} does not exist")
        info = {k: cp[k] for k in ("checkpoint_id", "task_id", "name", "description", "trigger", "created_at")}
        try:
            checkpoint_archive.write(store, manifest["units"], info, out, int(cp["created_at"]))
        except GitError as exc:
            raise corrupted(f"checkpoint {cp['checkpoint_id']} cannot be exported", exc) from exc
        self.registry.add_event("checkpoint.exported", task_id,
                                {"checkpoint_id": cp["checkpoint_id"], "path": str(out)})
        return {"task_id": task_id, "checkpoint_id": cp["checkpoint_id"], "path": str(out.resolve()),
                "size_bytes": out.stat().st_size}

    def import_(self, task: Task, path: str | Path) -> dict[str, Any]:
        """Read an exported ``.tar.gz`` into a new checkpoint of ``task`` (nothing is extracted)."""
        t0 = time.perf_counter()
        src = Path(path).expanduser()
        if not src.is_file():
            raise NotFound(f"no file {src}", path=str(src))
        store = self.store(task.id)
        with self.locked(task.id):
            store.ensure()
            with tempfile.TemporaryDirectory(dir=store.meta) as scratch:
                info, units, count = checkpoint_archive.read(store, src, Path(scratch),
                                                             archive.Limits.from_settings(self.settings))
            cp_id = f"cp-{secrets.token_hex(6)}"
            name = _check_name(str(info.get("name") or "imported")[:64]) if info.get("name") else "imported"
            description = str(info.get("description") or "")[:2000]
            commit = store.commit(units, {"task_id": task.id, "checkpoint_id": cp_id, "name": name,
                                          "created_at": time.time(), "trigger": "import",
                                          "imported_from": info.get("checkpoint_id")},
                                  f"{name}\n\n{description}".strip())
            store.set_ref(cp_id, commit)
            meta: dict[str, Any] = {"named": True, "commit": commit, "files": count, "changes": {}, "image": None,
                                    "duration_ms": _now_ms(t0), "reason": f"imported from {src.name}",
                                    "imported_from": info.get("checkpoint_id"),
                                    "units": [{"path": u.path, "kind": u.kind, "tree": u.tree} for u in units]}
            self.registry.add_checkpoint({
                "id": cp_id, "task_id": task.id, "name": name, "description": description, "trigger": "import",
                "ref": f"refs/checkpoints/{cp_id}", "parent_id": None, "pinned": False,
                "size_bytes": src.stat().st_size, "metadata": meta, "created_at": time.time()})
        self.registry.add_event("checkpoint.imported", task.id, {"checkpoint_id": cp_id, "path": str(src)})
        return self.get(task.id, cp_id)

    # --- doctor ----------------------------------------------------------------------------

    def reconcile(self, found: Report) -> None:
        """Report to `taskbox doctor` interrupted restores, frozen containers and lost checkpoints, with their repairs."""
        for task in self.registry.list_tasks():
            if self.busy(task.id):
                continue  # a live checkpoint operation: not ours to judge
            if self._journal(task.id).exists():
                def finish(t: Task = task) -> str:
                    with self.locked(t.id):
                        cp = self._finish_interrupted(t)
                    return f"restore of {cp} finished"
                found("interrupted-restore", task.id,
                      "a checkpoint restore was interrupted; the workspace is part old, part restored", finish)
            state = self._container(task) if task.container_id else None
            if state and state.get("Paused"):
                def thaw(t: Task = task) -> str:
                    self.sandbox().unpause(t.container_id or "")
                    return "unpaused"
                found("paused-container", task.id, "the container was left frozen by an interrupted checkpoint",
                      thaw)
            rows = self._rows(task.id)
            if rows:
                store = self.store(task.id)
                for r in rows:
                    if not store.exists() or store.resolve(r["checkpoint_id"]) is None:
                        def forget(row: dict[str, Any] = r, s: Store = store) -> str:
                            self._delete(s, row)
                            return "removed from the registry"
                        found("lost-checkpoint", task.id,
                              f"checkpoint {r['checkpoint_id']} ({r['name']}) is missing from the store", forget)


def _check_name(name: str) -> str:
    name = _check_text("checkpoint name", name, 64)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@+-]*", name):
        raise InvalidInput(f"checkpoint name {name!r} may contain only letters, digits and . _ @ + -")
    if re.fullmatch(r"cp-[0-9a-f]{12}", name):
        raise InvalidInput(f"checkpoint name {name!r} looks like a checkpoint id; choose another")
    return name


def _check_text(label: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidInput(f"{label} is {len(value)} characters long; the limit is {limit}")
    if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", value):
        raise InvalidInput(f"{label} contains control characters")
    return value.strip()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    files.write_durably(path, json.dumps(data).encode())
