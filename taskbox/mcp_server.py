"""The taskbox MCP server: the task tools for agents, over stdio or streamable HTTP.

A thin adapter over :class:`~taskbox.service.TaskService` (STYLE rule 1). Each tool only
translates: it maps its arguments to one service call, runs that call on a worker thread
(the service is synchronous and may wait seconds on Docker or git; the event loop must keep
serving other calls meanwhile), and returns the result as structured JSON. Every
:class:`~taskbox.errors.TaskboxError` becomes an MCP tool error (``isError``) carrying its
message and code; anything else becomes a tool error too, so bad input never stops the server.

Tool calls on a task go through :meth:`TaskService.run_tool`, which logs the call in the
task's memory; the service operation it runs fires the hooks (as for every other adapter).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict

from . import __version__
from .agents import PRESETS
from .errors import CommandTimeout, InvalidInput, TaskboxError
from .mcp_instructions import INSTRUCTIONS
from .results import plain
from .sandbox import ExecControl

if TYPE_CHECKING:
    from .service import TaskService

log = logging.getLogger("taskbox.mcp")
F = TypeVar("F", bound=Callable[..., Any])

OUTPUT_LIMIT = 100_000  # bytes of stdout and of stderr execute_in_task returns; more is cut
PROGRESS_INTERVAL = 2.0  # seconds between progress notifications of a running command
CANCEL_GRACE = 30.0  # seconds a cancelled command is given to be killed and logged
DIFF_LIMIT = 200_000  # characters of task_diff output
WORKER_THREADS = 32  # service calls running at once; further calls queue

# Every tool returns a CallToolResult whose structured content is a JSON object; the
# annotation publishes that as the tool's output schema.
Result = Annotated[CallToolResult, dict[str, Any]]
TaskId = Annotated[str, Field(description="The task's id, as returned by create_task_sandbox or list_active_tasks.")]
WorkspacePath = Annotated[str, Field(description="Path relative to the task workspace (or absolute under /workspace).")]


class ResourceLimits(TypedDict, total=False):
    """Resource limits of a task's container and workspace."""

    memory: Annotated[str, Field(description="Memory limit such as 512m or 2g (minimum 64m).")]
    cpu: Annotated[float, Field(description="CPU limit in cores, e.g. 1.5 (minimum 0.1).")]
    disk: Annotated[str, Field(description="Disk quota of the task's workspace such as 10g (minimum 64m).")]
    inodes: Annotated[int, Field(description="Inode quota (most files and directories) of the workspace.")]


class TodoChange(TypedDict, total=False):
    """One todo to add or change; todos are matched by id."""

    id: Annotated[str, Field(description="Id of an existing todo to change; leave out to add a new one.")]
    text: Annotated[str, Field(description="What to do (required for a new todo).")]
    status: Literal["pending", "in_progress", "completed", "cancelled"]
    major: Annotated[bool, Field(description="A major milestone (completing one can trigger a checkpoint).")]
    deleted: Annotated[bool, Field(description="True removes the todo with this id.")]


class SubtaskInput(TypedDict, total=False):
    """One sub-task of a plan (as a [[subtask]] entry of an ultrawork plan file)."""

    id: Annotated[str, Field(description="Lowercase letters, digits and dashes; unique in the plan.")]
    title: Annotated[str, Field(description="What the sub-task does, in a few words.")]
    command: Annotated[str, Field(description="The shell command run in the sub-task's own sandbox (agent shell); "
                                              "exit 0 means success.")]
    depends_on: Annotated[list[str], Field(description="Ids of sub-tasks whose merged work this one needs.")]
    timeout: Annotated[str, Field(description="Time limit such as 90s, 30m or 2h.")]


READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)


def _json(data: Any) -> Any:
    """``data`` as plain JSON values (paths, enums and the like become strings)."""
    return json.loads(json.dumps(data, default=plain))


def ok(data: dict[str, Any]) -> CallToolResult:
    clean = _json(data)
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(clean, ensure_ascii=False))],
                          structured_content=clean)


def tool_error(message: str, details: dict[str, Any]) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], structured_content=_json(details),
                          is_error=True)


# CLI hints in error messages, as the model over MCP should read them: it has tools, not a
# shell (and the guard refuses its host shell while a task is attached).
_TOOL_HINTS = {"list-tasks": "the list_active_tasks tool", "checkpoint list": "get_task_status"}
_CLI_HINT = re.compile(r"(see|run) `taskbox ([a-z-]+(?: [a-z-]+)?)([^`]*)`")


def mcp_message(message: str) -> str:
    """``message`` with its CLI hints rewritten for an MCP client: the tool to call, or what to
    ask the user to run (maintenance such as `taskbox doctor --fix` is the user's)."""

    def rewrite(m: re.Match[str]) -> str:
        for command, tool in _TOOL_HINTS.items():
            if m.group(2) == command or m.group(2).startswith(command + " "):
                return f"{m.group(1)} {tool}"
        return f"ask the user to run `taskbox {m.group(2)}{m.group(3)}`"

    return _CLI_HINT.sub(rewrite, message)


def render_error(exc: BaseException) -> CallToolResult:
    """An exception as an MCP tool error: its message for the model, its details as data."""
    if isinstance(exc, TaskboxError):
        exc.message = mcp_message(exc.message)
    if isinstance(exc, CommandTimeout):
        partial = exc.details.get("result") or {}
        text = exc.message
        for stream in ("stdout", "stderr"):
            if partial.get(stream):
                text += f"\n--- {stream} before the timeout (last 2000 characters) ---\n{partial[stream][-2000:]}"
        return tool_error(text, exc.to_dict())
    if isinstance(exc, TaskboxError):
        return tool_error(exc.message, exc.to_dict())
    log.exception("unexpected error in an MCP tool", exc_info=exc)
    message = f"internal error in taskbox ({type(exc).__name__}: {exc}); the server keeps running"
    return tool_error(message, {"error": "internal_error", "message": message})


class _Adapter:
    """State the tools share: the service, the sessions attached through this server, a thread pool."""

    def __init__(self, service: TaskService | None, on_open: Callable[[TaskService], None] | None = None) -> None:
        self._service = service
        self._on_open = on_open
        self._service_lock = threading.Lock()
        self.limiter = anyio.CapacityLimiter(WORKER_THREADS)
        # (connection, task) -> session attached through this server, so later calls are
        # logged under it and renew its lease. stdio has one connection: the key is None.
        self.sessions: dict[tuple[str | None, str], str] = {}

    @property
    def service(self) -> TaskService:
        """The service, opened on first use: start-up stays fast, and a bad TASKBOX_HOME is
        reported as a tool error."""
        with self._service_lock:
            if self._service is None:
                from .service import TaskService

                self._service = TaskService()
                if self._on_open is not None:
                    self._on_open(self._service)
            return self._service

    @staticmethod
    def connection(ctx: Context | None) -> str | None:
        """Who is calling: ``stdio`` (one client per server process), the client's
        ``mcp-session-id`` over HTTP, or None for a stateless HTTP request that carries none."""
        try:
            headers = ctx.headers if ctx is not None else None
        except (AttributeError, LookupError, ValueError):
            headers = None
        if headers is None:
            return "stdio"
        return headers.get("mcp-session-id")

    def session(self, connection: str | None, task_id: str) -> str | None:
        """The agent session a call belongs to (run on a worker thread: it may read the registry).

        The session attached through this connection; for a caller we cannot tell apart
        (stateless HTTP), the task's only attached session if it has exactly one.
        """
        if connection is not None:
            return self.sessions.get((connection, task_id))
        attached = self.service.registry.sessions(task_id, open_only=True)
        return attached[0].id if len(attached) == 1 else None

    async def run(self, fn: Callable[[], dict[str, Any]]) -> CallToolResult:
        """Run a blocking service call on a worker thread; errors become tool errors."""
        try:
            return ok(await anyio.to_thread.run_sync(fn, limiter=self.limiter))
        except Exception as exc:  # every failure is the model's to read, never the server's end
            return render_error(exc)

    async def command(self, ctx: Context, task_id: str, tool: str, args: dict[str, Any],
                      fn: Callable[[str | None, ExecControl], dict[str, Any]], *, log: bool) -> CallToolResult:
        """A command on a task (``fn(session, control)``) that reports progress and can be cancelled.

        While it runs, a progress notification carrying its newest output lines goes out
        every PROGRESS_INTERVAL seconds (when the client sent a progress token). When the
        client cancels the call, or its connection drops, the command's processes are killed
        in the container and the command is logged as cancelled before the handler ends.
        """
        control = ExecControl()
        connection = self.connection(ctx)

        def call() -> dict[str, Any]:
            try:
                session = self.session(connection, task_id)
                return self.service.run_tool(task_id, tool, args, lambda: fn(session, control),
                                             session_id=session, log=log)
            finally:
                control.done.set()

        async def report() -> None:
            while True:
                await anyio.sleep(PROGRESS_INTERVAL)
                elapsed = time.monotonic() - control.started
                tail = await anyio.to_thread.run_sync(control.tail)
                message = f"running for {elapsed:.0f}s, {control.output_bytes} bytes of output"
                try:
                    await ctx.report_progress(round(elapsed, 1), None, f"{message}\n{tail}" if tail else message)
                except Exception:  # noqa: BLE001 - a client that cannot take progress still gets the result
                    return

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(report)
                try:
                    result = ok(await anyio.to_thread.run_sync(call, limiter=self.limiter, abandon_on_cancel=True))
                except Exception as exc:  # every failure is the model's to read
                    result = render_error(exc)
                tg.cancel_scope.cancel()
            return result
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(control.cancel)
                await anyio.to_thread.run_sync(control.done.wait, CANCEL_GRACE)
            raise

    async def task_tool(self, ctx: Context | None, task_id: str, tool: str, args: dict[str, Any],
                        fn: Callable[[str | None], dict[str, Any]], *, log: bool = True) -> CallToolResult:
        """A tool call on one task: ``fn(session_id)`` with a memory record (see TaskService.run_tool)."""
        connection = self.connection(ctx)

        def call() -> dict[str, Any]:
            session = self.session(connection, task_id)
            return self.service.run_tool(task_id, tool, args, lambda: fn(session), session_id=session, log=log)

        return await self.run(call)


def _cut(text: str, limit: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= limit else (text[:limit], True)


def create_server(service: TaskService | None = None,
                  on_open: Callable[[TaskService], None] | None = None) -> MCPServer:
    """The taskbox MCP server with every tool registered, over ``service`` (default: TASKBOX_HOME,
    opened on the first tool call, when ``on_open`` is called with it)."""
    ad = _Adapter(service, on_open)
    server: MCPServer = MCPServer("taskbox", title="taskbox", instructions=INSTRUCTIONS, version=__version__)

    def tool(annotations: ToolAnnotations) -> Callable[[F], F]:
        """Register a tool; its docstring, dedented, is the description the model reads."""

        def register(fn: F) -> F:
            server.add_tool(fn, description=inspect.cleandoc(fn.__doc__ or ""), annotations=annotations)
            return fn

        return register

    # --- lifecycle ---------------------------------------------------------------------------

    @tool(WRITES)
    async def create_task_sandbox(
        *,
        task_id: Annotated[str | None, Field(description="Id for the new task (lowercase, digits, dashes); "
                                                         "default: a slug of the description.")] = None,
        task_description: Annotated[str, Field(description="What the task is about; names the branch.")],
        workspace_path: Annotated[str, Field(description="Absolute path of the user's git repository the "
                                                         "task works on.")],
        agent_name: Annotated[str, Field(description="Your agent name, e.g. opencode or claude-code.")] = "agent",
        agent_model: Annotated[str, Field(description="Your model, e.g. claude-opus-4.5.")] = "unknown",
        resource_limits: Annotated[ResourceLimits | None, Field(description="Container and workspace limits; "
                                                                            "default from settings.")] = None,
        lock_mode: Annotated[Literal["exclusive", "collaborative"], Field(
            description="exclusive: one agent at a time; collaborative: several.")] = "exclusive",
        resume_if_exists: Annotated[bool, Field(description="Resume the task with this id, or the unfinished "
                                                            "task with the same description, instead of "
                                                            "creating a new one.")] = False,
        memory_on_branch: Annotated[bool | None, Field(
            description="Commit .task-memory/ and Plan.md on the task branch too (default: the "
                        "memory_on_branch setting; normally they travel on a companion ref "
                        "and the branch holds the work only).")] = None,
        template: Annotated[str | None, Field(description="A project setup template to apply (`taskbox template "
                                                          "list`): copied files, setup commands, image, caches.")
                            ] = None,
        run_agent: Annotated[str | None, Field(
            description=f"Make the task ready for run_agent_in_task with this agent ({', '.join(PRESETS)}): "
                        "the agents image and the allowlist network with its model API hosts.")] = None,
    ) -> Result:
        """Start a new coding task: its own Docker sandbox, git branch and memory (or resume one).

        Use this first, once per piece of work, before changing any code. Then call
        attach_agent_to_task. Returns task_id, container_id, branch, workspace_path (the task's
        own checkout, where your changes appear), status 'created' or 'resumed', and
        existing_container.
        """
        limits = resource_limits or {}

        def call() -> dict[str, Any]:
            options: dict[str, Any] = dict(agent=agent_name, model=agent_model, lock_mode=lock_mode,
                                           memory=limits.get("memory"), cpus=limits.get("cpu"),
                                           disk=limits.get("disk"), inodes=limits.get("inodes"),
                                           memory_on_branch=memory_on_branch)
            if run_agent:
                options = ad.service.agent_task_options(run_agent, options)
            res = ad.service.create_or_resume_task(workspace_path, task_description, task_id=task_id,
                                                   resume_if_exists=resume_if_exists, template=template,
                                                   **options)
            ad.service.record_tool_call(res["task_id"], "create_task_sandbox",
                                 {"task_description": task_description, "workspace_path": workspace_path,
                                  "resume_if_exists": resume_if_exists, "outcome": res.status})
            return res.to_dict()

        return await ad.run(call)

    @tool(WRITES)
    async def attach_agent_to_task(
        task_id: TaskId,
        agent_name: Annotated[str, Field(description="Your agent name, e.g. opencode.")],
        agent_model: Annotated[str, Field(description="Your model name.")],
        session_id: Annotated[str, Field(description="A stable id for this agent session (letters, digits, "
                                                     ". _ : -); reuse it to detach.")],
        ctx: Context,
    ) -> Result:
        """Attach yourself to a task and get its saved state back: todos, recent conversation, commands.

        Call this after create_task_sandbox, and whenever you pick up an existing task (also one
        another agent worked on). An exclusive task held by another live agent is refused with
        who holds it. Starts the sandbox if it was stopped.
        """
        args = {"agent_name": agent_name, "agent_model": agent_model, "session_id": session_id}

        def call() -> dict[str, Any]:
            return ad.service.attach(task_id, agent_name, agent_model, session_id).to_dict()

        result = await ad.run(lambda: ad.service.run_tool(task_id, "attach_agent_to_task", args, call,
                                                   session_id=session_id))
        connection = ad.connection(ctx)
        if not result.is_error and connection is not None:
            ad.sessions[(connection, task_id)] = session_id
        return result

    @tool(WRITES)
    async def detach_agent_from_task(
        task_id: TaskId,
        session_id: Annotated[str, Field(description="The session id you attached with.")],
        ctx: Context,
        save_checkpoint: Annotated[bool, Field(description="Take a checkpoint before detaching.")] = False,
        checkpoint_name: Annotated[str | None, Field(description="Name of that checkpoint.")] = None,
        kill_running: Annotated[bool, Field(description="Kill commands and background jobs still running "
                                                        "in the task instead of refusing to detach.")] = False,
    ) -> Result:
        """Stop working on a task for now: your work is committed to the task branch and fetched
        into the user's repository; the sandbox is stopped (files kept) when nobody else is attached.

        Use this when you pause or hand the task to another agent; use complete_task when it is done.
        """
        args = {"session_id": session_id, "save_checkpoint": save_checkpoint, "checkpoint_name": checkpoint_name}

        def call(_session: str | None) -> dict[str, Any]:
            return {"success": True, **ad.service.detach(task_id, session_id, save_checkpoint=save_checkpoint,
                                                         checkpoint_name=checkpoint_name,
                                                         kill_running=kill_running).to_dict()}

        result = await ad.task_tool(ctx, task_id, "detach_agent_from_task", args, call)
        if not result.is_error:
            ad.sessions.pop((ad.connection(ctx), task_id), None)
        return result

    @tool(DESTRUCTIVE)
    async def complete_task(
        task_id: TaskId,
        ctx: Context,
        cleanup_after: Annotated[bool, Field(description="Remove the container now instead of after the "
                                                         "retention period.")] = False,
        create_final_checkpoint: Annotated[bool, Field(description="Take a final (pinned) checkpoint of the "
                                                                   "finished work; false skips it.")] = True,
        summary: Annotated[str, Field(description="Final summary written to Plan.md.")] = "",
        kill_running: Annotated[bool, Field(description="Kill commands and background jobs still running "
                                                        "in the task instead of refusing to complete.")] = False,
    ) -> Result:
        """Finish a task: final checkpoint, final commit, branch fetched into the user's repository,
        sandbox stopped. Use only when the work is done and verified; the task cannot be resumed.
        Returns success, branch, container_removed and final_checkpoint_id.
        """
        args = {"cleanup_after": cleanup_after, "create_final_checkpoint": create_final_checkpoint,
                "summary": summary}

        def call(_session: str | None) -> dict[str, Any]:
            return {"success": True, **ad.service.complete(task_id, summary, cleanup=cleanup_after,
                                                           final_checkpoint=create_final_checkpoint,
                                                           kill_running=kill_running).to_dict()}

        result = await ad.task_tool(ctx, task_id, "complete_task", args, call)
        if not result.is_error:
            for key in [k for k in ad.sessions if k[1] == task_id]:
                del ad.sessions[key]
        return result

    @tool(READ_ONLY)
    async def list_active_tasks(
        status: Annotated[Literal["pending", "active", "paused", "completed", "failed", "aborted", "archived",
                                  "all"] | None,
                          Field(description="Only tasks with this status; default: pending, active and "
                                            "paused; 'all' for every task.")] = None,
    ) -> Result:
        """List tasks with task_id, title, branch, status, container_id, current_agent, created_at
        and last_active. Use it to find a task to resume instead of creating a duplicate."""

        def call() -> dict[str, Any]:
            statuses: list[str] | None = (None if status == "all" else [status] if status
                                          else ["pending", "active", "paused"])
            rows = []
            for t in ad.service.list_tasks(statuses):
                agents = ad.service.current_agents(t.id)
                rows.append({"task_id": t.id, "title": t.title, "branch": t.branch, "status": str(t.status),
                             "container_id": t.container_id, "current_agent": agents[0] if agents else None,
                             "current_agents": agents, "created_at": t.created_at, "last_active": t.last_active,
                             "workspace_path": t.workspace_path, "repo_path": t.repo_path})
            return {"tasks": rows, "count": len(rows)}

        return await ad.run(call)

    @tool(READ_ONLY)
    async def get_task_status(task_id: TaskId, ctx: Context) -> Result:
        """A task's record and live state: status, branch, container, attached agents, todos,
        metrics, current checkpoint, the last commands run, background jobs (jobs) and the
        workspace's disk and inode use against its quota (workspace_usage). Use it to orient yourself."""
        return await ad.task_tool(ctx, task_id, "get_task_status", {}, lambda _s: ad.service.status(task_id))

    # --- running commands --------------------------------------------------------------------

    @tool(WRITES)
    async def execute_in_task(
        task_id: TaskId,
        command: Annotated[str, Field(description="Shell command, run with sh -c as a non-root user.")],
        ctx: Context,
        workdir: Annotated[str | None, Field(description="Directory inside the workspace to run in "
                                                         "(default: the workspace root).")] = None,
        timeout: Annotated[float | None, Field(description="Seconds before the command is killed "
                                                           "(default 600).", gt=0, le=86400)] = None,
        log_execution: Annotated[bool, Field(description="Record the command and its output in the "
                                                         "task's memory; false records nothing of them "
                                                         "anywhere.")] = True,
        secrets: Annotated[list[str] | None, Field(description="Names of secrets the user set up for taskbox, "
                                                              "put into this command's environment under "
                                                              "the same names; their values never appear "
                                                              "in output or logs.")] = None,
        background: Annotated[bool, Field(description="Start the command as a background job and return its "
                                                      "job_id at once (dev servers, long test runs); read it "
                                                      "with read_task_job_output, wait_for_task_job and "
                                                      "kill_task_job. No timeout unless one is given.")] = False,
    ) -> Result:
        """Run a shell command in the task's sandbox (builds, tests, git, package installs, scripts).

        Use this instead of any host shell: the sandbox has the task's checkout at /workspace and no
        network unless the task allows it. Returns stdout, stderr, exit_code, duration_ms and
        truncated (true when output was cut at 100 kB per stream). A command that runs past its
        timeout is killed and reported as an error with its partial output; while it runs, progress
        notifications carry its newest output, and cancelling the call kills it. Refer to a secret
        as $NAME in the command; its value shows as [REDACTED:NAME] in the output. With
        background=true it returns job_id at once and keeps running in the sandbox.
        """
        args = {"command": command, "workdir": workdir, "timeout": timeout, "log_execution": log_execution,
                "secrets": secrets, "background": background}
        if background:
            if secrets:
                return render_error(InvalidInput("secrets cannot be given to a background job; run the command "
                                                 "in the foreground"))
            return await ad.task_tool(ctx, task_id, "execute_in_task", args,
                                      lambda session: ad.service.start_job(task_id, command, workdir=workdir,
                                                                           timeout=timeout, session_id=session,
                                                                           log=log_execution),
                                      log=log_execution)

        def call(session: str | None, control: ExecControl) -> dict[str, Any]:
            res = ad.service.exec(task_id, command, workdir=workdir, timeout=timeout, session_id=session,
                                  log=log_execution, output_limit=OUTPUT_LIMIT, secrets=secrets, control=control)
            return res.to_dict()

        return await ad.command(ctx, task_id, "execute_in_task", args, call, log=log_execution)

    @tool(READ_ONLY)
    async def read_task_job_output(
        task_id: TaskId,
        job_id: Annotated[str, Field(description="The job_id execute_in_task(background=true) returned.")],
        ctx: Context,
        offset: Annotated[int, Field(description="Byte offset to read from: 0, or the next_offset of the "
                                                 "previous read.", ge=0)] = 0,
        max_bytes: Annotated[int, Field(description="Most bytes to return.", ge=1, le=1_048_576)] = 65_536,
    ) -> Result:
        """Read a background job's output (stdout and stderr merged) from a byte offset, with its
        status (running, exited, killed) and exit_code. Pass next_offset back to read on; more
        says output beyond this read exists already."""
        return await ad.task_tool(ctx, task_id, "read_task_job_output",
                                  {"job_id": job_id, "offset": offset, "max_bytes": max_bytes},
                                  lambda _s: ad.service.job_output(task_id, job_id, offset, max_bytes))

    @tool(READ_ONLY)
    async def wait_for_task_job(
        task_id: TaskId,
        job_id: Annotated[str, Field(description="The job's id.")],
        ctx: Context,
        timeout: Annotated[float, Field(description="Most seconds to wait (up to 600).", ge=0, le=600)] = 30,
    ) -> Result:
        """Wait until a background job ends, or the timeout passes. Returns its status, exit_code,
        finished (false when still running) and the last 4 kB of its output."""
        stop = threading.Event()
        try:
            return await ad.task_tool(ctx, task_id, "wait_for_task_job", {"job_id": job_id, "timeout": timeout},
                                      lambda _s: ad.service.wait_job(task_id, job_id, timeout, stop))
        finally:
            stop.set()

    @tool(DESTRUCTIVE)
    async def kill_task_job(
        task_id: TaskId,
        job_id: Annotated[str, Field(description="The job's id.")],
        ctx: Context,
    ) -> Result:
        """Kill a background job and every process it started. Returns its final status."""
        return await ad.task_tool(ctx, task_id, "kill_task_job", {"job_id": job_id},
                                  lambda _s: ad.service.kill_job(task_id, job_id))

    # --- agents inside the sandbox ---------------------------------------------------------------

    @tool(WRITES)
    async def run_agent_in_task(
        task_id: TaskId,
        agent: Annotated[str, Field(description=f"The agent CLI to run: {', '.join(PRESETS)}.")],
        prompt: Annotated[str, Field(description="What the agent is to do; it runs non-interactively "
                                                 "(print mode) until it is done.")],
        ctx: Context,
        model: Annotated[str | None, Field(description="The model the agent uses, where it takes one.")] = None,
        secrets: Annotated[list[str] | None, Field(description="Names of secrets the user set up for taskbox "
                                                              "(its API key, e.g. ANTHROPIC_API_KEY), put "
                                                              "into the agent's environment only.")] = None,
        allow_domains: Annotated[list[str] | None, Field(description="More hosts the agent may reach besides "
                                                                    "its model API hosts.")] = None,
        base_url: Annotated[str | None, Field(description="A custom model endpoint for the agent.")] = None,
        args: Annotated[list[str] | None, Field(description="More arguments for the agent CLI.")] = None,
        timeout: Annotated[float | None, Field(description="Seconds before the run is stopped (default: the "
                                                           "run_timeout setting).", gt=0, le=86400)] = None,
        checkpoint: Annotated[bool | None, Field(description="Take a checkpoint when the agent ends (default: "
                                                             "the run_checkpoint setting).")] = None,
    ) -> Result:
        """Run an agent CLI (OpenCode, Claude Code, Codex, or a shell) inside the task's sandbox on a prompt.

        The run is an agent session of its own (in an exclusive task nobody else may be attached:
        create the task with run_agent set, or detach first); every edit and command of the agent
        happens in the sandbox. While it runs, progress notifications carry its newest output;
        cancelling the call stops it. When it ends its work is committed and the branch fetched.
        Returns exit_code, seconds, branch, commit, checkpoint_id and last_line (its output is in
        the task's executions, secret values redacted).
        """
        call_args = {"agent": agent, "prompt": prompt, "model": model, "secrets": secrets,
                     "allow_domains": allow_domains, "base_url": base_url, "args": args, "timeout": timeout,
                     "checkpoint": checkpoint}

        def call(_session: str | None, control: ExecControl) -> dict[str, Any]:
            return ad.service.run_agent(task_id, agent, prompt=prompt, args=args, model=model, secrets=secrets,
                                        allow_domains=allow_domains, base_url=base_url, timeout=timeout,
                                        checkpoint=checkpoint, control=control)

        return await ad.command(ctx, task_id, "run_agent_in_task", call_args, call, log=True)

    # --- files -------------------------------------------------------------------------------

    @tool(READ_ONLY)
    async def read_task_file(
        task_id: TaskId,
        path: WorkspacePath,
        ctx: Context,
        start_line: Annotated[int, Field(description="First line to return, from 1.", ge=1)] = 1,
        max_lines: Annotated[int | None, Field(description="Most lines to return (default: all, up to "
                                                           "256 kB).", ge=1)] = None,
    ) -> Result:
        """Read a text file of the task workspace, whole or a range of lines. Use it before editing
        a file. Returns content, start_line, end_line, total_lines and truncated."""
        args = {"path": path, "start_line": start_line, "max_lines": max_lines}
        return await ad.task_tool(ctx, task_id, "read_task_file", args,
                                  lambda _s: ad.service.read_text(task_id, path, start_line, max_lines))

    @tool(WRITES)
    async def write_task_file(
        task_id: TaskId,
        path: WorkspacePath,
        content: Annotated[str, Field(description="The whole new content of the file (UTF-8 text).")],
        ctx: Context,
    ) -> Result:
        """Create a file in the task workspace or replace its whole content (parent directories are
        created). For a small change to an existing file prefer edit_task_file."""
        data = content.encode()
        args = {"path": path, "content": content}
        return await ad.task_tool(ctx, task_id, "write_task_file", args,
                                  lambda _s: {"path": ad.service.write_file(task_id, path, data), "size": len(data)})

    @tool(WRITES)
    async def edit_task_file(
        task_id: TaskId,
        path: WorkspacePath,
        old_text: Annotated[str, Field(description="Exact text to replace, whitespace included; must occur "
                                                   "once unless replace_all.")],
        new_text: Annotated[str, Field(description="Text to put in its place.")],
        ctx: Context,
        replace_all: Annotated[bool, Field(description="Replace every occurrence.")] = False,
    ) -> Result:
        """Change part of a text file in the task workspace by search and replace. Read the file
        first and copy old_text exactly; include enough lines to make it unique."""
        args = {"path": path, "old_text": old_text, "new_text": new_text, "replace_all": replace_all}
        return await ad.task_tool(ctx, task_id, "edit_task_file", args,
                                  lambda _s: ad.service.edit_file(task_id, path, old_text, new_text, replace_all=replace_all))

    @tool(READ_ONLY)
    async def list_task_files(
        task_id: TaskId,
        ctx: Context,
        path: Annotated[str, Field(description="Directory relative to the workspace root.")] = ".",
        recursive: Annotated[bool, Field(description="Descend into subdirectories.")] = False,
    ) -> Result:
        """List files and directories in the task workspace (.git left out) with type and size.
        Use it to explore the project layout."""
        args = {"path": path, "recursive": recursive}
        return await ad.task_tool(ctx, task_id, "list_task_files", args,
                                  lambda _s: ad.service.list_files(task_id, path, recursive=recursive))

    @tool(DESTRUCTIVE)
    async def delete_task_file(task_id: TaskId, path: WorkspacePath, ctx: Context) -> Result:
        """Delete a file, link or directory (recursively) in the task workspace. .git and
        .task-memory cannot be deleted."""
        return await ad.task_tool(ctx, task_id, "delete_task_file", {"path": path},
                                  lambda _s: ad.service.delete_file(task_id, path))

    @tool(READ_ONLY)
    async def task_diff(
        task_id: TaskId,
        ctx: Context,
        stat: Annotated[bool, Field(description="Only a summary of changed files.")] = False,
    ) -> Result:
        """The task's changes (committed and not, new files included) against the commit it
        started from, as a unified diff. Use it to review your work before completing."""

        def call(_session: str | None) -> dict[str, Any]:
            text, truncated = _cut(ad.service.diff(task_id, stat), DIFF_LIMIT)
            return {"task_id": task_id, "diff": text, "truncated": truncated}

        return await ad.task_tool(ctx, task_id, "task_diff", {"stat": stat}, call)

    # --- ultrawork: parallel sub-tasks merged back -------------------------------------------

    @tool(WRITES)
    async def create_subtasks(
        task_id: TaskId,
        subtasks: Annotated[list[SubtaskInput], Field(description="The plan's sub-tasks.", min_length=1)],
        ctx: Context,
        parallel: Annotated[int | None, Field(description="Sub-tasks running at once (default from settings).",
                                              ge=1, le=64)] = None,
        timeout: Annotated[str | None, Field(description="Default time limit of each sub-task, e.g. 30m.")] = None,
    ) -> Result:
        """Split a task into sub-tasks (the parent is this task). The whole plan is checked first
        (unknown or duplicate ids, unknown dependencies, cycles): on an error nothing is made.
        Then call run_subtasks. Each sub-task runs its command in its own sandbox on a branch
        forked from this task's branch once its dependencies are merged."""
        plan: dict[str, Any] = {"subtask": [dict(s) for s in subtasks]}
        if parallel is not None:
            plan["parallel"] = parallel
        if timeout is not None:
            plan["timeout"] = timeout
        return await ad.task_tool(ctx, task_id, "create_subtasks", {"subtasks": plan["subtask"]},
                                  lambda _s: ad.service.create_subtasks(task_id, plan))

    @tool(WRITES)
    async def run_subtasks(
        task_id: TaskId,
        ctx: Context,
        parallel: Annotated[int | None, Field(description="Sub-tasks running at once.", ge=1, le=64)] = None,
        merge: Annotated[bool, Field(description="Merge each succeeded sub-task into this task "
                                                 "(dependents need it).")] = True,
        resume: Annotated[bool, Field(description="Continue an interrupted run.")] = False,
    ) -> Result:
        """Run this task's sub-tasks to the end and merge them into its branch in dependency order
        (one --no-ff commit each). A failed, timed-out or conflicting sub-task blocks only its
        dependents; a conflict leaves this task unchanged and lists the files. Returns every
        sub-task's status, merge commit or conflicting files. May take as long as the sub-tasks."""
        args = {"parallel": parallel, "merge": merge, "resume": resume}
        return await ad.task_tool(ctx, task_id, "run_subtasks", args,
                                  lambda _s: ad.service.run_subtasks(task_id, parallel=parallel, merge=merge,
                                                                     resume=resume))

    @tool(READ_ONLY)
    async def subtask_status(task_id: TaskId, ctx: Context) -> Result:
        """This task's sub-tasks: status (pending, running, succeeded, failed, timed_out, blocked,
        merged, conflict), branch, child task id, duration, merge commit or conflicting files,
        and overall progress."""
        return await ad.task_tool(ctx, task_id, "subtask_status", {},
                                  lambda _s: ad.service.subtask_status(task_id))

    @tool(WRITES)
    async def merge_task(
        task_id: TaskId,
        ctx: Context,
        into: Annotated[str | None, Field(description="A task id or a branch of the user's repository "
                                                      "(default: the task's parent).")] = None,
        squash: Annotated[bool, Field(description="One squashed commit instead of a merge commit.")] = False,
    ) -> Result:
        """Merge a task's branch (e.g. a fixed sub-task) into its parent, another task or a branch.
        A conflict changes nothing and returns status "conflict" with conflict_files."""
        return await ad.task_tool(ctx, task_id, "merge_task", {"into": into, "squash": squash},
                                  lambda _s: ad.service.merge_task(task_id, into, squash=squash))

    # --- memory ------------------------------------------------------------------------------

    @tool(WRITES)
    async def update_task_todos(
        task_id: TaskId,
        todos: Annotated[list[TodoChange], Field(description="Todos to add (no id) or change (by id).",
                                                 min_length=1)],
        ctx: Context,
    ) -> Result:
        """Add todos or change their status (pending, in_progress, completed, cancelled). Keep the
        list current: it survives sessions, is shown in Plan.md and restored on attach. Returns the
        whole todo list."""
        changes = [dict(t) for t in todos]
        return await ad.task_tool(ctx, task_id, "update_task_todos", {"todos": changes},
                                  lambda session: {"todos": ad.service.update_todos(task_id, changes,
                                                                                    session_id=session)})

    @tool(WRITES)
    async def log_task_decision(
        task_id: TaskId,
        decision: Annotated[str, Field(description="What was decided.")],
        ctx: Context,
        context: Annotated[str, Field(description="The situation that needed a decision.")] = "",
        rationale: Annotated[str, Field(description="Why.")] = "",
        alternatives: Annotated[str, Field(description="Options considered and rejected.")] = "",
    ) -> Result:
        """Record a design decision in the task's decision log (decisions.md), so later sessions and
        other agents know what was chosen and why."""
        def call(session_id: str | None) -> dict[str, Any]:
            session = ad.service.registry.get_session(session_id) if session_id else None
            return ad.service.log_decision(task_id, decision, context=context, rationale=rationale,
                                    alternatives=alternatives, agent=session.agent if session else "agent")

        args = {"decision": decision, "context": context, "rationale": rationale, "alternatives": alternatives}
        return await ad.task_tool(ctx, task_id, "log_task_decision", args, call)

    # --- checkpoints -------------------------------------------------------------------------

    @tool(WRITES)
    async def create_task_checkpoint(
        task_id: TaskId,
        checkpoint_name: Annotated[str, Field(description="A short name, e.g. before-refactor.")],
        ctx: Context,
        description: Annotated[str, Field(description="What state this captures.")] = "",
        include_filesystem_snapshot: Annotated[bool, Field(description="Also capture the container's "
                                                                       "filesystem outside the workspace "
                                                                       "(installed system packages).")] = False,
    ) -> Result:
        """Save a named restore point of the task: every workspace file (untracked and ignored ones
        too) and its memory. Take one before a risky change; returns checkpoint_id for
        restore_task_checkpoint."""
        args = {"checkpoint_name": checkpoint_name, "description": description,
                "include_filesystem_snapshot": include_filesystem_snapshot}
        return await ad.task_tool(ctx, task_id, "create_task_checkpoint", args,
                                  lambda _s: ad.service.create_checkpoint(task_id, checkpoint_name, description=description,
                                                                include_filesystem=include_filesystem_snapshot,
                                                                trigger="manual"))

    @tool(DESTRUCTIVE)
    async def restore_task_checkpoint(
        task_id: TaskId,
        checkpoint_id: Annotated[str, Field(description="Id returned by create_task_checkpoint.")],
        ctx: Context,
        kill_running: Annotated[bool, Field(description="Kill commands and background jobs still running "
                                                        "in the task instead of refusing to restore.")] = False,
    ) -> Result:
        """Roll the task workspace back to a checkpoint exactly: changed files are restored and files
        created since are removed. Use it to undo a failed approach. Refused while another agent is
        attached to the task."""
        return await ad.task_tool(ctx, task_id, "restore_task_checkpoint", {"checkpoint_id": checkpoint_id},
                                  lambda session: {"success": True, **ad.service.restore_checkpoint(
                                      task_id, checkpoint_id, session_id=session,
                                      kill_running=kill_running).to_dict()})

    return server


# --- running and documenting -------------------------------------------------------------------


def _serve(service: TaskService | None, run: Callable[[MCPServer], None]) -> None:
    """Run the server; the service's housekeeping (pressure sampling, idle pause …) runs while it
    serves, from the moment the service is opened (the first tool call, unless ``service`` is given)."""
    with contextlib.ExitStack() as stack:

        def opened(svc: TaskService) -> None:
            svc.bind_leases_to_process()  # a server that dies frees its tasks at once
            stack.enter_context(svc.housekeeping())

        if service is not None:
            opened(service)
        run(create_server(service, on_open=opened))


def serve_stdio(service: TaskService | None = None) -> None:
    """Serve MCP on stdin/stdout until the client closes the stream."""
    _serve(service, lambda server: server.run("stdio"))


def serve_http(host: str = "127.0.0.1", port: int = 8765, service: TaskService | None = None) -> None:
    """Serve MCP over streamable HTTP at ``http://HOST:PORT/mcp``."""
    if not 0 <= port <= 65535:
        raise InvalidInput(f"port {port} is not between 0 and 65535")
    _serve(service, lambda server: server.run("streamable-http", host=host, port=port))


def tool_reference(server: MCPServer | None = None) -> str:
    """The Markdown tool reference in docs/mcp.md, generated from the registered tools."""
    server = server or create_server()
    tools = anyio.run(server.list_tools)
    out = []
    for tool in sorted(tools, key=lambda t: t.name):
        out.append(f"### `{tool.name}`\n")
        out.append(" ".join((tool.description or "").split()) + "\n")
        props = tool.input_schema.get("properties", {})
        required = set(tool.input_schema.get("required", []))
        if props:
            out.append("| argument | type | required | description |")
            out.append("|---|---|---|---|")
            for name, schema in props.items():
                out.append(f"| `{name}` | {_type_name(schema)} | {'yes' if name in required else 'no'} | "
                           f"{' '.join(schema.get('description', '').split())} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _type_name(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "anyOf" in schema:
        return " or ".join(_type_name(s) for s in schema["anyOf"] if s.get("type") != "null")
    if "$ref" in schema:
        return "object"
    if schema.get("type") == "array":
        return f"list of {_type_name(schema.get('items', {}))}"
    return str(schema.get("type", "any"))

