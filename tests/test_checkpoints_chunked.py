"""Large files in checkpoints: stored as content-defined chunks, restored byte for byte.

A file of 2 MiB or more is stored as chunks (git blobs) listed in a chunk list that stands
for the file in its unit's tree. These tests change such files every way a program does —
append, insert and truncate in the middle, holes, growing past the threshold and shrinking
below it — and check every restore against a full manifest of the workspace; they also
check what the store grew by, the export/import archive (and its bounds), a store killed
in the middle of a capture, and gc keeping the chunks live checkpoints use.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from taskbox import CheckpointCorrupted, InvalidInput, TaskService, snapshots
from taskbox.snapshots import _CDC_MAX, _CHUNK_THRESHOLD, _chunk_list
from taskbox.workspace import hand_over

from .conftest import run_cli
from .test_checkpoints import differences, manifest

MB = 2**20


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _task(svc: TaskService, repo: Path, name: str) -> tuple[str, Path]:
    task = svc.create_task(repo, name, lazy=True)
    return task.id, Path(task.workspace_path)


def _chunked_paths(svc: TaskService, task_id: str, cp: dict) -> list[str]:
    store = svc.checkpoints.store(task_id)
    units = store.manifest(store.resolve(cp["checkpoint_id"]) or "")["units"]
    return [p for u in units for p in u.chunked]


def test_changed_large_files_restore_exactly_and_store_only_what_changed(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "chunked edits")
    data = _random(24 * MB, 1)
    (ws / "big.bin").write_bytes(data)
    (ws / "small.txt").write_text("small stays a blob\n")
    states: list[tuple[dict, dict]] = []

    def take() -> dict:
        hand_over(ws)  # the sandbox user's files, as a restore leaves them
        cp = svc.create_checkpoint(tid)
        states.append((cp, manifest(ws)))
        return cp

    first = take()
    assert _chunked_paths(svc, tid, first) == ["big.bin"]
    with open(ws / "big.bin", "ab") as fh:  # append 4 bytes
        fh.write(b"tail")
    appended = take()
    assert appended["bytes_added"] < 1 * MB  # the last piece of the tail again, not the file
    mid = len(data) // 2
    (ws / "big.bin").write_bytes(data[:mid] + b"inserted in the middle" + data[mid:])
    inserted = take()
    assert inserted["bytes_added"] < 3 * _CDC_MAX // 2  # the chunks around the insertion
    (ws / "big.bin").write_bytes(data[:mid] + data[mid + 1_000_000:])  # a megabyte cut out of the middle
    take()
    (ws / "big.bin").write_bytes(data[: 9 * MB])  # truncated
    take()
    with open(ws / "big.bin", "r+b") as fh:  # bytes overwritten in place
        fh.seek(5 * MB)
        fh.write(b"\xff" * 4096)
    take()
    (ws / "big.bin").write_bytes(b"now small")  # shrinks below the threshold: a whole blob again
    small = take()
    assert _chunked_paths(svc, tid, small) == []
    (ws / "big.bin").write_bytes(_random(_CHUNK_THRESHOLD + 1, 2))  # grows past it
    take()
    (ws / "big.bin").unlink()
    (ws / "other.bin").write_bytes(data)  # the same content under another name: no new chunks
    moved = take()
    assert moved["bytes_added"] < 64 * 1024

    for cp, want in [states[i] for i in (0, 3, 6, 1, 7, 2, 4, 8, 5)]:  # back and forth, every kind of change
        svc.restore_checkpoint(tid, cp["checkpoint_id"])
        assert differences(manifest(ws), want) == [], cp["name"]
    store = svc.checkpoints.store(tid)
    store.git(["fsck", "--strict", "--no-dangling"])


def test_sparse_files_and_zeros(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "sparse")
    with open(ws / "sparse.img", "wb") as fh:
        fh.truncate(64 * MB)
        fh.seek(20 * MB)
        fh.write(b"data in the middle of a hole")
    hand_over(ws)
    a = svc.create_checkpoint(tid)
    want = manifest(ws)
    assert a["bytes_added"] < 4 * MB  # eight chunks of zeros are one chunk
    (ws / "sparse.img").write_bytes(b"replaced")
    svc.restore_checkpoint(tid, a["checkpoint_id"])
    assert differences(manifest(ws), want) == []
    # the runs of zeros came back as holes, not as 64 MB of written blocks
    assert os.stat(ws / "sparse.img").st_blocks * 512 < 16 * MB


def test_a_whole_file_that_looks_like_a_chunk_list_is_not_taken_for_one(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "lookalike")
    (ws / "big.bin").write_bytes(_random(5 * MB, 3))
    hand_over(ws)
    a = svc.create_checkpoint(tid)
    want_a = manifest(ws)
    store = svc.checkpoints.store(tid)
    commit = store.resolve(a["checkpoint_id"]) or ""
    listing = store.git(["cat-file", "blob", f"{commit}:u0/big.bin"]).stdout.encode()
    assert listing.startswith(b"taskbox-chunks")
    (ws / "big.bin").write_bytes(listing)  # the same blob as the chunk list: a small file now
    hand_over(ws)
    b = svc.create_checkpoint(tid)
    want_b = manifest(ws)
    svc.restore_checkpoint(tid, a["checkpoint_id"])
    assert differences(manifest(ws), want_a) == []
    svc.restore_checkpoint(tid, b["checkpoint_id"])
    assert differences(manifest(ws), want_b) == []
    assert (ws / "big.bin").read_bytes() == listing
    assert _chunk_list([]) == b"taskbox-chunks 1\n"


def test_export_and_import_of_chunked_files_within_the_archive_bounds(svc: TaskService, repo: Path,
                                                                     tmp_path: Path) -> None:
    tid, ws = _task(svc, repo, "export chunked")
    (ws / "data").mkdir()
    (ws / "data" / "big.bin").write_bytes(_random(12 * MB, 4))
    (ws / "data" / "small.txt").write_text("whole\n")
    with open(ws / "data" / "sparse.img", "wb") as fh:
        fh.truncate(40 * MB)
        fh.write(b"head")
    hand_over(ws)
    cp = svc.create_checkpoint(tid, "with-chunks")
    want = manifest(ws)
    out = svc.export_checkpoint(tid, cp["checkpoint_id"], tmp_path)
    dst, dws = _task(svc, repo, "import chunked")
    # the archive is bounded by what it expands to, holes and all (52 MB here)
    svc.settings.archive_max_ratio = 2  # 12 MB of random bytes and 40 MB of compressed zeros
    with pytest.raises(InvalidInput, match="archive_max_ratio"):
        svc.import_checkpoint(dst, out["path"])
    svc.settings.archive_max_ratio = 0
    svc.settings.archive_max_bytes = 30 * MB
    with pytest.raises(InvalidInput, match="archive_max_bytes"):
        svc.import_checkpoint(dst, out["path"])
    svc.settings.archive_max_bytes = 64 * MB
    imported = svc.import_checkpoint(dst, out["path"])
    assert sorted(_chunked_paths(svc, dst, imported)) == ["data/big.bin", "data/sparse.img"]
    svc.restore_checkpoint(dst, imported["checkpoint_id"])
    assert differences(manifest(dws), want) == []
    again = svc.export_checkpoint(dst, imported["checkpoint_id"], tmp_path / "again.tar.gz")
    assert Path(again["path"]).stat().st_size < 14 * MB


def test_a_capture_killed_midway_leaves_a_sound_store(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "killed capture")
    (ws / "big.bin").write_bytes(_random(10 * MB, 5))
    hand_over(ws)
    a = svc.create_checkpoint(tid)
    want = manifest(ws)
    with open(ws / "big.bin", "ab") as fh:
        fh.write(_random(3 * MB, 6))
    r = run_cli("checkpoint", tid, "killed", env={"TASKBOX_CRASH_AT": "capture.midway"})
    assert r.returncode == -9, r.stderr  # really killed, with chunks sent to git
    store = svc.checkpoints.store(tid)
    store.git(["fsck", "--strict", "--no-dangling"])
    assert [c["checkpoint_id"] for c in svc.list_checkpoints(tid)] == [a["checkpoint_id"]]
    assert [f for f in svc.doctor() if f["task_id"] == tid] == []  # nothing half-done to report
    hand_over(ws)
    b = svc.create_checkpoint(tid)
    want_b = manifest(ws)
    svc.restore_checkpoint(tid, a["checkpoint_id"])
    assert differences(manifest(ws), want) == []
    svc.restore_checkpoint(tid, b["checkpoint_id"])
    assert differences(manifest(ws), want_b) == []
    store.git(["fsck", "--strict", "--no-dangling"])


def test_gc_keeps_the_chunks_live_checkpoints_use(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "gc chunks")
    (ws / "big.bin").write_bytes(_random(12 * MB, 7))
    a = svc.create_checkpoint(tid)
    with open(ws / "big.bin", "ab") as fh:
        fh.write(b"more")
    hand_over(ws)
    b = svc.create_checkpoint(tid)
    want_b = manifest(ws)
    svc.delete_checkpoint(tid, a["checkpoint_id"])
    svc.gc()
    svc.checkpoints.store(tid).git(["fsck", "--strict", "--no-dangling"])
    (ws / "big.bin").write_bytes(b"gone")
    svc.restore_checkpoint(tid, b["checkpoint_id"])
    assert differences(manifest(ws), want_b) == []


def test_a_damaged_chunk_is_reported_before_the_workspace_changes(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "damaged chunk")
    (ws / "big.bin").write_bytes(_random(6 * MB, 8))
    store = svc.checkpoints.store(tid)
    a = svc.create_checkpoint(tid)
    pack = max((store.path / "objects" / "pack").glob("*.pack"), key=lambda p: p.stat().st_size)
    (ws / "big.bin").write_bytes(_random(6 * MB, 9))  # nothing of the old chunks left in the file
    (ws / "extra.txt").write_text("stays until a good restore")
    hand_over(ws)
    pack.chmod(0o644)
    with open(pack, "r+b") as fh:
        fh.seek(pack.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    before = manifest(ws)
    with pytest.raises(CheckpointCorrupted, match="workspace was not changed"):
        svc.restore_checkpoint(tid, a["checkpoint_id"])
    assert differences(before, manifest(ws)) == []


def test_a_large_file_with_another_link_is_not_patched_in_place(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "hard link")
    data = _random(6 * MB, 10)
    (ws / "big.bin").write_bytes(data)
    (ws / "other.bin").write_bytes(data + b"tail")
    hand_over(ws)
    a = svc.create_checkpoint(tid)
    want = manifest(ws)
    (ws / "big.bin").unlink()
    os.link(ws / "other.bin", ws / "big.bin")  # one file, two names; other.bin as it was
    svc.create_checkpoint(tid)
    svc.restore_checkpoint(tid, a["checkpoint_id"])  # big.bin loses its tail; other.bin must not
    assert differences(manifest(ws), want) == []
    assert (ws / "other.bin").read_bytes() == data + b"tail"


def test_an_append_is_undone_in_place_and_a_shift_through_a_new_file(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "in place")
    data = _random(20 * MB, 11)
    (ws / "big.bin").write_bytes(data)
    hand_over(ws)
    a = svc.create_checkpoint(tid)
    want = manifest(ws)
    inode = os.stat(ws / "big.bin").st_ino
    with open(ws / "big.bin", "ab") as fh:
        fh.write(_random(3 * MB, 12))
    svc.restore_checkpoint(tid, a["checkpoint_id"])
    assert differences(manifest(ws), want) == []
    assert os.stat(ws / "big.bin").st_ino == inode  # only the tail was undone, in the same file
    (ws / "big.bin").write_bytes(b"head" + data)  # everything shifted: rebuilt in a new file
    svc.restore_checkpoint(tid, a["checkpoint_id"])
    assert differences(manifest(ws), want) == []


def test_a_restore_killed_while_patching_a_large_file_is_finished_exactly(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "killed patch")
    data = _random(24 * MB, 13)
    (ws / "big.bin").write_bytes(data)
    hand_over(ws)
    a = svc.create_checkpoint(tid, "A")
    want = manifest(ws)
    with open(ws / "big.bin", "r+b") as fh:  # three places overwritten: chunks to patch in place
        for at in (2 * MB, 11 * MB, 20 * MB):
            fh.seek(at)
            fh.write(b"\0changed\0" * 100)
    r = run_cli("restore-checkpoint", tid, "-c", a["checkpoint_id"], env={"TASKBOX_CRASH_AT": "restore.patching"})
    assert r.returncode == -9, r.stderr  # killed with one chunk written
    assert (ws / "big.bin").read_bytes() != data  # half patched
    assert any(f["kind"] == "interrupted-restore" for f in svc.doctor() if f["task_id"] == tid)
    run_cli("doctor", "--fix")
    assert differences(manifest(ws), want) == []


def test_new_chunks_past_the_pack_buffer_go_to_several_packs(svc: TaskService, repo: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshots, "_PACK_BUFFER", 1 * MB)  # a pack per chunk or two
    tid, ws = _task(svc, repo, "many packs")
    (ws / "big.bin").write_bytes(_random(9 * MB, 14))
    hand_over(ws)
    store = svc.checkpoints.store(tid)
    store.ensure()
    packs = len(store.packs())
    a = svc.create_checkpoint(tid)
    want = manifest(ws)
    assert len(store.packs()) - packs >= 4
    store.git(["fsck", "--strict", "--no-dangling"])
    (ws / "big.bin").write_bytes(b"x")
    svc.restore_checkpoint(tid, a["checkpoint_id"])
    assert differences(manifest(ws), want) == []


def _chunks_of(path: Path, old: list | None = None, prefix: tuple | None = None) -> tuple[list, list[int], tuple]:
    sent: list[int] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks, whole, new_prefix = snapshots._chunk_file(fd, os.fstat(fd).st_size, old,
                                                          lambda _sha, d: sent.append(len(d)), prefix)
    finally:
        os.close(fd)
    assert whole and new_prefix is not None
    return chunks, sent, new_prefix


def test_chunking_is_content_defined_and_incremental_chunking_equals_a_fresh_one(tmp_path: Path) -> None:
    data = _random(40 * MB, 15)
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    base, _, prefix = _chunks_of(f)
    sizes = [n for _sha, n in base]
    tail = len(sizes)
    while tail and sizes[tail - 1] <= snapshots._TAIL_PIECE:
        tail -= 1  # what follows the last cut: fixed pieces
    assert all(snapshots._CDC_MIN <= n <= _CDC_MAX for n in sizes[:tail]) and sum(sizes) == len(data)
    assert len(sizes) - tail <= _CDC_MAX // snapshots._TAIL_PIECE
    edits = {
        "append": data + b"tail",
        "insert": data[:7 * MB] + b"inserted" + data[7 * MB:],
        "delete": data[:7 * MB] + data[7 * MB + 5000:],
        "overwrite": data[:20 * MB] + b"\xff" * 10 + data[20 * MB + 10:],
        "truncate": data[:13 * MB],
        "prepend": b"head" + data,
    }
    for name, new in edits.items():
        f.write_bytes(new)
        fresh, _, fresh_prefix = _chunks_of(f)  # from nothing
        for with_prefix in (None, prefix):  # the old chunk list, checked chunk by chunk or in one pass
            again, sent, again_prefix = _chunks_of(f, base, with_prefix)
            assert (again, again_prefix) == (fresh, fresh_prefix), name  # exactly what a fresh chunking finds
            assert sum(sent) <= 3 * _CDC_MAX, name  # and reads anew only around the change
        shared = {sha for sha, _n in base} & {sha for sha, _n in again}
        assert len(shared) >= min(len(base), len(again)) - 4, name  # cuts move with the content


def test_a_file_holding_the_same_chunks_twice(svc: TaskService, repo: Path) -> None:
    tid, ws = _task(svc, repo, "repeats")
    block = _random(3 * MB, 16)
    (ws / "twice.bin").write_bytes(block * 3 + b"end")  # the cuts repeat with the content
    hand_over(ws)
    a = svc.create_checkpoint(tid)
    want = manifest(ws)
    store = svc.checkpoints.store(tid)
    commit = store.resolve(a["checkpoint_id"]) or ""
    listing = snapshots.parse_chunk_list(store.git(["cat-file", "blob", f"{commit}:u0/twice.bin"]).stdout.encode(), "")
    assert len({sha for sha, _n in listing}) < len(listing)  # some chunk is there more than once
    (ws / "twice.bin").write_bytes(b"other")
    svc.restore_checkpoint(tid, a["checkpoint_id"])  # written once from the store, then copied
    assert differences(manifest(ws), want) == []
