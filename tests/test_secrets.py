"""Secrets by reference, redaction, and commands run with log_execution=false (issue 9, secrets).

The proof is always the same: run the real thing (CLI, MCP, service, a real container), then
search every byte taskbox keeps — all of TASKBOX_HOME (workspaces, memory, Plan.md, audit
logs, the registry database and its WAL), the registry's events, and the user's repository
history after the branch was fetched — for the value that must not be there."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
from pathlib import Path

import anyio
import pytest
from mcp import Client

from taskbox import CommandTimeout, InvalidInput, NotFound, TaskService
from taskbox.audit import NOT_LOGGED
from taskbox.mcp_server import create_server
from taskbox.secrets import Redactor, resolve

from .conftest import file_holds, run_cli
from .test_mcp import call, call_error


def leaks(svc: TaskService, repo: Path, needle: str) -> list[str]:
    """Every place under TASKBOX_HOME, in the registry's events and in the user's repository history
    where ``needle`` occurs."""
    found = []
    raw = needle.encode()
    for path in svc.paths.home.rglob("*"):
        if path.is_file() and not path.is_symlink() and file_holds(path, raw):
            found.append(str(path.relative_to(svc.paths.home)))
    for row in svc.registry._conn().execute("SELECT type, payload FROM events"):
        if needle in row["payload"]:
            found.append(f"event {row['type']}")
    for row in svc.registry._conn().execute("SELECT samples FROM rate_windows"):
        if needle in row["samples"]:
            found.append("rate_windows")
    history = subprocess.run(["git", "log", "--all", "-p", "--format=%B"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout
    if needle in history:
        found.append("user repository history")
    return found


# --- resolving and redacting (no Docker) ---------------------------------------------------------


def test_secrets_resolve_from_the_environment_or_an_owner_only_file(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert resolve(home, ["TOKEN"], {"TASKBOX_SECRET_TOKEN": "from-env-123"}) == {"TOKEN": "from-env-123"}
    with pytest.raises(NotFound, match="no secret HOME: set TASKBOX_SECRET_HOME"):
        resolve(home, ["HOME"], {"HOME": "/root"})  # a plain host variable is not a secret
    with pytest.raises(InvalidInput, match="secret name"):
        resolve(home, ["no-dashes"], {})
    file = home / "secrets.toml"
    file.write_text('API_KEY = "from-file-456"\nSHORT = "abc"\n')
    file.chmod(0o600)
    assert resolve(home, ["API_KEY"], {}) == {"API_KEY": "from-file-456"}
    assert resolve(home, ["API_KEY"], {"TASKBOX_SECRET_API_KEY": "env-wins"}) == {"API_KEY": "env-wins"}
    with pytest.raises(InvalidInput, match="shorter than 4"):
        resolve(home, ["SHORT"], {})
    file.chmod(0o644)
    with pytest.raises(InvalidInput, match=r"readable by others \(mode 644\); run `chmod 600"):
        resolve(home, ["API_KEY"], {})
    file.chmod(0o600)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(InvalidInput, match="not by you"):
        resolve(home, ["API_KEY"], {})
    monkeypatch.undo()
    file.unlink()
    file.symlink_to(tmp_path / "elsewhere.toml")
    (tmp_path / "elsewhere.toml").write_text('API_KEY = "linked-789"\n')
    with pytest.raises(InvalidInput, match="not a link"):
        resolve(home, ["API_KEY"], {})


def test_the_redactor_replaces_values_everywhere_and_costs_nothing_without_secrets(tmp_path: Path) -> None:
    empty = Redactor(tmp_path)
    data = {"a": ["x", {"b": "y"}]}
    assert not empty.active and empty(data) is data  # no secrets: the same object back, untouched
    r = Redactor(tmp_path)
    r.add({"TOKEN": "s3cr3t-value", "LONGER": "s3cr3t-value-and-more"})
    assert r.text("a s3cr3t-value-and-more b s3cr3t-value") == "a [REDACTED:LONGER] b [REDACTED:TOKEN]"
    assert r({"k": ["s3cr3t-value", 3, ("s3cr3t-value",)]}) == {"k": ["[REDACTED:TOKEN]", 3, ("[REDACTED:TOKEN]",)]}
    cut = r.output("cut at the limit: s3cr3t-val")  # a prefix of both: either name will do
    assert cut.startswith("cut at the limit: [REDACTED:") and "s3cr3t" not in cut
    (tmp_path / "secrets.toml").write_text('DECLARED = "declared-value"\n')
    assert r.text("declared-value") == "[REDACTED:DECLARED]"  # picked up when the file changes


# --- secrets in a real sandbox -------------------------------------------------------------------


def test_a_secret_reaches_the_command_and_nothing_else(svc: TaskService, repo: Path, docker_engine,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    value = "tok-" + secrets.token_hex(16)
    filed = "fil-" + secrets.token_hex(16)
    monkeypatch.setenv("TASKBOX_SECRET_TOKEN", value)
    (svc.paths.home / "secrets.toml").write_text(f'FILED = "{filed}"\n')
    (svc.paths.home / "secrets.toml").chmod(0o600)
    task = svc.create_task(repo, "uses secrets")
    r = run_cli("exec", "--json", "--secret", "TOKEN", "--secret", "FILED", task.id, "--",
                "sh", "-c", 'echo "token=$TOKEN filed=$FILED"; printf %s "$TOKEN" | sha256sum; '
                            'echo "$TOKEN" >&2')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # the command had the real values (their hash), the caller sees only the names
    assert out["stdout"].splitlines()[0] == "token=[REDACTED:TOKEN] filed=[REDACTED:FILED]"
    assert out["stdout"].splitlines()[1].split()[0] == hashlib.sha256(value.encode()).hexdigest()
    assert out["stderr"].strip() == "[REDACTED:TOKEN]"
    # a value typed into a command (not passed by reference) is still kept out of every record
    shown = svc.exec(task.id, f"echo {value}")
    assert shown.stdout == "[REDACTED:TOKEN]\n"
    # a timeout's partial output and message are redacted too
    with pytest.raises(CommandTimeout) as timed_out:
        svc.exec(task.id, f'echo "$TOKEN"; sleep 5 # {value}', timeout=1, secrets=["TOKEN"])
    assert value not in str(timed_out.value) and value not in json.dumps(timed_out.value.details)
    assert timed_out.value.details["result"]["stdout"] == "[REDACTED:TOKEN]\n"
    # over MCP the same
    async def main() -> None:
        async with Client(create_server(svc)) as client:
            res = await call(client, "execute_in_task", task_id=task.id, command='echo "mcp:$TOKEN"',
                             secrets=["TOKEN"])
            assert res["stdout"] == "mcp:[REDACTED:TOKEN]\n"
            text = await call_error(client, "execute_in_task", task_id=task.id, command="true",
                                    secrets=["NOT_DECLARED"])
            assert "no secret NOT_DECLARED" in text

    anyio.run(main)
    svc.sync(task.id)
    execs = svc.executions(task.id)
    assert any("[REDACTED:TOKEN]" in e["stdout"] for e in execs)
    assert leaks(svc, repo, value) == []
    assert leaks(svc, repo, filed) == ["secrets.toml"]  # only where the user put it
    assert value not in json.dumps(docker_engine.api.inspect_container(svc.get(task.id).container_id))


def test_an_unsafe_secrets_file_refuses_the_command(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "unsafe secrets file")
    (svc.paths.home / "secrets.toml").write_text('TOKEN = "world-readable"\n')
    (svc.paths.home / "secrets.toml").chmod(0o644)
    r = run_cli("exec", "--secret", "TOKEN", task.id, "--", "touch", "ran")
    assert r.returncode == 2 and "readable by others" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (Path(task.workspace_path) / "ran").exists()


# --- log_execution=false -------------------------------------------------------------------------


def test_a_command_run_without_logging_leaves_no_trace(svc: TaskService, repo: Path) -> None:
    token = "nolog-" + secrets.token_hex(12)
    # A policy rule that asks for a checkpoint, and a risky command, so every recording path runs:
    # audit, policy reason, auto-checkpoint reason (decisions.md, Plan.md), events, memory.
    (repo / ".taskbox").mkdir()
    (repo / ".taskbox" / "policy.toml").write_text(
        '[[rules]]\nid = "snapshot-first"\naction = "checkpoint"\npattern = "nolog-"\n')
    task = svc.create_task(repo, "private commands")
    session = svc.attach(task.id, "agent", "model").session
    before = svc.state(task.id)["metrics"]["tool_calls"]
    res = svc.exec(task.id, f"rm -rf /tmp/x-{token}; echo out-{token}", log=False, session_id=session.id)
    assert res.stdout == f"out-{token}\n"  # the caller gets its output
    r = run_cli("exec", "--no-log", task.id, "--", "sh", "-c", f"echo cli-{token}; exit 3")
    assert r.returncode == 3 and f"cli-{token}" in r.stdout

    async def main() -> None:
        async with Client(create_server(svc)) as client:
            res = await call(client, "execute_in_task", task_id=task.id, command=f"echo mcp-{token}",
                             log_execution=False)
            assert res["stdout"] == f"mcp-{token}\n"
            text = await call_error(client, "execute_in_task", task_id=task.id, timeout=1,
                                    command=f"echo late-{token}; sleep 5", log_execution=False)
            assert "timed out" in text
            (repo / ".taskbox" / "policy.toml").write_text(
                '[[rules]]\nid = "no-nolog"\naction = "deny"\npattern = "nolog-"\n')
            text = await call_error(client, "execute_in_task", task_id=task.id, command=f"echo {token}",
                                    log_execution=False)
            assert "no-nolog" in text

    anyio.run(main)
    assert svc.state(task.id)["metrics"]["tool_calls"] >= before + 3  # counted, nothing else
    checkpoints = svc.list_checkpoints(task.id)
    assert any(c["trigger"] == "policy" for c in checkpoints)  # the rule ran, on the real text
    # the rule and the risk score both asked: one checkpoint per command, with both reasons
    first = [c for c in checkpoints if c["trigger"] == "policy"][0]
    assert "without logging" in first["reason"]
    assert not any(c["trigger"] == "risky-command" for c in checkpoints)
    calls = [c for c in svc.memory(svc.get(task.id)).conversations() if c.get("tool") == "execute_in_task"]
    assert calls and all(c["args"] == {} and c["logged"] is False for c in calls)
    assert any(e["subject"] == NOT_LOGGED for e in svc.audit.read(task.id))
    svc.detach(task.id, session.id)  # commits the memory and fetches the branch into the user's repo
    assert leaks(svc, repo, token) == []
