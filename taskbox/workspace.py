"""A task's workspace: a private clone of the user's repository on the task's branch.

The clone copies objects (no hardlinks, no alternates), so nothing the container writes can
reach the user's repository. Once the container has started, the workspace's ``.git`` is
the agent's: its config, attributes, hooks, ``commondir``, gitfiles, ``core.worktree`` and
alternates may all be traps for a host-side git. So **no git command runs on the host in an
agent-written workspace**. Committing, diffing, logging and packing the branch run *inside
a sandbox* — the task's own container, or a throwaway one that mounts only this workspace —
as the sandbox user, where an attacker gains nothing they could not already do. The host
only receives bytes: a git bundle, written to a file under ``TASKBOX_HOME`` up to a size
limit, which ``git fetch`` in the user's repository reads as data (the same code path as a
fetch from an untrusted remote, with object checks on). See docs/safety.md.

**The branch holds the work only.** Unless a task keeps its memory on the branch (the
``memory_on_branch`` setting or per-task option), ``.task-memory/`` and ``Plan.md`` (when the
start commit had none) are committed to a *companion ref*, ``refs/taskbox/<branch>/memory``,
beside the branch, never on it; Python bytecode never goes on the branch, and files the
project's ``.gitignore`` ignores stay out as always. The companion ref travels in the same
bundle as the branch (the header may name exactly those two refs) and brings the memory back
into a workspace that lost it.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from . import files, git
from .confine import sandbox_owner
from .errors import GitError, VolumeError
from .sandbox import Captured

# Runs argv in a sandbox that mounts the workspace at /workspace (cwd), as the sandbox user.
# ``sink``: stream stdout there (at most ``limit`` bytes) instead of returning it.
Runner = Callable[..., Captured]

# Fixed config for git run in the sandbox: not for safety (the sandbox is the agent's own),
# but so an agent's config cannot make taskbox's own commands hang or misreport.
_SANDBOX_GIT = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "core.pager=cat",
                "-c", "core.editor=true", "-c", "commit.gpgSign=false", "-c", "color.ui=false",
                "-c", "user.name=taskbox", "-c", "user.email=taskbox@localhost", "--no-pager"]
_G = "G='" + " ".join(_SANDBOX_GIT) + "'\n"  # every word is plain: safe to split unquoted
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
DIFF_LIMIT = 4 << 20

MEMORY_PATHS = (".task-memory", "Plan.md")  # taskbox's own files at the workspace root
# Kept off the task branch in every mode: nobody wants bytecode in a commit.
_BYTECODE = (":(glob)**/__pycache__/**", ":(glob)**/*.py[cod]")
# Lines for .git/info/exclude of a fresh clone, so that an agent's own `git add -A` in the
# container keeps them off the branch too.
_EXCLUDES = ("__pycache__/", "*.py[cod]")
_EXCLUDES_CLEAN = ("/.task-memory/", "/Plan.md")


def memory_ref(branch: str) -> str:
    """The companion ref that holds a task's memory beside its branch."""
    return f"refs/taskbox/{branch}/memory"


def hand_over(path: Path) -> None:
    """Give ``path`` (recursively) to the sandbox user when taskbox runs as root.

    Only for a fresh clone no agent has written yet (during create): host-side git ran as
    root there, and the files must be writable in the container.
    """
    if os.geteuid() != 0 or not path.exists():
        return
    uid, gid = sandbox_owner()

    def give(p: str) -> None:
        st = os.lstat(p)
        if st.st_uid != uid or st.st_gid != gid:
            os.chown(p, uid, gid, follow_symlinks=False)

    give(str(path))
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            give(os.path.join(dirpath, name))


def head_commit(repo: Path) -> str | None:
    """The commit checked out in the user's own (trusted) repository."""
    proc = git.run(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], cwd=repo, check=False)
    return proc.stdout.strip() or None


def create(repo: Path, dest: Path, branch: str, base_ref: str | None, *, clean: bool = True) -> None:
    """Clone ``repo`` into ``dest`` and check out a new ``branch`` at ``base_ref``.

    Until the container starts nobody but taskbox has written the clone, so these git
    commands run on the host. ``clean``: memory and Plan.md are excluded from the branch.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    git.run(["clone", "--quiet", "--no-hardlinks", "--no-checkout", "--config", "user.name=taskbox agent",
             "--config", "user.email=agent@taskbox.local", str(repo), str(dest)], cwd=dest.parent)
    if base_ref:
        git.run(["checkout", "--quiet", "-b", branch, base_ref], cwd=dest)
    else:  # an empty repository: start the branch unborn
        git.run(["checkout", "--quiet", "--orphan", branch], cwd=dest)
    lines = _EXCLUDES + (_EXCLUDES_CLEAN if clean else ())
    exclude = dest / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    old = exclude.read_text(errors="replace") if exclude.is_file() else ""
    files.atomic_write(dest / ".git", "info/exclude",
                       (old + ("" if not old or old.endswith("\n") else "\n")
                        + "# taskbox: kept off the task branch\n" + "\n".join(lines) + "\n").encode())


def _paths(clean: bool, base: str | None, tracked_in_base: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """(pathspecs kept at their last commit after `git add --all`, taskbox paths to untrack).

    Exclude pathspecs on `git add` would fail on paths `.git/info/exclude` ignores, so the
    add takes everything and a `git reset` of these pathspecs takes them back out.
    """
    if not clean:
        return [*_BYTECODE], []
    keep = [*_BYTECODE, *MEMORY_PATHS]  # a Plan.md the start commit tracked stays as it was there
    return keep, [p for p in MEMORY_PATHS if not (base and tracked_in_base(p))]


def commit_fresh(ws: Path, message: str, *, clean: bool = True, branch: str | None = None,
                 tracked: Sequence[bool] | None = None, tree: str | None = None) -> bool:
    """The first commit of a new workspace, before any agent has written it (host-side git).

    ``clean``: memory and Plan.md go to the companion ref of ``branch`` instead of the branch.
    ``tracked`` (whether the start commit tracks each of :data:`MEMORY_PATHS`) and ``tree``
    (the start commit's tree, ``""`` for none), when the caller already asked; else one git
    process asks. True if a commit was made (False: nothing to commit). Three git processes
    in the usual case (the add, a ``write-tree`` that finds the tree unchanged, and one
    ``fast-import`` for the companion ref): every process is a few milliseconds of a warm
    create (docs/speed.md).
    """
    try:
        if tracked is None or tree is None:
            tree, *found = lookup(ws, ["HEAD^{tree}", *(f"HEAD:{p}" for p in MEMORY_PATHS)])
            tracked = [bool(sha) for sha in found]
        known = dict(zip(MEMORY_PATHS, tracked, strict=True))
        keep, _untrack = _paths(clean, "HEAD", lambda p: known[p])
        if clean and any(tracked):  # a taskbox path the start commit tracks: take everything, then put it back
            git.run(["add", "--all"], cwd=ws)
            git.run(["reset", "--quiet", "--", *keep], cwd=ws)
        else:
            # The index is the start commit's, so leaving a path out of the add keeps it at
            # its last commit as `git reset` would. In clean mode the memory paths are
            # untracked and ignored by .git/info/exclude, so `add --all` leaves them out
            # (naming an ignored path in an exclude pathspec would make the add fail).
            git.run(["add", "--all", "--", ".", *(p.replace(":(glob)", ":(exclude,glob)", 1) for p in _BYTECODE)], cwd=ws)
        if clean and branch:
            _save_memory_host(ws, memory_ref(branch))
        # Usually nothing new is staged: `git commit` would say so after refreshing the whole
        # index again (every file of a fresh checkout is "racily clean" and hashed anew);
        # `write-tree` only writes the index's tree, and the same tree means nothing to commit.
        if tree and git.run(["write-tree"], cwd=ws).stdout.strip() == tree:
            return False
        proc = git.run(["commit", "--quiet", "--no-verify", "-m", message], cwd=ws, check=False)
        if proc.returncode != 0:
            out = proc.stdout + proc.stderr
            if any(m in out for m in ("nothing to commit", "nothing added", "no changes added")):
                return False
            raise GitError(f"git commit failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}",
                           returncode=proc.returncode, stderr=proc.stderr)
        return True
    finally:
        hand_over(ws)


def lookup(repo: Path, names: list[str]) -> list[str]:
    """The object id each of ``names`` (revisions, one a line) names in a repository taskbox trusts
    (the user's, or a workspace no agent has written yet), or ``""``: one git process for them all."""
    proc = git.run(["cat-file", "--batch-check=%(objectname)"], cwd=repo,
                   input="".join(f"{n}\n" for n in names).encode())
    lines = proc.stdout.splitlines()
    if len(lines) != len(names):
        raise GitError(f"git cat-file gave {len(lines)} answers for {len(names)} names in {repo}")
    return [line if _SHA.match(line) else "" for line in lines]


def _memory_files(ws: Path) -> list[tuple[str, str, bytes]] | None:
    """(git mode, path, content) of the memory files of a fresh workspace, as ``git add --force``
    takes them; None when a name needs quoting in a fast-import stream (then git adds them)."""
    out: list[tuple[str, str, bytes]] = []

    def take(path: Path, rel: str) -> bool:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            out.append(("120000", rel, os.fsencode(os.readlink(path))))
        elif stat.S_ISREG(st.st_mode):
            out.append(("100755" if st.st_mode & 0o100 else "100644", rel, path.read_bytes()))
        elif stat.S_ISDIR(st.st_mode):
            for entry in sorted(os.listdir(path)):
                if entry == ".git" or not take(path / entry, f"{rel}/{entry}"):
                    return False
        return not rel.startswith('"') and "\n" not in rel
    for p in MEMORY_PATHS:
        if os.path.lexists(ws / p) and not take(ws / p, p):
            return None
    return out


def _save_memory_host(ws: Path, ref: str) -> None:
    """Commit the memory files of a fresh workspace to ``ref`` (a root commit of them alone).

    One ``git fast-import`` writes the blobs, the tree, the commit and the ref (kept as a
    pack: ``unpackLimit=0`` spares an ``unpack-objects`` process); names it cannot take
    unquoted go through a private index instead.
    """
    found = _memory_files(ws)
    if found is None:
        _save_memory_index(ws, ref)
        return
    if not found:
        return
    message = b"taskbox: task memory\n"
    stream = [b"commit %s\ncommitter %s <%s> %d +0000\ndata %d\n%s" % (
        ref.encode(), git.IDENTITY_NAME.encode(), git.IDENTITY_EMAIL.encode(), int(time.time()), len(message),
        message)]
    for mode, rel, data in found:
        stream.append(b"M %s inline %s\ndata %d\n%s\n" % (mode.encode(), os.fsencode(rel), len(data), data))
    stream.append(b"\n")
    git.run(["-c", "fastimport.unpackLimit=0", "fast-import", "--quiet", "--force"], cwd=ws, input=b"".join(stream))


def _save_memory_index(ws: Path, ref: str) -> None:
    """Commit the memory files of a fresh workspace to ``ref`` through a private index."""
    present = [p for p in MEMORY_PATHS if (ws / p).exists()]
    if not present:
        return
    index = ws / ".git" / "taskbox-memory.index"
    env = {"GIT_INDEX_FILE": str(index)}
    try:
        git.run(["add", "--force", "--", *present], cwd=ws, env=env)
        tree = git.run(["write-tree"], cwd=ws, env=env).stdout.strip()
    finally:
        index.unlink(missing_ok=True)
    commit = git.run(["commit-tree", tree, "-m", "taskbox: task memory"], cwd=ws).stdout.strip()
    git.run(["update-ref", ref, commit], cwd=ws)


def _check(res: Captured, what: str) -> str:
    if res.exit_code != 0:
        detail = (res.stderr.strip() or res.stdout[-2000:].decode(errors="replace").strip())[-300:]
        detail = " | ".join(line for line in detail.splitlines() if line.strip())  # one line
        raise GitError(f"{what} failed in the sandbox (exit {res.exit_code}): {detail}",
                       returncode=res.exit_code, stderr=res.stderr[-2000:])
    return res.stdout.decode(errors="replace")


# Publish a task's work in one command in the sandbox: commit everything (the taskbox paths
# kept or untracked as commit_fresh does), commit the memory files to the companion ref, and
# print one line "taskbox-publish committed|unchanged HEAD|none TIP MEMORY-TIP|-"; then, when
# the branch or its companion ref moved from what the user's repository has, the bundle of both
# (leaving out what the user's repository has, $TASKBOX_BASIS) follows on stdout.
# $1 branch ref, $2 companion ref or "-" (memory kept on the branch), $3 start commit or "-",
# $4/$5 the user's repository's commits of the two refs (or "-"); "$@": pathspecs kept at
# their last commit. Exit codes: 9-11 the commit, 12-16 the memory, 3 no branch.
_PUBLISH = _G + r"""
ref="$1"; mref="$2"; base="$3"; have="$4"; mhave="$5"; shift 5
untrack=""
if [ "$mref" != "-" ]; then  # a taskbox path the start commit tracked stays on the branch as the user's
  for p in $TASKBOX_MEMORY_PATHS; do
    [ "$base" != "-" ] && $G cat-file -e "$base:$p" 2>/dev/null && continue
    untrack="$untrack $p"
  done
fi
$G add --all >&2 || exit 10
$G reset -q -- "$@" >/dev/null 2>&1 || $G rm -r -q --cached --ignore-unmatch -- "$@" >/dev/null || exit 9
for p in $untrack; do $G rm -r -q --cached --ignore-unmatch -- "$p" >/dev/null || exit 9; done
if $G diff --cached --quiet 2>/dev/null; then state=unchanged
else $G commit --quiet --no-verify -m "$TASKBOX_MESSAGE" >&2 || exit 11; state=committed; fi
head=$($G rev-parse --verify --quiet 'HEAD^{commit}') || head=none
if [ "$mref" != "-" ]; then (
  gd=$($G rev-parse --git-dir) || exit 12
  GIT_INDEX_FILE="$gd/taskbox-memory.index"; export GIT_INDEX_FILE
  rm -f "$GIT_INDEX_FILE"
  set --
  [ -e .task-memory ] && set -- "$@" .task-memory
  [ -e Plan.md ] && set -- "$@" Plan.md
  [ $# -eq 0 ] && exit 0
  $G add --force -- "$@" >&2 || exit 13
  tree=$($G write-tree) || exit 14
  rm -f "$GIT_INDEX_FILE"
  old=$($G rev-parse --verify --quiet "$mref^{commit}")
  if [ -n "$old" ] && [ "$($G rev-parse "$old^{tree}")" = "$tree" ]; then exit 0; fi
  new=$(echo "taskbox: task memory" | $G commit-tree "$tree" ${old:+-p "$old"}) || exit 15
  $G update-ref "$mref" "$new" || exit 16
) || exit $?; fi
tip=$($G rev-parse --verify --quiet "$ref^{commit}") || { echo "no branch $ref" >&2; exit 3; }
mtip=-
if [ "$mref" != "-" ]; then mtip=$($G rev-parse --verify --quiet "$mref^{commit}") || mtip=-; fi
echo "taskbox-publish $state $head $tip $mtip"
if [ "$tip" = "$have" ] && { [ "$mtip" = "-" ] || [ "$mtip" = "$mhave" ]; }; then exit 0; fi
args="$ref"; tips="$tip"
if [ "$mtip" != "-" ]; then args="$args $mref"; tips="$tips $mtip"; fi
for b in $TASKBOX_BASIS; do
  $G cat-file -e "$b^{commit}" 2>/dev/null || continue
  for t in $tips; do
    [ "$b" = "$t" ] && continue
    if $G merge-base --is-ancestor "$b" "$t" 2>/dev/null; then args="$args ^$b"; break; fi
  done
done
exec $G bundle create --quiet - $args
"""
_PUBLISH_EXITS = {3: "finding the task branch", 9: "git commit", 10: "git commit", 11: "git commit",
                  12: "saving the task memory", 13: "saving the task memory", 14: "saving the task memory",
                  15: "saving the task memory", 16: "saving the task memory"}
_PUBLISHED = re.compile(r"^taskbox-publish (committed|unchanged) ([0-9a-f]{40}(?:[0-9a-f]{24})?|none) "
                        r"([0-9a-f]{40}(?:[0-9a-f]{24})?) ([0-9a-f]{40}(?:[0-9a-f]{24})?|-)\n$")


def _commits(repo: Path, names: list[str]) -> list[str]:
    """The commit each of ``names`` (refs or commit ids) is in the user's (trusted) repository,
    or ``""`` where there is none: one git process for them all."""
    if not names:
        return []
    proc = git.run(["cat-file", "--batch-check=%(objectname)"], cwd=repo,
                   input="".join(f"{n}^{{commit}}\n" for n in names).encode())
    lines = proc.stdout.splitlines()
    if len(lines) != len(names):
        raise GitError(f"git cat-file gave {len(lines)} answers for {len(names)} names in {repo}")
    return [line if _SHA.match(line) else "" for line in lines]


def publish(run: Runner, repo: Path, branch: str, message: str, *, clean: bool, base: str | None,
            scratch: Path, limit: int) -> tuple[str | None, str]:
    """Commit the workspace and bring its branch into the user's repository, in one sandbox command.

    Returns (the new commit or None if nothing changed, the branch's commit). Committing is as
    ``commit_fresh`` does it: ``clean`` keeps ``.task-memory`` and ``Plan.md`` off the branch
    (a ``Plan.md`` the start commit ``base`` tracked stays) and commits them to the companion
    ref (:func:`memory_ref`), which comes along; bytecode is never added.

    The sandbox packs the branch into a bundle (prerequisites: the commits the user's
    repository already has) only when it moved; the host takes at most ``limit`` bytes of
    it into a file of its own, parses the header itself and gives only the pack to
    ``git index-pack --strict`` in the user's repository; the refs move only after the new
    tips are checked complete (``update-ref`` with the old value). No git process on the host
    opens anything the sandbox wrote.
    """
    ref = f"refs/heads/{branch}"
    mref = memory_ref(branch) if clean else None
    names = [n for n in (ref, mref) if n]
    found = _commits(repo, [*names, "HEAD"])
    have = dict(zip(names, found, strict=False))
    basis = list(dict.fromkeys(c for c in found if c))
    keep, _untrack = _paths(clean, None, lambda _p: False)  # what to untrack is decided in the sandbox
    argv = ["sh", "-c", _PUBLISH, "sh", ref, mref or "-", base if base and _SHA.match(base) else "-",
            have[ref] or "-", (have[mref] if mref else "") or "-", *keep]
    env = {"TASKBOX_MESSAGE": message, "TASKBOX_BASIS": " ".join(basis),
           "TASKBOX_MEMORY_PATHS": " ".join(MEMORY_PATHS)}
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="publish-", suffix=".bundle", dir=scratch)
    path = Path(name)
    try:
        with os.fdopen(fd, "w+b") as fh:
            res = run(argv, env=env, sink=fh, limit=limit)
            if res.truncated:
                raise GitError(f"the task branch {branch} packs to more than {limit} bytes; refusing to fetch "
                               "it (raise the fetch_limit setting if this is expected)")
            if res.exit_code == 3:
                raise GitError(f"the workspace has no branch {branch} (was it deleted or renamed in the sandbox?)",
                               branch=branch)
            _check(res, _PUBLISH_EXITS.get(res.exit_code, "git bundle"))
            fh.seek(0)
            m = _PUBLISHED.match(fh.readline(512).decode("ascii", errors="replace"))
            if not m:
                raise GitError("publishing the task branch in the sandbox gave an unexpected answer")
            state, head, tip, mtip = m.groups()
            commit = head if state == "committed" and head != "none" else None
            wanted = {ref: tip, **({mref: mtip} if mref and mtip != "-" else {})}
            if all(have.get(n) == sha for n, sha in wanted.items()):
                return commit, tip
            checked_out = git.run(["symbolic-ref", "--quiet", "HEAD"], cwd=repo, check=False).stdout.strip()
            if checked_out == ref and have[ref] != tip:
                raise GitError(f"branch {branch} is checked out in {repo}; switch to another branch there "
                               "so taskbox can update it", branch=branch)
            tips = _take_bundle(fh, repo, ref, mref, f"the task branch {branch}")
    finally:
        path.unlink(missing_ok=True)
    _complete(repo, tips)
    if checked_out == ref and have[ref] != tips[ref]:
        raise GitError(f"branch {branch} is checked out in {repo}; switch to another branch there "
                       "so taskbox can update it", branch=branch)
    moves = "".join(f"update {name_} {new} {have.get(name_) or '0' * len(new)}\n"
                    for name_, new in tips.items() if have.get(name_) != new)
    if moves:  # the branch and its memory move together, each from the value read before (compare-and-swap)
        git.run(["update-ref", "-m", "taskbox: fetch task branch", "--stdin"], cwd=repo, input=moves.encode())
    return commit, tips[ref]


# Write the memory files of companion ref "$1" that are missing in the workspace (never overwrite).
_RESTORE_MEMORY = _G + r"""
ref="$1"
$G rev-parse --verify --quiet "$ref^{commit}" >/dev/null || { echo none; exit 0; }
gd=$($G rev-parse --git-dir) || exit 12
export GIT_INDEX_FILE="$gd/taskbox-memory.index"
rm -f "$GIT_INDEX_FILE"
$G read-tree "$ref" || exit 13
$G checkout-index --all 2>/dev/null
rm -f "$GIT_INDEX_FILE"
echo restored
"""


def restore_memory(run: Runner, branch: str) -> bool:
    """Bring back memory files missing in the workspace from the companion ref (in the sandbox).

    Files that exist are never overwritten. True if the ref was there to restore from.
    """
    out = _check(run(["sh", "-c", _RESTORE_MEMORY, "sh", memory_ref(branch)]), "restoring the task memory").split()
    return out[-1:] == ["restored"]


def _read_bundle_header(fh: BinaryIO, ref: str, extra: str | None = None
                        ) -> tuple[dict[str, str], list[str], int]:
    """Parse a bundle header strictly, on the host's own descriptor; return ({ref: tip}, prerequisites, pack offset).

    The header must name ``ref`` and may name ``extra`` (the companion memory ref), nothing else.

    The bytes came out of the sandbox: they are data, never a path or a repository for git to
    open (a "gitdir: ..." text in place of a bundle would make ``git fetch FILE`` follow it).
    """
    head = fh.read(65536)
    for signature in (b"# v2 git bundle\n", b"# v3 git bundle\n"):
        if head.startswith(signature):
            break
    else:
        raise GitError("the sandbox produced no git bundle for the task branch (bad signature)")
    end = head.find(b"\n\n")
    if end < 0:
        raise GitError("the task branch bundle has no end of header within 64 KiB")
    tips: dict[str, str] = {}
    prereqs: list[str] = []
    for line in head[len(signature):end].split(b"\n"):
        text = line.decode("ascii", errors="replace")
        if text.startswith("@"):  # v3 capabilities: only the default object format is accepted
            if text not in ("@object-format=sha1",):
                raise GitError(f"the task branch bundle asks for an unsupported capability {text[:60]!r}")
        elif text.startswith("-"):
            sha = text[1:].split(" ", 1)[0]
            if not _SHA.match(sha):
                raise GitError("the task branch bundle has a malformed prerequisite")
            prereqs.append(sha)
        else:
            sha, _, name = text.partition(" ")
            if not _SHA.match(sha) or name not in (ref, extra) or name in tips:
                raise GitError(f"the task branch bundle names an unexpected ref {name[:80]!r}")
            tips[name] = sha
    if ref not in tips:
        raise GitError(f"the task branch bundle does not contain {ref}")
    if head[end + 2:end + 6] != b"PACK":
        raise GitError("the task branch bundle holds no pack after its header")
    return tips, prereqs, end + 2


def import_bundle(run: Runner, argv: list[str], repo: Path, ref: str, *, extra: str | None = None,
                  scratch: Path, limit: int, what: str) -> dict[str, str]:
    """Run ``argv`` in the sandbox (it writes a bundle of ``ref``, and maybe ``extra``, to stdout)
    and take its objects into ``repo``.

    At most ``limit`` bytes are kept, in a file of the host's own; the header is parsed here
    and only the pack goes to ``git index-pack --strict``; the new tips are checked complete.
    No ref is moved: the caller does that with ``update-ref`` and the old value. Returns
    ``{ref: tip}`` (``extra`` too when the bundle holds it).
    """
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="fetch-", suffix=".bundle", dir=scratch)
    path = Path(name)
    try:
        with os.fdopen(fd, "w+b") as fh:
            res = run(argv, sink=fh, limit=limit)
            if res.truncated:
                raise GitError(f"{what} packs to more than {limit} bytes; refusing to fetch "
                               "it (raise the fetch_limit setting if this is expected)")
            _check(res, "git bundle")
            fh.seek(0)
            tips = _take_bundle(fh, repo, ref, extra, what)
    finally:
        path.unlink(missing_ok=True)
    _complete(repo, tips)
    return tips


def _take_bundle(fh: BinaryIO, repo: Path, ref: str, extra: str | None, what: str) -> dict[str, str]:
    """Index the pack of the bundle that starts at ``fh``'s position into ``repo``; return its tips."""
    start = fh.tell()
    tips, prereqs, offset = _read_bundle_header(fh, ref, extra)
    for sha, there in zip(prereqs, _commits(repo, prereqs), strict=True):
        if not there:
            raise GitError(f"the bundle of {what} needs commit {sha[:12]}, which {repo} does not have")
    fh.seek(start + offset)
    git.run(["index-pack", "--stdin", "--fix-thin", "--strict"], cwd=repo, stdin=fh, timeout=1800)
    return tips


def _complete(repo: Path, tips: dict[str, str]) -> None:
    """Every object the new tips need is there (index-pack checks objects, not reachability)."""
    git.run(["rev-list", "--quiet", "--objects", *tips.values(), "--not", "--all"], cwd=repo)


def diff(run: Runner, base: str | None, stat: bool = False, limit: int = DIFF_LIMIT) -> str:
    """The task's changes against ``base`` (committed and uncommitted, new files included)."""
    args = ["diff", "--no-ext-diff", "--no-textconv", "--no-color"]
    if stat:
        args.append("--stat")
    if base:
        if not _SHA.match(base):
            raise GitError(f"base {base!r} is not a commit id")
        args.append(base)
    script = _G + '$G add --all --intent-to-add >/dev/null 2>&1; exec $G "$@"'
    res = run(["sh", "-c", script, "sh", *args], limit=limit)
    out = _check(res, "git diff")
    if res.truncated:
        out += f"\n[taskbox] diff cut at {limit} bytes\n"
    return out


def log(run: Runner, base: str | None, limit: int = 50) -> list[dict[str, str]]:
    rng = f"{base}..HEAD" if base and _SHA.match(base) else "HEAD"
    res = run([*_SANDBOX_GIT, "log", f"-{int(limit)}", "--format=%H%x00%an%x00%aI%x00%s", rng], limit=1 << 20)
    out = []
    for line in res.stdout.decode(errors="replace").splitlines():
        sha, author, when, subject = (line.split("\0") + ["", "", "", ""])[:4]
        out.append({"commit": sha, "author": author, "date": when, "subject": subject})
    return out


def remove(ws: Path) -> None:
    """Delete a workspace tree: by descriptors, never following a link, at any depth.

    A mounted workspace volume must be released first (emptying it would not free it).
    """
    if os.path.ismount(ws):
        raise VolumeError(f"{ws} is still a mounted workspace volume; it is not deleted")
    files.remove_tree(ws)

