"""Built-in plugin: creates, updates and finalises the task's ``Plan.md`` (SPEC §4).

taskbox owns only the regions between ``<!-- taskbox:NAME -->`` markers; agents may edit
the rest of the file freely and their edits are kept.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from .. import files
from ..hookspecs import hookimpl

PLAN = "Plan.md"


def _marker(name: str, body: str) -> str:
    return f"<!-- taskbox:{name} -->\n{body.rstrip()}\n<!-- /taskbox:{name} -->"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def render_todos(todos: list[dict[str, Any]]) -> str:
    if not todos:
        return "_No todos yet._"
    lines = []
    for t in todos:
        box = "x" if t.get("status") == "completed" else " "
        extra = " **(major)**" if t.get("major") else ""
        state = t.get("status", "pending")
        suffix = "" if state in ("pending", "completed") else f" _({state})_"
        lines.append(f"- [{box}] {t.get('text', '')}{extra}{suffix} `#{t.get('id')}`")
    return "\n".join(lines)


def initial(task: Any) -> str:
    return (
        f"# Plan — {task.title}\n\n"
        f"Task `{task.id}` on branch `{task.branch}`, started {_now()} by {task.agent} ({task.model}).\n\n"
        f"## Goal\n\n{task.description}\n\n"
        f"## Todos\n\n{_marker('todos', render_todos([]))}\n\n"
        f"## Iteration log\n\n{_marker('log', f'- {_now()} — task created')}\n\n"
        f"## Final summary\n\n{_marker('summary', '_Not finished yet._')}\n"
    )


def replace_region(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"<!-- taskbox:{name} -->\n.*?<!-- /taskbox:{name} -->", re.DOTALL)
    block = _marker(name, body)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    return text.rstrip() + f"\n\n{block}\n"  # the agent removed the region: add it back


def region(text: str, name: str) -> str:
    m = re.search(rf"<!-- taskbox:{name} -->\n(.*?)\n?<!-- /taskbox:{name} -->", text, re.DOTALL)
    return m.group(1) if m else ""


def _edit(task: Any, fn: Any) -> None:
    raw = files.read_optional(_root(task), PLAN)
    text = raw.decode(errors="replace") if raw is not None else initial(task)
    files.atomic_write(_root(task), PLAN, fn(text).encode())


def _root(task: Any) -> Path:
    return Path(task.workspace_path)


def log_iteration(task: Any, line: str) -> None:
    def add(text: str) -> str:
        current = region(text, "log").rstrip()
        return replace_region(text, "log", f"{current}\n- {_now()} — {line}".strip())

    _edit(task, add)


def update_todos(task: Any, todos: list[dict[str, Any]]) -> None:
    _edit(task, lambda text: replace_region(text, "todos", render_todos(todos)))


@hookimpl
def task_start(service: Any, task: Any) -> None:
    if files.read_optional(_root(task), PLAN) is None:
        files.atomic_write(_root(task), PLAN, initial(task).encode())
    else:
        log_iteration(task, "task created (existing Plan.md kept)")


@hookimpl
def session_start(service: Any, task: Any, session: Any) -> None:
    log_iteration(task, f"{session.agent} ({session.model}) attached, session `{session.id}`")


@hookimpl
def session_end(service: Any, task: Any, session: Any) -> None:
    log_iteration(task, f"{session.agent} detached, session `{session.id}`")


@hookimpl
def post_tool_call(service: Any, task: Any, tool: str, args: dict[str, Any], result: Any) -> None:
    if tool == "update_todos":
        update_todos(task, result["todos"])


@hookimpl
def checkpoint_start(service: Any, task: Any, checkpoint: Any) -> None:
    c = checkpoint
    log_iteration(task, f"checkpoint `{c.name}` ({c.checkpoint_id}, {c.trigger}): {c.reason}")


@hookimpl
def checkpoint_failed(service: Any, task: Any, checkpoint: Any, error: str) -> None:
    log_iteration(task, f"checkpoint `{checkpoint.name}` ({checkpoint.checkpoint_id}) failed: {error}")


@hookimpl
def task_complete(service: Any, task: Any, summary: str) -> None:
    state = service.state(task.id)
    todos = state["todos"]
    done = sum(1 for t in todos if t.get("status") == "completed")
    m = state["metrics"]
    body = (
        f"Completed {_now()}. {summary or 'No summary given.'}\n\n"
        f"- Todos: {done}/{len(todos)} completed\n"
        f"- Sessions: {m.get('sessions', 0)}, tool calls: {m.get('tool_calls', 0)}, "
        f"agents: {', '.join(m.get('agents_used', [])) or 'none'}"
    )

    def finish(text: str) -> str:
        text = replace_region(text, "todos", render_todos(todos))
        current = region(text, "log").rstrip()
        text = replace_region(text, "log", f"{current}\n- {_now()} — task completed")
        return replace_region(text, "summary", body)

    _edit(task, finish)


def _cell(value: Any, limit: int = 60) -> str:
    text = str(value if value is not None else "").replace("|", "\\|").replace("\n", " ").replace("`", "'")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render_subtasks(subtasks: list[dict[str, Any]]) -> str:
    """The live sub-task table of a parent's Plan.md (id, title, status, branch, started, duration, result)."""
    if not subtasks:
        return "_No sub-tasks._"
    lines = ["| id | title | status | branch | started | duration | merge commit / conflicting files |",
             "|---|---|---|---|---|---|---|"]
    now = time.time()
    for s in subtasks:
        started = s.get("started_at")
        when = time.strftime("%H:%M:%S", time.gmtime(started)) if started else ""
        end = s.get("finished_at") or (now if s.get("status") == "running" else None)
        took = f"{end - started:.1f}s" if started and end else ""
        if s.get("status") == "conflict":
            result = "conflict: " + ", ".join(s.get("conflict_files") or [])
        elif s.get("merge_commit"):
            result = str(s["merge_commit"])[:12]
        else:
            result = s.get("error") or ""
        lines.append(f"| {_cell(s['id'])} | {_cell(s.get('title'))} | {s.get('status')} | "
                     f"{_cell(s.get('branch') or '')} | {when} | {took} | {_cell(result, 120)} |")
    done = sum(1 for s in subtasks if s.get("status") == "merged")
    lines.append(f"\n{done}/{len(subtasks)} merged — updated {_now()}")
    return "\n".join(lines)


@hookimpl
def subtasks_changed(service: Any, task: Any, subtasks: list[dict[str, Any]]) -> None:
    def table(text: str) -> str:
        if "<!-- taskbox:subtasks -->" not in text:  # first time: a section of its own
            text = text.rstrip() + f"\n\n## Sub-tasks\n\n{_marker('subtasks', render_subtasks(subtasks))}\n"
            return text
        return replace_region(text, "subtasks", render_subtasks(subtasks))

    _edit(task, table)
