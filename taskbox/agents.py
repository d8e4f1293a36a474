"""Agent CLIs that run inside a task's sandbox: their presets, and how a run is put together.

A preset names what taskbox needs to start an agent in the container: its command for an
interactive session and for a prompt (non-interactive) run, the environment it wants, the
model API hosts it must reach (allowed through the task's egress proxy automatically), how a
custom base URL is given to it, and the npm package (pinned) that `taskbox image build
--agents` installs. ``shell`` is a plain shell, no model.

This module only describes and decides; :meth:`taskbox.service.TaskService.run_agent` acts.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import InvalidInput

#: The tmux server of a run lives on this socket name (``tmux -L``) plus the session id.
TMUX_PREFIX = "taskbox-"
#: The key sequence that detaches from an interactive run (tmux's own, prefix then ``d``).
DETACH_KEYS = "Ctrl-b d"


@dataclass(frozen=True)
class Preset:
    """How to run one agent CLI in a sandbox."""

    name: str
    binary: str
    interactive: tuple[str, ...]
    prompt: tuple[str, ...]  # ``{prompt}`` stands for the prompt text
    hosts: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    base_url_env: str | None = None  # the variable that points the CLI at another endpoint
    package: str | None = None  # npm package@version installed by `image build --agents`
    key_env: tuple[str, ...] = ()  # the variables its API key is read from (a --secret of that name)
    doc: str = ""

    def command(self, prompt: str | None, args: Iterable[str] = ()) -> list[str]:
        """The argv of a run: the prompt form when ``prompt`` is given, else the interactive one."""
        if prompt is None:
            return [*self.interactive, *args]
        return [p.replace("{prompt}", prompt) if "{prompt}" in p else p for p in self.prompt] + list(args)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "opencode", "opencode", ("opencode",), ("opencode", "run", "{prompt}"),
        hosts=("api.openai.com", "api.anthropic.com", "opencode.ai", "models.dev"),
        env={"OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1"},
        package="opencode-ai@1.18.33", key_env=("OPENAI_API_KEY", "ANTHROPIC_API_KEY"),
        doc="OpenCode; a custom base URL becomes an OpenAI-compatible provider in OPENCODE_CONFIG_CONTENT",
    ),
    Preset(
        "claude-code", "claude", ("claude",),
        ("claude", "-p", "{prompt}", "--output-format", "stream-json", "--verbose",
         "--dangerously-skip-permissions"),
        hosts=("api.anthropic.com",),
        env={"DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
             "DISABLE_TELEMETRY": "1", "IS_SANDBOX": "1"},
        base_url_env="ANTHROPIC_BASE_URL", package="@anthropic-ai/claude-code@2.1.332",
        key_env=("ANTHROPIC_API_KEY",),
        doc="Claude Code; print mode streams JSON; the sandbox is its permission boundary",
    ),
    Preset(
        "codex", "codex", ("codex",),
        ("codex", "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", "{prompt}"),
        hosts=("api.openai.com", "chatgpt.com"),
        package="@openai/codex@0.171.0", key_env=("OPENAI_API_KEY",),
        doc="OpenAI Codex CLI; `codex exec` for a prompt; a custom base URL becomes a Responses API provider "
            "given with -c; the sandbox is its permission boundary",
    ),
    Preset(
        "shell", "bash", ("bash", "-l"), ("bash", "-lc", "{prompt}"),
        doc="a login shell in the workspace; --prompt runs one shell command line",
    ),
)}


def preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a one-line error listing the known ones."""
    found = PRESETS.get(name)
    if found is None:
        raise InvalidInput(f"unknown agent {name!r}; known agents: {', '.join(PRESETS)}", agent=name)
    return found


def packages(names: Iterable[str] = (), extra: Iterable[str] = ()) -> list[str]:
    """The npm ``package@version`` specs for the agents ``names`` (all with a package if none) and ``extra``."""
    chosen = [preset(n) for n in names] if names else list(PRESETS.values())
    out = [p.package for p in chosen if p.package]
    for spec in extra:
        check_package(spec)
        out.append(spec)
    return sorted(dict.fromkeys(out))


def check_package(spec: str) -> str:
    """An npm spec ``name@version`` (scoped allowed) with a pinned version; refuse anything else."""
    name, _, version = spec.rpartition("@")
    ok_name = name and all(c.isalnum() or c in "@/._-" for c in name) and not name.startswith(("-", "."))
    ok_version = version and all(c.isalnum() or c in ".-+" for c in version) and version[0].isdigit()
    if not (ok_name and ok_version):
        raise InvalidInput(f"npm package {spec!r} must be name@version with a pinned version (e.g. cowsay@1.6.0)")
    return spec


def base_url_host(url: str) -> str:
    """The host of a custom base URL (it is allowed through the egress proxy)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"base URL {url!r} must be an http(s) URL with a host")
    return parts.hostname


def environment(p: Preset, *, base_url: str | None = None, model: str | None = None) -> dict[str, str]:
    """The variables a run of ``p`` gets (secrets come on top, from the service)."""
    env = dict(p.env)
    if base_url:
        base_url_host(base_url)
        if p.base_url_env:
            env[p.base_url_env] = base_url
        elif p.name == "codex":
            pass  # given as options (see options())
        elif p.name == "opencode":
            chosen = model or "default"
            env["OPENCODE_CONFIG_CONTENT"] = json.dumps({
                "provider": {"taskbox": {
                    "npm": "@ai-sdk/openai-compatible", "name": "taskbox",
                    "options": {"baseURL": base_url, "apiKey": "{env:OPENAI_API_KEY}"},
                    "models": {chosen: {"name": chosen}}}},
                "model": f"taskbox/{chosen}"})
        else:
            raise InvalidInput(f"agent {p.name} takes no base URL")
    if model and p.name == "claude-code":
        env["ANTHROPIC_MODEL"] = model
    return env


#: The model provider a custom base URL becomes for Codex (its ``OPENAI_BASE_URL`` is not read any more).
CODEX_PROVIDER = "taskbox"


def options(p: Preset, *, base_url: str | None = None, model: str | None = None) -> list[str]:
    """The command-line options a run of ``p`` gets before the user's own arguments.

    Codex takes its endpoint and model as options: a custom base URL becomes a provider of its
    own (``-c model_providers.taskbox={…}``) speaking the Responses API over HTTP (streamed as
    SSE; no WebSocket first, which a plain endpoint does not serve), its key read from
    ``OPENAI_API_KEY``; ``--model`` becomes ``-m``.
    """
    if p.name != "codex":
        return []
    out: list[str] = []
    if base_url:
        base_url_host(base_url)
        table = ", ".join([f"name = {json.dumps(CODEX_PROVIDER)}", f"base_url = {json.dumps(base_url)}",
                           'env_key = "OPENAI_API_KEY"', 'wire_api = "responses"', "supports_websockets = false"])
        out += ["-c", f"model_provider={json.dumps(CODEX_PROVIDER)}",
                "-c", f"model_providers.{CODEX_PROVIDER}={{{table}}}"]
    if model:
        out += ["-m", model]
    return out


def tmux_socket(session_id: str) -> str:
    """The tmux server (``-L``) name of an interactive run: one server per session."""
    return TMUX_PREFIX + "".join(c if c.isalnum() or c in "-_" else "_" for c in session_id)[:80]


def tmux_new(session_id: str, argv: list[str]) -> list[str]:
    """The argv that starts ``argv`` under its own tmux server (detachable), or re-attaches to it."""
    return ["tmux", "-L", tmux_socket(session_id), "new-session", "-A", "-s", "agent", "--",
            shlex.join(argv)]


def tmux_attach(session_id: str) -> list[str]:
    return ["tmux", "-L", tmux_socket(session_id), "attach-session", "-t", "agent"]


def tmux_alive(session_id: str) -> list[str]:
    """Exit 0 while the run's agent is still running (detached or not)."""
    return ["tmux", "-L", tmux_socket(session_id), "has-session", "-t", "agent"]


@dataclass
class Terminal:
    """The user's terminal for an interactive run: file descriptors and its size (rows, columns)."""

    stdin_fd: int
    stdout_fd: int
    size: Callable[[], tuple[int, int] | None] = lambda: None


def exit_file(session_id: str) -> str:
    """Where, in the container (not the workspace), an interactive run leaves its agent's exit code."""
    return f"/tmp/.taskbox-runs/{tmux_socket(session_id)}.exit"


def detachable(session_id: str, argv: list[str]) -> list[str]:
    """``argv`` under its own tmux server, recording its exit code when it ends (see :func:`exit_file`)."""
    inner = f"{shlex.join(argv)}; echo $? > {exit_file(session_id)}"
    return ["sh", "-c", f"mkdir -p /tmp/.taskbox-runs && exec {shlex.join(tmux_new(session_id, ['sh', '-c', inner]))}"]


def parse_publish(spec: str) -> dict[str, Any]:
    """``[HOST_ADDRESS:][HOST_PORT:]PORT`` as ``{"port", "host_ip", "host_port"}`` (loopback by default)."""
    import ipaddress

    parts = str(spec).strip().rsplit(":", 2)
    try:
        port = int(parts[-1])
        host_port = int(parts[-2]) if len(parts) >= 2 and parts[-2] else port
        host_ip = parts[0].strip("[]") if len(parts) == 3 else "127.0.0.1"
        ipaddress.ip_address(host_ip)
    except ValueError:
        raise InvalidInput(f"port {spec!r} must be [HOST_ADDRESS:][HOST_PORT:]PORT, e.g. 8080:3000") from None
    if not (0 < port < 65536 and 0 < host_port < 65536):
        raise InvalidInput(f"port {spec!r}: ports are 1-65535")
    return {"port": port, "host_ip": host_ip, "host_port": host_port}
