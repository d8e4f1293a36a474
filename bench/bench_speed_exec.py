#!/usr/bin/env python3
"""Benchmark (issue 16, goals 3–5): exec through the in-sandbox agent, create, memory at scale.

Everything runs in a throw-away TASKBOX_HOME and repository (workspace quotas off, 256m
containers), and every figure is set against a baseline measured in the same run:

- **single exec**: ``TaskService.exec(task, "true")`` (through the exec agent) and the
  ``Sandbox.exec`` layer alone, against ``docker exec CONTAINER true`` (the Docker CLI),
  interleaved. Target: the service's median ≤ 0.6× docker exec's.
- **exec under load**: N live tasks (40), C MCP clients (20, each a ``taskbox mcp`` stdio
  server with its session open) looping ``execute_in_task true`` for D seconds (60), against
  C threads looping ``docker exec CONTAINER true`` over the same containers for D seconds.
  Target: MCP p95 ≤ 1.5× docker exec's p95 under the same load.
- **create**: ``TaskService.create_task`` (cold: workspace, branch, memory, container, the
  agent's key read) against ``docker run -d IMAGE sleep infinity``. The warm pool of goal 4
  has its own benchmark, ``bench/bench_speed_create.py``.
- **memory**: with S live tasks (50): each container's memory (tini, sleep, the agent; cgroup
  usage without page cache), the agent's own RSS, and the RSS of one ``taskbox mcp`` server
  that has listed the tasks and run a command in each.

Prints a table; exits 1 if a target is missed, 2 if the benchmark could not run.

    python bench/bench_speed_exec.py [--quick] [--tasks 40] [--clients 20] [--seconds 60] [--scale 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
from benchlib import BenchError, make_repo, pct  # noqa: E402
from mcp import Client
from mcp.client.stdio import StdioServerParameters

SINGLE_RATIO = 0.6
LOAD_RATIO = 1.5


def stats(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50": statistics.median(samples), "p95": pct(samples, 0.95),
            "p99": pct(samples, 0.99)}


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_named(word: str) -> list[int]:
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and word.encode() in cmd:
            out.append(int(d.name))
    return out


def single_exec(service: Any, task_id: str, cid: str, runs: int) -> dict[str, dict[str, float]]:
    docker = shutil.which("docker") or "docker"
    times: dict[str, list[float]] = {"docker exec (CLI)": [], "service exec (agent)": [], "sandbox exec (agent)": []}
    for i in range(runs + 3):
        t0 = time.perf_counter()
        subprocess.run([docker, "exec", cid, "true"], check=True)
        t1 = time.perf_counter()
        res = service.exec(task_id, "true")
        t2 = time.perf_counter()
        service.sandbox.exec(cid, "true")
        t3 = time.perf_counter()
        if res.exit_code != 0:
            raise BenchError(f"exec failed: {res.stderr[:200]}")
        if i >= 3:
            times["docker exec (CLI)"].append((t1 - t0) * 1000)
            times["service exec (agent)"].append((t2 - t1) * 1000)
            times["sandbox exec (agent)"].append((t3 - t2) * 1000)
    return {k: stats(v) for k, v in times.items()}


def docker_load(cids: list[str], clients: int, seconds: float) -> list[float]:
    docker = shutil.which("docker") or "docker"
    samples: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            cid = cids[(i + n * clients) % len(cids)]
            n += 1
            t0 = time.perf_counter()
            subprocess.run([docker, "exec", cid, "true"], check=True)
            with lock:
                samples.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples


async def mcp_load(task_ids: list[str], clients: int, seconds: float) -> list[float]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "taskbox", "mcp"], env=dict(os.environ))
    samples: list[float] = []
    ready = anyio.Event()
    started = [0]
    errors: list[str] = []

    async def client(i: int) -> None:
        async with Client(params) as c:
            await c.call_tool("execute_in_task", {"task_id": task_ids[i % len(task_ids)], "command": "true"})
            started[0] += 1
            if started[0] == clients:
                ready.set()
            await ready.wait()
            stop = time.monotonic() + seconds
            n = 0
            while time.monotonic() < stop:
                tid = task_ids[(i + n * clients) % len(task_ids)]
                n += 1
                t0 = time.perf_counter()
                res = await c.call_tool("execute_in_task", {"task_id": tid, "command": "true"})
                samples.append((time.perf_counter() - t0) * 1000)
                if res.is_error or res.structured_content["exit_code"] != 0:
                    errors.append(res.content[0].text[:200])
                    return

    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(client, i)
    if errors:
        raise BenchError(f"execute_in_task failed under load: {errors[0]}")
    return samples


async def mcp_server_memory(task_ids: list[str]) -> int:
    params = StdioServerParameters(command=sys.executable, args=["-m", "taskbox", "mcp"], env=dict(os.environ))
    async with Client(params) as c:
        await c.call_tool("list_active_tasks", {})
        for tid in task_ids:
            res = await c.call_tool("execute_in_task", {"task_id": tid, "command": "true"})
            if res.is_error:
                raise BenchError(f"execute_in_task failed: {res.content[0].text[:200]}")
        await c.call_tool("list_active_tasks", {})
        pids = children_named("taskbox mcp")
        return max((rss_kb(p) for p in pids), default=0)


def container_memory(service: Any, cids: list[str]) -> tuple[float, float]:
    """Mean memory use of the containers (KiB) and mean RSS of their agents (KiB)."""
    usage, agents = [], []
    for cid in cids:
        mem = service.sandbox.memory_usage(cid)
        if mem:
            usage.append(mem["usage"] / 1024)
        procs = service.sandbox._cgroup(cid).get("pids") or service.sandbox._cgroup(cid).get("memory")
        if procs is None:
            continue
        for pid in (procs / "cgroup.procs").read_text().split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"exec-agent" in cmd:
                agents.append(rss_kb(int(pid)))
    return (statistics.mean(usage) if usage else 0.0, statistics.mean(agents) if agents else 0.0)


def run(opts: argparse.Namespace, root: Path) -> dict[str, Any]:
    from taskbox import TaskService, quota
    from taskbox.sandbox import LABEL_HOME

    repo = make_repo(root)
    service = TaskService(root / "home")
    docker = shutil.which("docker")
    if not docker:
        raise BenchError("the docker CLI is needed for the baselines")
    out: dict[str, Any] = {}
    tasks: list[Any] = []
    try:
        # Create: cold through the service, against docker run, alternating.
        creates, runs = [], []
        want = max(opts.tasks, opts.scale)
        for i in range(want):
            t0 = time.perf_counter()
            tasks.append(service.create_task(repo, f"bench task {i}", task_id=f"t{i:02d}", memory="256m"))
            t1 = time.perf_counter()
            if i < opts.creates:
                t2 = time.perf_counter()
                cid = subprocess.run([docker, "run", "-d", "--rm", service.settings.image, "sleep", "infinity"],
                                     check=True, capture_output=True, text=True).stdout.strip()
                t3 = time.perf_counter()
                subprocess.run([docker, "rm", "-f", cid], check=True, capture_output=True)
                creates.append((t1 - t0) * 1000)
                runs.append((t3 - t2) * 1000)
        out["create"] = {"cold create (service)": stats(creates), "docker run (CLI)": stats(runs)}
        agents = sum(1 for t in tasks if service.sandbox.agent_keys and service.sandbox.agent_keys.load(t.container_id))
        out["agents"] = f"{agents}/{len(tasks)}"

        first = tasks[0]
        out["single"] = single_exec(service, first.id, first.container_id, opts.runs)

        load_tasks = tasks[:opts.tasks]
        out["load_docker"] = stats(docker_load([t.container_id for t in load_tasks], opts.clients, opts.seconds))
        out["load_mcp"] = stats(anyio.run(mcp_load, [t.id for t in load_tasks], opts.clients, opts.seconds))

        scale = tasks[:opts.scale]
        out["mcp_rss_kb"] = anyio.run(mcp_server_memory, [t.id for t in scale])
        out["container_kb"], out["agent_kb"] = container_memory(service, [t.container_id for t in scale])
        out["scale"] = len(scale)
    finally:
        for t in tasks:
            try:
                service.sandbox.remove(service.get(t.id).container_id or "")
            except Exception:  # noqa: BLE001 - best effort clean-up of the throw-away containers
                pass
        # Anything else this run's home made (a create that failed half-way): by its label.
        for c in service.sandbox.api.containers(all=True, filters={"label": f"{LABEL_HOME}={service.home_label}"}):
            service.sandbox.api.remove_container(c["Id"], force=True)
        quota.release_all(service.paths.volumes, service.paths.workspaces)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 6 tasks, 4 clients, 5 s, scale 8")
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--creates", type=int, default=8)
    opts = ap.parse_args()
    if opts.quick:
        opts.tasks, opts.clients, opts.seconds, opts.scale, opts.runs, opts.creates = 6, 4, 5.0, 8, 10, 3
    with tempfile.TemporaryDirectory(prefix="taskbox-bench-") as tmp:
        root = Path(tmp)
        os.environ["TASKBOX_HOME"] = str(root / "home")
        os.environ.setdefault("TASKBOX_WORKSPACE_QUOTA", "0")
        try:
            r = run(opts, root)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    checks: dict[str, bool] = {}
    print(f"exec agents running: {r['agents']}\n")
    print(f"{'measure':<34} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    rows = [*r["single"].items(), (f"load: docker exec, {opts.clients} thr", r["load_docker"]),
            (f"load: MCP execute_in_task, {opts.clients} cl", r["load_mcp"]), *r["create"].items()]
    for name, s in rows:
        print(f"{name:<34} {s['n']:>5} {s['p50']:>8.1f} {s['p95']:>8.1f} {s['p99']:>8.1f}")
    print(f"{'warm create (pool)':<34} {'—':>5} {'see bench_speed_create.py'}")
    single = r["single"]["service exec (agent)"]["p50"] / r["single"]["docker exec (CLI)"]["p50"]
    load = r["load_mcp"]["p95"] / r["load_docker"]["p95"]
    checks[f"single exec (service) p50 ≤ {SINGLE_RATIO}× docker exec: {single:.2f}×"] = single <= SINGLE_RATIO
    checks[f"MCP p95 under load ≤ {LOAD_RATIO}× docker exec p95 under load: {load:.2f}×"] = load <= LOAD_RATIO
    print(f"\nmemory with {r['scale']} live tasks: per task (container: init, sleep, agent) "
          f"{r['container_kb'] / 1024:.1f} MiB (cgroup), the agent alone {r['agent_kb'] / 1024:.1f} MiB RSS "
          f"(shared pages counted); "
          f"one MCP server that served all of them {r['mcp_rss_kb'] / 1024:.1f} MiB RSS\n")
    for text, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
