"""Bounds on what a task can make the host do (issue 9, exhaustion): archive bombs, oversized
resource limits, and floods of audit records and events.

Everything that can be real is: imports go through the service into a real checkpoint store,
limits through task creation against the real engine, and the egress flood through a real
squid proxy (the stand-in lab of ``test_network``)."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import IO

import pytest

from taskbox import InvalidInput, TaskService, UnsafeArchive, archive
from taskbox.registry import Registry
from taskbox.sandbox import LABEL_HOME

from .conftest import run_cli
from .test_network import Lab, lab, lab_task, nsvc  # noqa: F401 - fixtures shared with the network tests

MiB = 1 << 20
ZEROS = gzip.compress(bytes(MiB), 9)  # one gzip member: 1 MiB of zeros in about 1 KiB


def _block(name: str, data: bytes = b"", size: int | None = None) -> bytes:
    """One tar member (header, data, padding) as raw bytes; ``size`` may claim more than ``data``."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data) if size is None else size
    ti.mode = 0o644
    pad = (-len(data)) % tarfile.BLOCKSIZE
    return ti.tobuf(format=tarfile.PAX_FORMAT) + data + bytes(pad)


def _start() -> bytes:
    return gzip.compress(_block("checkpoint.json", json.dumps({"format": 1, "name": "bomb"}).encode()))


def one_huge_member(path: Path, size: int = 1 << 30) -> Path:
    """A ~1 MB .tar.gz whose one file expands to ``size`` bytes of zeros (gzip members concatenate)."""
    with open(path, "wb") as out:
        out.write(_start())
        out.write(gzip.compress(_block("workspace/huge.bin", size=size)))
        for _ in range(size // MiB):
            out.write(ZEROS)
        out.write(gzip.compress(bytes(2 * tarfile.BLOCKSIZE)))
    return path


def many_members(path: Path, count: int = 1024, each: int = MiB) -> Path:
    """``count`` honest 1 MiB files of zeros: about 1 MB compressed, ``count`` MiB expanded."""
    with open(path, "wb") as out:
        out.write(_start())
        for i in range(count):
            out.write(gzip.compress(_block(f"workspace/f{i}.bin", size=each)))
            out.write(ZEROS if each == MiB else gzip.compress(bytes(each)))
        out.write(gzip.compress(bytes(2 * tarfile.BLOCKSIZE)))
    return path


class CountingFile(io.RawIOBase):
    """A file whose reads are counted, to see how far into an archive the reader went."""

    def __init__(self, path: Path) -> None:
        self.fh: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.read_bytes = 0

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def, override]
        data = self.fh.read(len(b))
        b[: len(data)] = data
        self.read_bytes += len(data)
        return len(data)

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.fh.close()
        super().close()


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# --- checkpoint import ---------------------------------------------------------------------------


def test_a_gzip_bomb_is_refused_from_its_header_without_reading_on(svc: TaskService, repo: Path,
                                                                  tmp_path: Path) -> None:
    bomb = one_huge_member(tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 2 * MiB  # 1 MB that claims, and would expand to, 1 GiB
    task = svc.create_task(repo, "bomb target", lazy=True)
    home_before = tree_size(svc.paths.home)
    with pytest.raises(UnsafeArchive, match=r"expands to more than \d+ bytes.*archive_max_ratio"):
        svc.import_checkpoint(task.id, bomb)
    assert svc.list_checkpoints(task.id) == []
    assert tree_size(svc.paths.home) - home_before < 4 * MiB  # nothing expanded onto the disk
    # The reader stopped at the member's header: it never went through the megabyte of zeros.
    counted = CountingFile(bomb)
    with pytest.raises(UnsafeArchive):
        archive.check(counted)  # type: ignore[arg-type]
    assert counted.read_bytes < bomb.stat().st_size // 4
    # The CLI says it in one line, with the exit code of bad input.
    r = run_cli("checkpoint", "import", task.id, str(bomb))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "expands" in r.stderr


def test_many_honest_members_are_stopped_at_the_ratio_while_streaming(svc: TaskService, repo: Path,
                                                                     tmp_path: Path) -> None:
    bomb = many_members(tmp_path / "many.tar.gz")  # 1 GiB from about 1 MB
    task = svc.create_task(repo, "many target", lazy=True)
    with pytest.raises(UnsafeArchive, match="archive_max_ratio"):
        svc.import_checkpoint(task.id, bomb)
    assert svc.list_checkpoints(task.id) == []
    store_meta = svc.checkpoints.store(task.id).meta
    assert not [p for p in store_meta.rglob("*") if p.is_file() and p.stat().st_size >= MiB]  # scratch gone
    counted = CountingFile(bomb)
    with pytest.raises(UnsafeArchive):
        archive.check(counted)  # type: ignore[arg-type]
    assert counted.read_bytes < bomb.stat().st_size // 2  # stopped about a tenth of the way in
    # extraction refuses it before writing a byte
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchive):
        archive.safe_extract(bomb, dest)
    assert list(dest.iterdir()) == []


def test_expanded_bytes_and_member_count_are_settings(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    task = svc.create_task(repo, "limits target", lazy=True)
    svc.settings.archive_max_ratio = 0.0  # only the absolute limit
    svc.settings.archive_max_bytes = 8 * MiB
    with pytest.raises(UnsafeArchive, match="archive_max_bytes"):
        svc.import_checkpoint(task.id, many_members(tmp_path / "sixteen.tar.gz", count=16))
    svc.settings.archive_max_bytes = 10 * 1024**3
    svc.settings.archive_max_members = 100
    with pytest.raises(UnsafeArchive, match="more than 100 members.*archive_max_members"):
        svc.import_checkpoint(task.id, many_members(tmp_path / "wide.tar.gz", count=150, each=0))
    assert svc.list_checkpoints(task.id) == []
    # within the limits the same kind of archive imports
    ok = svc.import_checkpoint(task.id, many_members(tmp_path / "small.tar.gz", count=50, each=0))
    assert ok["files"] == 50


def test_oversized_metadata_headers_are_refused_before_they_are_read(tmp_path: Path) -> None:
    ti = tarfile.TarInfo("x")
    ti.pax_headers = {"comment": "A" * (2 * archive.META_LIMIT)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(ti, io.BytesIO(b""))
    with pytest.raises(UnsafeArchive, match="metadata header"):
        archive.check(io.BytesIO(buf.getvalue()))
    with pytest.raises(UnsafeArchive, match="not a readable"):
        archive.check(io.BytesIO(gzip.compress(os.urandom(5000))[:200]))  # truncated gzip


# --- checkpoint capture ---------------------------------------------------------------------------


def test_a_sparse_file_past_the_quota_is_refused_before_a_checkpoint_reads_it(svc: TaskService, repo: Path) -> None:
    """A sparse file costs the agent no quota; a capture would read all of it on the host."""
    task = svc.create_task(repo, "sparse capture", disk="64m")
    # the container's file size limit is 8 GiB; a thousand such files would be 8 TiB
    r = svc.exec(task.id, "echo small > a.txt && truncate -s 4G huge.bin")
    assert r.exit_code == 0, r.stderr
    kept = svc.list_checkpoints(task.id)
    read_before = _rchar()
    with pytest.raises(InvalidInput, match=r"more than 67108864 bytes .*'huge.bin' is 4294967296 bytes"):
        svc.create_checkpoint(task.id, "sparse")
    assert _rchar() - read_before < 8 * MiB  # refused from the size, not after reading
    assert svc.list_checkpoints(task.id) == kept
    r = run_cli("checkpoint", "create", task.id)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "sparse" in r.stderr
    svc.delete_file(task.id, "huge.bin")
    assert svc.create_checkpoint(task.id, "after")["checkpoint_id"]


def _rchar() -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")))


# --- resource limits -----------------------------------------------------------------------------


def _nothing_created(svc: TaskService, docker_engine) -> None:
    assert svc.registry.list_tasks() == []
    assert not any(svc.paths.workspaces.iterdir())
    assert docker_engine.api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}) == []


def test_resource_limits_are_capped_by_settings_and_the_machine(svc: TaskService, repo: Path, docker_engine) -> None:
    with pytest.raises(InvalidInput, match=r"memory limit 256g exceeds the cap of 64g \(setting max_memory\)"):
        svc.create_task(repo, "too much memory", memory="256g")
    _nothing_created(svc, docker_engine)
    # with the setting out of the way, the machine's own memory is the cap
    svc.settings.max_memory = "4t"
    engine_memory = docker_engine.api.info()["MemTotal"]
    with pytest.raises(InvalidInput, match="exceeds the .* of memory the Docker engine has"):
        svc.create_task(repo, "too much memory", memory="256g" if engine_memory < 256 * 1024**3 else "3t")
    with pytest.raises(InvalidInput, match="of memory the host has"):
        svc.create_task(repo, "too much memory", memory="256g" if engine_memory < 256 * 1024**3 else "3t",
                        lazy=True)
    svc.settings.max_cpus = 10_000.0
    ncpu = docker_engine.api.info()["NCPU"]
    with pytest.raises(InvalidInput, match="CPUs the Docker engine has"):
        svc.create_task(repo, "too many cpus", cpus=float(ncpu + 1))
    svc.settings.max_cpus = 0.5
    with pytest.raises(InvalidInput, match=r"setting max_cpus"):
        svc.create_task(repo, "too many cpus", cpus=1.0)
    with pytest.raises(InvalidInput, match=r"pids limit 5000 exceeds the cap of 4096 \(setting max_pids\)"):
        svc.create_task(repo, "too many pids", pids_limit=5000, cpus=0.5)
    _nothing_created(svc, docker_engine)
    task = svc.create_task(repo, "fits", memory="128m", cpus=0.5, pids_limit=64)
    assert task.memory_limit == "128m"


def test_the_cli_and_the_policy_default_hit_the_same_cap(svc: TaskService, repo: Path, docker_engine) -> None:
    r = run_cli("create-task", "--repo", str(repo), "too big", "--memory", "256g")
    assert r.returncode == 2 and "max_memory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (repo / ".taskbox").mkdir()
    (repo / ".taskbox" / "policy.toml").write_text('[limits]\nmemory = "300g"\n')
    with pytest.raises(InvalidInput, match="max_memory"):
        svc.create_task(repo, "policy default too big")
    _nothing_created(svc, docker_engine)


# --- rate-limited, aggregated records --------------------------------------------------------------


def test_events_past_the_burst_become_one_aggregated_event(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db", burst=20, window=60.0)
    payloads = [{"host": f"h{i % 7}.test", "port": i} for i in range(2000)]
    assert reg.add_events("egress.denied", "t1", payloads, [p["host"] for p in payloads]) == 20
    assert [reg.add_event("egress.denied", "t1", {"port": i}) for i in range(30)] == [False] * 30
    assert reg.add_event("policy.denied", "t1", {"rule": "kind"})  # each kind has its own burst
    assert reg.add_event("egress.denied", "t2", {"rule": "task"})  # and each task
    events = [e for e in reg.events("t1") if e["type"] == "egress.denied"]
    assert len(events) == 20 and [e["payload"]["port"] for e in events] == list(range(20))
    assert reg.flush_events("t1") == 0  # the window is still open
    assert reg.flush_events("t1", force=True) == 1
    agg = [e["payload"] for e in reg.events("t1") if e["payload"].get("aggregated")]
    assert len(agg) == 1 and agg[0]["count"] == 1980 + 30
    assert len(agg[0]["samples"]) == 5 and all(s.endswith(".test") for s in agg[0]["samples"])
    assert agg[0]["first"] <= agg[0]["last"]
    # a forced flush does not reopen the burst
    assert not reg.add_event("egress.denied", "t1", {"url": "after-flush"})
    # when the window closes, the next record writes the aggregate of the rest, then itself
    reg._conn().execute("UPDATE rate_windows SET started_at = started_at - 61")
    assert reg.add_event("egress.denied", "t1", {"url": "new-window"})
    tail = [e["payload"] for e in reg.events("t1") if e["type"] == "egress.denied"][-2:]
    assert tail[0]["aggregated"] and tail[0]["count"] == 1 and tail[1] == {"url": "new-window"}
    assert len(reg.events("t1", limit=10_000)) < 30  # 2,031 attempts, a bounded number of rows


def test_audit_entries_are_rate_limited_and_the_log_rotates(tmp_path: Path) -> None:
    svc = TaskService(tmp_path / "home")
    entries = [{"kind": "egress", "decision": "deny", "rule": "not-listed", "subject": f"http://h{i}.test/",
                "host": f"h{i % 3}.test"} for i in range(2000)]
    assert svc.audit.batch("t1", entries, sample="host") == 20
    svc.audit.record("t1", kind="tool", decision="allow", rule="default", subject="ls")
    assert len(svc.audit.read("t1")) == 21
    svc.audit.flush("t1", force=True)
    log = svc.audit.read("t1", decision="deny")
    assert len(log) == 21 and log[-1]["aggregated"] and log[-1]["count"] == 1980
    assert sorted(log[-1]["samples"]) == ["h0.test", "h1.test", "h2.test"]
    # the file itself is bounded: past audit_max_bytes it rotates, keeping one generation
    svc.settings.audit_max_bytes = 4096
    svc.registry.burst = 10**6
    for i in range(300):
        svc.audit.record("t2", kind="tool", decision="allow", rule="default", subject=f"command {i}")
    path = svc.audit.directory / "t2.jsonl"
    assert path.stat().st_size <= 4096 and Path(f"{path}.1").stat().st_size <= 4096
    recent = svc.audit.read("t2")
    assert recent[-1]["subject"] == "command 299" and 10 < len(recent) < 300


def test_a_flood_of_denied_requests_leaves_a_bounded_audit_and_one_aggregate(
        nsvc: TaskService, repo: Path, lab: Lab) -> None:  # noqa: F811 - pytest fixtures
    task = lab_task(nsvc, repo, lab, ["allowed.test"])
    n = 300
    r = nsvc.exec(task.id, f"for i in $(seq {n}); do curl -s -o /dev/null -m 5 http://other.test:8000/$i; done; "
                           "echo done", timeout=300)
    assert r.stdout.strip() == "done"
    assert not lab.seen("other.test:8000")  # none of them went through

    def denials() -> tuple[list[dict], list[dict]]:
        audit = [e for e in nsvc.audit_log(task.id, decision="deny") if e["kind"] == "egress"]
        events = [e["payload"] for e in nsvc.registry.events(task.id, limit=10_000) if e["type"] == "egress.denied"]
        return audit, events

    for _ in range(50):  # squid may still be writing its last lines: read until all are in
        audit, events = denials()
        if sum(e.get("count", 1) for e in audit) >= n:
            break
        time.sleep(0.2)
    one_by_one = [e for e in audit if not e.get("aggregated")]
    aggregated = [e for e in audit if e.get("aggregated")]
    assert len(one_by_one) == 20 and sum(e["count"] for e in aggregated) == n - 20
    assert len(aggregated) <= 3 and aggregated[0]["samples"] == ["other.test"]
    assert sum(e.get("count", 1) for e in events) == n and len(events) <= 23
    assert len([e for e in events if e.get("aggregated")]) >= 1
    lines = (nsvc.audit.directory / f"{task.id}.jsonl").read_text().splitlines()
    assert len(lines) < 60  # not 300
    assert os.path.getsize(nsvc.paths.db) < 8 * MiB
