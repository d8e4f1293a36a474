"""Risk scoring of agent tool calls (SPEC §5) and the project's risk configuration.

A command's score is the sum of the weights of the risk *categories* it matches, each
category counted once, capped at 10:

    data_loss         +4  irreversible data loss (rm -rf, truncate, overwriting redirects, dd …)
    git_history       +3  git history/state change (push, merge, reset, rebase, cherry-pick, amend)
    production        +3  production impact (deploy, publish, migrations)
    destructive_file  +2  destructive file operation (recursive rm/chmod/chown, bulk mv)
    package_removal   +2  package removal (uninstall, prune, remove)

Levels: high ≥ 8, medium ≥ 4, low ≥ 2, else none. A checkpoint is taken automatically
before a call whose level reaches the configured ``threshold`` (default ``medium``), or
only before high-risk calls when ``high_only`` is set.

Patterns live in the user's repository, in ``.taskbox/risk.json`` (the workspace an agent
writes is a different directory, so an agent cannot switch its own safety net off). A
missing file means the built-in defaults; ``reset`` deletes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .config import load_project_file
from .errors import InvalidInput, NotFound

CONFIG = Path(".taskbox") / "risk.json"
MAX_SCORE = 10
LEVELS = (("high", 8), ("medium", 4), ("low", 2))
THRESHOLDS = ("low", "medium", "high")
CATEGORY_WEIGHTS = {
    "data_loss": 4,
    "git_history": 3,
    "production": 3,
    "destructive_file": 2,
    "package_removal": 2,
}
# One simple command: stop at the next ; & | or newline so a flag is matched to its command.
_ARGS = r"[^;&|\n]*"


@dataclass(frozen=True)
class Pattern:
    id: str
    tool: str  # a tool name (exec, delete_file, …) or * for every tool
    pattern: str  # a Python regular expression, matched case-insensitively anywhere
    category: str
    weight: int
    description: str = ""

    def matches(self, tool: str, text: str) -> bool:
        return (self.tool in ("*", tool)) and re.search(self.pattern, text, re.IGNORECASE) is not None


def _p(id_: str, category: str, pattern: str, description: str, tool: str = "exec") -> Pattern:
    return Pattern(id_, tool, pattern, category, CATEGORY_WEIGHTS[category], description)


DEFAULT_PATTERNS: tuple[Pattern, ...] = (
    _p("rm-rf", "data_loss",
       rf"\brm\b(?={_ARGS}\s(?:-[a-z]*r|--recursive\b))(?={_ARGS}\s(?:-[a-z]*f|--force\b))",
       "forced recursive delete (rm -rf)"),
    _p("truncate", "data_loss", r"\btruncate\b", "truncate a file or table"),
    _p("overwrite-redirect", "data_loss", r"(?<![>&0-9<])>\|?(?![>&])\s*(?!/dev/null\b)[^\s&|;<>]",
       "overwriting redirect (> file)"),
    _p("dd", "data_loss", rf"\bdd\b{_ARGS}\bof=", "dd writing to a file or device"),
    _p("mkfs-shred", "data_loss", r"\b(?:mkfs(?:\.\w+)?|shred|wipefs)\b", "format or shred"),
    _p("git-clean", "data_loss", rf"\bgit\s+clean\b{_ARGS}\s-[a-z]*f", "git clean -f (deletes untracked files)"),
    _p("git-discard", "data_loss",
       rf"\bgit\s+(?:reset\b{_ARGS}--hard|(?:checkout|restore)\b{_ARGS}\s\.(?:\s|$)|stash\s+(?:drop|clear)\b)",
       "discard uncommitted work (reset --hard, checkout ., stash drop)"),
    _p("sql-drop", "data_loss",
       r"\b(?:drop\s+(?:table|database|schema)|truncate\s+table|delete\s+from\b(?![^;]*\bwhere\b))",
       "SQL that drops or empties data"),
    _p("git-history", "git_history",
       r"\bgit\s+(?:-\S+\s+)*(?:push|merge|reset|rebase|cherry-pick|revert|filter-branch|filter-repo)\b",
       "git push, merge, reset, rebase, cherry-pick"),
    _p("git-amend", "git_history", rf"\bgit\s+commit\b{_ARGS}--amend\b", "git commit --amend"),
    _p("git-ref-delete", "git_history", rf"\bgit\s+(?:branch|tag)\b{_ARGS}\s(?:-[a-z]*d|--delete)\b",
       "delete a branch or tag"),
    _p("deploy", "production",
       r"\b(?:deploy|publish)\b|\btwine\s+upload\b|\b(?:kubectl|oc)\s+(?:apply|delete|rollout)\b"
       r"|\bterraform\s+(?:apply|destroy)\b|\bhelm\s+(?:install|upgrade|uninstall|delete)\b",
       "deploy or publish"),
    _p("migration", "production",
       r"\bmigrate\b|\bdb:(?:migrate|rollback|drop|reset)\b|\balembic\s+(?:upgrade|downgrade)\b",
       "database migration"),
    _p("rm-recursive", "destructive_file", rf"\brm\b(?={_ARGS}\s(?:-[a-z]*r|--recursive\b))",
       "recursive delete"),
    _p("recursive-chmod", "destructive_file",
       rf"\b(?:chmod|chown|chgrp)\b{_ARGS}\s(?:-[a-z]*r|--recursive)\b", "recursive chmod/chown"),
    _p("bulk-move", "destructive_file",
       rf"\bmv\b{_ARGS}[*?]|\bxargs\b{_ARGS}\b(?:mv|rm)\b|\bfind\b{_ARGS}(?:-delete\b|-exec\s+(?:rm|mv)\b)",
       "bulk move or delete (globs, xargs, find -delete)"),
    _p("uninstall", "package_removal", r"\buninstall\b", "uninstall packages"),
    _p("prune", "package_removal", r"\bprune\b", "prune packages, images or caches"),
    _p("package-remove", "package_removal",
       r"\b(?:apt|apt-get|aptitude|dnf|yum|apk|brew|yarn|pnpm|poetry|cargo|npm|conda|snap|pacman)"
       r"\s+(?:-\S+\s+)*(?:remove|purge|autoremove|erase|rm|del)\b",
       "remove packages"),
)


def level_of(score: int) -> str:
    for name, floor in LEVELS:
        if score >= floor:
            return name
    return "none"


def command_text(args: dict[str, Any]) -> str:
    """The text of a tool call that patterns are matched against."""
    for key in ("command", "path"):
        value = args.get(key)
        if isinstance(value, list | tuple):
            return " ".join(str(v) for v in value)
        if isinstance(value, str):
            return value
    return json.dumps(args, sort_keys=True, default=str)


@dataclass
class Assessment:
    """How risky one tool call is, and whether an automatic checkpoint is due."""

    tool: str
    command: str
    score: int
    level: str
    matches: list[dict[str, Any]]
    checkpoint: bool

    @property
    def reason(self) -> str:
        cats = ", ".join(sorted({m["category"] for m in self.matches}))
        return f"{self.level} risk ({self.score}/10: {cats})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RiskConfig:
    """The risk settings of one project."""

    patterns: list[Pattern] = field(default_factory=lambda: list(DEFAULT_PATTERNS))
    high_only: bool = False
    threshold: str = "medium"
    path: Path | None = None
    customised: bool = False

    def assess(self, tool: str, command: str) -> Assessment:
        weights: dict[str, int] = {}
        matches = []
        for p in self.patterns:
            if p.matches(tool, command):
                matches.append({"id": p.id, "category": p.category, "weight": p.weight,
                                "pattern": p.pattern, "description": p.description})
                weights[p.category] = max(weights.get(p.category, 0), p.weight)
        score = min(MAX_SCORE, sum(weights.values()))
        level = level_of(score)
        wanted = "high" if self.high_only else self.threshold
        due = level != "none" and THRESHOLDS.index(level) >= THRESHOLDS.index(wanted)
        return Assessment(tool, command, score, level, matches, due)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "customised": self.customised,
                "high_only": self.high_only, "threshold": self.threshold,
                "patterns": [asdict(p) for p in self.patterns]}


def config_path(repo: Path) -> Path:
    return Path(repo) / CONFIG


def _check_pattern(p: Pattern) -> Pattern:
    if not re.fullmatch(r"[a-z_]+|\*", p.tool):
        raise InvalidInput(f"tool {p.tool!r} must be a tool name like exec or * for every tool")
    try:
        re.compile(p.pattern)
    except re.error as exc:
        raise InvalidInput(f"pattern {p.pattern!r} is not a valid regular expression: {exc}") from None
    if not p.pattern:
        raise InvalidInput("pattern must not be empty")
    if not 0 <= p.weight <= MAX_SCORE:
        raise InvalidInput(f"weight {p.weight} must be between 0 and {MAX_SCORE}")
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,39}", p.category):
        raise InvalidInput(f"category {p.category!r} must be lowercase letters, digits, _ and -")
    return p


def load(repo: Path) -> RiskConfig:
    """The risk configuration of the project at ``repo`` (built-in defaults if it has none)."""
    path = config_path(repo)
    return load_project_file(path, _parse) or RiskConfig(path=path)


def _parse(raw: str, path: Path) -> RiskConfig:
    try:
        data = json.loads(raw)
        patterns = [_check_pattern(Pattern(**{k: p[k] for k in Pattern.__dataclass_fields__ if k in p}))
                    for p in data.get("patterns", [])]
        high_only = bool(data.get("high_only", False))
        threshold = data.get("threshold", "medium")
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise InvalidInput(f"{path} is not a valid risk configuration: {exc}") from None
    if threshold not in THRESHOLDS:
        raise InvalidInput(f"{path}: threshold {threshold!r} is not one of {', '.join(THRESHOLDS)}")
    return RiskConfig(patterns, high_only, threshold, path, customised=True)


def save(repo: Path, cfg: RiskConfig) -> Path:
    path = config_path(repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": 1, "high_only": cfg.high_only, "threshold": cfg.threshold,
            "patterns": [asdict(p) for p in cfg.patterns]}
    files.write_durably(path, (json.dumps(body, indent=2) + "\n").encode())
    return path


def parse_tool_pattern(spec: str) -> tuple[str, str]:
    """Split ``TOOL:PATTERN`` (the pattern may itself contain colons)."""
    tool, sep, pattern = spec.partition(":")
    if not sep or not tool or not pattern:
        raise InvalidInput(f"{spec!r} must look like TOOL:PATTERN, e.g. exec:\\bmake clean\\b")
    return tool, pattern


def add_pattern(repo: Path, spec: str, *, category: str = "custom", weight: int | None = None,
                description: str = "") -> Pattern:
    cfg = load(repo)
    tool, pattern = parse_tool_pattern(spec)
    if any(p.tool == tool and p.pattern == pattern for p in cfg.patterns):
        raise InvalidInput(f"pattern {spec!r} is already configured")
    taken = {p.id for p in cfg.patterns}
    n = 1
    while f"custom-{n}" in taken:
        n += 1
    new = _check_pattern(Pattern(f"custom-{n}", tool, pattern, category,
                                 CATEGORY_WEIGHTS.get(category, 4) if weight is None else int(weight),
                                 description))
    cfg.patterns.append(new)
    save(repo, cfg)
    return new


def remove_pattern(repo: Path, key: str) -> Pattern:
    """Remove a pattern given by its id or as ``TOOL:PATTERN``."""
    cfg = load(repo)
    for p in cfg.patterns:
        if key == p.id or key == f"{p.tool}:{p.pattern}":
            cfg.patterns.remove(p)
            save(repo, cfg)
            return p
    raise NotFound(f"no risk pattern {key!r} (see configure-risky-operations --list)", pattern=key)


def set_options(repo: Path, *, high_only: bool | None = None, threshold: str | None = None) -> RiskConfig:
    cfg = load(repo)
    if high_only is not None:
        cfg.high_only = high_only
    if threshold is not None:
        if threshold not in THRESHOLDS:
            raise InvalidInput(f"threshold {threshold!r} is not one of {', '.join(THRESHOLDS)}")
        cfg.threshold = threshold
    save(repo, cfg)
    return load(repo)


def reset(repo: Path) -> RiskConfig:
    """Back to the built-in defaults (the project file is deleted)."""
    config_path(repo).unlink(missing_ok=True)
    return load(repo)
