#!/usr/bin/env python3
"""Attack table: runs the sandbox attacks of issue 6 for real and prints attack / expected /
observed, plus how long each took.

Everything runs against the local Docker engine in a temporary TASKBOX_HOME. Network attacks
use an *internal* Docker network with one stand-in container whose aliases play the
"domains", so no packet leaves the machine. As a baseline in the same run, two network
attacks are also tried from a plain container on that network (what an agent would have
with Docker networking but without taskbox's proxy), where they succeed.

    python bench/bench_attacks.py [--json]

Exits 1 if any attack observed something other than expected.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskbox import (  # noqa: E402
    CommandTimeout,
    PathOutsideWorkspace,
    PolicyDenied,
    TaskService,
    UnsafeArchive,
    archive,
    engine,
    images,
    quota,
)
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
            import threading

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
        for name, expected, fn in attacks:
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
        w1 = max(len(str(r["attack"])) for r in rows)
        w2 = max(len(str(r["expected"])) for r in rows)
        print(f"{'attack':<{w1}}  {'expected':<{w2}}  {'ms':>6}  observed")
        print(f"{'-' * w1}  {'-' * w2}  {'-' * 6}  {'-' * 8}")
        for r in rows:
            mark = "" if r["ok"] else "   <-- UNEXPECTED"
            print(f"{r['attack']:<{w1}}  {r['expected']:<{w2}}  {r['ms']:>6}  {r['observed']}{mark}")
        print("\nbaseline, same run, plain container on the stand-ins' network (no taskbox):")
        for name, got in baseline:
            print(f"  {name}: HTTP {got}")
        print(f"\n{sum(bool(r['ok']) for r in rows)}/{len(rows)} attacks failed as expected")
    return 0 if all(r["ok"] for r in rows) else 1


def _timeout(fn: Callable[[], object]) -> str:
    try:
        fn()
        return "finished"
    except CommandTimeout:
        return "killed at timeout"


if __name__ == "__main__":
    sys.exit(main())
