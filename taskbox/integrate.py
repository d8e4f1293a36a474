"""Wiring agents to taskbox: write an agent's MCP configuration for the taskbox server.

Each agent keeps its MCP servers in its own file and format:

- OpenCode: ``opencode.json``, ``mcp.<name>`` = ``{"type": "local", "command": [...]}``
- Claude Code: ``.mcp.json``, ``mcpServers.<name>`` = ``{"type": "stdio", "command": ..., "args": [...]}``

The file is merged, never overwritten: only our entry is added or replaced, everything else
is kept as it was. A file that is not valid JSON is left untouched and reported.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import files
from .errors import InvalidInput

AGENTS = ("opencode", "claude-code")
SERVER_NAME = "taskbox"


def server_command() -> list[str]:
    """The command that starts ``taskbox mcp``: the installed executable, by absolute path when
    it is on PATH, so the agent finds it whatever its own PATH is."""
    exe = shutil.which("taskbox")
    return [exe or "taskbox", "mcp"]


def server_env() -> dict[str, str]:
    """Environment the server needs: a non-default TASKBOX_HOME must reach it, or it would open another registry."""
    home = os.environ.get("TASKBOX_HOME")
    return {"TASKBOX_HOME": str(Path(home).expanduser().resolve())} if home else {}


@dataclass
class Integration:
    """What `integrate` did to one agent's configuration file."""

    agent: str
    path: str
    action: str  # created | added | updated | unchanged
    server_name: str
    entry: dict[str, Any]
    previous: dict[str, Any] | None
    what: str = "MCP server"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        thing = f"{self.what} {self.server_name!r}"
        what = {
            "created": f"created {self.path} with {thing}",
            "added": f"added {thing} to {self.path}",
            "updated": f"updated {thing} in {self.path}",
            "unchanged": f"{self.path} already has {thing}; nothing changed",
        }[self.action]
        lines = [what]
        if self.action == "updated":
            lines.append(f"  before: {json.dumps(self.previous, sort_keys=True)}")
        if self.action != "unchanged":
            lines.append(f"  entry:  {json.dumps(self.entry, sort_keys=True)}")
        return "\n".join(lines)


def opencode_entry(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "local", "command": command, "enabled": True}
    if env:
        entry["environment"] = env
    return entry


def claude_code_entry(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "stdio", "command": command[0], "args": command[1:]}
    if env:
        entry["env"] = env
    return entry


def integrate(agent: str, directory: str | Path = ".", *, name: str = SERVER_NAME,
              command: list[str] | None = None, env: dict[str, str] | None = None) -> Integration:
    """Add (or update) the taskbox MCP server in ``agent``'s project configuration in ``directory``."""
    if agent not in AGENTS:
        raise InvalidInput(f"unknown agent {agent!r}; one of {', '.join(AGENTS)}")
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise InvalidInput(f"server name {name!r} may contain only letters, digits, - and _")
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a directory")
    command = command or server_command()
    env = server_env() if env is None else env
    if agent == "opencode":
        if (root / "opencode.jsonc").exists() and not (root / "opencode.json").exists():
            raise InvalidInput(
                f"{root / 'opencode.jsonc'} exists; add this under \"mcp\" there yourself (taskbox does not "
                f"rewrite files with comments): {json.dumps({name: opencode_entry(command, env)})}")
        filename, section, entry = "opencode.json", "mcp", opencode_entry(command, env)
        skeleton: dict[str, Any] = {"$schema": "https://opencode.ai/config.json"}
    else:
        filename, section, entry = ".mcp.json", "mcpServers", claude_code_entry(command, env)
        skeleton = {}
    return _merge(agent, root, filename, section, name, entry, skeleton)


def _merge(agent: str, root: Path, filename: str, section: str, name: str, entry: dict[str, Any],
           skeleton: dict[str, Any]) -> Integration:
    path = root / filename
    raw = files.read_optional(root, filename)
    if raw is None:
        config: dict[str, Any] = dict(skeleton)
        created = True
    else:
        try:
            config = json.loads(raw.decode("utf-8")) if raw.strip() else dict(skeleton)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{path} is not valid JSON ({exc}); fix it first, it was left untouched") from exc
        if not isinstance(config, dict):
            raise InvalidInput(f"{path} does not hold a JSON object; it was left untouched")
        created = False
    servers = config.setdefault(section, {})
    if not isinstance(servers, dict):
        raise InvalidInput(f"{path}: {section!r} is not a JSON object; it was left untouched")
    previous = servers.get(name)
    if previous == entry:
        return Integration(agent, str(path), "unchanged", name, entry, previous)
    servers[name] = entry
    files.atomic_write(root, filename, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
                       hand_over=False)
    action = "created" if created else "added" if previous is None else "updated"
    return Integration(agent, str(path), action, name, entry, previous)


# --- agent-side guard hooks ----------------------------------------------------------------

CLAUDE_GUARDED = "Bash|Write|Edit|MultiEdit|NotebookEdit"
OPENCODE_PLUGIN = ".opencode/plugins/taskbox-guard.js"


def guard_command(agent: str) -> str:
    """The shell command an agent's hook runs: `taskbox guard`, with a non-default TASKBOX_HOME."""
    exe = server_command()[0]
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in server_env().items())
    return f"{env + ' ' if env else ''}{shlex.quote(exe)} guard --agent {agent}"


def opencode_plugin_source(exe: str, env: dict[str, str]) -> str:
    return f"""// Written by `taskbox integrate opencode --guard`; rewritten when that runs again.
// While a taskbox task of this repository has an agent attached, OpenCode's host-side shell
// and file-writing tools are refused, so the work happens in the task's sandbox.
const TASKBOX = {json.dumps(exe)}
const ENV = {json.dumps(env)}
const GUARDED = ["bash", "write", "edit", "patch"]

export const TaskboxGuard = async ({{ $, directory }}) => ({{
  "tool.execute.before": async (input) => {{
    if (!GUARDED.includes(input.tool)) return
    const r = await $`${{TASKBOX}} guard --agent opencode --dir ${{directory}} --tool ${{input.tool}}`
      .env({{ ...process.env, ...ENV }}).nothrow().quiet()
    if (r.exitCode === 2) throw new Error(r.stderr.toString().trim())
  }},
}})
"""


def install_guard(agent: str, directory: str | Path = ".") -> Integration:
    """Install the agent-side hook that refuses host-side shell and file tools while a task is attached."""
    if agent not in AGENTS:
        raise InvalidInput(f"unknown agent {agent!r}; one of {', '.join(AGENTS)}")
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a directory")
    command = guard_command(agent)
    if agent == "opencode":
        source = opencode_plugin_source(server_command()[0], server_env())
        old = files.read_optional(root, OPENCODE_PLUGIN)
        action = "unchanged" if old == source.encode() else "created" if old is None else "updated"
        if action != "unchanged":
            files.atomic_write(root, OPENCODE_PLUGIN, source.encode(), hand_over=False)
        return Integration(agent, str(root / OPENCODE_PLUGIN), action, "taskbox-guard",
                           {"plugin": OPENCODE_PLUGIN, "command": command}, None, "guard plugin")
    entry = {"matcher": CLAUDE_GUARDED, "hooks": [{"type": "command", "command": command}]}
    path = root / ".claude" / "settings.json"
    raw = files.read_optional(root, ".claude/settings.json")
    try:
        config: dict[str, Any] = json.loads(raw.decode("utf-8")) if raw and raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path} is not valid JSON ({exc}); fix it first, it was left untouched") from exc
    if not isinstance(config, dict) or not isinstance(config.setdefault("hooks", {}), dict):
        raise InvalidInput(f"{path}: unexpected structure; it was left untouched")
    pre = config["hooks"].setdefault("PreToolUse", [])
    if not isinstance(pre, list):
        raise InvalidInput(f"{path}: hooks.PreToolUse is not a list; it was left untouched")

    def ours(item: Any) -> bool:
        return isinstance(item, dict) and any(" guard --agent claude-code" in str(h.get("command", ""))
                                              for h in item.get("hooks", []) if isinstance(h, dict))

    previous = next((item for item in pre if ours(item)), None)
    if previous == entry:
        return Integration(agent, str(path), "unchanged", "taskbox-guard", entry, previous, "guard hook")
    config["hooks"]["PreToolUse"] = [item for item in pre if not ours(item)] + [entry]
    files.atomic_write(root, ".claude/settings.json",
                       (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(), hand_over=False)
    action = "created" if raw is None else "added" if previous is None else "updated"
    return Integration(agent, str(path), action, "taskbox-guard", entry, previous, "guard hook")
