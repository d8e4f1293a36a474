#!/usr/bin/env python3
"""Workspace quota benchmark: what a disk and inode quota adds to creating and removing a task.

Compares, on this machine and in this run, interleaved, the default quota (a 10 GiB,
1M-inode ext4 image loop-mounted at the workspace, `workspace_quota = "10g"`) against
plain directories (`workspace_quota = "0"`):
  * `create_task` with its container started (core API);
  * a lazy `create_task` (no container: the quota's share is largest);
  * `cleanup(remove_workspace=True)` of a completed task;
and the volume alone: `quota.create_volume` (sparse image, mkfs.ext4, mount) and
`quota.release` (umount, delete), with the host disk space the empty image takes.
Needs root and loop devices.

    python bench/bench_quota.py [--runs N] [--json]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskbox import TaskService, engine, quota  # noqa: E402
from taskbox.config import Settings  # noqa: E402
from taskbox.sandbox import LABEL_HOME, sandbox_owner  # noqa: E402

IMAGE = os.environ.get("TASKBOX_IMAGE", "taskbox-sandbox:latest")


def ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


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
    engine.connect().images.get(IMAGE)
    quota.check_supported()
    tmp = Path(tempfile.mkdtemp(prefix="taskbox-bench-"))
    repo = make_repo(tmp)
    on = TaskService(tmp / "quota", settings=Settings(image=IMAGE))
    off = TaskService(tmp / "plain", settings=Settings(image=IMAGE, workspace_quota="0"))
    samples: dict[str, list[float]] = {}
    counter = iter(range(100_000))
    image, mnt = tmp / "raw.img", tmp / "raw"

    def add(name: str, took: float) -> None:
        samples.setdefault(name, []).append(took)

    try:
        for i in range(args.runs + 1):  # the first round warms up and is not counted
            for label, svc in (("quota", on), ("plain", off)):
                took, task = ms(lambda s=svc: s.create_task(repo, f"bench {next(counter)}", agent="b", model="m"))
                lazy_took, lazy = ms(lambda s=svc: s.create_task(repo, f"bench lazy {next(counter)}", lazy=True))
                svc.complete(task.id, final_checkpoint=False)
                svc.sandbox.remove(task.container_id or "")
                svc.abort(lazy.id)
                gone_took, _ = ms(lambda s=svc, t=task: s.cleanup(t.id, remove_workspace=True))
                svc.cleanup(lazy.id, remove_workspace=True)
                if i:
                    add(f"create (container started) {label}", took)
                    add(f"create --lazy {label}", lazy_took)
                    add(f"cleanup --remove-workspace {label}", gone_took)
            took, _ = ms(lambda: quota.create_volume(image, mnt, 10 * 2**30, 1_000_000, sandbox_owner()))
            host = image.stat().st_blocks * 512
            gone, _ = ms(lambda: quota.release(image, mnt))
            mnt.rmdir()
            if i:
                add("volume: make + mount (10 GiB, 1M inodes)", took)
                add("volume: unmount + delete", gone)
                add("empty image on the host (MiB)", host / 2**20)
    finally:
        for svc in (on, off):
            api = svc.sandbox.api
            for c in api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
                api.remove_container(c["Id"], force=True)
            quota.release_all(svc.paths.volumes, svc.paths.workspaces)
        quota.release(image, mnt)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {name: statistics.median(v) for name, v in samples.items()}
    rows = []
    for what in ("create (container started)", "create --lazy", "cleanup --remove-workspace"):
        q, p = med[f"{what} quota"], med[f"{what} plain"]
        rows.append({"measure": what, "quota_ms": round(q, 1), "plain_ms": round(p, 1), "overhead_ms": round(q - p, 1)})
    for what in ("volume: make + mount (10 GiB, 1M inodes)", "volume: unmount + delete"):
        rows.append({"measure": what, "quota_ms": round(med[what], 1), "plain_ms": None, "overhead_ms": None})
    host_mib = round(med["empty image on the host (MiB)"], 1)
    if args.json:
        print(json.dumps({"rows": rows, "empty_image_host_mib": host_mib, "runs": args.runs}, indent=2))
        return 0
    print(f"taskbox workspace quota benchmark — median of {args.runs} runs, {os.cpu_count()} cores, "
          f"quota 10g / 1M inodes vs plain directories")
    print(f"{'measure':42} {'quota':>10} {'plain':>10} {'overhead':>10}")
    for r in rows:
        plain = f"{r['plain_ms']:.1f}ms" if r["plain_ms"] is not None else "-"
        over = f"{r['overhead_ms']:+.1f}ms" if r["overhead_ms"] is not None else "-"
        print(f"{r['measure']:42} {r['quota_ms']:>8.1f}ms {plain:>10} {over:>10}")
    print(f"an empty 10 GiB volume takes {host_mib} MiB of the host disk (sparse image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
