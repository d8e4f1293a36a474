"""Disk and inode quotas of task workspaces: each workspace is a filesystem of its own.

A task's workspace (``$TASKBOX_HOME/workspaces/<task>``) is the mount point of a sparse
ext4 image (``$TASKBOX_HOME/volumes/<task>.img``) made with a fixed inode count and a small
root-only reserve (:func:`reserve`), mounted through a loop device with ``nosuid,nodev``
before the clone is made into it. A sandbox that fills it gets ``ENOSPC`` inside; on the host the image takes at
most its size. The image lies outside every workspace, so no sandbox can reach it.

This works on any Linux host where taskbox runs as root and loop devices exist (a plain
ext4 host needs no project-quota support). Mount state is read from
``/proc/self/mountinfo`` and the loop device's backing file in ``/sys``, never inferred
from the workspace's content, which the agent writes. The directory under the mount point
is left empty, mode 000 and (where the filesystem allows) immutable, so a write to a
workspace that is not mounted (e.g. after a reboot) fails instead of landing on the host.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config
from .errors import InvalidInput, VolumeError
from .liveness import pid_alive

MIN_BYTES = 64 * 1024**2
MIN_INODES = 1000
BYTES_PER_INODE = 4096  # at most one inode per 4 KiB of quota (ext4 needs room for its inode tables)
MOUNT_OPTIONS = "loop,nosuid,nodev"
DISABLE_HINT = 'set workspace_quota = "0" (TASKBOX_WORKSPACE_QUOTA=0) for plain directories without a quota'

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x10


def parse_size(value: str | int, what: str = "disk quota") -> int:
    """Parse ``64m``/``10g``/bytes into bytes; ``0`` means no quota, anything else is at least 64m."""
    size = config.parse_size(value, what)
    if size != 0 and size < MIN_BYTES:
        raise InvalidInput(f"{what} {value!r} is below the minimum of 64m")
    return size


def check_inodes(value: int, size: int, what: str = "inode quota") -> int:
    """Validate an inode count for a volume of ``size`` bytes (``0``: the filesystem's default)."""
    if value < 0 or 0 < value < MIN_INODES:
        raise InvalidInput(f"{what} {value} is below the minimum of {MIN_INODES}")
    if size and value > size // BYTES_PER_INODE:
        raise InvalidInput(f"{what} {value} is too many for a disk quota of {human(size)} "
                           f"(at most one inode per {BYTES_PER_INODE // 1024} KiB: {size // BYTES_PER_INODE})")
    return value


def reserve(size: int) -> int:
    """Bytes of a volume only root may use: taskbox's own bookkeeping (memory, Plan.md, commits).

    The sandbox never runs as root, so a task that fills its disk still leaves taskbox room to
    record state and logs: 1/64 of the volume, at most 16 MiB (1 MiB of a 64 MiB one).
    """
    return min(size // 64, 16 * 1024**2)


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" or value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# --- reading mount state ------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``, with the loop device's backing file if it has one."""

    mountpoint: str
    device: str  # major:minor
    fstype: str
    source: str
    backing_file: str | None


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _backing_file(device: str) -> str | None:
    try:
        text = Path(f"/sys/dev/block/{device}/loop/backing_file").read_text().rstrip("\n")
    except OSError:
        return None
    return text.removesuffix(" (deleted)")


def mounts() -> list[Mount]:
    """Every mount this process sees, in mount order (a later one covers an earlier one)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 2:
                continue
            out.append(Mount(_unescape(fields[4]), fields[2], tail[0], _unescape(tail[1]), None))
    return out


def mount_at(mountpoint: Path) -> Mount | None:
    """The mount visible at ``mountpoint`` (the topmost one), or None."""
    target = os.path.realpath(mountpoint)
    found = [m for m in mounts() if m.mountpoint == target]
    if not found:
        return None
    top = found[-1]
    return Mount(top.mountpoint, top.device, top.fstype, top.source, _backing_file(top.device))


def is_mounted(image: Path, mountpoint: Path) -> bool:
    """Whether ``image`` (through a loop device) is what is mounted at ``mountpoint``.

    Called on every host-side use of a workspace, so it asks the kernel directly (a few
    microseconds): the directory must be a mount root whose device is a loop device backed
    by ``image``. :func:`mount_at` reads the whole mount table.
    """
    try:
        st = os.stat(mountpoint)
        parent = os.stat(os.path.dirname(os.path.realpath(mountpoint)))
    except OSError:
        return False
    if st.st_dev == parent.st_dev:
        return False  # not a mount point: the bare directory underneath
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    return _backing_file(device) == os.path.realpath(image)


def loop_devices(image: Path) -> list[str]:
    """The loop devices (``/dev/loopN``) attached to ``image``; empty once it is released."""
    real = os.path.realpath(image)
    out = []
    for d in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (d / "loop" / "backing_file").read_text().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue
        if backing == real:
            out.append(f"/dev/{d.name}")
    return out


def usage(mountpoint: Path) -> dict[str, int]:
    """Space and inodes used and available on the volume mounted at ``mountpoint`` (statvfs)."""
    st = os.statvfs(mountpoint)
    return {"bytes_used": (st.f_blocks - st.f_bfree) * st.f_frsize, "bytes_limit": st.f_blocks * st.f_frsize,
            "bytes_available": st.f_bavail * st.f_frsize,  # to the sandbox: without root's reserve
            "inodes_used": st.f_files - st.f_ffree, "inodes_limit": st.f_files}


def free_space(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``directory``."""
    d = directory
    while not d.exists() and d != d.parent:
        d = d.parent
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


# --- making, mounting and releasing volumes ----------------------------------------------------


def check_supported() -> None:
    """Raise :class:`VolumeError` (saying how to turn quotas off) if volumes cannot be made here."""
    if os.geteuid() != 0:
        raise VolumeError(f"workspace quotas need taskbox to run as root (each workspace is a mounted "
                          f"filesystem image); run it as root, or {DISABLE_HINT}")
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            raise VolumeError(f"workspace quotas need {tool} (e2fsprogs / util-linux); install it, or {DISABLE_HINT}")


def check_room(directory: Path, size: int) -> None:
    """Refuse a volume larger than the free space of the host filesystem that would hold it."""
    free = free_space(directory)
    if size > free:
        raise InvalidInput(f"a disk quota of {human(size)} is more than the {human(free)} free on the host "
                           f"filesystem of {directory}; ask for less (--disk) or free some space")


def _new_image(image: Path) -> int:
    try:
        return os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise VolumeError(f"a workspace volume {image} already exists; `taskbox doctor --fix` removes "
                          "leftovers") from None
    except OSError as exc:
        raise VolumeError(f"could not create the workspace volume {image}: {exc.strerror}") from exc


def _mkfs(fd: int, image: Path, size: int, inodes: int, owner: tuple[int, int]) -> None:
    """Give the new, open image file ``fd`` its size and an empty ext4 filesystem."""
    try:
        os.ftruncate(fd, size)  # sparse: the host pays only for what is written
    finally:
        os.close(fd)
    uid, gid = owner
    argv = ["mkfs.ext4", "-q", "-F", "-m", f"{100 * reserve(size) / size:.4f}", "-E",
            f"root_owner={uid}:{gid},lazy_itable_init=1,lazy_journal_init=1"]
    if inodes:
        argv += ["-N", str(inodes)]
    _run([*argv, str(image)], f"could not make the filesystem of {image}")


def create_volume(image: Path, mountpoint: Path, size: int, inodes: int, owner: tuple[int, int], *,
                  spares: Path | None = None) -> None:
    """Make a ``size``-byte ext4 image with ``inodes`` inodes and mount it (empty) at ``mountpoint``.

    The filesystem's root belongs to ``owner`` (uid, gid), the sandbox user. ``spares``: the
    volumes directory whose spare images (:func:`make_spares`) of this profile may be taken
    instead of making one (a rename, not a ``mkfs``). On any failure nothing is left behind:
    no image, no mount, no loop device.
    """
    check_supported()
    check_room(image.parent, size)
    image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    spare = spares is not None and _take_spare(spares, size, inodes, owner, image)
    fd = -1 if spare else _new_image(image)
    try:
        if not spare:
            _mkfs(fd, image, size, inodes, owner)
        _prepare_mountpoint(mountpoint, must_be_empty=True)
        try:
            _mount(image, mountpoint)
        except VolumeError as exc:  # e.g. no loop devices, or no CAP_SYS_ADMIN: say how to do without
            raise VolumeError(f"{exc.message}; or {DISABLE_HINT}", **exc.details) from exc
        try:
            os.rmdir(mountpoint / "lost+found")  # the sandbox's files only; e2fsck makes it again if needed
        except FileNotFoundError:
            pass
    except BaseException:
        try:
            release(image, mountpoint)
        except (VolumeError, OSError):
            pass
        raise


# Spare volumes: images made (mkfs) ahead by the warm pool's filler, unmounted, one directory
# per profile: volumes/spare/<size>-<inodes>-<uid>-<gid>/<name>.img. A create takes one with
# two renames (to a claim name — of two takers exactly one succeeds — then to the task's
# image). A filler's ``.fill.<pid>.*`` and a taker's ``.claim.<pid>.*`` left by a process
# that died are removed by the next filler (:func:`make_spares`, run by the housekeeping
# tick, so by `taskbox doctor` too). A spare holds an empty filesystem, nothing of any task.
SPARES = "spare"


def _spare_dir(volumes: Path, size: int, inodes: int, owner: tuple[int, int]) -> Path:
    return volumes / SPARES / f"{size}-{inodes}-{owner[0]}-{owner[1]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _take_spare(volumes: Path, size: int, inodes: int, owner: tuple[int, int], image: Path) -> bool:
    """Move a spare image of this profile to ``image``; False when there is none."""
    folder = _spare_dir(volumes, size, inodes, owner)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".img"))
    except FileNotFoundError:
        return False
    if os.path.lexists(image):
        raise VolumeError(f"a workspace volume {image} already exists; `taskbox doctor --fix` removes "
                          "leftovers")
    for name in names:
        claim = folder / f".claim.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.rename(folder / name, claim)
        except FileNotFoundError:
            continue  # another create took it first
        try:
            os.rename(claim, image)
            _fsync_dir(image.parent)  # the task's image is durable before its create is recorded
        except OSError:
            claim.unlink(missing_ok=True)
            return False
        return True
    return False


def make_spares(volumes: Path, size: int, inodes: int, owner: tuple[int, int], count: int) -> dict[str, int]:
    """Keep ``count`` spare images of this profile (``mkfs`` done ahead, so a create only mounts
    one); first remove what fillers and takers that died left behind, and the spares of other
    profiles (the settings changed). Returns ``{"made": n, "removed": n}``."""
    check_supported()
    mine = _spare_dir(volumes, size, inodes, owner)
    removed = _tidy_spares(volumes, mine)
    mine.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = 0
    while len([n for n in os.listdir(mine) if n.endswith(".img")]) < count:
        check_room(mine, size)
        token = secrets.token_hex(6)
        tmp = mine / f".fill.{os.getpid()}.{token}.tmp"
        fd = _new_image(tmp)
        try:
            _mkfs(fd, tmp, size, inodes, owner)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.rename(tmp, mine / f"{token}.img")
            _fsync_dir(mine)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        made += 1
    return {"made": made, "removed": removed}


def _tidy_spares(volumes: Path, keep: Path | None) -> int:
    """Delete what dead fillers and takers left, and every spare not in ``keep`` (a profile's
    directory, or None: all of them); a taker holding one has renamed it away already.
    Returns how many files went."""
    root = volumes / SPARES
    if not root.is_dir():
        return 0
    removed = 0
    for folder in list(root.iterdir()):
        for entry in list(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else [folder]:
            parts = entry.name.split(".")
            dead = (entry.name.startswith((".fill.", ".claim.")) and len(parts) > 2 and parts[2].isdigit()
                    and not pid_alive(int(parts[2])))
            if dead or (folder != keep and entry.name.endswith(".img")):
                entry.unlink(missing_ok=True)
                removed += 1
        if folder != keep and folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def drain_spares(volumes: Path) -> int:
    """Delete every spare image, and what dead fillers and takers left; how many files went."""
    return _tidy_spares(volumes, None)


def ensure_mounted(image: Path, mountpoint: Path) -> bool:
    """Mount ``image`` at ``mountpoint`` unless it already is; True if it was mounted now."""
    if is_mounted(image, mountpoint):
        return False
    with _locked(image):
        if is_mounted(image, mountpoint):
            return False  # another process mounted it while we waited
        other = mount_at(mountpoint)
        if other is not None:
            raise VolumeError(f"{mountpoint} has another filesystem mounted on it ({other.source}); "
                              "unmount it so the task's volume can be mounted")
        _prepare_mountpoint(mountpoint, must_be_empty=False)
        _mount(image, mountpoint)
        return True


def unmount(image: Path, mountpoint: Path) -> bool:
    """Unmount ``image`` from ``mountpoint`` and keep the image (e.g. to move it to the trash)."""
    did = False
    real = os.path.realpath(image)
    with _locked(image, missing_ok=True):
        while (m := mount_at(mountpoint)) is not None:
            if m.backing_file != real:
                raise VolumeError(f"{mountpoint} has another filesystem mounted on it ({m.source}); "
                                  "taskbox leaves it alone")
            _run(["umount", str(mountpoint)], f"could not unmount the workspace volume at {mountpoint}")
            did = True
    _set_immutable(mountpoint, False)
    return did


def release(image: Path, mountpoint: Path) -> bool:
    """Unmount the volume at ``mountpoint`` and delete ``image``; True if anything was there.

    Only mounts of ``image`` itself are unmounted; anything else mounted there is refused.
    The directory under the mount point is made removable again (no longer immutable).
    """
    did = False
    real = os.path.realpath(image)
    with _locked(image, missing_ok=True):
        while (m := mount_at(mountpoint)) is not None:
            if m.backing_file != real:
                raise VolumeError(f"{mountpoint} has another filesystem mounted on it ({m.source}); "
                                  "taskbox leaves it alone")
            _run(["umount", str(mountpoint)], f"could not unmount the workspace volume at {mountpoint}")
            did = True
        try:
            os.unlink(image)
            did = True
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise VolumeError(f"could not delete the workspace volume {image}: {exc.strerror}") from exc
    _set_immutable(mountpoint, False)
    return did


def release_all(volumes: Path, workspaces: Path) -> list[str]:
    """Release every volume in ``volumes`` and whatever is mounted at ``workspaces/<name>``.

    For tearing down a whole throw-away ``TASKBOX_HOME`` (tests, benchmarks) once its
    containers are gone; a task's own volume is released by its cleanup. Returns the names
    released.
    """
    names = {p.name.removesuffix(".img") for p in volumes.glob("*.img")} if volumes.is_dir() else set()
    if workspaces.is_dir():
        names |= {p.name for p in workspaces.iterdir()}
    return [name for name in sorted(names) if release(volumes / f"{name}.img", workspaces / name)]


# --- helpers ------------------------------------------------------------------------------------


@contextmanager
def _locked(image: Path, missing_ok: bool = False) -> Iterator[None]:
    """Serialise mounting and releasing one volume across threads and processes (flock on the image)."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if not missing_ok:
            raise VolumeError(f"the workspace volume {image} is missing (see `taskbox doctor`)") from None
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _prepare_mountpoint(mountpoint: Path, *, must_be_empty: bool) -> None:
    """An empty, mode 000, immutable directory to mount on (writes to it fail while unmounted)."""
    try:
        mountpoint.mkdir(mode=0o000, parents=True)
    except FileExistsError:
        st = os.lstat(mountpoint)
        if not stat.S_ISDIR(st.st_mode):
            raise VolumeError(f"{mountpoint} is not a directory, so the workspace volume cannot be "
                              "mounted there") from None
        if must_be_empty and any(os.scandir(mountpoint)):
            raise VolumeError(f"{mountpoint} is not empty, so the workspace volume cannot be mounted "
                              "there") from None
    _set_immutable(mountpoint, False)  # an immutable directory cannot even be chmod-ed
    os.chmod(mountpoint, 0o000)
    _set_immutable(mountpoint, True)


def _set_immutable(path: Path, on: bool) -> None:
    """Set or clear the immutable attribute (chattr +i) of an unmounted directory; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        new = flags | _FS_IMMUTABLE_FL if on else flags & ~_FS_IMMUTABLE_FL
        if new != flags:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", new))
    except OSError:
        pass  # a filesystem without attributes: mode 000 and the mount checks remain
    finally:
        os.close(fd)


def _mount(image: Path, mountpoint: Path) -> None:
    argv = ["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(mountpoint)]
    for attempt in range(3):
        try:
            _run(argv, f"could not mount the workspace volume {image}")
            return
        except VolumeError as exc:
            # Two processes setting up loop devices at once can collide on the same free one.
            if "loop" not in exc.message or attempt == 2:
                if "loop" in exc.message:
                    raise VolumeError(f"{exc.message} (are loop devices available? `modprobe loop`)",
                                      **exc.details) from exc
                raise


def _run(argv: list[str], what: str) -> str:
    env: dict[str, Any] = {**os.environ, "LC_ALL": "C"}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    except FileNotFoundError:
        raise VolumeError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise VolumeError(f"{what}: {argv[0]} did not finish in 120 s") from None
    if proc.returncode != 0:
        # The first line says what failed; later ones are hints such as "dmesg(1) may have more".
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = lines[0].rstrip(".") if lines else f"exit code {proc.returncode}"
        raise VolumeError(f"{what}: {detail}", command=argv[0], returncode=proc.returncode)
    return proc.stdout
