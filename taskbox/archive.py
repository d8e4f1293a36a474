"""Tar archives in and out of a workspace, bounded, and without ever following a link out of it.

:func:`members` is the one way taskbox reads an archive (checkpoint import, :func:`safe_extract`,
any archive an agent hands over): it streams the archive once, checks every member as it
comes, and refuses the whole archive if one member is unsafe:

* names that are absolute, contain ``..`` after normalisation, contain NUL, or are longer
  than ``PATH_MAX``; a name that appears twice;
* devices, FIFOs, sparse files and other special files;
* hard links to anything but a regular file earlier in the same archive (or any hard
  link, when the caller asks for none);
* symbolic links whose target would leave the destination (absolute, or ``..`` past the
  top) — unless ``symlinks="any"``, for restores that must reproduce e.g. a virtualenv's
  absolute links: those are then *created* but never followed;
* a member whose path passes through a link or a regular file of the archive, in either
  order ("link-then-file").

It is also **bounded while it streams**, so a decompression bomb costs little: the bytes the
archive expands to are counted as they are decompressed, and each member's declared size
is counted from its header *before* its data is read, against :class:`Limits` — total
expanded bytes, number of members, and expansion ratio (expanded / compressed). Metadata
headers (pax, GNU long names) larger than :data:`META_LIMIT` are refused before they are
read into memory.

:func:`safe_extract` validates the whole archive first (nothing written), then extracts it
walking the destination with directory file descriptors opened with ``O_NOFOLLOW`` and
creating files with ``O_EXCL | O_NOFOLLOW``, so a link swapped in by a running container
while extracting is not followed either. set-uid/set-gid bits are dropped.

:func:`pack` writes a directory tree into a tar, storing links as links (never their
targets' contents) and skipping special files.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast

from .errors import InvalidInput, UnsafeArchive

MAX_MEMBERS = 1_000_000
MAX_NAME = 4096  # PATH_MAX: a longer name is not a file anyone meant to write
META_LIMIT = 1 << 20  # a pax or GNU long-name header bigger than this is an attack, not metadata
# Tar framing (512-byte headers, 10 KiB records) makes tiny archives expand many times over;
# the ratio limit applies only to archives expanding past this.
RATIO_ALLOWANCE = 16 * 1024**2
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_UNREADABLE = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, RecursionError, ValueError)
Symlinks = Literal["inside", "any", "none"]


@dataclass(frozen=True)
class Limits:
    """How far an archive may expand: total bytes, members, and expanded/compressed ratio."""

    max_bytes: int = 10 * 1024**3
    max_members: int = MAX_MEMBERS
    max_ratio: float = 100.0

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(int(settings.archive_max_bytes), int(settings.archive_max_members),
                   float(settings.archive_max_ratio))

    def budget(self, compressed: int | None) -> tuple[int, str]:
        """The most bytes an archive of ``compressed`` bytes may expand to, and which limit that is."""
        if compressed is not None and self.max_ratio > 0:
            by_ratio = max(int(compressed * self.max_ratio), RATIO_ALLOWANCE)
            if by_ratio < self.max_bytes:
                return by_ratio, (f"{compressed} bytes may expand at most {self.max_ratio:g}-fold "
                                  "(setting archive_max_ratio)")
        return self.max_bytes, f"the limit is {self.max_bytes} bytes (setting archive_max_bytes)"


@dataclass
class ExtractResult:
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0


def _clean_name(name: str) -> str:
    if "\0" in name:
        raise UnsafeArchive(f"archive member {name[:200]!r} contains a NUL byte", member=name[:200])
    if len(name.encode(errors="surrogateescape")) > MAX_NAME:
        raise UnsafeArchive(f"archive member {name[:100]!r}… has a name longer than {MAX_NAME} bytes",
                            member=name[:200])
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute name", member=name)
    norm = posixpath.normpath(name)
    if norm in ("", ".") and name.rstrip("/") in ("", "."):
        return "."
    parts = norm.split("/")
    if ".." in parts or norm.startswith("/"):
        raise UnsafeArchive(f"archive member {name!r} climbs out of the destination with ..", member=name)
    return norm


def _link_stays_inside(member: str, target: str, root: str) -> bool:
    if target.startswith("/") or "\0" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(member), target))
    if root:
        return joined == root or joined.startswith(root + "/")
    return joined != ".." and not joined.startswith("../") and not joined.startswith("/")


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])


class Checker:
    """Checks members one at a time, as they stream by (see the module docstring).

    :meth:`check` refuses what it can tell from a member and those before it; :meth:`finish`,
    once every member was seen, refuses a path through a link or file that came *later*.
    ``root`` (e.g. ``"workspace"``) is the sub-tree links must stay in.
    """

    def __init__(self, limits: Limits, budget: tuple[int, str], *, symlinks: Symlinks = "inside",
                 hardlinks: bool = True, root: str = "") -> None:
        self.limits = limits
        self.budget, self.why = budget
        self.symlinks = symlinks
        self.hardlinks = hardlinks
        self.root = root
        self.count = 0
        self.declared = 0
        self.seen: dict[str, str] = {}  # clean name -> "d" (directory), "f" (regular file) or "l" (link)

    def check(self, m: tarfile.TarInfo) -> str:
        """Validate one member; return its clean name or raise :class:`UnsafeArchive`."""
        self.count += 1
        if self.count > self.limits.max_members:
            raise UnsafeArchive(f"archive has more than {self.limits.max_members} members "
                                "(setting archive_max_members)")
        name = _clean_name(m.name)
        # Counted from the header, before the data is read: a member claiming to be huge is
        # refused without decompressing it.
        self.declared += max(m.size, 0) + tarfile.BLOCKSIZE
        if self.declared > self.budget:
            raise UnsafeArchive(f"archive expands to more than {self.budget} bytes: {self.why}")
        if name == "." and not m.isdir():
            raise UnsafeArchive(f"archive member {m.name!r} would replace the destination", member=m.name)
        if m.sparse is not None:
            raise UnsafeArchive(f"archive member {m.name!r} is a sparse file", member=m.name)
        kind = "d" if m.isdir() else "l" if m.issym() else "f" if m.isreg() or m.islnk() else ""
        before = self.seen.get(name)
        if before is not None and not (before == "d" and kind == "d"):
            raise UnsafeArchive(f"archive member {m.name!r} appears twice", member=m.name)
        for parent in _ancestors(name):
            self._through(m.name, parent)
        if m.issym():
            if self.symlinks == "none":
                raise UnsafeArchive(f"archive member {m.name!r} is a symbolic link", member=m.name)
            if self.symlinks == "inside" and not _link_stays_inside(name, m.linkname, self.root):
                raise UnsafeArchive(f"archive member {m.name!r} links outside the destination (a link "
                                    f"pointing out to {m.linkname!r})", member=m.name)
        elif m.islnk():
            if not self.hardlinks:
                raise UnsafeArchive(f"archive member {m.name!r} is a hard link", member=m.name)
            target = _clean_name(m.linkname)
            if self.seen.get(target) != "f":
                raise UnsafeArchive(f"archive member {m.name!r} is a hard link to {m.linkname!r}, which is not "
                                    "a regular file earlier in the archive", member=m.name)
        elif not (m.isreg() or m.isdir()):
            what = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "FIFO"}.get(m.type, f"special file (type {m.type!r})")
            raise UnsafeArchive(f"archive member {m.name!r} is a {what}; a device, fifo or other special "
                                "file is never extracted", member=m.name)
        self.seen[name] = kind
        return name

    def _through(self, member: str, parent: str) -> None:
        kind = self.seen.get(parent)
        if kind == "l":
            raise UnsafeArchive(f"archive member {member!r} passes through a link ({parent!r})", member=member)
        if kind == "f":
            raise UnsafeArchive(f"archive member {member!r} passes through a file ({parent!r})", member=member)

    def finish(self) -> None:
        """Refuse a member under a link or file that came after it in the archive."""
        for name in self.seen:
            for parent in _ancestors(name):
                self._through(name, parent)


class _Header(tarfile.TarInfo):
    """A TarInfo that refuses oversized metadata headers before tarfile reads them into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > META_LIMIT:
            raise UnsafeArchive(f"archive has a {self.size}-byte metadata header; the limit is {META_LIMIT}")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchive(f"archive member {self.name!r} is a sparse file", member=self.name)
        return cast(tarfile.TarInfo, super()._proc_member(tarfile_))  # type: ignore[misc]


class _Counted:
    """The decompressed stream, counted as it is read: past ``budget`` bytes it raises."""

    def __init__(self, inner: IO[bytes], budget: int, why: str) -> None:
        self.inner, self.budget, self.why = inner, budget, why
        self.count = 0

    def read(self, n: int | None = -1) -> bytes:
        data = self.inner.read(_CHUNK if n is None or n < 0 else min(n, _CHUNK))
        self.count += len(data)
        if self.count > self.budget:
            raise UnsafeArchive(f"archive expands to more than {self.budget} bytes: {self.why}")
        return data

    def close(self) -> None:
        pass


class _Data:
    """A member's data; a damaged stream under it is an :class:`UnsafeArchive`, like anywhere else."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner

    def read(self, n: int = -1) -> bytes:
        try:
            return self.inner.read(n)
        except UnsafeArchive:
            raise
        except _UNREADABLE as exc:
            raise UnsafeArchive(f"not a readable tar archive: {exc}") from exc


class _Prefixed:
    """A non-seekable stream with the bytes already read to sniff its compression put back."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            data, self.head = (self.head, b"") if n < 0 or n >= len(self.head) else (self.head[:n], self.head[n:])
            return data
        return self.rest.read(n)


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    head = raw.read(6)
    try:
        seekable = raw.seekable()
    except (AttributeError, OSError):
        seekable = False
    if seekable:
        raw.seek(-len(head), os.SEEK_CUR)
        src: IO[bytes] = raw
    else:
        src = cast(IO[bytes], _Prefixed(head, raw))
    if head.startswith(b"\x1f\x8b"):
        return cast(IO[bytes], gzip.GzipFile(fileobj=src, mode="rb"))
    if head.startswith(b"BZh"):
        return cast(IO[bytes], bz2.BZ2File(src))
    if head.startswith(b"\xfd7zXZ\x00"):
        return cast(IO[bytes], lzma.LZMAFile(src))
    return src


def _size_of(fh: IO[bytes]) -> int | None:
    try:
        return os.fstat(fh.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        try:
            here = fh.tell()
            end = fh.seek(0, os.SEEK_END)
            fh.seek(here)
            return end - here
        except (AttributeError, OSError, ValueError):
            return None


def members(source: str | Path | IO[bytes], limits: Limits | None = None, *, symlinks: Symlinks = "inside",
            hardlinks: bool = True, root: str = "") -> Iterator[tuple[str, tarfile.TarInfo, IO[bytes] | None]]:
    """Stream the tar at ``source`` (a path or file object; gzip, bzip2, xz or plain).

    Yields ``(clean name, member, data)`` for each member that passes :class:`Checker`;
    ``data`` (regular files only) is readable until the next member is asked for. Raises
    :class:`UnsafeArchive` at the first unsafe member or limit crossed, having read no
    further than that. When the generator is exhausted every member has been checked,
    the order-independent checks included.
    """
    limits = limits or Limits()
    if isinstance(source, str | Path):
        try:
            raw: IO[bytes] = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise InvalidInput(f"cannot read {source}: {exc.strerror}") from exc
    else:
        raw = source
    try:
        budget = limits.budget(_size_of(raw))
        checker = Checker(limits, budget, symlinks=symlinks, hardlinks=hardlinks, root=root)
        try:
            stream = _Counted(_decompressed(raw), *budget)
            tar = tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|", tarinfo=_Header)
            with tar:
                for m in tar:
                    name = checker.check(m)
                    fh = tar.extractfile(m) if m.isreg() else None
                    yield name, m, cast(IO[bytes], _Data(fh)) if fh is not None else None
        except UnsafeArchive:
            raise
        except _UNREADABLE as exc:
            raise UnsafeArchive(f"not a readable tar archive: {exc}") from exc
        checker.finish()
    finally:
        if raw is not source:
            raw.close()


def check(source: str | Path | IO[bytes], limits: Limits | None = None, *, symlinks: Symlinks = "inside",
          hardlinks: bool = True, root: str = "") -> int:
    """Validate a whole archive without writing anything; return its number of members."""
    n = 0
    for _ in members(source, limits, symlinks=symlinks, hardlinks=hardlinks, root=root):
        n += 1
    return n


def safe_extract(source: str | Path | IO[bytes], dest: str | Path, *, symlinks: Symlinks = "inside",
                 limits: Limits | None = None) -> ExtractResult:
    """Extract the tar at ``source`` (path or seekable file object, any compression) into ``dest``.

    Raises :class:`UnsafeArchive` before writing anything if any member is unsafe or a
    limit is crossed (see the module docstring), or part-way if the destination changes
    under it (a link appears).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not isinstance(source, str | Path):
        start = source.tell()
    check(source, limits, symlinks=symlinks)
    if not isinstance(source, str | Path):
        source.seek(start)
    result = ExtractResult()
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        hardlinks: list[tuple[str, str]] = []
        for name, m, fh in members(source, limits, symlinks=symlinks):
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
                with os.fdopen(src, "rb") as f:
                    mode = os.fstat(f.fileno()).st_mode
                    result.bytes += _write_file(dst_parent, name.rsplit("/", 1)[-1], f, mode)
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
