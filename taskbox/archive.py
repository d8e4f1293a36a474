"""Tar archives in and out of a workspace, without ever following a link out of it.

:func:`safe_extract` is the one way taskbox unpacks an archive (checkpoint import, any
archive an agent hands over). Every member is checked before anything is written, and the
whole archive is refused if one member is unsafe:

* names that are absolute, contain ``..`` after normalisation, or contain NUL;
* devices, FIFOs and other special files;
* hard links to anything but a regular file earlier in the same archive;
* symbolic links whose target would leave the destination (absolute, or ``..`` past the
  top) — unless ``symlinks="any"``, for restores that must reproduce e.g. a virtualenv's
  absolute links: those are then *created* but never followed;
* "link-then-file": a member whose parent path is a symbolic link (in the archive or
  already on disk), which would write through the link.

Extraction then walks the destination with directory file descriptors opened with
``O_NOFOLLOW`` and creates files with ``O_EXCL | O_NOFOLLOW``, so a link swapped in by a
running container while extracting is not followed either. set-uid/set-gid bits are dropped.

:func:`pack` writes a directory tree into a tar, storing links as links (never their
targets' contents) and skipping special files.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from .errors import UnsafeArchive

MAX_MEMBERS = 1_000_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class ExtractResult:
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0


def _clean_name(name: str) -> str:
    if "\0" in name:
        raise UnsafeArchive(f"archive member {name!r} contains a NUL byte", member=name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute name", member=name)
    norm = posixpath.normpath(name)
    if norm in ("", ".") and name.rstrip("/") in ("", "."):
        return "."
    parts = norm.split("/")
    if ".." in parts or norm.startswith("/"):
        raise UnsafeArchive(f"archive member {name!r} escapes the destination with ..", member=name)
    return norm


def _link_stays_inside(member: str, target: str) -> bool:
    if target.startswith("/") or "\0" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(member), target))
    return joined != ".." and not joined.startswith("../") and not joined.startswith("/")


def check_members(members: list[tarfile.TarInfo], symlinks: Literal["inside", "any", "none"] = "inside") -> list[
        tuple[str, tarfile.TarInfo]]:
    """Validate every member; return ``(clean name, member)`` pairs or raise :class:`UnsafeArchive`."""
    if len(members) > MAX_MEMBERS:
        raise UnsafeArchive(f"archive has {len(members)} members; the limit is {MAX_MEMBERS}")
    out: list[tuple[str, tarfile.TarInfo]] = []
    links: set[str] = set()
    regular: set[str] = set()
    for m in members:
        name = _clean_name(m.name)
        if name == "." and not m.isdir():
            raise UnsafeArchive(f"archive member {m.name!r} would replace the destination", member=m.name)
        parents = name.split("/")[:-1]
        for i in range(1, len(parents) + 1):
            if "/".join(parents[:i]) in links:
                raise UnsafeArchive(f"archive member {m.name!r} would be written through the link "
                                    f"{'/'.join(parents[:i])!r}", member=m.name)
        if m.issym():
            if symlinks == "none":
                raise UnsafeArchive(f"archive member {m.name!r} is a symbolic link", member=m.name)
            if symlinks == "inside" and not _link_stays_inside(name, m.linkname):
                raise UnsafeArchive(f"archive member {m.name!r} links outside the destination "
                                    f"({m.linkname!r})", member=m.name)
            links.add(name)
            regular.discard(name)
        elif m.islnk():
            target = _clean_name(m.linkname)
            if target not in regular:
                raise UnsafeArchive(f"archive member {m.name!r} is a hard link to {m.linkname!r}, which is not "
                                    "a regular file earlier in the archive", member=m.name)
            regular.add(name)
        elif m.isreg():
            regular.add(name)
            links.discard(name)
        elif m.isdir():
            if name in links:
                raise UnsafeArchive(f"archive member {m.name!r} turns a link into a directory", member=m.name)
        else:
            kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "FIFO"}.get(m.type, f"special file (type {m.type!r})")
            raise UnsafeArchive(f"archive member {m.name!r} is a {kind}", member=m.name)
        out.append((name, m))
    return out


def safe_extract(source: str | Path | IO[bytes], dest: str | Path, *,
                 symlinks: Literal["inside", "any", "none"] = "inside",
                 max_bytes: int | None = None) -> ExtractResult:
    """Extract the tar at ``source`` (path or file object, any compression) into ``dest``.

    Raises :class:`UnsafeArchive` before writing anything if any member is unsafe (see the
    module docstring), or part-way if the destination changes under it (a link appears).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(source, "r:*") if isinstance(source, str | Path) else tarfile.open(fileobj=source,
                                                                                            mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UnsafeArchive(f"not a readable tar archive: {exc}") from exc
    result = ExtractResult()
    with tar:
        members = check_members(tar.getmembers(), symlinks)
        total = sum(m.size for _n, m in members if m.isreg())
        if max_bytes is not None and total > max_bytes:
            raise UnsafeArchive(f"archive expands to {total} bytes; the limit is {max_bytes}")
        root_fd = os.open(dest, _DIR_FLAGS)
        try:
            hardlinks: list[tuple[str, str]] = []
            for name, m in members:
                if name == ".":
                    continue
                parent_fd = _open_parents(root_fd, name)
                base = name.rsplit("/", 1)[-1]
                try:
                    if m.isdir():
                        _make_dir(parent_fd, base, m.mode)
                        result.dirs += 1
                    elif m.issym():
                        _replace(parent_fd, base)
                        os.symlink(m.linkname, base, dir_fd=parent_fd)
                        result.links += 1
                    elif m.islnk():
                        hardlinks.append((name, _clean_name(m.linkname)))
                    else:
                        fh = tar.extractfile(m)
                        assert fh is not None
                        result.bytes += _write_file(parent_fd, base, fh, m.mode)
                        result.files += 1
                finally:
                    os.close(parent_fd)
            for name, target in hardlinks:
                # Copied, not linked: a hard link would tie two workspace paths to one inode.
                src_parent = _open_parents(root_fd, target)
                dst_parent = _open_parents(root_fd, name)
                try:
                    src = os.open(target.rsplit("/", 1)[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=src_parent)
                    with os.fdopen(src, "rb") as fh:
                        mode = os.fstat(fh.fileno()).st_mode
                        result.bytes += _write_file(dst_parent, name.rsplit("/", 1)[-1], fh, mode)
                    result.files += 1
                finally:
                    os.close(src_parent)
                    os.close(dst_parent)
        finally:
            os.close(root_fd)
    return result


def _open_parents(root_fd: int, name: str) -> int:
    """A directory fd for ``name``'s parent, walking from ``root_fd`` without following links."""
    fd = os.dup(root_fd)
    for part in name.split("/")[:-1]:
        try:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:  # ELOOP / ENOTDIR: a link or a file where a directory should be
            os.close(fd)
            raise UnsafeArchive(f"{name!r}: {part!r} on the way is not a plain directory (a link?)",
                                member=name) from exc
        os.close(fd)
        fd = nxt
    return fd


def _replace(parent_fd: int, base: str) -> None:
    """Remove whatever non-directory sits at ``base`` (a link is removed, never followed)."""
    try:
        st = os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeArchive(f"{base!r} exists as a directory; refusing to replace it with a file", member=base)
    os.unlink(base, dir_fd=parent_fd)


def _make_dir(parent_fd: int, base: str, mode: int) -> None:
    try:
        st = os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.mkdir(base, (mode & 0o777) | 0o700, dir_fd=parent_fd)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeArchive(f"{base!r} exists and is not a directory (a link?)", member=base)


def _write_file(parent_fd: int, base: str, fh: IO[bytes], mode: int) -> int:
    _replace(parent_fd, base)
    fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=parent_fd)
    written = 0
    try:
        while chunk := fh.read(1 << 20):
            os.write(fd, chunk)
            written += len(chunk)
        os.fchmod(fd, mode & 0o777)  # set-uid, set-gid and sticky bits are dropped
    finally:
        os.close(fd)
    return written


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        for name in [*sorted(dirnames), *sorted(filenames)]:
            yield base / name


def pack(root: str | Path, out: str | Path | IO[bytes], *, arcname: str = ".", compress: bool = True) -> int:
    """Write the tree at ``root`` to a tar (gzip unless ``compress=False``); return members written.

    Symbolic links are stored as links — the file a link points at, inside or outside the
    tree, is never read. Sockets, FIFOs and devices are skipped.
    """
    root = Path(root)
    if isinstance(out, str | Path):
        tar = tarfile.open(out, "w:gz") if compress else tarfile.open(out, "w")
    else:
        tar = tarfile.open(fileobj=out, mode="w:gz") if compress else tarfile.open(fileobj=out, mode="w")
    count = 0
    with tar:
        for path in _walk(root):
            st = os.lstat(path)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                continue
            name = posixpath.normpath(posixpath.join(arcname, path.relative_to(root).as_posix()))
            info = tar.gettarinfo(str(path), arcname=name)  # lstat-based: a link stays a link
            info.mode &= 0o777
            if info.isreg():
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
            count += 1
    return count
