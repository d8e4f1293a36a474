"""Agents inside the sandbox (`taskbox run`), for real.

The real agent CLIs (from `taskbox image build --agents`: OpenCode, Claude Code and Codex) run
in a task's container against ``tests/model_stub.py``, served by a stand-in container on the
egress proxy's outside network under the provider's API host name (``api.anthropic.com``,
``api.openai.com``): the sandbox reaches it only through the proxy, nothing leaves the machine. The interactive run is driven
through tmux on the host (send keys, read the screen, detach, attach again).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from taskbox import InvalidInput, NotFound, TaskBusy, TaskService, agents, images
from taskbox.sandbox import LABEL_HOME

from .conftest import IMAGE, file_holds, git, run_cli

STUB = (Path(__file__).parent / "model_stub.py").read_text()
ALIASES = ["api.anthropic.com", "api.openai.com", "elsewhere.test"]
SECRET = "sk-test-" + secrets.token_hex(12)


# --- presets (no Docker) -------------------------------------------------------------------------


def test_presets_and_packages() -> None:
    claude = agents.preset("claude-code")
    assert claude.command("do it")[:3] == ["claude", "-p", "do it"]
    assert agents.preset("shell").command(None, ["-x"]) == ["bash", "-l", "-x"]
    assert "api.anthropic.com" in claude.hosts
    with pytest.raises(InvalidInput, match="unknown agent 'gpt'; known agents: opencode, claude-code"):
        agents.preset("gpt")
    specs = agents.packages()
    assert all("@" in s[1:] and s.rsplit("@", 1)[1][0].isdigit() for s in specs)  # pinned
    assert agents.packages(["codex"], ["cowsay@1.6.0"]) == ["@openai/codex@0.171.0", "cowsay@1.6.0"]
    for bad in ("cowsay", "cowsay@latest", "x@^1.0.0", "--evil@1.0.0"):
        with pytest.raises(InvalidInput):
            agents.packages([], [bad])
    assert agents.environment(claude, base_url="http://stub.test:8080")["ANTHROPIC_BASE_URL"] == "http://stub.test:8080"
    config = json.loads(agents.environment(agents.preset("opencode"), base_url="http://h.test/v1",
                                           model="m1")["OPENCODE_CONFIG_CONTENT"])
    assert config["model"] == "taskbox/m1"
    with pytest.raises(InvalidInput):
        agents.environment(claude, base_url="file:///etc/passwd")
    codex = agents.preset("codex")  # its endpoint and model are options: a Responses API provider of its own
    opts = agents.options(codex, base_url="http://api.openai.com/v1", model="m2")
    assert opts[:2] == ["-c", 'model_provider="taskbox"'] and opts[-2:] == ["-m", "m2"]
    assert 'base_url = "http://api.openai.com/v1"' in opts[3] and "supports_websockets = false" in opts[3]
    assert agents.options(claude, base_url="http://h.test", model="m") == []
    assert agents.environment(codex, base_url="http://h.test/v1") == {}
    text = images.agents_recipe("taskbox-sandbox:abc", specs)
    assert "tmux" in text and " ".join(sorted(specs)) in text


# --- the shell agent, through the CLI --------------------------------------------------------------


def test_run_shell_prompt_records_and_fetches(svc: TaskService, repo: Path, home: Path) -> None:
    task = svc.create_task(repo, "shell run")
    env = {"TASKBOX_SECRET_RUN_TOKEN": SECRET}
    r = run_cli("run", task.id, "--agent", "shell", "--secret", "RUN_TOKEN", "-p",
                "echo work > work.txt; echo token=$RUN_TOKEN; echo to-stderr >&2", env=env)
    assert r.returncode == 0, r.stderr
    assert "token=[REDACTED:RUN_TOKEN]" in r.stdout and SECRET not in r.stdout + r.stderr
    assert "shell ended (exit 0)" in r.stderr
    assert git(repo, "show", f"{task.branch}:work.txt") == "work\n"  # the branch reached the user's repo
    types = [e["type"] for e in svc.registry.events(task.id)]
    assert types.index("agent.started") < types.index("agent.exited") < types.index("session.detached")
    assert svc.executions(task.id)[-1]["command"].startswith("bash -lc echo work")
    assert not svc.registry.sessions(task.id, open_only=True)  # the run's session is over
    assert "shell (unknown) attached" in (Path(task.workspace_path) / "Plan.md").read_text()  # the iteration log
    _assert_secret_nowhere(home, Path(task.workspace_path), svc, task.id)


def test_run_bad_input_leaves_the_task_intact(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "bad input")
    before = svc.get(task.id)
    r = run_cli("run", task.id, "--agent", "gpt5", "-p", "x")
    assert r.returncode == 2 and r.stderr.strip() == ("error: unknown agent 'gpt5'; known agents: opencode, "
                                                       "claude-code, codex, shell")
    r = run_cli("run", task.id, "--secret", "NOT_THERE", "-p", "true")
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "no secret NOT_THERE" in r.stderr
    r = run_cli("run", task.id, "--agent", "claude-code", "-p", "hi")  # network none: no model reachable
    assert r.returncode == 2 and "has no network (mode none)" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("run", task.id, "--agent", "codex", "-p", "hi", "--allow-domain", "x")
    assert r.returncode == 2
    r = run_cli("run", task.id, "-p", "echo boom >&2; exit 7")  # an agent that exits at once
    assert r.returncode == 7 and "error: agent shell exited at once with code 7: boom" in r.stderr
    after = svc.get(task.id)
    assert after.status.value in ("active", "paused") and after.branch == before.branch
    assert not svc.registry.sessions(task.id, open_only=True)


def test_create_task_run_takes_the_run_options(svc: TaskService, repo: Path, home: Path) -> None:
    env = {"TASKBOX_SECRET_RUN_TOKEN": SECRET}
    # Bad run options are refused before anything is created.
    r = run_cli("create-task", "refused", "--repo", str(repo), "--run", "shell", "--base-url", "http://h.test/v1",
                "-p", "true")
    assert r.returncode == 2 and r.stderr.strip() == "error: agent shell takes no base URL"
    r = run_cli("create-task", "refused", "--repo", str(repo), "--run", "shell", "--secret", "NOT_THERE", "-p", "true")
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "no secret NOT_THERE" in r.stderr
    r = run_cli("create-task", "refused", "--repo", str(repo), "--timeout", "5")
    assert r.returncode == 2 and "go with --run AGENT" in r.stderr
    assert svc.list_tasks() == []
    # The options of `taskbox run` reach the run: prompt, model, secret, timeout, checkpoint, agent arguments.
    r = run_cli("create-task", "run options", "--repo", str(repo), "--run", "shell", "--model", "m-one",
                "--secret", "RUN_TOKEN", "--timeout", "60", "--checkpoint", "--image", IMAGE,
                "-p", 'echo "$0 $1" > args.txt; echo token=$RUN_TOKEN', "--", "first", "second", env=env)
    assert r.returncode == 0, r.stderr
    assert "token=[REDACTED:RUN_TOKEN]" in r.stdout and SECRET not in r.stdout + r.stderr
    [task] = svc.list_tasks()
    assert git(repo, "show", f"{task.branch}:args.txt") == "first second\n"
    assert "shell (m-one) attached" in (Path(task.workspace_path) / "Plan.md").read_text()
    assert svc.list_checkpoints(task.id)  # --checkpoint: one taken when the agent ended
    started = [e["payload"] for e in svc.registry.events(task.id) if e["type"] == "agent.started"]
    assert [p["mode"] for p in started] == ["prompt"]
    _assert_secret_nowhere(home, Path(task.workspace_path), svc, task.id)


def test_run_needs_the_agent_in_the_image(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "no cli", network="open")
    with pytest.raises(Exception, match="not installed in image .*taskbox image build --agents"):
        svc.run_agent(task.id, "codex", prompt="hi")
    assert not svc.registry.sessions(task.id, open_only=True)


# --- real agent CLIs against the stub, through the egress proxy -------------------------------------


@dataclass
class Lab:
    network: str
    subnet: str
    standin: str
    client: object

    def requests(self) -> list[dict]:
        logs = self.client.api.logs(self.standin, stdout=True, stderr=False).decode(errors="replace")  # type: ignore[attr-defined]
        return [json.loads(line) for line in logs.splitlines() if line.startswith("{")]


PATCH = "*** Begin Patch\n*** Add File: /workspace/from_agent.txt\n+written by the agent\n*** End Patch\n"


def _script() -> dict:
    # Tool names and argument names of the three CLIs; the stub picks the one offered. Codex
    # (with a model it has no metadata for) offers no file tool: it edits with `apply_patch`
    # through its command tool, which it runs itself.
    return {"marker": "TBX-SCRIPT", "final": "all done", "steps": [
        {"tool": ["Write", "write", "exec_command"],
         "args": {"file_path": "/workspace/from_agent.txt", "filePath": "/workspace/from_agent.txt",
                  "content": "written by the agent\n", "cmd": f"apply_patch <<'EOF'\n{PATCH}EOF\n"}},
        {"tool": ["Bash", "bash", "exec_command"],
         "args": {"command": "uname -s > /workspace/ran.txt && echo token=$AGENT_TOKEN",
                  "cmd": "uname -s > /workspace/ran.txt && echo token=$AGENT_TOKEN", "description": "run a command"}},
    ]}


@pytest.fixture(scope="module")
def agents_lab(docker_engine) -> Iterator[Lab]:
    images.build_proxy(docker_engine)
    cafile, registry = images.host_npm_settings()
    images.build_agents(docker_engine, packages=agents.packages(), npm_cafile=cafile, npm_registry=registry)
    api = docker_engine.api
    name = f"tbx-agents-out-{secrets.token_hex(3)}"
    net = api.create_network(name, driver="bridge", internal=True, labels={"taskbox.test": "agents"})
    cid = api.create_container(
        IMAGE, ["python3", "-c", STUB, "80"], name=f"{name}-model", user="0",
        environment={"MODEL_STUB_SCRIPT": json.dumps(_script())},
        host_config=api.create_host_config(network_mode=name),
        networking_config=api.create_networking_config({name: api.create_endpoint_config(aliases=ALIASES)}),
    )["Id"]
    api.start(cid)
    subnet = api.inspect_network(net["Id"])["IPAM"]["Config"][0]["Subnet"]
    time.sleep(0.5)
    yield Lab(name, subnet, cid, docker_engine)
    api.remove_container(cid, force=True)
    api.remove_network(net["Id"])


@pytest.fixture
def asvc(home: Path, agents_lab: Lab, docker_engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[TaskService]:
    monkeypatch.setenv("TASKBOX_EGRESS_NETWORK", agents_lab.network)
    service = TaskService(home)
    yield service
    api = docker_engine.api
    for c in api.containers(all=True, filters={"label": f"{LABEL_HOME}={service.home_label}"}):
        api.remove_container(c["Id"], force=True)
    for n in api.networks(filters={"label": f"{LABEL_HOME}={service.home_label}"}):
        api.remove_network(n["Id"])


def _assert_secret_nowhere(home: Path, ws: Path, svc: TaskService, task_id: str) -> None:
    for root in (home, ws):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert not file_holds(path, SECRET.encode()), f"the secret is in {path}"
    api = svc.sandbox.api
    for c in api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
        assert SECRET not in json.dumps(api.inspect_container(c["Id"]))


@pytest.mark.parametrize("agent,key,base,api", [
    ("claude-code", "ANTHROPIC_API_KEY", "http://api.anthropic.com", "/v1/messages"),
    ("opencode", "OPENAI_API_KEY", "http://api.openai.com/v1", "/v1/chat/completions"),
    ("codex", "OPENAI_API_KEY", "http://api.openai.com/v1", "/v1/responses"),  # the Responses API, over SSE
])
def test_real_agent_cli_works_through_the_proxy(asvc: TaskService, agents_lab: Lab, repo: Path, home: Path,
                                                monkeypatch: pytest.MonkeyPatch, agent: str, key: str,
                                                base: str, api: str) -> None:
    monkeypatch.setenv(f"TASKBOX_SECRET_{key}", SECRET)
    monkeypatch.setenv("TASKBOX_SECRET_AGENT_TOKEN", SECRET[::-1])
    options = asvc.agent_task_options(agent, {"metadata": {"sandbox": {"allow_private": [agents_lab.subnet]}}})
    task = asvc.create_task(repo, f"{agent} edits a file", **options)
    assert task.network == "allowlist" and task.image == asvc.settings.agents_image
    seen = len(agents_lab.requests())
    out: list[bytes] = []
    res = asvc.run_agent(task.id, agent, prompt="TBX-SCRIPT write a file and run a command", model="scripted",
                         secrets=[key, "AGENT_TOKEN"], base_url=base, echo=out.append, timeout=240)
    printed = b"".join(out).decode(errors="replace")
    assert res["exit_code"] == 0, printed[-3000:]
    # The stub saw the agent's conversation, under the provider's name, through the proxy.
    reqs = agents_lab.requests()[seen:]
    host = base.split("//")[1].split("/")[0]
    assert any(r["host"] == host and r["path"].split("?")[0] == api and r["tools"] and r["calls"] == 2
               for r in reqs), (reqs, printed[-4000:])
    # The work is on the branch in the user's repository.
    assert git(repo, "show", f"{task.branch}:from_agent.txt") == "written by the agent\n"
    assert git(repo, "show", f"{task.branch}:ran.txt") == "Linux\n"
    # A host outside the preset stays denied (and audited); it never reached the stand-in.
    task = asvc.ensure_running(task.id)
    r = asvc.exec(task.id, "curl -sS -m 8 -o /dev/null -w '%{http_code}' http://elsewhere.test/ 2>&1; true")
    assert r.stdout.strip()[-3:] in ("403", "000"), r.stdout
    assert not any(x["host"] == "elsewhere.test" for x in agents_lab.requests())
    asvc.sync_egress_log(asvc.get(task.id))
    assert any(e["payload"].get("host") == "elsewhere.test" for e in asvc.registry.events(task.id)
               if e["type"] == "egress.denied")
    # The secrets reached the agent's process only.
    assert SECRET not in printed and SECRET[::-1] not in printed
    _assert_secret_nowhere(home, Path(task.workspace_path), asvc, task.id)


# --- interactive, driven through tmux on the host ------------------------------------------------


def _tmux(*args: str, check: bool = True) -> str:
    return subprocess.run(["tmux", *args], check=check, capture_output=True, text=True).stdout


def test_interactive_run_detach_and_attach(svc: TaskService, repo: Path, home: Path, docker_engine) -> None:
    assert shutil.which("tmux"), "tmux is needed on the host for this test (apt-get install tmux)"
    cafile, registry = images.host_npm_settings()
    image = images.build_agents(docker_engine, packages=agents.packages(), npm_cafile=cafile,
                                npm_registry=registry).tag
    task = svc.create_task(repo, "interactive", image=image)
    server = f"tbx-test-{secrets.token_hex(3)}"
    env = " ".join(f"{k}={v}" for k, v in {"TASKBOX_HOME": str(home), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                                           "TASKBOX_STRICT_EVENTS": "1"}.items())
    cmd = f"env {env} {sys.executable} -m taskbox run {task.id} --agent shell; echo RUN-EXIT=$?; sleep 60"
    _tmux("-L", server, "new-session", "-d", "-s", "t", "-x", "120", "-y", "30", cmd)
    pane = "t"
    try:
        def keys(*k: str) -> None:
            _tmux("-L", server, "send-keys", "-t", pane, *k)

        def screen_until(needle: str) -> str:
            deadline = time.monotonic() + 40
            text = ""
            while time.monotonic() < deadline:
                text = _tmux("-L", server, "capture-pane", "-p", "-t", pane)
                if needle in text:
                    return text
                time.sleep(0.2)
            raise AssertionError(f"{needle!r} never showed:\n{text}")

        screen_until("agent@")  # the shell's prompt, inside the sandbox
        keys("echo $((6*7)) > answer.txt; stty size", "Enter")
        screen_until("29 120")  # the window's size reached the container (less the tmux status line)
        keys("C-b", "d")  # detach: the shell keeps running in the container
        screen_until("RUN-EXIT=0")
        assert "keeps running" in _tmux("-L", server, "capture-pane", "-p", "-t", pane)
        assert [s.id for s in svc.registry.sessions(task.id, open_only=True)]  # still attached
        with pytest.raises(TaskBusy):  # a detached agent still runs: the task is not stopped under it
            svc.pause(task.id)
        # Come back to it in a fresh window.
        _tmux("-L", server, "kill-server", check=False)
        # a fresh tmux server: the old one may still be exiting (its last session killed)
        server = f"tbx-test-{secrets.token_hex(3)}"
        cmd = f"env {env} {sys.executable} -m taskbox attach {task.id}; echo ATTACH-EXIT=$?; sleep 60"
        _tmux("-L", server, "new-session", "-d", "-s", "t", "-x", "100", "-y", "25", cmd)
        screen_until("29 120")  # the same shell, its screen redrawn
        keys("echo back-$((1+1))", "Enter")
        screen_until("back-2")
        keys("exit", "Enter")  # the agent ends: the session detaches, the branch is fetched
        screen_until("ATTACH-EXIT=0")
    finally:
        _tmux("-L", server, "kill-server", check=False)
    assert git(repo, "show", f"{task.branch}:answer.txt") == "42\n"
    assert not svc.registry.sessions(task.id, open_only=True)
    with pytest.raises(NotFound, match="no detached agent run"):
        svc.attach_agent(task.id, agents.Terminal(0, 1))


@pytest.mark.parametrize("how", ["detach-keys", "terminal-closed"])
def test_detached_run_keeps_its_lease_and_is_recorded_when_it_ends(svc: TaskService, repo: Path, home: Path,
                                                                   docker_engine, how: str) -> None:
    """Left running (Ctrl-b d, or its terminal closed mid-run) and nobody attaches again: the run's
    watcher renews the lease, then records the run when the agent ends."""
    assert shutil.which("tmux"), "tmux is needed on the host for this test (apt-get install tmux)"
    cafile, registry = images.host_npm_settings()
    image = images.build_agents(docker_engine, packages=agents.packages(), npm_cafile=cafile,
                                npm_registry=registry).tag
    task = svc.create_task(repo, "left running", image=image)
    lease = 6  # seconds: the watcher renews every 2
    server = f"tbx-test-{secrets.token_hex(3)}"
    env = " ".join(f"{k}={v}" for k, v in {"TASKBOX_HOME": str(home), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                                           "TASKBOX_STRICT_EVENTS": "1", "TASKBOX_LEASE_SECONDS": lease,
                                           "TASKBOX_RUN_CHECKPOINT": 1}.items())
    cmd = f"env {env} {sys.executable} -m taskbox run {task.id} --agent shell; echo RUN-EXIT=$?; sleep 60"
    _tmux("-L", server, "new-session", "-d", "-s", "t", "-x", "120", "-y", "30", cmd)
    try:
        def screen_until(needle: str) -> str:
            deadline = time.monotonic() + 40
            text = ""
            while time.monotonic() < deadline:
                text = _tmux("-L", server, "capture-pane", "-p", "-t", "t")
                if needle in text:
                    return text
                time.sleep(0.2)
            raise AssertionError(f"{needle!r} never showed:\n{text}")

        screen_until("agent@")
        _tmux("-L", server, "send-keys", "-t", "t", "echo left > left.txt; echo wrote-$((1+1))", "Enter")
        screen_until("wrote-2")
        if how == "detach-keys":
            _tmux("-L", server, "send-keys", "-t", "t", "C-b", "d")
            assert "keeps running" in screen_until("RUN-EXIT=0")
    finally:
        _tmux("-L", server, "kill-server", check=False)  # the user's terminal is gone (mid-run, or after)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e["type"] == "agent.detached" for e in svc.registry.events(task.id)):
        time.sleep(0.2)
    assert any(e["type"] == "agent.detached" for e in svc.registry.events(task.id))  # a detach, not an end
    [session] = svc.registry.sessions(task.id, open_only=True)
    # Past the lease's length the run still holds the task: its lease was renewed.
    time.sleep(lease + 3)
    [held] = svc.registry.leases(task.id)
    assert held.session_id == session.id and held.expires_at > time.time()
    r = run_cli("detach", task.id, env={"TASKBOX_HOME": str(home)})  # refused on one line, saying why
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert f"agent shell (session {session.id}) left running" in r.stderr
    assert f"taskbox attach {task.id}" in r.stderr
    # The agent ends while nobody is attached (here: its shell is told to exit).
    task = svc.get(task.id)
    svc.sandbox.exec(task.container_id or "", ["tmux", "-L", agents.tmux_socket(session.id), "send-keys", "-t",
                                               "agent", "exit 3", "Enter"], timeout=15)
    deadline = time.monotonic() + 60  # until the run is recorded: the session detached, then the task paused
    while time.monotonic() < deadline and not (any(e["type"] == "session.detached" for e in svc.registry.events(task.id))
                                               and svc.get(task.id).status.value == "paused"):
        time.sleep(0.5)
    assert not svc.registry.sessions(task.id, open_only=True), "the ended run was never recorded"
    assert not svc.registry.leases(task.id)  # the lease is released
    [exited] = [e["payload"] for e in svc.registry.events(task.id) if e["type"] == "agent.exited"]
    assert exited["session_id"] == session.id and exited["exit_code"] == 3
    assert git(repo, "show", f"{task.branch}:left.txt") == "left\n"  # the branch was fetched
    assert f"shell detached, session `{session.id}`" in (Path(task.workspace_path) / "Plan.md").read_text()
    assert session.id not in (svc.get(task.id).metadata.get("runs") or {})
    assert svc.get(task.id).status.value == "paused"
    [ckpt] = svc.list_checkpoints(task.id)  # by the run_checkpoint setting, when the run ended
    assert ckpt["trigger"] == "detach"
    with pytest.raises(NotFound, match="no detached agent run"):
        svc.attach_agent(task.id, agents.Terminal(0, 1))


# --- the MCP tool, through the SDK's own client ---------------------------------------------------


def test_mcp_run_agent_in_task_with_progress_and_cancel(svc: TaskService, repo: Path, home: Path,
                                                        docker_engine) -> None:
    import anyio

    from .test_mcp import call, call_error, stdio

    cafile, registry = images.host_npm_settings()
    images.build_agents(docker_engine, packages=agents.packages(), npm_cafile=cafile, npm_registry=registry)
    progress: list[str] = []

    async def main() -> None:
        async with stdio({"TASKBOX_SECRET_RUN_TOKEN": SECRET})() as client:
            made = await call(client, "create_task_sandbox", task_id="mcp-run", task_description="mcp run",
                              workspace_path=str(repo), run_agent="shell")
            assert made["task_id"] == "mcp-run"
            text = await call_error(client, "run_agent_in_task", task_id="mcp-run", agent="gpt5", prompt="hi")
            assert "unknown agent 'gpt5'" in text
            # The caller attached (exclusive): the run, a session of its own, is refused saying why.
            await call(client, "attach_agent_to_task", task_id="mcp-run", agent_name="orchestrator",
                       agent_model="m", session_id="s-caller")
            text = await call_error(client, "run_agent_in_task", task_id="mcp-run", agent="shell", prompt="true")
            assert "is locked by" in text and "detach the session that holds the task first" in text
            await call(client, "detach_agent_from_task", task_id="mcp-run", session_id="s-caller")
            text = await call_error(client, "run_agent_in_task", task_id="mcp-run", agent="shell", prompt="true",
                                    secrets=["NOT_THERE"])
            assert "no secret NOT_THERE" in text

            async def on_progress(_value: float, _total: float | None, message: str | None) -> None:
                progress.append(message or "")

            res = await client.call_tool("run_agent_in_task", {
                "task_id": "mcp-run", "agent": "shell", "secrets": ["RUN_TOKEN"],
                "prompt": "echo from-mcp > mcp.txt; echo token=$RUN_TOKEN; "
                          "for i in 1 2 3 4; do echo tick-$i; sleep 1; done"}, progress_callback=on_progress)
            assert not res.is_error, res.content
            done = res.structured_content or {}
            assert done["exit_code"] == 0 and done["agent"] == "shell" and done["mode"] == "prompt"
            assert done["last_line"] == "tick-4" and done["commit"]
            # A cancelled run: its processes die in the container, the run is recorded as ended.
            started = anyio.Event()

            async def on_start(_value: float, _total: float | None, message: str | None) -> None:
                if message and "started" in message:
                    started.set()

            async with anyio.create_task_group() as tg:
                async def run() -> None:
                    await client.call_tool("run_agent_in_task", {
                        "task_id": "mcp-run", "agent": "shell",
                        "prompt": "echo started; sleep 8; touch /workspace/too-late"}, progress_callback=on_start)

                tg.start_soon(run)
                with anyio.fail_after(60):
                    await started.wait()
                tg.cancel_scope.cancel()
            status = await call(client, "get_task_status", task_id="mcp-run")  # the server keeps serving
            assert status["task_id"] == "mcp-run"

    anyio.run(main)
    task = svc.get("mcp-run")
    assert task.image == svc.settings.agents_image  # run_agent made it ready for the agent
    assert git(repo, "show", f"{task.branch}:mcp.txt") == "from-mcp\n"
    assert any("tick-" in m for m in progress), progress  # the newest output travelled along
    assert not any(SECRET in m for m in progress)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (svc.registry.sessions(task.id, open_only=True)
                                           or svc.running_work(svc.get(task.id))):
        time.sleep(0.2)
    assert not svc.registry.sessions(task.id, open_only=True) and not svc.running_work(svc.get(task.id))
    exits = [e["payload"]["exit_code"] for e in svc.registry.events(task.id) if e["type"] == "agent.exited"]
    assert exits == [0, -1]
    assert any(e.get("status") == "cancelled" for e in svc.executions(task.id, 50))
    time.sleep(8)  # past the moment the cancelled agent would have written its file
    assert not (Path(task.workspace_path) / "too-late").exists()
    _assert_secret_nowhere(home, Path(task.workspace_path), svc, task.id)
