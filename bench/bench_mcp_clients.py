#!/usr/bin/env python3
"""Benchmark: what an agent client sees of a long command — progress interval and cancel-to-killed.

One task in a throw-away TASKBOX_HOME and repository, driven through the MCP SDK's stdio
client against a ``taskbox mcp`` subprocess (as OpenCode and Claude Code drive it):

- **progress interval**: ``execute_in_task`` runs a command printing a line every 0.5 s for
  ``--seconds``; the gaps between the progress notifications the client receives. Baseline,
  same run: the gaps between the same command's lines read straight from ``docker exec``
  (how often there is anything new to report).
- **cancel → killed**: a ``sleep`` started through ``execute_in_task`` is cancelled by the
  client (``notifications/cancelled``); the time until no process of it is left in the
  container. Baseline, same run: ``docker exec … pkill`` of the same kind of ``sleep``
  started with ``docker exec -d``, timed to the same condition.

Targets (issue 12): progress at least every 5 s; cancel → killed median < 2 s. Prints a
table; exits 1 if a target is missed, 2 if the benchmark could not run.

    python bench/bench_mcp_clients.py [--runs 5] [--seconds 12] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mcp import BenchError, make_repo  # noqa: E402

MAX_PROGRESS_GAP_S = 5.0
MAX_CANCEL_MEDIAN_S = 2.0
TICK = 0.5


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "max": ordered[-1], "min": ordered[0], "n": len(ordered)}


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def wait_idle(service: Any, task_id: str, limit: float = 30) -> float:
    """Seconds until no command of the task runs in its container (polled every 10 ms)."""
    t0 = time.perf_counter()
    while service.running_work(service.get(task_id)):
        if time.perf_counter() - t0 > limit:
            raise BenchError(f"the command still ran {limit} s after the cancel")
        time.sleep(0.01)
    return time.perf_counter() - t0


def docker_pids(docker: str, cid: str, pattern: str) -> bool:
    return subprocess.run([docker, "exec", cid, "pgrep", "-f", pattern], capture_output=True).returncode == 0


async def measure(home: Path, repo: Path, runs: int, seconds: int) -> dict[str, Any]:
    from taskbox import TaskService, quota  # imported late: TASKBOX_HOME must be set first

    docker = shutil.which("docker")
    if not docker:
        raise BenchError("the docker CLI is needed for the baseline")
    params = StdioServerParameters(command=sys.executable, args=["-m", "taskbox", "mcp"], env=dict(os.environ))
    service = TaskService(home)
    ticks = int(seconds / TICK)
    command = f"for i in $(seq {ticks}); do echo line-$i; sleep {TICK}; done"
    out: dict[str, list[float]] = {"progress gap (mcp)": [], "output gap (docker exec)": [],
                                   "cancel → killed (mcp)": [], "pkill → killed (docker exec)": []}
    async with Client(params) as client:
        made = await client.call_tool("create_task_sandbox", {"task_id": "bench", "task_description": "Bench",
                                                              "workspace_path": str(repo)})
        if made.is_error:
            raise BenchError(f"could not create the task: {made.content[0].text}")
        cid = made.structured_content["container_id"]
        await client.call_tool("attach_agent_to_task", {"task_id": "bench", "agent_name": "bench",
                                                        "agent_model": "none", "session_id": "bench"})
        try:
            for _ in range(runs):
                # progress: the client's view of a long command
                seen: list[float] = []

                async def on_progress(_v: float, _t: float | None, _m: str | None, seen: list[float] = seen) -> None:
                    seen.append(time.perf_counter())

                t0 = time.perf_counter()
                res = await client.call_tool("execute_in_task", {"task_id": "bench", "command": command},
                                             progress_callback=on_progress)
                if res.is_error:
                    raise BenchError(f"execute_in_task failed: {res.content[0].text}")
                out["progress gap (mcp)"] += gaps([t0, *seen, time.perf_counter()])
                # baseline: the same command's lines, straight from docker exec
                lines: list[float] = []
                with subprocess.Popen([docker, "exec", cid, "sh", "-c", command], stdout=subprocess.PIPE) as proc:
                    assert proc.stdout is not None
                    t0 = time.perf_counter()
                    for _line in proc.stdout:
                        lines.append(time.perf_counter())
                out["output gap (docker exec)"] += gaps([t0, *lines])

                # cancel: the client gives up on a running command
                started = anyio.Event()

                async def on_start(_v: float, _t: float | None, m: str | None, started: anyio.Event = started) -> None:
                    if m and "started" in m:
                        started.set()

                async with anyio.create_task_group() as tg:
                    async def run(on_start: Any = on_start) -> None:
                        await client.call_tool("execute_in_task", {"task_id": "bench",
                                                                   "command": "echo started; sleep 60"},
                                               progress_callback=on_start)

                    tg.start_soon(run)
                    with anyio.fail_after(60):
                        await started.wait()
                    t_cancel = time.perf_counter()
                    tg.cancel_scope.cancel()
                await anyio.to_thread.run_sync(lambda: wait_idle(service, "bench"))
                out["cancel → killed (mcp)"].append(time.perf_counter() - t_cancel)
                # baseline: kill the same kind of process with docker exec pkill
                subprocess.run([docker, "exec", "-d", cid, "sh", "-c", "exec sleep 61"], check=True)
                while not docker_pids(docker, cid, "sleep 61"):
                    time.sleep(0.01)
                t0 = time.perf_counter()
                subprocess.run([docker, "exec", cid, "pkill", "-f", "sleep 61"], check=False)
                while docker_pids(docker, cid, "sleep 61"):
                    time.sleep(0.01)
                out["pkill → killed (docker exec)"].append(time.perf_counter() - t0)
        finally:
            service.sandbox.remove(cid)
            quota.release_all(service.paths.volumes, service.paths.workspaces)  # before the temp dir goes
    return {name: stats(samples) for name, samples in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=12, help="length of the command whose progress is timed")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    opts = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="taskbox-bench-") as tmp:
        root = Path(tmp)
        os.environ["TASKBOX_HOME"] = str(root / "home")
        try:
            results = anyio.run(measure, root / "home", make_repo(root), opts.runs, opts.seconds)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    gap = results["progress gap (mcp)"]["max"]
    cancel = results["cancel → killed (mcp)"]["median"]
    checks = {f"progress at least every {MAX_PROGRESS_GAP_S:g} s (largest gap {gap:.2f} s)": gap <= MAX_PROGRESS_GAP_S,
              f"cancel → killed median < {MAX_CANCEL_MEDIAN_S:g} s ({cancel:.2f} s)": cancel < MAX_CANCEL_MEDIAN_S}
    if opts.json:
        print(json.dumps({"results": results, "targets": checks}, indent=2))
    else:
        print(f"{opts.runs} runs; a {opts.seconds} s command printing a line every {TICK} s; "
              "cancel of a running `sleep 60`\n")
        print(f"{'measure':<30} {'median s':>9} {'min s':>7} {'max s':>7} {'n':>4}")
        for name, r in results.items():
            print(f"{name:<30} {r['median']:>9.3f} {r['min']:>7.3f} {r['max']:>7.3f} {r['n']:>4}")
        print()
        for target, met in checks.items():
            print(f"{'PASS' if met else 'FAIL'}  {target}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
