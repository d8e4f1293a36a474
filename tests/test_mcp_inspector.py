"""The third-party MCP Inspector CLI (from npm) against `taskbox mcp`: list tools, call one.

This proves the server speaks MCP to a client we did not write. It needs Node.js (`npx`);
without it the test fails, it is never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from taskbox import TaskService

pytestmark = pytest.mark.docker

INSPECTOR = "@modelcontextprotocol/inspector"


def inspector(home: Path, *args: str) -> dict:
    npx = shutil.which("npx")
    assert npx, "npx (Node.js 20+) is required for the MCP Inspector test; install Node.js"
    cmd = [npx, "-y", INSPECTOR, "--cli", "-e", f"TASKBOX_HOME={home}",
           sys.executable, "-m", "taskbox", "mcp", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, f"inspector failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def test_inspector_lists_tools_and_calls_one(svc: TaskService, repo: Path) -> None:
    listed = inspector(svc.paths.home, "--method", "tools/list")
    tools = {t["name"]: t for t in listed["tools"]}
    assert {"create_task_sandbox", "attach_agent_to_task", "detach_agent_from_task", "execute_in_task",
            "list_active_tasks", "create_task_checkpoint", "restore_task_checkpoint", "complete_task"} <= set(tools)
    assert tools["execute_in_task"]["inputSchema"]["required"] == ["task_id", "command"]

    task = svc.create_task(repo, "Inspected", task_id="inspected")
    called = inspector(svc.paths.home, "--method", "tools/call", "--tool-name", "execute_in_task",
                       "--tool-arg", "task_id=inspected", "--tool-arg", "command=echo from-inspector > seen.txt; cat seen.txt")
    assert called["isError"] is False
    assert called["structuredContent"]["stdout"] == "from-inspector\n"
    assert called["structuredContent"]["exit_code"] == 0
    assert (Path(task.workspace_path) / "seen.txt").read_text() == "from-inspector\n"
    assert svc.executions("inspected")[-1]["command"].startswith("echo from-inspector")

    failed = inspector(svc.paths.home, "--method", "tools/call", "--tool-name", "execute_in_task",
                       "--tool-arg", "task_id=missing", "--tool-arg", "command=true")
    assert failed["isError"] is True and "no task 'missing'" in failed["content"][0]["text"]
