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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        what = {
            "created": f"created {self.path} with MCP server {self.server_name!r}",
            "added": f"added MCP server {self.server_name!r} to {self.path}",
            "updated": f"updated MCP server {self.server_name!r} in {self.path}",
            "unchanged": f"{self.path} already has MCP server {self.server_name!r}; nothing changed",
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
    mode = None if created else path.stat().st_mode & 0o777
    files.atomic_write(root, filename, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(), mode)
    action = "created" if created else "added" if previous is None else "updated"
    return Integration(agent, str(path), action, name, entry, previous)
