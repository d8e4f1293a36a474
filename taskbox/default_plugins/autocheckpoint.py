"""Built-in plugin: automatic checkpoints (SPEC §5).

- when a todo marked *major* is completed;
- before a risky ``exec`` (or any tool a project pattern names), scored by
  :mod:`taskbox.risk` against the project's ``.taskbox/risk.json`` (the plugin asks; the core
  takes one checkpoint however many plugins ask);
- a final, pinned checkpoint when the task completes.

Each one is recorded, with its reason, in ``decisions.md`` and Plan.md's iteration log (the
service writes both before the engine snapshots, so the checkpoint holds its own record).
A checkpoint that cannot be taken never blocks the agent's command: the failure is recorded
in the same places instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import risk
from ..errors import TaskboxError
from ..hookspecs import hookimpl
from ..models import CheckpointRequest


def _take(service: Any, task: Any, trigger: str, reason: str, name: str | None = None,
          pinned: bool = False) -> None:
    try:
        service.create_checkpoint(task.id, name, trigger=trigger, reason=reason, pinned=pinned)
    except (TaskboxError, OSError) as exc:
        message = exc.message if isinstance(exc, TaskboxError) else str(exc)
        service.registry.add_event("checkpoint.auto_failed", task.id,
                                   {"trigger": trigger, "reason": reason, "error": message[:500]})


@hookimpl
def todo_complete(service: Any, task: Any, todo: dict[str, Any]) -> None:
    if todo.get("major"):
        _take(service, task, "major-todo", f"major todo `#{todo.get('id')}` completed: {todo.get('text', '')}")


@hookimpl
def pre_tool_call(service: Any, task: Any, tool: str, args: dict[str, Any]) -> CheckpointRequest | None:
    try:
        cfg = risk.load(Path(task.repo_path))
    except TaskboxError as exc:  # a broken project file must not stop the agent; it is reported
        service.registry.add_event("risk.config_invalid", task.id, {"error": exc.message[:500]})
        cfg = risk.RiskConfig()
    text = risk.command_text(args)
    assessment = cfg.assess(tool, text)
    if not assessment.checkpoint:
        return None
    # The core takes the checkpoint (one, however many plugins ask for one).
    if args.get("log", True) is False:  # the command must not be recorded, not even as a reason
        return CheckpointRequest("risky-command", f"before a command run without logging — {assessment.reason}")
    short = text if len(text) <= 120 else text[:117] + "..."
    return CheckpointRequest("risky-command", service.redactor.text(f"before `{short}` — {assessment.reason}"))


@hookimpl(trylast=True)
def task_complete(service: Any, task: Any, summary: str, final_checkpoint: bool) -> None:
    # Runs after the Plan.md plugin wrote the final summary, so the checkpoint includes it.
    if not final_checkpoint:
        return
    rows = service.list_checkpoints(task.id)
    if rows and rows[-1]["trigger"] == "final":
        return  # already taken (an interrupted completion being finished, or by the caller)
    _take(service, task, "final", "task completed" + (f": {summary}" if summary else ""), name="final",
          pinned=True)
