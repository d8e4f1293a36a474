"""Which of an agent's *host-side* tools may run while a taskbox task is attached.

An allow-list, never a deny-list: a list of forbidden tool names always lags the clients
(OpenCode's ``apply_patch``, Claude Code's ``Monitor``, whatever comes next). While a task
of the repository has an attached agent, only tools that read, search or fetch — and
taskbox's own MCP tools — run on the host; everything else, unknown names included, is
refused, so the work happens in the sandbox. Names are compared case-insensitively
(Claude Code says ``Read``, OpenCode ``read``).
"""

from __future__ import annotations

# Read-only or agent-internal tools of Claude Code and OpenCode. Sub-agent tools (Task,
# Agent) are allowed: the sub-agent's own tool calls pass through the same guard.
READ_ONLY_TOOLS = frozenset({
    "read", "glob", "grep", "ls", "list", "lsp", "notebookread", "codesearch",
    "webfetch", "websearch", "listmcpresourcestool", "readmcpresourcetool",
    "list_mcp_resources", "list_mcp_resource_templates", "read_mcp_resource",  # OpenCode 1.18
    "todowrite", "todoread", "task", "agent", "exitplanmode", "askuserquestion", "question",
})


def mcp_prefixes(server: str) -> tuple[str, ...]:
    """How the clients name the tools of MCP server ``server``: ``mcp__<server>__<tool>``
    (Claude Code) and ``<server>_<tool>`` (OpenCode)."""
    name = server.lower()
    return (f"mcp__{name}__", f"{name}_")


def allowed_while_attached(tool: str, server: str = "taskbox") -> bool:
    """May host-side ``tool`` run while a task is attached? Only reads and taskbox's own tools."""
    name = tool.strip().lower()
    return name in READ_ONLY_TOOLS or any(name.startswith(p) and len(name) > len(p) for p in mcp_prefixes(server))
