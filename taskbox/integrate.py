"""Wiring agents to taskbox: write an agent's MCP configuration for the taskbox server.

Each agent keeps its MCP servers in its own file and format:

- OpenCode: ``opencode.json``, ``mcp.<name>`` = ``{"type": "local", "command": [...], "timeout": ms}``
  (or ``{"type": "remote", "url": ...}``)
- Claude Code: ``.mcp.json``, ``mcpServers.<name>`` = ``{"type": "stdio", "command": ..., "args": [...]}``
  (or ``{"type": "http", "url": ...}``)
- Codex: ``$CODEX_HOME/config.toml`` (``~/.codex``), a ``[mcp_servers.<name>]`` table with
  ``command``/``args``/``env`` (or ``url``), ``required = true``,
  ``default_tools_approval_mode = "approve"`` and ``tool_timeout_sec``

The command is the taskbox that is running now, by absolute path, never a ``taskbox`` looked
up on PATH (which may be another installation or a version manager's shim). Each client's
tool timeout is set where the client has one, to the ``exec_timeout`` setting plus a margin,
so a long command is not cut off by the client first.

The file is merged, never overwritten: only our entry is added or replaced, everything else
is kept as it was. A file that is not valid JSON (or TOML) is left untouched and reported.
With ``dry_run`` nothing is written; the result says what would change.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import files
from .errors import InvalidInput

AGENTS = ("opencode", "claude-code", "codex")
SERVER_NAME = "taskbox"
TIMEOUT_MARGIN = 60  # seconds beyond exec_timeout a client waits for a tool call
CODEX_STARTUP_TIMEOUT = 20


def server_command() -> list[str]:
    """The command that starts this very taskbox's MCP server, by absolute path.

    The ``taskbox`` program that is running when it is one (an installed entry point), else
    this interpreter with ``-m taskbox``.
    """
    exe = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if exe is not None and exe.name == "taskbox" and exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe.resolve()), "mcp"]
    return [str(Path(sys.executable).absolute()), "-m", "taskbox", "mcp"]


def server_env() -> dict[str, str]:
    """Environment the server needs: a non-default TASKBOX_HOME must reach it, or it would open
    another registry; a taskbox found through PYTHONPATH needs that path too."""
    env: dict[str, str] = {}
    home = os.environ.get("TASKBOX_HOME")
    if home:
        env["TASKBOX_HOME"] = str(Path(home).expanduser().resolve())
    source = str(Path(__file__).resolve().parent.parent)
    if source in [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]:
        env["PYTHONPATH"] = source
    return env


def tool_timeout() -> int:
    """Seconds a client should wait for one tool call: the longest default command, and a margin."""
    from .config import Settings, default_home

    try:
        secs = int(Settings.load(default_home()).exec_timeout)
    except Exception:  # noqa: BLE001 - an unreadable config: the built-in default
        secs = 600
    return secs + TIMEOUT_MARGIN


@dataclass
class Integration:
    """What `integrate` did (or, with ``dry_run``, would do) to one agent's configuration file."""

    agent: str
    path: str
    action: str  # created | added | updated | unchanged
    server_name: str
    entry: dict[str, Any]
    previous: dict[str, Any] | None
    what: str = "MCP server"
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        thing = f"{self.what} {self.server_name!r}"
        if self.dry_run:
            what = {
                "created": f"would create {self.path} with {thing}",
                "added": f"would add {thing} to {self.path}",
                "updated": f"would update {thing} in {self.path}",
                "unchanged": f"{self.path} already has {thing}; nothing would change",
            }[self.action]
        else:
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


def opencode_entry(command: list[str], env: dict[str, str], url: str | None = None,
                   timeout: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = ({"type": "remote", "url": url, "enabled": True} if url else
                             {"type": "local", "command": command, "enabled": True})
    if env and not url:
        entry["environment"] = env
    if timeout:
        entry["timeout"] = timeout * 1000  # milliseconds; OpenCode also keeps waiting while progress arrives
    return entry


def claude_code_entry(command: list[str], env: dict[str, str], url: str | None = None) -> dict[str, Any]:
    if url:
        return {"type": "http", "url": url}
    entry: dict[str, Any] = {"type": "stdio", "command": command[0], "args": command[1:]}
    if env:
        entry["env"] = env
    return entry


def codex_entry(command: list[str], env: dict[str, str], url: str | None = None,
                timeout: int | None = None) -> dict[str, Any]:
    """Codex's table for the taskbox server.

    ``required``: Codex (0.171, the pinned version) waits only ``mcp_optional_startup_grace_ms``
    (1 s by default) for an optional server before it builds a session's tool list, and never
    adds a late server's tools afterwards. `taskbox mcp` answers ``initialize`` at once but its
    tool list only after loading the whole server (1-1.5 s on a busy two-core machine), so as
    an optional server its tools were often missing, with nothing reported. A required server
    is waited for up to ``startup_timeout_sec``, and when it cannot start `codex exec` fails
    saying so.

    ``default_tools_approval_mode = "approve"``: by default Codex asks before a tool marked
    destructive (``complete_task``, ``restore_task_checkpoint``, ``delete_task_file``,
    ``kill_task_job``), and `codex exec`, which cannot ask, refuses it ("requires approval,
    but approval policy is never"). Those tools act inside the task's sandbox and memory only,
    the boundary taskbox exists to provide, as `taskbox run --agent codex` runs Codex there
    without approvals.
    """
    entry: dict[str, Any] = {"url": url} if url else {"command": command[0], "args": command[1:]}
    if env and not url:
        entry["env"] = env
    entry["required"] = True
    entry["default_tools_approval_mode"] = "approve"
    entry["startup_timeout_sec"] = CODEX_STARTUP_TIMEOUT
    if timeout:
        entry["tool_timeout_sec"] = timeout
    return entry


def codex_home() -> Path:
    return Path(os.environ.get("CODEX_HOME") or Path.home() / ".codex").expanduser().resolve()


def _check_url(url: str) -> str:
    if not re.fullmatch(r"https?://[^\s\"'\\]+", url):
        raise InvalidInput(f"{url!r} is not an http(s) URL of an MCP server, e.g. http://127.0.0.1:8765/mcp")
    return url


def integrate(agent: str, directory: str | Path = ".", *, name: str = SERVER_NAME,
              command: list[str] | None = None, env: dict[str, str] | None = None, url: str | None = None,
              dry_run: bool = False) -> Integration:
    """Add (or update) the taskbox MCP server in ``agent``'s configuration.

    OpenCode and Claude Code: the project configuration in ``directory``; Codex: its
    user configuration (``$CODEX_HOME/config.toml``). ``url`` writes an HTTP entry for a
    running `taskbox mcp --http` instead of a command.
    """
    if agent not in AGENTS:
        raise InvalidInput(f"unknown agent {agent!r}; one of {', '.join(AGENTS)}")
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise InvalidInput(f"server name {name!r} may contain only letters, digits, - and _")
    if url is not None:
        _check_url(url)
    command = command or server_command()
    env = server_env() if env is None else env
    timeout = tool_timeout()
    if agent == "codex":
        return _merge_codex(codex_home(), name, codex_entry(command, env, url, timeout), dry_run)
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a directory")
    if agent == "opencode":
        entry = opencode_entry(command, env, url, timeout)
        if (root / "opencode.jsonc").exists() and not (root / "opencode.json").exists():
            raise InvalidInput(
                f"{root / 'opencode.jsonc'} exists; add this under \"mcp\" there yourself (taskbox does not "
                f"rewrite files with comments): {json.dumps({name: entry})}")
        filename, section = "opencode.json", "mcp"
        skeleton: dict[str, Any] = {"$schema": "https://opencode.ai/config.json"}
    else:
        filename, section, entry = ".mcp.json", "mcpServers", claude_code_entry(command, env, url)
        skeleton = {}
    return _merge(agent, root, filename, section, name, entry, skeleton, dry_run)


def _merge(agent: str, root: Path, filename: str, section: str, name: str, entry: dict[str, Any],
           skeleton: dict[str, Any], dry_run: bool = False) -> Integration:
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
        return Integration(agent, str(path), "unchanged", name, entry, previous, dry_run=dry_run)
    servers[name] = entry
    if not dry_run:
        files.atomic_write(root, filename, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
                           hand_over=False)
    action = "created" if created else "added" if previous is None else "updated"
    return Integration(agent, str(path), action, name, entry, previous, dry_run=dry_run)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def codex_table(name: str, entry: dict[str, Any]) -> str:
    """``entry`` as the TOML tables Codex reads: ``[mcp_servers.<name>]`` and its ``.env``."""
    lines = [f"[mcp_servers.{name}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items() if k != "env"]
    if entry.get("env"):
        lines += ["", f"[mcp_servers.{name}.env]"]
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in entry["env"].items()]
    return "\n".join(lines) + "\n"


def _merge_codex(home: Path, name: str, entry: dict[str, Any], dry_run: bool) -> Integration:
    """Put our table into Codex's config.toml, every other line kept as it was."""
    path = home / "config.toml"
    raw = files.read_optional(home, "config.toml") if home.is_dir() else None
    text = ""
    config: dict[str, Any] = {}
    if raw is not None:
        try:
            text = raw.decode("utf-8")
            config = tomllib.loads(text)
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"{path} is not valid TOML ({exc}); fix it first, it was left untouched") from exc
    servers = config.get("mcp_servers", {})
    if not isinstance(servers, dict):
        raise InvalidInput(f"{path}: mcp_servers is not a table; it was left untouched")
    previous = servers.get(name)
    if previous == entry:
        return Integration("codex", str(path), "unchanged", name, entry, previous, dry_run=dry_run)
    # Drop our old tables ([mcp_servers.<name>] and [mcp_servers.<name>.*]) line by line.
    header = re.compile(r"^\s*\[\s*mcp_servers\s*\.\s*(\"?)" + re.escape(name) + r"\1\s*(\]|\.)")
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        if line.lstrip().startswith("["):
            skipping = bool(header.match(line))
        if not skipping:
            kept.append(line)
    body = "\n".join(kept).rstrip("\n")
    new_text = (body + "\n\n" if body else "") + codex_table(name, entry)
    try:
        check = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        check = {}
    expected = {**config, "mcp_servers": {**servers, name: entry}}
    if check != expected:  # ours was written some other way (inline, dotted keys): leave it to the user
        raise InvalidInput(f"{path} defines mcp_servers.{name} in a form taskbox does not rewrite; replace it "
                           f"yourself with:\n{codex_table(name, entry)}")
    if not dry_run:
        home.mkdir(parents=True, exist_ok=True)
        files.atomic_write(home, "config.toml", new_text.encode(), hand_over=False)
    action = "created" if raw is None else "added" if previous is None else "updated"
    return Integration("codex", str(path), action, name, entry, previous, dry_run=dry_run)


# --- agent-side guard hooks ----------------------------------------------------------------

CLAUDE_MATCHER = "*"  # every tool: the guard allows by name (taskbox.guard), so new tools are covered
OPENCODE_PLUGIN = ".opencode/plugins/taskbox-guard.js"


def guard_argv(agent: str, server: str = SERVER_NAME) -> list[str]:
    """The `taskbox guard` command of this taskbox for ``agent``'s hook."""
    return [*server_command()[:-1], "guard", "--agent", agent, "--server", server]


def guard_command(agent: str, server: str = SERVER_NAME) -> str:
    """The shell command an agent's hook runs: `taskbox guard`, with the environment it needs."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in server_env().items())
    return f"{env + ' ' if env else ''}{shlex.join(guard_argv(agent, server))}"


def opencode_plugin_source(argv: list[str], env: dict[str, str], server: str = SERVER_NAME) -> str:
    from .guard import READ_ONLY_TOOLS, mcp_prefixes

    return f"""// Written by `taskbox integrate opencode --guard`; rewritten when that runs again.
// While a taskbox task of this repository has an agent attached, only read-only host tools and
// taskbox's own tools run: everything else (shell, edit, write, apply_patch, tools added later)
// is refused, so the work happens in the task's sandbox.
const GUARD = {json.dumps(argv)}
const ENV = {json.dumps(env)}
const READ_ONLY = {json.dumps(sorted(READ_ONLY_TOOLS))}
const OWN = {json.dumps(list(mcp_prefixes(server)))}

export const TaskboxGuard = async ({{ $, directory }}) => ({{
  "tool.execute.before": async (input) => {{
    const tool = String(input.tool).toLowerCase()
    if (READ_ONLY.includes(tool) || OWN.some((p) => tool.startsWith(p) && tool.length > p.length)) return
    const r = await $`${{GUARD}} --dir ${{directory}} --tool ${{input.tool}}`
      .env({{ ...process.env, ...ENV }}).nothrow().quiet()
    if (r.exitCode === 2) throw new Error(r.stderr.toString().trim())
  }},
}})
"""


def install_guard(agent: str, directory: str | Path = ".", *, server: str = SERVER_NAME,
                  dry_run: bool = False) -> Integration:
    """Install the agent-side hook that allows only read-only host tools while a task is attached."""
    if agent not in ("opencode", "claude-code"):
        raise InvalidInput(f"a guard can be installed for opencode and claude-code, not {agent!r}")
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a directory")
    command = guard_command(agent, server)
    if agent == "opencode":
        source = opencode_plugin_source(guard_argv(agent, server), server_env(), server)
        old = files.read_optional(root, OPENCODE_PLUGIN)
        action = "unchanged" if old == source.encode() else "created" if old is None else "updated"
        if action != "unchanged" and not dry_run:
            files.atomic_write(root, OPENCODE_PLUGIN, source.encode(), hand_over=False)
        return Integration(agent, str(root / OPENCODE_PLUGIN), action, "taskbox-guard",
                           {"plugin": OPENCODE_PLUGIN, "command": command}, None, "guard plugin", dry_run)
    entry = {"matcher": CLAUDE_MATCHER, "hooks": [{"type": "command", "command": command}]}
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
        return Integration(agent, str(path), "unchanged", "taskbox-guard", entry, previous, "guard hook", dry_run)
    config["hooks"]["PreToolUse"] = [item for item in pre if not ours(item)] + [entry]
    if not dry_run:
        files.atomic_write(root, ".claude/settings.json",
                           (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(), hand_over=False)
    action = "created" if raw is None else "added" if previous is None else "updated"
    return Integration(agent, str(path), action, "taskbox-guard", entry, previous, "guard hook", dry_run)
