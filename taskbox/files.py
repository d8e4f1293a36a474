"""File operations inside a task workspace, through the one primitive of :mod:`taskbox.confine`.

Used by the memory layer, the Plan.md plugin, the checkpoint engine and the agent-facing
file tools. Every path is resolved once, beneath the workspace root's descriptor, with no
link followed at any component; the work is then done on descriptors (``fstat``, bounded
reads, ``*at`` calls relative to the parent directory). Writes are atomic (temp file,
fsync, ``renameat``, fsync of the directory); files written as root are handed to the
sandbox user.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from .confine import (
    lstat_at,
    normalize,
    open_beneath,
    open_dir,
    open_parent,
    read_fd,
    rooted,
    sandbox_owner,
)
from .errors import InvalidInput, NotFound, PathOutsideWorkspace, TaskboxError, WorkspaceFull

P = ParamSpec("P")
R = TypeVar("R")
READ_LIMIT = 64 << 20  # the most any host-side read of a workspace file takes in
DIR_ENTRIES = 100_000  # the most entries of one directory a listing reads


def _owner(hand_over: bool) -> tuple[int, int] | None:
    return sandbox_owner() if hand_over and os.geteuid() == 0 else None


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


_WHAT = {errno.ENAMETOOLONG: "name is too long", errno.ENXIO: "is not a regular file (a socket or fifo?)",
         errno.EISDIR: "is a directory", errno.ENOTDIR: "goes through something that is not a directory",
         errno.ELOOP: "goes through a symbolic link", errno.EACCES: "is not accessible",
         errno.EPERM: "is not accessible", errno.EROFS: "is on a read-only filesystem",
         errno.EMLINK: "has too many links", errno.EEXIST: "already exists"}


def _translated(fn: Callable[P, R]) -> Callable[P, R]:
    """Whatever the agent made of a path, an OS error leaves here as one taskbox error line."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except TaskboxError:
            raise
        except OSError as exc:
            rel = args[1] if len(args) > 1 and isinstance(args[1], str) else kwargs.get("rel", "")
            shown = display(str(rel))[:200]
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise WorkspaceFull(f"no space left in the task workspace for {shown!r}", path=shown) from exc
            if exc.errno == errno.ENOENT:
                raise NotFound(f"no file {shown!r} in the task workspace", path=shown) from exc
            if exc.errno == errno.ELOOP:
                raise PathOutsideWorkspace(f"{shown!r} goes through a symbolic link; refusing to follow it",
                                           path=shown) from exc
            what = _WHAT.get(exc.errno or 0, f"failed: {exc.strerror}")
            raise InvalidInput(f"{shown!r} {what}", path=shown) from exc

    return wrapper


def display(name: str) -> str:
    """A file name as safe text: bytes that are not UTF-8 shown as ``\\xNN`` escapes."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _tmp_name(name: str) -> str:
    return f".{name[:64]}.{os.getpid()}.{time.monotonic_ns()}.tmp"


def _discard(tmp: str, dfd: int) -> None:
    try:
        os.unlink(tmp, dir_fd=dfd)
    except OSError:
        pass


# Descriptors (duplicated) of files and directories written while :func:`deferred_sync` is
# active, whose fsync it does once at its end; None: every write syncs itself.
_DEFERRED: ContextVar[list[int] | None] = ContextVar("taskbox_deferred_sync", default=None)


def _sync(fd: int) -> None:
    pending = _DEFERRED.get()
    if pending is None:
        os.fsync(fd)
    else:
        pending.append(os.dup(fd))


@contextmanager
def deferred_sync(root: Path) -> Iterator[None]:
    """Let the atomic writes of a block skip their fsyncs and make them all durable at its end.

    For a workspace nobody else has written yet (a create), whose files count only once the
    block has finished: a crash inside it leaves the create pending, which ``taskbox doctor``
    undoes. At the end, when ``root`` is the top of its own filesystem (a workspace volume),
    one ``syncfs`` flushes it — the files written through here and git's own alike; every
    other file and directory written is fsynced once (a directory written to several times,
    once). On an exception nothing is flushed.
    """
    pending: list[int] = []
    token = _DEFERRED.set(pending)
    ok = False
    try:
        yield
        ok = True
    finally:
        _DEFERRED.reset(token)
        try:
            if ok:
                _flush(root, pending)
        finally:
            for fd in pending:
                os.close(fd)


def _flush(root: Path, fds: list[int]) -> None:
    own_fs: int | None = None
    if os.path.ismount(root):
        rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if _syncfs(rfd):
                own_fs = os.fstat(rfd).st_dev
        finally:
            os.close(rfd)
    done: set[tuple[int, int]] = set()
    for fd in fds:
        st = os.fstat(fd)
        if st.st_dev == own_fs or (st.st_dev, st.st_ino) in done:
            continue
        os.fsync(fd)
        done.add((st.st_dev, st.st_ino))


def _syncfs(fd: int) -> bool:
    """``syncfs(2)`` of the filesystem of ``fd``; False where the C library has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.syncfs(fd) == 0)
    except (OSError, AttributeError):
        return False


def _replace_at(dfd: int, name: str, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    """Atomically replace ``name`` in the open directory ``dfd`` with ``data``."""
    tmp = _tmp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
    try:
        _write_all(fd, data)
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        if owner is not None:
            os.fchown(fd, *owner)
        _sync(fd)
    except BaseException:
        os.close(fd)
        _discard(tmp, dfd)
        raise
    os.close(fd)
    try:
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        _discard(tmp, dfd)
        raise
    _sync(dfd)


def write_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` atomically and durably: temp file, fsync, rename, fsync of the directory.

    For taskbox's own files under TASKBOX_HOME; workspace files go through :func:`atomic_write`.
    """
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _replace_at(dfd, path.name, data, mode, None)
    finally:
        os.close(dfd)


@_translated
def atomic_write(root: Path, rel: str, data: bytes, mode: int | None = None, *,
                 hand_over: bool = True) -> str:
    """Write ``data`` to ``rel`` under ``root`` atomically; return the normalised relative path.

    ``hand_over`` gives new files and directories to the sandbox user when taskbox runs as
    root (right in a workspace); writes into a user's own repository pass False.
    """
    rel = normalize(rel, allow_root=False)
    owner = _owner(hand_over)
    with rooted(root) as rfd, _room(rel):
        dfd, name = open_parent(rfd, rel, create=True, owner=owner)
        try:
            st = lstat_at(dfd, name)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise PathOutsideWorkspace(f"{rel!r} is a symbolic link; refusing to write through it", path=rel)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise InvalidInput(f"{rel!r} is a directory", path=rel)
            if mode is None:
                mode = stat.S_IMODE(st.st_mode) & 0o777 if st is not None else 0o644
            _replace_at(dfd, name, data, mode, owner)
        finally:
            os.close(dfd)
    return rel


@_translated
def append(root: Path, rel: str, data: bytes) -> None:
    """Append ``data`` to a file (created if missing) in one write."""
    rel = normalize(rel, allow_root=False)
    owner = _owner(True)
    with rooted(root) as rfd, _room(rel):
        dfd, name = open_parent(rfd, rel, create=True, owner=owner)
        try:
            # O_NONBLOCK: a fifo planted by the agent must not block the host (ENXIO instead)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, 0o644, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathOutsideWorkspace(f"{rel!r} is a symbolic link; refusing to write through it",
                                           path=rel) from exc
            raise
        finally:
            os.close(dfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidInput(f"{rel!r} is not a regular file", path=rel)
            os.set_blocking(fd, True)
            _write_all(fd, data)
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)


def _open_file(rfd: int, rel: str) -> int:
    try:
        fd = open_beneath(rfd, rel, os.O_RDONLY | os.O_NONBLOCK)  # a fifo must not block the host
    except IsADirectoryError as exc:
        raise InvalidInput(f"{rel!r} is a directory", path=rel) from exc
    except NotADirectoryError as exc:
        raise NotFound(f"no file {rel!r} in the task workspace", path=rel) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidInput(f"{rel!r} is not a regular file", path=rel)
    return fd


@_translated
def read_head(root: Path, rel: str, limit: int = READ_LIMIT) -> tuple[bytes, int]:
    """The first ``limit`` bytes of a workspace file and its size (sized before reading)."""
    rel = normalize(rel, allow_root=False)
    with rooted(root) as rfd:
        fd = _open_file(rfd, rel)
        try:
            size = os.fstat(fd).st_size
            return read_fd(fd, max(0, limit)), size
        finally:
            os.close(fd)


@_translated
def read_bytes(root: Path, rel: str, limit: int = READ_LIMIT) -> bytes:
    """Read a workspace file without following a link; at most ``limit`` bytes.

    :class:`NotFound` if it is missing; a longer file is a clear error, never a partial read
    mistaken for the whole.
    """
    data, size = read_head(root, rel, limit + 1)
    if len(data) > limit:
        raise InvalidInput(f"{rel!r} is larger than {limit} bytes ({size}); read it in parts", path=rel)
    return data


@_translated
def read_tail(root: Path, rel: str, limit: int = READ_LIMIT) -> bytes | None:
    """The last ``limit`` bytes of a workspace file (None if missing): bounded log reads."""
    rel = normalize(rel, allow_root=False)
    with rooted(root) as rfd:
        try:
            fd = _open_file(rfd, rel)
        except NotFound:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                os.lseek(fd, size - limit, os.SEEK_SET)
            return read_fd(fd, limit)
        finally:
            os.close(fd)


@_translated
def read_optional(root: Path, rel: str, limit: int = READ_LIMIT) -> bytes | None:
    try:
        return read_bytes(root, rel, limit)
    except NotFound:
        return None


@_translated
def exists(root: Path, rel: str) -> bool:
    """Whether ``rel`` exists beneath the root (reached without following a link)."""
    rel = normalize(rel)
    with rooted(root) as rfd:
        try:
            dfd, name = open_parent(rfd, rel)
        except (NotFound, PathOutsideWorkspace, InvalidInput):
            return False
        try:
            return lstat_at(dfd, name) is not None
        finally:
            os.close(dfd)


def _kind(mode: int) -> str:
    return "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "file"


@_translated
def listing(root: Path, rel: str = ".", recursive: bool = False, limit: int = 5000) -> list[dict[str, Any]]:
    """Entries under a workspace directory (links are listed, never followed).

    Depth first, like ``os.walk``, but iterative: each directory is opened afresh beneath
    the root (no link on the way), so no descriptor chain is held and no depth overflows.
    """
    rel = normalize(rel)
    out: list[dict[str, Any]] = []
    with rooted(root) as rfd:
        stack = [rel]
        first = True
        while stack:
            here = stack.pop()
            try:
                dfd = open_dir(rfd, here)
            except (NotFound, InvalidInput, PathOutsideWorkspace) as exc:
                if first:
                    raise NotFound(f"no directory {rel!r} in the task workspace", path=rel) from exc
                continue  # changed while we walked: list what is still there
            first = False
            try:
                entries: list[tuple[str, os.stat_result]] = []
                with os.scandir(dfd) as it:
                    for e in it:  # a directory of millions of entries costs a bounded read
                        if len(entries) >= DIR_ENTRIES:
                            break
                        try:
                            entries.append((e.name, e.stat(follow_symlinks=False)))
                        except FileNotFoundError:
                            continue
                prefix = "" if here == "." else here + "/"
                dirs = sorted((n, st) for n, st in entries if stat.S_ISDIR(st.st_mode))
                others = sorted((n, st) for n, st in entries if not stat.S_ISDIR(st.st_mode))
                if here == "." and rel == ".":
                    dirs = [d for d in dirs if d[0] != ".git"]
                for name, st in dirs + others:
                    kind = _kind(st.st_mode)
                    entry: dict[str, Any] = {"path": display(f"{prefix}{name}"), "type": kind,
                                             "size": st.st_size}
                    if kind == "link":
                        try:
                            entry["target"] = display(os.readlink(name, dir_fd=dfd))
                        except OSError:
                            entry["target"] = ""
                    out.append(entry)
                    if len(out) >= limit:
                        return out
                if recursive:
                    stack.extend(f"{prefix}{name}" for name, _ in reversed(dirs))
                    if len(stack) > DIR_ENTRIES:
                        return out
            finally:
                os.close(dfd)
    return out


def _empty_dir(top: int, name: str) -> None:
    """Delete everything inside the directory ``top`` without following a link, at any depth.

    The agent chooses the depth, so the walk holds neither a stack nor long paths: every
    subdirectory met below the first level is first moved up into ``top`` (``renameat``
    between two descriptors, same filesystem) and emptied from there, so each directory is
    opened one name beneath ``top`` and no more than two descriptors are open at once.
    """
    pending = ["."]
    moved = 0
    rounds = 0
    while pending:
        rounds += 1
        if rounds > 50_000_000:
            raise TaskboxError(f"{name!r} kept changing while it was being deleted; try again")
        d = pending.pop()
        if d == ".":
            fd = os.dup(top)
        else:
            try:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                os.unlink(d, dir_fd=top)  # became a link or a file meanwhile: remove just that
                continue
        try:
            with os.scandir(fd) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for child, is_dir in entries:
                if not is_dir:
                    try:
                        os.unlink(child, dir_fd=fd)
                        continue
                    except FileNotFoundError:
                        continue
                    except IsADirectoryError:
                        pass
                if d == ".":
                    pending.append(child)
                    continue
                moved += 1
                flat = f".taskbox-rm-{os.getpid()}-{moved}"
                try:
                    os.rename(child, flat, src_dir_fd=fd, dst_dir_fd=top)
                    pending.append(flat)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
        if d != ".":
            try:
                os.rmdir(d, dir_fd=top)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                pending.append(d)  # something appeared meanwhile: empty it again


def _rmtree_at(dfd: int, name: str) -> None:
    """Remove the directory ``name`` in ``dfd`` and everything in it, without following links."""
    for _ in range(100):
        try:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            os.unlink(name, dir_fd=dfd)
            return
        try:
            _empty_dir(sub, name)
        finally:
            os.close(sub)
        try:
            os.rmdir(name, dir_fd=dfd)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
    raise TaskboxError(f"{name!r} kept changing while it was being deleted; try again")


@_translated
def remove_tree(path: Path) -> None:
    """Delete a whole tree at a host path whose parent taskbox owns (a workspace)."""
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_at(dfd, path.name)
    finally:
        os.close(dfd)


def remove_at(dfd: int, name: str) -> bool:
    """Remove ``name`` (file, link or whole directory tree) from the open directory ``dfd``."""
    st = lstat_at(dfd, name)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode):
        _rmtree_at(dfd, name)
        return True
    try:
        os.unlink(name, dir_fd=dfd)
    except IsADirectoryError:
        _rmtree_at(dfd, name)
    return True


@_translated
def delete(root: Path, rel: str) -> str:
    """Delete a file, link or directory tree in the workspace; return the normalised path."""
    rel = normalize(rel, allow_root=False)
    with rooted(root) as rfd:
        try:
            dfd, name = open_parent(rfd, rel)
        except (NotFound, InvalidInput) as exc:
            raise NotFound(f"no file {rel!r} in the task workspace", path=rel) from exc
        try:
            if not remove_at(dfd, name):
                raise NotFound(f"no file {rel!r} in the task workspace", path=rel)
        finally:
            os.close(dfd)
    return rel


# --- ownership ------------------------------------------------------------------------------

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OWNERSHIP_WALK_LIMIT = 200_000  # entries looked at per workspace; a bigger one is checked that far


def foreign_owned(root: Path, owner: tuple[int, int], *, fix: bool = False,
                  limit: int = OWNERSHIP_WALK_LIMIT) -> tuple[list[str], int]:
    """Entries under ``root`` not owned by ``owner`` (uid, gid): up to 20 of their paths, and
    how many there are; with ``fix`` each is given to ``owner`` (``fchownat`` with
    ``AT_SYMLINK_NOFOLLOW``: a link itself, never its target).

    A bounded walk on descriptors (directories opened relative to their parent, ``O_NOFOLLOW``),
    at most ``limit`` entries; mounts inside (another device) are not entered.
    """
    shown: list[str] = []
    count = 0
    seen = 0
    with rooted(root) as rfd:
        top = os.fstat(rfd)
        if (top.st_uid, top.st_gid) != owner:
            count += 1
            shown.append(".")
            if fix:
                os.fchown(rfd, *owner)
        stack: list[tuple[int, str]] = [(os.dup(rfd), "")]
        try:
            while stack and seen < limit:
                dfd, rel = stack.pop()
                try:
                    with os.scandir(dfd) as it:
                        names = [e.name for e in it]
                    for name in names:
                        seen += 1
                        if seen > limit:
                            break
                        try:
                            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # gone meanwhile
                        path = f"{rel}/{name}" if rel else name
                        if (st.st_uid, st.st_gid) != owner:
                            count += 1
                            if len(shown) < 20:
                                shown.append(path)
                            if fix:
                                try:
                                    os.chown(name, *owner, dir_fd=dfd, follow_symlinks=False)
                                except FileNotFoundError:
                                    pass
                        if stat.S_ISDIR(st.st_mode) and st.st_dev == top.st_dev:
                            try:
                                stack.append((os.open(name, _DIR_OPEN, dir_fd=dfd), path))
                            except OSError as exc:
                                if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                                    raise  # replaced by a link meanwhile: not followed
                finally:
                    os.close(dfd)
        finally:
            for dfd, _rel in stack:
                os.close(dfd)
    return shown, count
