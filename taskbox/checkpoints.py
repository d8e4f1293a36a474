"""Checkpoints (SPEC §5): incremental, content-addressed restore points of a task's workspace.

Storage is git's object store, used as a plain content-addressed store. Each task has a
private bare repository ``$TASKBOX_HOME/checkpoints/<task>.git`` (outside the workspace, so
the agent can neither read nor tamper with it). Git only ever sees *data* from the
workspace, never the workspace itself: it is not given as a work tree, and no
configuration, attribute, hook or filter in it is read (the store's git runs hardened, see
:func:`taskbox.git.run`).

**Capture.** The workspace is hostile at every instant (any directory may become a link to
a host directory between two system calls), so taskbox walks it itself, with descriptors:
every directory is opened relative to its parent's descriptor with ``O_NOFOLLOW |
O_DIRECTORY``, every entry ``lstat``-ed relative to it, regular files opened ``O_NOFOLLOW |
O_NONBLOCK`` and checked with ``fstat`` before they are read, links read with
``readlinkat`` and stored as links, fifos, sockets and devices skipped. File contents are
streamed in chunks to ``git fast-import`` (a pack, or loose objects for small imports), and
each unit's tree is built there from the previous one with only the changed paths. A stat
cache per unit (size, mtime, ctime, inode, mode → blob id, and the tree it describes, kept
under TASKBOX_HOME) means an incremental checkpoint reads only changed files; an entry
changed within a second of the capture is not trusted next time (timestamps are coarse).

Git cannot hold some things in a tree, so a checkpoint is a set of *units*:

- ``files`` units: the workspace (and each nested repository inside it — any directory
  holding a ``.git`` entry, e.g. a cloned dependency);
- ``gitdir`` units: the workspace's own ``.git`` directory (and those of nested
  repositories), captured byte for byte as files (lock files left out), so a restore brings
  back the task's branch, history, index and configuration too;
- a ``manifest.json`` blob: the units, their empty directories (git drops them) and a
  ``.git`` that is a file or a link.

**Restore** works in place (the container bind-mounts the workspace directory, so it must
not be swapped). The workspace is walked as for a capture; the target entries come from the
store (``diff-tree`` against what the walk saw, ``ls-tree`` for a unit that is new) and
their contents from ``cat-file --batch``. Everything is done relative to directory
descriptors opened without following links: files are written to a temporary name and
``renameat``-ed into place, links made with ``symlinkat``, directories with ``mkdirat``,
extras removed with :func:`taskbox.files.remove_at`; a link standing where a directory
belongs is removed as a link (never followed), then the directory made. Every restored
entry — not only the changed ones — gets the sandbox user as owner and its exact mode, so
finishing an interrupted restore leaves nothing half-owned.

A restore journal is written under ``TASKBOX_HOME`` before anything is touched; a restore
interrupted by a crash is finished by the next checkpoint operation on the task or by
``taskbox doctor --fix``. The task's append-only history (``conversations.jsonl``,
``executions.jsonl``, ``decisions.md``) is kept as it is: a restore is part of that history,
not a reason to forget it.
"""

from __future__ import annotations

import base64
import collections
import errno
import fcntl
import hashlib
import io
import json
import marshal
import os
import posixpath
import re
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import archive, faults, files, git
from .confine import O_PATH, lstat_at, read_fd, rooted, sandbox_owner
from .errors import (
    CheckpointCorrupted,
    GitError,
    InvalidInput,
    NotFound,
    SandboxError,
    TaskboxError,
    TaskLocked,
)

if TYPE_CHECKING:
    from .doctor import Findings
    from .models import Task
    from .service import TaskService

FORMAT = 1
MANIFEST = "manifest.json"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
TRIGGERS = ("manual", "major-todo", "risky-command", "policy", "detach", "resource-pressure", "emergency",
            "final", "import")
# The task's append-only history: a restore keeps these as they are now.
KEEP_ON_RESTORE = (".task-memory/conversations.jsonl", ".task-memory/executions.jsonl",
                   ".task-memory/decisions.md")
IMAGE_REPO = "taskbox-checkpoint"

# The store's own configuration. Git never reads the workspace itself (see the module
# docstring); these keep what it stores and exports byte-exact all the same.
_STORE_CONFIG = """\
[core]
\tautocrlf = false
\tsafecrlf = false
\tsymlinks = true
\tfilemode = true
\tignorecase = false
\tprecomposeunicode = false
\tprotectNTFS = false
\tprotectHFS = false
\tquotePath = false
\ttrustctime = false
\tlooseCompression = 1
\tbigFileThreshold = 64m
[gc]
\tauto = 0
[advice]
\taddEmbeddedRepo = false
\tdetachedHead = false
[tar]
\tumask = 022
"""
_STORE_ATTRIBUTES = "* -text -eol -filter -ident -working-tree-encoding -export-ignore -export-subst\n"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in after the lstat must not hang the host; fstat rejects it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CHUNK = 1 << 20
_MAX_DEPTH = 400  # directories deeper than this are refused with a clear error, not a crash
_DOTGIT_FILE_LIMIT = 65536  # a gitfile is one line; a bigger ".git" file is not captured
_LINK_LIMIT = 65536  # the longest link target restored (the kernel's own limit is 4096)
# An entry whose ctime is this close to the moment it was looked at is read again next time:
# a later change within the same (coarse, <= 10 ms) timestamp tick would leave its stat
# unchanged. Local file systems stamp with the kernel clock this is compared with.
_RACY_NS = 50_000_000
_CACHE_VERSION = 2
_CACHE_MAGIC = b"taskbox-stat-cache\n"  # our own file under TASKBOX_HOME; anything else is not parsed
_CAPTURE_REF = "refs/taskbox/capture"
_NULL_SHA = "0" * 40
_NEEDS_QUOTE = re.compile(rb'[\x00-\x1f"\\\x7f]')


@dataclass
class Unit:
    """One directory tree of a checkpoint (see the module docstring)."""

    path: str  # posix path of the unit's root inside the workspace; "" is the workspace itself
    kind: str  # "files" or "gitdir"
    tree: str = EMPTY_TREE
    empty_dirs: list[str] = field(default_factory=list)
    nested: list[str] = field(default_factory=list)  # nested repositories (files units only)
    dotgit: dict[str, Any] | None = None  # a .git that is a file or a link, not a directory
    # Permission bits: the most common ones per kind ("file", "exec", "dir") and the paths that
    # differ ("except"). None in checkpoints that predate it: see _perm.
    modes: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.path}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "tree": self.tree, "empty_dirs": self.empty_dirs,
                "nested": self.nested, "dotgit": self.dotgit, "modes": self.modes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(str(d["path"]), str(d["kind"]), str(d["tree"]), list(d.get("empty_dirs") or []),
                   list(d.get("nested") or []), d.get("dotgit"), d.get("modes"))


StatKey = tuple[int, int, int, int, int]  # (size, mtime_ns, ctime_ns, inode, st_mode)
Entry = tuple[str, str, "StatKey | None"]  # (git mode, blob id or :mark, stat-cache key; None: read it next time)


@dataclass
class Scan:
    """What one walk saw of one unit; paths are relative to the unit's root."""

    unit: Unit
    entries: dict[str, Entry] = field(default_factory=dict)  # files and links; the unit's tree
    meta: dict[str, os.stat_result] = field(default_factory=dict)  # their lstat (and a non-directory .git's)
    dirs: dict[str, os.stat_result] = field(default_factory=dict)  # directories ("" is the unit's root)
    extra: list[str] = field(default_factory=list)  # what a checkpoint cannot hold: fifos, sockets, locks
    fresh: list[str] = field(default_factory=list)  # entries read this time (the rest came from the cache)
    cache: dict[str, Entry] = field(default_factory=dict)  # the last capture's entries
    base: str = EMPTY_TREE  # the tree the cache describes


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _quote(path: str) -> bytes:
    """A path for fast-import: C-style quoted, any bytes (the name need not be UTF-8)."""
    raw = os.fsencode(path)
    if _NEEDS_QUOTE.search(raw):
        raw = _NEEDS_QUOTE.sub(lambda m: b"\\%03o" % m.group()[0], raw)
    return b'"' + raw + b'"'


def _perm(unit: Unit, path: str, git_mode: str) -> int:
    """The permission bits a restored file gets: as captured; in an older checkpoint (or an
    imported one) only the exec bit is known, and git's own object files are read-only."""
    if unit.modes is not None:
        perm = unit.modes["except"].get(path)
        return int(perm if perm is not None else unit.modes["exec" if git_mode == "100755" else "file"])
    perm = 0o755 if git_mode == "100755" else 0o644
    if unit.kind == "gitdir" and path.startswith("objects/"):
        perm &= 0o555
    return perm


def _dir_perm(unit: Unit, path: str) -> int | None:
    if unit.modes is None:
        return None  # not recorded: made 0755, an existing directory left as it is
    perm = unit.modes["except"].get(path)
    return int(perm if perm is not None else unit.modes["dir"])


def _modes(sc: Scan) -> dict[str, Any]:
    """The unit's permission bits, compactly: a default per kind, and the exceptions.

    Only the 0777 bits: set-id and sticky bits are not brought back.
    """
    kinds: dict[str, dict[str, int]] = {}
    metas = sc.meta
    for path, e in sc.entries.items():
        if e[0] != "120000":
            kinds.setdefault("exec" if e[0] == "100755" else "file", {})[path] = metas[path].st_mode & 0o777
    kinds["dir"] = {d: st.st_mode & 0o777 for d, st in sc.dirs.items()}
    out: dict[str, Any] = {"file": 0o644, "exec": 0o755, "dir": 0o755, "except": {}}
    for kind, perms in kinds.items():
        if perms:
            counts = collections.Counter(perms.values())
            out[kind] = max(counts, key=lambda m: (counts[m], m == out[kind]))
            out["except"].update({p: m for p, m in perms.items() if m != out[kind]})
    return out


class _Importer:
    """A ``git fast-import`` into the store, started at the first object: content in, ids out.

    Contents are streamed in chunks; nothing is held whole in memory. Objects go to a pack
    (or, for a small import, loose objects); trees are built by fast-import from the
    previous tree of each unit with only the changed paths.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.proc: subprocess.Popen[bytes] | None = None
        self.out: IO[bytes] | None = None
        self.errors: IO[bytes] | None = None
        self.marks_file = store.meta / f"marks.{os.getpid()}.{secrets.token_hex(4)}"
        self.count = 0
        self.packs_before: set[str] = set()
        self.read_total = 0

    def charge(self, size: int, name: str) -> None:
        """Count ``size`` bytes about to be read; refuse past the store's read limit, before reading."""
        self.read_total += size
        limit = self.store.read_limit
        if limit is not None and self.read_total > limit:
            raise InvalidInput(f"the workspace holds more than {limit} bytes of file contents to read (sparse "
                               f"files count whole; {name!r} is {size} bytes); delete large files and try again")

    def _pipe(self) -> IO[bytes]:
        if self.out is None:
            self.packs_before = self.store.packs()
            self.errors = tempfile.TemporaryFile()  # not in the store: it may be the full disk
            self.proc = self.store.popen(
                ["-c", "pack.compression=1", "fast-import", "--quiet", "--done", "--force", "--depth=0",
                 f"--export-marks={self.marks_file}"], stderr=self.errors)
            assert self.proc.stdin is not None
            self.out = self.proc.stdin
        return self.out

    def _write(self, data: bytes) -> None:
        try:
            self._pipe().write(data)
        except (BrokenPipeError, ValueError) as exc:  # fast-import died (e.g. the disk is full)
            raise self._failure() from exc

    def _failure(self) -> GitError:
        code = -1
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=10)  # it is exiting: let it say why
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        stderr = ""
        if self.errors is not None:
            self.errors.seek(0)
            stderr = self.errors.read(65536).decode(errors="replace")
        return _store_error("could not copy the workspace into the checkpoint store", stderr or "fatal: "
                            "git fast-import stopped", code)

    def _mark(self) -> str:
        self.count += 1
        return f":{self.count}"

    def blob_from_fd(self, fd: int, size: int) -> tuple[str, bool]:
        """Stream ``size`` bytes of an open file as a blob; False if the file shrank meanwhile."""
        mark = self._mark()
        self._write(b"blob\nmark %s\ndata %d\n" % (mark.encode(), size))
        left, whole = size, True
        while left > 0:
            chunk = os.read(fd, min(left, _CHUNK))
            if not chunk:  # truncated while read: the declared size is sent all the same
                whole = False
                chunk = bytes(min(left, _CHUNK))
            self._write(chunk)
            left -= len(chunk)
        self._write(b"\n")
        return mark, whole

    def blob(self, data: bytes) -> str:
        mark = self._mark()
        self._write(b"blob\nmark %s\ndata %d\n%s\n" % (mark.encode(), len(data), data))
        return mark

    def tree(self, base: str, deletes: Iterable[str], changes: Iterable[tuple[str, str, str]]) -> str:
        """A (parentless) commit whose tree is ``base`` with ``deletes`` and ``changes`` applied."""
        mark = self._mark()
        out = [b"reset %s\ncommit %s\nmark %s\ncommitter taskbox <taskbox@localhost> 0 +0000\ndata 0\n"
               % (_CAPTURE_REF.encode(), _CAPTURE_REF.encode(), mark.encode())]
        if base != EMPTY_TREE:
            out.append(b'M 040000 %s ""\n' % base.encode())
        out += [b"D %s\n" % _quote(p) for p in deletes]  # before the changes: a file may become a directory
        out += [b"M %s %s %s\n" % (mode.encode(), ref.encode(), _quote(p)) for mode, ref, p in changes]
        out.append(b"\n")
        self._write(b"".join(out))
        return mark

    def finish(self) -> tuple[dict[str, str], int]:
        """Close the stream; the marks' object ids and the bytes the store grew by."""
        if self.out is None:
            return {}, 0
        # The scratch ref goes again: only checkpoints keep objects alive.
        self._write(b"reset %s\nfrom %s\n\ndone\n" % (_CAPTURE_REF.encode(), _NULL_SHA.encode()))
        try:
            self.out.close()
        except BrokenPipeError as exc:
            raise self._failure() from exc
        assert self.proc is not None
        if self.proc.wait() != 0:
            raise self._failure()
        marks: dict[str, str] = {}
        try:
            with open(self.marks_file) as fh:
                for line in fh:
                    mark, _, sha = line.strip().partition(" ")
                    marks[mark] = sha
        finally:
            self.marks_file.unlink(missing_ok=True)
        grown = sum(self.store.pack_size(p) for p in self.store.packs() - self.packs_before)
        grown += sum(self.store.loose_size(sha) for sha in marks.values())
        return marks, grown

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.errors is not None:
            self.errors.close()
        self.marks_file.unlink(missing_ok=True)


class _Blobs:
    """Blob contents read from the store in one ``cat-file --batch``, in the order asked for.

    A thread writes the requests while the caller reads the answers, so neither side
    waits on a full pipe; each content is copied in chunks.
    """

    def __init__(self, store: Store, shas: list[str]) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread: threading.Thread | None = None
        self.errors: IO[bytes] | None = None
        if not shas:
            return
        self.errors = tempfile.TemporaryFile()
        self.proc = store.popen(["cat-file", "--batch"], stderr=self.errors)
        requests = ("\n".join(shas) + "\n").encode()
        stdin = self.proc.stdin
        assert stdin is not None

        def feed() -> None:
            try:
                stdin.write(requests)
                stdin.close()
            except (BrokenPipeError, ValueError, OSError):
                pass

        self.thread = threading.Thread(target=feed, daemon=True)
        self.thread.start()

    def _header(self, sha: str) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline().decode(errors="replace").split()
        if len(line) != 3 or line[0] != sha:
            raise CheckpointCorrupted(f"object {sha[:12]} cannot be read from the checkpoint store "
                                      f"({' '.join(line) or 'no answer'})")
        return int(line[2])

    def _read(self, n: int) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        data = self.proc.stdout.read(n)
        if len(data) != n:
            raise CheckpointCorrupted("the checkpoint store stopped answering in the middle of an object")
        return data

    def copy_to(self, sha: str, fd: int) -> None:
        left = self._header(sha)
        while left > 0:
            chunk = self._read(min(left, _CHUNK))
            files._write_all(fd, chunk)
            left -= len(chunk)
        self._read(1)

    def read(self, sha: str, limit: int) -> bytes:
        size = self._header(sha)
        if size > limit:
            raise CheckpointCorrupted(f"link {sha[:12]} in the checkpoint store is {size} bytes long")
        data = self._read(size)
        self._read(1)
        return data

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        if self.thread is not None:
            self.thread.join()
        if self.errors is not None:
            self.errors.close()


class Store:
    """One task's private content-addressed store: a bare git repository under TASKBOX_HOME."""

    def __init__(self, path: Path, read_limit: int | None = None) -> None:
        self.path = path
        self.meta = path / "taskbox"  # our own files: stat caches, journal, scratch
        # Most bytes of file contents one capture reads. A sparse file costs the agent no
        # quota but the host a full read: refused from its size, before a byte is read.
        self.read_limit = read_limit
        self.last_capture_bytes = 0  # what the last capture added to the store
        self._cached = False  # whether the capture under way started from stat caches

    # --- plumbing --------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.path / "HEAD").is_file()

    def ensure(self) -> None:
        if self.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        git.run(["init", "--quiet", "--bare", str(tmp)], cwd=self.path.parent, harden=True)
        with open(tmp / "config", "a") as fh:
            fh.write(_STORE_CONFIG)
        (tmp / "info").mkdir(exist_ok=True)
        (tmp / "info" / "attributes").write_text(_STORE_ATTRIBUTES)
        (tmp / "taskbox" / "index").mkdir(parents=True)
        try:
            os.rename(tmp, self.path)  # a racing creator may have won: use theirs
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.exists():
                raise CheckpointCorrupted(f"the checkpoint store {self.path} is damaged (not a git repository: "
                                          f"{exc.strerror}); move it away to start a new one") from exc

    def git(self, args: list[str], *, index: Path | None = None, input: bytes | None = None,
            check: bool = True) -> Any:
        """Git on the store alone (hardened); never with a work tree."""
        env = {"GIT_DIR": str(self.path)}
        if index is not None:
            env["GIT_INDEX_FILE"] = str(index)
        return git.run(args, cwd=self.path, harden=True, env=env, input=input, check=check, timeout=3600)

    def popen(self, args: list[str], stderr: IO[bytes]) -> subprocess.Popen[bytes]:
        return git.popen(args, cwd=self.path, harden=True, env={"GIT_DIR": str(self.path)}, stderr=stderr)

    def index_file(self, unit: Unit) -> Path:
        """The unit's stat cache (the name is kept from the private indexes it replaces)."""
        return self.meta / "index" / hashlib.sha1(unit.key.encode()).hexdigest()[:20]

    def size(self) -> int:
        total = 0
        for dirpath, _dirs, names in os.walk(self.path):
            for n in names:
                try:
                    total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
                except FileNotFoundError:
                    pass
        return total

    def packs(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.path / "objects" / "pack") if n.endswith(".pack")}
        except FileNotFoundError:
            return set()

    def pack_size(self, name: str) -> int:
        try:
            return os.stat(self.path / "objects" / "pack" / name).st_size
        except FileNotFoundError:
            return 0

    def loose_size(self, sha: str) -> int:
        try:
            return os.stat(self.path / "objects" / sha[:2] / sha[2:]).st_size
        except FileNotFoundError:
            return 0  # packed, or stored before

    # --- the stat caches -------------------------------------------------------------------

    def _load_cache(self, sc: Scan) -> None:
        try:
            raw = self.index_file(sc.unit).read_bytes()
            if not raw.startswith(_CACHE_MAGIC):  # e.g. a private git index an older taskbox kept there
                return
            data = marshal.loads(raw[len(_CACHE_MAGIC):])
            if not isinstance(data, dict) or data.get("v") != _CACHE_VERSION:
                return
            sc.cache, sc.base = data["entries"], data["tree"]
            self._cached = True
        except (OSError, ValueError, EOFError, TypeError, KeyError):
            sc.cache, sc.base = {}, EMPTY_TREE  # no cache: every file is read once more

    def _save_cache(self, sc: Scan, entries: dict[str, Entry]) -> None:
        path = self.index_file(sc.unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(_CACHE_MAGIC + marshal.dumps({"v": _CACHE_VERSION, "tree": sc.unit.tree, "entries": entries}))
        os.replace(tmp, path)  # losing it costs one full read, so no fsync

    def drop_caches(self) -> None:
        shutil.rmtree(self.meta / "index", ignore_errors=True)
        (self.meta / "index").mkdir(parents=True, exist_ok=True)

    # --- capture ---------------------------------------------------------------------------

    def capture(self, ws: Path) -> list[Unit]:
        """Store what the workspace holds now; return its units (see the module docstring)."""
        with rooted(ws) as rfd:
            return [s.unit for s in self.scan(rfd)]

    def scan(self, rfd: int) -> list[Scan]:
        """Walk the workspace under the descriptor ``rfd``; store changed contents; the units seen.

        Writes the blobs and trees of what changed since the last capture; nothing else.
        """
        self._cached = False
        try:
            return self._scan(rfd, use_cache=True)
        except GitError as exc:
            if not self._cached or "no space left" in exc.message:
                raise
            # A cache naming objects the store lost (a crash before they reached the disk):
            # once more without caches.
            self.drop_temporaries()
            return self._scan(rfd, use_cache=False)

    def _scan(self, rfd: int, *, use_cache: bool) -> list[Scan]:
        imp = _Importer(self)
        try:
            scans: list[Scan] = []
            root = self._unit(Unit("", "files"), scans, use_cache)
            root_st = os.fstat(rfd)
            root.dirs[""] = root_st
            self._walk(rfd, root, "", 0, imp, scans, root_st.st_dev, use_cache)
            commits: dict[str, str] = {}
            for sc in scans:
                # A cache hit has the cached mode and blob, so what changed is what was read.
                deletes = sorted(sc.cache.keys() - sc.entries.keys())
                changes = [(sc.entries[p][0], sc.entries[p][1], p) for p in sc.fresh]
                if not sc.entries:
                    sc.unit.tree = EMPTY_TREE
                elif deletes or changes or sc.base == EMPTY_TREE:
                    commits[sc.unit.key] = imp.tree(sc.base, deletes, changes)
                else:
                    sc.unit.tree = sc.base
            marks, self.last_capture_bytes = imp.finish()
        finally:
            imp.close()
        by_key: dict[str, str] = {}
        if commits:
            shas = [marks[m] for m in commits.values()]
            trees = self.git(["rev-parse", *(f"{s}^{{tree}}" for s in shas)]).stdout.split()
            by_key = dict(zip(commits, trees, strict=True))
        for sc in scans:
            entries = sc.entries
            for p in sc.fresh:
                mode, ref, key = entries[p]
                entries[p] = (mode, marks[ref], key)
            if sc.unit.key in commits:
                sc.unit.tree = by_key[sc.unit.key]
            if sc.unit.key in commits or sc.base != sc.unit.tree:
                self._save_cache(sc, entries)
            sc.unit.empty_dirs.sort()
            sc.unit.nested.sort()
            sc.unit.modes = _modes(sc)
        scans.sort(key=lambda s: (s.unit.path.count("/"), s.unit.path, s.unit.kind))
        return scans

    def _unit(self, unit: Unit, scans: list[Scan], use_cache: bool) -> Scan:
        sc = Scan(unit)
        if use_cache:
            self._load_cache(sc)
        scans.append(sc)
        return sc

    def _walk(self, dfd: int, sc: Scan, sub: str, depth: int, imp: _Importer, scans: list[Scan],
              dev: int, use_cache: bool) -> None:
        """Capture the directory ``dfd`` (``sub`` inside ``sc``'s unit) and everything below it."""
        if depth > _MAX_DEPTH:
            raise InvalidInput(f"{_join(sc.unit.path, sub)!r} is nested more than {_MAX_DEPTH} directories deep; "
                               "a checkpoint cannot hold it")
        gitdir = sc.unit.kind == "gitdir"
        content = 0
        subdirs: list[str] = []
        now = time.time_ns()  # before any entry here is looked at: see _RACY_NS
        with os.scandir(dfd) as it:
            listing = list(it)
        prefix = f"{sub}/" if sub else ""
        entries, metas, fresh, cached_entry = sc.entries, sc.meta, sc.fresh, sc.cache.get
        for entry in listing:  # the hot loop of a checkpoint: kept lean
            name = entry.name
            if entry.is_dir(follow_symlinks=False):  # from the directory entry's type: no system call
                subdirs.append(name)
                continue
            rel = prefix + name
            try:
                st = entry.stat(follow_symlinks=False)  # fstatat relative to dfd, no link followed
            except FileNotFoundError:
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):  # became one since it was listed
                subdirs.append(name)
                continue
            if name == ".git":
                if not gitdir and not sub and self._dotgit(dfd, sc, st):
                    content += 1
                else:
                    sc.extra.append(rel)
                continue
            if gitdir and name.endswith(".lock"):  # a restored stale lock would block git
                sc.extra.append(rel)
                continue
            key: StatKey | None = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, mode)
            cached = cached_entry(rel)
            if cached is not None and cached[2] == key:  # same type, mode and content as last time
                entries[rel] = cached
            elif stat.S_ISREG(mode):
                got = self._read_file(dfd, name, imp, now)
                if got is None:
                    sc.extra.append(rel)  # no longer a regular file: not captured
                    continue
                entries[rel], st = got
                fresh.append(rel)
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(os.fsencode(name), dir_fd=dfd)
                except OSError:  # replaced meanwhile: the agent's race, not captured
                    continue
                entries[rel] = ("120000", imp.blob(target), None if st.st_ctime_ns >= now - _RACY_NS else key)
                fresh.append(rel)
            else:
                sc.extra.append(rel)  # fifos, sockets, devices: a checkpoint cannot hold them
                continue
            metas[rel] = st
            content += 1
        for name in subdirs:
            rel = f"{sub}/{name}" if sub else name
            try:
                cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    continue  # replaced meanwhile (by a link, say): the agent's race, nothing followed
                raise TaskboxError(f"cannot read {_join(sc.unit.path, rel)!r} in the workspace: "
                                   f"{exc.strerror}") from exc
            try:
                cst = os.fstat(cfd)
                if cst.st_dev != dev:  # a mount inside (made on the host): neither captured nor removed
                    continue
                meta = cst
                if name == ".git" and not gitdir and not sub:
                    child = self._unit(Unit(_join(sc.unit.path, ".git"), "gitdir"), scans, use_cache)
                    child.dirs[""] = meta
                    self._walk(cfd, child, "", depth + 1, imp, scans, dev, use_cache)
                elif name == ".git":
                    sc.extra.append(rel)  # a .git inside a .git: not a path a tree may hold
                    continue
                elif not gitdir and lstat_at(cfd, ".git") is not None:
                    sc.unit.nested.append(rel)  # a nested repository: a unit of its own
                    child = self._unit(Unit(_join(sc.unit.path, rel), "files"), scans, use_cache)
                    child.dirs[""] = meta
                    self._walk(cfd, child, "", depth + 1, imp, scans, dev, use_cache)
                else:
                    sc.dirs[rel] = meta
                    self._walk(cfd, sc, rel, depth + 1, imp, scans, dev, use_cache)
                content += 1
            finally:
                os.close(cfd)
        if not content and sub:
            sc.unit.empty_dirs.append(sub)  # empty, or holding only what git cannot store

    @staticmethod
    def _read_file(dfd: int, name: str, imp: _Importer, now: int) -> tuple[Entry, os.stat_result] | None:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR):
                return None  # replaced meanwhile
            raise TaskboxError(f"cannot read {name!r} in the workspace: {exc.strerror}") from exc
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                return None
            imp.charge(fst.st_size, os.fsdecode(name))
            ref, whole = imp.blob_from_fd(fd, fst.st_size)
        finally:
            os.close(fd)
        key: StatKey | None = (fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns, fst.st_ino, fst.st_mode)
        if not whole or fst.st_ctime_ns >= now - _RACY_NS:
            key = None  # it may still change within the same timestamp: read it again next time
        return (("100755" if fst.st_mode & stat.S_IXUSR else "100644"), ref, key), fst

    @staticmethod
    def _dotgit(dfd: int, sc: Scan, st: os.stat_result) -> bool:
        """Record a ``.git`` that is a link or a small file (a gitfile) at a unit's root."""
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(".git", dir_fd=dfd)
            except OSError:
                return False
            sc.unit.dotgit = {"type": "link", "target": target}
        elif stat.S_ISREG(st.st_mode) and st.st_size <= _DOTGIT_FILE_LIMIT:
            try:
                fd = os.open(".git", _FILE_FLAGS, dir_fd=dfd)
            except OSError:
                return False
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode):
                    return False
                data = read_fd(fd, _DOTGIT_FILE_LIMIT + 1)
            finally:
                os.close(fd)
            if len(data) > _DOTGIT_FILE_LIMIT:
                return False
            sc.unit.dotgit = {"type": "file", "data": base64.b64encode(data).decode(),
                              "mode": fst.st_mode & 0o777}
            st = fst
        else:
            return False
        sc.meta[".git"] = st
        return True

    # --- reading the store -----------------------------------------------------------------

    def entries(self, tree: str) -> dict[str, Entry]:
        """``path -> (mode, blob id)`` of every file and link in a tree."""
        if tree == EMPTY_TREE:
            return {}
        out: dict[str, Entry] = {}
        for rec in self.git(["ls-tree", "-r", "-z", "--full-tree", tree]).stdout.split("\0"):
            if not rec:
                continue
            meta, _, path = rec.partition("\t")
            mode, kind, sha = meta.split(" ")
            if kind == "blob":
                out[path] = (mode, sha, None)
        return out

    def count_entries(self, tree: str) -> int:
        if tree == EMPTY_TREE:
            return 0
        out = self.git(["ls-tree", "-r", "-z", "--name-only", tree]).stdout
        return out.count("\0")

    def diff(self, old: str, new: str) -> list[tuple[str, str, str, str, str]]:
        """``(old_mode, new_mode, new_sha, status, path)`` of every entry that differs."""
        if old == new:
            return []
        out = self.git(["diff-tree", "-r", "-z", "--no-renames", old, new]).stdout
        parts = out.split("\0")
        result = []
        i = 0
        while i + 1 < len(parts):
            meta, path = parts[i], parts[i + 1]
            i += 2
            if not meta.startswith(":"):
                continue
            old_mode, new_mode, _old_sha, new_sha, status = meta[1:].split(" ")
            result.append((old_mode, new_mode, new_sha, status, path))
        return result

    def commit(self, units: list[Unit], manifest: dict[str, Any], message: str) -> str:
        manifest = {**manifest, "format": FORMAT, "units": [u.to_dict() for u in units]}
        blob = self.git(["hash-object", "-w", "--stdin"],
                        input=json.dumps(manifest, sort_keys=True).encode()).stdout.strip()
        lines = [f"100644 blob {blob}\t{MANIFEST}"]
        lines += [f"040000 tree {u.tree}\tu{i}" for i, u in enumerate(units)]
        root = self.git(["mktree"], input=("\n".join(lines) + "\n").encode()).stdout.strip()
        return self.git(["commit-tree", root, "-m", message]).stdout.strip()

    def manifest(self, commit: str) -> dict[str, Any]:
        try:
            raw = self.git(["cat-file", "blob", f"{commit}:{MANIFEST}"]).stdout
            data = json.loads(raw)
            data["units"] = [Unit.from_dict(u) for u in data["units"]]
        except GitError as exc:
            raise _corrupted(f"checkpoint {commit[:12]} cannot be read from the store", exc) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointCorrupted(f"checkpoint {commit[:12]} has a damaged manifest: {exc}") from exc
        return data

    def set_ref(self, name: str, commit: str) -> None:
        self.git(["update-ref", f"refs/checkpoints/{name}", commit])

    def delete_ref(self, name: str) -> None:
        self.git(["update-ref", "-d", f"refs/checkpoints/{name}"], check=False)
        (self.meta / "needs-gc").touch()  # its objects may now be unreachable

    def resolve(self, name: str) -> str | None:
        proc = self.git(["rev-parse", "--verify", "--quiet", f"refs/checkpoints/{name}^{{commit}}"], check=False)
        return proc.stdout.strip() or None

    def verify_blobs(self, shas: list[str]) -> None:
        """Read every listed object in full, so damage is found before the workspace is touched."""
        if not shas:
            return
        index = self.meta / f"verify.{os.getpid()}.index"
        try:
            info = "".join(f"100644 {sha}\t{i}\n" for i, sha in enumerate(sorted(set(shas))))
            self.git(["update-index", "--add", "--index-info"], index=index, input=info.encode(errors="surrogateescape"))
            tree = self.git(["write-tree", "--missing-ok"], index=index).stdout.strip()
            # git archive inflates every blob; a damaged object fails here, with its name.
            self.git(["archive", "--format=tar", "-o", os.devnull, tree])
        finally:
            index.unlink(missing_ok=True)

    def drop_temporaries(self) -> None:
        """Delete what a failed git write leaves (e.g. on a full disk): half-written objects, crash reports."""
        for tmp in [*self.path.glob("objects/??/tmp_obj_*"), *self.path.glob("objects/pack/tmp_*"),
                    *self.path.glob("fast_import_crash_*"), *self.meta.glob("marks.*")]:
            tmp.unlink(missing_ok=True)

    def gc(self) -> None:
        """Pack and drop unreachable objects (the stat caches are dropped too).

        Only after a checkpoint was deleted: that is when objects become unreachable, and
        dropping the caches makes the next checkpoint re-read the whole workspace.
        """
        marker = self.meta / "needs-gc"
        if not marker.exists():
            return
        # The caches are not gc roots: objects only they name are pruned, so they must go.
        self.drop_caches()
        self.git(["gc", "--quiet", "--prune=now"])
        marker.unlink(missing_ok=True)


def _corrupted(message: str, exc: GitError, after: str = "") -> CheckpointCorrupted:
    lines = (exc.details.get("stderr") or exc.message).strip().splitlines()
    detail = next((s for s in lines if "corrupt" in s), None) or next(
        (s for s in lines if s.startswith(("error", "fatal"))), lines[0] if lines else "unreadable")
    detail = re.sub(r"^(error|fatal): ", "", detail)
    return CheckpointCorrupted(f"{message}: the checkpoint store is damaged ({detail}){after}",
                               stderr=exc.details.get("stderr"))


def _store_error(message: str, stderr: str, code: int) -> GitError:
    first = next((s for s in stderr.splitlines() if s.startswith(("error", "fatal"))), stderr.strip()[:300])
    if "No space left" in stderr or "Out of diskspace" in stderr:  # the latter: fast-import's words
        first = "no space left on device"
    return GitError(f"{message}: {first}", returncode=code, stderr=stderr)


# --- restore ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What restoring one unit means: its target entries, and which of them to write."""

    unit: Unit  # the checkpoint's
    current: Scan | None  # what the walk saw there now (None: no such unit now)
    entries: dict[str, Entry]
    write: list[str]
    changed: int = 0
    added: int = 0
    removed: int = 0


def _plan(store: Store, current: list[Scan], target: list[Unit]) -> list[_Plan]:
    cur = {s.unit.key: s for s in current}
    plans = []
    for unit in sorted(target, key=lambda u: (u.path.count("/"), u.path, u.kind)):
        sc = cur.get(unit.key)
        if sc is None:
            entries = store.entries(unit.tree)
            plan = _Plan(unit, None, entries, sorted(entries), added=len(entries))
        else:
            entries = dict(sc.entries)
            plan = _Plan(unit, sc, entries, [])
            for _om, new_mode, sha, status, path in store.diff(sc.unit.tree, unit.tree):
                if status == "D":
                    entries.pop(path, None)
                    plan.removed += 1
                    continue
                entries[path] = (new_mode, sha, None)
                plan.write.append(path)
                if status == "A":
                    plan.added += 1
                else:
                    plan.changed += 1
            plan.write.sort()
        # A gitlink (a submodule commit id from an imported archive) names no content here.
        plan.write = [p for p in plan.write if entries[p][0] != "160000"]
        plans.append(plan)
    return plans


class _Dirs:
    """Directory descriptors beneath the workspace root, each opened relative to its parent
    with ``O_NOFOLLOW``; a missing directory is made with ``mkdirat``, and anything else in its
    place (a link, a file) is removed first, never followed.

    The most recently used ones stay open (a workspace may hold more directories than a
    process may hold descriptors); one closed is opened again the same way, link by link.
    """

    KEEP = 128

    def __init__(self, rfd: int, owner: tuple[int, int] | None) -> None:
        self.root = rfd
        self.fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.owner = owner

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _open(self, pfd: int, name: str, create: bool) -> int | None:
        made = False
        for _ in range(8):  # the sandbox may keep swapping it; it gets a few tries, not forever
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(name, 0o755, dir_fd=pfd)
                    made = True
                except FileExistsError:
                    pass
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if not create:
                    return None
                files.remove_at(pfd, name)  # a link (or file) where a directory belongs: the link goes
                continue
            if made:
                os.fchmod(fd, 0o755)  # whatever the umask
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
            return fd
        raise TaskboxError(f"{name!r} in the workspace kept changing while the checkpoint was restored; "
                           "restore again")

    def get(self, rel: str, create: bool = True) -> int | None:
        """The descriptor of directory ``rel`` (made if ``create``), or None if it is not there.

        Valid until the next call (an older one may be closed then).
        """
        if not rel:
            return self.root
        if rel in self.fds:
            self.fds.move_to_end(rel)
            return self.fds[rel]
        parts = rel.split("/")
        i = len(parts) - 1
        while i > 0 and "/".join(parts[:i]) not in self.fds:
            i -= 1
        fd = self.fds["/".join(parts[:i])] if i else self.root
        for j in range(i, len(parts)):
            nxt = self._open(fd, parts[j], create)
            if nxt is None:
                return None
            fd = nxt
            self.fds["/".join(parts[:j + 1])] = fd
        while len(self.fds) > self.KEEP:  # the newest (``fd``) is never the one closed
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def remove(self, rel: str) -> None:
        """Remove ``rel`` (a file, a link or a whole tree) if its parent is still there."""
        parent, name = posixpath.split(rel)
        pfd = self.get(parent, create=False)
        if pfd is None:
            return
        for known in [k for k in self.fds if k == rel or k.startswith(rel + "/")]:
            os.close(self.fds.pop(known))
        files.remove_at(pfd, name)


def _rename_into(pfd: int, tmp: str, name: str) -> None:
    try:
        try:
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            files.remove_at(pfd, name)  # a directory in the way: it goes, links inside it unfollowed
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=pfd)
        except OSError:
            pass
        raise


def _put_file(pfd: int, name: str, perm: int, owner: tuple[int, int] | None, fill: Any) -> None:
    """Write a file in the open directory ``pfd``: temp file, exact mode and owner, ``renameat``."""
    tmp = files._tmp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
    try:
        fill(fd)
        os.fchmod(fd, perm)
        if owner is not None:
            os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=pfd)
        except OSError:
            pass
        raise
    os.close(fd)
    _rename_into(pfd, tmp, name)


def _put_link(pfd: int, name: str, target: bytes, owner: tuple[int, int] | None) -> None:
    tmp = files._tmp_name(name)
    os.symlink(target, os.fsencode(tmp), dir_fd=pfd)  # made, never followed
    if owner is not None:
        os.chown(tmp, *owner, dir_fd=pfd, follow_symlinks=False)
    _rename_into(pfd, tmp, name)


def _fix_meta(pfd: int, name: str, perm: int | None, owner: tuple[int, int] | None,
              seen: os.stat_result) -> None:
    """Give an entry that already has the right content its exact mode and owner, on a descriptor."""
    uid, gid, mode = seen.st_uid, seen.st_gid, seen.st_mode
    wrong_owner = owner is not None and (uid, gid) != owner
    wrong_mode = perm is not None and stat.S_IMODE(mode) != perm
    if not (wrong_owner or wrong_mode):
        return
    if stat.S_ISLNK(mode):
        if wrong_owner and owner is not None:
            try:
                os.chown(name, *owner, dir_fd=pfd, follow_symlinks=False)  # lchown: the link, not its target
            except FileNotFoundError:
                pass
        return
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=pfd)
    except PermissionError:
        # Not root and a file without read permission: an O_PATH descriptor names the inode
        # itself (opened without following), and its /proc entry lets it be chmod-ed.
        fd = os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if perm is not None and stat.S_ISREG(os.fstat(fd).st_mode):
                os.chmod(f"/proc/self/fd/{fd}", perm)
        finally:
            os.close(fd)
        return
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return  # replaced since the walk: the agent's race; nothing followed
        raise
    try:
        fst = os.fstat(fd)
        if stat.S_ISREG(fst.st_mode):  # anything else now is the agent's race: left alone
            if perm is not None and stat.S_IMODE(fst.st_mode) != perm:
                os.fchmod(fd, perm)
            if owner is not None and (fst.st_uid, fst.st_gid) != owner:
                os.fchown(fd, *owner)
    finally:
        os.close(fd)


def _apply(store: Store, rfd: int, current: list[Scan], plans: list[_Plan]) -> dict[str, int]:
    """Make the workspace under ``rfd`` equal to the plans (``current`` is what the walk saw)."""
    owner = sandbox_owner() if os.geteuid() == 0 else None
    stats = {"changed": 0, "added": 0, "removed": 0}
    wanted = {p.unit.key for p in plans}
    # Every directory the checkpoint has: the rest of what the walk saw goes.
    needed: set[str] = set()

    def need(path: str) -> None:
        while path and path not in needed:
            needed.add(path)
            path = posixpath.dirname(path)

    for p in plans:
        need(p.unit.path)
        for parent in {path.rpartition("/")[0] for path in p.entries}:
            need(_join(p.unit.path, parent))
        for d in p.unit.empty_dirs:
            need(_join(p.unit.path, d))
    dirs = _Dirs(rfd, owner)
    order = [sha for p in plans for path in p.write for sha in [p.entries[path][1]]]
    blobs = _Blobs(store, order)
    try:
        # Units that exist now but not in the checkpoint go first, deepest first, so the
        # parent can put plain files where a nested repository was.
        for sc in sorted(current, key=lambda s: -len(s.unit.path)):
            if sc.unit.key not in wanted and sc.unit.path:
                dirs.remove(sc.unit.path)
                store.index_file(sc.unit).unlink(missing_ok=True)
        for i, p in enumerate(plans):
            _apply_unit(p, dirs, blobs, needed, wanted, owner)
            if p.unit.kind == "files":
                for k in stats:
                    stats[k] += getattr(p, k)
            if i == 0:
                faults.point("restore.midway")  # the workspace files are back; .git and the rest not yet
    finally:
        blobs.close()
        dirs.close()
    return stats


def _apply_unit(p: _Plan, dirs: _Dirs, blobs: _Blobs, needed: set[str], wanted: set[str],
                owner: tuple[int, int] | None) -> None:
    unit, sc = p.unit, p.current
    root = unit.path
    dirs.get(root)
    gone: set[str] = set()  # directories removed whole: nothing below them needs removing again

    def below_gone(path: str) -> bool:
        while path:
            if path in gone:
                return True
            path = posixpath.dirname(path)
        return False

    if sc is not None:
        for d in sorted(sc.dirs, key=lambda s: (s.count("/"), s)):
            full = _join(root, d)
            if d and full not in needed and not below_gone(full):
                dirs.remove(full)
                gone.add(full)
        for path in [*sorted(q for q in sc.entries if q not in p.entries), *sc.extra]:
            full = _join(root, path)
            if not below_gone(full):
                dirs.remove(full)
        if sc.unit.dotgit is not None and unit.dotgit is None and f"gitdir:{_join(root, '.git')}" not in wanted:
            dirs.remove(_join(root, ".git"))  # a gitfile or link the checkpoint does not have
    written = set(p.write)
    for path in p.write:
        mode, sha, _key = p.entries[path]
        parent, name = posixpath.split(_join(root, path))
        pfd = dirs.get(parent)
        assert pfd is not None
        if mode == "120000":
            _put_link(pfd, name, blobs.read(sha, _LINK_LIMIT), owner)
        else:
            _put_file(pfd, name, _perm(unit, path, mode), owner,
                      lambda fd, s=sha: blobs.copy_to(s, fd))
    if sc is not None:
        # Unchanged entries get their exact mode and owner too: a replayed restore is complete.
        metas = sc.meta
        for path, e in p.entries.items():
            seen = metas.get(path)
            if seen is None or path in written:
                continue
            mode = e[0]
            want = None if mode == "120000" or unit.modes is None else _perm(unit, path, mode)
            if (want is not None and stat.S_IMODE(seen.st_mode) != want) or (
                    owner is not None and (seen.st_uid, seen.st_gid) != owner):
                parent, name = posixpath.split(_join(root, path))
                pfd = dirs.get(parent)
                assert pfd is not None
                _fix_meta(pfd, name, want, owner, seen)
    if unit.dotgit is not None:
        _put_dotgit(dirs, root, unit.dotgit, sc, owner)
    # Directories last (a read-only one could not be written into): made, given their mode and owner.
    tree_dirs = {""}
    for parent in {path.rpartition("/")[0] for path in p.entries} | set(unit.empty_dirs):
        while parent and parent not in tree_dirs:
            tree_dirs.add(parent)
            parent = posixpath.dirname(parent)
    for d in sorted(tree_dirs, key=lambda s: -s.count("/")):
        full = _join(root, d)
        if not full:
            continue  # the workspace root is taskbox's, not the checkpoint's
        want = _dir_perm(unit, d)
        seen = sc.dirs.get(d) if sc is not None else None
        if seen is not None and (want is None or stat.S_IMODE(seen.st_mode) == want) and (
                owner is None or (seen.st_uid, seen.st_gid) == owner):
            continue
        fd = dirs.get(full)
        assert fd is not None
        fst = os.fstat(fd)
        if want is not None and stat.S_IMODE(fst.st_mode) != want:
            os.fchmod(fd, want)
        if owner is not None and (fst.st_uid, fst.st_gid) != owner:
            os.fchown(fd, *owner)


def _put_dotgit(dirs: _Dirs, root: str, want: dict[str, Any], sc: Scan | None,
                owner: tuple[int, int] | None) -> None:
    """A ``.git`` that is a link or a gitfile, as the checkpoint has it."""
    ufd = dirs.get(root)
    assert ufd is not None
    seen = sc.meta.get(".git") if sc is not None else None
    if sc is not None and sc.unit.dotgit == want and seen is not None:
        perm = None if want["type"] == "link" else int(want.get("mode", 0o644))
        _fix_meta(ufd, ".git", perm, owner, seen)
        return
    if want["type"] == "link":
        _put_link(ufd, ".git", os.fsencode(want["target"]), owner)
    else:
        data = base64.b64decode(want["data"])
        _put_file(ufd, ".git", int(want.get("mode", 0o644)) & 0o7777, owner,
                  lambda fd: files._write_all(fd, data))


# --- the engine the service calls -------------------------------------------------------------


def _now_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


class Checkpoints:
    """Checkpoint operations on tasks; :class:`~taskbox.service.TaskService` delegates here."""

    def __init__(self, svc: TaskService) -> None:
        self.svc = svc
        self.root = svc.paths.home / "checkpoints"

    # --- helpers ---------------------------------------------------------------------------

    def store(self, task_id: str) -> Store:
        return Store(self.root / f"{task_id}.git", read_limit=self._read_limit(task_id))

    def _read_limit(self, task_id: str) -> int:
        """What a capture may read: the workspace's disk quota (more could never be restored into
        it), else the bound of an imported archive."""
        try:
            quota = (self.svc.get(task_id).metadata or {}).get("quota") or {}
        except NotFound:
            quota = {}
        disk = quota.get("disk") if isinstance(quota, dict) else None
        return int(disk) if isinstance(disk, int) and disk > 0 else int(self.svc.settings.archive_max_bytes)

    @contextmanager
    def locked(self, task_id: str) -> Iterator[None]:
        """One checkpoint operation per task at a time (across processes)."""
        self.svc.paths.locks.mkdir(parents=True, exist_ok=True)
        with open(self.svc.paths.locks / f"{task_id}.checkpoint.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def busy(self, task_id: str) -> bool:
        """Whether another process is in the middle of a checkpoint operation on the task."""
        self.svc.paths.locks.mkdir(parents=True, exist_ok=True)
        with open(self.svc.paths.locks / f"{task_id}.checkpoint.lock", "a") as fh:
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
            return dict(self.svc.sandbox.api.inspect_container(task.container_id)["State"])
        except Exception:  # gone, or Docker unreachable: work on the files alone
            return None

    @contextmanager
    def _frozen(self, task: Task) -> Iterator[bool]:
        """Freeze the task's container (if running) so nothing writes while files are read or put back."""
        state = self._container(task)
        paused = False
        if state and state.get("Running") and not state.get("Paused"):
            try:
                self.svc.sandbox.api.pause(task.container_id)
                paused = True
            except Exception as exc:  # noqa: BLE001 - a container that cannot pause is still checkpointed
                self.svc.registry.add_event("checkpoint.unpaused", task.id, {"reason": str(exc)[:200]})
        try:
            yield paused
        finally:
            if paused or (state and state.get("Paused")):
                try:
                    self.svc.sandbox.api.unpause(task.container_id)
                except Exception as exc:  # noqa: BLE001
                    self.svc.registry.add_event("checkpoint.unpause_failed", task.id, {"reason": str(exc)[:200]})

    def _workspace(self, task: Task) -> Path:
        ws = Path(task.workspace_path)
        if not _is_real_dir(ws):
            raise InvalidInput(f"task {task.id} has no workspace at {ws}", task_id=task.id)
        return ws

    # --- registry rows ---------------------------------------------------------------------

    def _rows(self, task_id: str) -> list[dict[str, Any]]:
        conn = self.svc.registry._conn()
        rows = conn.execute("SELECT * FROM checkpoints WHERE task_id = ? ORDER BY created_at, rowid",
                            (task_id,)).fetchall()
        return [self._row(r) for r in rows]

    @staticmethod
    def _row(r: Any) -> dict[str, Any]:
        meta = json.loads(r["metadata"] or "{}")
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
        self.svc.get(task_id)
        conn = self.svc.registry._conn()
        row = conn.execute("SELECT * FROM checkpoints WHERE id = ?", (ref,)).fetchone()
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

    def rows(self, task_id: str) -> list[dict[str, Any]]:
        self.svc.get(task_id)
        current = self.svc.state(task_id).get("current_checkpoint")
        return [{**r, "current": r["checkpoint_id"] == current} for r in self._rows(task_id)]

    # --- create ----------------------------------------------------------------------------

    def create(self, task_id: str, name: str | None = None, description: str = "", *,
               include_filesystem: bool = False, trigger: str = "manual", pinned: bool = False,
               reason: str = "") -> dict[str, Any]:
        """Take a checkpoint of the task's workspace (and, if asked, its container's filesystem)."""
        from .default_plugins import plan

        t0 = time.perf_counter()
        task = self.svc.get(task_id)
        trigger = {"completion": "final", "on-detach": "detach"}.get(trigger, trigger)
        pinned = pinned or trigger == "final"
        if trigger not in TRIGGERS:
            raise InvalidInput(f"trigger {trigger!r} is not one of {', '.join(TRIGGERS)}")
        named = name is not None
        if name is not None:
            name = _check_name(name)
        description = _check_text("description", description or "", 2000)
        ws = self._workspace(task)
        if include_filesystem and not task.container_id:
            raise InvalidInput(f"task {task.id} has no container, so its filesystem cannot be captured; "
                               "start it first or checkpoint without --include-filesystem", task_id=task.id)
        store = self.store(task.id)
        with self.locked(task.id):
            self._finish_interrupted(task)
            store.ensure()
            rows = self._rows(task.id)
            cp_id = f"cp-{secrets.token_hex(6)}"
            name = name or f"{trigger}-{len(rows) + 1}"
            why = reason or {"manual": "requested", "detach": "saved on detach",
                             "final": "task completed"}.get(trigger, trigger)
            previous = self.svc.state(task.id).get("current_checkpoint")
            # Recorded first, so the checkpoint holds its own entry in Plan.md and state.json.
            self.svc.log_decision(task.id, f"Checkpoint `{name}` ({cp_id}) taken",
                                  context=f"trigger: {trigger}", rationale=why, agent="taskbox")
            plan.log_iteration(task, f"checkpoint `{name}` ({cp_id}, {trigger}): {why}")
            self.svc.memory(task).log_conversation({"role": "system", "kind": "checkpoint", "checkpoint_id": cp_id,
                                                    "name": name, "trigger": trigger})

            def mark(s: dict[str, Any]) -> None:
                s["current_checkpoint"] = cp_id
                s["metrics"]["checkpoints"] = s["metrics"].get("checkpoints", 0) + 1

            self.svc.update_state(task, mark)
            try:
                image = None
                with self._frozen(task):
                    units = store.capture(ws)
                    if include_filesystem:
                        image = self._commit_container(task, cp_id)
                commit = store.commit(units, {"task_id": task.id, "checkpoint_id": cp_id, "name": name,
                                              "created_at": time.time(), "trigger": trigger, "image": image},
                                      f"{name}\n\n{description}".strip())
                store.set_ref(cp_id, commit)
            except OSError as exc:  # e.g. the disk filled up: say so, as a taskbox error
                store.drop_temporaries()
                err = TaskboxError(f"could not take checkpoint {cp_id} of task {task.id}: {exc}")
                self._undo_mark(task, cp_id, previous, name, err)
                raise err from exc
            except BaseException as exc:
                store.drop_temporaries()  # space a failed write took is given back at once
                self._undo_mark(task, cp_id, previous, name, exc)
                raise
            stats = self._stats(store, rows[-1] if rows else None, units)
            meta = {"named": named, "commit": commit, "files": stats["files"], "changes": stats["changes"],
                    "duration_ms": _now_ms(t0), "image": image, "reason": why,
                    "units": [{"path": u.path, "kind": u.kind, "tree": u.tree} for u in units]}
            now = time.time()
            with self.svc.registry.tx() as conn:
                conn.execute(
                    "INSERT INTO checkpoints (id, task_id, name, description, trigger, ref, parent_id, pinned,"
                    " size_bytes, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cp_id, task.id, name, description, trigger, f"refs/checkpoints/{cp_id}", previous,
                     int(pinned), stats["bytes_added"], json.dumps(meta, sort_keys=True), now))
            self.svc.registry.add_event("checkpoint.created", task.id, {
                "checkpoint_id": cp_id, "name": name, "trigger": trigger, "files": stats["files"],
                "bytes_added": stats["bytes_added"], "duration_ms": meta["duration_ms"]})
            pruned = self._prune(task.id)
        row = self.get(task.id, cp_id)
        row["duration_ms"] = _now_ms(t0)
        row["pruned"] = pruned
        return row

    def _undo_mark(self, task: Task, cp_id: str, previous: str | None, name: str, exc: BaseException) -> None:
        from .default_plugins import plan

        msg = exc.message if isinstance(exc, TaskboxError) else f"{type(exc).__name__}: {exc}"

        def unmark(s: dict[str, Any]) -> None:
            if s.get("current_checkpoint") == cp_id:
                s["current_checkpoint"] = previous
                s["metrics"]["checkpoints"] = max(0, s["metrics"].get("checkpoints", 1) - 1)

        try:
            self.svc.update_state(task, unmark)
            self.svc.log_decision(task.id, f"Checkpoint `{name}` ({cp_id}) failed", context="checkpoint",
                                  rationale=msg[:500], agent="taskbox")
            plan.log_iteration(task, f"checkpoint `{name}` ({cp_id}) failed: {msg[:200]}")
            self.svc.registry.add_event("checkpoint.failed", task.id, {"checkpoint_id": cp_id, "error": msg[:500]})
        except (TaskboxError, OSError):
            pass  # the original error matters more than the record of it

    def _stats(self, store: Store, parent: dict[str, Any] | None, units: list[Unit]) -> dict[str, Any]:
        before = {f"{u['kind']}:{u['path']}": u["tree"] for u in (parent or {}).get("units", [])}
        changes = {"added": 0, "modified": 0, "deleted": 0}
        added = store.last_capture_bytes  # what this checkpoint's capture wrote: new content only
        files_total = 0
        for u in units:
            old = before.get(u.key)
            if old is None:
                if u.kind == "files":
                    files_total += store.count_entries(u.tree)
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

    def _commit_container(self, task: Task, cp_id: str) -> str:
        repo = f"{IMAGE_REPO}"
        tag = f"{self.svc.home_label[:8]}-{cp_id}"
        try:
            self.svc.sandbox.api.commit(task.container_id, repository=repo, tag=tag, pause=False,
                                        message=f"taskbox checkpoint {cp_id} of task {task.id}")
        except Exception as exc:
            raise SandboxError(f"could not capture the container filesystem of task {task.id}: {exc}") from exc
        return f"{repo}:{tag}"

    # --- restore ---------------------------------------------------------------------------

    def _journal(self, task_id: str) -> Path:
        return self.store(task_id).meta / "restore.json"

    def restore(self, task_id: str, ref: str | None = None, *, force: bool = False,
                session_id: str | None = None) -> dict[str, Any]:
        """Make the task's workspace exactly the checkpoint's (the newest if ``ref`` is None)."""
        t0 = time.perf_counter()
        task = self.svc.get(task_id)
        if ref is None:
            rows = self._rows(task.id)
            if not rows:
                raise NotFound(f"task {task.id} has no checkpoints yet", task_id=task.id)
            cp = rows[-1]
        else:
            cp = self.get(task.id, ref)
        others = [le for le in self.svc.registry.leases(task.id) if le.session_id != session_id]
        if others and not force:
            names = ", ".join(f"{le.agent} (session {le.session_id})" for le in others)
            raise TaskLocked(f"task {task.id} has an agent attached: {names}; detach it first or restore "
                             "with --force", task_id=task.id, holders=[le.to_dict() for le in others])
        ws = self._workspace(task)
        store = self.store(task.id)
        with self.locked(task.id):
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
            image_restored = False
            if cp.get("image"):
                image_restored = self._restore_container(task, cp["image"])

        def mark(s: dict[str, Any]) -> None:
            s["current_checkpoint"] = cp["checkpoint_id"]

        self.svc.update_state(task, mark)
        self.svc.log_decision(task.id, f"Restored checkpoint `{cp['name']}` ({cp['checkpoint_id']})",
                              context="restore" + (" (forced while agents were attached)" if others else ""),
                              rationale=f"{stats['changed']} changed, {stats['added']} brought back, "
                                        f"{stats['removed']} removed", agent="taskbox")
        result = {"success": True, "task_id": task.id, "checkpoint_id": cp["checkpoint_id"], "name": cp["name"],
                  "files_changed": stats["changed"], "files_restored": stats["added"],
                  "files_removed": stats["removed"], "container_restored": image_restored,
                  "forced": bool(others), "duration_ms": _now_ms(t0)}
        self.svc.registry.add_event("checkpoint.restored", task.id, result)
        return result

    def _restore_files(self, task: Task, ws: Path, store: Store, cp_id: str, commit: str,
                       keep: dict[str, str | None] | None = None) -> dict[str, int]:
        manifest = store.manifest(commit)
        target: list[Unit] = manifest["units"]
        # One descriptor of the root for the whole restore: every path below it is resolved
        # from there, link by link refused (see the module docstring).
        with rooted(ws) as rfd:
            current = store.scan(rfd)
            # Every object the checkpoint needs that the workspace lacks is read in full first:
            # a damaged store is reported while the workspace is still untouched.
            try:
                plans = _plan(store, current, target)
                store.verify_blobs([p.entries[path][1] for p in plans for path in p.write])
            except GitError as exc:
                raise _corrupted(f"checkpoint {cp_id} cannot be restored", exc,
                                 "; the workspace was not changed") from exc
            journal = self._journal(task.id)
            if keep is None:
                keep = self._preserve(task, ws, store)
            _write_json(journal, {"checkpoint_id": cp_id, "commit": commit, "keep": keep,
                                  "started_at": time.time(), "pid": os.getpid()})
            try:
                stats = _apply(store, rfd, current, plans)
            except GitError as exc:
                raise _corrupted(f"restore of checkpoint {cp_id} failed part-way; `taskbox doctor --fix` "
                                 "finishes it", exc) from exc
            except OSError as exc:
                raise TaskboxError(f"restore of checkpoint {cp_id} failed part-way ({exc.strerror or exc}); "
                                   "`taskbox doctor --fix` finishes it") from exc
        self._put_back(ws, store, keep)
        journal.unlink(missing_ok=True)
        return stats

    def _preserve(self, task: Task, ws: Path, store: Store) -> dict[str, str | None]:
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
            self.svc.registry.add_event("checkpoint.journal_unreadable", task.id, {"kept_as": str(aside)})
            raise CheckpointCorrupted(
                f"an interrupted restore left an unreadable journal (kept as {aside}): {exc}; the workspace "
                "may be half restored, so restore a checkpoint again", task_id=task.id) from exc
        store = self.store(task.id)
        with self._frozen(task):
            self._restore_files(task, Path(task.workspace_path), store, data["checkpoint_id"], data["commit"],
                                keep=data.get("keep") or {})
        self.svc.registry.add_event("checkpoint.restore_finished", task.id, {"checkpoint_id": data["checkpoint_id"]})
        return str(data["checkpoint_id"])

    def _check_image(self, image: str) -> None:
        try:
            self.svc.sandbox.api.inspect_image(image)
        except Exception as exc:
            raise CheckpointCorrupted(f"the container image {image} of this checkpoint is gone") from exc

    def _restore_container(self, task: Task, image: str) -> bool:
        from .models import ContainerState

        was_running = self.svc.sandbox.state(task.container_id) is ContainerState.RUNNING
        if task.container_id:
            self.svc.sandbox.remove(task.container_id)
        task = self.svc._update(task.id, {"image": image, "container_id": None, "container_state": ContainerState.NONE},
                                ("container.removed", {"reason": "checkpoint restore", "image": image}))
        if was_running:
            self.svc.ensure_running(task.id)
        return True

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

    def diff(self, task_id: str, a: str, b: str, *, patch: bool = True, limit: int = 200_000) -> dict[str, Any]:
        """What changed between two checkpoints (``current`` is the workspace as it is now)."""
        task = self.svc.get(task_id)
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
                                    "path": _join(unit.path, path)})
            if unit.kind == "files":
                before = set(left[key].empty_dirs) if key in left else set()
                after = set(right[key].empty_dirs) if key in right else set()
                changes += [{"status": "added", "path": _join(unit.path, d) + "/"} for d in sorted(after - before)]
                changes += [{"status": "deleted", "path": _join(unit.path, d) + "/"} for d in sorted(before - after)]
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
        max_n = max(1, int(self.svc.settings.checkpoint_max_per_task))
        max_age = float(self.svc.settings.checkpoint_max_age_days) * 86400
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
            self.svc.registry.add_event("checkpoint.pruned", task_id,
                                        {"checkpoints": [r["checkpoint_id"] for r in doomed]})
        return [r["checkpoint_id"] for r in doomed]

    def _delete(self, store: Store, row: dict[str, Any]) -> None:
        store.delete_ref(row["checkpoint_id"])
        with self.svc.registry.tx() as conn:
            conn.execute("DELETE FROM checkpoints WHERE id = ?", (row["checkpoint_id"],))
        if row.get("image"):
            self._remove_image(row["image"])

    def _remove_image(self, image: str) -> bool:
        try:
            self.svc.sandbox.api.remove_image(image)
            return True
        except Exception:  # in use by the task's container, or already gone: gc tries again
            return False

    def prune(self, task_id: str) -> list[str]:
        self.svc.get(task_id)
        with self.locked(task_id):
            return self._prune(task_id)

    def delete(self, task_id: str, ref: str) -> dict[str, Any]:
        row = self.get(task_id, ref)
        with self.locked(task_id):
            self._delete(self.store(task_id), row)
        self.svc.registry.add_event("checkpoint.deleted", task_id, {"checkpoint_id": row["checkpoint_id"]})
        return row

    def gc(self) -> dict[str, Any]:
        """Retention for every task, stores of deleted tasks removed, space reclaimed."""
        out: dict[str, Any] = {"pruned": [], "stores_removed": [], "bytes_before": 0, "bytes_after": 0}
        if not self.root.is_dir():
            return out
        known = {t.id for t in self.svc.registry.list_tasks()}
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
        self.svc.registry.add_event("checkpoint.gc", None, {k: v for k, v in out.items()})
        return out

    def _gc_images(self) -> None:
        try:
            images = self.svc.sandbox.api.images(name=IMAGE_REPO)
        except Exception:  # noqa: BLE001 - Docker down: images are left for the next gc
            return
        conn = self.svc.registry._conn()
        used = {json.loads(r[0] or "{}").get("image") for r in conn.execute("SELECT metadata FROM checkpoints")}
        prefix = f"{IMAGE_REPO}:{self.svc.home_label[:8]}-"
        for img in images:
            for tag in img.get("RepoTags") or []:
                if tag.startswith(prefix) and tag not in used:
                    self._remove_image(tag)

    # --- export / import -------------------------------------------------------------------

    def export(self, task_id: str, ref: str, path: str | Path) -> dict[str, Any]:
        """Write a checkpoint as a portable ``.tar.gz``: ``checkpoint.json`` and ``workspace/``."""
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
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        info = {k: cp[k] for k in ("checkpoint_id", "task_id", "name", "description", "trigger", "created_at")}
        info.update(format=FORMAT, units=[u.to_dict() for u in manifest["units"]])
        mtime = int(cp["created_at"])
        try:
            with tarfile.open(tmp, "w:gz", compresslevel=6) as tar, \
                    tempfile.TemporaryDirectory(dir=store.meta) as scratch:
                body = json.dumps(info, indent=2, sort_keys=True).encode()
                ti = tarfile.TarInfo("checkpoint.json")
                ti.size, ti.mtime, ti.mode = len(body), mtime, 0o644
                tar.addfile(ti, io.BytesIO(body))
                for unit in sorted(manifest["units"], key=lambda u: (u.path.count("/"), u.path)):
                    prefix = _join("workspace", unit.path)
                    if unit.tree != EMPTY_TREE:
                        part = Path(scratch) / "unit.tar"
                        store.git(["archive", "--format=tar", "-o", str(part), unit.tree])
                        with tarfile.open(part) as src:
                            for m in src:
                                if m.type in (tarfile.XGLTYPE, tarfile.XHDTYPE):
                                    continue
                                m.name = _join(prefix, m.name.rstrip("/"))
                                m.uid = m.gid = 0
                                m.uname = m.gname = ""
                                m.mtime = mtime
                                tar.addfile(m, src.extractfile(m) if m.isreg() else None)
                        part.unlink()
                    for d in unit.empty_dirs:
                        ti = tarfile.TarInfo(_join(prefix, d))
                        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
                        tar.addfile(ti)
                    if unit.dotgit:
                        ti = tarfile.TarInfo(_join(prefix, ".git"))
                        ti.mtime = mtime
                        if unit.dotgit["type"] == "link":
                            ti.type, ti.linkname = tarfile.SYMTYPE, unit.dotgit["target"]
                            tar.addfile(ti)
                        else:
                            data = base64.b64decode(unit.dotgit["data"])
                            ti.size, ti.mode = len(data), int(unit.dotgit.get("mode", 0o644))
                            tar.addfile(ti, io.BytesIO(data))
            os.replace(tmp, out)
        except GitError as exc:
            tmp.unlink(missing_ok=True)
            raise _corrupted(f"checkpoint {cp['checkpoint_id']} cannot be exported", exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.svc.registry.add_event("checkpoint.exported", task_id,
                                    {"checkpoint_id": cp["checkpoint_id"], "path": str(out)})
        return {"task_id": task_id, "checkpoint_id": cp["checkpoint_id"], "path": str(out.resolve()),
                "size_bytes": out.stat().st_size}

    def import_(self, task_id: str, path: str | Path) -> dict[str, Any]:
        """Read an exported ``.tar.gz`` into a new checkpoint of ``task_id`` (nothing is extracted)."""
        t0 = time.perf_counter()
        task = self.svc.get(task_id)
        src = Path(path).expanduser()
        if not src.is_file():
            raise NotFound(f"no file {src}", path=str(src))
        store = self.store(task.id)
        with self.locked(task.id):
            store.ensure()
            with tempfile.TemporaryDirectory(dir=store.meta) as scratch:
                info, units, count = _read_archive(store, src, Path(scratch),
                                                   archive.Limits.from_settings(self.svc.settings))
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
            with self.svc.registry.tx() as conn:
                conn.execute(
                    "INSERT INTO checkpoints (id, task_id, name, description, trigger, ref, parent_id, pinned,"
                    " size_bytes, metadata, created_at) VALUES (?, ?, ?, ?, 'import', ?, NULL, 0, ?, ?, ?)",
                    (cp_id, task.id, name, description, f"refs/checkpoints/{cp_id}", src.stat().st_size,
                     json.dumps(meta, sort_keys=True), time.time()))
        self.svc.log_decision(task.id, f"Imported checkpoint `{name}` ({cp_id}) from {src.name}",
                              context="import", agent="taskbox")
        self.svc.registry.add_event("checkpoint.imported", task.id, {"checkpoint_id": cp_id, "path": str(src)})
        return self.get(task.id, cp_id)

    # --- doctor ----------------------------------------------------------------------------

    def reconcile(self, found: Findings) -> None:
        """Add findings for `taskbox doctor`: interrupted restores, frozen containers, lost checkpoints."""

        for task in self.svc.registry.list_tasks():
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
                    self.svc.sandbox.api.unpause(t.container_id)
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


# --- archives ----------------------------------------------------------------------------------


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


def _read_archive(store: Store, src: Path, scratch: Path,
                  limits: archive.Limits) -> tuple[dict[str, Any], list[Unit], int]:
    """Validate an exported archive and write its content into the store as units.

    The archive is read once, as a stream, through :func:`taskbox.archive.members` — the one
    archive validator — bounded by ``limits`` (expanded bytes, members, ratio): absolute
    names, ``..``, devices, fifos, hard links, links that point out of ``workspace/``, and a
    path through a link or a file are refused. Nothing is ever extracted to a path the
    archive names: file contents go to numbered scratch files and from there into git objects.
    """
    info: dict[str, Any] = {}
    entries: dict[str, tarfile.TarInfo] = {}
    data: dict[str, Path] = {}  # regular file -> its scratch copy
    for name, m, fh in archive.members(src, limits, symlinks="inside", hardlinks=False, root="workspace"):
        if name == "checkpoint.json" and m.isreg():
            try:
                info = json.loads(fh.read(1_000_000)) if fh else {}
            except ValueError as exc:
                raise InvalidInput(f"checkpoint.json in {src} is not valid JSON") from exc
            continue
        if name in ("workspace", ".") and m.isdir():
            continue
        if not name.startswith("workspace/"):
            raise InvalidInput(f"refusing to import: {m.name!r} is not under workspace/ (not an exported "
                               "checkpoint?)", member=m.name)
        rel = name[len("workspace/"):]
        entries[rel] = m
        if fh is not None:
            fn = scratch / f"f{len(data)}"
            with open(fn, "wb") as out:
                shutil.copyfileobj(fh, out, 1 << 20)
            data[rel] = fn
    fmt = info.get("format", FORMAT) if isinstance(info, dict) else None
    if fmt != FORMAT:
        raise InvalidInput(f"{src}: unknown checkpoint format {fmt!r}")

    # Which unit each path belongs to: a component ``.git`` starts a gitdir unit; a
    # directory holding a ``.git`` is a nested files unit.
    roots = {""} | {posixpath.dirname(r) if r.endswith("/.git") or r == ".git" else "" for r in entries
                    if r == ".git" or r.endswith("/.git")}
    for rel in entries:
        comps = rel.split("/")
        if ".git" in comps[:-1]:
            roots.add("/".join(comps[:comps.index(".git")]))

    def owner(rel: str) -> tuple[str, str, str]:
        comps = rel.split("/")
        if ".git" in comps[:-1] or (comps[-1] == ".git" and entries[rel].isdir()):
            i = comps.index(".git")
            return "gitdir", "/".join(comps[:i + 1]), "/".join(comps[i + 1:])
        best = max((r for r in roots if r == "" or rel == r or rel.startswith(r + "/")), key=len)
        if rel == best:  # the root of a nested unit: it belongs to its parent as a directory
            best = max((r for r in roots if r != rel and (r == "" or rel.startswith(r + "/"))), key=len)
        return "files", best, rel[len(best) + 1:] if best else rel

    units: dict[str, Unit] = {}
    index_lines: dict[str, list[str]] = {}
    blobs: list[tuple[str, str, str]] = []  # (unit key, mode, path)
    scratch_paths: list[str] = []
    dirs: dict[str, set[str]] = {}
    has_child: set[str] = set()
    count = 0
    for rel, m in entries.items():
        kind, upath, sub = owner(rel)
        key = f"{kind}:{upath}"
        unit = units.setdefault(key, Unit(upath, kind))
        if kind == "files" and sub == ".git" and not m.isdir():
            if m.issym():
                unit.dotgit = {"type": "link", "target": m.linkname}
            else:
                with open(data[rel], "rb") as f:
                    raw = f.read(65537)
                unit.dotgit = {"type": "file", "data": base64.b64encode(raw).decode(), "mode": m.mode & 0o777}
            continue
        if kind == "files" and rel in roots and rel != upath:
            continue
        p = posixpath.dirname(sub)
        while p:
            has_child.add(f"{key}\0{p}")
            p = posixpath.dirname(p)
        if m.isdir():
            if sub:
                dirs.setdefault(key, set()).add(sub)
            continue
        if m.issym():
            fn = scratch / f"l{len(scratch_paths)}"
            fn.write_bytes(os.fsencode(m.linkname))
            mode = "120000"
        else:
            fn = data[rel]
            mode = "100755" if m.mode & 0o100 else "100644"
        scratch_paths.append(str(fn))
        blobs.append((key, mode, sub))
        count += kind == "files"
    for r in roots - {""}:
        key = f"files:{r}"
        units.setdefault(key, Unit(r, "files"))
        parent_kind, parent_path, _sub = owner(r) if r in entries else ("files", "", r)
        units.setdefault(f"{parent_kind}:{parent_path}", Unit(parent_path, parent_kind))
    units.setdefault("files:", Unit("", "files"))
    shas: list[str] = []
    if scratch_paths:
        shas = store.git(["hash-object", "-w", "--no-filters", "--stdin-paths"],
                         input=("\n".join(scratch_paths) + "\n").encode(errors="surrogateescape")).stdout.split()
    for (key, mode, sub), sha in zip(blobs, shas, strict=True):
        index_lines.setdefault(key, []).append(f"{mode} {sha}\t{sub}")
    for key, unit in units.items():
        unit.empty_dirs = sorted(d for d in dirs.get(key, set()) if f"{key}\0{d}" not in has_child)
        if unit.kind == "files":
            unit.nested = sorted(r[len(unit.path) + 1:] if unit.path else r for r in roots
                                 if r and r != unit.path and (not unit.path or r.startswith(unit.path + "/"))
                                 and units.get(f"files:{r}") is not None
                                 and max((q for q in roots if q != r and (q == "" or r.startswith(q + "/"))),
                                         key=len) == unit.path)
        lines = index_lines.get(key)
        if lines:
            index = scratch / f"index-{secrets.token_hex(4)}"
            store.git(["update-index", "--add", "-z", "--index-info"], index=index,
                      input=("\0".join(lines) + "\0").encode(errors="surrogateescape"))
            unit.tree = store.git(["write-tree"], index=index).stdout.strip()
        else:
            store.git(["write-tree"], index=scratch / "empty-index")  # makes sure the empty tree exists
    ordered = sorted(units.values(), key=lambda u: (u.path.count("/"), u.path, u.kind != "files"))
    return info, ordered, count
