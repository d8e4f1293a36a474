"""Agent-side guards: while a task is attached, only the agent's read-only host tools and
taskbox's own tools run — everything else, tools added later included — so work cannot leak
out of the sandbox (SPEC §8). The hooks written by
`taskbox integrate --guard` are run the way the agents run them: Claude Code's hook command
through bash with its JSON payload on stdin, OpenCode's plugin module under real Bun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from taskbox import TaskService

from .conftest import run_cli

# The tools of the current client releases: (tool, may it run on the host while a task is attached?)
CLAUDE_CODE_TOOLS = {
    "Bash": False, "BashOutput": False, "KillShell": False, "Edit": False, "MultiEdit": False, "Write": False,
    "NotebookEdit": False, "Monitor": False, "SlashCommand": False, "Skill": False,
    "Read": True, "Glob": True, "Grep": True, "LS": True, "WebFetch": True, "WebSearch": True,
    "TodoWrite": True, "Task": True, "ExitPlanMode": True, "NotebookRead": True,
    "mcp__taskbox__execute_in_task": True, "mcp__taskbox__write_task_file": True,
    "mcp__other__write_file": False, "SomeToolAddedNextYear": False,
}
OPENCODE_TOOLS = {
    "bash": False, "edit": False, "write": False, "patch": False, "apply_patch": False, "multiedit": False,
    "read": True, "glob": True, "grep": True, "list": True, "webfetch": True, "todowrite": True,
    "todoread": True, "task": True, "taskbox_execute_in_task": True, "github_create_file": False,
    "some_new_tool": False,
}


def claude_hook(repo: Path, tool: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    settings = json.loads((repo / ".claude/settings.json").read_text())
    [entry] = [e for e in settings["hooks"]["PreToolUse"] if "guard" in e["hooks"][0]["command"]]
    payload = {"hook_event_name": "PreToolUse", "session_id": "c1", "cwd": str(cwd or repo),
               "tool_name": tool, "tool_input": {"command": "echo hi > x"}}
    return subprocess.run(["bash", "-c", entry["hooks"][0]["command"]], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=60)


def test_claude_code_guard_refuses_host_tools_while_attached(svc: TaskService, repo: Path) -> None:
    (repo / ".claude").mkdir()
    (repo / ".claude/settings.json").write_text(json.dumps({"permissions": {"allow": ["Read"]}, "hooks": {
        "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "echo mine"}]}]}}))
    r = run_cli("integrate", "claude-code", "--dir", str(repo), "--guard", "--json")
    assert r.returncode == 0, r.stderr
    settings = json.loads((repo / ".claude/settings.json").read_text())
    assert settings["permissions"] == {"allow": ["Read"]}  # merged, not overwritten
    assert len(settings["hooks"]["PreToolUse"]) == 2
    again = run_cli("integrate", "claude-code", "--dir", str(repo), "--guard").stdout
    assert again.count("nothing changed") == 2  # MCP entry and guard hook both already there

    assert settings["hooks"]["PreToolUse"][1]["matcher"] == "*"  # every tool reaches the guard
    assert claude_hook(repo, "Bash").returncode == 0  # no task yet
    task = svc.create_task(repo, "guarded work")
    a = svc.attach(task.id, "claude", "opus")
    (repo / "src").mkdir()
    for tool, allowed in CLAUDE_CODE_TOOLS.items():
        r = claude_hook(repo, tool, cwd=repo / "src")
        if allowed:
            assert r.returncode == 0, (tool, r.stderr)
        else:
            assert r.returncode == 2, (tool, r.stderr)
            assert task.id in r.stderr and "execute_in_task" in r.stderr
    svc.detach(task.id, a.session.id)
    assert claude_hook(repo, "Bash").returncode == 0


def test_guard_outside_a_repository_allows(home: Path, tmp_path: Path) -> None:
    r = subprocess.run(["taskbox", "guard", "--agent", "claude-code"], capture_output=True, text=True,
                       input=json.dumps({"tool_name": "Bash", "cwd": str(tmp_path)}), timeout=60)
    assert r.returncode == 0
    bad = subprocess.run(["taskbox", "guard", "--agent", "claude-code"], capture_output=True, text=True,
                         input="{not json", timeout=60)
    assert bad.returncode == 1 and "not blocking" in bad.stderr


def test_opencode_guard_plugin_runs_under_bun(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    npx = shutil.which("npx")
    assert npx, "npx (Node.js) is needed to run Bun for this test"
    r = run_cli("integrate", "opencode", "--dir", str(repo), "--guard")
    assert r.returncode == 0, r.stderr
    plugin = repo / ".opencode/plugins/taskbox-guard.js"
    driver = tmp_path / "drive.mjs"
    driver.write_text(f"""
import {{ $ }} from "bun"
import {{ TaskboxGuard }} from {json.dumps(str(plugin))}
const hooks = await TaskboxGuard({{ $, directory: process.argv[2] }})
for (const tool of {json.dumps(list(OPENCODE_TOOLS))}) {{
  try {{ await hooks["tool.execute.before"]({{ tool, sessionID: "s", callID: "c" }}); console.log(tool + ": allowed") }}
  catch (e) {{ console.log(tool + ": refused: " + e.message) }}
}}
""")

    def drive() -> str:
        out = subprocess.run([npx, "--yes", "bun@1", str(driver), str(repo)], capture_output=True, text=True,
                             timeout=300, env={**os.environ})
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert drive().splitlines() == [f"{tool}: allowed" for tool in OPENCODE_TOOLS]
    task = svc.create_task(repo, "opencode guarded")
    svc.attach(task.id, "opencode", "m")
    lines = drive().splitlines()
    assert lines[0].startswith("bash: refused: taskbox task opencode-guarded is attached")
    for line, (tool, allowed) in zip(lines, OPENCODE_TOOLS.items(), strict=True):
        assert line == f"{tool}: allowed" if allowed else line.startswith(f"{tool}: refused"), line
