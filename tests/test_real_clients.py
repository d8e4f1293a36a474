"""The real OpenCode, Claude Code and Codex CLIs drive `taskbox mcp` against a scripted model.

Each client is configured the way a user would (`taskbox integrate opencode|claude-code
--guard`) in a fresh project and a temporary HOME, and runs non-interactively (`opencode
run`, `claude -p`). The model is a script on loopback (tests/scripted_model.py): turn by
turn it creates a task, attaches, runs a command (90 s in OpenCode, whose MCP client times
out at 60 s unless the server sends progress and the entry carries a timeout), runs a
background job and waits for it, takes a checkpoint, reads a host file (allowed), then calls
every host-side tool the client offers that may write — each must be refused by the guard —
and completes the task. The branch in the user's repository must hold the work only.
A second run per client starts a long command and interrupts the client: the command's
processes must die in the container and the execution be recorded as cancelled.

Codex (`taskbox integrate codex`, its user configuration in a temporary CODEX_HOME; `codex
exec` with the scripted model as a Responses API provider, given as `-c` options the way
`taskbox run --agent codex --base-url` gives them) creates a task, runs commands in its sandbox
and completes it, over stdio and over `--http`; it has no guard (`integrate --guard` covers
OpenCode and Claude Code). A server that takes 3 s to start still has its tools offered from
the first turn: the table integrate writes makes Codex wait for it (an optional server gets 1 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskbox import Status, TaskService, agents
from taskbox.guard import allowed_while_attached

from .agent_clients import installed
from .conftest import git
from .scripted_model import MARKER, Call, Script, ScriptedModel, Step, Turn, sample_args

pytestmark = pytest.mark.docker

LONG = {"opencode": 90, "claude-code": 5, "codex": 5}  # seconds of the long command (the 90 s one is OpenCode's)
REFUSED = "is attached in this repository"  # the guard's reason, shown to the model as the tool's result


@pytest.fixture(scope="module")
def clients() -> dict[str, Path]:
    return installed()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = tmp_path / "project"
    p.mkdir()
    git(p, "init", "-q", "-b", "main")
    (p / "README.md").write_text("hello from the user\n")
    (p / ".gitignore").write_text("build/\n")
    git(p, "add", ".")
    git(p, "commit", "-qm", "initial")
    return p


def own(base: str) -> Callable[[Turn], str]:
    """The client's name for taskbox tool ``base`` (`taskbox_x` in OpenCode, `mcp__taskbox__x` in Claude Code)."""
    def name(turn: Turn) -> str:
        found = [n for n in turn.tools if n.lower() in (f"taskbox_{base}", f"mcp__taskbox__{base}")]
        assert found, f"the client offers no taskbox tool {base}: {sorted(turn.tools)}"
        return found[0]
    return name


def tool(base: str, **args: Any) -> Step:
    return lambda turn: Call(own(base)(turn), args)


def last_json(turn: Turn) -> dict[str, Any]:
    text = turn.results[-1]
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def host_tool_args(name: str, schema: dict[str, Any], repo: Path) -> dict[str, Any]:
    """Arguments that would write into the user's repository if the tool ran."""
    leak = str(repo / f"leak-{name.lower()}.txt")
    patch = f"*** Begin Patch\n*** Add File: {leak}\n+leak\n*** End Patch\n"
    hints = {"command": f"echo leak > {leak}", "cmd": f"echo leak > {leak}", "filePath": leak, "file_path": leak,
             "path": leak, "notebook_path": str(repo / "leak.ipynb"), "content": "leak", "new_source": "leak",
             "oldString": "hello", "old_string": "hello", "newString": "leak", "new_string": "leak",
             "patchText": patch, "patch": patch, "input": patch, "description": "write", "prompt": "write",
             "url": "http://127.0.0.1:9/", "name": "x", "skill": "x", "shell_id": "x", "bash_id": "x",
             "task_id": "x", "plan": "x", "edits": [{"old_string": "hello", "new_string": "leak"}],
             "cron": "*/5 * * * *", "timeout_ms": 5000}
    if name.lower() == "edit":  # an existing file the model has read: the client's own checks pass
        hints.update(filePath=str(repo / "README.md"), file_path=str(repo / "README.md"))
    args = sample_args(schema, hints)
    args.update({k: v for k, v in hints.items() if k in (schema.get("properties") or {}) and k not in args})
    return args


def story(client: str, repo: Path, task_id: str) -> tuple[Script, list[str]]:
    """The scripted conversation, and (filled in once the client's tools are known) the write tools tried."""
    tried: list[str] = []
    read_tool = {"opencode": "read", "claude-code": "Read"}[client]
    path_key = {"opencode": "filePath", "claude-code": "file_path"}[client]
    steps: list[Step] = [
        tool("create_task_sandbox", task_id=task_id, task_description=f"{client} story", workspace_path=str(repo),
             agent_name=client, agent_model="scripted"),
        tool("attach_agent_to_task", task_id=task_id, agent_name=client, agent_model="scripted",
             session_id=f"s-{task_id}"),
        tool("execute_in_task", task_id=task_id, timeout=LONG[client] + 120,
             command=f"sleep {LONG[client]} && echo done > long.txt && echo long-done"),
        tool("execute_in_task", task_id=task_id, background=True,
             command="for i in 1 2 3; do echo tick $i; sleep 1; done; echo job-done"),
        lambda turn: Call(own("wait_for_task_job")(turn), {"task_id": task_id, "job_id": last_json(turn)["job_id"],
                                                           "timeout": 60}),
        lambda turn: Call(own("read_task_job_output")(turn), {"task_id": task_id,
                                                              "job_id": last_json(turn)["job_id"]}),
        tool("create_task_checkpoint", task_id=task_id, checkpoint_name="before-guard"),
        lambda turn: Call(read_tool, {path_key: str(repo / "README.md")}),  # a read: allowed while attached
    ]

    def plan(turn: Turn) -> list[Step]:
        writers = sorted(n for n in turn.tools if not allowed_while_attached(n, "taskbox"))
        tried.extend(writers)
        tail: list[Step] = [(lambda turn, n=n: Call(n, host_tool_args(n, turn.tools[n], repo))) for n in writers]
        return [*tail, tool("complete_task", task_id=task_id, summary=f"{client} story done"),
                lambda turn: "all done"]

    return Script(steps, plan), tried


def client_env(client: str, home: Path, repo: Path, model_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "OPENAI_", "CLAUDE", "OPENCODE", "CODEX"))}
    env.update(HOME=str(home), PWD=str(repo), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local/share"), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_STATE_HOME=str(home / ".local/state"))
    if client == "opencode":
        env.update(OPENCODE_DISABLE_MODELS_FETCH="1", OPENCODE_DISABLE_AUTOUPDATE="1")
        config = {"$schema": "https://opencode.ai/config.json", "permission": "allow", "autoupdate": False,
                  "share": "disabled", "model": "scripted/m", "small_model": "scripted/m",
                  "provider": {"scripted": {"npm": "@ai-sdk/openai-compatible", "name": "Scripted",
                                            "options": {"baseURL": f"{model_url}/v1", "apiKey": "dummy"},
                                            "models": {"m": {"name": "m", "tool_call": True,
                                                             "limit": {"context": 100000, "output": 4096}}}}}}
        (home / ".config/opencode").mkdir(parents=True, exist_ok=True)
        (home / ".config/opencode/opencode.json").write_text(json.dumps(config))
    elif client == "codex":  # the provider and model are options (client_argv); the key is read from here
        env.update(CODEX_HOME=str(codex_home(home)), OPENAI_API_KEY="sk-dummy")
    else:
        env.update(ANTHROPIC_BASE_URL=model_url, ANTHROPIC_API_KEY="sk-ant-dummy", IS_SANDBOX="1",
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1", DISABLE_TELEMETRY="1",
                   MCP_TIMEOUT="30000", ENABLE_TOOL_SEARCH="false")  # MCP tools in the list, not deferred
        home.mkdir(parents=True, exist_ok=True)
    return env


def codex_home(home: Path) -> Path:
    return home / ".codex"


def client_argv(client: str, exe: Path, repo: Path, prompt: str, model_url: str) -> list[str]:
    if client == "opencode":
        return [str(exe), "run", "--format", "json", "--title", "taskbox test", "--dir", str(repo), prompt]
    if client == "codex":  # Codex's own sandbox stays on (read-only): the work goes through taskbox
        provider = agents.options(agents.preset("codex"), base_url=f"{model_url}/v1", model="scripted")
        return [str(exe), "exec", "--skip-git-repo-check", "--json", "--cd", str(repo), *provider, prompt]
    return [str(exe), "-p", prompt, "--output-format", "stream-json", "--verbose", "--model", "claude-sonnet-4-5",
            "--mcp-config", str(repo / ".mcp.json"), "--dangerously-skip-permissions"]


def integrate(client: str, repo: Path, home: Path, *extra: str) -> None:
    """`taskbox integrate` as a user runs it: the project's files (and the guard), or Codex's user config."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    where = ["--dir", str(repo), "--guard", *extra]
    if client == "codex":
        env["CODEX_HOME"], where = str(codex_home(home)), list(extra)
    proc = subprocess.run([sys.executable, "-m", "taskbox", "integrate", client, *where],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr


CONFIG_FILES = ("opencode.json", ".opencode/", ".mcp.json", ".claude/")


def user_changes(repo: Path) -> list[str]:
    """Paths changed or added in the user's own checkout, besides the client configuration integrate wrote."""
    lines = git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    return [line[3:] for line in lines if not line[3:].startswith(CONFIG_FILES)]


@pytest.mark.parametrize("client", ["opencode", "claude-code"])
def test_real_client_story(client: str, clients: dict[str, Path], svc: TaskService, project: Path,
                           tmp_path: Path) -> None:
    exe = clients["opencode" if client == "opencode" else "claude"]
    integrate(client, project, tmp_path / "client-home")
    task_id = f"{client.split('-')[0]}-story"
    script, tried = story(client, project, task_id)
    with ScriptedModel(script) as model:
        env = client_env(client, tmp_path / "client-home", project, model.url)
        proc = subprocess.run(client_argv(client, exe, project, f"{MARKER}: do the task in a taskbox sandbox",
                                          model.url),
                              cwd=project, env=env, capture_output=True, text=True, timeout=LONG[client] + 240)
        requests = [r for r in model.requests if r["body"].get("tools")]
    detail = f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}\n" \
             f"script: {json.dumps(script.log)[-3000:]}"
    assert proc.returncode == 0, detail
    assert script.log and script.log[-1]["action"] == "all done", detail
    final = requests[-1]["body"]
    results = (final_results_openai(final) if client == "opencode" else final_results_anthropic(final))

    # the long command completed and its result reached the model (no client timeout)
    assert "long-done" in results[2], results[2]
    # the background job ran to its end; its output was read
    assert "job-done" in results[5], results[5]
    # a read of a host file is allowed while attached
    assert "hello from the user" in results[7], results[7]
    # every other host tool the client offers was refused by the guard, and nothing leaked
    assert tried, "the client offered no host tool that may write"
    outcome = dict(zip(tried, results[8:8 + len(tried)], strict=True))
    refused = {n for n, text in outcome.items() if REFUSED in text}
    # Some tools check their input against the client's own state first (a cron job id, an
    # open worktree): the client rejects those calls before any hook runs, and they do nothing.
    rejected = {n for n, text in outcome.items() if n not in refused and "tool_use_error" in text}
    assert set(tried) == refused | rejected, {n: t[:300] for n, t in outcome.items() if n not in refused | rejected}
    core = {"opencode": {"bash", "edit", "write", "apply_patch"}, "claude-code": {"Bash", "Edit", "Write"}}[client]
    assert core & set(tried) <= refused, outcome
    assert len(refused) >= len(tried) // 2, (refused, rejected)
    assert user_changes(project) == [], user_changes(project)
    assert [t for t in tried if t.lower() in ("bash", "write", "edit")], tried

    task = svc.get(task_id)
    assert task.status is Status.COMPLETED
    execs = svc.executions(task_id, 100)
    [long_run] = [e for e in execs if "long-done" in str(e.get("command"))]
    assert long_run["exit_code"] == 0
    assert any(c["name"] == "before-guard" for c in svc.list_checkpoints(task_id))
    # the user's repository has the branch with the work only, and the memory beside it
    assert git(project, "ls-tree", "-r", "--name-only", task.branch).split() == [".gitignore", "README.md",
                                                                                 "long.txt"]
    memory = f"refs/taskbox/{task.branch}/memory"
    state = json.loads(git(project, "show", f"{memory}:.task-memory/state.json"))
    assert state["status"] == "completed" and state["metrics"]["tool_calls"] >= 7
    assert f"{client} story done" in git(project, "show", f"{memory}:Plan.md")


def final_results_openai(body: dict[str, Any]) -> list[str]:
    return [str(m.get("content")) for m in body["messages"] if m.get("role") == "tool"]


def final_results_anthropic(body: dict[str, Any]) -> list[str]:
    out = []
    for m in body["messages"]:
        if isinstance(m.get("content"), list):
            out += [json.dumps(b.get("content")) for b in m["content"] if b.get("type") == "tool_result"]
    return out


@contextlib.contextmanager
def http_server() -> Iterator[str]:
    """A `taskbox mcp --http` of this taskbox (and TASKBOX_HOME) on a free loopback port; its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "taskbox", "mcp", "--http", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_codex_drives_taskbox_over_mcp(transport: str, clients: dict[str, Path], svc: TaskService, project: Path,
                                       tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        home = tmp_path / "client-home"
        if transport == "http":  # Codex connects to a running `taskbox mcp --http`
            integrate("codex", project, home, "--http", stack.enter_context(http_server()))
        else:
            integrate("codex", project, home)
        codex_story(clients["codex"], svc, project, home)


def test_codex_waits_for_a_slow_taskbox_server(clients: dict[str, Path], svc: TaskService, project: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table integrate writes makes Codex wait for the server: an optional one gets 1 s, and
    a server still starting then is left out of the session (this one takes 3 s)."""
    from taskbox.integrate import integrate as integrate_config
    from taskbox.integrate import server_command

    home = tmp_path / "client-home"
    monkeypatch.setenv("CODEX_HOME", str(codex_home(home)))
    slow = ["sh", "-c", f"sleep 3 && exec {shlex.join(server_command())}"]
    integrate_config("codex", command=slow)
    script = Script([tool("list_active_tasks"), lambda turn: "listed"])
    with ScriptedModel(script) as model:
        proc = subprocess.run(client_argv("codex", clients["codex"], project, f"{MARKER}: list", model.url),
                              cwd=project, env=client_env("codex", home, project, model.url),
                              capture_output=True, text=True, timeout=120)
    detail = f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}\n" \
             f"script: {json.dumps(script.log)[-2000:]}"
    assert proc.returncode == 0, detail
    assert [e["action"] for e in script.log] == [{"name": "mcp__taskbox__list_active_tasks", "args": {}},
                                                 "listed"], detail
    assert '"type":"mcp_tool_call","server":"taskbox","tool":"list_active_tasks"' in proc.stdout, detail


def codex_story(exe: Path, svc: TaskService, project: Path, home: Path) -> None:
    task_id = "codex-story"
    steps: list[Step] = [
        tool("create_task_sandbox", task_id=task_id, task_description="codex story", workspace_path=str(project),
             agent_name="codex", agent_model="scripted"),
        tool("attach_agent_to_task", task_id=task_id, agent_name="codex", agent_model="scripted",
             session_id=f"s-{task_id}"),
        tool("execute_in_task", task_id=task_id, timeout=120,
             command="echo written in the sandbox > codex.txt && id -un && uname -s"),
        tool("read_task_file", task_id=task_id, path="codex.txt"),
        tool("complete_task", task_id=task_id, summary="codex story done"),
        lambda turn: "all done",
    ]
    script = Script(steps)
    with ScriptedModel(script) as model:
        env = client_env("codex", home, project, model.url)
        proc = subprocess.run(client_argv("codex", exe, project,
                                          f"{MARKER}: do the task in a taskbox sandbox", model.url),
                              cwd=project, env=env, capture_output=True, text=True, timeout=300)
        requests = [r for r in model.requests if r["path"].endswith("/responses") and r["body"].get("tools")]
    detail = f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}\n" \
             f"script: {json.dumps(script.log)[-3000:]}"
    assert proc.returncode == 0, detail
    assert script.log and script.log[-1]["action"] == "all done", detail
    # Codex offered taskbox's tools from the first turn on (one namespace per server: mcp__taskbox)
    first = requests[0]["body"]
    [namespace] = [t for t in first["tools"] if t.get("type") == "namespace" and t.get("name") == "mcp__taskbox"]
    assert {"create_task_sandbox", "execute_in_task", "complete_task"} <= {t["name"] for t in namespace["tools"]}
    # each call went to the taskbox server and succeeded (codex exec --json reports them as items)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    calls = [e["item"] for e in events if e.get("type") == "item.completed"
             and e.get("item", {}).get("type") == "mcp_tool_call"]
    assert [(c["server"], c["tool"], c["status"]) for c in calls] == [
        ("taskbox", name, "completed") for name in ("create_task_sandbox", "attach_agent_to_task",
                                                    "execute_in_task", "read_task_file", "complete_task")], detail
    results = [str(m.get("output")) for m in requests[-1]["body"]["input"] if m.get("type") == "function_call_output"]
    assert "Linux" in results[2] and "written in the sandbox" in results[3], results

    task = svc.get(task_id)
    assert task.status is Status.COMPLETED
    [run] = [e for e in svc.executions(task_id, 100) if "codex.txt" in str(e.get("command"))]
    assert run["exit_code"] == 0
    # the user's repository has the branch with the work only, and the memory beside it
    assert git(project, "ls-tree", "-r", "--name-only", task.branch).split() == [".gitignore", "README.md",
                                                                                 "codex.txt"]
    assert git(project, "show", f"{task.branch}:codex.txt") == "written in the sandbox\n"
    memory = f"refs/taskbox/{task.branch}/memory"
    state = json.loads(git(project, "show", f"{memory}:.task-memory/state.json"))
    assert state["status"] == "completed" and "codex" in state["metrics"]["agents_used"]
    assert "codex story done" in git(project, "show", f"{memory}:Plan.md")
    assert user_changes(project) == [], user_changes(project)


@pytest.mark.parametrize("client", ["opencode", "claude-code", "codex"])
def test_interrupted_client_stops_its_command(client: str, clients: dict[str, Path], svc: TaskService,
                                              project: Path, tmp_path: Path) -> None:
    exe = clients[{"opencode": "opencode", "claude-code": "claude", "codex": "codex"}[client]]
    integrate(client, project, tmp_path / "client-home")
    task_id = f"{client.split('-')[0]}-cancel"
    ws = Path(svc.paths.workspace(task_id))
    steps: list[Step] = [
        tool("create_task_sandbox", task_id=task_id, task_description=f"{client} cancel", workspace_path=str(project),
             agent_name=client, agent_model="scripted"),
        tool("attach_agent_to_task", task_id=task_id, agent_name=client, agent_model="scripted",
             session_id=f"s-{task_id}"),
        tool("execute_in_task", task_id=task_id, command="sleep 8; echo late > too-late.txt"),
        lambda turn: "stopped",
    ]
    with ScriptedModel(Script(steps)) as model:
        env = client_env(client, tmp_path / "client-home", project, model.url)
        proc = subprocess.Popen(client_argv(client, exe, project, f"{MARKER}: start and be interrupted", model.url),
                                cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if svc.registry.task_exists(task_id) and svc.running_work(svc.get(task_id)):
                    break
                time.sleep(0.2)
            assert svc.running_work(svc.get(task_id)), "the command never started"
            proc.send_signal(signal.SIGINT)  # the user presses Ctrl-C
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(15)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and svc.running_work(svc.get(task_id)):
        time.sleep(0.2)
    assert not svc.running_work(svc.get(task_id)), "the command outlived the client"
    while time.monotonic() < deadline and not any(e.get("status") == "cancelled"
                                                  for e in svc.executions(task_id, 20)):
        time.sleep(0.2)
    assert any(e.get("status") == "cancelled" for e in svc.executions(task_id, 20)), svc.executions(task_id, 20)
    time.sleep(10)  # past the command's own end: it must not have written its file
    assert not (ws / "too-late.txt").exists()
