"""Risk scoring (SPEC §5) and the project risk configuration, through the core and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskbox import InvalidInput, NotFound, risk

from .conftest import run_cli


@pytest.mark.parametrize("command, score, level", [
    ("ls -la", 0, "none"),
    ("echo hi >> log.txt", 0, "none"),
    ("make test 2>&1 | tee out", 0, "none"),
    ("pytest -q > /dev/null", 0, "none"),
    ("git status", 0, "none"),
    ("git push origin main", 3, "low"),
    ("pip uninstall -y requests", 2, "low"),
    ("rm -r build", 2, "low"),
    ("echo data > config.json", 4, "medium"),
    ("truncate -s 0 app.log", 4, "medium"),
    ("rm -rf node_modules", 6, "medium"),
    ("rm -r -f dist", 6, "medium"),
    ("npm publish", 3, "low"),
    ("python manage.py migrate", 3, "low"),
    ("git reset --hard HEAD~3", 7, "medium"),
    ("git commit --amend --no-edit && git push --force", 3, "low"),
    ("rm -rf / && git push -f && npm publish && apt-get remove -y curl", 10, "high"),
    ("git reset --hard && rm -rf build && ./deploy.sh", 10, "high"),
    ("chmod -R 777 . ; mv *.py old/", 2, "low"),
])
def test_default_scores(command: str, score: int, level: str) -> None:
    a = risk.RiskConfig().assess("exec", command)
    assert (a.score, a.level) == (score, level), a.matches


def test_levels_and_checkpoint_decision() -> None:
    assert [risk.level_of(s) for s in (0, 1, 2, 3, 4, 7, 8, 10)] == [
        "none", "none", "low", "low", "medium", "medium", "high", "high"]
    cfg = risk.RiskConfig()
    assert cfg.assess("exec", "rm -rf build").checkpoint  # medium: checkpoint by default
    assert not cfg.assess("exec", "git push").checkpoint  # low
    cfg.high_only = True
    assert not cfg.assess("exec", "rm -rf build").checkpoint
    assert cfg.assess("exec", "git reset --hard && rm -rf build && git push").checkpoint
    # patterns are per tool: a file write never matches an exec pattern
    assert risk.RiskConfig().assess("write_file", "rm -rf /").score == 0


def test_project_config_add_remove_test_reset(repo: Path) -> None:
    assert not risk.config_path(repo).exists()
    new = risk.add_pattern(repo, r"exec:\bmake\s+clean\b", category="data_loss")
    assert new.id == "custom-1" and new.weight == 4
    cfg = risk.load(repo)
    assert cfg.customised and cfg.assess("exec", "make clean").score == 4
    with pytest.raises(InvalidInput, match="already configured"):
        risk.add_pattern(repo, r"exec:\bmake\s+clean\b")
    with pytest.raises(InvalidInput, match="regular expression"):
        risk.add_pattern(repo, "exec:(unclosed")
    with pytest.raises(InvalidInput, match="TOOL:PATTERN"):
        risk.add_pattern(repo, "no-colon")
    risk.remove_pattern(repo, "rm-rf")  # a built-in one, by id
    assert risk.load(repo).assess("exec", "rm -rf x").score == 2  # only "recursive delete" is left
    risk.remove_pattern(repo, r"exec:\bmake\s+clean\b")  # by TOOL:PATTERN
    with pytest.raises(NotFound):
        risk.remove_pattern(repo, "custom-1")
    risk.set_options(repo, high_only=True)
    assert risk.load(repo).high_only
    assert risk.reset(repo).to_dict()["customised"] is False
    assert not risk.config_path(repo).exists()
    assert risk.load(repo).assess("exec", "rm -rf x").score == 6


def test_broken_project_file_is_a_clear_error(repo: Path) -> None:
    risk.config_path(repo).parent.mkdir()
    risk.config_path(repo).write_text("{not json")
    with pytest.raises(InvalidInput, match="not a valid risk configuration"):
        risk.load(repo)


def test_configure_risky_operations_cli(home: Path, repo: Path) -> None:
    r = run_cli("configure-risky-operations", "--repo", str(repo), "--list")
    assert r.returncode == 0 and "rm-rf" in r.stdout and "built-in defaults" in r.stdout
    r = run_cli("configure-risky-operations", "--repo", str(repo), "--test", "exec", "rm -rf build")
    assert r.returncode == 0
    assert "score 6/10, level medium; checkpoint first: yes" in r.stdout and "data_loss" in r.stdout
    r = run_cli("configure-risky-operations", "--repo", str(repo), "--add", r"exec:\bterraform\s+apply\b",
                "--category", "production", "--json")
    assert json.loads(r.stdout)["added"]["weight"] == 3
    saved = json.loads((repo / ".taskbox" / "risk.json").read_text())
    assert any(p["pattern"] == r"\bterraform\s+apply\b" for p in saved["patterns"])
    r = run_cli("configure-risky-operations", "--repo", str(repo), "--high-only", "--test", "exec", "rm -rf build",
                "--json")
    assert json.loads(r.stdout)["test"]["checkpoint"] is False
    r = run_cli("configure-risky-operations", "--repo", str(repo), "--remove", "nope")
    assert r.returncode == 3 and "no risk pattern" in r.stderr
    r = run_cli("configure-risky-operations", "--repo", str(repo), "--add", "exec:([")
    assert r.returncode == 2 and r.stderr.startswith("error:")
    assert run_cli("configure-risky-operations", "--repo", str(repo), "--reset").returncode == 0
    assert not (repo / ".taskbox" / "risk.json").exists()


def test_unreadable_risk_config_is_a_clear_error_and_never_breaks_commands(svc, repo) -> None:
    (repo / ".taskbox").mkdir()
    (repo / ".taskbox" / "risk.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(InvalidInput, match="cannot read"):
        risk.load(repo)
    task = svc.create_task(repo, "risky config")
    assert svc.exec(task.id, "rm -rf build").exit_code == 0  # the command still runs
    assert "risk.config_invalid" in [e["type"] for e in svc.registry.events(task.id)]


def test_risk_config_is_parsed_once_until_it_changes(tmp_path) -> None:
    first = risk.load(tmp_path)
    risk.add_pattern(tmp_path, "exec:\\bdeploy\\b", category="custom", weight=5)
    loaded = risk.load(tmp_path)
    assert loaded is risk.load(tmp_path)  # cached: the same object until the file changes
    assert loaded is not first and any(p.pattern == "\\bdeploy\\b" for p in loaded.patterns)
