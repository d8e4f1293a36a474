#!/usr/bin/env python3
"""Benchmark: how fast `taskbox mcp` answers ``initialize``, and `taskbox --help`, in the same run.

Alternating so every variant sees the same machine load, it times

- ``taskbox mcp``: start ``python -m taskbox mcp``, send ``initialize`` (protocol 2025-06-18)
  on stdin, until its reply line arrives; then ``tools/list`` until that reply (the SDK and
  the server are loaded in the background meanwhile);
- ``baseline MCPServer``: the same, for a minimal MCP SDK server with one tool run by the
  same Python (what any server on this SDK costs);
- ``taskbox --help`` against ``python -c pass`` (interpreter start-up alone).

Target (issue 12): `taskbox mcp` answers ``initialize`` in under 0.25 s (median). With
``--before REV`` the same two start-ups of taskbox at git revision REV (checked out into a
temporary worktree) are timed in the same run, alternating, so a change can show it made
neither slower (issue 10). Prints a table; exits 1 if the target is missed or, with
``--before``, if either start-up is more than 20 % slower than REV's.

    python bench/bench_startup.py [--runs 7] [--before REV] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.25
BASELINE_SERVER = """
from mcp.server.mcpserver import MCPServer
server = MCPServer("baseline")

@server.tool()
def ping() -> str:
    \"\"\"Answer pong.\"\"\"
    return "pong"

server.run("stdio")
"""
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}


def time_mcp(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds from start to the ``initialize`` reply, and to the ``tools/list`` reply."""
    start = time.perf_counter()
    # Run from a neutral directory: `python -m` puts the working directory first on sys.path.
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            cwd=env["TASKBOX_HOME"].rsplit("/", 1)[0])
    assert proc.stdin and proc.stdout
    try:
        proc.stdin.write((json.dumps(INIT) + "\n").encode())
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        initialized = time.perf_counter() - start
        if "result" not in reply:
            raise SystemExit(f"{argv}: bad initialize reply {reply}")
        proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n'
                         b'{"jsonrpc":"2.0","id":2,"method":"tools/list"}\n')
        proc.stdin.flush()
        while True:
            msg = json.loads(proc.stdout.readline())
            if msg.get("id") == 2:
                break
        listed = time.perf_counter() - start
        if not msg.get("result", {}).get("tools"):
            raise SystemExit(f"{argv}: tools/list returned no tools: {msg}")
    finally:
        proc.stdin.close()
        proc.wait(30)
    return initialized, listed


def time_run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   cwd=env["TASKBOX_HOME"].rsplit("/", 1)[0])
    return time.perf_counter() - start


@contextlib.contextmanager
def checkout(rev: str, tmp: Path):  # type: ignore[no-untyped-def]
    """A temporary worktree of this repository at ``rev`` (removed afterwards)."""
    repo = Path(__file__).resolve().parent.parent
    where = tmp / f"at-{rev}"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(where), rev], check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(where)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--before", metavar="REV", help="also time taskbox at this git revision")
    opts = parser.parse_args()
    py = sys.executable
    src = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="taskbox-bench-startup-") as tmp, contextlib.ExitStack() as stack:
        old = stack.enter_context(checkout(opts.before, Path(tmp))) if opts.before else None
        env = {**os.environ, "TASKBOX_HOME": str(Path(tmp) / "home"),
               "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        baseline = Path(tmp) / "baseline_server.py"
        baseline.write_text(BASELINE_SERVER)
        samples: dict[str, list[float]] = {k: [] for k in (
            "taskbox mcp: initialize", "taskbox mcp: tools/list", "baseline MCPServer: initialize",
            "baseline MCPServer: tools/list", "taskbox --help", "python -c pass")}
        for _ in range(opts.runs):
            init, listed = time_mcp([py, "-m", "taskbox", "mcp"], env)
            samples["taskbox mcp: initialize"].append(init)
            samples["taskbox mcp: tools/list"].append(listed)
            init, listed = time_mcp([py, str(baseline)], env)
            samples["baseline MCPServer: initialize"].append(init)
            samples["baseline MCPServer: tools/list"].append(listed)
            samples["taskbox --help"].append(time_run([py, "-m", "taskbox", "--help"], env))
            samples["python -c pass"].append(time_run([py, "-c", "pass"], env))
            if old is not None:
                old_env = {**env, "PYTHONPATH": str(old)}
                init, listed = time_mcp([py, "-m", "taskbox", "mcp"], old_env)
                samples.setdefault(f"taskbox@{opts.before} mcp: initialize", []).append(init)
                samples.setdefault(f"taskbox@{opts.before} mcp: tools/list", []).append(listed)
                samples.setdefault(f"taskbox@{opts.before} --help", []).append(
                    time_run([py, "-m", "taskbox", "--help"], old_env))
    rows = {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs": len(v)}
            for k, v in samples.items()}
    ok = rows["taskbox mcp: initialize"]["median_s"] < TARGET_S
    if opts.before:
        for now, then in (("taskbox mcp: initialize", f"taskbox@{opts.before} mcp: initialize"),
                          ("taskbox --help", f"taskbox@{opts.before} --help")):
            if rows[now]["median_s"] > 1.2 * rows[then]["median_s"]:
                ok = False
    if opts.json:
        print(json.dumps({"rows": rows, "target_s": TARGET_S, "ok": ok}, indent=2))
    else:
        print(f"{'what':40} {'median':>9} {'min':>9} {'max':>9}")
        for name, r in rows.items():
            print(f"{name:40} {r['median_s']:8.3f}s {r['min_s']:8.3f}s {r['max_s']:8.3f}s")
        base = rows["baseline MCPServer: initialize"]["median_s"]
        print(f"\ntaskbox mcp answers initialize in {rows['taskbox mcp: initialize']['median_s']:.3f}s "
              f"(target < {TARGET_S}s; a bare MCPServer on this SDK: {base:.3f}s) -> {'OK' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
