"""Network modes and the egress allowlist, attacked for real.

All traffic stays on this machine: the proxy's "outside" network is an *internal* Docker
network made by the test, and the "domains" are network aliases of one stand-in container
on it (``allowed.test``, ``other.test`` …) that serves HTTP on port 8000 and logs every
request and every UDP datagram it gets, so a test can prove that a refused attempt never
arrived."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from taskbox import InvalidInput, TaskService, images, network
from taskbox.network import EgressRules, canonical_host, parse_rule, squid_config
from taskbox.sandbox import LABEL_HOME

from .conftest import IMAGE, run_cli

STANDIN = r'''
import http.server, socket, sys, threading
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 53))
    while True:
        data, addr = s.recvfrom(4096); print("UDP", addr[0], data, flush=True)
threading.Thread(target=udp, daemon=True).start()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("HTTP", self.client_address[0], self.headers.get("Host"), self.path, flush=True)
        self.send_response(200); self.end_headers(); self.wfile.write(b"hello from " + self.headers.get("Host", "").encode())
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
'''
ALIASES = ["allowed.test", "other.test", "api.allowed.test", "evil.allowed.test", "xn--bcher-kva.test"]


@dataclass
class Lab:
    network: str
    standin: str
    ip: str
    subnet: str
    client: object

    def seen(self, needle: str) -> bool:
        logs = self.client.api.logs(self.standin, stdout=True, stderr=False).decode(errors="replace")  # type: ignore[attr-defined]
        return needle in logs


@pytest.fixture(scope="session")
def lab(docker_engine) -> Iterator[Lab]:
    images.build_proxy(docker_engine)
    api = docker_engine.api
    name = f"tbx-test-out-{secrets.token_hex(3)}"
    # internal: even a proxy bug could not send a packet off this machine
    net = api.create_network(name, driver="bridge", internal=True, labels={"taskbox.test": "lab"})
    cid = api.create_container(
        IMAGE, ["python3", "-c", STANDIN], name=f"{name}-standin", user="0",
        host_config=api.create_host_config(network_mode=name),
        networking_config=api.create_networking_config({name: api.create_endpoint_config(aliases=ALIASES)}),
    )["Id"]
    api.start(cid)
    info = api.inspect_container(cid)["NetworkSettings"]["Networks"][name]
    subnet = api.inspect_network(net["Id"])["IPAM"]["Config"][0]["Subnet"]
    time.sleep(0.5)
    yield Lab(name, cid, info["IPAddress"], subnet, docker_engine)
    api.remove_container(cid, force=True)
    api.remove_network(net["Id"])


@pytest.fixture
def nsvc(home: Path, lab: Lab, docker_engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[TaskService]:
    monkeypatch.setenv("TASKBOX_EGRESS_NETWORK", lab.network)
    service = TaskService(home)
    yield service
    api = docker_engine.api
    for c in api.containers(all=True, filters={"label": f"{LABEL_HOME}={service.home_label}"}):
        api.remove_container(c["Id"], force=True)
    for n in api.networks(filters={"label": f"{LABEL_HOME}={service.home_label}"}):
        api.remove_network(n["Id"])


def lab_task(svc: TaskService, repo: Path, lab: Lab, allow: list[str], deny: list[str] | None = None,
             desc: str = "egress"):
    # The stand-ins live on a private (Docker) subnet, which the proxy refuses unless listed.
    return svc.create_task(repo, desc, network="allowlist", allow_domains=allow,
                           metadata={"sandbox": {"allow_private": [lab.subnet], "ports": [80, 443, 8000],
                                                 "deny_domains": deny or []}})


def curl(svc: TaskService, task, url: str, *extra: str) -> tuple[str, str]:
    r = svc.exec(task.id, f"curl -sS -m 8 -o /dev/null -w '%{{http_code}}' {' '.join(extra)} '{url}' 2>&1; true")
    return r.stdout.strip()[-3:], r.stdout


# --- rules (no Docker) ---------------------------------------------------------------------------


def test_names_are_canonicalised() -> None:
    assert canonical_host("PyPI.org.") == "pypi.org"
    assert canonical_host("bücher.test") == "xn--bcher-kva.test"
    assert canonical_host("[::1]") == "::1"
    for bad in ("", "a..b", "-x.test", "x_y.test", "a" * 300, "exa mple.com"):
        with pytest.raises(InvalidInput):
            canonical_host(bad)
    assert parse_rule("*.Example.COM").text == "*.example.com"
    assert parse_rule("10.0.0.0/8").kind == "address"
    for bad in ("*.10.0.0.1", "a.*.com", "**.x"):
        with pytest.raises(InvalidInput):
            parse_rule(bad)


def test_deny_wins_wildcards_and_literals() -> None:
    rules = EgressRules.build(["pypi.org", "*.example.com", "10.9.8.7"], ["bad.example.com"])
    d = rules.decide
    assert d("PYPI.ORG.").allowed and d("a.b.example.com").allowed
    assert not d("example.com").allowed  # a wildcard covers names below, not the suffix itself
    assert d("bad.example.com").rule == "deny:bad.example.com"
    assert not d("evilpypi.org").allowed and not d("pypi.org.evil.test").allowed
    assert d("10.9.8.7").allowed and d("169.254.169.254").rule == "ip-literal"
    assert d("127.0.0.1").rule == "ip-literal" and not d("::1").allowed
    assert d("pypi.org", 22).rule == "port"
    text = squid_config(rules)
    deny_at, allow_at = text.index("http_access deny deny_names"), text.index("http_access allow allow_names")
    assert deny_at < allow_at and text.rstrip().endswith("http_access deny all rule_default")
    assert network.is_private("169.254.169.254") and network.is_private("fd00::1")
    assert not network.is_private("151.101.0.223")


# --- allowlist mode against the real proxy -------------------------------------------------------


def test_listed_domain_works_unlisted_is_refused_and_logged(nsvc: TaskService, repo: Path, lab: Lab) -> None:
    task = lab_task(nsvc, repo, lab, ["allowed.test", "*.allowed.test"], deny=["evil.allowed.test"])
    token = secrets.token_hex(4)
    code, _ = curl(nsvc, task, f"http://allowed.test:8000/ok-{token}")
    assert code == "200" and lab.seen(f"/ok-{token}")
    code, _ = curl(nsvc, task, f"http://ALLOWED.test.:8000/upper-{token}")  # canonicalised by the proxy
    assert code == "200"
    code, _ = curl(nsvc, task, f"http://api.allowed.test:8000/wild-{token}")
    assert code == "200"
    for host, rule in (("other.test", "not-listed"), ("evil.allowed.test", "deny-name")):
        code, _ = curl(nsvc, task, f"http://{host}:8000/refused-{token}")
        assert code == "403"
        assert not lab.seen(f"/refused-{token}")
        denied = [e for e in nsvc.audit.read(task.id, decision="deny") if e["kind"] == "egress"]
        assert any(e["host"] == host and e["rule"] == rule for e in denied), denied
    events = [e for e in nsvc.registry.events(task.id) if e["type"] == "egress.denied"]
    assert {e["payload"]["host"] for e in events} >= {"other.test", "evil.allowed.test"}
    allowed = [e for e in nsvc.audit.read(task.id, decision="allow") if e["kind"] == "egress"]
    assert any(e["host"] == "allowed.test" and e["rule"] == "allow-name" for e in allowed)
    # the CLI shows the same audit log
    res = run_cli("policy", "audit", task.id, "--denied", env={"TASKBOX_HOME": str(nsvc.paths.home)})
    assert res.returncode == 0 and "other.test" in res.stdout


def test_proxy_bypass_attempts_fail(nsvc: TaskService, repo: Path, lab: Lab) -> None:
    task = lab_task(nsvc, repo, lab, ["allowed.test"])
    token = secrets.token_hex(4)
    attempts = {
        "noproxy": f"curl -sS -m 5 --noproxy '*' http://allowed.test:8000/np-{token}",
        "unset-vars": f"env -u http_proxy -u HTTP_PROXY -u https_proxy -u HTTPS_PROXY "
                      f"curl -sS -m 5 http://allowed.test:8000/unset-{token}",
        "direct-ip": f"curl -sS -m 5 --noproxy '*' http://{lab.ip}:8000/direct-{token}",
        "ip-via-proxy": f"curl -sS -m 5 -f http://{lab.ip}:8000/viaproxy-{token}",
        "python-socket": f"python3 -c \"import socket; socket.create_connection(('{lab.ip}', 8000), 5)\"",
        "gateway": "python3 -c \"import socket; r=open('/proc/net/route').read().split()[13]; "
                   "ip='.'.join(str(int(r[i:i+2],16)) for i in (6,4,2,0)); "
                   "socket.create_connection((ip, 2375), 4)\"",
        "connect-tunnel": f"curl -sS -m 5 -p http://allowed.test:22/tunnel-{token}",
        "metadata-direct": "curl -sS -m 5 --noproxy '*' http://169.254.169.254/latest/meta-data/",
        "metadata-via-proxy": "curl -sS -m 5 -f http://169.254.169.254/latest/meta-data/",
        "dns-outside-resolver": f"python3 -c \"import socket; s=socket.socket(2,2); s.settimeout(3); "
                                f"s.sendto(b'dns-{token}', ('{lab.ip}', 53)); s.recv(512)\"",
        "dns-lookup": "python3 -c \"import socket; socket.getaddrinfo('other.test', 80)\"",
    }
    for name, cmd in attempts.items():
        t0 = time.monotonic()
        r = nsvc.exec(task.id, cmd, timeout=20)
        assert r.exit_code != 0, (name, r.stdout, r.stderr)
        print(f"{name}: exit {r.exit_code} after {time.monotonic() - t0:.1f}s")
    logs = lab.client.api.logs(lab.standin).decode(errors="replace")  # type: ignore[attr-defined]
    assert token not in logs  # not one of them reached the stand-in
    # the proxy refused the ones that reached it, naming the rule
    denied = {e["host"]: e["rule"] for e in nsvc.audit.read(task.id, decision="deny")
              if e["kind"] == "egress"}
    assert denied.get("169.254.169.254") == "ip-literal" and denied.get(lab.ip) == "ip-literal"
    assert denied.get("allowed.test") == "port"  # the CONNECT to port 22
    # the task's network has no way out but the proxy
    api = lab.client.api  # type: ignore[attr-defined]
    nets = api.inspect_container(task.container_id)["NetworkSettings"]["Networks"]
    (net_name,) = nets
    info = api.inspect_network(net_name)
    assert info["Internal"] is True and info["Options"]["com.docker.network.bridge.inhibit_ipv4"] == "true"
    assert len(info["Containers"]) == 2  # the task and its proxy, nobody else


def test_private_addresses_are_refused_unless_listed(nsvc: TaskService, repo: Path, lab: Lab) -> None:
    """allowed.test resolves to a private (Docker) address: listing the name alone is not enough."""
    task = nsvc.create_task(repo, "no private", network="allowlist", allow_domains=["allowed.test"],
                            metadata={"sandbox": {"ports": [8000]}})
    token = secrets.token_hex(4)
    code, _ = curl(nsvc, task, f"http://allowed.test:8000/private-{token}")
    assert code == "403" and not lab.seen(token)
    denied = [e for e in nsvc.audit.read(task.id, decision="deny") if e["kind"] == "egress"]
    assert denied[-1]["rule"] == "private-address"


def test_proxy_follows_the_task_lifecycle(nsvc: TaskService, repo: Path, lab: Lab, docker_engine) -> None:
    task = lab_task(nsvc, repo, lab, ["allowed.test"])
    api = docker_engine.api
    proxies = api.containers(all=True, filters={"label": "taskbox.role=egress-proxy"})
    proxy = next(p for p in proxies if p["Labels"].get("taskbox.task") == task.id)
    hc = api.inspect_container(proxy["Id"])["HostConfig"]
    assert hc["ReadonlyRootfs"] and hc["CapDrop"] == ["ALL"] and "no-new-privileges:true" in hc["SecurityOpt"]
    assert api.inspect_container(proxy["Id"])["Config"]["User"] == "13:13"
    nsvc.pause(task.id)
    assert api.inspect_container(proxy["Id"])["State"]["Running"] is False
    nsvc.ensure_running(task.id)
    assert curl(nsvc, task, "http://allowed.test:8000/again")[0] == "200"
    nsvc.complete(task.id)
    nsvc.cleanup(task.id)
    assert not api.containers(all=True, filters={"label": f"taskbox.task={task.id}"})
    assert not api.networks(filters={"label": f"{LABEL_HOME}={nsvc.home_label}"})


def test_none_is_default_and_open_needs_a_choice_with_a_warning(nsvc: TaskService, repo: Path, docker_engine,
                                                                home: Path) -> None:
    t = nsvc.create_task(repo, "default net")
    assert t.network == "none"
    assert docker_engine.api.inspect_container(t.container_id)["HostConfig"]["NetworkMode"] == "none"
    with pytest.raises(InvalidInput):
        nsvc.create_task(repo, "bad net", network="host")
    with pytest.raises(InvalidInput, match="allowlist"):
        nsvc.create_task(repo, "domains without allowlist", network="none", allow_domains=["pypi.org"])
    res = run_cli("create-task", "open please", "--repo", str(repo), "--network", "open", "--lazy", "--json",
                  env={"TASKBOX_HOME": str(home)})
    assert res.returncode == 0, res.stderr
    assert "warning: network `open`" in res.stderr
    tid = __import__("json").loads(res.stdout)["task_id"]
    assert any(e["type"] == "sandbox.weakened" for e in nsvc.registry.events(tid))
    res = run_cli("create-task", "allow cli", "--repo", str(repo), "--allow-domain", "pypi.org", "--lazy",
                  "--json", env={"TASKBOX_HOME": str(home)})
    assert res.returncode == 0, res.stderr
    data = __import__("json").loads(res.stdout)
    assert data["network"] == "allowlist" and data["metadata"]["sandbox"]["allow_domains"] == ["pypi.org"]
    assert data["warnings"] == []
