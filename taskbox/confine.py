"""The one primitive for host-side access beneath an agent-written directory.

Everything under a task's workspace (and anything restored into it) is written by the agent
and may change at any instant: any component of a path may become a symbolic link to a
host directory between two system calls. So a path under a workspace is never checked and
then opened again. :func:`open_beneath` resolves it once, beneath an open directory
descriptor of the root, refusing every link at every component:

- ``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
  RESOLVE_NO_XDEV`` where the kernel has it (Linux 5.6+);
- else a walk component by component from the root's descriptor, each directory opened with
  ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent's descriptor.

Callers then act on the descriptor (``fstat``, bounded reads, ``*at`` calls relative to a
parent descriptor: create, rename, unlink). Agent-given names are normalised lexically
first; with every link refused, the lexical path is the real one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InvalidInput, NotFound, PathOutsideWorkspace

CONTAINER_ROOT = "/workspace"
SANDBOX_UID = 1000  # the image's unprivileged ``agent`` user

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (unified syscall table)
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV
O_PATH = getattr(os, "O_PATH", 0o10000000)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None
_have_openat2: bool | None = None


def sandbox_owner() -> tuple[int, int]:
    """The uid:gid commands run as in the container, and that owns the workspace on the host.

    Matching the host user keeps the workspace editable by them; when taskbox runs as root,
    the image's unprivileged ``agent`` user is used instead, never root.
    """
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        return SANDBOX_UID, SANDBOX_UID
    return uid, gid


def normalize(path: str | os.PathLike[str], *, allow_root: bool = True) -> str:
    """An agent-given path as a clean relative path under the workspace (``"."`` for the root).

    Accepts paths relative to the workspace, absolute ones under ``/workspace``; refuses NUL
    bytes, absolute paths elsewhere and ``..`` escapes. Purely lexical: links are refused
    later, at every component, by :func:`open_beneath`.
    """
    raw = os.fspath(path)
    if "\0" in raw:
        raise PathOutsideWorkspace(f"path {raw!r} contains a NUL byte")
    rel = raw
    if rel == CONTAINER_ROOT or rel.startswith(CONTAINER_ROOT + "/"):
        rel = rel[len(CONTAINER_ROOT):]
    elif rel.startswith("/"):
        raise PathOutsideWorkspace(f"path {raw!r} is outside the task workspace", path=raw)
    rel = posixpath.normpath(rel.lstrip("/") or ".")
    if rel == ".." or rel.startswith("../") or rel.startswith("/"):
        raise PathOutsideWorkspace(f"path {raw!r} escapes the task workspace", path=raw)
    if not allow_root and rel == ".":
        raise PathOutsideWorkspace(f"path {raw!r} is the workspace root itself", path=raw)
    return rel


def container_workdir(workdir: str | None, root: Path | None = None) -> str:
    """Map a workdir given by an agent to a path inside the container, confined to /workspace.

    The container resolves it again with its own privileges (a link there leads only around
    the sandbox's own filesystem), so this is a courtesy check: with ``root`` given, a
    workdir that is missing or goes through a link is refused with a clear error.
    """
    if not workdir:
        return CONTAINER_ROOT
    rel = normalize(workdir)
    if root is not None and rel != ".":
        with rooted(root) as rfd:
            os.close(open_dir(rfd, rel))
    return CONTAINER_ROOT if rel == "." else f"{CONTAINER_ROOT}/{rel}"


def open_root(root: Path) -> int:
    """A descriptor of the workspace root itself (taskbox made it; never a link)."""
    try:
        return os.open(root, _DIR_FLAGS)
    except FileNotFoundError as exc:
        raise NotFound(f"the task workspace {root} does not exist") from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PathOutsideWorkspace(f"the task workspace {root} is not a plain directory") from exc
        raise


@contextmanager
def rooted(root: Path) -> Iterator[int]:
    """``with rooted(ws) as rfd:`` — the root's descriptor, closed afterwards."""
    fd = open_root(root)
    try:
        yield fd
    finally:
        os.close(fd)


def _openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    global _libc, _have_openat2
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, _RESOLVE)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM) and _have_openat2 is None:
            # No openat2 here (old kernel, or a seccomp filter that refuses it): walk instead.
            _have_openat2 = False
            return _walk_open(dir_fd, rel, flags, mode)
        raise OSError(err, os.strerror(err), rel)
    _have_openat2 = True
    return int(fd)


def _walk_open(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise OSError(errno.EXDEV, "path leaves the root", rel)
    if not parts:
        return os.open(".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    cur = dir_fd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=cur)
            if cur != dir_fd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
    finally:
        if cur != dir_fd:
            os.close(cur)


def open_beneath(root_fd: int, rel: str, flags: int, mode: int = 0o644) -> int:
    """Open ``rel`` beneath ``root_fd`` following no link at any component; return the fd.

    ``rel`` must already be normalised (:func:`normalize`). Raises :class:`NotFound` when a
    component is missing, :class:`PathOutsideWorkspace` for a link or a mount crossing;
    other ``OSError`` pass through (``EISDIR``, ``ENOTDIR``, ``EEXIST``, ``ENOSPC``).
    """
    try:
        if _have_openat2 is False:
            return _walk_open(root_fd, rel, flags, mode)
        return _openat2(root_fd, rel, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NotFound(f"no file {rel!r} in the task workspace", path=rel) from exc
        if exc.errno in (errno.ELOOP, errno.EXDEV, errno.EMLINK):
            raise PathOutsideWorkspace(
                f"{rel!r} leads outside the task workspace (through a symbolic link); refusing to follow it",
                path=rel) from exc
        if exc.errno == errno.ENOTDIR and flags & os.O_DIRECTORY:
            raise InvalidInput(f"{rel!r} is not a directory", path=rel) from exc
        if exc.errno == errno.ENAMETOOLONG:
            raise InvalidInput(f"path {rel[:80]!r}… is too long ({len(rel)} bytes)", path=rel[:200]) from exc
        raise


def open_dir(root_fd: int, rel: str) -> int:
    """A directory beneath the root, opened for ``*at`` calls and listing."""
    return open_beneath(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)


def open_parent(root_fd: int, rel: str, *, create: bool = False,
                owner: tuple[int, int] | None = None) -> tuple[int, str]:
    """The parent directory of ``rel`` (opened beneath the root) and the final name.

    ``create`` makes missing directories one by one with ``mkdirat`` (given to ``owner``).
    The caller closes the returned descriptor.
    """
    parent, name = posixpath.split(rel)
    if not name or name in (".", ".."):
        raise PathOutsideWorkspace(f"{rel!r} names no file in the task workspace", path=rel)
    if not create:
        return open_dir(root_fd, parent or "."), name
    cur = os.dup(root_fd)
    try:
        for part in [p for p in parent.split("/") if p not in ("", ".")]:
            try:
                os.mkdir(part, 0o755, dir_fd=cur)
                if owner is not None:
                    os.chown(part, *owner, dir_fd=cur, follow_symlinks=False)
            except FileExistsError:
                pass
            nxt = open_beneath(cur, part, os.O_RDONLY | os.O_DIRECTORY)
            os.close(cur)
            cur = nxt
    except BaseException:
        os.close(cur)
        raise
    return cur, name


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in an open directory, or None if missing."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def read_fd(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes from an open file (never more are read or buffered)."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def is_dir(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISDIR(st.st_mode)
