"""`taskbox integrate`: agent configuration for the MCP server, merged, never clobbered.

The written configuration is then used as the agent would use it: the command it names is
started and spoken to with the MCP SDK's stdio client.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from .conftest import run_cli


def integrate(agent: str, directory: Path, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    where = [] if agent == "codex" else ["--dir", str(directory)]  # Codex's config is per user
    r = run_cli("integrate", agent, *where, "--json", *extra, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_opencode_merges_into_an_existing_config(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    config = project / "opencode.json"
    original = {"$schema": "https://opencode.ai/config.json", "model": "anthropic/claude-sonnet-4-5",
                "mcp": {"other": {"type": "remote", "url": "https://example.com/mcp"}}}
    config.write_text(json.dumps(original, indent=4))
    config.chmod(0o640)

    res = integrate("opencode", project)
    assert res["action"] == "added" and res["path"] == str(config) and res["previous"] is None
    written = json.loads(config.read_text())
    entry = written["mcp"]["taskbox"]
    assert entry["type"] == "local" and entry["enabled"] is True
    # the taskbox that ran `integrate`, by absolute path (tests run it as `python -m taskbox`)
    assert entry["command"] == [sys.executable, "-m", "taskbox", "mcp"]
    assert entry["environment"]["TASKBOX_HOME"] == str(home.resolve())
    assert entry["timeout"] == (600 + 60) * 1000  # exec_timeout and a margin, in milliseconds
    # everything that was there is kept
    assert written["model"] == original["model"] and written["mcp"]["other"] == original["mcp"]["other"]
    assert config.stat().st_mode & 0o777 == 0o640

    before = config.read_bytes()
    assert integrate("opencode", project)["action"] == "unchanged"
    assert config.read_bytes() == before

    other_home = tmp_path / "other-home"
    res = integrate("opencode", project, env={"TASKBOX_HOME": str(other_home)})
    assert res["action"] == "updated" and res["previous"]["environment"]["TASKBOX_HOME"] == str(home.resolve())
    assert json.loads(config.read_text())["mcp"]["taskbox"]["environment"]["TASKBOX_HOME"] == str(other_home)


def test_claude_code_creates_then_merges_and_prints_what_changed(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    r = run_cli("integrate", "claude-code", "--dir", str(project))
    assert r.returncode == 0, r.stderr
    assert f"created {project / '.mcp.json'} with MCP server 'taskbox'" in r.stdout
    data = json.loads((project / ".mcp.json").read_text())
    entry = data["mcpServers"]["taskbox"]
    assert entry["type"] == "stdio" and entry["command"] == sys.executable
    assert entry["args"] == ["-m", "taskbox", "mcp"]
    assert entry["env"]["TASKBOX_HOME"] == str(home.resolve())

    data["mcpServers"]["github"] = {"command": "gh-mcp"}
    data["mcpServers"]["taskbox"]["args"] = ["old"]
    (project / ".mcp.json").write_text(json.dumps(data))
    r = run_cli("integrate", "claude-code", "--dir", str(project))
    assert r.returncode == 0 and "updated MCP server 'taskbox'" in r.stdout and '"old"' in r.stdout
    merged = json.loads((project / ".mcp.json").read_text())
    assert merged["mcpServers"]["github"] == {"command": "gh-mcp"}
    assert merged["mcpServers"]["taskbox"]["args"] == ["-m", "taskbox", "mcp"]

    r = run_cli("integrate", "claude-code", "--dir", str(project), "--name", "tb")
    assert r.returncode == 0 and set(json.loads((project / ".mcp.json").read_text())["mcpServers"]) == {
        "github", "taskbox", "tb"}


def test_broken_or_commented_files_are_left_untouched(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / ".mcp.json").write_text('{"mcpServers": {,}')
    r = run_cli("integrate", "claude-code", "--dir", str(project))
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "left untouched" in r.stderr
    assert (project / ".mcp.json").read_text() == '{"mcpServers": {,}'

    (project / ".mcp.json").write_text('{"mcpServers": ["not", "an", "object"]}')
    r = run_cli("integrate", "claude-code", "--dir", str(project), "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "invalid_input"

    (project / "opencode.jsonc").write_text('{\n  // my settings\n  "model": "x"\n}\n')
    r = run_cli("integrate", "opencode", "--dir", str(project))
    assert r.returncode == 2 and '"type": "local"' in r.stderr
    assert not (project / "opencode.json").exists()
    assert "// my settings" in (project / "opencode.jsonc").read_text()

    r = run_cli("integrate", "opencode", "--dir", str(project / "missing"))
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_written_configs_start_a_working_server(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    integrate("opencode", project)
    integrate("claude-code", project)
    oc = json.loads((project / "opencode.json").read_text())["mcp"]["taskbox"]
    cc = json.loads((project / ".mcp.json").read_text())["mcpServers"]["taskbox"]
    launches = [
        StdioServerParameters(command=oc["command"][0], args=oc["command"][1:],
                              env={"PATH": os.environ["PATH"], **oc["environment"]}),
        StdioServerParameters(command=cc["command"], args=cc["args"],
                              env={"PATH": os.environ["PATH"], **cc["env"]}),
    ]

    async def main() -> None:
        for params in launches:
            async with Client(params) as client:
                names = {t.name for t in (await client.list_tools()).tools}
                assert {"create_task_sandbox", "execute_in_task", "complete_task"} <= names
                res = await client.call_tool("list_active_tasks", {"status": "all"})
                assert not res.is_error and res.structured_content == {"tasks": [], "count": 0}

    anyio.run(main)
    assert (home / "registry.db").exists()  # the server opened the home the config names


def test_integrate_leaves_the_users_files_theirs(tmp_path: Path) -> None:
    """Run as root, integrate must not hand the user's config files to the sandbox uid."""
    from taskbox.integrate import install_guard, integrate

    integrate("claude-code", tmp_path)
    install_guard("claude-code", tmp_path)
    install_guard("opencode", tmp_path)
    for rel in (".mcp.json", ".claude", ".claude/settings.json", ".opencode/plugins/taskbox-guard.js"):
        assert (tmp_path / rel).stat().st_uid == os.geteuid(), rel


def test_codex_config_is_merged_into_its_toml(home: Path, tmp_path: Path) -> None:
    codex = tmp_path / "codex-home"
    codex.mkdir()
    original = ('model = "gpt-5"\n\n[mcp_servers.docs]\ncommand = "docs-mcp"\nargs = ["--x"]\n\n'
                '[mcp_servers.taskbox]\ncommand = "taskbox"\nargs = ["mcp"]\n\n[mcp_servers.taskbox.env]\n'
                'OLD = "1"\n\n[profiles.fast]\nmodel = "gpt-5-mini"\n')
    (codex / "config.toml").write_text(original)
    env = {"CODEX_HOME": str(codex)}

    dry = integrate("codex", tmp_path, "--dry-run", env=env)
    assert dry["action"] == "updated" and dry["dry_run"] is True
    assert (codex / "config.toml").read_text() == original  # a dry run writes nothing
    shown = run_cli("integrate", "codex", "--dry-run", env=env)
    assert shown.returncode == 0 and "would update MCP server 'taskbox'" in shown.stdout

    res = integrate("codex", tmp_path, env=env)
    assert res["action"] == "updated" and res["previous"]["command"] == "taskbox"
    config = tomllib.loads((codex / "config.toml").read_text())
    entry = config["mcp_servers"]["taskbox"]
    assert entry["command"] == sys.executable and entry["args"] == ["-m", "taskbox", "mcp"]
    assert entry["env"]["TASKBOX_HOME"] == str(home.resolve()) and "OLD" not in entry["env"]
    assert entry["tool_timeout_sec"] == 660
    # required: Codex waits for it (an optional server gets 1 s, less than taskbox needs to list its tools)
    assert entry["required"] is True and entry["startup_timeout_sec"] == 20
    # its destructive tools (complete_task …) run without a prompt `codex exec` cannot show
    assert entry["default_tools_approval_mode"] == "approve"
    # everything else is kept
    assert config["model"] == "gpt-5" and config["profiles"] == {"fast": {"model": "gpt-5-mini"}}
    assert config["mcp_servers"]["docs"] == {"command": "docs-mcp", "args": ["--x"]}
    assert integrate("codex", tmp_path, env=env)["action"] == "unchanged"

    res = integrate("codex", tmp_path, "--http", "http://127.0.0.1:8765/mcp", "--name", "tbhttp", env=env)
    assert res["action"] == "added"
    config = tomllib.loads((codex / "config.toml").read_text())
    assert config["mcp_servers"]["tbhttp"]["url"] == "http://127.0.0.1:8765/mcp"
    assert set(config["mcp_servers"]) == {"docs", "taskbox", "tbhttp"}

    (codex / "config.toml").write_text("[mcp_servers\n")
    bad = run_cli("integrate", "codex", env=env)
    assert bad.returncode == 2 and "not valid TOML" in bad.stderr
    assert (codex / "config.toml").read_text() == "[mcp_servers\n"


def test_http_entries_and_dry_runs(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    url = "http://127.0.0.1:8765/mcp"
    dry = integrate("opencode", project, "--http", url, "--dry-run")
    assert dry["action"] == "created" and not (project / "opencode.json").exists()
    integrate("opencode", project, "--http", url)
    oc = json.loads((project / "opencode.json").read_text())["mcp"]["taskbox"]
    assert oc["type"] == "remote" and oc["url"] == url and "command" not in oc
    integrate("claude-code", project, "--http", url)
    assert json.loads((project / ".mcp.json").read_text())["mcpServers"]["taskbox"] == {"type": "http", "url": url}
    bad = run_cli("integrate", "claude-code", "--dir", str(project), "--http", "ftp://x")
    assert bad.returncode == 2 and "not an http(s) URL" in bad.stderr
