"""The branch the user gets holds the work only; memory travels beside it on a companion ref.

Real Docker and git: the agent writes bytecode and commits in its container, taskbox commits
and fetches, and the user's repository is read with git afterwards.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from taskbox import GitError, TaskService
from taskbox.config import Settings
from taskbox.workspace import _read_bundle_header, memory_ref

from .conftest import git


def files_on(repo: Path, ref: str) -> list[str]:
    return git(repo, "ls-tree", "-r", "--name-only", ref).split()


def test_branch_holds_the_work_and_memory_rides_beside_it(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "clean branch", agent="opencode", model="gpt-5")
    svc.update_todos(task.id, [{"text": "write the module"}])
    # bytecode from running the code, and the agent's own commit with `git add -A` in the container
    svc.exec(task.id, "mkdir -p pkg && echo 'X = 1' > pkg/mod.py && python3 -c 'import pkg.mod' "
                      "&& python3 -m py_compile app.py && ls pkg/__pycache__ >/dev/null")
    r = svc.exec(task.id, "git add -A && git -c user.name=a -c user.email=a@b commit -qm 'agent commit' "
                          "&& git show --stat --format= HEAD")
    assert r.exit_code == 0 and "pkg/mod.py" in r.stdout
    assert ".task-memory" not in r.stdout and "Plan.md" not in r.stdout and "__pycache__" not in r.stdout
    svc.exec(task.id, "echo more > notes.txt")
    svc.complete(task.id, "module written")

    assert files_on(repo, task.branch) == ["README.md", "app.py", "notes.txt", "pkg/mod.py"]
    for commit in git(repo, "rev-list", task.branch, "--not", "main").split():  # no commit ever had them
        assert not {p for p in files_on(repo, commit) if p.startswith((".task-memory", "Plan.md"))}
    ref = memory_ref(task.branch)
    assert sorted(files_on(repo, ref)) == [".task-memory/conversations.jsonl", ".task-memory/decisions.md",
                                           ".task-memory/executions.jsonl", ".task-memory/state.json", "Plan.md"]
    state = json.loads(git(repo, "show", f"{ref}:.task-memory/state.json"))
    assert state["status"] == "completed" and [t["text"] for t in state["todos"]] == ["write the module"]
    assert "module written" in git(repo, "show", f"{ref}:Plan.md")
    # every publish adds a memory commit on top of the last: its history is kept
    assert int(git(repo, "rev-list", "--count", ref).strip()) >= 2


def test_lost_memory_comes_back_from_the_companion_ref_on_resume(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "memory comes back", agent="claude-code", model="opus")
    svc.attach(task.id, "claude-code", "opus")
    svc.update_todos(task.id, [{"text": "survive a git clean"}])
    svc.detach(task.id)  # publishes: branch and memory ref in the user's repository
    ws = Path(task.workspace_path)
    shutil.rmtree(ws / ".task-memory")
    (ws / "Plan.md").unlink()
    back = svc.attach(task.id, "claude-code", "opus")
    assert [t["text"] for t in back.restored_state["todos"]] == ["survive a git clean"]
    assert back.recovery is None  # restored whole, not rebuilt
    assert (ws / "Plan.md").read_text().startswith("# Plan — memory comes back")
    assert "memory.restored" in [e["type"] for e in svc.registry.events(task.id)]


def test_memory_on_branch_keeps_the_old_layout(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "memory on the branch", memory_on_branch=True)
    svc.exec(task.id, "python3 -m py_compile app.py")
    svc.sync(task.id)
    on_branch = files_on(repo, task.branch)
    assert "Plan.md" in on_branch and ".task-memory/state.json" in on_branch
    assert not [p for p in on_branch if "__pycache__" in p]
    assert git(repo, "for-each-ref", "refs/taskbox/").strip() == ""


def test_a_plan_md_the_project_tracks_stays_on_the_branch(svc: TaskService, repo: Path) -> None:
    (repo / "Plan.md").write_text("# the project's own plan\n")
    git(repo, "add", "Plan.md")
    git(repo, "commit", "-qm", "plan")
    task = svc.create_task(repo, "own plan")
    svc.exec(task.id, "echo x > x.txt")
    svc.sync(task.id)
    assert "Plan.md" in files_on(repo, task.branch)
    assert git(repo, "show", f"{task.branch}:Plan.md") == "# the project's own plan\n"  # taskbox's notes stay off
    assert "own plan" in git(repo, "show", f"{memory_ref(task.branch)}:Plan.md")
    assert not [p for p in files_on(repo, task.branch) if p.startswith(".task-memory")]


def test_the_setting_comes_from_the_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKBOX_MEMORY_ON_BRANCH", "0")
    assert Settings.load(home).memory_on_branch is False
    monkeypatch.setenv("TASKBOX_MEMORY_ON_BRANCH", "yes")
    assert Settings.load(home).memory_on_branch is True
    monkeypatch.setenv("TASKBOX_MEMORY_ON_BRANCH", "maybe")
    with pytest.raises(Exception, match="expected true or false"):
        Settings.load(home)


def test_the_bundle_header_may_name_the_branch_and_its_memory_ref_only() -> None:
    a, b = "a" * 40, "b" * 40
    branch, mref = "refs/heads/x/y", "refs/taskbox/x/y/memory"

    def header(*refs: str) -> io.BytesIO:
        return io.BytesIO(b"# v2 git bundle\n" + "\n".join(refs).encode() + b"\n\nPACK....")

    tips, _pre, _off = _read_bundle_header(header(f"{a} {branch}", f"{b} {mref}"), branch, mref)
    assert tips == {branch: a, mref: b}
    for bad in ([f"{a} {branch}", f"{b} refs/heads/main"], [f"{a} {branch}", f"{b} {branch}"],
                [f"{b} {mref}"]):
        with pytest.raises(GitError):
            _read_bundle_header(header(*bad), branch, mref)
    with pytest.raises(GitError, match="unexpected ref"):  # not asked for: the memory ref is refused too
        _read_bundle_header(header(f"{a} {branch}", f"{b} {mref}"), branch, None)
