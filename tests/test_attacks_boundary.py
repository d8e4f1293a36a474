"""The host boundary, attacked from inside the sandbox (issue: host boundary).

Every attack is performed the way an agent could: commands run in the task's container and
the task's own tool calls (service methods and the real MCP server). Each asserts on the
host: a canary directory outside the workspace unchanged (content hashes), a marker file
never created, the user's repository's refs, config, hooks and objects unchanged.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from taskbox import (
    GitError,
    InvalidInput,
    NotFound,
    PathOutsideWorkspace,
    TaskboxError,
    TaskService,
)

from .conftest import git


def tree_hash(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links as links) with a hash of its content."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def repo_state(repo: Path) -> dict[str, Any]:
    """What an attack on the user's repository would change: refs, HEAD, config, hooks, objects."""
    refs = git(repo, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
    return {"refs": sorted(refs), "head": (repo / ".git/HEAD").read_text(),
            "config": (repo / ".git/config").read_bytes(), "hooks": tree_hash(repo / ".git/hooks"),
            "objects": set(tree_hash(repo / ".git/objects"))}


def assert_repo_untouched(before: dict[str, Any], after: dict[str, Any], branch: str) -> None:
    """Only the task branch and its companion memory ref may have moved (fetched), and objects only added."""
    moved = (f"refs/heads/{branch} ", f"refs/taskbox/{branch}/memory ")
    keep = [r for r in before["refs"] if not r.startswith(moved)]
    assert [r for r in after["refs"] if not r.startswith(moved)] == keep
    assert after["head"] == before["head"]
    assert after["config"] == before["config"]
    assert after["hooks"] == before["hooks"]
    assert before["objects"] <= after["objects"]


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    c = tmp_path / "canary"
    (c / "sub").mkdir(parents=True)
    (c / ".env").write_text("CANARY_SECRET=host-only-value\n")
    (c / "secret.txt").write_text("host only\n")
    (c / "sub" / "deep.txt").write_text("deep host file\n")
    return c


@pytest.fixture
def task(svc: TaskService, repo: Path):
    return svc.create_task(repo, "attacker")


# --- git: nothing from the workspace's repository runs or resolves on the host ----------------


def plant_git_traps(svc: TaskService, task_id: str, marker: Path, canary: Path) -> None:
    """Every git vector of the issue, planted from inside the container."""
    payload = f"#!/bin/sh\ntouch {marker}\ncat\n"
    script = f"""
set -e
printf '%s' '{payload}' > /workspace/evil.sh && chmod +x /workspace/evil.sh
# hooks and config programs in the workspace's own .git
for h in pre-commit post-commit commit-msg reference-transaction post-checkout pre-push; do
  cp /workspace/evil.sh .git/hooks/$h; done
git config core.fsmonitor /workspace/evil.sh
git config core.sshCommand /workspace/evil.sh
git config core.pager /workspace/evil.sh
git config filter.x.clean /workspace/evil.sh
git config filter.x.smudge /workspace/evil.sh
git config filter.x.required true
git config diff.x.textconv /workspace/evil.sh
git config diff.x.command /workspace/evil.sh
git config merge.x.driver /workspace/evil.sh
git config include.path {canary}/.gitconfig-evil
printf '* filter=x diff=x merge=x\\n' > .gitattributes
# a nested repository with its own config and attributes
mkdir -p vendor/lib && cd vendor/lib && git init -q && git config filter.y.clean /workspace/evil.sh \\
  && git config diff.y.textconv /workspace/evil.sh && printf '* filter=y diff=y\\n' > .gitattributes \\
  && echo nested > n.txt && git add -A && git -c user.name=a -c user.email=a@b commit -qm n && cd /workspace
echo change >> README.md
"""
    r = svc.exec(task_id, script)
    assert r.exit_code == 0, r.stderr


def test_git_config_attributes_hooks_never_run_on_the_host(svc: TaskService, task, repo: Path, tmp_path: Path,
                                                           canary: Path) -> None:
    marker = tmp_path / "pwned"
    (canary / ".gitconfig-evil").write_text(f"[core]\n\tfsmonitor = {tmp_path}/evil-host.sh\n")
    before = repo_state(repo)
    plant_git_traps(svc, task.id, marker, canary)
    assert "README.md" in svc.diff(task.id, stat=True)
    svc.git_log(task.id)
    svc.sync(task.id)
    att = svc.attach(task.id, "mallory", "m1")
    svc.detach(task.id, att.session.id)  # commits and fetches with the container stopped afterwards
    svc.diff(task.id)  # on a paused task: a throwaway sandbox reads the workspace
    svc.create_checkpoint(task.id, "after-traps")
    svc.complete(task.id, "done")
    assert not marker.exists()
    after = repo_state(repo)
    assert_repo_untouched(before, after, task.branch)
    # the work arrived: the fetch brought the branch, not the traps' effects
    assert "change" in git(repo, "show", f"{task.branch}:README.md")


def test_commondir_gitfile_worktree_and_alternates_do_not_redirect_host_git(
        svc: TaskService, task, repo: Path, canary: Path) -> None:
    before = repo_state(repo)
    main_before = git(repo, "rev-parse", "main").strip()
    # commondir to the user's .git: a host-side commit would move the user's checked-out main
    svc.exec(task.id, f"echo '{repo}/.git' > .git/commondir && echo x > new.txt")
    for op in (lambda: svc.sync(task.id), lambda: svc.diff(task.id)):
        try:
            op()
        except TaskboxError:
            pass  # the sandbox's git may fail on the broken commondir: fine, as long as the host is safe
    assert git(repo, "rev-parse", "main").strip() == main_before
    svc.exec(task.id, "rm .git/commondir")
    # core.worktree pointing at a host directory: the diff must not show host files
    svc.exec(task.id, f"git config core.worktree {canary}")
    try:
        out = svc.diff(task.id)
        assert "host only" not in out and "CANARY_SECRET" not in out
        svc.sync(task.id)
    except TaskboxError:
        pass
    svc.exec(task.id, "git config --unset core.worktree")
    # alternates to the user's objects, and a gitfile .git pointing at the user's repository
    svc.exec(task.id, f"echo '{repo}/.git/objects' > .git/objects/info/alternates")
    try:
        svc.sync(task.id)
    except TaskboxError:
        pass
    svc.exec(task.id, f"rm -f .git/objects/info/alternates && mv .git .git-real && echo 'gitdir: {repo}/.git' > .git")
    with pytest.raises(GitError):
        svc.sync(task.id)
    assert git(repo, "rev-parse", "main").strip() == main_before
    after = repo_state(repo)
    assert_repo_untouched(before, after, task.branch)
    branch = git(repo, "ls-tree", "-r", "--name-only", task.branch).split() if task.branch in str(after["refs"]) else []
    assert not {"secret.txt", ".env", "deep.txt"} & set(branch)


def test_branch_fetch_is_bounded(svc: TaskService, task, repo: Path, home: Path, monkeypatch) -> None:
    """A branch that packs to more than fetch_limit is refused, and the user's repository is unchanged."""
    svc.settings = type(svc.settings)(**{**svc.settings.__dict__, "fetch_limit": "1m"})
    svc.exec(task.id, "head -c 3000000 /dev/urandom > big.bin")
    before = repo_state(repo)
    with pytest.raises(GitError, match="more than"):
        svc.sync(task.id)
    after = repo_state(repo)
    assert after["refs"] == before["refs"]
    assert not list((home / "tmp").glob("*.bundle"))  # the partial bundle is gone


# --- file tools: a real race against a process swapping a directory for a link ----------------


RACE = """
cd /workspace && mkdir -p d && echo mine > d/secret.txt
nohup setsid sh -c 'while :; do mv d d.real; ln -s {target} d; rm -f d; mv d.real d; done' \
  >/dev/null 2>&1 &
echo started
"""


def test_file_tools_hold_against_a_swapping_race(svc: TaskService, task, canary: Path, tmp_path: Path) -> None:
    before = tree_hash(canary)
    r = svc.exec(task.id, RACE.format(target=canary))
    assert "started" in r.stdout
    outcomes: dict[str, int] = {}

    def note(kind: str) -> None:
        outcomes[kind] = outcomes.get(kind, 0) + 1

    for i in range(1500):
        for name, op in (
            ("write", lambda i=i: svc.write_file(task.id, f"d/x{i % 7}.txt", b"pwned\n")),
            ("read", lambda: svc.read_text(task.id, "d/secret.txt")),
            ("delete", lambda: svc.delete_file(task.id, "d/secret.txt")),
            ("edit", lambda: svc.edit_file(task.id, "d/secret.txt", "host only", "pwned")),
            ("list", lambda: svc.list_files(task.id, "d")),
        ):
            try:
                res = op()
                note(name + ":ok")
                if name == "read":
                    assert "host only" not in res["content"]
                if name == "list":
                    assert not any(e["path"].endswith("deep.txt") or e["path"].endswith(".env")
                                   for e in res["entries"])
            except (PathOutsideWorkspace, NotFound, InvalidInput):
                note(name + ":refused")
        if i % 50 == 0:  # keep the file the host aims at existing in the real directory
            svc.exec(task.id, "echo mine > d.real/secret.txt 2>/dev/null; echo mine > d/secret.txt 2>/dev/null; true")
    svc.exec(task.id, "pkill -f 'mv d d.real' ; true")
    assert tree_hash(canary) == before, "a host file outside the workspace was changed"
    assert not (canary / "x0.txt").exists()
    # the race really ran: calls both went through and were refused mid-swap
    assert outcomes.get("write:ok", 0) > 0 and outcomes.get("write:refused", 0) > 0, outcomes


def mcp_client() -> Client:
    return Client(StdioServerParameters(command=sys.executable, args=["-m", "taskbox", "mcp"],
                                        env=dict(os.environ)))


def test_mcp_file_tools_race_and_git_traps(svc: TaskService, repo: Path, canary: Path, tmp_path: Path) -> None:
    """The same attacks through the real MCP server, as an agent would make them."""
    before_canary = tree_hash(canary)
    marker = tmp_path / "pwned-mcp"
    before_repo = repo_state(repo)

    async def main() -> dict[str, int]:
        counts = {"ok": 0, "refused": 0}
        async with mcp_client() as client:
            made = await client.call_tool("create_task_sandbox", {"task_id": "mcp-attack", "task_description": "x",
                                                                  "workspace_path": str(repo)})
            assert not made.is_error
            await client.call_tool("execute_in_task", {"task_id": "mcp-attack",
                                                       "command": RACE.format(target=canary)})
            for i in range(400):
                for tool, args in (("write_task_file", {"path": f"d/m{i % 5}.txt", "content": "pwned"}),
                                   ("read_task_file", {"path": "d/secret.txt"}),
                                   ("delete_task_file", {"path": "d/secret.txt"})):
                    res = await client.call_tool(tool, {"task_id": "mcp-attack", **args})
                    counts["refused" if res.is_error else "ok"] += 1
                    if tool == "read_task_file" and not res.is_error:
                        assert "host only" not in (res.content[0].text if res.content else "")
            await client.call_tool("execute_in_task", {"task_id": "mcp-attack", "command": "pkill -f 'mv d d.real'; true"})
            plant_git_traps(svc, "mcp-attack", marker, canary)
            diff = await client.call_tool("task_diff", {"task_id": "mcp-attack"})
            assert not diff.is_error
            done = await client.call_tool("complete_task", {"task_id": "mcp-attack"})
            assert not done.is_error, done.content
        return counts

    counts = anyio.run(main)
    assert tree_hash(canary) == before_canary
    assert not marker.exists()
    assert_repo_untouched(before_repo, repo_state(repo), svc.get("mcp-attack").branch)
    assert counts["ok"] > 0 and counts["refused"] > 0, counts


# --- bounded reads -------------------------------------------------------------------------------


def test_reading_a_sparse_gigabyte_file_stays_bounded(svc: TaskService, task) -> None:
    svc.exec(task.id, "truncate -s 1G sparse.txt && printf 'hello\\n' | dd of=sparse.txt conv=notrunc 2>/dev/null")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(InvalidInput, match="binary"):
        svc.read_text(task.id, "sparse.txt")  # NULs: refused after reading at most the window
    data = svc.read_file(task.id, "sparse.txt", limit=4096)
    assert data.startswith(b"hello\n") and len(data) == 4096
    svc.exec(task.id, "yes 'a line of text' | head -c 300000000 > big.txt")
    part = svc.read_text(task.id, "big.txt", max_bytes=10_000)
    assert part["truncated"] is True and part["size"] == 300_000_000 and len(part["content"]) <= 10_000
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 200, f"the server's peak memory grew by {grown_mib:.0f} MiB reading big files"


def test_memory_logs_grown_by_the_agent_are_read_bounded(svc: TaskService, task) -> None:
    """The agent can append to .task-memory logs without bound; the host reads only their tail."""
    svc.exec(task.id, "yes '{\"role\": \"x\", \"message\": \"y\"}' | head -c 200000000 >> .task-memory/conversations.jsonl")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hist = svc.history(task.id)
    assert hist is not None
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 300, f"reading a 200 MB log grew the peak by {grown_mib:.0f} MiB"


def test_host_never_runs_git_in_the_workspace(svc: TaskService, task, tmp_path: Path) -> None:
    """A wrapper on PATH records every host git call: none of them has the workspace as cwd or target."""
    log = tmp_path / "git-calls.log"
    wrapper = tmp_path / "bin" / "git"
    wrapper.parent.mkdir()
    real = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True).stdout.strip()
    wrapper.write_text(f'#!/bin/sh\necho "$PWD :: $GIT_WORK_TREE :: $GIT_DIR :: $*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{wrapper.parent}:{old}"
    try:
        svc.exec(task.id, "echo more >> README.md")
        svc.diff(task.id)
        svc.git_log(task.id)
        svc.sync(task.id)
        att = svc.attach(task.id, "a", "b")
        svc.detach(task.id, att.session.id)
        svc.complete(task.id, "done")
    finally:
        os.environ["PATH"] = old
    ws = str(Path(task.workspace_path))
    calls = log.read_text().splitlines() if log.exists() else []
    assert calls, "the wrapper saw no git call at all (the fetch into the user's repository is one)"
    assert not [c for c in calls if ws in c], calls


def test_deep_trees_are_listed_and_deleted_without_overflow(svc: TaskService, task) -> None:
    """Directory depth is the agent's choice: listing and deleting stay iterative and bounded."""
    svc.exec(task.id, "mkdir deep && cd deep && for i in $(seq 1500); do mkdir d && cd d; done && echo x > leaf.txt")
    listed = svc.list_files(task.id, "deep", recursive=True, limit=5000)["entries"]
    assert len(listed) == 1501 and listed[-1]["path"].endswith("/leaf.txt")
    svc.delete_file(task.id, "deep")
    assert svc.exec(task.id, "test -e deep; echo $?").stdout.strip() == "1"
    svc.exec(task.id, "mkdir deeper && cd deeper && for i in $(seq 2500); do mkdir d && cd d; done")
    # past PATH_MAX: listed as far as a path reaches, deleted or refused in one clear line
    assert len(svc.list_files(task.id, "deeper", recursive=True, limit=10_000)["entries"]) > 1000
    svc.delete_file(task.id, "deeper")
    assert svc.exec(task.id, "test -e deeper; echo $?").stdout.strip() == "1"
    svc.exec(task.id, "mkdir gone && cd gone && for i in $(seq 2500); do mkdir d && cd d; done")
    svc.abort(task.id, "done")
    svc.cleanup(task.id, remove_workspace=True)  # the whole workspace, 2500 levels deep
    assert not Path(task.workspace_path).exists()
