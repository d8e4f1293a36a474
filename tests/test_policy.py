"""The project policy: parsed and validated, evaluated before every command and file
operation through the hook system, enforced, and audited with the rule that decided."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskbox import InvalidInput, PolicyDenied, TaskService, policy

from .conftest import run_cli

POLICY = r'''
default = "allow"

[network]
allow = ["pypi.org", "*.pythonhosted.org"]
deny = ["evil.pythonhosted.org"]

[limits]
memory = "256m"
pids = 128
max_memory = "512m"
max_pids = 256

[mounts]
allow = ["/srv/datasets"]

[[rules]]
id = "no-push"
action = "deny"
pattern = '\bgit\s+push\b'
reason = "pushing is the user's job"

[[rules]]
id = "snapshot-before-migrate"
action = "checkpoint"
pattern = '\bmigrate\b'

[[rules]]
id = "allow-migrate"
action = "allow"
pattern = '\bmigrate\b'

[[rules]]
id = "no-env-files"
action = "deny"
tools = ["write_file", "edit_file", "delete_file"]
glob = ".env*"

[[rules]]
id = "risky"
action = "checkpoint"
risk = "high"
'''


def write_policy(repo: Path, text: str = POLICY) -> Path:
    path = repo / ".taskbox" / "policy.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


# --- evaluation (no Docker) ----------------------------------------------------------------------


def test_strictest_matching_rule_wins_whatever_the_order(repo: Path) -> None:
    write_policy(repo)
    pol = policy.load(repo)
    d = pol.evaluate("exec", {"command": "git push origin main"}, repo)
    assert (d.action, d.rule) == ("deny", "no-push")
    d = pol.evaluate("exec", {"command": "./manage.py migrate"}, repo)
    assert (d.action, d.rule) == ("checkpoint", "snapshot-before-migrate")  # beats the allow rule after it
    d = pol.evaluate("exec", {"command": "ls"}, repo)
    assert (d.action, d.rule) == ("allow", "default")
    d = pol.evaluate("exec", {"command": "rm -rf / && git reset --hard && npm publish"}, repo)
    assert (d.action, d.rule, d.risk) == ("checkpoint", "risky", "high")
    assert pol.evaluate("write_file", {"path": ".env.local"}, repo).action == "deny"
    assert pol.evaluate("write_file", {"path": "src/app.py"}, repo).action == "allow"
    assert pol.evaluate("exec", {"command": "cat .env"}, repo).action == "allow"  # file rule: file tools only
    assert pol.mount_allowed("/srv/datasets/x") and not pol.mount_allowed("/srv")


def test_default_deny_makes_allow_rules_an_allowlist(repo: Path) -> None:
    write_policy(repo, 'default = "deny"\n[[rules]]\nid = "tests"\naction = "allow"\npattern = "^pytest"\n')
    pol = policy.load(repo)
    assert pol.evaluate("exec", {"command": "pytest -q"}, repo).action == "allow"
    assert pol.evaluate("exec", {"command": "curl x"}, repo).rule == "default"


@pytest.mark.parametrize("text, match", [
    ("[[rules]]\naction = 'maybe'\npattern = 'x'\n", "action"),
    ("[[rules]]\naction = 'deny'\n", "a pattern, a glob, a risk level or the tools"),
    ("[[rules]]\naction = 'deny'\npattern = '('\n", "bad pattern"),
    ("[[rules]]\naction = 'deny'\nrisk = 'extreme'\n", "risk"),
    ("[network]\nallow = ['*.10.0.0.1']\n", "wildcard"),
    ("[network]\nmode = 'host'\n", "network.mode"),
    ("[limits]\nmemory = '1k'\n", "minimum"),
    ("[surprise]\n", "unknown"),
    ("not toml [", "invalid TOML"),
])
def test_invalid_policies_are_refused_with_the_reason(repo: Path, text: str, match: str) -> None:
    write_policy(repo, text)
    with pytest.raises(InvalidInput, match=match):
        policy.load(repo)


# --- enforcement through the hooks ---------------------------------------------------------------


@pytest.fixture
def task(svc: TaskService, repo: Path):
    write_policy(repo)
    return svc.create_task(repo, "governed")


def test_project_limits_are_defaults_and_ceilings(svc: TaskService, repo: Path, task) -> None:
    assert (task.memory_limit, task.pids_limit) == ("256m", 128)
    with pytest.raises(PolicyDenied, match="max_memory|maximum"):
        svc.create_task(repo, "too big", memory="1g")
    with pytest.raises(PolicyDenied):
        svc.create_task(repo, "too many", pids_limit=1000)
    assert [t.id for t in svc.list_tasks()] == [task.id]


def test_denied_command_never_runs_and_is_audited(svc: TaskService, task) -> None:
    with pytest.raises(PolicyDenied, match="no-push") as info:
        svc.exec(task.id, "touch ran && git push origin main")
    assert info.value.exit_code == 9 and info.value.details["rule"] == "no-push"
    assert not (Path(task.workspace_path) / "ran").exists()
    assert svc.exec(task.id, "echo fine").stdout.strip() == "fine"
    log = svc.audit.read(task.id)
    tools = [e for e in log if e["kind"] == "tool"]
    assert tools[-2]["decision"] == "deny" and tools[-2]["rule"] == "no-push"
    assert tools[-1]["decision"] == "allow" and tools[-1]["rule"] == "default"
    events = [e for e in svc.registry.events(task.id) if e["type"] == "policy.denied"]
    assert events and events[-1]["payload"]["rule"] == "no-push"
    # the audit log is outside the workspace: the agent cannot rewrite it
    assert not str(svc.paths.home / "audit").startswith(task.workspace_path)
    assert "audit" not in svc.exec(task.id, "ls -a /workspace").stdout


def test_checkpoint_rule_snapshots_before_the_command(svc: TaskService, task) -> None:
    before = len(svc.list_checkpoints(task.id))
    svc.exec(task.id, "touch migrated.txt && echo migrate")
    cps = svc.list_checkpoints(task.id)
    assert len(cps) == before + 1
    assert (Path(task.workspace_path) / "migrated.txt").exists()
    # the checkpoint was taken first: restoring it removes what the command made
    svc.restore_checkpoint(task.id, cps[-1]["checkpoint_id"])
    assert not (Path(task.workspace_path) / "migrated.txt").exists()
    entry = [e for e in svc.audit.read(task.id) if e["kind"] == "tool" and e["tool"] == "exec"][-1]
    assert (entry["decision"], entry["rule"]) == ("checkpoint", "snapshot-before-migrate")


def test_file_rules_guard_file_tools(svc: TaskService, task) -> None:
    with pytest.raises(PolicyDenied, match="no-env-files"):
        svc.write_file(task.id, ".env", b"SECRET=1\n")
    assert not (Path(task.workspace_path) / ".env").exists()
    svc.write_file(task.id, "notes.txt", b"ok\n")
    assert (Path(task.workspace_path) / "notes.txt").read_text() == "ok\n"


def test_agent_cannot_loosen_its_own_policy(svc: TaskService, task) -> None:
    svc.exec(task.id, "mkdir -p .taskbox && printf 'default = \"allow\"\\n' > .taskbox/policy.toml")
    with pytest.raises(PolicyDenied):
        svc.exec(task.id, "git push")


def test_broken_policy_fails_closed(svc: TaskService, repo: Path, task) -> None:
    write_policy(repo, "[[rules]]\naction = 'deny'\npattern = '('\n")
    with pytest.raises(PolicyDenied, match="invalid"):
        svc.exec(task.id, "echo hi")
    assert any(e["type"] == "policy.invalid" for e in svc.registry.events(task.id))
    write_policy(repo)
    assert svc.exec(task.id, "echo hi").stdout.strip() == "hi"


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_policy_show_and_check(repo: Path, home: Path) -> None:
    write_policy(repo)
    env = {"TASKBOX_HOME": str(home)}
    res = run_cli("policy", "show", "--repo", str(repo), "--json", env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["exists"] and data["network"]["allow"] == ["pypi.org", "*.pythonhosted.org"]
    assert [r["id"] for r in data["rules"]][:2] == ["no-push", "snapshot-before-migrate"]
    res = run_cli("policy", "check", "--repo", str(repo), "git", "push", env=env)
    assert res.returncode == 9 and "no-push" in res.stdout
    res = run_cli("policy", "check", "--repo", str(repo), "ls", "-la", env=env)
    assert res.returncode == 0 and "allow" in res.stdout
    res = run_cli("policy", "check", "--repo", str(repo), "--tool", "write_file", ".env", env=env)
    assert res.returncode == 9
    res = run_cli("policy", "check", "--repo", str(repo), "--url", "https://files.pythonhosted.org/x", env=env)
    assert res.returncode == 0 and "allow" in res.stdout
    res = run_cli("policy", "check", "--repo", str(repo), "--url", "https://evil.pythonhosted.org/", env=env)
    assert res.returncode == 9 and "deny:evil.pythonhosted.org" in res.stdout
    res = run_cli("policy", "check", "--repo", str(repo), "--url", "http://169.254.169.254/", env=env)
    assert res.returncode == 9 and "ip-literal" in res.stdout


def test_read_and_list_rules_hold_for_agent_tools(svc, repo: Path) -> None:
    """File rules for read_file / list_files hold whichever adapter calls the service."""
    write_policy(repo, '[[rules]]\nid = "no-secrets"\naction = "deny"\ntools = ["read_file", "list_files"]\n'
                       'glob = ".env*"\n')
    task = svc.create_task(repo, "secret reader", lazy=True)
    (Path(task.workspace_path) / ".env").write_text("TOKEN=s3cret\n")
    with pytest.raises(PolicyDenied, match="no-secrets"):
        svc.read_text(task.id, ".env")
    with pytest.raises(PolicyDenied, match="no-secrets"):
        svc.list_files(task.id, ".env.d")
    assert svc.read_text(task.id, "README.md")["content"] == "# demo\n"
