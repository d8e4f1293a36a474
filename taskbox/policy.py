"""The project policy: allowed domains, limits and command rules, checked before every tool call.

A project's policy lives in the user's repository at ``.taskbox/policy.toml`` — not in a
task's workspace, so an agent cannot loosen its own rules. Without the file the built-in
defaults apply (no network, settings' limits, every command allowed). Example::

    [network]
    mode = "allowlist"                  # default mode for this project's tasks
    allow = ["pypi.org", "*.pythonhosted.org", "registry.npmjs.org"]
    deny = ["*.evil.example"]           # deny rules win over allow rules
    allow_private = []                  # private networks listed names may resolve into
    ports = [80, 443]

    [limits]                            # defaults for new tasks, and ceilings
    memory = "2g"
    cpus = 1.0
    pids = 512
    disk = "10g"                        # workspace disk quota (taskbox.quota)
    inodes = 1000000                    # workspace inode quota
    max_memory = "4g"
    max_cpus = 2.0
    max_pids = 1024
    max_disk = "20g"
    max_inodes = 2000000

    [mounts]
    allow = []                          # host paths a task may have mounted (read-only)

    [[rules]]                           # command and file rules
    id = "no-push"
    action = "deny"                     # allow | checkpoint | deny
    pattern = '\\bgit\\s+push\\b'       # regex searched in the command (or path)
    reason = "pushing is the user's job"

    [[rules]]
    action = "checkpoint"
    risk = "high"                       # risk level (taskbox.risk) at least this

    [[rules]]
    action = "deny"
    tools = ["write_file", "edit_file", "delete_file"]
    glob = ".env*"                      # shell pattern matched against the whole path

Evaluation: every rule whose conditions all hold matches; the strictest matching action
wins (``deny`` > ``checkpoint`` > ``allow``), so rule order never matters; with no match the
``default`` action (top-level key, ``allow`` unless set) applies. Every decision — allow,
checkpoint or deny, with the rule that made it — is appended to the task's audit log,
``$TASKBOX_HOME/audit/<task>.jsonl`` (outside the workspace, out of the agent's reach).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import files
from .config import load_project_file
from .errors import InvalidInput, PolicyDenied

if TYPE_CHECKING:
    from .models import Task
    from .service import TaskService

POLICY_FILE = Path(".taskbox") / "policy.toml"
ACTIONS = ("allow", "checkpoint", "deny")  # in increasing strictness
RISK_LEVELS = ("low", "medium", "high")
FILE_TOOLS = ("write_file", "edit_file", "delete_file", "read_file", "list_files")
NOT_LOGGED = "[not logged]"  # what is recorded instead of a command run with log=False


@dataclass
class NetworkPolicy:
    mode: str | None = None
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    allow_private: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=lambda: [80, 443])


@dataclass
class Limits:
    memory: str | None = None
    cpus: float | None = None
    pids: int | None = None
    max_memory: str | None = None
    max_cpus: float | None = None
    max_pids: int | None = None
    disk: str | None = None
    inodes: int | None = None
    max_disk: str | None = None
    max_inodes: int | None = None


@dataclass
class Rule:
    """One command/file rule; every given condition must hold for it to match."""

    action: str
    id: str = ""
    pattern: str | None = None
    glob: str | None = None
    risk: str | None = None
    tools: list[str] = field(default_factory=lambda: ["exec"])
    reason: str = ""

    def matches(self, tool: str, text: str, risk_level: str | None) -> bool:
        if "*" not in self.tools and tool not in self.tools:
            return False
        if self.pattern is not None and not re.search(self.pattern, text):
            return False
        if self.glob is not None and not fnmatch.fnmatchcase(text, self.glob):
            return False
        if self.risk is not None:
            if risk_level not in RISK_LEVELS or RISK_LEVELS.index(risk_level) < RISK_LEVELS.index(self.risk):
                return False
        return True


@dataclass
class PolicyDecision:
    action: str
    rule: str
    reason: str
    tool: str
    subject: str
    risk: str | None = None

    @property
    def allowed(self) -> bool:
        return self.action != "deny"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Policy:
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    limits: Limits = field(default_factory=Limits)
    rules: list[Rule] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    default: str = "allow"
    path: Path | None = None
    exists: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "exists": self.exists, "default": self.default,
                "network": asdict(self.network), "limits": asdict(self.limits),
                "mounts": list(self.mounts), "rules": [asdict(r) for r in self.rules]}

    def evaluate(self, tool: str, args: dict[str, Any], repo: Path | None = None) -> PolicyDecision:
        """The decision for one tool call (``exec`` with a command, a file tool with a path)."""
        from . import risk

        text = risk.command_text(args)
        level = None
        if any(r.risk for r in self.rules):
            try:
                cfg = risk.load(repo) if repo else risk.RiskConfig()
            except InvalidInput:
                cfg = risk.RiskConfig()
            level = cfg.assess(tool, text).level
        best: tuple[int, Rule] | None = None
        for i, rule in enumerate(self.rules):
            if rule.matches(tool, text, level):
                rank = ACTIONS.index(rule.action)
                if best is None or rank > ACTIONS.index(best[1].action):
                    best = (i, rule)
        if best is None:
            return PolicyDecision(self.default, "default", f"no rule matched; the default is {self.default}",
                                  tool, text, level)
        i, rule = best
        name = rule.id or f"rules[{i}]"
        return PolicyDecision(rule.action, name, rule.reason or f"rule {name} ({rule.action})", tool, text, level)

    def check_limits(self, memory: str, cpus: float, pids: int, *, disk: int | None = None,
                     inodes: int | None = None) -> None:
        """Raise :class:`PolicyDenied` if a task's limits exceed the project's ceilings.

        ``disk`` (bytes) and ``inodes`` are the workspace quota; 0 means none, which exceeds
        any ceiling (0 inodes: the filesystem's default, one per 16 KiB of ``disk``).
        """
        from .quota import parse_size
        from .sandbox import parse_memory

        lim = self.limits
        if lim.max_memory and parse_memory(memory) > parse_memory(lim.max_memory):
            raise PolicyDenied(f"memory {memory} exceeds the project's maximum of {lim.max_memory}",
                               rule="limits.max_memory", policy=str(self.path))
        if lim.max_cpus and cpus > lim.max_cpus:
            raise PolicyDenied(f"{cpus} CPUs exceed the project's maximum of {lim.max_cpus}",
                               rule="limits.max_cpus", policy=str(self.path))
        if lim.max_pids and pids > lim.max_pids:
            raise PolicyDenied(f"pids limit {pids} exceeds the project's maximum of {lim.max_pids}",
                               rule="limits.max_pids", policy=str(self.path))
        if lim.max_disk and disk is not None and (not disk or disk > parse_size(lim.max_disk)):
            what = f"a disk quota of {disk} bytes" if disk else "no disk quota (workspace_quota = 0)"
            raise PolicyDenied(f"{what} exceeds the project's maximum of {lim.max_disk}",
                               rule="limits.max_disk", policy=str(self.path))
        if lim.max_inodes and inodes is not None:
            count = inodes or (disk // 16384 if disk else 0)
            if not count or count > lim.max_inodes:
                what = f"an inode quota of {count}" if count else "no inode quota"
                raise PolicyDenied(f"{what} exceeds the project's maximum of {lim.max_inodes}",
                                   rule="limits.max_inodes", policy=str(self.path))

    def mount_allowed(self, host_path: str | Path) -> bool:
        """Whether the policy allows mounting ``host_path`` (itself or under a listed path) into a task."""
        real = Path(host_path).resolve()
        for allowed in self.mounts:
            base = Path(allowed).expanduser().resolve()
            if real == base or base in real.parents:
                return True
        return False


# --- loading -----------------------------------------------------------------------------------

def policy_path(repo: Path) -> Path:
    return Path(repo) / POLICY_FILE


def load(repo: Path | str) -> Policy:
    """The policy of the project at ``repo`` (the defaults when it has no policy file)."""
    path = policy_path(Path(repo))
    return load_project_file(path, _parse_text) or Policy(path=path)


def _parse_text(text: str, path: Path) -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: invalid TOML: {exc}") from exc
    return parse(data, path)


def parse(data: dict[str, Any], path: Path | None = None) -> Policy:
    """Validate a policy given as parsed TOML; :class:`InvalidInput` names the bad entry."""
    from .network import MODES, EgressRules
    from .quota import MIN_INODES, parse_size
    from .sandbox import check_cpus, parse_memory

    where = str(path) if path else "policy"
    known = {"network", "limits", "rules", "mounts", "default"}
    unknown = set(data) - known
    if unknown:
        raise InvalidInput(f"{where}: unknown sections {', '.join(sorted(unknown))}")
    try:
        net = NetworkPolicy(**data.get("network", {}))
        limits = Limits(**data.get("limits", {}))
        rules = [Rule(**r) for r in data.get("rules", [])]
        mounts = list((data.get("mounts") or {}).get("allow", []))
    except TypeError as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    default = data.get("default", "allow")
    if default not in ACTIONS:
        raise InvalidInput(f"{where}: default {default!r} is not one of {', '.join(ACTIONS)}")
    if net.mode is not None and net.mode not in MODES:
        raise InvalidInput(f"{where}: network.mode {net.mode!r} is not one of {', '.join(MODES)}")
    EgressRules.build(net.allow, net.deny, net.allow_private, net.ports)  # validates every entry
    for size in (limits.memory, limits.max_memory):
        if size is not None:
            parse_memory(size)
    for size in (limits.disk, limits.max_disk):
        if size is not None and not parse_size(str(size), f"{where}: limits disk"):
            raise InvalidInput(f"{where}: a disk limit of 0 is not allowed (quotas are turned off only by "
                               "the workspace_quota setting)")
    for count in (limits.inodes, limits.max_inodes):
        if count is not None and (not isinstance(count, int) or count < MIN_INODES):
            raise InvalidInput(f"{where}: an inode limit must be a whole number of at least {MIN_INODES}")
    for cores in (limits.cpus, limits.max_cpus):
        if cores is not None:
            check_cpus(float(cores))
    for i, rule in enumerate(rules):
        name = rule.id or f"rules[{i}]"
        if rule.action not in ACTIONS:
            raise InvalidInput(f"{where}: {name}: action {rule.action!r} is not one of {', '.join(ACTIONS)}")
        if rule.pattern is None and rule.glob is None and rule.risk is None:
            raise InvalidInput(f"{where}: {name}: give a pattern, a glob or a risk level")
        if rule.pattern is not None:
            try:
                re.compile(rule.pattern)
            except re.error as exc:
                raise InvalidInput(f"{where}: {name}: bad pattern {rule.pattern!r}: {exc}") from None
        if rule.risk is not None and rule.risk not in RISK_LEVELS:
            raise InvalidInput(f"{where}: {name}: risk {rule.risk!r} is not one of {', '.join(RISK_LEVELS)}")
        if isinstance(rule.tools, str):
            rule.tools = [rule.tools]
    return Policy(net, limits, rules, mounts, default, path, path is not None)


def for_task(service: TaskService, task: Task) -> Policy:
    """The policy of a task's project; a broken policy file refuses everything (fail closed)."""
    try:
        return load(Path(task.repo_path))
    except InvalidInput as exc:
        service.registry.add_event("policy.invalid", task.id, {"error": exc.message[:500]})
        raise PolicyDenied(f"the project policy is invalid, so nothing runs until it is fixed: {exc.message}",
                           rule="policy-invalid") from exc


# --- the check and the audit log ---------------------------------------------------------------


def check(service: TaskService, task: Task, tool: str, args: dict[str, Any]) -> PolicyDecision:
    """Evaluate a tool call against the task's project policy, audit it, and enforce it.

    ``deny`` raises :class:`PolicyDenied` (after a ``policy.denied`` event); ``checkpoint``
    takes a checkpoint first (a failed checkpoint refuses the call, since the rule asked
    for a safety net).
    """
    pol = for_task(service, task)
    decision = pol.evaluate(tool, args, Path(task.repo_path))
    # A call made with log=False is decided on its text but recorded without it.
    subject = decision.subject if args.get("log", True) else NOT_LOGGED
    audit(service, task.id, kind="tool", decision=decision.action, rule=decision.rule, subject=subject,
          tool=tool, reason=decision.reason, risk=decision.risk)
    if decision.action == "deny":
        service.registry.add_event("policy.denied", task.id, {"tool": tool, "rule": decision.rule,
                                                              "subject": subject[:300],
                                                              "reason": decision.reason}, sample=decision.rule)
        raise PolicyDenied(f"refused by the project policy ({decision.rule}): {decision.reason}",
                           rule=decision.rule, tool=tool)
    if decision.action == "checkpoint":
        from .errors import TaskboxError

        short = subject if len(subject) <= 100 else subject[:97] + "..."
        reason = service.redactor.text(f"policy rule {decision.rule} before `{short}`")
        try:
            service.create_checkpoint(task.id, None, trigger="policy", reason=reason)
        except TaskboxError as exc:
            service.registry.add_event("policy.checkpoint_failed", task.id,
                                       {"rule": decision.rule, "error": exc.message[:300]})
            raise PolicyDenied(f"the policy asks for a checkpoint before this call ({decision.rule}), and "
                               f"it failed: {exc.message}", rule=decision.rule, tool=tool) from exc
    return decision


def audit_dir(service: TaskService) -> Path:
    path = service.paths.home / "audit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def audit(service: TaskService, task_id: str, *, kind: str, decision: str, rule: str, subject: str,
          **extra: Any) -> None:
    """Append one decision to the task's audit log (rate-limited per kind and decision, see :func:`audit_batch`)."""
    audit_batch(service, task_id, [{"kind": kind, "decision": decision, "rule": rule, "subject": subject, **extra}])


def audit_batch(service: TaskService, task_id: str, entries: list[dict[str, Any]],
                sample: str = "subject") -> int:
    """Append decisions (dicts with kind, decision, rule, subject …) to the task's audit log.

    Per task, kind and decision, a burst of ``record_burst`` entries per ``record_window``
    seconds is written one by one; the rest are counted by the registry's limiter and
    written as one ``aggregated`` entry with their ``count`` (``entry[sample]`` of a few
    kept as examples). Returns how many entries were written one by one.
    """
    now = time.time()
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(f"{e['kind']}:{e['decision']}", []).append(i)
    keep: set[int] = set()
    lines: list[bytes] = []
    for key, idx in groups.items():
        take, closed = service.registry.admit("audit", task_id, key, len(idx),
                                              [str(entries[i].get(sample) or "") for i in idx])
        keep.update(idx[:take])
        if closed:
            lines.append(_aggregate_line(service, task_id, key, closed))
    for i, e in enumerate(entries):
        if i in keep:
            entry = {"time": now, "task_id": task_id, **{k: v for k, v in e.items() if v is not None}}
            entry["subject"] = str(entry.get("subject", ""))[:1000]
            lines.append(_line(service, entry))
    _append(service, task_id, b"".join(lines))
    return len(keep)


def flush_records(service: TaskService, task_id: str | None = None, force: bool = False) -> None:
    """Write the aggregated audit entries and events of closed rate-limit windows (all, with ``force``)."""
    found = service.registry.flush_windows("audit", task_id, force)
    for tid, key, aggregate in found:
        if tid:
            _append(service, tid, _aggregate_line(service, tid, key, aggregate))
    service.registry.flush_events(task_id, force)


def _aggregate_line(service: TaskService, task_id: str, key: str, aggregate: dict[str, Any]) -> bytes:
    kind, _, decision = key.partition(":")
    entry = {"time": time.time(), "task_id": task_id, "kind": kind, "decision": decision, "rule": "aggregated",
             "subject": f"{aggregate['count']} more {kind} {decision} decisions", **aggregate}
    return _line(service, entry)


def _line(service: TaskService, entry: dict[str, Any]) -> bytes:
    return (json.dumps(service.registry.redact(entry), sort_keys=True, default=str) + "\n").encode()


def _append(service: TaskService, task_id: str, data: bytes) -> None:
    """Append to the task's audit log with one ``write`` (safe across processes); rotate it past its size.

    Past ``audit_max_bytes`` the log becomes ``<task>.jsonl.1`` (replacing an older one)
    and a new one starts, so a task's audit log never takes more than twice that.
    """
    if not data:
        return
    path = audit_dir(service) / f"{task_id}.jsonl"
    limit = int(service.settings.audit_max_bytes)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_size + len(data) > limit:
            with files.locked(service.paths.locks / f"{task_id}.audit.lock"):
                try:
                    current = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
                # Another process may have rotated it while we waited for the lock.
                if current is not None and current.st_ino == os.fstat(fd).st_ino \
                        and current.st_size + len(data) > limit:
                    os.replace(path, path.with_name(path.name + ".1"))
                os.close(fd)
                fd = os.open(path, flags, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _tail(path: Path, limit: int) -> bytes:
    """The last ``limit`` bytes of ``path``, from a line start (the log is bounded, the read is too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        if size <= limit:
            return fh.read(limit)
        fh.seek(size - limit)
        data = fh.read(limit)
        return data[data.find(b"\n") + 1:]


def audit_log(service: TaskService, task_id: str, limit: int | None = None,
              decision: str | None = None) -> list[dict[str, Any]]:
    """The task's audit entries, oldest first (the last ``limit``; only ``decision`` if given)."""
    path = audit_dir(service) / f"{task_id}.jsonl"
    most = int(service.settings.audit_max_bytes)
    data = _tail(path.with_name(path.name + ".1"), most) + _tail(path, most)
    out = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and (decision is None or entry.get("decision") == decision):
            out.append(entry)
    return out[-limit:] if limit else out
