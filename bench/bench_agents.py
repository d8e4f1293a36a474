#!/usr/bin/env python3
"""Benchmark: agents inside the sandbox (issue 13), every figure against a baseline of the same run.

- ``run → first model request``: seconds from calling `taskbox run TASK --agent A --prompt …`
  (the service call the CLI makes) to the first request the scripted model endpoint
  (``tests/model_stub.py`` in a stand-in container, reached only through the task's egress
  proxy) receives, for Claude Code, OpenCode and Codex; the whole run's seconds beside it. Baseline:
  the same CLI's ``--version`` through a bare ``docker exec`` in the same container (what
  starting the CLI costs without taskbox).
- ``run overhead``: `taskbox run --agent shell --prompt true` (attach, run, commit, fetch,
  detach) against a bare ``docker exec true``.
- ``create with setup``: `create-task` with a project setup (``.env`` copied, one setup
  command) against the same create without one.

    python bench/bench_agents.py [--runs 3] [--json]

Needs the agents image (`taskbox image build --agents`) and the proxy image; builds them if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from taskbox import TaskService, agents, engine, images  # noqa: E402
from taskbox.sandbox import LABEL_HOME  # noqa: E402

STUB = (ROOT / "tests" / "model_stub.py").read_text()
SCRIPT = {"marker": "TBX-SCRIPT", "final": "done", "steps": [
    {"tool": ["Bash", "bash", "exec_command"], "args": {"command": "echo hi > bench.txt", "cmd": "echo hi > bench.txt",
                                                        "description": "write"}}]}
BASES = {"claude-code": ("ANTHROPIC_API_KEY", "http://api.anthropic.com"),
         "opencode": ("OPENAI_API_KEY", "http://api.openai.com/v1"),
         "codex": ("OPENAI_API_KEY", "http://api.openai.com/v1")}
MODELS = {"codex": "scripted"}  # Codex offers its plain function tools to a model it has no metadata for


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
                        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"})


def make_repo(path: Path, setup: bool) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("bench\n")
    if setup:
        (path / ".gitignore").write_text(".env\n")
        (path / ".env").write_text("KEY=value\n")
        (path / ".taskbox").mkdir()
        (path / ".taskbox" / "config.toml").write_text('[setup]\ncopy = [".env"]\ncommands = ["cp .env .env.seen"]\n')
    git(path, "add", ".")
    git(path, "commit", "-qm", "init")
    return path


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    client = engine.connect()
    api = client.api
    images.build_proxy(client)
    cafile, registry = images.host_npm_settings()
    image = images.build_agents(client, packages=agents.packages(), npm_cafile=cafile, npm_registry=registry).tag
    tmp = Path(tempfile.mkdtemp(prefix="tbx-bench-agents-"))
    name = f"tbx-bench-out-{secrets.token_hex(3)}"
    net = api.create_network(name, driver="bridge", internal=True)
    stub = api.create_container(
        images.DEFAULT_IMAGE, ["python3", "-c", STUB, "80"], user="0", environment={"MODEL_STUB_SCRIPT": json.dumps(SCRIPT)},
        host_config=api.create_host_config(network_mode=name),
        networking_config=api.create_networking_config({name: api.create_endpoint_config(
            aliases=["api.anthropic.com", "api.openai.com"])}))["Id"]
    api.start(stub)
    subnet = api.inspect_network(net["Id"])["IPAM"]["Config"][0]["Subnet"]
    os.environ.update(TASKBOX_HOME=str(tmp / "home"), TASKBOX_EGRESS_NETWORK=name,
                      TASKBOX_SECRET_ANTHROPIC_API_KEY="sk-bench-0000", TASKBOX_SECRET_OPENAI_API_KEY="sk-bench-0000")
    svc = TaskService(tmp / "home")
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    def stub_times() -> list[float]:
        logs = api.logs(stub, stdout=True, stderr=False).decode(errors="replace")
        return [json.loads(line)["at"] for line in logs.splitlines() if line.startswith("{")]

    try:
        repo = make_repo(tmp / "repo", setup=False)
        srepo = make_repo(tmp / "srepo", setup=True)
        for i in range(opts.runs):
            for agent, (key, base) in BASES.items():
                options = svc.agent_task_options(agent, {"image": image, "metadata": {
                    "sandbox": {"allow_private": [subnet]}}})
                task = svc.create_task(repo, f"bench {agent} {i}", **options)
                task = svc.ensure_running(task.id)
                t0 = time.perf_counter()
                exec_id = api.exec_create(task.container_id, [agents.preset(agent).binary, "--version"])["Id"]
                api.exec_start(exec_id)
                add(f"{agent}: bare docker exec --version (baseline)", time.perf_counter() - t0)
                seen = len(stub_times())
                start_wall, t0 = time.time(), time.perf_counter()
                svc.run_agent(task.id, agent, prompt="TBX-SCRIPT bench", secrets=[key], base_url=base, timeout=300,
                              model=MODELS.get(agent))
                add(f"{agent}: taskbox run, whole run", time.perf_counter() - t0)
                first = [t for t in stub_times()[seen:] if t >= start_wall]
                if first:
                    add(f"{agent}: taskbox run → first model request", min(first) - start_wall)
            task = svc.create_task(repo, f"bench shell {i}")
            t0 = time.perf_counter()
            exec_id = api.exec_create(task.container_id, ["true"])["Id"]
            api.exec_start(exec_id)
            add("bare docker exec true (baseline)", time.perf_counter() - t0)
            t0 = time.perf_counter()
            svc.run_agent(task.id, "shell", prompt="true")
            add("taskbox run --agent shell --prompt true", time.perf_counter() - t0)
            t0 = time.perf_counter()
            svc.create_task(repo, f"plain {i}")
            add("create-task without setup (baseline)", time.perf_counter() - t0)
            t0 = time.perf_counter()
            svc.create_task(srepo, f"setup {i}")
            add("create-task with setup (.env + 1 command)", time.perf_counter() - t0)
    finally:
        for c in api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
            api.remove_container(c["Id"], force=True)
        for n in api.networks(filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
            api.remove_network(n["Id"])
        api.remove_container(stub, force=True)
        api.remove_network(net["Id"])
        from taskbox import quota

        quota.release_all(svc.paths.volumes, svc.paths.workspaces)
    result = {k: {"median_s": median(v), "runs": len(v)} for k, v in rows.items()}
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(k) for k in result)
        print(f"{'measure'.ljust(width)}  median s  runs")
        for k, v in result.items():
            print(f"{k.ljust(width)}  {v['median_s']:8.3f}  {v['runs']:4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
