"""Adversarial tests, part 3: the agent plants traps in its workspace for host-side code.

Links to ``/`` and to host files are not followed by the file tools or by archiving; a
malicious tar is refused whole before anything is written; agent-written git hooks and
config programs never run on the host."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from taskbox import (
    InvalidInput,
    NotFound,
    PathOutsideWorkspace,
    TaskService,
    UnsafeArchive,
    archive,
)

from .conftest import git


@pytest.fixture
def task(svc: TaskService, repo: Path):
    return svc.create_task(repo, "trapper")


# --- links in the workspace ------------------------------------------------------------------


def test_links_to_root_and_host_files_are_not_followed_by_file_tools(svc: TaskService, task,
                                                                      tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("host only\n")
    svc.exec(task.id, f"ln -s / rootlink && ln -s /etc/passwd pw && ln -s {secret} sec && ln -s .. up "
                      "&& mkdir -p d && ln -s / d/deep")
    passwd = Path("/etc/passwd").read_bytes()
    for path in ("rootlink/etc/passwd", "pw", "sec", "up/README.md", "d/deep/etc/hostname"):
        with pytest.raises((PathOutsideWorkspace, InvalidInput)):
            svc.read_file(task.id, path)
        with pytest.raises((PathOutsideWorkspace, InvalidInput)):
            svc.write_file(task.id, path, b"pwned\n")
        with pytest.raises((PathOutsideWorkspace, InvalidInput, NotFound)):
            svc.edit_file(task.id, path, "root", "pwned")
    with pytest.raises((PathOutsideWorkspace, NotFound)):
        svc.list_files(task.id, "rootlink")
    listing = {e["path"]: e for e in svc.list_files(task.id, ".", recursive=True)["entries"]}
    assert listing["rootlink"]["type"] == "link" and not any(p.startswith("rootlink/") for p in listing)
    # deleting a link out is refused or removes only the link, never what it points at
    for link in ("sec", "rootlink", "pw"):
        try:
            svc.delete_file(task.id, link)
        except PathOutsideWorkspace:
            pass
    assert secret.read_text() == "host only\n"
    assert Path("/etc/passwd").read_bytes() == passwd
    assert Path("/etc").is_dir()


def test_archiving_a_workspace_stores_links_not_their_targets(svc: TaskService, task, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("TOP-SECRET-HOST-DATA\n")
    svc.exec(task.id, f"ln -s / rootlink && ln -s {secret} sec && ln -s README.md readme-link && mkfifo fifo")
    out = tmp_path / "ws.tar.gz"
    archive.pack(Path(task.workspace_path), out)
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isreg())  # type: ignore[union-attr]
    assert members["rootlink"].issym() and members["rootlink"].linkname == "/"
    assert members["sec"].issym() and members["readme-link"].issym()
    assert not any(n.startswith(("rootlink/", "sec/")) for n in members)
    assert "fifo" not in members
    assert b"TOP-SECRET-HOST-DATA" not in blob
    # and restoring it reproduces the links without following them
    dest = tmp_path / "restored"
    archive.safe_extract(out, dest, symlinks="any")
    assert os.readlink(dest / "rootlink") == "/" and (dest / "README.md").read_text() == "# demo\n"
    with pytest.raises(UnsafeArchive, match="links outside"):
        archive.safe_extract(out, tmp_path / "strict")  # default: links out are refused


# --- malicious archives ------------------------------------------------------------------------


def _tar(*members: tuple[str, str, str | bytes]) -> bytes:
    """Build a tar in memory from (kind, name, data-or-linkname) triples."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                payload = data.encode() if isinstance(data, str) else data
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 1
            elif kind == "blk":
                info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info)
    return buf.getvalue()


MALICIOUS = {
    "dotdot": _tar(("file", "ok.txt", "fine"), ("file", "../escaped.txt", "pwned")),
    "deep-dotdot": _tar(("file", "a/b/../../../escaped.txt", "pwned")),
    "absolute": _tar(("file", "/tmp/taskbox-abs-escape.txt", "pwned")),
    "link-then-file": _tar(("sym", "out", "../victim"), ("file", "out/escaped.txt", "pwned")),
    "abs-link-then-file": _tar(("sym", "etc", "/etc"), ("file", "etc/taskbox-pwned", "pwned")),
    "inside-link-then-file": _tar(("dir", "d", ""), ("sym", "l", "d"), ("file", "l/x", "through a link")),
    "hardlink-out": _tar(("hard", "passwd", "/etc/passwd")),
    "hardlink-dotdot": _tar(("hard", "h", "../victim/secret")),
    "char-device": _tar(("chr", "mem", "")),
    "block-device": _tar(("blk", "sda", "")),
    "fifo": _tar(("fifo", "pipe", "")),
    "link-dotdot": _tar(("sym", "up", "../..")),
    "link-then-dir": _tar(("sym", "x", "/tmp"), ("dir", "x", "")),
}


@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_malicious_tar_is_refused_whole(name: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret").write_text("keep\n")
    dest = tmp_path / "dest"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafeArchive):
        archive.safe_extract(io.BytesIO(MALICIOUS[name]), dest)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before] in ([], [Path("dest")])  # nothing extracted at all
    assert not any(dest.iterdir())
    assert (victim / "secret").read_text() == "keep\n"
    assert not Path("/tmp/taskbox-abs-escape.txt").exists() and not Path("/etc/taskbox-pwned").exists()


def test_link_planted_on_disk_is_not_written_through(tmp_path: Path) -> None:
    """An archive that is harmless by itself cannot write through a link already in the destination."""
    victim = tmp_path / "victim"
    victim.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(victim)
    with pytest.raises(UnsafeArchive, match="not a plain directory"):
        archive.safe_extract(io.BytesIO(_tar(("file", "sub/planted.txt", "pwned"))), dest)
    assert list(victim.iterdir()) == []
    # a file member replaces a link at its own name (the link is removed, its target untouched)
    (victim / "target").write_text("keep\n")
    (dest / "f").symlink_to(victim / "target")
    archive.safe_extract(io.BytesIO(_tar(("file", "f", "new"))), dest)
    assert (victim / "target").read_text() == "keep\n"
    assert not (dest / "f").is_symlink() and (dest / "f").read_text() == "new"


def test_good_archive_extracts_with_modes_and_inside_links(tmp_path: Path) -> None:
    data = _tar(("dir", "pkg", ""), ("file", "pkg/run.sh", "#!/bin/sh\n"), ("sym", "pkg/link", "run.sh"),
                ("hard", "pkg/copy.sh", "pkg/run.sh"), ("file", "./top.txt", "top"))
    # set-uid in an archive is dropped
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("suid")
        info.mode, info.size = 0o4755, 1
        tar.addfile(info, io.BytesIO(b"x"))
    res = archive.safe_extract(io.BytesIO(data), tmp_path / "d")
    archive.safe_extract(io.BytesIO(buf.getvalue()), tmp_path / "d")
    d = tmp_path / "d"
    assert res.files == 3 and res.links == 1
    assert os.readlink(d / "pkg/link") == "run.sh" and (d / "pkg/copy.sh").read_text() == "#!/bin/sh\n"
    assert (d / "top.txt").read_text() == "top"
    assert os.stat(d / "suid").st_mode & 0o7000 == 0


# --- git hooks and config programs --------------------------------------------------------------


def test_agent_written_git_hooks_and_programs_never_run_on_the_host(svc: TaskService, task, repo: Path,
                                                                    tmp_path: Path) -> None:
    proof = tmp_path / "hook-ran"
    hooks = ("pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "post-checkout", "post-merge",
             "pre-push", "pre-auto-gc", "reference-transaction", "post-rewrite", "fsmonitor-watchman")
    script = f"#!/bin/sh\\necho ran >> {proof}\\n"
    # everything is planted from inside the container, as an agent would
    svc.exec(task.id, "for h in " + " ".join(hooks) + f"; do printf '{script}' > .git/hooks/$h; "
             "chmod +x .git/hooks/$h; done; mkdir -p myhooks; cp .git/hooks/pre-commit myhooks/; "
             "cp .git/hooks/pre-commit evil.sh; "
             "git config core.hooksPath /workspace/myhooks && git config core.fsmonitor /workspace/evil.sh && "
             "git config core.pager /workspace/evil.sh && git config diff.external /workspace/evil.sh && "
             "git config filter.x.clean /workspace/evil.sh && git config filter.x.smudge /workspace/evil.sh && "
             "git config alias.status '!/workspace/evil.sh' && git config core.sshCommand /workspace/evil.sh && "
             "echo '* filter=x diff=x merge=x' > .gitattributes && git config merge.x.driver /workspace/evil.sh"
             " && echo change >> README.md")
    assert (Path(task.workspace_path) / ".git/hooks/pre-commit").exists()
    svc.sync(task.id)
    svc.diff(task.id)
    svc.git_log(task.id)
    svc.create_checkpoint(task.id, "after-traps")
    session = svc.attach(task.id, "agent").session
    svc.exec(task.id, "echo more >> README.md")
    svc.detach(task.id, session.id)
    svc.complete(task.id, "done")
    assert not proof.exists(), proof.read_text()
    # the user's repository got the branch, but none of the hooks or config
    assert "change" in git(repo, "show", f"{task.branch}:README.md")
    assert not any((repo / ".git/hooks" / h).exists() for h in hooks if h != "fsmonitor-watchman")
    assert "evil" not in (repo / ".git/config").read_text()
