"""The container cannot reach the user's repository, the engine, root or capabilities;
agent paths stay inside the workspace; agent-written git config never runs on the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskbox import PathOutsideWorkspace, TaskService, files
from taskbox.confine import container_workdir

from .conftest import git


@pytest.fixture
def task(svc: TaskService, repo: Path):
    return svc.create_task(repo, "confined")


def sh(svc: TaskService, task, cmd: str):
    return svc.exec(task.id, cmd)


def test_not_root_no_capabilities_no_new_privileges(svc, task) -> None:
    assert sh(svc, task, "id -u").stdout.strip() != "0"
    status = sh(svc, task, "cat /proc/self/status").stdout
    caps = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Cap")}
    assert set(caps.values()) == {"0000000000000000"}
    assert "NoNewPrivs:\t1" in status


def test_no_docker_socket_and_no_network(svc, task) -> None:
    assert sh(svc, task, "ls /var/run/docker.sock /run/docker.sock").exit_code != 0
    assert sh(svc, task, "ls /sys/class/net").stdout.split() == ["lo"]
    assert sh(svc, task, "curl -sS -m 3 http://deb.debian.org/").exit_code != 0


def test_users_repository_is_unreachable(svc: TaskService, task, repo: Path) -> None:
    before = git(repo, "rev-parse", "HEAD")
    hooks = sorted(p.name for p in (repo / ".git/hooks").iterdir())
    r = sh(svc, task, f"ls {repo} ; echo x > {repo}/.git/hooks/pre-commit ; cat {repo}/.git/config")
    assert r.exit_code != 0
    assert sorted(p.name for p in (repo / ".git/hooks").iterdir()) == hooks
    # the workspace's .git is its own clone: no alternates, no shared object files
    assert not (Path(task.workspace_path) / ".git/objects/info/alternates").exists()
    assert git(repo, "rev-parse", "HEAD") == before
    mounts = sh(svc, task, "cat /proc/self/mountinfo").stdout
    assert str(repo) not in mounts


def test_cannot_escalate(svc, task) -> None:
    assert sh(svc, task, "su -c id root </dev/null").exit_code != 0
    assert sh(svc, task, "touch /etc/evil").exit_code != 0
    assert sh(svc, task, "mount -t tmpfs none /mnt").exit_code != 0


def test_workdir_must_stay_inside_the_workspace(svc: TaskService, task, tmp_path: Path) -> None:
    ws = Path(task.workspace_path)
    assert container_workdir("src/../.") == "/workspace"
    assert container_workdir("/workspace/sub") == "/workspace/sub"
    for bad in ("..", "../x", "/etc", "/workspace/../etc", "a/../../b"):
        with pytest.raises(PathOutsideWorkspace):
            svc.exec(task.id, "pwd", workdir=bad)
    (ws / "escape").symlink_to("/etc")
    with pytest.raises(PathOutsideWorkspace):
        files.read_bytes(ws, "escape/passwd")
    with pytest.raises(PathOutsideWorkspace):
        svc.read_text(task.id, "escape/passwd")


def test_agent_written_git_config_never_runs_on_the_host(svc: TaskService, task, tmp_path: Path) -> None:
    proof = tmp_path / "pwned"
    payload = f"#!/bin/sh\ntouch {proof}\n"
    ws = Path(task.workspace_path)
    # hooks planted in the workspace .git (the sandbox can write it: it is the agent's clone)
    for name in ("pre-commit", "post-commit", "reference-transaction"):
        hook = ws / ".git/hooks" / name
        hook.write_text(payload)
        hook.chmod(0o755)
    (ws / "evil.sh").write_text(payload)
    (ws / "evil.sh").chmod(0o755)
    svc.exec(task.id, "git config core.fsmonitor /workspace/evil.sh && git config filter.x.clean /workspace/evil.sh"
             " && git config diff.x.textconv /workspace/evil.sh && git config core.pager /workspace/evil.sh"
             " && echo '* filter=x diff=x' > .gitattributes && echo change >> README.md")
    svc.sync(task.id)  # host-side add, commit, diff and fetch over the hostile workspace
    svc.diff(task.id)
    svc.complete(task.id)
    assert not proof.exists()


def test_replaced_dotgit_is_refused(svc: TaskService, task) -> None:
    from taskbox import GitError

    svc.exec(task.id, "mv .git .git-real && echo 'gitdir: /root' > .git")
    with pytest.raises(GitError):
        svc.sync(task.id)
