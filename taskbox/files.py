"""File operations inside a task workspace, confined to it and safe against links.

Used by the memory layer, the Plan.md plugin and the agent-facing file tools. Writes are
atomic (temp file, fsync, rename, fsync of the directory); reads and writes never follow a
link out of the workspace; files written as root are handed to the sandbox user.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .confine import host_path, open_nofollow
from .errors import InvalidInput, NotFound, PathOutsideWorkspace, WorkspaceFull
from .sandbox import sandbox_owner


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, *sandbox_owner(), follow_symlinks=False)


def _mkdirs(root: Path, path: Path, hand_over: bool = True) -> None:
    missing = []
    p = path
    while not p.exists() and p != root:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        os.mkdir(d)
        if hand_over:
            _own(d)


@contextmanager
def _room(rel: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT (the workspace's disk or inode quota used up) into :class:`WorkspaceFull`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise WorkspaceFull(f"no space left in the task workspace to write {rel!r}: its disk or inode quota "
                            "is used up; delete files in it or give the task a larger quota", path=rel) from exc


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (kept under TASKBOX_HOME, out of the sandbox's reach)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_durably(path: Path, data: bytes, mode: int = 0o644, *, hand_over: bool = False) -> None:
    """Replace ``path`` atomically and durably: temp file, fsync, rename, fsync of the directory.

    ``hand_over`` gives the file to the sandbox user (for workspace files written as root).
    Workspace files go through :func:`atomic_write`, which confines the path first.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_all(fd, data)
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    if hand_over:
        _own(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write(root: Path, rel: str, data: bytes, mode: int | None = None, *,
                 hand_over: bool = True) -> Path:
    """Write ``data`` to ``rel`` under ``root`` atomically; return the host path.

    ``hand_over`` gives new files and directories to the sandbox user when taskbox runs as
    root (right in a workspace); writes into a user's own repository pass False.
    """
    target = host_path(root, rel, allow_root=False)
    if target.is_symlink():
        raise PathOutsideWorkspace(f"{rel!r} is a symbolic link; refusing to write through it")
    if target.is_dir():
        raise InvalidInput(f"{rel!r} is a directory")
    with _room(rel):
        _mkdirs(root.resolve(), target.parent, hand_over)
        if mode is None:
            mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644
        write_durably(target, data, mode, hand_over=hand_over)
    return target


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def append(root: Path, rel: str, data: bytes) -> None:
    """Append ``data`` to a file (created if missing) in one write."""
    target = host_path(root, rel, allow_root=False)
    with _room(rel):
        _mkdirs(root.resolve(), target.parent)
        fd = open_nofollow(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    _own(target)


def read_bytes(root: Path, rel: str, limit: int | None = None) -> bytes:
    """Read a workspace file without following a link; :class:`NotFound` if it is missing."""
    target = host_path(root, rel)
    try:
        fd = open_nofollow(target, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise NotFound(f"no file {rel!r} in the task workspace", path=rel) from exc
    except IsADirectoryError as exc:
        raise InvalidInput(f"{rel!r} is a directory") from exc
    except OSError as exc:  # ELOOP: the final component is a link
        raise PathOutsideWorkspace(f"{rel!r} is a symbolic link; refusing to follow it") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise InvalidInput(f"{rel!r} is not a regular file")
        return fh.read() if limit is None else fh.read(limit)


def read_optional(root: Path, rel: str) -> bytes | None:
    try:
        return read_bytes(root, rel)
    except NotFound:
        return None


def listing(root: Path, rel: str = ".", recursive: bool = False, limit: int = 5000) -> list[dict[str, Any]]:
    """Entries under a workspace directory (links are listed, never followed)."""
    base = host_path(root, rel)
    if not base.is_dir() or base.is_symlink():
        raise NotFound(f"no directory {rel!r} in the task workspace", path=rel)
    out: list[dict[str, Any]] = []
    rootr = root.resolve()
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        if ".git" in dirnames and Path(dirpath) == rootr:
            dirnames.remove(".git")
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
            entry: dict[str, Any] = {"path": p.relative_to(rootr).as_posix(), "type": kind, "size": st.st_size}
            if kind == "link":
                entry["target"] = os.readlink(p)
            out.append(entry)
            if len(out) >= limit:
                return out
        if not recursive:
            break
    return out


def delete(root: Path, rel: str) -> None:
    target = host_path(root, rel, allow_root=False)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        raise NotFound(f"no file {rel!r} in the task workspace", path=rel)
