"""The warm pool: pre-started, unassigned sandbox containers a new task claims (docs/speed.md).

A *slot* is a directory ``$TASKBOX_HOME/pool/<slot>/`` and one running container made from
it. The container's ``/workspace`` is the slot's ``ws/`` directory, bound with ``rslave``
propagation; ``$TASKBOX_HOME/pool`` is a *shared* mount (this module makes it one: a bind of
the directory onto itself). Claiming a slot bind-mounts the task's workspace (or its quota
volume's mount point) onto ``ws/``, which propagates into the running container: it sees
exactly that workspace, nothing else, and writes land in it. Nothing of a slot is reachable
from any workspace; the container's processes before a claim are only its init, ``sleep``
and the exec agent (whose commands resolve their working directory per command).

A slot's state is files beside ``ws/`` (never inside it):

* ``slot.json`` — its profile key and container id, written once the container runs;
* ``free`` — present while it can be claimed. A claim is ``rename(free, claim.<pid>)``: of
  two concurrent claims exactly one rename succeeds (the other gets ``ENOENT``);
* ``claimed`` — ``{"task_id", "workspace"}``, written atomically once the workspace is bound
  (then ``claim.<pid>`` goes). A ``claim.<pid>`` whose process is gone is a claim interrupted
  part-way, which :func:`taskbox.doctor.detect` reports and repairs.

The orchestration (:func:`fill`, :func:`drain`, :func:`take`) takes the sandbox layer as an
argument; the core decides when to call it. A slot is used once: when its task's container
is removed, the slot's mounts are undone and its directory deleted (:meth:`Pool.release`).
This module does no Docker calls (those are in :mod:`taskbox.sandbox`); it needs root for
``mount(2)``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import faults, files
from .errors import SandboxError, TaskboxError
from .sandbox import LABEL_HOME, LABEL_POOL, LABEL_POOL_PROFILE, ContainerSpec, Sandbox

SLOT_ID = re.compile(r"^s-[0-9a-f]{10}$")
FREE = "free"
CLAIMED = "claimed"
CLAIMING = "claim."  # + the claiming process's pid
META = "slot.json"
WS = "ws"
_MS_BIND = 0x1000
_MS_SHARED = 1 << 20
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8
_libc: Any = None


def _sys() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _mount(source: str, target: str, flags: int) -> None:
    if _sys().mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _umount(target: str) -> bool:
    if _sys().umount2(target.encode(), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
            return False
        raise OSError(err, os.strerror(err), target)
    return True


def profile_key(fields: dict[str, Any]) -> str:
    """The key of a sandbox profile: everything of a container spec but its name, workspace and labels."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def supported() -> str | None:
    """Why the pool cannot work here (None when it can): it bind-mounts, which needs root."""
    if os.geteuid() != 0:
        return "the warm pool needs root (it bind-mounts workspaces into running slots)"
    return None


@dataclass
class Slot:
    """One slot as its files describe it."""

    id: str
    path: Path
    state: str  # starting | free | claimed | half-claimed
    profile: str = ""
    container_id: str = ""
    task_id: str = ""
    created_at: float = 0.0
    claimer: int = 0  # the pid of a claim in progress (state half-claimed)

    @property
    def ws(self) -> Path:
        return self.path / WS

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


class Pool:
    """The slots under one ``$TASKBOX_HOME/pool`` directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._shared = False

    # --- the shared mount -------------------------------------------------------------------

    def _propagation(self) -> str | None:
        """``shared``/``slave``/``private`` of the mount at the pool root, None when it is no mount point."""
        target = os.fsencode(str(self.root))
        found = None
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 5 and fields[4].replace(b"\\040", b" ") == target:
                    opt = fields[6:fields.index(b"-")] if b"-" in fields else []
                    found = ("shared" if any(o.startswith(b"shared:") for o in opt)
                             else "slave" if any(o.startswith(b"master:") for o in opt) else "private")
        return found

    def ensure_shared(self, *, check: bool = False) -> None:
        """Make the pool root a shared mount (bound onto itself first), so binds made on slots
        reach the containers; after a reboot it is a plain directory again. Once done it is
        remembered (the root is shared while any slot exists: :meth:`close` only undoes it with
        none left, under the fillers' lock); ``check`` reads the mount table again."""
        if self._shared and not check:
            return
        why = supported()
        if why:
            raise SandboxError(why)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            state = self._propagation()
            if state is None:
                _mount(str(self.root), str(self.root), _MS_BIND)
                state = "bound"
            if state != "shared":
                # Private first, then shared: a peer group of its own, so the slots' binds reach
                # the slot containers and nothing else (not the peers of the host's root mount).
                _mount("none", str(self.root), _MS_PRIVATE)
                _mount("none", str(self.root), _MS_SHARED)
        except OSError as exc:
            raise SandboxError(f"could not make the pool directory {self.root} a shared mount: "
                               f"{exc.strerror}") from exc
        self._shared = True

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One filler at a time (claims need no lock: they are renames)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- slots ------------------------------------------------------------------------------

    def new_slot(self) -> Slot:
        """A new slot directory with its empty, root-owned ``ws/`` (the container is made next)."""
        self.ensure_shared()
        sid = f"s-{secrets.token_hex(5)}"
        path = self.root / sid
        path.mkdir(mode=0o700)
        (path / WS).mkdir(mode=0o755)
        return Slot(sid, path, "starting", created_at=time.time())

    def publish(self, slot: Slot, container_id: str, profile: str) -> None:
        """Record the slot's running container, then make it claimable."""
        meta = {"profile": profile, "container_id": container_id, "created_at": slot.created_at}
        files.atomic_write(slot.path, META, json.dumps(meta).encode(), 0o600)
        fd = os.open(slot.path / FREE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        slot.state, slot.profile, slot.container_id = "free", profile, container_id

    def slot(self, sid: str) -> Slot | None:
        """One slot by id (None if it is not there or the id is not a slot's)."""
        if not SLOT_ID.match(sid):
            return None
        path = self.root / sid
        if not path.is_dir():
            return None
        out = Slot(sid, path, "starting")
        try:
            meta = json.loads((path / META).read_bytes()[:4096])
            out.profile = str(meta.get("profile") or "")
            out.container_id = str(meta.get("container_id") or "")
            out.created_at = float(meta.get("created_at") or 0)
        except (OSError, ValueError, AttributeError):
            out.created_at = _mtime(path)
        if (path / FREE).exists():
            out.state = "free"
        elif (path / CLAIMED).exists():
            try:
                claim = json.loads((path / CLAIMED).read_bytes()[:4096] or b"{}")
            except (OSError, ValueError):
                claim = {}
            out.task_id = str(claim.get("task_id") or "") if isinstance(claim, dict) else ""
            out.state = "claimed" if out.task_id else "half-claimed"
        else:
            for name in os.listdir(path):
                if name.startswith(CLAIMING) and name[len(CLAIMING):].isdigit():
                    out.state, out.claimer = "half-claimed", int(name[len(CLAIMING):])
        return out

    def slots(self) -> list[Slot]:
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(os.listdir(self.root)):
            s = self.slot(entry)
            if s is not None:
                out.append(s)
        return out

    def claim(self, profile: str) -> Slot | None:
        """Take a free slot of ``profile`` for good (None when there is none): the rename of its
        ``free`` marker is the claim, so two claims never get the same slot."""
        if not self.root.is_dir():
            return None
        for entry in os.listdir(self.root):
            if not SLOT_ID.match(entry) or not os.path.exists(self.root / entry / FREE):
                continue
            s = self.slot(entry)
            if s is None or s.state != "free" or s.profile != profile or not s.container_id:
                continue
            try:
                os.rename(s.path / FREE, s.path / f"{CLAIMING}{os.getpid()}")
            except FileNotFoundError:
                continue  # another create took it first
            s.state, s.claimer = "half-claimed", os.getpid()
            return s
        return None

    def bind(self, slot: Slot, workspace: Path, task_id: str) -> None:
        """Bind the task's workspace onto the claimed slot's ``ws/`` (it appears in the running
        container at once), then record the claim. The workspace is opened without following a
        link and bound through its descriptor."""
        self.ensure_shared()
        fd = os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if not self.bound(slot, workspace):
                _umount_all(slot.ws)
                _mount(f"/proc/self/fd/{fd}", str(slot.ws), _MS_BIND)
        except OSError as exc:
            raise SandboxError(f"could not bind the workspace of task {task_id} into pool slot {slot.id}: "
                               f"{exc.strerror}") from exc
        finally:
            os.close(fd)
        record = {"task_id": task_id, "workspace": str(workspace), "claimed_at": time.time()}
        files.atomic_write(slot.path, CLAIMED, json.dumps(record).encode(), 0o600)
        _unlink_claiming(slot.path)
        slot.state, slot.task_id, slot.claimer = "claimed", task_id, 0

    @staticmethod
    def bound(slot: Slot, workspace: Path) -> bool:
        """Whether the slot's ``ws/`` shows ``workspace`` now (the same directory by device and inode)."""
        try:
            a, b = os.stat(slot.ws, follow_symlinks=False), os.stat(workspace, follow_symlinks=False)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def release(self, sid: str) -> bool:
        """Undo a slot: unmount whatever is on its ``ws/`` and delete its directory (its container
        is removed first by the caller). Only directories named like a slot under the root."""
        if not SLOT_ID.match(sid):
            return False
        path = self.root / sid
        if not path.is_dir() or path.is_symlink():
            return False
        try:
            _umount_all(path / WS)
        except OSError as exc:
            raise SandboxError(f"could not unmount pool slot {sid}: {exc.strerror}") from exc
        for name in (FREE, CLAIMED, META):
            try:
                (path / name).unlink()
            except FileNotFoundError:
                pass
        _unlink_claiming(path)
        for leftover in path.glob(".*"):  # an atomic write's temporary file
            if leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()
        try:
            (path / WS).rmdir()
            path.rmdir()
        except OSError as exc:
            raise SandboxError(f"could not remove pool slot {sid}: {exc.strerror}") from exc
        return True

    def close(self) -> bool:
        """Undo the pool root's shared mount once no slot is left (True if it was mounted)."""
        if self.slots() or self._propagation() is None:
            return False
        self._shared = False
        try:
            return _umount(str(self.root))
        except OSError as exc:
            raise SandboxError(f"could not unmount the pool directory {self.root}: {exc.strerror}") from exc

    def of_container(self, container_id: str) -> Slot | None:
        for s in self.slots():
            if s.container_id and s.container_id == container_id:
                return s
        return None


def _unlink_claiming(path: Path) -> None:
    for name in os.listdir(path):
        if name.startswith(CLAIMING):
            try:
                (path / name).unlink()
            except FileNotFoundError:
                pass


def _umount_all(target: Path) -> None:
    for _ in range(16):  # stacked binds, one by one
        if not _umount(str(target)):
            return


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# --- with the sandbox layer: fill, drain, take ----------------------------------------------------

POOLED_NETWORKS = ("none", "open")  # an allowlist task has its own proxy and rules: never pooled
STARTING_GRACE = 600.0  # seconds a slot may be "starting" before it counts as a crashed fill's


def poolable(spec: ContainerSpec) -> bool:
    """Whether a container of ``spec`` can come from the pool at all."""
    return spec.network in POOLED_NETWORKS and spec.egress is None


def key_of(spec: ContainerSpec, sandbox: Sandbox) -> str:
    return profile_key(spec.profile(sandbox.agent_home is not None))


def _take_down(pool: Pool, sandbox: Sandbox, slot: Slot) -> None:
    if slot.container_id:
        sandbox.remove(slot.container_id)  # releases the slot too (Sandbox.release_slot)
    pool.release(slot.id)


def _grab(pool: Pool, slot: Slot) -> bool:
    """Take a free slot away from claims (to remove it): the same rename a claim does."""
    try:
        os.rename(slot.path / FREE, slot.path / f"{CLAIMING}{os.getpid()}")
    except FileNotFoundError:
        return False
    return True


def fill(pool: Pool, sandbox: Sandbox, spec: ContainerSpec, size: int, home_label: str,
         say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Top the slots of ``spec``'s profile up to ``size``; first remove slots that cannot serve
    (their container stopped or gone, e.g. after an engine restart; a crashed fill's; an image
    rebuilt since). Returns what was made and removed."""
    if not poolable(spec):
        raise SandboxError(f"network mode {spec.network} is not pooled (only {', '.join(POOLED_NETWORKS)})")
    key = key_of(spec, sandbox)
    made: list[str] = []
    removed: list[str] = []
    with pool.locked():
        pool.ensure_shared(check=True)  # another process may have closed it with its last slot
        image = sandbox.image_id(spec.image)
        by_slot = {str((c.get("Labels") or {}).get(LABEL_POOL)): c["Id"] for c in sandbox.pool_containers(home_label)}
        for s in pool.slots():
            stale = False
            if s.state == "starting":  # fills hold the lock: this one's filler died part-way
                stale, s.container_id = True, by_slot.get(s.id, "")
            elif s.state == "free":
                info = sandbox.container_info(s.container_id)
                stale = (info is None or not info["running"]
                         or (s.profile == key and image is not None and info["image"] != image))
                stale = stale and _grab(pool, s)
            if stale:
                _take_down(pool, sandbox, s)
                removed.append(s.id)
        have = sum(1 for s in pool.slots() if s.state == "free" and s.profile == key)
        for _ in range(max(0, size - have)):
            slot = pool.new_slot()
            one = ContainerSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__},
                                   "name": f"taskbox-pool-{home_label[:6]}-{slot.id[2:]}", "workspace": slot.ws,
                                   "labels": {LABEL_HOME: home_label, LABEL_POOL: slot.id, LABEL_POOL_PROFILE: key},
                                   "workspace_propagation": "rslave"})
            say(f"starting pool slot {slot.id}")
            try:
                cid = sandbox.create(one)
            except BaseException:
                pool.release(slot.id)
                raise
            faults.point("pool.fill")
            pool.publish(slot, cid, key)
            made.append(slot.id)
    return {"profile": key, "made": made, "removed": removed}


def drain(pool: Pool, sandbox: Sandbox, profile: str | None = None) -> list[str]:
    """Remove every free slot (of ``profile``, or all); claimed slots are their tasks' and stay.
    With no slot left, the pool root's shared mount is undone too."""
    out = []
    with pool.locked():
        for s in pool.slots():
            if s.state == "free" and (profile is None or s.profile == profile) and _grab(pool, s):
                _take_down(pool, sandbox, s)
                out.append(s.id)
        pool.close()
    return out


@dataclass
class Taken:
    """The outcome of :func:`take`: the container (None: make one cold) and why not."""

    container_id: str | None
    slot: str = ""
    error: str = ""


def take(pool: Pool, sandbox: Sandbox, spec: ContainerSpec, workspace: Path, task_id: str) -> Taken:
    """Claim a free slot of ``spec``'s profile for a task and bind its workspace into it.

    A slot whose container is not running or runs an image since rebuilt under its name, or a
    bind that fails, is removed and the answer is no container (the caller makes one cold);
    never the slot of another profile.
    """
    if not poolable(spec) or supported() or not pool.root.is_dir():
        return Taken(None)
    slot = pool.claim(key_of(spec, sandbox))
    if slot is None:
        return Taken(None)
    faults.point("pool.claim")
    try:
        info = sandbox.container_info(slot.container_id)
        if info is None or not info["running"]:
            raise SandboxError(f"the container of pool slot {slot.id} is not running")
        if info["image"] != sandbox.image_id(spec.image):
            raise SandboxError(f"pool slot {slot.id} runs an older build of {spec.image}")
        pool.bind(slot, workspace, task_id)
    except (TaskboxError, OSError) as exc:
        try:
            _take_down(pool, sandbox, slot)
        except (TaskboxError, OSError):
            pass  # left half-claimed: `taskbox doctor --fix` removes it
        return Taken(None, slot.id, str(getattr(exc, "message", exc))[:300])
    return Taken(slot.container_id, slot.id)


def rebind(pool: Pool, container_id: str, workspace: Path, task_id: str) -> bool:
    """Bind a task's workspace into its slot again (after a reboot or a lost mount) before its
    container starts; True when the task's container is a slot's and it was not bound."""
    slot = pool.of_container(container_id)
    if slot is None or slot.task_id not in ("", task_id) or pool.bound(slot, workspace):
        return False
    pool.bind(slot, workspace, task_id)
    return True


def owned_by(pool: Pool, task_id: str) -> list[Slot]:
    """The slots claimed for a task."""
    return [s for s in pool.slots() if s.task_id == task_id]
