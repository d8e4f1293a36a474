#!/usr/bin/env python3
"""Benchmark: `execute_in_task` over MCP against plain `docker exec`, in the same run.

One task is created in a throw-away TASKBOX_HOME and repository. Then, alternating so both
see the same machine load, it times

- ``mcp``: the round trip of an ``execute_in_task`` call running ``true``, through the MCP
  SDK's stdio client to a ``taskbox mcp`` subprocess whose session stays open (the way an
  agent uses it; the command is logged in the task's memory as usual);
- ``docker exec``: ``docker exec CONTAINER true`` with the Docker CLI, the baseline;
- ``service``: ``TaskService.exec`` in-process, to show where the time goes.

Targets (issue 4): MCP median ≤ 2× the docker exec median, and < 100 ms. Prints a table;
exits 1 if a target is missed, 2 if the benchmark could not run.

    python bench/bench_mcp.py [--runs 30] [--warmup 3] [--json]
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
from benchlib import BenchError, make_repo  # noqa: E402
from mcp import Client
from mcp.client.stdio import StdioServerParameters

MAX_RATIO = 2.0
MAX_MEDIAN_MS = 100.0


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "min_ms": ordered[0], "max_ms": ordered[-1], "runs": len(ordered)}


async def measure(home: Path, repo: Path, runs: int, warmup: int) -> dict[str, Any]:
    from taskbox import TaskService, quota  # imported late: TASKBOX_HOME must be set first

    docker = shutil.which("docker")
    if not docker:
        raise BenchError("the docker CLI is needed for the baseline")
    params = StdioServerParameters(command=sys.executable, args=["-m", "taskbox", "mcp"], env=dict(os.environ))
    times: dict[str, list[float]] = {"mcp": [], "docker exec": [], "service": []}
    service = TaskService(home)
    async with Client(params) as client:
        made = await client.call_tool("create_task_sandbox", {"task_id": "bench", "task_description": "Bench",
                                                              "workspace_path": str(repo)})
        if made.is_error:
            raise BenchError(f"could not create the task: {made.content[0].text}")
        cid = made.structured_content["container_id"]
        await client.call_tool("attach_agent_to_task", {"task_id": "bench", "agent_name": "bench",
                                                        "agent_model": "none", "session_id": "bench"})
        try:
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                res = await client.call_tool("execute_in_task", {"task_id": "bench", "command": "true"})
                t_mcp = (time.perf_counter() - t0) * 1000
                if res.is_error or res.structured_content["exit_code"] != 0:
                    raise BenchError(f"execute_in_task failed: {res.content[0].text}")
                t0 = time.perf_counter()
                subprocess.run([docker, "exec", cid, "true"], check=True)
                t_docker = (time.perf_counter() - t0) * 1000
                t0 = time.perf_counter()
                await anyio.to_thread.run_sync(lambda: service.exec("bench", "true"))
                t_service = (time.perf_counter() - t0) * 1000
                if i >= warmup:
                    times["mcp"].append(t_mcp)
                    times["docker exec"].append(t_docker)
                    times["service"].append(t_service)
        finally:
            service.sandbox.remove(cid)
            quota.release_all(service.paths.volumes, service.paths.workspaces)  # before the temp dir goes
    return {name: summary(samples) for name, samples in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    opts = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="taskbox-bench-") as tmp:
        root = Path(tmp)
        os.environ["TASKBOX_HOME"] = str(root / "home")
        try:
            results = anyio.run(measure, root / "home", make_repo(root), opts.runs, opts.warmup)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    mcp_median = results["mcp"]["median_ms"]
    base = results["docker exec"]["median_ms"]
    ratio = mcp_median / base
    checks = {f"median ≤ {MAX_RATIO:g}× docker exec": ratio <= MAX_RATIO,
              f"median < {MAX_MEDIAN_MS:g} ms": mcp_median < MAX_MEDIAN_MS}
    if opts.json:
        print(json.dumps({"results": results, "ratio": ratio, "targets": checks}, indent=2))
    else:
        print(f"execute_in_task `true`: {opts.runs} runs after {opts.warmup} warm-up, interleaved\n")
        print(f"{'path':<14} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'max ms':>8} {'vs docker':>10}")
        for name in ("docker exec", "mcp", "service"):
            r = results[name]
            print(f"{name:<14} {r['median_ms']:>10.1f} {r['p90_ms']:>8.1f} {r['min_ms']:>8.1f} "
                  f"{r['max_ms']:>8.1f} {r['median_ms'] / base:>9.2f}×")
        print()
        for target, met in checks.items():
            print(f"{'PASS' if met else 'FAIL'}  MCP {target} (MCP {mcp_median:.1f} ms, ratio {ratio:.2f}×)")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
