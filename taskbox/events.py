"""The event catalogue: every event taskbox records, its payload fields and what it means.

Events are the durable log of what happened to tasks: the registry's ``events`` table, one
row per event with a monotonic id (``INTEGER PRIMARY KEY AUTOINCREMENT``), so a reader that
saw event N asks for the ones after N and misses nothing — whichever process (CLI, MCP
server, web server) wrote them. ``docs/events.md`` is generated from this catalogue.

Every payload may also be an *aggregate* (fields `aggregated`, `count`, `first`, `last`,
`samples`, `window_seconds`, `note`): past a burst of one type
per task and window, further events are counted and recorded as one event with their count
(see `taskbox.registry`). Payload values pass the secret redactor before they are stored.

With ``TASKBOX_STRICT_EVENTS=1`` (the test suite sets it) recording an event type that is not
here, or a payload field its entry does not name, raises — so the catalogue cannot drift.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .models import Status


@dataclass(frozen=True)
class EventType:
    """One kind of event: its name, the fields its payload may carry, a one-line doc."""

    name: str
    fields: tuple[str, ...]
    doc: str
    open: bool = False  # the payload is a record of its own (e.g. a decision) whose fields may grow


AGGREGATE_FIELDS = ("aggregated", "count", "first", "last", "samples", "window_seconds", "note")

_STATUS_FIELDS = ("from", "reason")
_SAMPLE = ("task_id", "usage", "limit", "percent", "pids", "level", "from")

CATALOGUE: tuple[EventType, ...] = (
    # --- tasks -----------------------------------------------------------------------------------
    EventType("task.registering", ("branch",), "A new task's row is written; its workspace is being made."),
    EventType("task.created", ("branch", "lazy", "repo"), "A task's workspace, branch and (unless lazy) container exist."),
    EventType("task.undo_failed", ("error",), "A failed create could not be undone; `doctor --fix` retries."),
    EventType("task.resumed", ("container_kept",), "A create-or-resume call found the task and resumed it."),
    EventType("memory.restored", ("ref",), "The workspace had lost its memory; the files were brought back "
              "from the companion ref beside the task branch."),
    EventType("task.adopted", ("from",), "The doctor took an orphan workspace or container back into the registry."),
    EventType("task.refreshed", ("version",), "A restored registry row was brought up to date from its record."),
    EventType("task.killed_running", ("action", "running"),
              "Running commands or jobs were killed so the task could be stopped (``kill_running``)."),
    *(EventType(f"task.{s}", _STATUS_FIELDS, f"The task's status became {s}.")
      for s in Status if s is not Status.COMPLETED),
    EventType("task.completed", ("branch", "commit", "summary", "from", "reason"),
              "The task completed: its branch was fetched into the user's repository."),
    EventType("task.deleted", ("reason",), "The task's row was deleted from the registry (``reason``: why)."),
    EventType("task.exec", ("command", "exit_code", "duration_ms", "timed_out", "oom_killed", "logged",
                            "output_incomplete"),
              "A command ran in the task's sandbox (``logged: false``: nothing of it is recorded; "
              "``output_incomplete``: its output stream ended before it did, so output and exit code are unsure)."),
    EventType("exec.output", ("exec_id", "seq", "stream", "text", "command", "skipped", "done", "exit_code",
                              "bytes"),
              "Output of a command still running (any process's), every half second: ``text`` of ``stream`` "
              "(stdout or stderr; none on the first event, which names the ``command``), numbered by ``seq`` per "
              "``exec_id``; redacted and bounded (4 KiB a second per task, as stored; ``skipped``: bytes left out before this "
              "text). The last has ``done``, the ``exit_code`` (null if it did not end normally) and the output "
              "``bytes``. Commands shorter than half a second have none (see ``task.exec``). The log keeps a "
              "task's newest 2000 (older ones go when a command ends)."),
    EventType("exec.orphaned", ("session_id", "command"),
              "A command left running by a server that died was killed when another session took the task over."),
    EventType("exec.cancelled", ("command", "duration_ms"),
              "A command was cancelled by its client (or its connection dropped) and killed."),
    EventType("job.started", ("job_id", "command"), "A background job started in the task's sandbox."),
    EventType("job.killed", ("job_id", "processes"), "A background job was killed."),
    EventType("task.synced", ("commit",), "The workspace was committed and the branch fetched now."),
    EventType("task.oom_killed", ("command", "exit_code", "memory_limit"), "A command was killed for memory."),
    EventType("task.idle_paused", ("idle_minutes",), "An idle task was paused (container stopped)."),
    EventType("task.idle_pause_failed", ("error",), "Pausing an idle task failed."),
    # --- sessions, todos, decisions, tool calls ---------------------------------------------------
    EventType("session.attached", ("session_id", "agent", "model", "took_over"), "An agent session attached."),
    EventType("session.detached", ("session_id", "agent", "commit"), "An agent session detached."),
    EventType("port.published", ("port", "host_ip", "host_port", "warnings"),
              "A task's port was published on the host (loopback unless an address was named)."),
    EventType("port.unpublished", ("port",), "A task's published port was removed."),
    # --- project setup (.taskbox/config.toml) -------------------------------------------------------
    EventType("setup.copied", ("files",), "The project's ignored files were copied into the new workspace."),
    EventType("setup.command", ("index", "command", "exit_code"),
              "A project setup command ran once after create (its output is in the execution log)."),
    EventType("cache.warmed", ("cache", "packages", "exit_code", "bytes"),
              "A shared host cache was filled by `taskbox cache warm` from a throwaway container."),
    EventType("cache.seed_failed", ("cache", "error"),
              "Copying the shared npm cache into a new task container failed (npm starts with an empty cache)."),
    # --- agents inside the sandbox (`taskbox run`) ---------------------------------------------
    EventType("agent.started", ("session_id", "agent", "mode", "detachable"),
              "An agent CLI started in the task's sandbox (`mode`: prompt or interactive)."),
    EventType("agent.detached", ("session_id", "agent"),
              "The user detached from an interactive agent run; the agent keeps running (`taskbox attach`)."),
    EventType("agent.exited", ("session_id", "agent", "exit_code", "seconds"),
              "An agent run ended; its session detached (work committed, branch fetched)."),
    EventType("agent.egress_allowed", ("agent", "hosts"),
              "An agent's model API hosts were added to the task's egress allowlist."),
    EventType("todos.updated", ("changed", "total", "completed"),
              "Todos were added, changed or removed (``changed``: their ids; the list's ``total`` and ``completed``)."),
    EventType("todo.completed", ("todo",), "A todo was marked completed."),
    EventType("decision.logged", ("time", "agent", "context", "decision", "rationale", "alternatives"),
              "A design decision was recorded in decisions.md.", open=True),
    EventType("tool_call.unlogged", ("tool", "reason"), "A tool call could not be written to the task's memory."),
    # --- containers and workspaces ----------------------------------------------------------------
    EventType("container.created", ("container_id",), "The task's container was (re)created."),
    EventType("container.started", ("container_id",), "The task's stopped container was started."),
    EventType("container.healed", ("container_id", "was", "by"),
              "A command found the task's container stopped or gone behind taskbox's back (``was``); it was "
              "started or recreated (``by`` the operation) and the command ran."),
    EventType("workspace.restored", ("checkpoint_id", "by", "volume"),
              "A lost workspace was brought back from the task's newest checkpoint (branch and memory with it)."),
    EventType("workspace.reowned", ("files",),
              "Files of the workspace not owned by the sandbox user were given back to it (``doctor --fix``)."),
    EventType("container.state", ("state",), "The doctor found the container in another state than recorded."),
    EventType("container.lost", ("container_id",), "The task's container is gone."),
    EventType("container.oom_killed", (), "The doctor found the container killed for memory."),
    EventType("container.removed", ("image", "reason"), "A checkpoint's container image was removed."),
    EventType("workspace.mounted", ("image",), "The workspace's quota volume was mounted."),
    EventType("pool.claimed", ("slot", "container_id", "error"),
              "A new task's container is a warm pool slot it claimed; its workspace was bound into it."),
    EventType("pool.claim_failed", ("slot", "container_id", "error"),
              "A claimed pool slot could not serve (its container stopped, the bind failed): it was removed "
              "and the container made cold."),
    EventType("pool.rebound", ("container_id",),
              "A pooled task's workspace was bound into its slot again (after a reboot) before its container started."),
    EventType("pool.filled", ("profile", "made", "removed"),
              "The warm pool was topped up: slots made, and slots that could not serve removed."),
    EventType("pool.fill_failed", ("error",), "The housekeeping loop could not top the warm pool up."),
    EventType("pool.drained", ("removed",), "The warm pool's free slots were removed."),
    EventType("workspace.removed", ("volume",), "The task's workspace (and volume) were removed."),
    EventType("memory.recovered", ("reason", "corrupted_copy", "rebuilt_from"),
              "A damaged state.json was rebuilt from the logs."),
    EventType("memory.refused", ("error", "command", "status", "job_id"),
              "The task's memory folder could not be written (the agent broke or filled it)."),
    # --- checkpoints ------------------------------------------------------------------------------
    EventType("checkpoint.created", ("checkpoint_id", "name", "trigger", "files", "bytes_added", "duration_ms"),
              "A checkpoint was taken."),
    EventType("checkpoint.failed", ("checkpoint_id", "error"), "Taking a checkpoint failed; nothing was kept."),
    EventType("checkpoint.auto_failed", ("trigger", "reason", "error"),
              "An automatic checkpoint could not be taken; the operation ran anyway."),
    EventType("checkpoint.restored", ("success", "task_id", "checkpoint_id", "name", "files_changed",
                                      "files_restored", "files_removed", "container_restored", "forced",
                                      "duration_ms"), "The workspace was restored to a checkpoint.", open=True),
    EventType("checkpoint.restore_finished", ("checkpoint_id",), "An interrupted restore was finished."),
    EventType("checkpoint.journal_unreadable", ("kept_as",), "A restore journal could not be read; kept aside."),
    EventType("checkpoint.deleted", ("checkpoint_id",), "A checkpoint was deleted."),
    EventType("checkpoint.pruned", ("checkpoints",), "Checkpoints were pruned by the retention settings."),
    EventType("checkpoint.exported", ("checkpoint_id", "path"), "A checkpoint was exported to an archive."),
    EventType("checkpoint.imported", ("checkpoint_id", "path"), "A checkpoint archive was imported."),
    EventType("checkpoint.gc", ("pruned", "stores_removed", "bytes_before", "bytes_after"),
              "Checkpoint retention ran for every task.", open=True),
    EventType("checkpoint.unpaused", ("reason",), "A container frozen for a checkpoint was unfrozen."),
    EventType("checkpoint.unpause_failed", ("reason",), "A container frozen for a checkpoint could not be unfrozen."),
    # --- policy, egress, sandbox -----------------------------------------------------------------
    EventType("policy.denied", ("tool", "rule", "subject", "reason"), "The project policy refused an operation."),
    EventType("policy.invalid", ("error",), "The project policy file is invalid: everything is refused."),
    EventType("policy.checkpoint_failed", ("rule", "error"),
              "A policy rule asked for a checkpoint first and it failed: the operation was refused."),
    EventType("egress.denied", ("host", "port", "method", "url", "rule"), "The egress proxy refused a request."),
    EventType("sandbox.weakened", ("warnings",), "The task's sandbox is weaker than the default profile."),
    EventType("safety.bookkeeping_failed", ("error",), "Post-command safety bookkeeping failed."),
    EventType("risk.config_invalid", ("error",), "The project's risk.json is invalid; defaults apply."),
    # --- resources ---------------------------------------------------------------------------------
    EventType("resource.warning", _SAMPLE, "Memory use crossed the warning level."),
    EventType("resource.critical", _SAMPLE, "Memory use crossed the critical level (a checkpoint is taken)."),
    EventType("resource.emergency", _SAMPLE, "Memory use crossed the emergency level (checkpoint, then pause)."),
    EventType("resource.recovered", _SAMPLE, "Memory use fell back below a level."),
    EventType("resource.paused", _SAMPLE, "The task was paused for memory pressure."),
    EventType("resource.pause_failed", ("error",), "Pausing for memory pressure failed."),
    EventType("resource.checkpoint_failed", ("trigger", "error"), "A pressure checkpoint failed."),
    EventType("resource.monitor_error", ("error",), "A housekeeping round failed (the loop keeps going)."),
    # --- ultrawork: sub-tasks and merges (recorded on the parent task) -------------------------------
    EventType("subtasks.created", ("subtasks", "parallel"), "A plan's sub-tasks were recorded for the parent."),
    EventType("ultrawork.started", ("parallel", "merge", "resume", "pid"), "An ultrawork run started (or resumed)."),
    EventType("ultrawork.finished", ("counts", "duration_s", "interrupted"),
              "An ultrawork run ended: nothing more can start or merge (or it was stopped)."),
    EventType("ultrawork.recovered", ("subtask", "task_id", "action"),
              "An interrupted run was reconciled: a sub-task left running was reset (its child task aborted)."),
    EventType("subtask.started", ("subtask", "task_id", "branch", "base"),
              "A sub-task's child task was created on a branch forked from the parent's."),
    EventType("subtask.succeeded", ("subtask", "task_id", "exit_code", "duration_ms", "tip"),
              "A sub-task's command exited 0; its branch was fetched."),
    EventType("subtask.failed", ("subtask", "task_id", "exit_code", "duration_ms", "error"),
              "A sub-task's command failed (its dependents are blocked)."),
    EventType("subtask.timed_out", ("subtask", "task_id", "timeout", "duration_ms"),
              "A sub-task's command ran out of time (its dependents are blocked)."),
    EventType("subtask.blocked", ("subtask", "by"), "A sub-task cannot run: a dependency failed, timed out or conflicted."),
    EventType("subtask.merged", ("subtask", "task_id", "commit", "already"),
              "A sub-task's branch was merged into the parent's (one --no-ff commit)."),
    EventType("subtask.conflict", ("subtask", "task_id", "files"),
              "A sub-task's merge conflicts; the parent is unchanged and its dependents are blocked."),
    EventType("task.merged", ("into", "commit", "status", "files", "squash", "tip"),
              "A task's branch was merged (`merge`) into another task or a branch, or conflicted."),
    # --- doctor -------------------------------------------------------------------------------------
    EventType("doctor.run", ("fix", "findings"), "The doctor ran (with ``fix``: repairs were made)."),
)

EVENTS: dict[str, EventType] = {e.name: e for e in CATALOGUE}


def strict() -> bool:
    return os.environ.get("TASKBOX_STRICT_EVENTS") == "1"


def check(name: str, payload: dict[str, Any]) -> None:
    """Raise ValueError for an event type not in the catalogue, or a payload field its entry does not name."""
    kind = EVENTS.get(name)
    if kind is None:
        raise ValueError(f"event type {name!r} is not in taskbox.events.CATALOGUE")
    if kind.open:
        return
    extra = set(payload) - set(kind.fields) - set(AGGREGATE_FIELDS)
    if extra:
        raise ValueError(f"event {name!r} carries fields {sorted(extra)} its catalogue entry does not name")


def reference() -> str:
    """The Markdown event reference in docs/events.md."""
    out = ["| event | payload fields | meaning |", "|---|---|---|"]
    for e in CATALOGUE:
        fields = ", ".join(f"`{f}`" for f in e.fields) or "—"
        doc = e.doc.replace("``", "`")
        out.append(f"| `{e.name}` | {fields}{' …' if e.open else ''} | {doc} |")
    return "\n".join(out) + "\n"
