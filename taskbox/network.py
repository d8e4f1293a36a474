"""Per-task networks and the egress proxy (SPEC §6, network modes).

Three modes:

``none`` (default)
    The container has only a loopback interface.
``allowlist``
    The task container sits alone on its own ``internal`` Docker network (no gateway on
    the host: the bridge gets no address, so neither the internet nor the host's own
    services are reachable). The only other member is a squid container, the egress
    proxy, which is also on an outside network and forwards requests for listed domains
    only. ``HTTP(S)_PROXY`` point the task at it; DNS in the task resolves nothing but the
    proxy's name, so lookups cannot be used to smuggle data out.
``open``
    The engine's default bridge: full network access. Only by explicit choice.

Allowlist rules are exact names (``pypi.org``), ``*.suffix`` wildcards (any name *below*
the suffix), and IP addresses or networks. Deny rules win over allow rules. Names are
canonicalised (lowercase, trailing dot removed, IDNA/punycode). IP literals are refused
unless listed, and so is any name that resolves to a private, loopback, link-local or
metadata address, unless that address is listed in ``allow_private``. Squid logs every
decision with the rule that made it; :func:`sync_log` copies them into the task's audit
log and reports denials as registry events.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import InvalidInput

if TYPE_CHECKING:
    from .audit import AuditLog
    from .models import Task

MODES = ("none", "allowlist", "open")
PROXY_PORT = 3128
PROXY_ALIAS = "taskbox-proxy"
PROXY_UID = "13:13"  # Debian's `proxy` user in the proxy image
DEFAULT_PORTS = (80, 443)
LOG_BATCH = 10_000  # proxy log lines read per sync; a flood is read over several syncs
# Addresses a name must not resolve to unless listed: "this" network, RFC 1918, CGNAT,
# loopback, link-local (cloud metadata lives at 169.254.169.254), IETF/benchmark ranges,
# multicast and reserved, and their IPv6 counterparts (v4-mapped included).
PRIVATE_NETWORKS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3",
    "::/127", "::ffff:0:0/96", "64:ff9b::/96", "fc00::/7", "fe80::/10", "ff00::/8",
)
METADATA_ADDRESSES = ("169.254.169.254", "fd00:ec2::254")

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


# --- rules -----------------------------------------------------------------------------------


def canonical_host(name: str) -> str:
    """A host name as the proxy compares it: lowercase, no trailing dot, punycode (IDNA).

    IP addresses come back in their canonical text form. Raises :class:`InvalidInput`
    for anything that is not a valid name or address.
    """
    raw = (name or "").strip()
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        pass
    host = raw.rstrip(".").lower()
    if not host or len(host) > 253:
        raise InvalidInput(f"{name!r} is not a valid host name")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise InvalidInput(f"{name!r} is not a valid host name: {exc}") from None
    if not all(_LABEL.match(label) for label in host.split(".")):
        raise InvalidInput(f"{name!r} is not a valid host name")
    return host


@dataclass(frozen=True)
class Rule:
    """One allow or deny entry: ``kind`` is ``name``, ``suffix`` or ``address``."""

    kind: str
    value: str

    @property
    def text(self) -> str:
        return f"*.{self.value}" if self.kind == "suffix" else self.value

    def matches(self, host: str) -> bool:
        """Whether a canonical ``host`` (name or IP text) falls under this rule."""
        if self.kind == "name":
            return host == self.value
        if self.kind == "suffix":
            return host.endswith("." + self.value)
        try:
            return ipaddress.ip_address(host) in ipaddress.ip_network(self.value, strict=False)
        except ValueError:
            return False


def parse_rule(entry: str) -> Rule:
    """Parse ``example.com``, ``*.example.com``, ``10.1.2.3`` or ``10.0.0.0/8`` into a :class:`Rule`."""
    text = (entry or "").strip()
    if "/" in text:
        try:
            return Rule("address", str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise InvalidInput(f"{entry!r} is not a valid network") from None
    if text.startswith("*."):
        value = canonical_host(text[2:])
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return Rule("suffix", value)
        raise InvalidInput(f"{entry!r}: a wildcard needs a domain, not an address")
    if "*" in text:
        raise InvalidInput(f"{entry!r}: only a leading `*.` wildcard is supported")
    value = canonical_host(text)
    try:
        ipaddress.ip_address(value)
        return Rule("address", value)
    except ValueError:
        return Rule("name", value)


def is_private(address: str) -> bool:
    """Whether ``address`` is private, loopback, link-local, metadata, multicast or reserved."""
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(n) for n in PRIVATE_NETWORKS if ipaddress.ip_network(n).version == ip.version)


@dataclass(frozen=True)
class EgressRules:
    """What a task in ``allowlist`` mode may reach through its proxy."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    allow_private: tuple[str, ...] = ()  # networks listed names may resolve into
    ports: tuple[int, ...] = DEFAULT_PORTS

    @classmethod
    def build(cls, allow: Iterable[str] = (), deny: Iterable[str] = (), allow_private: Iterable[str] = (),
              ports: Iterable[int] | None = None) -> EgressRules:
        """Parse and de-duplicate rule texts; raise :class:`InvalidInput` on a bad entry."""
        def uniq(rules: Iterable[Rule]) -> tuple[Rule, ...]:
            return tuple(dict.fromkeys(rules))

        nets = []
        for n in allow_private:
            try:
                nets.append(str(ipaddress.ip_network(str(n).strip(), strict=False)))
            except ValueError:
                raise InvalidInput(f"allow_private entry {n!r} is not an address or network") from None
        port_list = tuple(sorted({int(p) for p in (ports if ports is not None else DEFAULT_PORTS)}))
        if any(p < 1 or p > 65535 for p in port_list):
            raise InvalidInput(f"ports {port_list} must be between 1 and 65535")
        return cls(uniq(parse_rule(a) for a in allow), uniq(parse_rule(d) for d in deny),
                   tuple(dict.fromkeys(nets)), port_list)

    def to_dict(self) -> dict[str, Any]:
        return {"allow": [r.text for r in self.allow], "deny": [r.text for r in self.deny],
                "allow_private": list(self.allow_private), "ports": list(self.ports)}

    def decide(self, host: str, port: int | None = None) -> Decision:
        """The proxy's decision for ``host``, made without DNS (resolved addresses aside).

        The same order as the generated squid configuration: ports, deny rules, IP
        literals, allow rules. Squid additionally refuses a listed *name* that resolves
        to a private address not in ``allow_private``.
        """
        try:
            canon = canonical_host(host)
        except InvalidInput:
            return Decision(False, "invalid-host", host)
        if port is not None and port not in self.ports:
            return Decision(False, "port", canon)
        for rule in self.deny:
            if rule.matches(canon):
                return Decision(False, f"deny:{rule.text}", canon)
        literal = _is_ip(canon)
        if literal:
            for rule in self.allow:
                if rule.kind == "address" and rule.matches(canon):
                    return Decision(True, f"allow:{rule.text}", canon)
            return Decision(False, "ip-literal", canon)
        for rule in self.allow:
            if rule.kind != "address" and rule.matches(canon):
                return Decision(True, f"allow:{rule.text}", canon)
        return Decision(False, "not-listed", canon)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    host: str

    def to_dict(self) -> dict[str, Any]:
        return {"decision": "allow" if self.allowed else "deny", "rule": self.rule, "host": self.host}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# --- squid configuration ---------------------------------------------------------------------


def _name_regex(rule: Rule) -> str:
    body = rule.value.replace(".", r"\.")
    # squid compares the host as the client sent it (lowercased); allow one trailing dot.
    return f"^{body}\\.?$" if rule.kind == "name" else f"^.+\\.{body}\\.?$"


def squid_config(rules: EgressRules) -> str:
    """The squid.conf for one task's proxy. Every decision is logged with the rule behind it."""
    names_allow = [_name_regex(r) for r in rules.allow if r.kind != "address"]
    names_deny = [_name_regex(r) for r in rules.deny if r.kind != "address"]
    addrs_allow = [r.value for r in rules.allow if r.kind == "address"]
    addrs_deny = [r.value for r in rules.deny if r.kind == "address"]
    lines = [
        "# Generated by taskbox (taskbox/network.py); one proxy per task.",
        f"http_port {PROXY_PORT}",
        "visible_hostname taskbox-proxy",
        "pid_filename none",
        "cache deny all",
        "cache_mem 0 MB",
        "pinger_enable off",
        "shutdown_lifetime 1 seconds",
        "logfile_rotate 0",
        "forwarded_for delete",
        "via off",
        "httpd_suppress_version_string on",
        "logformat taskbox %ts.%03tu %>a %Ss/%03>Hs %rm %ru %<a %{rule}note",
        "access_log stdio:/dev/stdout taskbox",
        "cache_log stdio:/dev/stderr",
        "coredump_dir /tmp",
        # IP literals: dotted quads and bracketed or bare IPv6; -n: never reverse-resolve.
        r"acl ip_literal dstdom_regex -n ^[0-9.]+$ ^\[?[0-9a-fA-F:.]+\]?$",
        "acl private_dst dst " + " ".join(PRIVATE_NETWORKS),
        "acl allowed_ports port " + " ".join(str(p) for p in rules.ports),
    ]
    notes = ("port", "deny-name", "deny-address", "ip-literal", "allow-address",
             "not-listed", "private-address", "allow-name", "default")
    lines += [f"acl rule_{n.replace('-', '_')} annotate_transaction rule={n}" for n in notes]
    if names_allow:
        lines.append("acl allow_names dstdom_regex -n -i " + " ".join(names_allow))
    if names_deny:
        lines.append("acl deny_names dstdom_regex -n -i " + " ".join(names_deny))
    if addrs_allow:
        lines.append("acl allow_addrs dst " + " ".join(addrs_allow))
    if addrs_deny:
        lines.append("acl deny_addrs dst " + " ".join(addrs_deny))
    if rules.allow_private:
        lines.append("acl allow_private dst " + " ".join(rules.allow_private))
    # Plain requests and CONNECT tunnels alike go only to listed ports: a tunnel to any port
    # would be a generic TCP relay.
    lines.append("http_access deny !allowed_ports rule_port")
    if names_deny:
        lines.append("http_access deny deny_names rule_deny_name")
    if addrs_deny:
        lines.append("http_access deny ip_literal deny_addrs rule_deny_address")
    if addrs_allow:
        lines.append("http_access allow ip_literal allow_addrs rule_allow_address")
    lines.append("http_access deny ip_literal rule_ip_literal")
    if names_allow:
        lines.append("http_access deny !allow_names rule_not_listed")
    else:
        lines.append("http_access deny all rule_not_listed")
    if addrs_deny:  # a listed name that resolves into a denied network
        lines.append("http_access deny deny_addrs rule_deny_address")
    if rules.allow_private:
        lines.append("http_access deny private_dst !allow_private rule_private_address")
    else:
        lines.append("http_access deny private_dst rule_private_address")
    if names_allow:  # with no name listed the acl does not exist (squid would refuse the config)
        lines.append("http_access allow allow_names rule_allow_name")
    lines.append("http_access deny all rule_default")
    return "\n".join(lines) + "\n"


# --- log -------------------------------------------------------------------------------------


def parse_log_line(line: str) -> dict[str, Any] | None:
    """One squid access-log line in the taskbox format, as a decision record (or None)."""
    parts = line.split()
    if len(parts) < 7 or "/" not in parts[2]:
        return None
    try:
        ts = float(parts[0])
    except ValueError:
        return None
    status, _, code = parts[2].partition("/")
    method, url = parts[3], parts[4]
    if method == "CONNECT":
        host, _, port_text = url.rpartition(":")
        port = int(port_text) if port_text.isdigit() else None
    else:
        split = urlsplit(url)
        host = split.hostname or ""
        try:
            port = split.port
        except ValueError:
            port = None
    rule = parts[6] if len(parts) > 6 and parts[6] != "-" else None
    allowed = status != "TCP_DENIED" and code != "403"
    return {"time": ts, "client": parts[1], "status": status, "code": int(code) if code.isdigit() else None,
            "method": method, "url": url[:500], "host": host.strip("[]"), "port": port,
            "server": None if parts[5] == "-" else parts[5], "rule": rule,
            "decision": "allow" if allowed else "deny"}


# --- lifecycle helpers used by Sandbox -------------------------------------------------------


@dataclass
class EgressConfig:
    """What :class:`~taskbox.sandbox.Sandbox` needs to give a task an egress proxy."""

    rules: EgressRules
    outside_network: str = "taskbox-egress"
    image: str = "taskbox-proxy:latest"
    extra_labels: dict[str, str] = field(default_factory=dict)

    def proxy_env(self) -> dict[str, str]:
        url = f"http://{PROXY_ALIAS}:{PROXY_PORT}"
        return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
                "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}


@dataclass
class NetworkPolicy:
    """A project policy's ``[network]`` section (:mod:`taskbox.policy`)."""

    mode: str | None = None
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    allow_private: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=lambda: [80, 443])


def task_rules(section: NetworkPolicy, task: Task) -> EgressRules:
    """The effective rules of a task: its project policy's network section plus the task's own."""
    own = (task.metadata.get("sandbox") or {}) if isinstance(task.metadata, dict) else {}
    return EgressRules.build(
        allow=[*section.allow, *own.get("allow_domains", [])],
        deny=[*section.deny, *own.get("deny_domains", [])],
        allow_private=[*section.allow_private, *own.get("allow_private", [])],
        ports=own.get("ports") or section.ports,
    )


def sync_log(egress_log: Callable[..., list[tuple[str, str]]], audit: AuditLog, task: Task) -> list[dict[str, Any]]:
    """Copy new proxy decisions of ``task`` into its audit log; report denials as events.

    ``egress_log`` reads the proxy's log lines (``Sandbox.egress_log``).
    Returns the new decisions. Safe to call often: a cursor file remembers what was read.
    One call reads at most :data:`LOG_BATCH` lines (the rest wait for the next call), and
    the audit log and events take them through the per-task rate limit, so a command that
    makes thousands of denied requests leaves a burst of entries and one aggregated record.
    """
    if task.network != "allowlist" or not task.container_id:
        return []
    cursor = audit.directory / f"{task.id}.egress-cursor"
    lines = egress_log(task.container_id, since=_read_cursor(cursor), max_lines=LOG_BATCH)
    if not lines:
        return []
    decisions = [r for r in (parse_log_line(text) for _stamp, text in lines) if r is not None]
    audit.batch(task.id, [
        {"kind": "egress", "decision": r["decision"], "rule": r["rule"] or "-", "subject": r["url"],
         "host": r["host"], "method": r["method"], "code": r["code"]} for r in decisions], sample="host")
    denied = [r for r in decisions if r["decision"] == "deny"]
    audit.registry.add_events("egress.denied", task.id,
                              [{k: r[k] for k in ("host", "port", "method", "url", "rule")} for r in denied],
                              [r["host"] for r in denied])
    _write_cursor(cursor, lines[-1][0])
    return decisions


def _read_cursor(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_cursor(path: Path, stamp: str) -> None:
    tmp = path.with_suffix(f".{time.monotonic_ns()}.tmp")
    tmp.write_text(stamp)
    tmp.replace(path)
