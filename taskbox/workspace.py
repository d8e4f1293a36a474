"""A task's workspace: a private clone of the user's repository on the task's branch.

The clone copies objects (no hardlinks, no alternates), so nothing the container writes can
reach the user's repository; work travels back only by the host fetching the task branch.
Every git command on a workspace is run through :func:`taskbox.git.run` as *untrusted*.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import git
from .errors import GitError, VolumeError
from .sandbox import sandbox_owner


def hand_over(path: Path) -> None:
    """Give ``path`` (recursively) to the sandbox user when taskbox runs as root.

    Host-side git runs as the invoking user (the sandbox uid may not even be able to reach
    TASKBOX_HOME on the host); files it creates as root must stay writable in the container.
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
    proc = git.run(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], cwd=repo, check=False)
    return proc.stdout.strip() or None


def create(repo: Path, dest: Path, branch: str, base_ref: str | None) -> None:
    """Clone ``repo`` into ``dest`` and check out a new ``branch`` at ``base_ref``.

    Until the container starts nobody but taskbox has written the clone, so these git
    commands need not be treated as untrusted.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    git.run(["clone", "--quiet", "--no-hardlinks", "--no-checkout", "--config", "user.name=taskbox agent",
             "--config", "user.email=agent@taskbox.local", str(repo), str(dest)], cwd=dest.parent)
    if base_ref:
        git.run(["checkout", "--quiet", "-b", branch, base_ref], cwd=dest)
    else:  # an empty repository: start the branch unborn
        git.run(["checkout", "--quiet", "--orphan", branch], cwd=dest)
    hand_over(dest)


def commit_all(ws: Path, message: str, *, trusted: bool = False) -> str | None:
    """Commit everything in the workspace; return the new commit, or None if nothing changed.

    ``trusted`` is only for a workspace no agent has written yet (during create).
    """
    untrusted = not trusted
    try:
        git.run(["add", "--all"], cwd=ws, untrusted=untrusted)
        proc = git.run(["commit", "--quiet", "--no-verify", "-m", message], cwd=ws, untrusted=untrusted,
                       check=False)
        if proc.returncode != 0:
            if "nothing to commit" in proc.stdout + proc.stderr or "nothing added" in proc.stdout:
                return None
            raise GitError(f"git commit failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}",
                           returncode=proc.returncode, stderr=proc.stderr)
        return git.run(["rev-parse", "HEAD"], cwd=ws, untrusted=untrusted).stdout.strip()
    finally:
        hand_over(ws / ".git")


def current_branch(ws: Path) -> str:
    return git.run(["symbolic-ref", "--short", "HEAD"], cwd=ws, untrusted=True).stdout.strip()


def fetch_into(repo: Path, ws: Path, branch: str) -> str:
    """Bring the task branch from the workspace into the user's repository; return its commit."""
    git.check_untrusted(ws)
    ref = f"refs/heads/{branch}"
    try:
        git.run(
            ["fetch", "--quiet", "--no-tags", f"--upload-pack={git.upload_pack_command()}",
             str(ws / ".git"), f"+{ref}:{ref}"],
            cwd=repo,
            harden=True,  # upload-pack runs in the agent-written repo and inherits -c config
        )
    except GitError as exc:
        if "checked out" in (exc.details.get("stderr") or ""):
            raise GitError(
                f"branch {branch} is checked out in {repo}; switch to another branch there "
                "so taskbox can update it",
                branch=branch,
            ) from exc
        raise
    return git.run(["rev-parse", ref], cwd=repo).stdout.strip()


def diff(ws: Path, base: str | None, stat: bool = False) -> str:
    """The task's changes against ``base`` (committed and uncommitted, new files included)."""
    git.run(["add", "--all", "--intent-to-add"], cwd=ws, untrusted=True)
    hand_over(ws / ".git")
    args = ["diff", "--no-ext-diff", "--no-textconv", "--no-color"]
    if stat:
        args.append("--stat")
    if base:
        args.append(base)
    return git.run(args, cwd=ws, untrusted=True).stdout


def log(ws: Path, base: str | None, limit: int = 50) -> list[dict[str, str]]:
    rng = f"{base}..HEAD" if base else "HEAD"
    proc = git.run(
        ["log", f"-{limit}", "--format=%H%x00%an%x00%aI%x00%s", rng], cwd=ws, untrusted=True, check=False
    )
    out = []
    for line in proc.stdout.splitlines():
        sha, author, when, subject = (line.split("\0") + ["", "", "", ""])[:4]
        out.append({"commit": sha, "author": author, "date": when, "subject": subject})
    return out


def remove(ws: Path) -> None:
    """Delete a workspace directory; a mounted workspace volume must be released first."""
    if os.path.ismount(ws):  # rmtree would empty the volume, then fail on the mount point
        raise VolumeError(f"{ws} is still a mounted workspace volume; it is not deleted")
    if ws.exists():
        shutil.rmtree(ws)
