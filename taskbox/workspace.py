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
import tempfile
from collections.abc import Callable
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


def commit_fresh(ws: Path, message: str, *, clean: bool = True, branch: str | None = None) -> str | None:
    """The first commit of a new workspace, before any agent has written it (host-side git).

    ``clean``: memory and Plan.md go to the companion ref of ``branch`` instead of the branch.
    """
    try:
        base = head_commit(ws)
        keep, _untrack = _paths(clean, base, lambda p: git.ref_exists(ws, f"{base}:{p}"))
        git.run(["add", "--all"], cwd=ws)
        git.run(["reset", "--quiet", "--", *keep], cwd=ws)
        if clean and branch:
            _save_memory_host(ws, memory_ref(branch))
        proc = git.run(["commit", "--quiet", "--no-verify", "-m", message], cwd=ws, check=False)
        if proc.returncode != 0:
            out = proc.stdout + proc.stderr
            if any(m in out for m in ("nothing to commit", "nothing added", "no changes added")):
                return None
            raise GitError(f"git commit failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}",
                           returncode=proc.returncode, stderr=proc.stderr)
        return git.run(["rev-parse", "HEAD"], cwd=ws).stdout.strip()
    finally:
        hand_over(ws)


def _save_memory_host(ws: Path, ref: str) -> None:
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


# Commit everything; print "committed" or "unchanged", then the HEAD commit (or "none").
# "$@": pathspecs kept at their last commit; $TASKBOX_UNTRACK: taskbox paths taken out of the index.
_COMMIT = _G + r"""
$G add --all || exit 10
$G reset -q -- "$@" >/dev/null 2>&1 || $G rm -r -q --cached --ignore-unmatch -- "$@" >/dev/null || exit 9
for p in $TASKBOX_UNTRACK; do $G rm -r -q --cached --ignore-unmatch -- "$p" >/dev/null || exit 9; done
if $G diff --cached --quiet 2>/dev/null; then echo unchanged
else $G commit --quiet --no-verify -m "$TASKBOX_MESSAGE" || exit 11; echo committed; fi
$G rev-parse --verify --quiet 'HEAD^{commit}' || echo none
"""


# Which of the taskbox paths the start commit tracks (those stay on the branch as the user's).
_TRACKED = _G + r"""
base="$1"; shift
for p in "$@"; do $G cat-file -e "$base:$p" 2>/dev/null && echo "$p"; done
exit 0
"""


def commit_all(run: Runner, message: str, *, clean: bool = False, base: str | None = None) -> str | None:
    """Commit everything in the workspace (in the sandbox); the new commit, or None if unchanged.

    ``clean``: ``.task-memory`` and ``Plan.md`` stay off the branch (untracked if an earlier
    commit had them), except a ``Plan.md`` the start commit ``base`` already tracked.
    Bytecode is never added.
    """
    tracked: set[str] = set()
    if clean and base and _SHA.match(base):
        tracked = set(_check(run(["sh", "-c", _TRACKED, "sh", base, *MEMORY_PATHS]), "git cat-file").split())
    keep, untrack = _paths(clean, base, lambda p: p in tracked)
    res = run(["sh", "-c", _COMMIT, "sh", *keep],
              env={"TASKBOX_MESSAGE": message, "TASKBOX_UNTRACK": "\n".join(untrack)})
    lines = _check(res, "git commit").split()
    if len(lines) < 2 or lines[0] not in ("committed", "unchanged"):
        raise GitError(f"git commit in the sandbox gave an unexpected answer: {' '.join(lines)[:200]!r}")
    if lines[0] == "unchanged":
        return None
    sha = lines[-1]
    return sha if _SHA.match(sha) else None


# Commit the memory files to the companion ref "$1" through a private index.
_SAVE_MEMORY = _G + r"""
ref="$1"
gd=$($G rev-parse --git-dir) || exit 12
export GIT_INDEX_FILE="$gd/taskbox-memory.index"
rm -f "$GIT_INDEX_FILE"
set --
[ -e .task-memory ] && set -- "$@" .task-memory
[ -e Plan.md ] && set -- "$@" Plan.md
[ $# -eq 0 ] && { echo none; exit 0; }
$G add --force -- "$@" || exit 13
tree=$($G write-tree) || exit 14
rm -f "$GIT_INDEX_FILE"
old=$($G rev-parse --verify --quiet "$ref^{commit}")
if [ -n "$old" ] && [ "$($G rev-parse "$old^{tree}")" = "$tree" ]; then echo unchanged; exit 0; fi
new=$(echo "taskbox: task memory" | $G commit-tree "$tree" ${old:+-p "$old"}) || exit 15
$G update-ref "$ref" "$new" || exit 16
echo saved
"""

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


def save_memory(run: Runner, branch: str) -> bool:
    """Commit the workspace's memory files to the branch's companion ref (in the sandbox); True if it moved."""
    out = _check(run(["sh", "-c", _SAVE_MEMORY, "sh", memory_ref(branch)]), "saving the task memory").split()
    return out[-1:] == ["saved"]


def restore_memory(run: Runner, branch: str) -> bool:
    """Bring back memory files missing in the workspace from the companion ref (in the sandbox).

    Files that exist are never overwritten. True if the ref was there to restore from.
    """
    out = _check(run(["sh", "-c", _RESTORE_MEMORY, "sh", memory_ref(branch)]), "restoring the task memory").split()
    return out[-1:] == ["restored"]


def branch_tip(run: Runner, branch: str, ref: str | None = None) -> str | None:
    """The commit of ``branch`` (or of the full ``ref``) in the workspace, as the sandbox's git sees it."""
    res = run([*_SANDBOX_GIT, "rev-parse", "--verify", "--quiet", f"{ref or f'refs/heads/{branch}'}^{{commit}}"])
    sha = res.stdout.decode(errors="replace").strip()
    return sha if res.exit_code == 0 and _SHA.match(sha) else None


# Pack the branch (and the companion ref "$2" when it is not "-" and exists) as a bundle on
# stdout, leaving out what the user's repository has.
_BUNDLE = _G + r"""
ref="$1"; mref="$2"; shift 2
tip=$($G rev-parse --verify --quiet "$ref^{commit}") || { echo "no branch $ref" >&2; exit 3; }
args="$ref"; tips="$tip"
if [ "$mref" != "-" ] && mtip=$($G rev-parse --verify --quiet "$mref^{commit}"); then
  args="$args $mref"; tips="$tips $mtip"
fi
for b in "$@"; do
  $G cat-file -e "$b^{commit}" 2>/dev/null || continue
  for t in $tips; do
    [ "$b" = "$t" ] && continue
    if $G merge-base --is-ancestor "$b" "$t" 2>/dev/null; then args="$args ^$b"; break; fi
  done
done
exec $G bundle create --quiet - $args
"""


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


def fetch_into(run: Runner, repo: Path, branch: str, *, scratch: Path, limit: int,
               with_memory: bool = False) -> str:
    """Bring the task branch from the workspace into the user's repository; return its commit.

    The sandbox packs the branch into a bundle (prerequisites: the commits the user's
    repository already has); the host takes at most ``limit`` bytes of it into a file of its
    own, parses the header itself and gives only the pack to ``git index-pack --strict`` in
    the user's repository; the branch moves only after the new tip is checked complete
    (``update-ref`` with the old value). No git process opens anything the sandbox wrote.
    ``with_memory``: the companion ref (:func:`memory_ref`) comes along the same way, when
    the workspace has it.
    """
    ref = f"refs/heads/{branch}"
    mref = memory_ref(branch) if with_memory else None

    def have_of(name: str) -> str:
        return git.run(["rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], cwd=repo, check=False).stdout.strip()

    have = {name: have_of(name) for name in (ref, mref) if name}
    tip = branch_tip(run, branch)
    if tip is None:
        raise GitError(f"the workspace has no branch {branch} (was it deleted or renamed in the sandbox?)",
                       branch=branch)
    wanted = {ref: tip}
    if mref and (mtip := branch_tip(run, branch, mref)):
        wanted[mref] = mtip
    if all(have.get(name) == sha for name, sha in wanted.items()):
        return tip
    checked_out = git.run(["symbolic-ref", "--quiet", "HEAD"], cwd=repo, check=False).stdout.strip()
    if checked_out == ref and have[ref] != tip:
        raise GitError(f"branch {branch} is checked out in {repo}; switch to another branch there "
                       "so taskbox can update it", branch=branch)
    basis = [c for c in (*have.values(), head_commit(repo)) if c and _SHA.match(c)]
    tips = import_bundle(run, ["sh", "-c", _BUNDLE, "sh", ref, mref if mref in wanted else "-", *basis], repo,
                         ref, extra=mref, scratch=scratch, limit=limit, what=f"the task branch {branch}")
    for name_, new in sorted(tips.items(), key=lambda kv: kv[0] != ref):  # the branch first
        if name_ == ref and checked_out == ref and have[ref] != new:
            raise GitError(f"branch {branch} is checked out in {repo}; switch to another branch there "
                           "so taskbox can update it", branch=branch)
        if have.get(name_) != new:
            git.run(["update-ref", "-m", "taskbox: fetch task " + ("branch" if name_ == ref else "memory"),
                     name_, new, have.get(name_) or "0" * len(new)], cwd=repo)
    return tips[ref]


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
            tips, prereqs, offset = _read_bundle_header(fh, ref, extra)
            for sha in prereqs:
                if not git.ref_exists(repo, f"{sha}^{{commit}}"):
                    raise GitError(f"the bundle of {what} needs commit {sha[:12]}, which {repo} does not have")
            fh.seek(offset)
            git.run(["index-pack", "--stdin", "--fix-thin", "--strict"], cwd=repo, stdin=fh, timeout=1800)
    finally:
        path.unlink(missing_ok=True)
    # complete: every object the new tips need is there (index-pack checks objects, not reachability)
    git.run(["rev-list", "--quiet", "--objects", *tips.values(), "--not", "--all"], cwd=repo)
    return tips


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

