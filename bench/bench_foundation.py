#!/usr/bin/env python3
"""Foundation benchmark: task creation, exec and state load against plain Docker, in one run.

Compares, on this machine and in this run:
  * warm `create-task` (container running, workspace and memory ready) vs a plain
    `docker run -d IMAGE sleep infinity` of the same image;
  * `exec true` in a task vs a plain `docker exec CONTAINER true`;
  * loading a task's state.json (with 200 todos);
at two levels: the core API in-process vs the Docker Engine API through the docker SDK, and
the command lines (`taskbox ...` vs `docker ...`), since that is what a person types.

Targets (issue 3): create <= 3x plain docker run and < 2 s; exec overhead <= 1.5x plain
docker exec; state load < 100 ms. Exits 1 if a target is missed.

    python bench/bench_foundation.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskbox import TaskService, engine, quota  # noqa: E402

IMAGE = os.environ.get("TASKBOX_IMAGE", "taskbox-sandbox:latest")


def timed(fn: Callable[[], object], runs: int, cleanup: Callable[[object], None] | None = None) -> float:
    """Median wall time of ``fn`` in milliseconds (one warm-up run not counted)."""
    samples = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        out = fn()
        took = (time.perf_counter() - t0) * 1000
        if cleanup:
            cleanup(out)
        if i:
            samples.append(took)
    return statistics.median(samples)


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    for i in range(50):
        (repo / f"file{i}.py").write_text(f"print({i})\n" * 20)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True, env=env)
    return repo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    client = engine.connect()
    client.images.get(IMAGE)
    tmp = Path(tempfile.mkdtemp(prefix="taskbox-bench-"))
    home = tmp / "home"
    os.environ["TASKBOX_HOME"] = str(home)
    repo = make_repo(tmp)
    svc = TaskService(home)
    api = client.api
    plain: list[str] = []
    counter = iter(range(10_000))

    def docker_run_sdk() -> str:
        c = api.create_container(IMAGE, command=["sleep", "infinity"], host_config=api.create_host_config(
            network_mode="none"), network_disabled=True)
        api.start(c["Id"])
        plain.append(c["Id"])
        return c["Id"]

    def docker_run_cli() -> str:
        cid = subprocess.run(["docker", "run", "-d", "--network", "none", IMAGE, "sleep", "infinity"],
                             capture_output=True, text=True, check=True).stdout.strip()
        plain.append(cid)
        return cid

    def create_core() -> str:
        return svc.create_task(repo, f"bench task {next(counter)}", agent="bench", model="m").id

    def create_cli() -> str:
        out = subprocess.run([sys.executable, "-m", "taskbox", "create-task", f"bench cli {next(counter)}",
                              "--repo", str(repo), "--no-attach", "--json"],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)["task_id"]

    rows = []
    try:
        runs = args.runs
        t_docker_sdk = timed(docker_run_sdk, runs)
        t_create_core = timed(create_core, runs)
        t_docker_cli = timed(docker_run_cli, runs)
        t_create_cli = timed(create_cli, runs)

        task = svc.create_task(repo, "exec bench", agent="bench", model="m")
        cid = task.container_id or ""
        erun = runs * 3
        t_exec_sdk = timed(lambda: api.exec_start(api.exec_create(cid, ["true"])["Id"]), erun)
        t_exec_core = timed(lambda: svc.exec(task.id, ["true"]), erun)
        t_exec_docker_cli = timed(lambda: subprocess.run(["docker", "exec", cid, "true"], check=True), erun)
        t_exec_cli = timed(lambda: subprocess.run([sys.executable, "-m", "taskbox", "exec", task.id, "--", "true"],
                                                  check=True), erun)

        svc.update_todos(task.id, [{"text": f"todo number {i}", "major": i % 10 == 0} for i in range(200)])
        mem = svc.memory(task)
        t_state = timed(lambda: mem.load(), 100)

        def row(name: str, ours: float, base: float | None, target: str, ok: bool) -> None:
            rows.append({"measure": name, "taskbox_ms": round(ours, 1),
                         "baseline_ms": round(base, 1) if base is not None else None,
                         "ratio": round(ours / base, 2) if base else None, "target": target, "ok": ok})

        row("create (core API vs docker SDK run)", t_create_core, t_docker_sdk, "<= 3x and < 2000 ms",
            t_create_core <= 3 * t_docker_sdk and t_create_core < 2000)
        row("create (taskbox CLI vs docker run CLI)", t_create_cli, t_docker_cli, "< 2000 ms (info: ratio)",
            t_create_cli < 2000)
        row("exec true (core API vs docker SDK exec)", t_exec_core, t_exec_sdk, "<= 1.5x",
            t_exec_core <= 1.5 * t_exec_sdk)
        row("exec true (taskbox CLI vs docker exec CLI)", t_exec_cli, t_exec_docker_cli, "info (Python start-up)",
            True)
        row("state load (200 todos)", t_state, None, "< 100 ms", t_state < 100)
    finally:
        for c in plain:
            api.remove_container(c, force=True)
        for t in svc.list_tasks():
            if t.container_id:
                api.remove_container(t.container_id, force=True)
        quota.release_all(svc.paths.volumes, svc.paths.workspaces)  # unmount the workspace volumes

    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"taskbox foundation benchmark — median of {args.runs} runs (exec: {args.runs * 3}), "
              f"image {IMAGE}, {os.cpu_count()} cores")
        print(f"{'measure':44} {'taskbox':>10} {'baseline':>10} {'ratio':>7}  {'target':24} ok")
        for r in rows:
            base = f"{r['baseline_ms']:.1f}" if r["baseline_ms"] is not None else "-"
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
            print(f"{r['measure']:44} {r['taskbox_ms']:>8.1f}ms {base:>8}ms {ratio:>7}  {r['target']:24} "
                  f"{'yes' if r['ok'] else 'NO'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
