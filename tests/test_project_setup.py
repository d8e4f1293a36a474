"""Project setup (.taskbox/config.toml, devcontainer.json) and templates, with real Docker and git."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskbox import InvalidInput, NotFound, SandboxError, TaskService

from .conftest import git, run_cli


def _project(repo: Path, text: str) -> None:
    (repo / ".taskbox").mkdir(exist_ok=True)
    (repo / ".taskbox" / "config.toml").write_text(text)
    (repo / ".gitignore").write_text(".env\nlocal/\n")
    git(repo, "add", ".gitignore", ".taskbox")
    git(repo, "commit", "-qm", "project setup")


def test_env_copied_and_setup_run_once(svc: TaskService, repo: Path) -> None:
    (repo / ".env").write_text("API_URL=http://localhost\n")
    (repo / "local").mkdir()
    (repo / "local" / "conf.toml").write_text("x = 1\n")
    _project(repo, '[setup]\ncopy = [".env", "local"]\n'
                   'commands = ["echo setup-ran >> setup.log", "cat .env > seen-env.txt"]\n'
                   '[agent]\ndefault = "shell"\n')
    task = svc.create_task(repo, "ready to work")
    ws = Path(task.workspace_path)
    assert (ws / ".env").read_text() == "API_URL=http://localhost\n"
    assert (ws / "local" / "conf.toml").read_text() == "x = 1\n"
    assert (ws / "setup.log").read_text() == "setup-ran\n"  # once
    assert (ws / "seen-env.txt").read_text() == "API_URL=http://localhost\n"  # the sandbox sees it
    assert task.status.value == "active"
    events = [e for e in svc.registry.events(task.id) if e["type"].startswith("setup.")]
    assert [e["type"] for e in events] == ["setup.copied", "setup.command", "setup.command"]
    svc.attach(task.id, "me")
    svc.detach(task.id)
    assert (ws / "setup.log").read_text() == "setup-ran\n"  # not again on resume
    out = svc.run_agent(task.id, prompt="echo default-agent")  # [agent] default
    assert out["agent"] == "shell"
    # .env is ignored: it never reaches the user's branch
    assert ".env" not in git(repo, "ls-tree", "-r", "--name-only", task.branch).split()


def test_failing_and_hanging_setup_fail_the_task_with_the_log(svc: TaskService, repo: Path) -> None:
    _project(repo, '[setup]\ncommands = ["echo installing; echo broken >&2; exit 4"]\n')
    r = run_cli("create-task", "broken setup", "--repo", str(repo), "--id", "broken")
    assert r.returncode == 6 and r.stderr.strip().splitlines()[-1] == (
        "error: task broken failed: setup command 1 `echo installing; echo broken >&2; exit 4` exited with code 4; "
        "its output is in `taskbox task-executions broken`")
    task = svc.get("broken")
    assert task.status.value == "failed"
    log = svc.executions(task.id)[-1]
    assert log["stdout"] == "installing\n" and log["stderr"] == "broken\n" and log["exit_code"] == 4
    _project(repo, '[setup]\ncommands = ["sleep 30"]\ntimeout = 1\n')
    with pytest.raises(SandboxError, match="setup command 1 `sleep 30` command timed out after 1s"):
        svc.create_task(repo, "hanging setup", task_id="hangs")
    assert svc.get("hangs").status.value == "failed"


def test_bad_setup_is_refused_before_anything(svc: TaskService, repo: Path) -> None:
    _project(repo, '[setup]\ncopy = [".env"]\n')  # .env does not exist
    with pytest.raises(InvalidInput, match=r"setup.copy: \.env does not exist"):
        svc.create_task(repo, "missing file")
    _project(repo, '[setup]\ncopy = ["../outside"]\n')
    with pytest.raises(InvalidInput, match="must be a path inside the repository"):
        svc.create_task(repo, "outside")
    (repo / "link").symlink_to("/etc/passwd")
    _project(repo, '[setup]\ncopy = ["link"]\n')
    with pytest.raises(InvalidInput, match="symbolic link"):
        svc.create_task(repo, "link")
    _project(repo, '[setup]\nbogus = 1\n')
    with pytest.raises(InvalidInput, match=r"unknown keys in \[setup\]: bogus"):
        svc.create_task(repo, "bogus")
    assert svc.list_tasks() == []


def test_devcontainer_and_templates(svc: TaskService, repo: Path, home: Path) -> None:
    (repo / ".devcontainer").mkdir()
    (repo / ".devcontainer" / "devcontainer.json").write_text(json.dumps(
        {"image": "taskbox-sandbox:latest", "postCreateCommand": "echo from-devcontainer > dc.txt"}))
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "devcontainer")
    task = svc.create_task(repo, "devcontainer")
    assert (Path(task.workspace_path) / "dc.txt").read_text() == "from-devcontainer\n"
    # save the project's setup as a template, then apply it to another repository
    r = run_cli("template", "save", "py", "--repo", str(repo))
    assert r.returncode == 0, r.stderr
    assert "py" in run_cli("template", "list").stdout
    shown = json.loads(run_cli("template", "show", "py", "--json").stdout)
    assert shown["commands"] == ["echo from-devcontainer > dc.txt"]
    other = repo.parent / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    (other / "a.txt").write_text("a\n")
    git(other, "add", ".")
    git(other, "commit", "-qm", "a")
    t2 = svc.create_task(other, "from template", template="py")
    assert t2.template == "py" and (Path(t2.workspace_path) / "dc.txt").exists()
    with pytest.raises(NotFound, match="no template 'nope' \\(templates: py\\)"):
        svc.create_task(other, "no such template", template="nope")


def test_lazy_task_runs_setup_once_when_its_sandbox_first_starts(svc: TaskService, repo: Path) -> None:
    (repo / ".env").write_text("K=v\n")
    _project(repo, '[setup]\ncopy = [".env"]\ncommands = ["echo ran >> setup.log"]\n')
    task = svc.create_task(repo, "lazy with setup", lazy=True)
    ws = Path(task.workspace_path)
    assert task.status.value == "pending" and (ws / ".env").read_text() == "K=v\n"
    assert not (ws / "setup.log").exists()  # no sandbox yet: nothing ran
    # the project file changing afterwards does not change what this task runs
    _project(repo, '[setup]\ncommands = ["echo changed >> setup.log"]\n')
    svc.attach(task.id, "me")  # first use starts the sandbox: the setup runs there, once
    assert (ws / "setup.log").read_text() == "ran\n"
    assert svc.get(task.id).status.value == "active" and "setup_pending" not in svc.get(task.id).metadata
    svc.detach(task.id)
    svc.exec(task.id, "true")
    assert (ws / "setup.log").read_text() == "ran\n"
    assert [e["payload"]["exit_code"] for e in svc.registry.events(task.id) if e["type"] == "setup.command"] == [0]


def test_lazy_task_whose_setup_fails_is_failed_with_the_log(svc: TaskService, repo: Path) -> None:
    _project(repo, '[setup]\ncommands = ["echo half; exit 3"]\n')
    task = svc.create_task(repo, "lazy broken", task_id="lazy-broken", lazy=True)
    with pytest.raises(SandboxError, match="setup command 1 `echo half; exit 3` exited with code 3"):
        svc.exec(task.id, "echo hi")
    failed = svc.get(task.id)
    assert failed.status.value == "failed" and "setup_pending" not in failed.metadata
    assert svc.executions(task.id)[-1]["stdout"] == "half\n"
    r = run_cli("create-task", "lazy cli", "--repo", str(repo), "--id", "lazy-cli", "--lazy")
    assert r.returncode == 0, r.stderr
    r = run_cli("resume-task", "lazy-cli")
    assert r.returncode == 6 and "setup command 1 `echo half; exit 3` exited with code 3" in r.stderr
    assert svc.get("lazy-cli").status.value == "failed"
