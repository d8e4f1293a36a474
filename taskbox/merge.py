"""Merging a task's branch into another branch, with nothing half-merged (SPEC §4, §7).

An engine. The task's branch comes from an agent-written repository, so **no git porcelain
runs on the host in a workspace**: the merge itself runs inside a sandbox —

- into a task (a sub-task into its parent): in the target task's own sandbox, on its
  workspace, after the task branch was fetched into the user's repository through the safe
  path (:func:`taskbox.workspace.publish`) and handed over as a bundle the host made
  from the user's repository;
- into a branch of the user's repository: in a throwaway sandbox, on a bare copy of the two
  commits' objects; the result comes back as a bundle the host parses as data
  (:func:`taskbox.workspace.import_bundle`), and the user's ref moves only by ``update-ref``
  with its old value. The user's work tree is never touched and a checked-out branch is
  refused.

The merge is computed with ``git merge-tree --write-tree`` (no index, no work tree): a
conflict changes nothing and names the files. A clean merge writes one ``--no-ff`` commit
(or a squash commit), updates the work tree from the old commit to the new one with a
two-tree ``read-tree -u -m`` and only then moves the branch by compare-and-swap; both steps
run in one script inside the sandbox, which goes on even if taskbox is killed meanwhile.
Every merge commit carries a ``Taskbox-Merged: <tip>`` trailer, so a merge is recognised as
done (after a crash) even when squashed: nothing is merged twice.

taskbox's own bookkeeping files (``Plan.md``, ``.task-memory/``) are not merged: the target
keeps its own (each task writes its own, and they would conflict on every merge).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import git
from .errors import GitError, InvalidInput
from .workspace import _G, _SHA, Runner, _check

KEEP = ("Plan.md", ".task-memory")
TRAILER = "Taskbox-Merged"
INCOMING = ".git/taskbox-incoming.bundle"  # where the host puts the bundle in the target workspace


@dataclass
class Outcome:
    """What a merge did: ``merged`` (a new commit), ``already`` (the branch had it) or ``conflict``."""

    status: str
    commit: str | None = None
    old: str | None = None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "commit": self.commit, "old": self.old, "conflict_files": self.files}


# Shared by both scripts: $old (target commit), $tip (the task's commit), $keep (paths kept
# from the target). Prints "already SHA", "conflict" + file names, or "merged SHA".
_MERGE = r"""
if $G merge-base --is-ancestor "$tip" "$old" 2>/dev/null \
   || $G log -n 500 --format=%B "$old" 2>/dev/null | grep -qx "TRAILER: $tip"; then
  echo already; echo "$old"; exit 0
fi
base=$($G merge-base "$old" "$tip" 2>/dev/null || true)
# the task's work without taskbox's bookkeeping files: the target keeps its own (when the task
# left them as they were at the merge base, that is the task's commit itself)
if [ -n "$base" ] && $G diff-tree --quiet "$base" "$tip" -- $keep; then theirs=$tip
else
  GIT_INDEX_FILE=$(mktemp); export GIT_INDEX_FILE
  $G read-tree "$tip" || exit 30
  $G ls-tree -r "$tip" -- $keep | sed "s/^[0-9]* [a-z]* [0-9a-f]*\t/0 0000000000000000000000000000000000000000\t/" \
    | $G update-index --index-info || exit 31
  if [ -n "$base" ]; then $G ls-tree -r "$base" -- $keep | $G update-index --index-info || exit 32; fi
  work=$($G write-tree) || exit 33
  rm -f "$GIT_INDEX_FILE"; unset GIT_INDEX_FILE
  theirs=$(echo "work of $tip" | $G commit-tree -p "$tip" "$work") || exit 34
fi
out=$($G merge-tree --write-tree --name-only --no-messages "$old" "$theirs"); rc=$?
if [ $rc -eq 1 ]; then echo conflict; printf '%s\n' "$out" | tail -n +2; exit 0; fi
[ $rc -eq 0 ] || exit 35
tree=$(printf '%s\n' "$out" | head -n 1)
msg=$(printf '%s\n\nTRAILER: %s\n' "$TASKBOX_MESSAGE" "$tip")
if [ "$squash" = 1 ]; then new=$(printf '%s' "$msg" | $G commit-tree -p "$old" "$tree") || exit 36
else new=$(printf '%s' "$msg" | $G commit-tree -p "$old" -p "$tip" "$tree") || exit 36; fi
""".replace("TRAILER", TRAILER)

# In the target task's workspace: take the bundle's objects, then for each task commit in
# turn merge it, update the work tree and move the branch (compare-and-swap); each merge is
# announced by a line "$mark N" (a nonce the merged trees cannot know) and ends as _MERGE says.
# The first that fails ends the script with its exit code: the ones before it are done.
_IN_WORKSPACE = _G + r"""
branch="$1"; squash="$2"; bundle="$3"; n="$4"; mark="$5"; shift 5
tips=""; i=0
while [ "$i" -lt "$n" ]; do tips="$tips $1"; shift; i=$((i + 1)); done
keep="$*"
ref="refs/heads/$branch"
[ "$($G symbolic-ref -q HEAD)" = "$ref" ] || { echo "the workspace is not on branch $branch" >&2; exit 20; }
if [ -f "$bundle" ]; then
  $G bundle unbundle "$bundle" >/dev/null || { rm -f "$bundle"; exit 21; }
  rm -f "$bundle"
fi
# stat data gone stale (the files handed over to the sandbox user, a restore) is not a change
$G update-index -q --refresh >/dev/null 2>&1
i=0
for tip in $tips; do
  i=$((i + 1))
  eval "TASKBOX_MESSAGE=\$TASKBOX_MESSAGE_$i"
  echo "$mark $i"
  (
$G cat-file -e "$tip^{commit}" 2>/dev/null || { echo "commit $tip is missing" >&2; exit 22; }
old=$($G rev-parse --verify -q "$ref^{commit}") || exit 25
""" + _MERGE + r"""
$G read-tree -u -m "$old" "$new" || exit 37
if ! $G update-ref -m "taskbox: merge $tip" "$ref" "$new" "$old"; then
  $G read-tree -u -m "$new" "$old"; exit 38
fi
echo merged; echo "$new"
  ) || exit $?
done
"""

# In a throwaway sandbox on a bare copy of the two commits: merge into a ref of the copy.
_IN_BARE = _G + r"""
old="$1"; tip="$2"; squash="$3"; shift 3; keep="$*"
export GIT_DIR=/workspace/repo.git
""" + _MERGE + r"""
$G update-ref refs/heads/taskbox-merge-result "$new" || exit 38
echo merged; echo "$new"
"""

RESULT_REF = "refs/heads/taskbox-merge-result"


def result_bundle(old: str, tip: str) -> list[str]:
    """The argv that bundles a bare merge's result to stdout (prerequisites: both sides, which the user has)."""
    if not (_SHA.match(old) and _SHA.match(tip)):
        raise InvalidInput("merge sides must be commit ids")
    return ["sh", "-c", _G + 'export GIT_DIR=/workspace/repo.git\nexec $G bundle create --quiet - "$@"', "sh",
            RESULT_REF, f"^{old}", f"^{tip}"]


def _outcome(text: str) -> Outcome:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise GitError("the merge in the sandbox gave no answer")
    kind = lines[0]
    if kind in ("merged", "already") and len(lines) >= 2 and _SHA.match(lines[1]):
        return Outcome(kind, commit=lines[1])
    if kind == "conflict":
        names = list(dict.fromkeys(n for n in lines[1:] if len(n) < 4096))
        return Outcome("conflict", files=names[:1000])
    raise GitError(f"the merge in the sandbox gave an unexpected answer: {' '.join(lines)[:200]!r}")


def in_workspace(run: Runner, branch: str, tip: str, message: str, *, squash: bool = False,
                 bundle: str = INCOMING, keep: tuple[str, ...] = KEEP) -> Outcome:
    """Merge commit ``tip`` into ``branch`` of the workspace ``run`` works on (in its sandbox).

    The bundle the host put at ``bundle`` (relative to the workspace) brings ``tip``'s
    objects. Uncommitted changes stay as they are (``read-tree`` refuses to overwrite one the
    merge would change: an error, nothing done). A conflict leaves the branch, the index and
    the work tree as they were.
    """
    done, error = in_workspace_many(run, branch, [(tip, message)], squash=squash, bundle=bundle, keep=keep)
    if error is not None:
        raise error
    return done[0]


def in_workspace_many(run: Runner, branch: str, merges: list[tuple[str, str]], *, squash: bool = False,
                      bundle: str = INCOMING, keep: tuple[str, ...] = KEEP) -> tuple[list[Outcome], GitError | None]:
    """Merge each ``(tip, message)`` into ``branch`` in turn, in one command in the sandbox.

    Each merge is made as :func:`in_workspace` makes it, on the branch as the one before left
    it: its own commit, its own compare-and-swap; a conflict changes nothing and the next one
    goes on. The first that fails stops the rest: returns the outcomes before it and its
    error (``None`` when all were made).
    """
    if not merges:
        return [], None
    for tip, _message in merges:
        if not _SHA.match(tip):
            raise InvalidInput(f"{tip!r} is not a commit id")
    mark = f"taskbox-merge-{secrets.token_hex(8)}"
    env = {f"TASKBOX_MESSAGE_{n}": message for n, (_tip, message) in enumerate(merges, 1)}
    res = run(["sh", "-c", _IN_WORKSPACE, "sh", branch, "1" if squash else "0", bundle, str(len(merges)), mark,
               *(tip for tip, _message in merges), *keep], env=env)
    sections: list[list[str]] = []
    for line in res.stdout.decode(errors="replace").splitlines():
        if line.startswith(mark + " "):
            sections.append([])
        elif sections:
            sections[-1].append(line)
    if res.exit_code == 0 and len(sections) != len(merges):
        raise GitError(f"the merge in the sandbox answered for {len(sections)} of {len(merges)} commits")
    if res.exit_code == 0:
        return [_outcome("\n".join(lines)) for lines in sections], None
    done = [_outcome("\n".join(lines)) for lines in sections[:-1]]
    try:
        _check(res, "git merge")
    except GitError as exc:
        return done, exc
    raise AssertionError("unreachable: a failed command is an error")


def bundle_from(repo: Path, dest: Path, tips: str | list[str], exclude: list[str]) -> Path:
    """A bundle of the history of ``tips`` in the user's (trusted) repository, without what
    ``exclude`` reaches."""
    tips = [tips] if isinstance(tips, str) else list(dict.fromkeys(tips))
    for tip in tips:
        if not _SHA.match(tip):
            raise InvalidInput(f"{tip!r} is not a commit id")
    stem = f"refs/taskbox/merge-source-{secrets.token_hex(4)}"  # its own: merges into other tasks may run
    refs = [f"{stem}-{n}" for n in range(len(tips))]
    git.run(["update-ref", "--stdin"], cwd=repo,
            input="".join(f"create {ref} {tip}\n" for ref, tip in zip(refs, tips, strict=True)).encode())
    try:
        have = [f"^{c}" for c in dict.fromkeys(exclude) if c and _SHA.match(c) and c not in tips
                and git.ref_exists(repo, f"{c}^{{commit}}")]
        git.run(["bundle", "create", "--quiet", str(dest), *refs, *have], cwd=repo, timeout=1800)
    finally:
        git.run(["update-ref", "--stdin"], cwd=repo, check=False,
                input="".join(f"delete {ref}\n" for ref in refs).encode())
    return dest


def bare_copy(repo: Path, dest: Path, commits: list[str]) -> None:
    """A bare repository at ``dest`` holding ``commits`` and their history, copied from the user's repository."""
    git.run(["init", "--quiet", "--bare", str(dest)], cwd=dest.parent, harden=True)
    refs = []
    for n, c in enumerate(commits):
        if not _SHA.match(c):
            raise InvalidInput(f"{c!r} is not a commit id")
        git.run(["update-ref", f"refs/taskbox/merge-{n}", c], cwd=repo)
        refs.append(f"refs/taskbox/merge-{n}:refs/heads/in-{n}")
    try:
        git.run(["fetch", "--quiet", "--no-tags", str(repo), *refs], cwd=dest, harden=True, timeout=1800)
    finally:
        for n in range(len(commits)):
            git.run(["update-ref", "-d", f"refs/taskbox/merge-{n}"], cwd=repo, check=False)


def in_bare(run: Runner, old: str, tip: str, message: str, *, squash: bool = False,
            keep: tuple[str, ...] = KEEP) -> Outcome:
    """Merge ``tip`` into ``old`` in the bare copy at /workspace/repo.git (a throwaway sandbox).

    A clean merge leaves its commit at :data:`RESULT_REF` of the copy; bring it over with
    :func:`result_bundle` and :func:`taskbox.workspace.import_bundle`.
    """
    if not (_SHA.match(old) and _SHA.match(tip)):
        raise InvalidInput("merge sides must be commit ids")
    res = run(["sh", "-c", _IN_BARE, "sh", old, tip, "1" if squash else "0", *keep],
              env={"TASKBOX_MESSAGE": message})
    out = _outcome(_check(res, "git merge"))
    out.old = old
    return out


_TRAILER_RE = re.compile(rf"^{TRAILER}: ([0-9a-f]{{40}})$", re.MULTILINE)


def merged_tips(message: str) -> list[str]:
    """The task commits a merge commit's message says it merged."""
    return _TRAILER_RE.findall(message)
