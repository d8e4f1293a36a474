"""The portable checkpoint archive: one checkpoint as a ``.tar.gz`` (SPEC §5).

An archive holds ``checkpoint.json`` (the checkpoint's name, description, trigger, format
and units) and ``workspace/`` (every unit's files, empty directories and ``.git`` entries,
as they are in the workspace). :func:`write` makes one from the snapshot store;
:func:`read` validates one and writes its content into a store as units. Reading goes
through :mod:`taskbox.archive`, the product's one tar validator; nothing is ever
extracted to a path the archive names.
"""

from __future__ import annotations

import base64
import io
import json
import os
import posixpath
import secrets
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from . import archive
from .errors import InvalidInput
from .snapshots import (
    CHUNK_LIST_LIMIT,
    EMPTY_TREE,
    FORMAT,
    ChunkReader,
    Store,
    Unit,
    join,
    parse_chunk_list,
    store_files,
)


def write(store: Store, units: list[Unit], info: dict[str, Any], out: Path, mtime: int) -> None:
    """Write ``units`` (from ``store``) and ``info`` to ``out`` atomically (a temp file, then a rename).

    Members are normalised: owner root, the checkpoint's time as every mtime, no pax headers.
    A store that cannot give a unit's content raises :class:`~taskbox.errors.GitError`.
    """
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    info = {**info, "format": FORMAT, "units": [u.to_dict() for u in units]}
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar, \
                tempfile.TemporaryDirectory(dir=store.meta) as scratch:
            body = json.dumps(info, indent=2, sort_keys=True).encode()
            ti = tarfile.TarInfo("checkpoint.json")
            ti.size, ti.mtime, ti.mode = len(body), mtime, 0o644
            tar.addfile(ti, io.BytesIO(body))
            for unit in sorted(units, key=lambda u: (u.path.count("/"), u.path)):
                prefix = join("workspace", unit.path)
                chunked = set(unit.chunked)
                if unit.tree != EMPTY_TREE:
                    part = Path(scratch) / "unit.tar"
                    store.git(["archive", "--format=tar", "-o", str(part), unit.tree])
                    with tarfile.open(part) as src:
                        for m in src:
                            if m.type in (tarfile.XGLTYPE, tarfile.XHDTYPE):
                                continue
                            rel = m.name.rstrip("/")
                            m.name = join(prefix, rel)
                            m.uid = m.gid = 0
                            m.uname = m.gname = ""
                            m.mtime = mtime
                            fh = src.extractfile(m) if m.isreg() else None
                            if fh is not None and rel in chunked:  # its chunk list: the file goes out whole
                                chunks = parse_chunk_list(fh.read(CHUNK_LIST_LIMIT + 1), rel)
                                m.size = sum(n for _sha, n in chunks)
                                with ChunkReader(store, chunks) as whole:
                                    tar.addfile(m, whole)
                                continue
                            tar.addfile(m, fh)
                    part.unlink()
                for d in unit.empty_dirs:
                    ti = tarfile.TarInfo(join(prefix, d))
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
                    tar.addfile(ti)
                if unit.dotgit:
                    ti = tarfile.TarInfo(join(prefix, ".git"))
                    ti.mtime = mtime
                    if unit.dotgit["type"] == "link":
                        ti.type, ti.linkname = tarfile.SYMTYPE, unit.dotgit["target"]
                        tar.addfile(ti)
                    else:
                        data = base64.b64decode(unit.dotgit["data"])
                        ti.size, ti.mode = len(data), int(unit.dotgit.get("mode", 0o644))
                        tar.addfile(ti, io.BytesIO(data))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read(store: Store, src: Path, scratch: Path,
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
    # Large files are stored as chunks, as a capture stores them.
    stored = store_files(store, [Path(p) for p in scratch_paths])
    for (key, mode, sub), (sha, chunks) in zip(blobs, stored, strict=True):
        index_lines.setdefault(key, []).append(f"{mode} {sha}\t{sub}")
        if chunks is not None:
            units[key].chunked.append(sub)
            units[key].chunk_ids.update(c for c, _n in chunks)
    for key, unit in units.items():
        unit.chunked.sort()
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
