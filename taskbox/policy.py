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

    [[rules]]
    action = "deny"
    tools = ["restore"]                 # every call of these operations (no condition needed)

Rules name operations by the core's names (``exec``, ``write_file``, ``restore``, … see
``taskbox.models.OPERATIONS``) or by any adapter's name for them (``restore_task_checkpoint``,
``restore-checkpoint``); a rule holds the same over the CLI, MCP and the web API.

Evaluation: every rule whose conditions all hold matches; the strictest matching action
wins (``deny`` > ``checkpoint`` > ``allow``), so rule order never matters; with no match the
``default`` action (top-level key, ``allow`` unless set) applies. Every decision — allow,
checkpoint or deny, with the rule that made it — is appended to the task's audit log,
``$TASKBOX_HOME/audit/<task>.jsonl`` (outside the workspace, out of the agent's reach).
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import load_project_file
from .errors import InvalidInput, PolicyDenied
from .models import operation
from .network import NetworkPolicy

if TYPE_CHECKING:
    from .models import Task

POLICY_FILE = Path(".taskbox") / "policy.toml"
ACTIONS = ("allow", "checkpoint", "deny")  # in increasing strictness
RISK_LEVELS = ("low", "medium", "high")
FILE_TOOLS = ("write_file", "edit_file", "delete_file", "read_file", "list_files")


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
        # A rule may name an operation by any of its names (an MCP tool, a CLI command).
        if "*" not in self.tools and operation(tool) not in {operation(t) for t in self.tools}:
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
    named_tools = [isinstance(r, dict) and "tools" in r for r in data.get("rules", [])]
    for i, rule in enumerate(rules):
        name = rule.id or f"rules[{i}]"
        if rule.action not in ACTIONS:
            raise InvalidInput(f"{where}: {name}: action {rule.action!r} is not one of {', '.join(ACTIONS)}")
        # A rule on commands needs a condition; one naming its operations may hold for all of their calls.
        if rule.pattern is None and rule.glob is None and rule.risk is None and not named_tools[i]:
            raise InvalidInput(f"{where}: {name}: give a pattern, a glob, a risk level or the tools it is for")
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


def for_task(task: Task) -> Policy:
    """The policy of a task's project; a broken policy file refuses everything (fail closed)."""
    try:
        return load(Path(task.repo_path))
    except InvalidInput as exc:
        raise PolicyDenied(f"the project policy is invalid, so nothing runs until it is fixed: {exc.message}",
                           rule="policy-invalid", invalid=exc.message[:500]) from exc
