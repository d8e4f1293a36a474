"""The real `taskbox` command line: output, --json and exit codes for bad input and faults.

Every bad-input case must print one clear line, exit with its own code and change nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import git, run_cli


def tasks_json() -> list:
    return json.loads(run_cli("list-tasks", "--json").stdout)


def test_cli_story(home: Path, repo: Path, docker_engine) -> None:
    r = run_cli("create-task", "Add a CLI", "--repo", str(repo), "--agent", "cli", "--model", "m", "--json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert {"task_id", "branch", "workspace_path", "container_id", "status"} <= created.keys()
    tid = created["task_id"]
    r = run_cli("exec", tid, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert run_cli("detach", tid).returncode == 0
    r = run_cli("resume-task", tid, "--agent", "second", "--json")
    assert json.loads(r.stdout)["restored_state"]["executions"][-1]["exit_code"] == 7
    table = run_cli("list-tasks").stdout
    assert tid in table and "active" in table and "STATUS" in table
    assert json.loads(run_cli("task-executions", tid, "--json").stdout)[-1]["command"].startswith("sh -c")
    assert run_cli("task-decisions", tid, "--add", "keep it small").returncode == 0
    assert json.loads(run_cli("task-decisions", tid, "--json").stdout)[0]["decision"] == "keep it small"
    assert json.loads(run_cli("find-task", "CLI", "--json").stdout)[0]["task_id"] == tid
    assert json.loads(run_cli("task-stats", tid, "--json").stdout)["executions"] == 1
    assert "task.created" in run_cli("task-history", tid).stdout
    r = run_cli("complete-task", tid, "-s", "done", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["branch"] == created["branch"]
    # the memory, with Plan.md's final summary, travels on the companion ref beside the branch
    plan = git(repo, "show", f"refs/taskbox/{created['branch']}/memory:Plan.md")
    assert "done" in plan and not git(repo, "ls-tree", "--name-only", created["branch"], "Plan.md")
    assert run_cli("cleanup-task", tid).returncode == 0
    assert json.loads(run_cli("show", tid, "--json").stdout)["status"] == "archived"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["show", "nope"], 3, "no task 'nope'"),
        (["exec", "nope", "--", "true"], 3, "no task 'nope'"),
        (["create-task", "x" * 3000, "--repo", "{repo}"], 2, "limit is 2000"),
        (["create-task", "evil\x07bell", "--repo", "{repo}"], 2, "control characters"),
        (["create-task", "   ", "--repo", "{repo}"], 2, "must not be empty"),
        (["create-task", "ok", "--repo", "{notrepo}"], 2, "is not a git repository"),
        (["create-task", "ok", "--repo", "{repo}", "--memory", "1m"], 2, "below the minimum"),
        (["create-task", "ok", "--repo", "{repo}", "--agent", "a/b"], 2, "may contain only"),
        (["create-task", "ok", "--repo", "{repo}", "--image", "taskbox-nonexistent:1"], 5, "taskbox image build"),
        (["create-task", "ok", "--repo", "{repo}", "--base", "no-such-branch"], 2, "does not exist"),
    ],
)
def test_bad_input_changes_nothing(home: Path, repo: Path, tmp_path: Path, docker_engine, args, code, message) -> None:
    notrepo = tmp_path / "plain"
    notrepo.mkdir()
    args = [a.format(repo=repo, notrepo=notrepo) for a in args]
    r = run_cli(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert tasks_json() == []
    assert git(repo, "branch", "--list").split() == ["*", "main"]
    j = run_cli(*args, "--json") if args[0] != "exec" else None
    if j is not None:
        assert json.loads(j.stdout)["message"]


def test_docker_down_is_a_clear_error(home: Path, repo: Path) -> None:
    r = run_cli("create-task", "needs docker", "--repo", str(repo), env={"DOCKER_HOST": "unix:///nonexistent.sock"})
    assert r.returncode == 5
    assert "cannot reach the Docker engine" in r.stderr and "dockerd" in r.stderr
    assert tasks_json() == []


def test_task_errors_have_distinct_codes(home: Path, repo: Path, docker_engine) -> None:
    tid = json.loads(run_cli("create-task", "codes", "--repo", str(repo), "--json").stdout)["task_id"]
    r = run_cli("resume-task", tid, "--agent", "intruder")
    assert r.returncode == 4 and "locked by agent" in r.stderr
    r = run_cli("exec", tid, "--workdir", "../..", "--", "pwd")
    assert r.returncode == 2 and "escapes the task workspace" in r.stderr
    r = run_cli("cleanup-task", tid)
    assert r.returncode == 2 and "complete or abort it" in r.stderr
    r = run_cli("exec", tid, "--timeout", "1", "--", "sleep", "30")
    assert r.returncode == 6 and "timed out" in r.stderr


def test_engine_lost_mid_session_is_docker_unavailable() -> None:
    """A dropped engine socket (requests' error, not the SDK's) becomes the friendly error."""
    import docker

    from taskbox import DockerUnavailable
    from taskbox.sandbox import Sandbox

    gone = Sandbox(docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41"))
    for call in (lambda: gone.state("abc"), lambda: gone.stop("abc"), lambda: gone.task_containers("x")):
        with pytest.raises(DockerUnavailable, match="lost the Docker engine.*dockerd"):
            call()
