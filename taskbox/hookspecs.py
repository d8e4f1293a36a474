"""The taskbox hook specifications: every extension point, each with a one-line docstring.

Built-in behaviour (branch naming, Plan.md upkeep) is implemented as default plugins of
these same hooks; third-party plugins register under the ``taskbox`` entry-point group.
Hooks receive the :class:`~taskbox.service.TaskService` so they can act on the task.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("taskbox")
hookimpl = pluggy.HookimplMarker("taskbox")


@hookspec(firstresult=True)
def branch_name(agent: str, model: str, description: str) -> str | None:
    """Propose the git branch name for a new task (taskbox makes it unique)."""


@hookspec
def task_start(service: Any, task: Any) -> None:
    """A new task's workspace is checked out on its branch; prepare its files."""


@hookspec
def task_complete(service: Any, task: Any, summary: str, final_checkpoint: bool) -> None:
    """A task is completing; finalise its workspace before the final commit."""


@hookspec
def session_start(service: Any, task: Any, session: Any) -> None:
    """An agent session attached to a task."""


@hookspec
def session_end(service: Any, task: Any, session: Any) -> None:
    """An agent session detached from a task."""


@hookspec
def pre_tool_call(service: Any, task: Any, tool: str, args: dict[str, Any]) -> Any:
    """An operation (``tool``, a name of models.OPERATIONS) is about to run on a task; raise a TaskboxError to refuse it, or return a models.CheckpointRequest to have one checkpoint taken first (``args["log"] is False``: record nothing of it)."""


@hookspec
def post_tool_call(service: Any, task: Any, tool: str, args: dict[str, Any], result: Any) -> None:
    """An operation ran on a task; ``result`` is what it returned."""


@hookspec
def todo_complete(service: Any, task: Any, todo: dict[str, Any]) -> None:
    """A todo of a task was marked completed."""


@hookspec
def tick(service: Any) -> None:
    """Periodic housekeeping (called by `taskbox doctor` and long-running servers)."""


@hookspec
def sandbox_spec(service: Any, task: Any, spec: Any) -> None:
    """A task's container is about to be created from ``spec`` (a ContainerSpec); adjust it."""


@hookspec
def checkpoint_start(service: Any, task: Any, checkpoint: Any) -> None:
    """A checkpoint (a NewCheckpoint) is about to be taken; what is written to the workspace now is part of it."""


@hookspec
def checkpoint_failed(service: Any, task: Any, checkpoint: Any, error: str) -> None:
    """A checkpoint (a NewCheckpoint) could not be taken; ``error`` says why."""


@hookspec
def subtasks_changed(service: Any, task: Any, subtasks: list[dict[str, Any]]) -> None:
    """A parent ``task``'s sub-tasks changed (ultrawork); ``subtasks`` are their rows in plan order."""


@hookspec
def project_templates() -> dict[str, Any] | None:
    """Templates a plugin ships: ``{name: settings}``, settings in the shape of `.taskbox/config.toml` (a table or TOML text); a template saved under TASKBOX_HOME with the same name wins."""
