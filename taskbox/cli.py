"""The `taskbox` command line: a thin adapter over :class:`taskbox.service.TaskService`.

Human-readable output by default, ``--json`` on every command. Exit codes: 0 success,
1 other error, 2 invalid input or transition, 3 not found, 4 locked or conflict,
5 Docker unavailable or image missing, 6 sandbox error, 7 git error, 8 memory error,
9 refused by the project policy, 10 registry unusable (missing, damaged, locked, disk full,
permission denied: the message says how to recover).
``exec`` exits with the command's own exit code.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .errors import InvalidInput, TaskboxError
from .output import ago, pairs, progress, table, to_json

if TYPE_CHECKING:
    from .service import TaskService


def _service() -> TaskService:
    from .service import TaskService  # not at import: `--help` and `mcp` start without it

    ctx = click.get_current_context()
    obj = ctx.find_root().obj
    if obj is None:
        obj = ctx.find_root().obj = TaskService(os.environ.get("TASKBOX_HOME"))
    return obj


def command(group: click.Group, name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """Register a command with a ``--json`` flag and uniform error rendering."""

    def wrap(fn: Callable[..., Any]) -> click.Command:
        @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
        @functools.wraps(fn)
        def run(*args: Any, as_json: bool, **kw: Any) -> None:
            try:
                data, human = fn(*args, **kw)
            except TaskboxError as exc:
                if as_json:
                    click.echo(to_json(exc.to_dict()))
                else:
                    click.echo(f"error: {exc.message}", err=True)
                sys.exit(exc.exit_code)
            if as_json:
                click.echo(to_json(data))
            elif human:
                click.echo(human)

        return group.command(name, **kwargs)(run)

    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="taskbox")
def cli() -> None:
    """taskbox: a persistent Docker sandbox, git branch and memory for every coding task."""


# --- lifecycle -------------------------------------------------------------------------------


def _task_row(svc: TaskService, t: Any) -> dict[str, Any]:
    d = t.to_dict()
    d["current_agents"] = svc.current_agents(t.id)
    return d


@command(cli, "create-task")
@click.argument("description")
@click.argument("agent_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- AGENT_ARGS...]")
@click.option("--repo", default=".", show_default=True, help="The git repository the task works on.")
@click.option("--agent", default="agent", show_default=True, help="Name of the agent starting the task.")
@click.option("--model", default="unknown", show_default=True, help="Model the agent runs.")
@click.option("--title", help="Short title (default: first line of the description).")
@click.option("--id", "task_id", help="Task id (default: a slug of the description).")
@click.option("--lock-mode", type=click.Choice(["exclusive", "collaborative"]), default="exclusive", show_default=True)
@click.option("--memory", help="Memory limit, e.g. 2g (default from settings).")
@click.option("--cpus", type=float, help="CPU limit in cores.")
@click.option("--pids", type=int, help="Process limit.")
@click.option("--disk", help="Disk quota of the workspace, e.g. 10g (default from settings; minimum 64m).")
@click.option("--inodes", type=int, help="Inode quota (most files and directories) of the workspace.")
@click.option("--network", type=click.Choice(["none", "allowlist", "open"]),
              help="Network mode: none (default), allowlist (only --allow-domain names, through a proxy) "
                   "or open.")
@click.option("--allow-domain", "allow_domains", multiple=True, metavar="DOMAIN",
              help="A domain (or *.suffix) the task may reach in allowlist mode (repeatable; implies allowlist).")
@click.option("--image", help="Sandbox image (default taskbox-sandbox:latest).")
@click.option("--base", help="Branch or commit to start from (default HEAD).")
@click.option("--lazy", is_flag=True, help="Create the container on first use instead of now.")
@click.option("--no-attach", is_flag=True, help="Do not attach an agent session.")
@click.option("--session", help="Session id to attach with (default: a new one).")
@click.option("--memory-on-branch/--memory-off-branch", default=None,
              help="Commit .task-memory/ and Plan.md on the task branch, or (the default, see the "
                   "memory_on_branch setting) on the companion ref refs/taskbox/<branch>/memory beside it.")
@click.option("--run", "run_agent", metavar="AGENT",
              help="Then run this agent in it (opencode, claude-code, codex, shell), as `taskbox run` does; "
                   "with --prompt non-interactively. Uses the agents image and the allowlist network unless told.")
@click.option("--prompt", "-p", help="With --run: the prompt for a non-interactive run.")
@click.option("--base-url", help="With --run: a custom model endpoint for the agent (its host is allowed).")
@click.option("--timeout", type=float, help="With --run: seconds a prompt run may take (default: run_timeout).")
@click.option("--checkpoint/--no-checkpoint", default=None,
              help="With --run: take a checkpoint when the agent ends (default: the run_checkpoint setting).")
@click.option("--template", help="Apply a template (`taskbox template list`) under the project's own setup.")
@click.option("--publish", "publish", multiple=True, metavar="[HOST_PORT:]PORT",
              help="Publish the task's PORT on host loopback (HOST_ADDRESS:HOST_PORT:PORT for another address). Repeatable.")
@click.option("--secret", "secret_names", multiple=True, metavar="NAME",
              help="With --run: a secret for the agent (repeatable).")
def create_task(description: str, agent_args: tuple[str, ...], repo: str, agent: str, model: str, title: str | None,
                task_id: str | None, lock_mode: str, memory: str | None, cpus: float | None, pids: int | None,
                disk: str | None, inodes: int | None, network: str | None,
                allow_domains: tuple[str, ...], image: str | None, base: str | None, lazy: bool, no_attach: bool,
                session: str | None, memory_on_branch: bool | None, run_agent: str | None, prompt: str | None,
                base_url: str | None, timeout: float | None, checkpoint: bool | None,
                template: str | None, publish: tuple[str, ...], secret_names: tuple[str, ...]) -> Any:
    """Create a task: a workspace on a new branch, a sandbox container and memory.

    With --run AGENT it then runs the agent in it, with the options of `taskbox run`
    (--prompt, --model, --secret, --allow-domain, --base-url, --timeout, --checkpoint and
    agent arguments after --); bad run options are refused before the task is created.
    """
    svc = _service()
    options: dict[str, Any] = dict(agent=agent, model=model, title=title, task_id=task_id, lock_mode=lock_mode,
                                   memory=memory, cpus=cpus, pids_limit=pids, disk=disk, inodes=inodes,
                                   network=network, allow_domains=list(allow_domains) or None, image=image,
                                   base_ref=base, lazy=lazy, progress=progress, template=template,
                                   publish=list(publish) or None, memory_on_branch=memory_on_branch)
    if run_agent:
        options = svc.agent_task_options(run_agent, options, secrets=list(secret_names), base_url=base_url)
    elif prompt or secret_names or base_url or agent_args or timeout is not None or checkpoint is not None:
        raise InvalidInput("--prompt, --secret, --base-url, --timeout, --checkpoint and agent arguments go with "
                           "--run AGENT")
    data = svc.start_task(repo, description, attach=not no_attach, session_id=session, **options)
    for line in data["warnings"]:
        click.echo(f"warning: {line}", err=True)
    if run_agent:
        click.echo(f"taskbox: created task {data['task_id']} on branch {data['branch']}", err=True)
        ctx = click.get_current_context()
        ctx.invoke(run, task_id=data["task_id"], args=agent_args, agent_name=run_agent, prompt=prompt,
                   model=None if model == "unknown" else model, secret_names=secret_names,
                   allow_domains=allow_domains, base_url=base_url, session=session, timeout=timeout,
                   checkpoint=checkpoint, as_json=False)
    human = pairs([("task", data["task_id"]), ("status", data["status"]), ("branch", data["branch"]),
                   ("workspace", data["workspace_path"]), ("container", (data["container_id"] or "-")[:12]),
                   ("session", data["session_id"] or "-")])
    return data, human


@command(cli, "resume-task")
@click.argument("task_id")
@click.option("--agent", default="agent", show_default=True)
@click.option("--model", default="unknown", show_default=True)
@click.option("--session", help="Session id (default: a new one).")
@click.option("--lock-mode", type=click.Choice(["exclusive", "collaborative"]), help="Override the task's lock mode.")
@click.option("--wait", type=float, default=0, help="Seconds to wait for a held lock.")
def resume_task(task_id: str, agent: str, model: str, session: str | None, lock_mode: str | None,
                wait: float) -> Any:
    """Attach an agent session to a task and restore its state."""
    res = _service().attach(task_id, agent, model, session, lock_mode=lock_mode, wait=wait)
    st = res.restored_state
    lines = [pairs([("task", res.task.id), ("session", res.session.id), ("status", str(res.task.status)),
                    ("branch", res.task.branch), ("restored in", f"{res.restore_ms} ms")])]
    if res.recovery:
        lines.append(f"state.json was damaged ({res.recovery.reason}); rebuilt from the logs, "
                     f"damaged copy kept as {res.recovery.corrupted_copy}")
    for lease in res.took_over:
        lines.append(f"took over the expired lease of {lease['agent']} (session {lease['session_id']})")
    if st["todos"]:
        lines.append("\n" + table([(t["id"], t["status"], t["text"]) for t in st["todos"]], ["todo", "status", "text"]))
    if st["executions"]:
        lines.append("\nrecent commands:")
        lines += [f"  [{e.get('exit_code')}] {e.get('command')}" for e in st["executions"][-5:]]
    return res.to_dict(), "\n".join(lines)


@command(cli, "detach")
@click.argument("task_id")
@click.option("--session", help="Which session (needed when several are attached).")
@click.option("--checkpoint", "save_checkpoint", is_flag=True, help="Also take a checkpoint.")
@click.option("--checkpoint-name", help="Name of that checkpoint.")
@click.option("--kill-running", is_flag=True, help="Kill commands and background jobs still running in the task "
                                                   "instead of refusing.")
def detach(task_id: str, session: str | None, save_checkpoint: bool, checkpoint_name: str | None,
           kill_running: bool) -> Any:
    """Detach an agent session; the work is committed and the branch fetched into your repo."""
    res = _service().detach(task_id, session, save_checkpoint=save_checkpoint or bool(checkpoint_name),
                            checkpoint_name=checkpoint_name, kill_running=kill_running)
    extra = "; task paused (container stopped)" if res["paused"] else ""
    return res, f"detached session {res['session_id']} from {task_id}{extra}; branch {res['branch']} at {res['commit'][:10]}"


@command(cli, "list-tasks")
@click.option("--status", "statuses", multiple=True,
              help="Only tasks with this status (repeatable); `all` for every task (the default).")
def list_tasks(statuses: tuple[str, ...]) -> Any:
    """List tasks."""
    svc = _service()
    tasks = svc.list_tasks(None if "all" in statuses else list(statuses) or None)
    rows = [_task_row(svc, t) for t in tasks]
    human = table([(r["task_id"], r["status"], r["branch"], ",".join(r["current_agents"]),
                    (r["container_id"] or "")[:12], ago(r["last_active"])) for r in rows],
                  ["task", "status", "branch", "agents", "container", "active"]) if rows else "no tasks"
    return rows, human


@command(cli, "find-task")
@click.argument("query")
@click.option("--status", "statuses", multiple=True)
def find_task(query: str, statuses: tuple[str, ...]) -> Any:
    """Find tasks whose id, title, description or branch contains QUERY."""
    svc = _service()
    rows = [_task_row(svc, t) for t in svc.list_tasks(list(statuses) or None, query)]
    human = table([(r["task_id"], r["status"], r["branch"], r["title"]) for r in rows],
                  ["task", "status", "branch", "title"]) if rows else f"no task matches {query!r}"
    return rows, human


@command(cli, "show")
@click.argument("task_id")
def show(task_id: str) -> Any:
    """Show a task's record and its state."""
    svc = _service()
    status = svc.status(task_id)  # the `status` operation, with its hooks (as over MCP)
    task = svc.get(task_id)
    state = svc.state(task_id)
    usage = status["workspace_usage"]
    jobs = svc.jobs(task.id)
    data = {**_task_row(svc, task), "state": state, "workspace_usage": usage, "jobs": jobs, "ports": status["ports"]}
    human = pairs([("task", task.id), ("title", task.title), ("status", str(task.status)),
                   ("branch", task.branch), ("repo", task.repo_path), ("workspace", task.workspace_path),
                   ("container", f"{(task.container_id or '-')[:12]} ({task.container_state})"),
                   ("limits", f"memory {task.memory_limit}, cpus {task.cpu_limit}, pids {task.pids_limit}, "
                              f"network {task.network}"),
                   ("disk", _usage_line(usage)),
                   ("lock", f"{task.lock_mode}; agents: {', '.join(data['current_agents']) or 'none'}"),
                   ("todos", f"{sum(t['status'] == 'completed' for t in state['todos'])}/{len(state['todos'])} done"),
                   ("jobs", ", ".join(f"{j['job_id']} ({j['status']})" for j in jobs) or "none"),
                   ("ports", ", ".join(f"{p['host_ip']}:{p['host_port']} -> {p['port']}" for p in status["ports"])
                    or "none"),
                   ("created", ago(task.created_at)), ("active", ago(task.last_active)), ("version", task.version)])
    return data, human


def _usage_line(usage: dict[str, Any] | None) -> str:
    if usage is None:
        return "no quota"
    if not usage["mounted"]:
        return "volume not mounted (`taskbox doctor --fix` mounts it)"
    mib = 1024 * 1024
    return (f"{usage['bytes_used'] / mib:.1f} of {usage['bytes_limit'] / mib:.0f} MiB, "
            f"{usage['inodes_used']} of {usage['inodes_limit']} inodes")


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("task_id")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--workdir", "-w", help="Directory inside the workspace to run in.")
@click.option("--timeout", type=float, help="Seconds before the command is killed.")
@click.option("--session", help="Session the command belongs to (for the log).")
@click.option("--secret", "secret_names", multiple=True, metavar="NAME",
              help="Put secret NAME (TASKBOX_SECRET_NAME or secrets.toml) into the command's environment; "
                   "its value is redacted from output and logs. Repeatable.")
@click.option("--no-log", is_flag=True, help="Record nothing of the command or its output.")
@click.option("--background", "-b", is_flag=True, help="Start it as a background job and print its id (see `job`).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def exec_(task_id: str, cmd: tuple[str, ...], workdir: str | None, timeout: float | None,
          session: str | None, secret_names: tuple[str, ...], no_log: bool, background: bool, as_json: bool) -> None:
    """Run a command in a task's sandbox: taskbox exec TASK -- CMD... (exits with its code)."""
    command_ = cmd[0] if len(cmd) == 1 else list(cmd)
    if background:
        try:
            if secret_names:
                raise InvalidInput("secrets cannot be given to a background job")
            job = _service().start_job(task_id, command_ if isinstance(command_, str) else shlex.join(command_),
                                          workdir=workdir, timeout=timeout, session_id=session, log=not no_log)
        except TaskboxError as exc:
            click.echo(to_json(exc.to_dict()) if as_json else f"error: {exc.message}", err=not as_json)
            sys.exit(exc.exit_code)
        click.echo(to_json(job) if as_json else job["job_id"])
        return
    try:
        svc = _service()
        res = svc.exec(task_id, command_, workdir=workdir, timeout=timeout, session_id=session,
                       secrets=list(secret_names), log=not no_log)
    except TaskboxError as exc:
        if as_json:
            click.echo(to_json(exc.to_dict()))
        else:
            partial = exc.details.get("result") or {}
            sys.stdout.write(partial.get("stdout", ""))
            sys.stderr.write(partial.get("stderr", ""))
            click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    if as_json:
        click.echo(to_json(res.to_dict()))
    else:
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        if res.truncated:
            click.echo("[taskbox: output truncated]", err=True)
    sys.exit(res.exit_code if res.exit_code >= 0 else 1)


@cli.command("shell")
@click.argument("task_id")
@click.option("--workdir", "-w", help="Directory inside the workspace.")
def shell(task_id: str, workdir: str | None) -> None:
    """Open an interactive shell in a task's sandbox."""
    from .confine import container_workdir, sandbox_owner

    try:
        svc = _service()
        task = svc.ensure_running(task_id)
        wd = container_workdir(workdir, Path(task.workspace_path))
    except TaskboxError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    docker = shutil.which("docker")
    if not docker:
        click.echo("error: the docker CLI is needed for an interactive shell", err=True)
        sys.exit(5)
    uid, gid = sandbox_owner()
    tty = ["-it"] if sys.stdin.isatty() else ["-i"]
    os.execv(docker, ["docker", "exec", *tty, "-u", f"{uid}:{gid}", "-w", wd, task.container_id or "", "bash"])


def _terminal() -> Any:
    from .agents import Terminal

    def size() -> tuple[int, int] | None:
        try:
            cols, rows = os.get_terminal_size(sys.stdout.fileno())
        except OSError:
            return None
        return rows, cols

    return Terminal(sys.stdin.fileno(), sys.stdout.fileno(), size)


def _raw_terminal(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with the local terminal in raw mode (keys go to the agent as typed), restored after.

    A terminal closed mid-run (its window shut, the ssh connection dropped) is a detach, not an
    end: the hang-up signal is ignored, so the relay sees the closed terminal, the agent keeps
    running in the sandbox and its run is handed to `taskbox watch-run`.
    """
    if not sys.stdin.isatty():
        return fn()
    import signal
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        tty.setraw(fd)
        return fn()
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except (termios.error, OSError):
            pass  # the terminal is gone
        signal.signal(signal.SIGHUP, hangup)


def _watch_detached(data: dict[str, Any]) -> None:
    """A run left running: start `taskbox watch-run` in the background (its own session, no terminal),
    which keeps the run's lease renewed and records the run when the agent ends."""
    if not data.get("detached") or not data.get("session_id"):
        return
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBOX_SECRET_")}
    subprocess.Popen([sys.executable, "-m", "taskbox", "watch-run", data["task_id"], data["session_id"]],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True, env=env)


def _run_output(data: dict[str, Any], as_json: bool) -> None:
    _watch_detached(data)
    try:
        _show_run(data, as_json)
    except OSError:  # the terminal was closed: nobody to tell
        pass
    code = data.get("exit_code")
    sys.exit(0 if code is None else code if 0 <= code < 256 else 1)


def _show_run(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(to_json(data))
    elif data.get("detached"):
        click.echo(f"taskbox: detached; {data['agent']} keeps running in task {data['task_id']} "
                   f"(come back with `taskbox attach {data['task_id']}`)", err=True)
    else:
        code = data.get("exit_code")
        if code not in (0, None) and data.get("seconds", 99) < 5:
            last = data.get("last_line") or ""
            click.echo(f"error: agent {data['agent']} exited at once with code {code}"
                       + (f": {last}" if last else ""), err=True)
        click.echo(f"taskbox: {data['agent']} ended (exit {code}); branch {data.get('branch')} "
                   f"at {str(data.get('commit') or '-')[:12]}", err=True)


@cli.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("task_id")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--agent", "agent_name", metavar="AGENT",
              help="opencode, claude-code, codex or shell (default: the task's agent if it is one of these, else shell).")
@click.option("--prompt", "-p", help="Run non-interactively with this prompt (print mode); output is streamed.")
@click.option("--model", help="Model the agent uses (passed to it where it takes one by environment).")
@click.option("--secret", "secret_names", multiple=True, metavar="NAME",
              help="Put secret NAME (TASKBOX_SECRET_NAME or secrets.toml) into the agent's environment only. Repeatable.")
@click.option("--allow-domain", "allow_domains", multiple=True, metavar="DOMAIN",
              help="Another host the agent may reach (besides its preset's model API hosts). Repeatable.")
@click.option("--base-url", help="A custom model endpoint for the agent (its host is allowed through the proxy).")
@click.option("--session", help="Session id (default: a new one).")
@click.option("--timeout", type=float, help="Seconds a prompt run may take (default: the run_timeout setting).")
@click.option("--checkpoint/--no-checkpoint", default=None, help="Take a checkpoint when the agent ends "
              "(default: the run_checkpoint setting).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (no live output).")
def run(task_id: str, args: tuple[str, ...], agent_name: str | None, prompt: str | None, model: str | None,
        secret_names: tuple[str, ...], allow_domains: tuple[str, ...], base_url: str | None, session: str | None,
        timeout: float | None, checkpoint: bool | None, as_json: bool) -> None:
    """Run an agent CLI inside a task's sandbox: taskbox run TASK [--agent A] [--prompt TEXT] [-- ARGS...].

    Without --prompt it is interactive on this terminal: detach with Ctrl-b d (the agent keeps
    running), come back with `taskbox attach TASK`.
    """
    def echo(chunk: bytes) -> None:
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()

    try:
        svc = _service()
        options: dict[str, Any] = dict(prompt=prompt, args=list(args), model=model, secrets=list(secret_names),
                                       allow_domains=list(allow_domains), base_url=base_url, session_id=session,
                                       timeout=timeout, checkpoint=checkpoint)
        if agent_name is not None:
            from .agents import preset

            preset(agent_name)  # an unknown agent: its one-line error before anything else
        if prompt is None:
            if not sys.stdin.isatty() and not as_json:
                click.echo("taskbox: stdin is not a terminal; the agent gets no keyboard (give --prompt to run "
                           "without one)", err=True)
            data = _raw_terminal(lambda: svc.run_agent(task_id, agent_name, terminal=_terminal(), **options))
        else:
            data = svc.run_agent(task_id, agent_name, echo=None if as_json else echo, **options)
    except TaskboxError as exc:
        click.echo(to_json(exc.to_dict()) if as_json else f"error: {exc.message}", err=not as_json)
        sys.exit(exc.exit_code)
    _run_output(data, as_json)


@cli.command("attach")
@click.argument("task_id")
@click.option("--session", help="Which run (needed when several are detached).")
@click.option("--checkpoint/--no-checkpoint", default=None, help="Take a checkpoint if the agent ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attach(task_id: str, session: str | None, checkpoint: bool | None, as_json: bool) -> None:
    """Come back to an agent left running by `taskbox run` (detach again with Ctrl-b d)."""
    try:
        svc = _service()
        data = _raw_terminal(lambda: svc.attach_agent(task_id, _terminal(), session, checkpoint=checkpoint))
    except TaskboxError as exc:
        click.echo(to_json(exc.to_dict()) if as_json else f"error: {exc.message}", err=not as_json)
        sys.exit(exc.exit_code)
    _run_output(data, as_json)


@cli.command("watch-run")
@click.argument("task_id")
@click.argument("session_id")
def watch_run(task_id: str, session_id: str) -> None:
    """Look after an agent left running by `taskbox run` until it ends (started by `run` and `attach`).

    Keeps the run's lease renewed while the agent runs; when it ends, records the run as an
    attached `run` would (the session detached, the branch fetched, a checkpoint by setting).
    """
    try:
        data = _service().watch_run(task_id, session_id)
    except TaskboxError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    if data is not None:
        click.echo(f"taskbox: {data['agent']} ended (exit {data['exit_code']}); branch {data.get('branch')}", err=True)


@cli.group("job")
def job_group() -> None:
    """Background jobs of a task (started with `exec --background`): list, output, wait, kill."""


def _job_line(j: dict[str, Any]) -> str:
    code = "" if j["exit_code"] is None else f" exit {j['exit_code']}"
    return f"{j['job_id']} {j['status']}{code}: {j['command']}"


@command(job_group, "list")
@click.argument("task_id")
def job_list(task_id: str) -> Any:
    """A task's background jobs, newest first."""
    jobs = _service().jobs(task_id)
    return jobs, table([(j["job_id"], j["status"], "" if j["exit_code"] is None else j["exit_code"],
                         j["output_bytes"], j["command"][:60]) for j in jobs],
                       ["job", "status", "exit", "output", "command"]) if jobs else "no jobs"


@command(job_group, "output")
@click.argument("task_id")
@click.argument("job_id")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0), help="Byte offset to read from.")
@click.option("--limit", default=65536, show_default=True, type=click.IntRange(1, 1048576), help="Most bytes.")
def job_output(task_id: str, job_id: str, offset: int, limit: int) -> Any:
    """A job's output (stdout and stderr merged) from a byte offset."""
    res = _service().job_output(task_id, job_id, offset, limit)
    return res, res["output"].rstrip("\n")


@command(job_group, "wait")
@click.argument("task_id")
@click.argument("job_id")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(0, 600), help="Most seconds.")
def job_wait(task_id: str, job_id: str, timeout: float) -> Any:
    """Wait for a job to end (up to --timeout); print its state and newest output."""
    res = _service().wait_job(task_id, job_id, timeout)
    return res, _job_line(res) + ("\n" + res["output_tail"].rstrip("\n") if res["output_tail"] else "")


@command(job_group, "kill")
@click.argument("task_id")
@click.argument("job_id")
def job_kill(task_id: str, job_id: str) -> Any:
    """Kill a job and every process it started."""
    res = _service().kill_job(task_id, job_id)
    return res, _job_line(res)


@command(cli, "complete-task")
@click.argument("task_id")
@click.option("--summary", "-s", default="", help="Final summary for Plan.md.")
@click.option("--cleanup", is_flag=True, help="Remove the container now instead of after the retention period.")
@click.option("--kill-running", is_flag=True, help="Kill commands and background jobs still running in the task "
                                                   "instead of refusing.")
def complete_task(task_id: str, summary: str, cleanup: bool, kill_running: bool) -> Any:
    """Complete a task: commit, fetch its branch into your repository, stop its container."""
    res = _service().complete(task_id, summary, cleanup=cleanup, kill_running=kill_running)
    return res, f"completed {task_id}; branch {res['branch']} at {res['commit'][:10]} is in your repository"


@command(cli, "abort")
@click.argument("task_id")
@click.option("--reason", default="")
def abort(task_id: str, reason: str) -> Any:
    """Abort a task (its container is stopped, its workspace kept)."""
    task = _service().abort(task_id, reason)
    return task.to_dict(), f"aborted {task_id}"


@command(cli, "cleanup-task")
@click.argument("task_id")
@click.option("--remove-workspace", is_flag=True, help="Also delete the workspace checkout.")
def cleanup_task(task_id: str, remove_workspace: bool) -> Any:
    """Remove a finished task's container now and archive it (branch and memory are kept)."""
    task = _service().cleanup(task_id, remove_workspace=remove_workspace)
    return task.to_dict(), f"archived {task_id}; container removed"


# --- memory ----------------------------------------------------------------------------------


@command(cli, "task-history")
@click.argument("task_id")
@click.option("--limit", default=50, show_default=True)
def task_history(task_id: str, limit: int) -> Any:
    """Sessions, conversation and lifecycle events of a task."""
    data = _service().history(task_id, limit)
    ev = table([(e["id"], ago(e["ts"]), e["type"], to_json(e["payload"]).replace("\n", "")[:60])
                for e in data["events"]], ["#", "when", "event", "details"])
    ss = table([(s["id"], s["agent"], s["model"], ago(s["attached_at"]), ago(s["detached_at"]))
                for s in data["sessions"]], ["session", "agent", "model", "attached", "detached"])
    return data, f"{ss}\n\n{ev}"


@command(cli, "task-executions")
@click.argument("task_id")
@click.option("--limit", default=20, show_default=True)
def task_executions(task_id: str, limit: int) -> Any:
    """Commands run in a task, newest last."""
    rows = _service().executions(task_id, limit)
    human = table([(ago(e.get("ts")), e.get("exit_code"), f"{e.get('duration_ms', 0):.0f}ms", e.get("command"))
                   for e in rows], ["when", "exit", "took", "command"]) if rows else "no commands yet"
    return rows, human


@command(cli, "task-decisions")
@click.argument("task_id")
@click.option("--add", "decision", help="Record a decision.")
@click.option("--context", default="")
@click.option("--rationale", default="")
@click.option("--alternatives", default="")
@click.option("--agent", default="user")
def task_decisions(task_id: str, decision: str | None, context: str, rationale: str, alternatives: str,
                   agent: str) -> Any:
    """Show a task's decision log, or add to it with --add."""
    svc = _service()
    if decision:
        entry = svc.log_decision(task_id, decision, context=context, rationale=rationale,
                                 alternatives=alternatives, agent=agent)
        return entry, f"recorded decision at {entry['time']}"
    rows = svc.decisions(task_id)
    human = table([(d.get("time"), d.get("agent"), d.get("decision"), d.get("rationale", ""))
                   for d in rows], ["time", "agent", "decision", "rationale"]) if rows else "no decisions yet"
    return rows, human


@command(cli, "todo")
@click.argument("task_id")
@click.option("--add", "add", multiple=True, help="Add a todo with this text (repeatable).")
@click.option("--major", is_flag=True, help="Mark added todos as major.")
@click.option("--done", multiple=True, help="Mark this todo id completed (repeatable).")
@click.option("--start", multiple=True, help="Mark this todo id in progress (repeatable).")
def todo(task_id: str, add: tuple[str, ...], major: bool, done: tuple[str, ...], start: tuple[str, ...]) -> Any:
    """Show or change a task's todos."""
    svc = _service()
    changes: list[dict[str, Any]] = [{"text": t, **({"major": True} if major else {})} for t in add]
    changes += [{"id": i, "status": "in_progress"} for i in start]
    changes += [{"id": i, "status": "completed"} for i in done]
    todos = svc.update_todos(task_id, changes) if changes else svc.state(task_id)["todos"]
    human = table([(t["id"], t["status"], "yes" if t.get("major") else "", t["text"]) for t in todos],
                  ["id", "status", "major", "text"]) if todos else "no todos"
    return todos, human


@command(cli, "task-stats")
@click.argument("task_id", required=False)
def task_stats(task_id: str | None) -> Any:
    """Statistics of one task, or of all tasks."""
    data = _service().stats(task_id)
    if task_id:
        m = data["metrics"]
        human = pairs([("task", data["task_id"]), ("status", data["status"]),
                       ("todos", f"{data['todos_done']}/{data['todos_total']} done"),
                       ("sessions", m["sessions"]), ("iterations", m["iterations"]), ("tool calls", m["tool_calls"]),
                       ("agents", ", ".join(m["agents_used"]) or "-"),
                       ("commands", f"{data['executions']} ({data['failed_executions']} failed), "
                                    f"{data['exec_ms_total'] / 1000:.1f}s in total")])
    else:
        human = pairs([("tasks", data["tasks"]), *[(k, v) for k, v in sorted(data["by_status"].items())],
                       ("live leases", data["live_leases"])])
    return data, human


# --- git -------------------------------------------------------------------------------------


@command(cli, "diff")
@click.argument("task_id")
@click.option("--stat", is_flag=True, help="Only a summary of changed files.")
def diff(task_id: str, stat: bool) -> Any:
    """The task's changes against the commit it started from."""
    text = _service().diff(task_id, stat)
    return {"task_id": task_id, "diff": text}, text.rstrip() or "no changes"


@command(cli, "log")
@click.argument("task_id")
@click.option("--limit", default=30, show_default=True)
def log(task_id: str, limit: int) -> Any:
    """Commits on the task's branch since it started."""
    rows = _service().git_log(task_id, limit)
    return rows, table([(r["commit"][:10], r["date"], r["subject"]) for r in rows], ["commit", "date", "subject"])


@command(cli, "sync")
@click.argument("task_id")
def sync(task_id: str) -> Any:
    """Commit the workspace and fetch the task branch into your repository now."""
    res = _service().sync(task_id)
    return res, f"branch {res['branch']} at {res['commit'][:10]}"


# --- ultrawork and merge ---------------------------------------------------------------------


def _subtask_table(data: dict[str, Any]) -> str:
    rows = []
    for s in data["subtasks"]:
        if s["status"] == "conflict":
            result = "conflict: " + ", ".join(s["conflict_files"])
        else:
            result = (s["merge_commit"] or "")[:12] or s["error"]
        rows.append((s["id"], s["title"], s["status"], s["branch"], s["task_id"],
                     f"{s['duration_s']:.1f}s" if s["duration_s"] is not None else "", result))
    run = data.get("run") or {}
    head = (f"{data['parent']}: {data['finished']}/{data['total']} finished, {data['merged']} merged"
            + (f" (run {run['status']})" if run else ""))
    return head + "\n" + table(rows, ["id", "title", "status", "branch", "task", "took", "merge commit / files"])


def _render_exit(data: Any, human: str, as_json: bool, code: int, *, error: bool = False) -> None:
    click.echo(to_json(data) if as_json else human, err=error and not as_json)
    sys.exit(code)


@cli.command("ultrawork")
@click.argument("parent")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False), help="The plan (TOML): [[subtask]] entries with "
              "id, title, command, depends_on. Needed unless resuming.")
@click.option("--parallel", type=click.IntRange(1, 64), help="Sub-tasks running at once (default: the plan's, then "
              "the ultrawork_parallel setting).")
@click.option("--no-merge", is_flag=True, help="Run the sub-tasks but do not merge them (dependents wait).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (nothing finished is redone or re-merged).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def ultrawork_(parent: str, plan_file: str | None, parallel: int | None, no_merge: bool, resume: bool,
               as_json: bool) -> None:
    """Split a task into parallel sub-tasks, each in its own sandbox, merged back in dependency order.

    Exits 0 when every sub-task was merged (with --no-merge: succeeded), 1 when some failed,
    timed out, conflicted or were blocked (the table says which), or the error's code.
    """
    from .ultrawork import load_plan

    try:
        svc = _service()
        existing = svc.registry.subtasks(svc.get(parent).id)
        if plan_file and not (resume and existing):
            svc.create_subtasks(parent, load_plan(plan_file))
        elif not existing:
            raise InvalidInput(f"task {parent} has no sub-tasks yet; give a plan with --plan FILE")
        data = svc.run_subtasks(parent, parallel=parallel, merge=not no_merge, resume=resume,
                                progress=None if as_json else progress)
    except TaskboxError as exc:
        _render_exit(exc.to_dict(), f"error: {exc.message}", as_json, exc.exit_code, error=True)
        return
    good = {"succeeded", "merged"} if no_merge else {"merged"}
    ok = all(s["status"] in good for s in data["subtasks"])
    _render_exit(data, _subtask_table(data) + f"\ntook {data['duration_s']:.1f}s", as_json, 0 if ok else 1)


@cli.command("subtask-status")
@click.argument("parent")
@click.option("--watch", is_flag=True, help="Refresh every second until the run ends (Ctrl-C stops watching).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes with --watch.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (one object per refresh).")
def subtask_status(parent: str, watch: bool, interval: float, as_json: bool) -> None:
    """Show a parent task's sub-tasks: status, branch, duration, merge commit or conflicting files."""
    import time

    try:
        svc = _service()
        while True:
            data = svc.subtask_status(parent)
            if as_json:
                click.echo(to_json(data) if not watch else json.dumps(data, sort_keys=True, default=str))
            else:
                if watch and sys.stdout.isatty():
                    click.clear()
                click.echo(_subtask_table(data))
            if not watch or (data.get("run") or {}).get("status") != "running":
                return
            time.sleep(max(0.1, interval))
    except TaskboxError as exc:
        _render_exit(exc.to_dict(), f"error: {exc.message}", as_json, exc.exit_code, error=True)
    except KeyboardInterrupt:
        return


@cli.command("merge")
@click.argument("task_id")
@click.option("--into", "into", metavar="BRANCH_OR_TASK", help="Where to merge: a task id, or a branch of your "
              "repository (never the checked-out one). Default: the task's parent.")
@click.option("--squash", is_flag=True, help="One squashed commit instead of a --no-ff merge commit.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def merge(task_id: str, into: str | None, squash: bool, as_json: bool) -> None:
    """Merge a finished task's branch into its parent, another task or a branch; nothing is half-merged.

    A conflict changes nothing, lists the conflicting files and exits 4.
    """
    try:
        res = _service().merge_task(task_id, into, squash=squash)
    except TaskboxError as exc:
        _render_exit(exc.to_dict(), f"error: {exc.message}", as_json, exc.exit_code, error=True)
        return
    if res["status"] == "conflict":
        human = f"conflict merging {task_id} into {res['into']}; nothing was changed. Conflicting files:\n" + \
            "\n".join(f"  {f}" for f in res["conflict_files"])
        _render_exit(res, human, as_json, 4)
    if res["status"] == "already":
        human = f"nothing to merge: {res['into']} already contains {task_id}'s work (at {res['commit'][:12]})"
    else:
        human = f"{task_id} merged as {res['commit'][:12]} in {res['into']}"
    _render_exit(res, human, as_json, 0)


# --- checkpoints -----------------------------------------------------------------------------


class _CheckpointGroup(click.Group):
    """``checkpoint TASK [NAME]`` takes a checkpoint; ``checkpoint list|diff|… TASK`` does the rest."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


def _checkpoint_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no checkpoints yet"
    return table([(("* " if r.get("current") else "") + r["checkpoint_id"], r["name"], r["trigger"],
                   "yes" if r["pinned"] else "", r["files"], _size(r["bytes_added"]), ago(r["created_at"]),
                   r["description"][:40]) for r in rows],
                 ["checkpoint", "name", "trigger", "pinned", "files", "added", "created", "description"])


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@cli.group("checkpoint", cls=_CheckpointGroup)
def checkpoint() -> None:
    """Checkpoints: `checkpoint TASK [NAME] [-d DESC]` takes one; list, diff, export, import, prune."""


@command(checkpoint, "create")
@click.argument("task_id")
@click.argument("name", required=False)
@click.option("--description", "-d", default="", help="What this checkpoint is.")
@click.option("--include-filesystem", is_flag=True, help="Also capture the container's filesystem (docker commit).")
@click.option("--pin", is_flag=True, help="Never prune this checkpoint.")
def checkpoint_create(task_id: str, name: str | None, description: str, include_filesystem: bool, pin: bool) -> Any:
    """Checkpoint a task's whole workspace (also: `taskbox checkpoint TASK [NAME]`)."""
    res = _service().create_checkpoint(task_id, name, description, include_filesystem=include_filesystem,
                                       pinned=pin)
    return res, (f"checkpoint {res['checkpoint_id']} ({res['name']}) of {task_id}: {res['files']} files, "
                 f"{_size(res['bytes_added'])} added, {res['duration_ms']:.0f} ms")


@command(checkpoint, "list")
@click.argument("task_id")
def checkpoint_list(task_id: str) -> Any:
    """A task's checkpoints, oldest first (* marks the current one)."""
    rows = _service().list_checkpoints(task_id)
    return rows, _checkpoint_rows(rows)


@command(checkpoint, "diff")
@click.argument("task_id")
@click.argument("a")
@click.argument("b", default="current")
@click.option("--names-only", is_flag=True, help="Only the changed paths, no patch.")
def checkpoint_diff(task_id: str, a: str, b: str, names_only: bool) -> Any:
    """What changed from checkpoint A to checkpoint B (`current`: the workspace now)."""
    res = _service().checkpoint_diff(task_id, a, b)
    lines = [f"{res['a']} -> {res['b']}: {res['added']} added, {res['modified']} modified, "
             f"{res['deleted']} deleted" + (f", {res['git_changes']} changes inside .git" if res["git_changes"] else "")]
    lines += [f"  {c['status'][0].upper()} {c['path']}" for c in res["changes"]]
    if res["patch"] and not names_only:
        lines += ["", res["patch"].rstrip()]
    return res, "\n".join(lines)


@command(checkpoint, "export")
@click.argument("task_id")
@click.argument("checkpoint_id")
@click.argument("path", default=".")
def checkpoint_export(task_id: str, checkpoint_id: str, path: str) -> Any:
    """Write a checkpoint as a portable .tar.gz (PATH: a file or a directory)."""
    res = _service().export_checkpoint(task_id, checkpoint_id, path)
    return res, f"exported {res['checkpoint_id']} to {res['path']} ({_size(res['size_bytes'])})"


@command(checkpoint, "import")
@click.argument("task_id")
@click.argument("path")
def checkpoint_import(task_id: str, path: str) -> Any:
    """Read an exported .tar.gz into a new checkpoint of TASK (restore it with restore-checkpoint)."""
    res = _service().import_checkpoint(task_id, path)
    return res, f"imported {path} as checkpoint {res['checkpoint_id']} ({res['name']}) of {task_id}"


@command(checkpoint, "delete")
@click.argument("task_id")
@click.argument("checkpoint_id")
def checkpoint_delete(task_id: str, checkpoint_id: str) -> Any:
    """Delete one checkpoint (its space is reclaimed by `taskbox gc`)."""
    res = _service().delete_checkpoint(task_id, checkpoint_id)
    return res, f"deleted checkpoint {res['checkpoint_id']} ({res['name']})"


@command(checkpoint, "prune")
@click.argument("task_id")
def checkpoint_prune(task_id: str) -> Any:
    """Apply the retention settings to a task's checkpoints now."""
    done = _service().prune_checkpoints(task_id)
    return {"pruned": done}, f"pruned {len(done)} checkpoint(s)" + (f": {', '.join(done)}" if done else "")


@command(cli, "restore-checkpoint")
@click.argument("task_id")
@click.option("--checkpoint", "-c", "checkpoint_id", help="Checkpoint id or name (default: the newest).")
@click.option("--list", "list_only", is_flag=True, help="Only list the task's checkpoints.")
@click.option("--force", is_flag=True, help="Restore even while another agent is attached.")
@click.option("--session", help="The attached session asking (it does not count as another agent).")
@click.option("--kill-running", is_flag=True, help="Kill commands and background jobs still running in the task "
                                                   "instead of refusing.")
def restore_checkpoint(task_id: str, checkpoint_id: str | None, list_only: bool, force: bool,
                       session: str | None, kill_running: bool) -> Any:
    """Make a task's workspace exactly a checkpoint's: changed files reverted, new ones removed."""
    svc = _service()
    if list_only:
        rows = svc.list_checkpoints(task_id)
        return rows, _checkpoint_rows(rows)
    res = svc.restore_checkpoint(task_id, checkpoint_id, force, session_id=session, kill_running=kill_running)
    return res, (f"restored {task_id} to {res['checkpoint_id']} ({res['name']}): {res['files_changed']} changed, "
                 f"{res['files_restored']} brought back, {res['files_removed']} removed in {res['duration_ms']:.0f} ms"
                 + ("; container recreated from its filesystem" if res["container_restored"] else ""))


@command(cli, "configure-risky-operations")
@click.option("--repo", default=".", show_default=True, help="The project whose .taskbox/risk.json to use.")
@click.option("--list", "list_", is_flag=True, help="List the patterns (the default).")
@click.option("--add", metavar="TOOL:PATTERN", help="Add a pattern (a regular expression; TOOL exec or *).")
@click.option("--category", default="custom", show_default=True, help="Category of an added pattern.")
@click.option("--weight", type=click.IntRange(0, 10), help="Score of an added pattern (default by category, else 4).")
@click.option("--remove", metavar="ID|TOOL:PATTERN", help="Remove a pattern.")
@click.option("--test", nargs=2, metavar="TOOL CMD", help="Score a command and say whether a checkpoint is taken.")
@click.option("--reset", is_flag=True, help="Back to the built-in patterns.")
@click.option("--high-only/--no-high-only", default=None, help="Checkpoint automatically only before high risk.")
@click.option("--threshold", type=click.Choice(["low", "medium", "high"]), help="Lowest level that checkpoints.")
def configure_risky_operations(repo: str, list_: bool, add: str | None, category: str, weight: int | None,
                               remove: str | None, test: tuple[str, str] | None, reset: bool,
                               high_only: bool | None, threshold: str | None) -> Any:
    """Risk scoring of commands (0-10) that decides automatic checkpoints before them."""
    res = _service().risky_operations(repo, add=add, remove=remove, test=test, reset=reset, high_only=high_only,
                                      threshold=threshold, category=category, weight=weight)
    lines = []
    if res.get("reset"):
        lines.append("reset to the built-in patterns")
    if res.get("added"):
        lines.append(f"added {res['added']['id']}: {res['added']['tool']}:{res['added']['pattern']}")
    if res.get("removed"):
        lines.append(f"removed {res['removed']['id']}: {res['removed']['tool']}:{res['removed']['pattern']}")
    if res.get("test"):
        t = res["test"]
        lines.append(f"score {t['score']}/10, level {t['level']}; checkpoint first: {'yes' if t['checkpoint'] else 'no'}")
        lines += [f"  +{m['weight']} {m['category']} ({m['id']}: {m['description'] or m['pattern']})"
                  for m in t["matches"]]
    if list_ or not lines:
        lines.append(table([(p["id"], p["tool"], p["category"], p["weight"], p["pattern"]) for p in res["patterns"]],
                           ["id", "tool", "category", "weight", "pattern"]))
        lines.append(f"high_only: {str(res['high_only']).lower()}, threshold: {res['threshold']} "
                     f"({res['path'] if res['customised'] else 'built-in defaults'})")
    return res, "\n".join(lines)


# --- maintenance -----------------------------------------------------------------------------


@command(cli, "doctor")
@click.option("--fix", is_flag=True, help="Repair what is found (orphans the registry removed go to the trash).")
@click.option("--adopt", "adopt", metavar="TASK", help="Take an orphan workspace or container back into the registry.")
@click.option("--restore-registry", "restore", is_flag=False, flag_value="", default=None, metavar="[BACKUP]",
              help="Restore the registry from the newest backup (or the one named), keeping the damaged file "
                   "aside; with no backup, rebuild it from disk.")
@click.option("--rebuild-registry", "rebuild", is_flag=True,
              help="Make a new registry from what is on disk (task records, workspaces' memory, container labels, "
                   "checkpoint stores); the old file is kept aside.")
@click.option("--backup", "backup", is_flag=True, help="Take an online backup of the registry now.")
@click.option("--list-backups", "list_backups", is_flag=True, help="List the registry backups, newest first.")
def doctor(fix: bool, adopt: str | None, restore: str | None, rebuild: bool, backup: bool,
           list_backups: bool) -> Any:
    """Find (and repair with --fix) inconsistencies between registry, Docker and disk; recover the registry."""
    from .service import TaskService

    home = os.environ.get("TASKBOX_HOME")
    if restore is not None or rebuild:
        res = (TaskService.rebuild_registry(home) if rebuild else TaskService.restore_registry(home, restore or None))
        lines = [f"restored the registry from {res['restored_from']}" if res.get("restored_from")
                 else "rebuilt the registry from disk"]
        if res.get("damaged_copy"):
            lines.append(f"the previous file is kept as {res['damaged_copy']}")
        lines.append(f"adopted from disk: {', '.join(res['adopted']) or 'nothing'}")
        lines += [f"note: {n}" for n in res["notes"]]
        return res, "\n".join(lines)
    svc = _service()
    if list_backups:
        rows = svc.list_registry_backups()
        return rows, table([(r["name"], f"{r['size_bytes']:,}", ago(r["created_at"])) for r in rows],
                           ["backup", "bytes", "taken"]) if rows else "no backups yet"
    if backup:
        res = svc.backup_registry()
        return res, f"backed up to {res['backup']}"
    if adopt:
        task = svc.adopt(adopt)
        return task.to_dict(), pairs([("adopted", task.id), ("status", str(task.status)), ("branch", task.branch),
                                      ("from", task.metadata.get("rebuilt_from", "-"))])
    findings = svc.doctor(fix)
    if not findings:
        return findings, "all good"
    human = table([(f["kind"], f["task_id"], f["detail"], f.get("action") or f.get("error") or
                    ("fixed" if f["fixed"] else "run with --fix" if f.get("fixable") else "-")) for f in findings],
                  ["finding", "task", "detail", "action"])
    return findings, human


@command(cli, "gc")
def gc() -> Any:
    """Archive finished tasks past retention; prune old checkpoints and reclaim their space."""
    done = _service().gc()
    return {"archived": done}, f"archived {len(done)} task(s)" + (f": {', '.join(done)}" if done else "")


@cli.group("pool")
def pool_group() -> None:
    """The warm pool: pre-started sandboxes a new task claims (setting pool_size; docs/speed.md)."""


def _pool_view(data: dict[str, Any], head: str = "") -> tuple[dict[str, Any], str]:
    rows = [(s["id"], s["state"], s["profile"], s["task_id"] or "-", (s["container_id"] or "-")[:12])
            for s in data["slots"]]
    lines = [head] if head else []
    lines.append(f"pool_size {data['size']}, {data['free']} free slot(s) of the default profile "
                 f"{data['profile'] or '(its network is not pooled)'}")
    if data.get("unsupported"):
        lines.append(data["unsupported"])
    if rows:
        lines.append(table(rows, ["slot", "state", "profile", "task", "container"]))
    return data, "\n".join(lines)


@command(pool_group, "status")
def pool_status() -> Any:
    """Show the pool's slots: free, claimed (by which task) or half-claimed."""
    return _pool_view(_service().pool_status())


@command(pool_group, "fill")
@click.option("--size", type=int, default=None, help="Free slots wanted (default: the pool_size setting).")
@click.option("--image", default=None, help="Image of the slots (default: the image setting).")
@click.option("--memory", default=None, help="Memory limit of the slots (default: the memory setting).")
@click.option("--cpus", type=float, default=None, help="CPU limit of the slots (default: the cpus setting).")
@click.option("--network", type=click.Choice(["none", "open"]), default=None,
              help="Network mode of the slots (default: the network setting).")
def pool_fill(size: int | None, image: str | None, memory: str | None, cpus: float | None,
              network: str | None) -> Any:
    """Top the pool up to SIZE free slots of a profile, removing slots that cannot serve first."""
    data = _service().pool_fill(size, image=image, memory=memory, cpus=cpus, network=network, progress=progress)
    return _pool_view(data, f"made {len(data['made'])} slot(s), removed {len(data['removed'])}")


@command(pool_group, "drain")
def pool_drain() -> Any:
    """Remove every free slot (claimed slots belong to their tasks)."""
    data = _service().pool_drain()
    return _pool_view(data, f"removed {len(data['removed'])} slot(s)")


@cli.group("image")
def image() -> None:
    """Sandbox images."""


@command(image, "build")
@click.option("--force", is_flag=True, help="Rebuild even if an image for the same recipe exists.")
@click.option("--proxy", is_flag=True, help="Also build the egress proxy image (squid) for allowlist mode.")
@click.option("--agents", "with_agents", is_flag=True,
              help="Also build the agent CLIs layer (OpenCode, Claude Code, Codex from npm, pinned; tmux).")
@click.option("--package", "packages", multiple=True, metavar="NAME@VERSION",
              help="Another npm package for the agents layer (pinned version). Repeatable.")
@click.option("--repo", help="Also build this project's own Dockerfile (.taskbox/config.toml or devcontainer.json) "
                             "and add its [agent] packages to the agents layer.")
def image_build(force: bool, proxy: bool, with_agents: bool, packages: tuple[str, ...], repo: str | None) -> Any:
    """Build the default sandbox image (bootstrapping a Debian base if it cannot be pulled)."""
    from . import images
    from .engine import connect

    res = images.build(connect(), force=force, progress=progress)
    word = "cached" if res.cached else "built"
    human = f"{word} {res.tag} (base {res.base}) in {res.seconds:.1f}s"
    data: dict[str, Any] = dict(res.__dict__)
    if repo:
        project = _service().build_project_image(repo, force=force, progress=progress)
        data["project"] = project
        packages = (*packages, *project["packages"])
        if project["image"]:
            pimg = project["image"]
            human += f"\n{'cached' if pimg['cached'] else 'built'} {pimg['tag']} (the project's Dockerfile)"
        elif not project["packages"]:
            human += f"\n{project['repo']} names no Dockerfile and no agent packages"
    if proxy:
        pres = images.build_proxy(connect(), force=force, progress=progress)
        data["proxy"] = pres.__dict__
        human += f"\n{'cached' if pres.cached else 'built'} {pres.tag} in {pres.seconds:.1f}s"
    if with_agents or packages:
        from . import agents

        cafile, registry = images.host_npm_settings()
        ares = images.build_agents(connect(), packages=agents.packages(extra=packages), force=force,
                                   progress=progress, npm_cafile=cafile, npm_registry=registry)
        data["agents"] = ares.__dict__
        human += f"\n{'cached' if ares.cached else 'built'} {ares.tag} ({images.AGENTS_IMAGE}) in {ares.seconds:.1f}s"
    return data, human


@command(cli, "ports")
@click.argument("task_id")
@click.argument("action", type=click.Choice(["ls", "add", "rm"]), default="ls")
@click.argument("spec", required=False, metavar="[[HOST_ADDRESS:]HOST_PORT:]PORT")
def ports(task_id: str, action: str, spec: str | None) -> Any:
    """List, add or remove a task's published ports (host loopback unless an address is named)."""
    data = _service().ports(task_id, action, spec)
    for w in data.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    rows = [[f"{p['host_ip']}:{p['host_port']}", p["port"], "yes" if p["running"] else "no"] for p in data["ports"]]
    return data, table(rows, ["HOST", "PORT", "RUNNING"]) if rows else "no published ports"


# --- project setup templates -------------------------------------------------------------------


@cli.group("template")
def template_group() -> None:
    """Templates: named project setups (copied files, setup commands, image, default agent)."""


@command(template_group, "list")
def template_list() -> Any:
    """The templates saved under TASKBOX_HOME/templates and those plugins ship."""
    rows = _service().templates()
    return rows, table([[r["name"], r["source"], r["path"] or ""] for r in rows],
                       ["NAME", "SOURCE", "PATH"]) if rows else "no templates"


@command(template_group, "show")
@click.argument("name", required=False)
@click.option("--repo", default=".", show_default=True, help="Without NAME: the setup of this repository.")
def template_show(name: str | None, repo: str) -> Any:
    """A template's settings (or, without NAME, the project's own setup)."""
    setup = _service().show_setup(name, repo)
    return setup, "\n".join(f"{k}: {v}" for k, v in setup.items())


@command(template_group, "save")
@click.argument("name")
@click.option("--repo", default=".", show_default=True, help="Save this repository's setup as the template.")
def template_save(name: str, repo: str) -> Any:
    """Save the project's setup (.taskbox/config.toml, devcontainer.json) as template NAME."""
    data = _service().save_template(name, repo)
    return data, f"saved template {name} at {data['path']}"


# --- shared host caches ------------------------------------------------------------------------


@cli.group("cache")
def cache_group() -> None:
    """Shared host caches (pip, uv, npm) mounted read-only into sandboxes: `[sandbox] caches`."""


@command(cache_group, "list")
def cache_list() -> Any:
    """The shared caches under TASKBOX_HOME/caches: size, and where sandboxes see them."""
    rows = _service().caches()
    return rows, table([[r["name"], r["files"], _size(r["bytes"]) if r["exists"] else "-", r["mount"],
                         r["path"]] for r in rows], ["NAME", "FILES", "SIZE", "MOUNT", "PATH"])


@command(cache_group, "warm")
@click.argument("name")
@click.argument("packages", nargs=-1)
@click.option("-r", "--requirements", type=click.Path(dir_okay=False), help="pip/uv: a requirements file to fill from.")
@click.option("--image", help="The image to build wheels in (default: the sandbox image).")
def cache_warm(name: str, packages: tuple[str, ...], requirements: str | None, image: str | None) -> Any:
    """Fill cache NAME (pip, uv, npm) with PACKAGES from a throwaway container with network."""
    data = _service().warm_cache(name, list(packages), requirements=requirements, image=image, progress=progress)
    return data, f"{name} cache: {data['files']} files, {_size(data['bytes'])} at {data['path']}"


# --- safety: project policy --------------------------------------------------------------------


@cli.group("policy")
def policy_group() -> None:
    """The project policy (.taskbox/policy.toml): network, limits, command and file rules."""


@command(policy_group, "show")
@click.option("--repo", default=".", show_default=True, help="The project's git repository.")
def policy_show(repo: str) -> Any:
    """Show the project's effective policy (defaults where it has no policy file)."""
    from . import policy
    from .git import repo_root

    pol = policy.load(repo_root(Path(repo).expanduser().resolve()))
    data = pol.to_dict()
    net = pol.network
    lines = [pairs([("policy file", f"{pol.path}" + ("" if pol.exists else " (absent: defaults)")),
                    ("default action", pol.default),
                    ("network mode", net.mode or "(settings default)"),
                    ("allow", ", ".join(net.allow) or "-"), ("deny", ", ".join(net.deny) or "-"),
                    ("allow private", ", ".join(net.allow_private) or "-"),
                    ("ports", ", ".join(str(p) for p in net.ports)),
                    ("limits", ", ".join(f"{k}={v}" for k, v in data["limits"].items() if v is not None) or "-"),
                    ("mounts", ", ".join(pol.mounts) or "-")])]
    if pol.rules:
        lines.append("\n" + table([(r.id or f"rules[{i}]", r.action, ",".join(r.tools),
                                     r.pattern or r.glob or f"risk>={r.risk}", r.reason)
                                    for i, r in enumerate(pol.rules)], ["rule", "action", "tools", "match", "reason"]))
    return data, "\n".join(lines)


@command(policy_group, "check", context_settings={"ignore_unknown_options": True})
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--repo", default=".", show_default=True, help="The project's git repository.")
@click.option("--tool", default="exec", show_default=True, help="The tool to check (exec, write_file, ...).")
@click.option("--url", "is_url", is_flag=True, help="CMD is a URL or host: check it against the network rules.")
def policy_check(cmd: tuple[str, ...], repo: str, tool: str, is_url: bool) -> Any:
    """Say what the policy decides for a command (or, with --url, a host), and by which rule."""
    from urllib.parse import urlsplit

    from . import policy
    from .git import repo_root
    from .network import EgressRules

    root = repo_root(Path(repo).expanduser().resolve())
    pol = policy.load(root)
    text = " ".join(cmd)
    if is_url:
        split = urlsplit(text if "://" in text else f"http://{text}")
        net = pol.network
        decision = EgressRules.build(net.allow, net.deny, net.allow_private, net.ports).decide(
            split.hostname or text, split.port or (443 if split.scheme == "https" else 80))
        data = decision.to_dict()
        human = f"{data['decision']} {decision.host} (rule: {decision.rule})"
    else:
        key = "command" if tool == "exec" else "path"
        res = pol.evaluate(tool, {key: text}, root)
        data = res.to_dict()
        human = f"{res.action} (rule: {res.rule}) — {res.reason}" + (f"; risk {res.risk}" if res.risk else "")
    if data.get("decision", data.get("action")) == "deny":
        click.echo(human)
        sys.exit(9)
    return data, human


@command(policy_group, "audit")
@click.argument("task_id")
@click.option("--limit", default=50, show_default=True)
@click.option("--denied", is_flag=True, help="Only refused calls and requests.")
def policy_audit(task_id: str, limit: int, denied: bool) -> Any:
    """A task's audit log: every policy and egress decision, with the rule that made it."""
    svc = _service()
    entries = svc.audit_log(task_id, limit, "deny" if denied else None)
    rows = [(ago(e["time"]), e["kind"], e["decision"], e["rule"], str(e["subject"])[:70]) for e in entries]
    return entries, table(rows, ["when", "kind", "decision", "rule", "subject"]) if rows else "no entries"


# --- agents: MCP server and integrations -----------------------------------------------------


@cli.command("mcp")
@click.option("--http", "http", is_flag=True, help="Serve streamable HTTP instead of stdio.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (with --http).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (with --http).")
def mcp(http: bool, host: str, port: int) -> None:
    """Serve the taskbox MCP tools to agents: stdio by default, or HTTP at http://HOST:PORT/mcp."""
    from .mcp_server import serve_http
    from .mcp_stdio import serve

    try:
        if http:
            click.echo(f"taskbox MCP server on http://{host}:{port}/mcp", err=True)
            serve_http(host, port)
        else:
            serve()
    except TaskboxError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        pass


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any address but loopback needs the access token (made under "
                   "TASKBOX_HOME on first use).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="Another origin (scheme://host:port) whose pages may call the API (repeatable).")
def serve(host: str, port: int, allow_origins: tuple[str, ...]) -> None:
    """Serve the HTTP API, live events, MCP (/mcp), metrics (/metrics) and the web dashboard."""
    from . import web

    def ready(url: str, token_file: str | None) -> None:
        click.echo(f"taskbox dashboard on {url} (API {url}api/, events {url}api/events, MCP {url}mcp, "
                   f"metrics {url}metrics)", err=True)
        if token_file:
            click.echo(f"access token in {token_file} (owner-only): send it as `Authorization: Bearer`, or open "
                       f"{url}?token=<token> once in the browser", err=True)

    try:
        web.serve(_service(), host, port, allow_origins=allow_origins, ready=ready)
    except TaskboxError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        pass


def _watch_table(svc: TaskService, statuses: list[str] | None, cpu: dict[str, tuple[float, float]]) -> str:
    import time

    rows = []
    for t in svc.list_tasks(statuses):
        usage = svc.resource_usage(t.id) if str(t.status) == "active" else None
        cpu_text, mem_text = "-", "-"
        if usage:
            mem_text = f"{_size(usage['memory_bytes'])} ({usage['memory_percent']}%)"
            now, seconds = time.monotonic(), usage.get("cpu_seconds")
            before = cpu.get(t.id)
            if seconds is not None:
                if before is not None and now > before[1]:
                    cpu_text = f"{max(0.0, 100 * (seconds - before[0]) / (now - before[1])):.0f}%"
                cpu[t.id] = (seconds, now)
        rows.append([t.id, str(t.status), ", ".join(svc.current_agents(t.id)) or t.agent, t.branch, cpu_text,
                     mem_text, ago(t.last_active)])
    return table(rows, ["task", "status", "agent", "branch", "cpu", "memory", "last activity"]) if rows \
        else "no tasks"


@cli.command("watch")
@click.option("--status", "statuses", multiple=True, help="Only tasks in this status (repeatable).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.2, 3600),
              help="Seconds between redraws when nothing happens (any event redraws at once).")
@click.option("--once", is_flag=True, help="Print the table once and exit.")
def watch(statuses: tuple[str, ...], interval: float, once: bool) -> None:
    """The live task table in the terminal: status, agent, branch, CPU, memory, last activity."""
    import time

    svc = _service()
    cpu: dict[str, tuple[float, float]] = {}
    try:
        last = svc.last_event_id()
        while True:
            text = _watch_table(svc, list(statuses) or None, cpu)
            if once:
                click.echo(text)
                return
            newest = svc.events(after_id=max(0, last - 1), limit=1)
            note = f"last event: {newest[-1]['type']} {newest[-1]['task_id'] or ''}" if newest else ""
            click.echo(("\x1b[H\x1b[2J" if sys.stdout.isatty() else "") + text + f"\n\n{note}".rstrip()
                       + f"\n(updated {time.strftime('%H:%M:%S')}; Ctrl-C to stop)\n")
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline:
                fresh = svc.events(after_id=last, limit=1000)
                if fresh:
                    last = fresh[-1]["id"]
                    if any(e["type"] != "exec.output" for e in fresh):
                        break  # a running command's output changes nothing in the table
                time.sleep(0.25)
    except TaskboxError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        pass


@cli.group("integrate")
def integrate_group() -> None:
    """Configure an agent (OpenCode, Claude Code, Codex) to use the taskbox MCP server."""


def _integrate(agent: str, directory: str, name: str, guard: bool, http: str | None = None,
               dry_run: bool = False) -> Any:
    from .integrate import install_guard, integrate

    done = [integrate(agent, directory, name=name, url=http, dry_run=dry_run)]
    if guard:
        done.append(install_guard(agent, directory, server=name, dry_run=dry_run))
    data = done[0].to_dict() if not guard else [d.to_dict() for d in done]
    return data, "\n".join(d.describe() for d in done)


_GUARD_HELP = ("Also install the agent-side hook that, while a task is attached, lets only read-only host tools "
               "and taskbox's own tools run.")
_HTTP_HELP = "Point the agent at a running `taskbox mcp --http` server at this URL instead of starting one."
_DRY_HELP = "Show what would change without writing anything."


@command(integrate_group, "opencode")
@click.option("--dir", "directory", default=".", show_default=True, help="The project directory.")
@click.option("--name", default="taskbox", show_default=True, help="Name of the server entry.")
@click.option("--guard", is_flag=True, help=_GUARD_HELP)
@click.option("--http", metavar="URL", help=_HTTP_HELP)
@click.option("--dry-run", is_flag=True, help=_DRY_HELP)
def integrate_opencode(directory: str, name: str, guard: bool, http: str | None, dry_run: bool) -> Any:
    """Add the taskbox MCP server to opencode.json (merged with what is there)."""
    return _integrate("opencode", directory, name, guard, http, dry_run)


@command(integrate_group, "claude-code")
@click.option("--dir", "directory", default=".", show_default=True, help="The project directory.")
@click.option("--name", default="taskbox", show_default=True, help="Name of the server entry.")
@click.option("--guard", is_flag=True, help=_GUARD_HELP)
@click.option("--http", metavar="URL", help=_HTTP_HELP)
@click.option("--dry-run", is_flag=True, help=_DRY_HELP)
def integrate_claude_code(directory: str, name: str, guard: bool, http: str | None, dry_run: bool) -> Any:
    """Add the taskbox MCP server to .mcp.json (merged with what is there)."""
    return _integrate("claude-code", directory, name, guard, http, dry_run)


@command(integrate_group, "codex")
@click.option("--name", default="taskbox", show_default=True, help="Name of the server entry.")
@click.option("--http", metavar="URL", help=_HTTP_HELP)
@click.option("--dry-run", is_flag=True, help=_DRY_HELP)
def integrate_codex(name: str, http: str | None, dry_run: bool) -> Any:
    """Add the taskbox MCP server to Codex's config.toml ($CODEX_HOME, default ~/.codex), merged."""
    return _integrate("codex", ".", name, False, http, dry_run)


@cli.command("guard")
@click.option("--agent", type=click.Choice(["claude-code", "opencode"]), required=True)
@click.option("--dir", "directory", help="Project directory (default: from the hook payload, or here).")
@click.option("--tool", help="The agent's tool name (default: from the hook payload on stdin).")
@click.option("--server", default="taskbox", show_default=True, help="Name of taskbox's MCP server entry.")
def guard(agent: str, directory: str | None, tool: str | None, server: str) -> None:
    """Hook for agents: exit 2 (refuse) for every host-side tool but reads while a task is attached.

    Claude Code passes its PreToolUse payload (tool_name, cwd) on stdin; OpenCode's plugin
    passes --dir and --tool. Installed by `taskbox integrate ... --guard`.
    """
    from .guard import allowed_while_attached

    if tool is None:
        try:
            payload = json.loads(sys.stdin.read() or "{}")
        except json.JSONDecodeError as exc:
            click.echo(f"taskbox guard: unreadable hook payload ({exc}); not blocking", err=True)
            sys.exit(1)  # for Claude Code, a non-blocking error shown to the user
        tool = str(payload.get("tool_name") or "")
        directory = directory or payload.get("cwd") or os.environ.get("CLAUDE_PROJECT_DIR")
    if allowed_while_attached(tool, server):
        return  # reads and taskbox's own tools: no need to open the registry
    try:
        decision = _service().guard(directory or ".", tool, server)
    except TaskboxError as exc:
        click.echo(f"taskbox guard: {exc.message}; not blocking", err=True)
        sys.exit(1)
    if not decision["allowed"]:
        click.echo(decision["reason"], err=True)
        sys.exit(2)  # both agents treat exit 2 as "refuse, and tell the model why"


def main() -> None:
    """The ``taskbox`` entry point: whatever fails, one line on stderr and an exit code, never a traceback."""
    from .mcp_stdio import fast_path

    try:
        if not fast_path(sys.argv[1:]):
            cli(prog_name="taskbox")
    except TaskboxError as exc:  # raised outside a command's own handler (e.g. opening the registry)
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - a bug or an untranslated fault: still one line
        if os.environ.get("TASKBOX_DEBUG"):
            raise
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        click.echo(f"error: internal error ({text}); run with TASKBOX_DEBUG=1 for the traceback", err=True)
        sys.exit(1)
