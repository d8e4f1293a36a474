"""The snapshot store (SPEC §5): a task's private, content-addressed store of workspace trees.

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
streamed to ``git fast-import`` (a pack, or loose objects for small imports), and each
unit's tree is built there from the previous one with only the changed paths. Files of
2 MiB or more are cut into content-defined chunks (see _next_cut), written to a pack of our
own, and stand in the tree as a chunk list, so a small change to a large file stores the
chunks it touched. A stat cache per unit (size, mtime, ctime, inode, mode → blob id, the
chunk lists, and the tree it describes, kept under TASKBOX_HOME) means an incremental
checkpoint reads only changed files; an entry changed within 50 ms of the capture is not
trusted next time (timestamps are coarse).

Git cannot hold some things in a tree, so a snapshot is a set of *units*:

- ``files`` units: the workspace (and each nested repository inside it — any directory
  holding a ``.git`` entry, e.g. a cloned dependency);
- ``gitdir`` units: the workspace's own ``.git`` directory (and those of nested
  repositories), captured byte for byte as files (lock files left out), so a restore brings
  back the task's branch, history, index and configuration too;
- a ``manifest.json`` blob: the units, their empty directories (git drops them) and a
  ``.git`` that is a file or a link.

**Restore** works in place (the container bind-mounts the workspace directory, so it must
not be swapped): :func:`plan_restore` then :func:`apply_restore`. The workspace is walked
as for a capture; the target entries come from the store (``diff-tree`` against what the
walk saw, ``ls-tree`` for a unit that is new) and their contents from ``cat-file --batch``.
Everything is done relative to directory descriptors opened without following links: files
are written to a temporary name (a chunked file from the chunks the file there already
holds, copied in the kernel, and the rest from the store) and ``renameat``-ed into place, links made with
``symlinkat``, directories with ``mkdirat``, extras removed with
:func:`taskbox.files.remove_at`; a link standing where a directory belongs is removed as a
link (never followed), then the directory made. Every restored entry — not only the
changed ones — gets the sandbox user as owner and its exact mode, so finishing an
interrupted restore leaves nothing half-owned.

The checkpoint lifecycle on top of this store (the registry rows, the restore journal,
retention) is :mod:`taskbox.checkpoints`; the portable archive format is
:mod:`taskbox.checkpoint_archive`.
"""

from __future__ import annotations

import base64
import collections
import errno
import functools
import hashlib
import io
import json
import marshal
import os
import posixpath
import queue
import re
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import faults, files, git
from .confine import O_PATH, lstat_at, read_fd, rooted, sandbox_owner
from .errors import CheckpointCorrupted, GitError, InvalidInput, TaskboxError

FORMAT = 1
MANIFEST = "manifest.json"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"

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
_CACHE_VERSION = 5  # 3: chunked files; 4: their tails in pieces; 5: their prefixes
_CACHE_MAGIC = b"taskbox-stat-cache\n"  # our own file under TASKBOX_HOME; anything else is not parsed
_CAPTURE_REF = "refs/taskbox/capture"
# glibc's malloc gives freed memory at the top of the heap back to the system past 128 KiB.
# zlib's state for each object git writes or reads is about 256 KiB, so for every small
# file fast-import grew the heap and shrank it again (4-5 brk calls and the page faults
# after each): more system time than its own work. The store's git keeps up to this much
# freed memory instead (glibc only; others ignore it).
_GIT_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
_NULL_SHA = "0" * 40
_NEEDS_QUOTE = re.compile(rb'[\x00-\x1f"\\\x7f]')

# --- content-defined chunking of large files ---------------------------------------------------
#
# A file of _CHUNK_THRESHOLD bytes or more is stored as chunks (git blobs) cut where the
# content says, as restic, borg and kopia do: appending to it, or changing a few bytes in the
# middle, stores the chunks that changed, not the file again. Its entry in the unit's tree is
# a small chunk list (see _chunk_list), and the unit's manifest names the paths that are
# chunked (Unit.chunked), so a whole file whose bytes happen to look like a chunk list is
# never taken for one. Where the cuts fall only affects how well content is shared; a file
# is always rebuilt from the chunks its list names, so the cut rule may change without
# harm to what is stored.
#
# The cut rule (restic's sizes: at least 512 KiB, at most 8 MiB, about 1 MiB on average):
# a chunk ends after byte c when the 4 bytes before c, each mapped to one of 16 symbols by a
# fixed random table, spell _CDC_PATTERN (one position in 2^16), and the CRC-32 of the 64
# bytes before c has its low 3 bits clear (one in 8). The first test runs at C speed
# (``bytes.translate`` and ``bytes.find``), the second only where the first matched; both
# depend on the 64-byte window before c alone, so cuts move with the content when bytes
# are inserted or removed before them. Runs of one byte, or of a period below 4, never
# match (the pattern has four different symbols): zeros are cut every 8 MiB, into chunks
# that are all the same one.
_CHUNK_THRESHOLD = 2 << 20
_CDC_MIN = 512 << 10
_CDC_MAX = 8 << 20
_CDC_WINDOW = 64
_TAIL_PIECE = 256 << 10  # what follows the last cut is stored in pieces this long
# Bytes mapped to symbols at a time while looking for a cut: a cut is about 512 KiB past the
# first place it may fall, so steps of 256 KiB map about 640 KiB a chunk, where steps of
# 1 MiB mapped more than 1 MiB (the cuts found are the same whatever the step).
_CDC_STEP = 256 << 10
_CDC_SYMBOLS = bytes(0x41 + ((b * 3 + (b >> 3)) & 7) for b in range(256))
_CDC_PATTERN = bytes(0x41 + s for s in (5, 1, 1, 7, 2, 6))
_CDC_CRC_MASK = 1
_READ_BLOCK = 16 << 20
_FEED_QUEUE = 32  # batches (of about _CHUNK bytes) waiting for fast-import: the most held in memory
_PACK_BUFFER = 16 << 20  # new chunk data gathered in memory before a pack is written (by the chunking thread)
_CHUNK_LIST_MAGIC = b"taskbox-chunks 1\n"
CHUNK_LIST_LIMIT = 64 << 20  # the longest chunk list read back (a 10 TB file of 8 MiB chunks)
_CHUNK_LINE = re.compile(rb"([0-9a-f]{40}) ([1-9][0-9]{0,8})\n")
Chunks = list[tuple[str, int]]  # (blob id, length) in file order


def _next_cut(buf: bytearray, start: int, end: int, eof: bool) -> int:
    """Where the chunk that starts at ``buf[start]`` ends; ``buf[start:end]`` holds at least
    _CDC_MAX bytes, or all the file has left (``eof``)."""
    hi = min(end, start + _CDC_MAX)
    a = start + _CDC_MIN
    plen = len(_CDC_PATTERN)
    while a <= hi:  # candidate ends a..b
        b = min(a + _CDC_STEP, hi)
        syms = buf[a - plen:b].translate(_CDC_SYMBOLS)
        i = syms.find(_CDC_PATTERN)
        while i >= 0:
            c = a + i
            if not zlib.crc32(buf[c - _CDC_WINDOW:c]) & _CDC_CRC_MASK:
                return c
            i = syms.find(_CDC_PATTERN, i + 1)
        a = b + 1
    return hi


def _blob_id(data: bytes | memoryview) -> str:
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def _read_buffer(size: int, buf: bytearray | None = None) -> bytearray:
    """A buffer for reading a file of ``size`` bytes: ``buf`` if it is long enough, else a new one.

    The file whole if it is shorter than a block and the longest chunk: a 3 MB file does not
    cost 24 MB of zeroed memory (and its page faults); a capture reuses one buffer for all.
    """
    need = min(size, _READ_BLOCK + _CDC_MAX)
    return buf if buf is not None and len(buf) >= need else bytearray(max(need, 1))


class _FileReader:
    """Reads an open file forward into one reused buffer, never past ``size`` (what was charged)."""

    def __init__(self, fd: int, size: int, buf: bytearray | None = None) -> None:
        self.fd, self.size = fd, size
        self.buf = _read_buffer(size, buf)
        self.view = memoryview(self.buf)
        self.pos = self.end = 0  # the unread bytes are buf[pos:end]
        self.base = 0  # the file offset of buf[0]
        self.eof = size <= 0

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def fill(self, need: int) -> None:
        """Hold at least ``need`` (<= _CDC_MAX) bytes from the current offset, or all that is left."""
        have = self.end - self.pos
        if have >= need or self.eof:
            return
        if self.pos:
            self.buf[:have] = bytes(self.view[self.pos:self.end])  # a copy: the two ranges may overlap
            self.base += self.pos
            self.pos, self.end = 0, have
        at = self.base + self.end
        want = min(len(self.buf) - self.end, self.size - at)
        while want > 0:
            got = os.preadv(self.fd, [self.view[self.end:self.end + want]], at)
            if not got:  # shorter than it was: what is there is what is stored
                self.size = at
                break
            self.end += got
            at += got
            want -= got
        if at >= self.size:
            self.eof = True


Prefix = tuple[int, str]  # (length, SHA-1 of the file's first ``length`` bytes): up to its last cut


def _chunk_file(fd: int, size: int, old: Chunks | None, put: Callable[[str, memoryview], None],
                prefix: Prefix | None = None, buf: bytearray | None = None) -> tuple[Chunks, bool, Prefix | None]:
    """The chunks of the open file ``fd`` (``size`` bytes), handing new ones to ``put``.

    What follows the last cut (the *tail*: no cut is found before the end of the file) is
    stored in fixed pieces of _TAIL_PIECE bytes, so appending to a file stores its last
    piece again, not the whole last chunk (up to 8 MiB); a piece is shorter than any chunk
    (_CDC_MIN), so the tail of a chunk list is known by its lengths.

    ``old`` is the file's chunk list from the last capture: where the file still holds one
    of its chunks at a cut (checked by its blob id: a SHA-1 of the bytes, no cheaper test),
    the chunk is kept without looking for cuts inside it. From the first one that differs
    (an append: the old tail) cuts are looked for afresh, until one falls where an old one
    did (shifted by the change in size); from there the old chunks are checked again. The
    result is the same as chunking the file afresh.

    ``prefix`` is the SHA-1 of the file up to its last cut, from the last capture: when the
    file still starts with those bytes (an append), its chunks up to there are all kept after
    one pass of hashing in large blocks, instead of one hash per chunk (each of which, in the
    chunking thread, waits to get the GIL back from the walk).

    ``buf`` is a buffer to read into (see _read_buffer); ``put`` must be done with each
    chunk's bytes before it returns (the buffer is reused).

    Returns the chunks, whether the file was read whole (False: it shrank while it was
    read) and its new prefix.
    """
    old = old or []
    real = len(old)
    while real and old[real - 1][1] <= _TAIL_PIECE:
        real -= 1  # old[real:] is the old tail: never kept as it is, its pieces are not cuts
    starts: dict[int, int] = {}  # where old chunk k starts now, if the bytes before it only moved
    delta = size - sum(n for _sha, n in old)
    at = 0
    for k in range(real + 1):
        starts.setdefault(at + delta, k)
        at += old[k][1] if k < real else 0
    r = _FileReader(fd, size, buf)
    out: Chunks = []
    whole_prefix = hashlib.sha1()  # the file up to the last cut found (all of ``out`` but the tail)
    j: int | None = 0 if old else None
    kept_end = sum(n for _sha, n in old[:real])
    if real and prefix is not None and prefix[0] == kept_end < size:
        while r.offset < kept_end:
            r.fill(min(_CDC_MAX, kept_end - r.offset))
            k = min(r.end - r.pos, kept_end - r.offset)
            if k <= 0:
                break
            whole_prefix.update(r.view[r.pos:r.pos + k])
            r.pos += k
        if r.offset == kept_end and whole_prefix.hexdigest() == prefix[1]:
            out, j = list(old[:real]), real  # all kept; from the old tail on, afresh
        else:  # changed before the old tail: chunk by chunk, from the start
            r, whole_prefix = _FileReader(fd, size, r.buf), hashlib.sha1()
    while True:
        r.fill(1)
        if r.pos >= r.end:
            break
        if j is not None and j < real:
            sha, n = old[j]
            r.fill(n)
            view = r.view[r.pos:r.pos + n]
            # A chunk that now ends at the end of the file is the tail: pieces, not kept.
            if len(view) == n and r.offset + n < r.size and _blob_id(view) == sha:
                whole_prefix.update(view)
                r.pos += n
                out.append((sha, n))
                j += 1
                continue
            j = None
        r.fill(_CDC_MAX)
        c = _next_cut(r.buf, r.pos, r.end, r.eof)
        if r.eof and c == r.end:  # the tail
            while r.pos < r.end:
                view = r.view[r.pos:min(r.pos + _TAIL_PIECE, r.end)]
                r.pos += len(view)
                sha = _blob_id(view)
                put(sha, view)
                out.append((sha, len(view)))
            break
        view = r.view[r.pos:c]
        r.pos = c
        sha = _blob_id(view)
        whole_prefix.update(view)
        put(sha, view)
        out.append((sha, len(view)))
        j = starts.get(r.offset)
    cut_end = sum(n for _sha, n in out if n > _TAIL_PIECE) if out else 0
    return out, r.size == size, (cut_end, whole_prefix.hexdigest())


def _chunk_list(chunks: Chunks) -> bytes:
    """The blob that stands for a chunked file in its unit's tree."""
    return _CHUNK_LIST_MAGIC + b"".join(b"%s %d\n" % (sha.encode(), n) for sha, n in chunks)


def parse_chunk_list(data: bytes, what: str) -> Chunks:
    """A chunk list read back from the store; anything else is a damaged store."""
    if not data.startswith(_CHUNK_LIST_MAGIC):
        raise CheckpointCorrupted(f"the chunk list of {what} in the checkpoint store is damaged")
    body = data[len(_CHUNK_LIST_MAGIC):]
    out: Chunks = []
    pos = 0
    match = _CHUNK_LINE.match
    while pos < len(body):
        m = match(body, pos)
        if m is None or int(m.group(2)) > _CDC_MAX:
            raise CheckpointCorrupted(f"the chunk list of {what} in the checkpoint store is damaged")
        out.append((m.group(1).decode(), int(m.group(2))))
        pos = m.end()
    return out


# Small files of at least this many bytes that look incompressible (_incompressible) go to a
# pack of our own as they are, not through fast-import, which would spend zlib on them (at
# its slowest on such data, and for nothing: most of a first checkpoint of many such files).
_RAW_MIN = 4096



def _read_exactly(fd: int, size: int) -> tuple[bytes, bool]:
    """``size`` bytes of ``fd`` from its offset, and whether they were all there: a file cut
    short while read is padded with zeros, so the declared size is stored all the same."""
    data = b""
    while len(data) < size:
        got = os.read(fd, size - len(data))
        if not got:
            break
        data += got
    return data + bytes(size - len(data)), len(data) == size

def _incompressible(data: bytes) -> bool:
    """Whether a small file's bytes look incompressible (random, compressed or encrypted).

    Cheaper than any zlib call (whose set-up alone costs as much as compressing a few KB):
    512 bytes from its middle hold more than 192 different byte values. Random bytes give
    about 220; text, code, executables and other compressible data well under 150. A wrong
    guess costs space or time, never content: the bytes are stored as they are either way.
    """
    mid = len(data) // 2
    return len(set(data[max(0, mid - 256):mid + 256])) > 192


def _compressible(data: memoryview) -> bool:
    """Whether zlib is worth its time on a chunk, judged from a sample from its middle."""
    mid = len(data) // 2
    sample = data[mid:mid + 16384]
    return len(zlib.compress(sample, 1)) < len(sample) * 0.9


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
    # Files stored as chunks: their tree entry is a chunk list (see _chunk_list), not the content.
    chunked: list[str] = field(default_factory=list)
    # The chunks those lists name (not in the manifest: the checkpoint's tree holds them, so
    # git keeps them and gc does not drop them).
    chunk_ids: set[str] = field(default_factory=set, repr=False, compare=False)
    entries: int | None = field(default=None, repr=False, compare=False)  # files and links, as captured

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.path}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "tree": self.tree, "empty_dirs": self.empty_dirs,
                "nested": self.nested, "dotgit": self.dotgit, "modes": self.modes, "chunked": self.chunked}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(str(d["path"]), str(d["kind"]), str(d["tree"]), list(d.get("empty_dirs") or []),
                   list(d.get("nested") or []), d.get("dotgit"), d.get("modes"),
                   [str(p) for p in d.get("chunked") or []])


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
    chunks: dict[str, Chunks] = field(default_factory=dict)  # the chunked files seen, with their chunks
    cache_chunks: dict[str, Chunks] = field(default_factory=dict)  # the last capture's
    prefix: dict[str, Prefix] = field(default_factory=dict)  # the chunked files' prefixes (see _chunk_file)
    cache_prefix: dict[str, Prefix] = field(default_factory=dict)
    hot: set[str] = field(default_factory=set)  # the cached chunked files and their directories ("" too)


def _visit_order(subdirs: list[str], dir_entries: list[os.DirEntry[str]]) -> list[str]:
    """The order a first capture enters a directory's subdirectories in.

    Large files are hashed and chunked in a thread beside the walk, so the sooner the walk
    meets them, the less of that work is left when it ends. With no stat cache to say where
    they are (a later capture visits the directories of the files it chunked last time
    first), those with fewer subdirectories come first (their link count, from an lstat
    that is only a hint: what is entered is still opened without following links and
    checked): large files tend to sit in flat folders (assets/, models/, data/) and the many
    small ones in deep trees (src/, node_modules/, .venv/). Only the order changes: what is
    captured is the same.
    """
    links: dict[str, int] = {}
    for entry in dir_entries:
        try:
            links[entry.name] = entry.stat(follow_symlinks=False).st_nlink
        except OSError:
            pass
    return sorted(subdirs, key=lambda n: links.get(n, 0))


def join(*parts: str) -> str:
    """Posix path parts joined, empty ones (a unit at the workspace root) left out."""
    return "/".join(p for p in parts if p)



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
        self.read_total = 0
        self.pending: list[bytes] = []
        self.pending_size = 0
        # Batches go to fast-import from a thread: the walk goes on while fast-import takes
        # them in (the pipe holds 64 KB; writing there itself, the walk waited on
        # fast-import's pace for about half its time).
        self.queue: queue.Queue[bytes | None] | None = None
        self.feeder: threading.Thread | None = None
        self.feed_error: BaseException | None = None

    def charge(self, size: int, name: str) -> None:
        """Count ``size`` bytes about to be read; refuse past the store's read limit, before reading."""
        self.read_total += size
        limit = self.store.read_limit
        if limit is not None and self.read_total > limit:
            raise InvalidInput(f"the workspace holds more than {limit} bytes of file contents to read (sparse "
                               f"files count whole; {name!r} is {size} bytes); delete large files and try again")

    def _pipe(self) -> IO[bytes]:
        if self.out is None:
            self.errors = tempfile.TemporaryFile()  # not in the store: it may be the full disk
            # Below fastimport.unpackLimit (100) objects an import becomes loose objects.
            self.proc = self.store.popen(
                ["-c", "pack.compression=1", "-c", "fastimport.unpackLimit=100", "fast-import", "--quiet",
                 "--done", "--force", "--depth=0", f"--export-marks={self.marks_file}"], stderr=self.errors)
            assert self.proc.stdin is not None
            self.out = self.proc.stdin
        return self.out

    def _write(self, data: bytes | memoryview) -> None:
        # Gathered and sent 1 MB at a time: fast-import woken for every 8 KB of small files
        # costs it as much CPU again as the import itself.
        self.pending.append(bytes(data) if isinstance(data, memoryview) else data)
        self.pending_size += len(data)
        if self.pending_size >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_size = 0
        if self.queue is None:
            self._start_feeder(self._pipe())
        assert self.queue is not None
        if self.feed_error is not None:  # fast-import died (e.g. the disk is full)
            raise self._failure() from self.feed_error
        self.queue.put(data)

    def _start_feeder(self, out: IO[bytes]) -> None:
        q: queue.Queue[bytes | None] = queue.Queue(maxsize=_FEED_QUEUE)

        def feed() -> None:
            # Everything is taken off the queue up to the end mark, written or (once
            # fast-import is gone) dropped: the producer never waits on a dead pipe.
            while (item := q.get()) is not None:
                if self.feed_error is None:
                    try:
                        out.write(item)
                    except (BrokenPipeError, ValueError, OSError) as exc:
                        self.feed_error = exc
            if self.feed_error is None:
                try:
                    out.flush()
                except (BrokenPipeError, ValueError, OSError) as exc:
                    self.feed_error = exc

        self.queue = q
        self.feeder = threading.Thread(target=feed, name="taskbox-fast-import-feed", daemon=True)
        self.feeder.start()

    def _stop_feeder(self) -> None:
        """Let the feeder write what it holds and end (or drop it, once fast-import is gone)."""
        if self.queue is None or self.feeder is None:
            return
        self.queue.put(None)
        self.feeder.join()
        self.queue = self.feeder = None

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
        if size <= _CHUNK:  # the common case: one read, one write
            data, whole = _read_exactly(fd, size)
            self._write(b"blob\nmark %s\ndata %d\n%s\n" % (mark.encode(), size, data))
            return mark, whole
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

    def blob(self, data: bytes | memoryview) -> str:
        mark = self._mark()
        self._write(b"blob\nmark %s\ndata %d\n" % (mark.encode(), len(data)))
        self._write(data)
        self._write(b"\n")
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

    def amend(self, commit: str, changes: Iterable[tuple[str, str, str]]) -> str:
        """A commit whose tree is that of ``commit`` (a mark of this import) with ``changes`` applied."""
        mark = self._mark()
        out = [b"commit %s\nmark %s\ncommitter taskbox <taskbox@localhost> 0 +0000\ndata 0\nfrom %s\n"
               % (_CAPTURE_REF.encode(), mark.encode(), commit.encode())]
        out += [b"M %s %s %s\n" % (mode.encode(), ref.encode(), _quote(p)) for mode, ref, p in changes]
        out.append(b"\n")
        self._write(b"".join(out))
        return mark

    def send(self) -> None:
        """Hand what is gathered to fast-import now (it is sent a megabyte at a time otherwise)."""
        self._flush()

    def finish(self) -> dict[str, str]:
        """Close the stream; the marks' object ids."""
        if self.out is None and not self.pending:
            return {}
        # The scratch ref goes again: only checkpoints keep objects alive.
        self._write(b"reset %s\nfrom %s\n\ndone\n" % (_CAPTURE_REF.encode(), _NULL_SHA.encode()))
        self._flush()
        self._stop_feeder()
        if self.feed_error is not None:
            raise self._failure() from self.feed_error
        assert self.out is not None
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
        return marks

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stop_feeder()  # fast-import is gone: the feeder's next write fails and it drains
        if self.errors is not None:
            self.errors.close()
        self.marks_file.unlink(missing_ok=True)


_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.005


def _quick_switches(on: bool) -> None:
    """While a chunking thread runs beside the walk, hand the GIL over every 0.5 ms, not 5 ms.

    The thread gives the GIL up for every chunk it hashes and must get it back: with the
    walk holding it in between, each chunk would wait up to the switch interval (50 chunks
    of a 50 MB file: up to 250 ms). Counted, so overlapping captures restore it once.
    """
    global _switch_users, _switch_saved
    with _switch_lock:
        if on:
            if not _switch_users:
                _switch_saved = sys.getswitchinterval()
                sys.setswitchinterval(min(_switch_saved, 0.0005))
            _switch_users += 1
        else:
            _switch_users -= 1
            if not _switch_users:
                sys.setswitchinterval(_switch_saved)


@dataclass
class _OpenPack:
    """A pack file being written by :class:`_PackWriter`."""

    fd: int
    path: Path
    size: int = 0  # bytes written, its header included
    objects: list[tuple[bytes, int, int]] = field(default_factory=list)  # (id, offset, length of the entry)


class _PackWriter:
    """Chunks of large files written straight into packs of the store, with their indexes.

    ``git fast-import`` spends ~20 ms of CPU per MB on data it does not compress (it hashes
    everything twice with the collision-detecting SHA-1); the chunk ids are already known
    here (hashlib's SHA-1), so each pack (version 2: each object a zlib stream, stored blocks
    for a chunk that does not compress) and its index (version 2) are written directly.
    Each entry is written to the pack file as it comes, from the read buffer (no copy of
    it in memory: fresh memory costs a page fault per 4 KiB). Once _PACK_BUFFER bytes are
    written, the pack is finished in a thread of its own while the next one is written:
    its object count goes into its header, its checksum and the entries' CRC-32s come from
    one pass reading it back from the page cache, then its index. A capture with more new
    chunks than that writes several packs while the walk goes on (the last one when the
    capture ends). Each is a temporary file, fsynced, renamed into place before its index,
    as git does: until the index is there git does not see the pack, and a crash leaves a
    ``tmp_pack_*`` file that :meth:`Store.drop_temporaries` removes.
    """

    def __init__(self, store: Store) -> None:
        self.dir = store.path / "objects" / "pack"
        self.pack: _OpenPack | None = None  # the pack being written
        self.tmp: set[Path] = set()  # temporary files not yet in place (removed if the capture fails)
        self.finisher: ThreadPoolExecutor | None = None
        self.finishing: list[Future[None]] = []
        self.scratch: bytearray | None = None  # for reading a pack back (the finisher's)

    @staticmethod
    def _failure(exc: OSError) -> GitError:
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return GitError(f"could not copy the workspace into the checkpoint store: {reason}", returncode=-1,
                        stderr=str(exc))

    @staticmethod
    def _write(pack: _OpenPack, parts: list[bytes | memoryview]) -> None:
        for at in range(0, len(parts), 512):  # IOV_MAX is 1024
            batch = parts[at:at + 512]
            want = sum(len(x) for x in batch)
            done = os.writev(pack.fd, batch)
            if done != want:  # a short write: the rest, then the error (a full disk) if there is one
                rest = memoryview(b"".join(bytes(x) for x in batch))[done:]
                while rest:
                    rest = rest[os.write(pack.fd, rest):]
            pack.size += want

    def add(self, sha: str, data: memoryview, compress: bool | None = None) -> None:
        """Write one object; ``compress`` None: zlib if a sample of it compresses (_compressible)."""
        n = len(data)
        head = bytearray([0x30 | (n & 0x0F)])  # type 3 (blob), then the size, 7 bits at a time
        n >>= 4
        while n:
            head[-1] |= 0x80
            head.append(n & 0x7F)
            n >>= 7
        parts: list[bytes | memoryview] = [bytes(head)]
        if _compressible(data) if compress is None else compress:
            parts.append(zlib.compress(data, 1))
        else:  # a zlib stream of stored blocks (at most 65535 bytes each): the bytes as they are
            parts.append(b"\x78\x01")
            n = len(data)
            for at in range(0, n, 65535):
                block = data[at:at + 65535]
                parts.append(struct.pack("<BHH", at + 65535 >= n, len(block), 0xFFFF ^ len(block)))
                parts.append(block)
            parts.append(struct.pack(">I", zlib.adler32(data)))
        try:
            pack = self.pack
            if pack is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                path = self.dir / f"tmp_pack_taskbox_{os.getpid()}_{secrets.token_hex(4)}"
                self.tmp.add(path)
                pack = self.pack = _OpenPack(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444),
                                             path)
                self._write(pack, [bytes(12)])  # the header, written again once the count is known
            offset = pack.size
            self._write(pack, parts)
        except OSError as exc:
            raise self._failure(exc) from exc
        pack.objects.append((bytes.fromhex(sha), offset, pack.size - offset))
        if pack.size >= _PACK_BUFFER:
            self.flush()

    def flush(self) -> None:
        """Hand the pack being written to the finishing thread (see the class docstring)."""
        self._raise_failed()
        pack, self.pack = self.pack, None
        if pack is None:
            return
        if self.finisher is None:
            self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskbox-packs")
        self.finishing.append(self.finisher.submit(self._finish_pack, pack))

    def _raise_failed(self) -> None:
        for future in self.finishing:
            if future.done() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]

    def _finish_pack(self, pack: _OpenPack) -> None:
        try:
            self._write_pack(pack)
        except OSError as exc:
            raise self._failure(exc) from exc
        finally:
            if pack.fd >= 0:
                os.close(pack.fd)
                pack.fd = -1

    def _checksums(self, pack: _OpenPack) -> tuple[bytes, list[int]]:
        """The pack's SHA-1 and its entries' CRC-32s, from one pass reading it back."""
        if self.scratch is None:
            self.scratch = bytearray(2 << 20)
        view = memoryview(self.scratch)
        h = hashlib.sha1()
        crcs: list[int] = []
        k, crc, pos = 0, 0, 0
        objects = pack.objects
        while pos < pack.size:
            got = os.preadv(pack.fd, [view[:min(len(view), pack.size - pos)]], pos)
            if got <= 0:
                raise OSError(errno.EIO, "the pack being written could not be read back")
            block = view[:got]
            h.update(block)
            at, end = pos, pos + got
            while k < len(objects) and at < end:
                _oid, off, length = objects[k]
                at = max(at, off)
                stop = min(off + length, end)
                if at >= stop:
                    break
                crc = zlib.crc32(block[at - pos:stop - pos], crc)
                at = stop
                if stop == off + length:
                    crcs.append(crc)
                    crc, k = 0, k + 1
            pos = end
        return h.digest(), crcs

    def _write_pack(self, pack: _OpenPack) -> None:
        os.pwrite(pack.fd, b"PACK" + struct.pack(">II", 2, len(pack.objects)), 0)
        trailer, crcs = self._checksums(pack)
        view = memoryview(trailer)
        while view:
            view = view[os.write(pack.fd, view):]
        os.fsync(pack.fd)
        os.close(pack.fd)
        pack.fd = -1
        objects = sorted((oid, crc, off) for (oid, off, _n), crc in zip(pack.objects, crcs, strict=True))
        fanout = [0] * 256
        for oid, _crc, _off in objects:
            fanout[oid[0]] += 1
        for k in range(1, 256):
            fanout[k] += fanout[k - 1]
        big: list[int] = []
        small: list[int] = []
        for _oid, _crc, off in objects:
            if off >= 1 << 31:
                small.append(0x80000000 | len(big))
                big.append(off)
            else:
                small.append(off)
        count = len(objects)
        idx = b"".join([b"\xfftOc\0\0\0\2", struct.pack(">256I", *fanout), *(o for o, _c, _f in objects),
                        struct.pack(f">{count}I", *(c for _o, c, _f in objects)), struct.pack(f">{count}I", *small),
                        struct.pack(f">{len(big)}Q", *big), trailer])
        idx += hashlib.sha1(idx).digest()
        name = f"pack-{trailer.hex()}"
        tmp_idx = self.dir / f"tmp_idx_taskbox_{os.getpid()}_{secrets.token_hex(4)}"
        self.tmp.add(tmp_idx)
        ifd = os.open(tmp_idx, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            files._write_all(ifd, idx)
            os.fsync(ifd)
        finally:
            os.close(ifd)
        os.rename(pack.path, self.dir / f"{name}.pack")
        self.tmp.discard(pack.path)
        os.rename(tmp_idx, self.dir / f"{name}.idx")
        self.tmp.discard(tmp_idx)

    def _wait(self) -> None:
        if self.finisher is not None:
            self.finisher.shutdown(wait=True)
            self.finisher = None

    def finish(self) -> None:
        """Finish every pack (nothing if no chunk was added); raise the first failure."""
        try:
            self.flush()
        finally:
            self._wait()
        self._raise_failed()

    def close(self) -> None:
        self._wait()
        if self.pack is not None:
            os.close(self.pack.fd)
            self.pack = None
        for tmp in list(self.tmp):
            tmp.unlink(missing_ok=True)  # not finished: nothing of it is kept
        self.tmp.clear()


class _Sink:
    """Where one capture's contents go: small files, links, chunk lists and trees to
    ``git fast-import``; chunks of large files to a pack written here (see
    :class:`_PackWriter`). A chunk the store already has (named by the stat caches) is not
    written again."""

    def __init__(self, store: Store) -> None:
        self.imp = _Importer(store)
        self.pack = _PackWriter(store)
        self.known: set[str] = set()  # chunks the stat caches say the store has
        self.sent: set[str] = set()  # chunks written now
        self.pool: ThreadPoolExecutor | None = None
        self.deferred: dict[str, tuple[Future[tuple[Chunks, bool, Prefix | None]], int]] = {}
        self.read_buf: bytearray | None = None  # one read buffer for all the large files (see _read_buffer)
        # Small files that look incompressible (see _RAW_MIN), written by the walk (the chunking
        # thread has its own pack writer).
        self.raw = _PackWriter(store)
        self.raw_sent: set[str] = set()
        # Only into an empty store (a task's first capture): a blob the store already holds is
        # not written again by fast-import, and this path does not look (it would write it twice).
        self.raw_ok = False

    def charge(self, size: int, name: str) -> None:
        self.imp.charge(size, name)

    def blob(self, data: bytes) -> str:
        return self.imp.blob(data)

    def blob_from_fd(self, fd: int, size: int) -> tuple[str, bool]:
        """A small file's blob (a fast-import mark, or the id of one written to the raw pack)."""
        if not self.raw_ok or not _RAW_MIN <= size <= _CHUNK:
            return self.imp.blob_from_fd(fd, size)
        data, whole = _read_exactly(fd, size)
        if not _incompressible(data):
            return self.imp.blob(data), whole
        sha = _blob_id(data)
        if sha not in self.raw_sent:
            self.raw.add(sha, memoryview(data), compress=False)
            self.raw_sent.add(sha)
        return sha, whole

    def finish_raw(self) -> None:
        """Put the raw pack in place: before fast-import is given a tree that names its blobs."""
        self.raw.finish()

    def chunk(self, sha: str, data: memoryview) -> None:
        if sha in self.sent or sha in self.known:
            return
        self.pack.add(sha, data)
        self.sent.add(sha)

    def defer(self, fd: int, size: int, old: Chunks | None, prefix: Prefix | None) -> str:
        """Chunk the open file ``fd`` (now the sink's to close) in the chunking thread; a placeholder.

        One thread: the pack and the sets above are only ever touched by it while the walk runs.
        """
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskbox-chunks")
            _quick_switches(True)

        def work() -> tuple[Chunks, bool, Prefix | None]:
            try:
                self.read_buf = _read_buffer(size, self.read_buf)
                return _chunk_file(fd, size, old, self.chunk, prefix, self.read_buf)
            finally:
                os.close(fd)

        token = f"?{len(self.deferred)}"
        self.deferred[token] = (self.pool.submit(work), fd)
        return token

    def resolve(self, scans: list[Scan]) -> None:
        """Put the chunk lists of the files chunked in the thread in place of their placeholders."""
        if not self.deferred:
            return
        for sc in scans:
            entries = sc.entries
            for rel in sc.fresh:
                mode, ref, key = entries[rel]
                if ref.startswith("?"):
                    chunks, whole, prefix = self.deferred[ref][0].result()
                    entries[rel] = (mode, self.imp.blob(_chunk_list(chunks)), key if whole else None)
                    sc.chunks[rel] = chunks
                    if prefix is not None and whole:
                        sc.prefix[rel] = prefix

    def finish(self) -> dict[str, str]:
        """The marks of the fast-import, once the chunks' pack is in place too."""
        self._stop()
        self.pack.finish()
        self.raw.finish()
        return self.imp.finish()

    def _stop(self) -> None:
        if self.pool is None:
            return
        try:
            self.pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self.pool = None
            _quick_switches(False)
        for future, fd in self.deferred.values():
            if future.cancelled():  # never started: its descriptor is still open
                os.close(fd)
        for future, _fd in self.deferred.values():
            if not future.cancelled() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]

    def close(self) -> None:
        try:
            self._stop()
        except Exception:  # noqa: BLE001 - already failing: the first error is the one reported
            pass
        self.pack.close()
        self.raw.close()
        self.imp.close()


class _Blobs:
    """Blob contents read from the store in one ``cat-file --batch``, in the order asked for.

    A thread writes the requests while the caller reads the answers, so neither side
    waits on a full pipe; each content is copied in chunks.
    """

    def __init__(self, store: Store, shas: list[str]) -> None:
        self.store = store
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

    def read(self, sha: str, limit: int, what: str = "link") -> bytes:
        size = self._header(sha)
        if size > limit:
            raise CheckpointCorrupted(f"{what} {sha[:12]} in the checkpoint store is {size} bytes long")
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


class ChunkReader(io.RawIOBase):
    """A chunked file's content as a stream, read from the store (an export writes it so)."""

    def __init__(self, store: Store, chunks: Chunks) -> None:
        super().__init__()
        self.pending = collections.deque(chunks)
        self.blobs = _Blobs(store, [sha for sha, _n in chunks])
        self.left = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        done = 0  # as much as asked for (tarfile takes a short read for the end)
        while done < len(b):
            if not self.left:
                if not self.pending:
                    break
                sha, n = self.pending.popleft()
                if self.blobs._header(sha) != n:
                    raise CheckpointCorrupted(f"chunk {sha[:12]} in the checkpoint store is not the length "
                                              "its list says")
                self.left = n
            k = min(len(b) - done, self.left)
            b[done:done + k] = self.blobs._read(k)
            done += k
            self.left -= k
            if not self.left:
                self.blobs._read(1)
        return done

    def close(self) -> None:
        self.blobs.close()
        super().close()


def store_files(store: Store, paths: list[Path]) -> list[tuple[str, Chunks | None]]:
    """Store files of taskbox's own (an imported archive's scratch copies): small ones as
    blobs, large ones as chunks. Returns each one's blob (a chunk list for a chunked one)
    and its chunks."""
    sink = _Sink(store)
    refs: list[tuple[str, Chunks | None]] = []
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size >= _CHUNK_THRESHOLD:
                    sink.read_buf = _read_buffer(size, sink.read_buf)
                    chunks, _whole, _prefix = _chunk_file(fd, size, None, sink.chunk, buf=sink.read_buf)
                    refs.append((sink.blob(_chunk_list(chunks)), chunks))
                else:
                    refs.append((sink.blob_from_fd(fd, size)[0], None))
            finally:
                os.close(fd)
        marks = sink.finish()
    finally:
        sink.close()
    return [(marks.get(ref, ref), chunks) for ref, chunks in refs]  # a mark, or the id of a raw blob


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
        env = {"GIT_DIR": str(self.path), **_GIT_MALLOC}
        if index is not None:
            env["GIT_INDEX_FILE"] = str(index)
        return git.run(args, cwd=self.path, harden=True, env=env, input=input, check=check, timeout=3600)

    def popen(self, args: list[str], stderr: IO[bytes]) -> subprocess.Popen[bytes]:
        return git.popen(args, cwd=self.path, harden=True, env={"GIT_DIR": str(self.path), **_GIT_MALLOC},
                         stderr=stderr)

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

    def _no_loose_objects(self) -> bool:
        try:
            return all(n in ("info", "pack") for n in os.listdir(self.path / "objects"))
        except FileNotFoundError:
            return True

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
            sc.cache, sc.base, sc.cache_chunks = data["entries"], data["tree"], data["chunks"]
            sc.cache_prefix = data["prefix"]
            self._cached = True
        except (OSError, ValueError, EOFError, TypeError, KeyError):
            sc.cache, sc.base, sc.cache_chunks = {}, EMPTY_TREE, {}  # no cache: every file is read once more
            sc.cache_prefix = {}

    def _save_cache(self, sc: Scan, entries: dict[str, Entry]) -> None:
        path = self.index_file(sc.unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(_CACHE_MAGIC + marshal.dumps({"v": _CACHE_VERSION, "tree": sc.unit.tree, "entries": entries,
                                                       "chunks": sc.chunks, "prefix": sc.prefix}))
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
        packs_before = self.packs()
        imp = _Sink(self)
        imp.raw_ok = not packs_before and self._no_loose_objects()
        try:
            scans: list[Scan] = []
            root = self._unit(Unit("", "files"), scans, use_cache, imp)
            root_st = os.fstat(rfd)
            root.dirs[""] = root_st
            self._walk(rfd, root, "", 0, imp, scans, root_st.st_dev, use_cache)
            # The trees go to fast-import as soon as the walk ends, so that it builds them
            # while the chunking thread finishes; a large file chunked there is added once
            # its chunk list is known, by a second commit on top of the first.
            commits: dict[str, str] = {}
            chunked_later: list[tuple[Scan, list[str]]] = []
            for sc in scans:
                # A cache hit has the cached mode and blob, so what changed is what was read.
                deletes = sorted(sc.cache.keys() - sc.entries.keys())
                if not sc.entries:
                    sc.unit.tree = EMPTY_TREE
                elif deletes or sc.fresh or sc.base == EMPTY_TREE:
                    entries = sc.entries
                    later = [p for p in sc.fresh if entries[p][1].startswith("?")]
                    changes = [(entries[p][0], entries[p][1], p) for p in sc.fresh if not entries[p][1].startswith("?")]
                    commits[sc.unit.key] = imp.imp.tree(sc.base, deletes, changes)
                    if later:
                        chunked_later.append((sc, later))
                else:
                    sc.unit.tree = sc.base
            imp.finish_raw()  # the trees may name its blobs
            imp.imp.send()
            imp.resolve(scans)
            for sc, later in chunked_later:
                commits[sc.unit.key] = imp.imp.amend(commits[sc.unit.key],
                                                     [(sc.entries[p][0], sc.entries[p][1], p) for p in later])
            faults.point("capture.midway")  # contents sent to git, the imports not finished
            marks = imp.finish()
        finally:
            imp.close()
        grown = sum(self.pack_size(p) for p in self.packs() - packs_before)
        if len(marks) < 100:  # fewer objects than fastimport.unpackLimit: loose ones
            grown += sum(self.loose_size(sha) for sha in marks.values())
        self.last_capture_bytes = grown
        by_key: dict[str, str] = {}
        if commits:
            shas = [marks[m] for m in commits.values()]
            trees = self.git(["rev-parse", *(f"{s}^{{tree}}" for s in shas)]).stdout.split()
            by_key = dict(zip(commits, trees, strict=True))
        for sc in scans:
            entries = sc.entries
            for p in sc.fresh:
                mode, ref, key = entries[p]
                entries[p] = (mode, marks.get(ref, ref), key)  # a mark, or the id of a raw blob
            if sc.unit.key in commits:
                sc.unit.tree = by_key[sc.unit.key]
            if sc.unit.key in commits or sc.base != sc.unit.tree:
                self._save_cache(sc, entries)
            sc.unit.empty_dirs.sort()
            sc.unit.nested.sort()
            sc.unit.modes = _modes(sc)
            sc.unit.chunked = sorted(sc.chunks)
            sc.unit.entries = len(entries)
            sc.unit.chunk_ids = {sha for ch in sc.chunks.values() for sha, _n in ch}
        scans.sort(key=lambda s: (s.unit.path.count("/"), s.unit.path, s.unit.kind))
        return scans

    def _unit(self, unit: Unit, scans: list[Scan], use_cache: bool, sink: _Sink) -> Scan:
        sc = Scan(unit)
        if use_cache:
            self._load_cache(sc)
            for path, ch in sc.cache_chunks.items():
                sink.known.update(sha for sha, _n in ch)
                while path not in sc.hot:
                    sc.hot.add(path)
                    path = posixpath.dirname(path)
        scans.append(sc)
        return sc

    def _walk(self, dfd: int, sc: Scan, sub: str, depth: int, imp: _Sink, scans: list[Scan],
              dev: int, use_cache: bool) -> None:
        """Capture the directory ``dfd`` (``sub`` inside ``sc``'s unit) and everything below it."""
        if depth > _MAX_DEPTH:
            raise InvalidInput(f"{join(sc.unit.path, sub)!r} is nested more than {_MAX_DEPTH} directories deep; "
                               "a checkpoint cannot hold it")
        gitdir = sc.unit.kind == "gitdir"
        content = 0
        subdirs: list[str] = []
        dir_entries: list[os.DirEntry[str]] = []
        now = time.time_ns()  # before any entry here is looked at: see _RACY_NS
        with os.scandir(dfd) as it:
            listing = list(it)
        prefix = f"{sub}/" if sub else ""
        hot = sc.hot if sub in sc.hot else None
        if hot:  # large files the last capture chunked, and the directories they are in, first:
            # their chunking thread then runs beside the rest of the walk, not after it
            listing.sort(key=lambda e: prefix + e.name not in hot)
        entries, metas, fresh, cache = sc.entries, sc.meta, sc.fresh, sc.cache
        cached_entry = cache.get
        chunks, cache_chunks = sc.chunks, sc.cache_chunks
        for entry in listing:  # the hot loop of a checkpoint: kept lean
            name = entry.name
            if entry.is_dir(follow_symlinks=False):  # from the directory entry's type: no system call
                subdirs.append(name)
                dir_entries.append(entry)
                continue
            rel = prefix + name
            if rel not in cache and entry.is_file(follow_symlinks=False) and name != ".git" and not (
                    gitdir and name.endswith(".lock")):
                # A file the last capture did not see (all of them, the first time): opened
                # without an lstat first, its fstat says all the lstat would. If it is no
                # longer a regular file, it is looked at below like any other entry.
                got = self._read_file(dfd, name, imp, now, None, None)
                if got is not None:
                    entries[rel], metas[rel], chunked = got
                    if chunked is not None:
                        chunks[rel] = chunked
                    fresh.append(rel)
                    content += 1
                    continue
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
                if st.st_size >= _CHUNK_THRESHOLD and rel in cache_chunks:
                    chunks[rel] = cache_chunks[rel]
                    if rel in sc.cache_prefix:
                        sc.prefix[rel] = sc.cache_prefix[rel]
            elif stat.S_ISREG(mode):
                got = self._read_file(dfd, name, imp, now, cache_chunks.get(rel), sc.cache_prefix.get(rel))
                if got is None:
                    sc.extra.append(rel)  # no longer a regular file: not captured
                    continue
                entries[rel], st, chunked = got
                if chunked is not None:
                    chunks[rel] = chunked
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
        if hot:
            subdirs.sort(key=lambda n: prefix + n not in hot)
        elif not cache and len(subdirs) > 1:
            subdirs = _visit_order(subdirs, dir_entries)
        for name in subdirs:
            rel = f"{sub}/{name}" if sub else name
            try:
                cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    continue  # replaced meanwhile (by a link, say): the agent's race, nothing followed
                raise TaskboxError(f"cannot read {join(sc.unit.path, rel)!r} in the workspace: "
                                   f"{exc.strerror}") from exc
            try:
                cst = os.fstat(cfd)
                if cst.st_dev != dev:  # a mount inside (made on the host): neither captured nor removed
                    continue
                meta = cst
                if name == ".git" and not gitdir and not sub:
                    child = self._unit(Unit(join(sc.unit.path, ".git"), "gitdir"), scans, use_cache, imp)
                    child.dirs[""] = meta
                    self._walk(cfd, child, "", depth + 1, imp, scans, dev, use_cache)
                elif name == ".git":
                    sc.extra.append(rel)  # a .git inside a .git: not a path a tree may hold
                    continue
                elif not gitdir and lstat_at(cfd, ".git") is not None:
                    sc.unit.nested.append(rel)  # a nested repository: a unit of its own
                    child = self._unit(Unit(join(sc.unit.path, rel), "files"), scans, use_cache, imp)
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
    def _read_file(dfd: int, name: str, imp: _Sink, now: int, old: Chunks | None,
                   prefix: Prefix | None) -> tuple[Entry, os.stat_result, Chunks | None] | None:
        """Store one regular file: whole if small, as chunks if large (``old``: its last chunks)."""
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
            chunks: Chunks | None = None
            if fst.st_size >= _CHUNK_THRESHOLD:
                # Hashed and chunked in a thread while the walk goes on: the placeholder is
                # replaced by its chunk list when the walk is done (Sink.resolve).
                ref, whole = imp.defer(fd, fst.st_size, old, prefix), True
                fd = -1
            else:
                ref, whole = imp.blob_from_fd(fd, fst.st_size)
        finally:
            if fd >= 0:
                os.close(fd)
        key: StatKey | None = (fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns, fst.st_ino, fst.st_mode)
        if not whole or fst.st_ctime_ns >= now - _RACY_NS:
            key = None  # it may still change within the same timestamp: read it again next time
        return (("100755" if fst.st_mode & stat.S_IXUSR else "100644"), ref, key), fst, chunks

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
        """Write a checkpoint's commit: its manifest, its units' trees and the chunks they use.

        Four small objects written here as loose objects (no git process for each): the
        manifest blob, a tree of the chunks (named only inside chunk lists, so this keeps
        them reachable for gc, fsck and export), the root tree and the commit.
        """
        manifest = {**manifest, "format": FORMAT, "units": [u.to_dict() for u in units]}
        entries = [("100644", MANIFEST, self._write_object(b"blob", json.dumps(manifest, sort_keys=True).encode()))]
        for i, u in enumerate(units):
            if u.tree == EMPTY_TREE:
                self._write_object(b"tree", b"")  # git knows it without it; fsck and archive want it stored
            entries.append(("40000", f"u{i}", u.tree))
        chunk_ids = sorted(set().union(*(u.chunk_ids for u in units)))
        if chunk_ids:
            listing = b"".join(b"100644 %s\0%s" % (sha.encode(), bytes.fromhex(sha)) for sha in chunk_ids)
            entries.append(("40000", "chunks", self._write_object(b"tree", listing)))
        # git's order: by name, a tree's name as if it ended in "/"
        entries.sort(key=lambda e: e[1] + ("/" if e[0] == "40000" else ""))
        root = self._write_object(b"tree", b"".join(b"%s %s\0%s" % (mode.encode(), name.encode(), bytes.fromhex(sha))
                                                    for mode, name, sha in entries))
        who = b"taskbox <taskbox@localhost> %d +0000" % int(time.time())
        body = message.encode(errors="surrogateescape")
        if not body.endswith(b"\n"):
            body += b"\n"
        return self._write_object(b"commit", b"tree %s\nauthor %s\ncommitter %s\n\n%s" % (root.encode(), who, who, body))

    def _write_object(self, kind: bytes, data: bytes) -> str:
        """A loose object, as git writes one: zlib of header and data, a temporary file, a link into place."""
        raw = b"%s %d\0%s" % (kind, len(data), data)
        sha = hashlib.sha1(raw).hexdigest()
        folder = self.path / "objects" / sha[:2]
        final = folder / sha[2:]
        if final.exists():
            return sha
        folder.mkdir(exist_ok=True)
        tmp = folder / f"tmp_obj_{os.getpid()}_{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            files._write_all(fd, zlib.compress(raw, 1))
        finally:
            os.close(fd)
        try:
            os.rename(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return sha

    def manifest(self, commit: str) -> dict[str, Any]:
        try:
            raw = self.git(["cat-file", "blob", f"{commit}:{MANIFEST}"]).stdout
            data = json.loads(raw)
            data["units"] = [Unit.from_dict(u) for u in data["units"]]
        except GitError as exc:
            raise corrupted(f"checkpoint {commit[:12]} cannot be read from the store", exc) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointCorrupted(f"checkpoint {commit[:12]} has a damaged manifest: {exc}") from exc
        return data

    def set_ref(self, name: str, commit: str) -> None:
        """Name a checkpoint's commit: a new loose ref, written whole (a temporary file, fsync, rename).

        Checkpoint ids are new each time, so there is no old value to race with; the commit is
        read back first, so a ref never names an object the store lacks.
        """
        if self._read_commit_header(commit) is None and self.git(
                ["cat-file", "-e", f"{commit}^{{commit}}"], check=False).returncode != 0:
            raise GitError(f"checkpoint commit {commit[:12]} is not in the store", returncode=1,
                           stderr=f"fatal: missing {commit}")
        ref = self.path / "refs" / "checkpoints" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
        files.write_durably(ref, f"{commit}\n".encode())

    def _read_commit_header(self, sha: str) -> bytes | None:
        try:
            raw = (self.path / "objects" / sha[:2] / sha[2:]).read_bytes()
            return zlib.decompressobj().decompress(raw, 64)
        except (OSError, zlib.error):
            return None

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
        # A tree naming them (written here, not by two more git processes), then git archive
        # inflates every blob; a damaged or missing object fails there, with its name.
        entries = sorted((str(i), sha) for i, sha in enumerate(sorted(set(shas))))
        tree = self._write_object(b"tree", b"".join(b"100644 %s\0%s" % (name.encode(), bytes.fromhex(sha))
                                                     for name, sha in entries))
        self.git(["archive", "--format=tar", "-o", os.devnull, tree])

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


def corrupted(message: str, exc: GitError, after: str = "") -> CheckpointCorrupted:
    """The :class:`CheckpointCorrupted` for a git error of the store, naming the damage git reported."""
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
class UnitPlan:
    """What restoring one unit means: its target entries, and which of them to write."""

    unit: Unit  # the checkpoint's
    current: Scan | None  # what the walk saw there now (None: no such unit now)
    entries: dict[str, Entry]
    write: list[str]
    changed: int = 0
    added: int = 0
    removed: int = 0
    # How each chunked file in ``write`` is put together (see _recipe).
    recipes: dict[str, list[Step]] = field(default_factory=dict)


# One piece of a chunked file being restored: (offset, length, source, chunk id, offset in the
# source). Sources: "store" (read from the store), "cur" (copied from the file the walk saw at
# that path, which holds that chunk), "self" (copied from earlier in the file being written),
# "zero" (a chunk of zeros, left a hole).
Step = tuple[int, int, str, str, int]


@functools.cache
def _zero_chunk(n: int) -> str:
    return _blob_id(bytes(n))


def _recipe(chunks: Chunks, current: Chunks | None) -> list[Step]:
    """How to write a file made of ``chunks``, given what the file there now holds (``current``)."""
    have: dict[str, int] = {}
    here: dict[int, str] = {}  # what the file holds at each chunk's offset
    at = 0
    for sha, n in current or ():
        have.setdefault(sha, at)
        here[at] = sha
        at += n
    first: dict[str, int] = {}
    steps: list[Step] = []
    off = 0
    for sha, n in chunks:
        if here.get(off) == sha:  # already in place
            steps.append((off, n, "cur", sha, off))
            first.setdefault(sha, off)
        elif n in (_CDC_MAX, _TAIL_PIECE) and sha == _zero_chunk(n):  # the lengths runs of zeros come in
            steps.append((off, n, "zero", sha, 0))
        elif sha in first:
            steps.append((off, n, "self", sha, first[sha]))
        elif sha in have:
            steps.append((off, n, "cur", sha, have[sha]))
            first[sha] = off
        else:
            steps.append((off, n, "store", sha, 0))
            first[sha] = off
        off += n
    return steps


def restore_blobs(plans: list[UnitPlan]) -> list[str]:
    """Every object a restore will read from the store, in the order it reads them."""
    out: list[str] = []
    for p in plans:
        for path in p.write:
            steps = p.recipes.get(path)
            if steps is None:
                out.append(p.entries[path][1])
            else:
                out += [st[3] for st in steps if st[2] == "store"]
    return out


def plan_restore(store: Store, current: list[Scan], target: list[Unit]) -> list[UnitPlan]:
    """What to write, per unit, to turn what the walk saw (``current``) into ``target``; nothing is touched."""
    cur = {s.unit.key: s for s in current}
    plans = []
    for unit in sorted(target, key=lambda u: (u.path.count("/"), u.path, u.kind)):
        sc = cur.get(unit.key)
        if sc is None:
            entries = store.entries(unit.tree)
            plan = UnitPlan(unit, None, entries, sorted(entries), added=len(entries))
        else:
            entries = dict(sc.entries)
            plan = UnitPlan(unit, sc, entries, [])
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
        # A whole file and a chunked one may have the same blob (a file whose bytes are a chunk
        # list): where one is chunked and the other not, the file is written all the same.
        now_chunked = sc.chunks if sc is not None else {}
        switched = (set(unit.chunked) ^ now_chunked.keys()) & entries.keys() - set(plan.write)
        if switched:
            plan.write = sorted([*plan.write, *(q for q in switched if entries[q][0] != "120000")])
        plans.append(plan)
    _plan_chunked(store, plans)
    return plans


def _plan_chunked(store: Store, plans: list[UnitPlan]) -> None:
    """Read the chunk lists of the chunked files a restore writes; work out each one's recipe."""
    todo = [(p, path) for p in plans if p.unit.chunked for path in p.write if path in set(p.unit.chunked)]
    if not todo:
        return
    blobs = _Blobs(store, [p.entries[path][1] for p, path in todo])
    try:
        for p, path in todo:
            chunks = parse_chunk_list(blobs.read(p.entries[path][1], CHUNK_LIST_LIMIT, "chunk list"), path)
            now = p.current.chunks.get(path) if p.current is not None else None
            p.recipes[path] = _recipe(chunks, now)
    finally:
        blobs.close()


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
    # Read and write: a chunked file copies a chunk it holds twice from itself.
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
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


def _open_seen(pfd: int, name: str, seen: os.stat_result | None) -> int | None:
    """The file ``name`` in ``pfd`` opened for reading, if it is still the one the walk saw."""
    if seen is None:
        return None
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=pfd)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (
            seen.st_ino, seen.st_size, seen.st_mtime_ns, seen.st_ctime_ns):
        os.close(fd)
        return None  # changed since the walk (the agent's race): its chunks come from the store
    return fd


def _copy_range(src: int, dst: int, n: int, src_off: int, dst_off: int) -> bool:
    """Copy ``n`` bytes between descriptors, in the kernel where it can; False if ``src`` ran out."""
    done = 0
    try:
        while done < n:
            got = os.copy_file_range(src, dst, n - done, src_off + done, dst_off + done)
            if not got:
                return False
            done += got
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            raise
    while done < n:  # a file system that cannot: through user space
        data = os.pread(src, min(n - done, _CHUNK), src_off + done)
        if not data:
            return False
        os.pwrite(dst, data, dst_off + done)
        done += len(data)
    return True


def _fill_chunked(out: int, pfd: int, name: str, steps: list[Step], seen: os.stat_result | None,
                  blobs: _Blobs) -> None:
    """Write a chunked file into the new file ``out`` from its recipe.

    Chunks the file at ``name`` already holds are copied from it (``copy_file_range``: in
    the kernel, shared blocks where the file system can) if it is still the file the walk
    saw; the rest come from the store, in the order :func:`restore_blobs` asked for them.
    """
    src = _open_seen(pfd, name, seen) if any(st[2] == "cur" for st in steps) else None
    try:
        total = 0
        for off, n, kind, sha, from_off in steps:
            total = off + n
            if kind == "store":
                os.lseek(out, off, os.SEEK_SET)
                blobs.copy_to(sha, out)
            elif kind == "self":
                if not _copy_range(out, out, n, from_off, off):
                    raise TaskboxError(f"{name!r} could not be restored: the file being written shrank")
            elif kind == "cur" and not (src is not None and _copy_range(src, out, n, from_off, off)):
                # Not there after all (the file changed since the walk): this chunk from the store.
                extra = _Blobs(blobs.store, [sha])
                try:
                    os.lseek(out, off, os.SEEK_SET)
                    extra.copy_to(sha, out)
                finally:
                    extra.close()
        os.ftruncate(out, total)  # holes where chunks of zeros were
    finally:
        if src is not None:
            os.close(src)


def _patch_in_place(pfd: int, name: str, steps: list[Step], seen: os.stat_result | None, blobs: _Blobs,
                    perm: int, owner: tuple[int, int] | None) -> bool:
    """Make the chunked file ``name`` what ``steps`` say by writing only the chunks that differ.

    Only where the chunks it keeps are where they belong (an append, bytes overwritten, a
    truncation), the file is still the one the walk saw, and it has no other link (another
    path would change with it). Returns False, having written nothing, otherwise. A crash
    part-way leaves a file whose ctime changed: the replayed restore reads it again and
    finishes it, as it does any file.
    """
    if seen is None or seen.st_nlink != 1 or any(k == "cur" and fo != off for off, _n, k, _s, fo in steps):
        return False
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (
                st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (
                seen.st_ino, seen.st_size, seen.st_mtime_ns, seen.st_ctime_ns):
            return False
        total = 0
        for off, n, kind, sha, from_off in steps:
            total = off + n
            if kind == "store":
                os.lseek(fd, off, os.SEEK_SET)
                blobs.copy_to(sha, fd)
                faults.point("restore.patching")  # one chunk of the file written, the rest not yet
            elif kind == "zero":
                for at in range(off, off + n, _CHUNK):
                    os.pwrite(fd, bytes(min(_CHUNK, off + n - at)), at)
            elif kind == "self" and not _copy_range(fd, fd, n, from_off, off):
                raise TaskboxError(f"{name!r} could not be restored: the file being written shrank")
        os.ftruncate(fd, total)
        if stat.S_IMODE(st.st_mode) != perm:
            os.fchmod(fd, perm)
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
        return True
    finally:
        os.close(fd)


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


def apply_restore(store: Store, rfd: int, current: list[Scan], plans: list[UnitPlan]) -> dict[str, int]:
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
            need(join(p.unit.path, parent))
        for d in p.unit.empty_dirs:
            need(join(p.unit.path, d))
    dirs = _Dirs(rfd, owner)
    blobs = _Blobs(store, restore_blobs(plans))
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


def _apply_unit(p: UnitPlan, dirs: _Dirs, blobs: _Blobs, needed: set[str], wanted: set[str],
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
            full = join(root, d)
            if d and full not in needed and not below_gone(full):
                dirs.remove(full)
                gone.add(full)
        for path in [*sorted(q for q in sc.entries if q not in p.entries), *sc.extra]:
            full = join(root, path)
            if not below_gone(full):
                dirs.remove(full)
        if sc.unit.dotgit is not None and unit.dotgit is None and f"gitdir:{join(root, '.git')}" not in wanted:
            dirs.remove(join(root, ".git"))  # a gitfile or link the checkpoint does not have
    written = set(p.write)
    for path in p.write:
        mode, sha, _key = p.entries[path]
        parent, name = posixpath.split(join(root, path))
        pfd = dirs.get(parent)
        assert pfd is not None
        steps = p.recipes.get(path)
        if mode == "120000":
            _put_link(pfd, name, blobs.read(sha, _LINK_LIMIT), owner)
        elif steps is not None:
            seen = sc.meta.get(path) if sc is not None and path in sc.chunks else None
            if not _patch_in_place(pfd, name, steps, seen, blobs, _perm(unit, path, mode), owner):
                _put_file(pfd, name, _perm(unit, path, mode), owner,
                          lambda fd, st=steps, sn=seen, d=pfd, n=name: _fill_chunked(fd, d, n, st, sn, blobs))
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
                parent, name = posixpath.split(join(root, path))
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
        full = join(root, d)
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
