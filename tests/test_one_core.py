"""Every behaviour lives in the core once: the CLI and MCP leave the same records.

The same story is run through the real CLI (subprocesses) and through the real MCP server
(the SDK client) on two tasks of one repository whose project policy refuses restores and
asks for a checkpoint before one command. The events and audit records each task leaves
must be the same, operation by operation — a rule that holds over one adapter holds over
the other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

from taskbox import TaskService
from taskbox.mcp_server import create_server

from .conftest import run_cli
from .test_mcp import call, call_error

POLICY = """
[[rules]]
id = "no-restore"
action = "deny"
tools = ["restore_task_checkpoint"]
reason = "restores are the user's call"

[[rules]]
id = "snapshot-first"
action = "checkpoint"
pattern = "migrate"
"""


def events(svc: TaskService, task_id: str) -> list[tuple[str, Any]]:
    """The task's events with what should not differ between two runs of one story."""
    out = []
    for e in svc.registry.events(task_id):
        p = e["payload"]
        keep = {k: p[k] for k in ("trigger", "rule", "tool", "exit_code", "agent") if k in p}
        out.append((e["type"], keep))
    return out


def audit(svc: TaskService, task_id: str) -> list[tuple[Any, ...]]:
    # the two stories attach with their own session ids (s1, s2): the rest must be equal
    def same(subject: str) -> str:  # checkpoint ids are random
        return re.sub(r"cp-[0-9a-f]{12}", "cp-X", subject.replace('"s1"', '"S"').replace('"s2"', '"S"'))

    return [(e["kind"], e.get("tool"), e["decision"], e["rule"], same(e["subject"])) for e in svc.audit.read(task_id)]


def test_cli_and_mcp_leave_the_same_events_and_audit(svc: TaskService, repo: Path) -> None:
    (repo / ".taskbox").mkdir()
    (repo / ".taskbox" / "policy.toml").write_text(POLICY)

    def cli(*args: str) -> dict[str, Any]:
        r = run_cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout) if r.stdout.strip() else {}

    # --- through the CLI ---------------------------------------------------------------------
    cli("create-task", "Same story", "--repo", str(repo), "--id", "via-cli", "--no-attach")
    cli("resume-task", "via-cli", "--agent", "a", "--model", "m", "--session", "s1")
    assert run_cli("exec", "via-cli", "--", "echo migrate > m.txt").returncode == 0
    cli("todo", "via-cli", "--add", "write tests")
    cli("task-decisions", "via-cli", "--add", "keep it simple", "--agent", "a")
    cp = cli("checkpoint", "create", "via-cli", "c1")
    r = run_cli("restore-checkpoint", "via-cli", "-c", cp["checkpoint_id"], "--session", "s1")
    assert r.returncode == 9 and "no-restore" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    cli("diff", "via-cli")
    cli("show", "via-cli")
    cli("detach", "via-cli", "--session", "s1")

    # --- through MCP -----------------------------------------------------------------------------
    async def main() -> None:
        async with Client(create_server(svc)) as client:
            await call(client, "create_task_sandbox", task_id="via-mcp", task_description="Same story",
                       workspace_path=str(repo))
            await call(client, "attach_agent_to_task", task_id="via-mcp", agent_name="a", agent_model="m",
                       session_id="s2")
            await call(client, "execute_in_task", task_id="via-mcp", command="echo migrate > m.txt")
            await call(client, "update_task_todos", task_id="via-mcp", todos=[{"text": "write tests"}])
            await call(client, "log_task_decision", task_id="via-mcp", decision="keep it simple")
            res = await call(client, "create_task_checkpoint", task_id="via-mcp", checkpoint_name="c1")
            text = await call_error(client, "restore_task_checkpoint", task_id="via-mcp",
                                    checkpoint_id=res["checkpoint_id"])
            assert "no-restore" in text
            await call(client, "task_diff", task_id="via-mcp")
            await call(client, "get_task_status", task_id="via-mcp")
            await call(client, "detach_agent_from_task", task_id="via-mcp", session_id="s2")

    anyio.run(main)

    # the rule that refuses restores held over both, and one checkpoint was taken per command
    for tid in ("via-cli", "via-mcp"):
        triggers = [c["trigger"] for c in svc.list_checkpoints(tid)]
        assert triggers == ["policy", "manual"], (tid, triggers)
        assert any(e[0] == "policy.denied" and e[1]["rule"] == "no-restore" for e in events(svc, tid))
    assert events(svc, "via-cli") == events(svc, "via-mcp")
    assert audit(svc, "via-cli") == audit(svc, "via-mcp")
    ops = [a[1] for a in audit(svc, "via-mcp") if a[0] == "tool"]
    assert ops == ["attach", "exec", "update_todos", "decision", "checkpoint", "restore", "diff", "status",
                   "detach"]
