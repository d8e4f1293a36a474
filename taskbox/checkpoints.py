"""Checkpoints (SPEC §5): incremental, content-addressed restore points of a task's workspace.

Storage is git's object store, used as a plain content-addressed store. Each task has a
private bare repository ``$TASKBOX_HOME/checkpoints/<task>.git`` (outside the workspace, so
the agent can neither read nor tamper with it). A checkpoint is taken with a private index
per directory tree and ``--work-tree=<workspace>``: ``add --all --force`` (ignored files
too), ``write-tree``, ``commit-tree``, one ref per checkpoint. The index's stat cache makes
a checkpoint of a big workspace with few changes cost time and space in proportion to the
changes; identical content is stored once.

Git cannot hold some things in a tree, so a checkpoint is a set of *units*:

- ``files`` units: the workspace (and each nested repository inside it, e.g. a cloned
  dependency, whose contents git would otherwise reduce to a commit id);
- ``gitdir`` units: the workspace's own ``.git`` directory (and those of nested
  repositories), captured byte for byte as files, so a restore brings back the task's
  branch, history, index and configuration too;
- a ``manifest.json`` blob: the units, their empty directories (git drops them) and a
  ``.git`` that is a file or a link.

Restore works in place (the container bind-mounts the workspace directory, so it must not
be swapped): it first brings each private index in line with the workspace as it is now,
then ``read-tree --reset -u`` makes the files equal to the checkpoint (changed files
reverted, new ones removed, deleted ones back, links as links, exec bits), then empty
directories are fixed. A restore journal is written under ``TASKBOX_HOME`` before anything
is touched; a restore interrupted by a crash is finished by the next checkpoint operation
on the task or by ``taskbox doctor --fix``. The task's append-only history
(``conversations.jsonl``, ``executions.jsonl``, ``decisions.md``) is kept as it is: a
restore is part of that history, not a reason to forget it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import archive, faults, files, git
from .confine import sandbox_owner
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

# The store's own configuration: byte-exact content whatever the workspace's attributes say.
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
# $GIT_DIR/info/attributes wins over any .gitattributes an agent writes into the workspace:
# no end-of-line conversion, no filters, no ident or encoding rewriting, nothing left out.
_STORE_ATTRIBUTES = "* -text -eol -filter -ident -working-tree-encoding -export-ignore -export-subst\n"
_NO_COMMIT = re.compile(r"'(.+)/' does not have a commit checked out")


@dataclass
class Unit:
    """One directory tree of a checkpoint (see the module docstring)."""

    path: str  # posix path of the unit's root inside the workspace; "" is the workspace itself
    kind: str  # "files" or "gitdir"
    tree: str = EMPTY_TREE
    empty_dirs: list[str] = field(default_factory=list)
    nested: list[str] = field(default_factory=list)  # nested repositories (files units only)
    dotgit: dict[str, Any] | None = None  # a .git that is a file or a link, not a directory

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.path}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "tree": self.tree, "empty_dirs": self.empty_dirs,
                "nested": self.nested, "dotgit": self.dotgit}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(str(d["path"]), str(d["kind"]), str(d["tree"]), list(d.get("empty_dirs") or []),
                   list(d.get("nested") or []), d.get("dotgit"))


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _own(path: Path | str) -> None:
    """Give a path taskbox wrote in a workspace to the sandbox user (when running as root)."""
    if os.geteuid() == 0:
        uid, gid = sandbox_owner()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(path, uid, gid, follow_symlinks=False)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    """Delete a file, link or directory tree without following links."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _ensure_dir(root: Path, rel: str) -> Path:
    """``root/rel`` as a real directory; a file or link in the way is replaced, never followed."""
    cur = root
    for part in rel.split("/") if rel else []:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            _own(cur)
            continue
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(cur)
            os.mkdir(cur, 0o755)
            _own(cur)
    return cur


def _literal(path: str) -> str:
    return f":(literal){path}"


class Store:
    """One task's private content-addressed store: a bare git repository under TASKBOX_HOME."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta = path / "taskbox"  # our own files: private indexes, journal, caches

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

    def git(self, args: list[str], *, work_tree: Path | None = None, index: Path | None = None,
            input: bytes | None = None, check: bool = True) -> Any:
        env = {"GIT_DIR": str(self.path)}
        if work_tree is not None:
            env["GIT_WORK_TREE"] = str(work_tree)
        if index is not None:
            env["GIT_INDEX_FILE"] = str(index)
        return git.run(args, cwd=self.path, harden=True, env=env, input=input, check=check, timeout=3600)

    def index_file(self, unit: Unit) -> Path:
        return self.meta / "index" / hashlib.sha1(unit.key.encode()).hexdigest()[:20]

    def _nested_cache(self) -> dict[str, list[str]]:
        try:
            data = json.loads((self.meta / "nested.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_nested_cache(self, cache: dict[str, list[str]]) -> None:
        tmp = self.meta / f"nested.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, self.meta / "nested.json")

    def size(self) -> int:
        total = 0
        for dirpath, _dirs, names in os.walk(self.path):
            for n in names:
                try:
                    total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
                except FileNotFoundError:
                    pass
        return total

    def object_size(self, sha: str) -> int:
        try:
            return os.stat(self.path / "objects" / sha[:2] / sha[2:]).st_size
        except FileNotFoundError:
            return 0  # packed, or stored before

    # --- capture ---------------------------------------------------------------------------

    def capture(self, ws: Path) -> list[Unit]:
        """Bring every unit's private index in line with the workspace; return the units.

        Writes the blobs and trees of what changed since the last capture; nothing else.
        """
        cache = self._nested_cache()
        units: list[Unit] = []
        queue = [Unit("", "files")]
        while queue:
            unit = queue.pop(0)
            queue += self._capture_unit(ws, unit, cache)
            units.append(unit)
        self._save_nested_cache({u.key: u.nested for u in units if u.nested})
        return units

    def _capture_unit(self, ws: Path, unit: Unit, cache: dict[str, list[str]]) -> list[Unit]:
        root = ws / unit.path if unit.path else ws
        index = self.index_file(unit)
        excludes: list[str] = []
        nested: list[str] = []
        if unit.kind == "gitdir":
            excludes.append(":(exclude,glob)**/*.lock")  # a stale lock would block the restored repo
        else:
            nested = [n for n in cache.get(unit.key, []) if os.path.lexists(root / n / ".git")]
            if nested:  # entries from a time these were plain directories must go
                self.git(["rm", "-r", "--cached", "-q", "--ignore-unmatch", "--", *map(_literal, nested)],
                         work_tree=root, index=index)
        while True:
            args = ["add", "--all", "--force", "--", ".", *excludes,
                    *(f":(exclude,literal){n}" for n in nested)]
            proc = self.git(args, work_tree=root, index=index, check=False)
            if proc.returncode == 0:
                break
            m = _NO_COMMIT.search(proc.stderr)
            if unit.kind == "files" and m and m.group(1) not in nested:
                nested.append(m.group(1))  # a nested repository without commits
                continue
            raise _store_error(f"could not copy {root} into the checkpoint store", proc.stderr, proc.returncode)
        if "embedded git repository" in proc.stderr or "embedded repository" in proc.stderr:
            links = [line.split("\t", 1)[1] for line in
                     self.git(["ls-files", "-s", "-z"], work_tree=root, index=index).stdout.split("\0")
                     if line.startswith("160000 ")]
            if links:
                nested += [p for p in links if p not in nested]
                self.git(["rm", "--cached", "-q", "--", *map(_literal, links)], work_tree=root, index=index)
        unit.tree = self.git(["write-tree"], index=index).stdout.strip()
        # What add left untracked: empty directories, and nested repositories it did not meet.
        others = self.git(["ls-files", "-z", "--others", "--directory", "--", ".", *excludes,
                           *(f":(exclude,literal){n}" for n in nested)],
                          work_tree=root, index=index).stdout.split("\0")
        empty: list[str] = []
        for entry in others:
            if entry.endswith("/"):
                self._expand_dir(root, entry.rstrip("/"), empty, nested)
        unit.empty_dirs = sorted(empty)
        unit.nested = sorted(set(nested))
        children: list[Unit] = []
        if unit.kind == "files":
            dotgit = root / ".git"
            try:
                st = os.lstat(dotgit)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                children.append(Unit(_join(unit.path, ".git"), "gitdir"))
            elif st is not None and stat.S_ISLNK(st.st_mode):
                unit.dotgit = {"type": "link", "target": os.readlink(dotgit)}
            elif st is not None and stat.S_ISREG(st.st_mode) and st.st_size <= 65536:
                data = files.read_bytes(root, ".git")
                unit.dotgit = {"type": "file", "data": base64.b64encode(data).decode(), "mode": st.st_mode & 0o777}
            children += [Unit(_join(unit.path, n), "files") for n in unit.nested]
        return children

    def _expand_dir(self, root: Path, rel: str, empty: list[str], nested: list[str]) -> None:
        """Find the empty directories (and nested repositories) under an untracked directory."""
        full = root / rel
        if os.path.lexists(full / ".git"):
            if rel not in nested:
                nested.append(rel)
            return
        try:
            entries = list(os.scandir(full))
        except (FileNotFoundError, NotADirectoryError):
            return
        subdirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        if not subdirs:
            empty.append(rel)  # empty, or holding only what git cannot store (fifos, sockets)
        for name in sorted(subdirs):
            self._expand_dir(root, _join(rel, name), empty, nested)

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
        """Delete the half-written object files a failed git write leaves (e.g. on a full disk)."""
        for tmp in [*self.path.glob("objects/??/tmp_obj_*"), *self.path.glob("objects/pack/tmp_*")]:
            tmp.unlink(missing_ok=True)

    def gc(self) -> None:
        """Pack and drop unreachable objects (the private indexes are dropped too).

        Only after a checkpoint was deleted: that is when objects become unreachable, and
        dropping the indexes makes the next checkpoint re-read the whole workspace.
        """
        marker = self.meta / "needs-gc"
        if not marker.exists():
            return
        # The indexes are not gc roots: objects only they name are pruned, so they must go.
        shutil.rmtree(self.meta / "index", ignore_errors=True)
        (self.meta / "index").mkdir(parents=True, exist_ok=True)
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
    if "No space left" in stderr:
        first = "no space left on device"
    return GitError(f"{message}: {first}", returncode=code, stderr=stderr)


# --- restore ---------------------------------------------------------------------------------


def _apply_units(store: Store, ws: Path, current: list[Unit], target: list[Unit]) -> dict[str, int]:
    """Make the workspace equal to ``target`` (``current`` is what capture just saw)."""
    cur = {u.key: u for u in current}
    tgt = {u.key: u for u in target}
    stats = {"changed": 0, "added": 0, "removed": 0}
    # Units that exist now but not in the checkpoint go first (deepest first), so the parent's
    # checkout can put plain files where a nested repository was.
    for key in sorted(set(cur) - set(tgt), key=lambda k: -len(cur[k].path)):
        _remove(ws / cur[key].path)
        store.index_file(cur[key]).unlink(missing_ok=True)
    first = True
    for unit in sorted(target, key=lambda u: (u.path.count("/"), u.path, u.kind)):
        old = cur.get(unit.key)
        root = _ensure_dir(ws, unit.path)
        index = store.index_file(unit)
        if old is None:  # new here: sync a fresh index with whatever the directory holds
            index.unlink(missing_ok=True)
            old = Unit(unit.path, unit.kind)
            store._capture_unit(ws, old, {unit.key: list(unit.nested)})
        changes = store.diff(old.tree, unit.tree)
        store.git(["read-tree", "--reset", "-u", unit.tree], work_tree=root, index=index)
        counted = unit.kind == "files"  # .git internals are restored but not counted as files
        for _old_mode, new_mode, _sha, status, path in changes:
            if status == "D":
                stats["removed"] += counted
                continue
            stats["added" if status == "A" else "changed"] += counted
            # git keeps its object files read-only; nothing else records permissions beyond the exec bit
            _fix_path(root, path, new_mode, readonly=unit.kind == "gitdir" and path.startswith("objects/"))
        _fix_empty_dirs(root, old.empty_dirs, unit.empty_dirs)
        _fix_dotgit(root, old.dotgit, unit.dotgit)
        if first:
            first = False
            faults.point("restore.midway")  # the workspace files are back; .git and the rest not yet
    return stats


def _fix_path(root: Path, rel: str, git_mode: str, readonly: bool = False) -> None:
    """Ownership and exact permissions of a path git just wrote (git honours the umask)."""
    full = root / rel
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return
    if not stat.S_ISLNK(st.st_mode) and stat.S_ISREG(st.st_mode):
        want = 0o755 if git_mode == "100755" else 0o644
        if readonly:
            want &= 0o555
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(full, want)
    _own(full)
    parent = full.parent
    while parent != root and root in parent.parents:
        _own(parent)
        parent = parent.parent


def _fix_empty_dirs(root: Path, before: list[str], after: list[str]) -> None:
    wanted = set(after)
    needed = set(wanted)
    for d in after:
        p = posixpath.dirname(d)
        while p:
            needed.add(p)
            p = posixpath.dirname(p)
    for d in sorted(set(before) - wanted, key=lambda s: -s.count("/")):
        p = d
        while p and p not in needed:
            try:
                os.rmdir(root / p)
            except OSError:
                break  # not empty (or gone): leave it and its parents
            p = posixpath.dirname(p)
    for d in after:
        _ensure_dir(root, d)


def _fix_dotgit(root: Path, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    if before == after or (after is None and before is None):
        return
    if after is None:
        if before is not None:
            _remove(root / ".git")
        return
    _remove(root / ".git")
    if after["type"] == "link":
        os.symlink(after["target"], root / ".git")
    else:
        files.atomic_write(root, ".git", base64.b64decode(after["data"]), mode=int(after.get("mode", 0o644)))
    _own(root / ".git")


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
        return Store(self.root / f"{task_id}.git")

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
        added = 0
        files_total = 0
        for u in units:
            old = before.get(u.key)
            if old is None:
                if u.kind == "files":
                    files_total += store.count_entries(u.tree)
                if parent is None:
                    continue
            for _om, _nm, sha, status, _path in store.diff(old or EMPTY_TREE, u.tree):
                if status == "D":
                    changes["deleted"] += 1 if u.kind == "files" else 0
                    continue
                if u.kind == "files" and old is not None:
                    changes["added" if status == "A" else "modified"] += 1
                added += store.object_size(sha)
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
        current = store.capture(ws)
        # Every object the checkpoint needs that the workspace lacks is read in full first:
        # a damaged store is reported while the workspace is still untouched.
        cur = {u.key: u for u in current}
        needed: list[str] = []
        try:
            for u in target:
                for _om, mode, sha, status, _p in store.diff(cur[u.key].tree if u.key in cur else EMPTY_TREE, u.tree):
                    if status != "D" and mode != "160000":
                        needed.append(sha)
            store.verify_blobs(needed)
        except GitError as exc:
            raise _corrupted(f"checkpoint {cp_id} cannot be restored", exc, "; the workspace was not changed") from exc
        journal = self._journal(task.id)
        if keep is None:
            keep = self._preserve(task, ws, store)
        _write_json(journal, {"checkpoint_id": cp_id, "commit": commit, "keep": keep,
                              "started_at": time.time(), "pid": os.getpid()})
        try:
            stats = _apply_units(store, ws, current, target)
        except GitError as exc:
            raise _corrupted(f"restore of checkpoint {cp_id} failed part-way; `taskbox doctor --fix` finishes "
                             "it", exc) from exc
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
