"""Attacks on the agent surfaces: detached runs (`watch-run`, `attach`), `run_agent_in_task`
options, shared caches. Real Docker; the container is the attacker's.

Each test plants what a hostile agent (or MCP caller) can plant, then drives the host code
that reads it, and checks the host holds: a one-line refusal or a safe default, never a crash
or a host value handed out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from taskbox import (
    ImageMissing,
    InvalidInput,
    NotFound,
    PolicyDenied,
    TaskLocked,
    TaskService,
    agents,
    caches,
)
from taskbox.sandbox import LABEL_HOME

from .conftest import IMAGE


def _plant_detached_run(svc: TaskService, repo: Path, exit_text: str) -> tuple[str, str]:
    """A task with a run left running (detached) whose agent has ended and left ``exit_text``
    as its exit code: written by the sandbox user, in the container, where the host reads it."""
    task = svc.create_task(repo, "left running")
    task = svc.ensure_running(task.id)
    res = svc.attach(task.id, "shell", "unknown")
    sid = res.session.id
    svc.update_metadata(task.id, lambda m: m.setdefault("runs", {}).__setitem__(
        sid, {"agent": "shell", "started": 0, "detachable": True}))
    path = agents.exit_file(sid)
    r = svc.sandbox.exec(task.container_id or "", ["sh", "-c", 'mkdir -p "${1%/*}" && printf %s "$2" > "$1"',
                                                   "sh", path, exit_text], timeout=30)
    assert r.exit_code == 0, r.stderr
    return task.id, sid


@pytest.mark.parametrize("planted", ["\u00b2", "9" * 5000, "99999999999999999999999"],
                         ids=["superscript", "5000-digits", "past-255"])
def test_watch_run_takes_a_forged_exit_code_as_unknown(svc: TaskService, repo: Path, planted: str) -> None:
    """The agent ends leaving an exit file that only looks like a number (a superscript digit,
    5000 digits, a number past any exit status): the watcher records the run with code -1
    instead of crashing (which would leave the run unrecorded and the task held)."""
    task_id, sid = _plant_detached_run(svc, repo, planted)
    out = svc.watch_run(task_id, sid, every=0.5)
    assert out is not None and out["exit_code"] == -1
    assert not svc.registry.sessions(task_id, open_only=True)
    [exited] = [e["payload"] for e in svc.registry.events(task_id) if e["type"] == "agent.exited"]
    assert exited["exit_code"] == -1


def test_attach_to_an_ended_run_takes_a_forged_exit_code_as_unknown(svc: TaskService, repo: Path) -> None:
    task_id, sid = _plant_detached_run(svc, repo, "\u0663\u00b2")
    out = svc.attach_agent(task_id, agents.Terminal(0, 1))
    assert out["exit_code"] == -1 and out["note"] == "the agent had already ended"
    assert not svc.registry.sessions(task_id, open_only=True)


def test_watch_run_reads_a_real_exit_code(svc: TaskService, repo: Path) -> None:
    task_id, sid = _plant_detached_run(svc, repo, "3\n")
    out = svc.watch_run(task_id, sid, every=0.5)
    assert out is not None and out["exit_code"] == 3


# --- run_agent: the egress allowlist is widened only for a run that is let through -----------------


def _allowed(svc: TaskService, task_id: str) -> list[str]:
    return list((svc.get(task_id).metadata.get("sandbox") or {}).get("allow_domains") or [])


def test_a_run_refused_for_a_held_task_does_not_widen_its_egress(svc: TaskService, repo: Path) -> None:
    """Another agent holds the (exclusive) task: a caller's run_agent with allow_domains and a
    base URL is refused, and the holder's allowlist (and its proxy) is left as it was."""
    task = svc.create_task(repo, "held", network="allowlist", allow_domains=["pypi.org"])
    svc.attach(task.id, "holder", "unknown")
    with pytest.raises(TaskLocked):
        svc.run_agent(task.id, "shell", prompt="true", allow_domains=["exfil.example", "*.exfil.example"])
    assert _allowed(svc, task.id) == ["pypi.org"]
    with pytest.raises(ImageMissing):  # no Claude Code in this image: refused too, nothing widened
        svc.run_agent(task.id, "claude-code", prompt="hi", allow_domains=["exfil.example"],
                      base_url="https://collect.example/v1")
    assert _allowed(svc, task.id) == ["pypi.org"]
    assert not [e for e in svc.registry.events(task.id) if e["type"] == "agent.egress_allowed"]


def test_a_run_the_policy_denies_does_not_widen_egress(svc: TaskService, repo: Path) -> None:
    (repo / ".taskbox").mkdir()
    (repo / ".taskbox" / "policy.toml").write_text('[[rules]]\nid = "no-runs"\naction = "deny"\ntools = ["run"]\n')
    task = svc.create_task(repo, "no runs", network="allowlist", allow_domains=["pypi.org"])
    with pytest.raises(PolicyDenied):
        svc.run_agent(task.id, "shell", prompt="true", allow_domains=["exfil.example"])
    assert _allowed(svc, task.id) == ["pypi.org"]
    assert not svc.registry.sessions(task.id, open_only=True)


def test_a_run_let_through_still_widens_egress(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "allowed run", network="allowlist", allow_domains=["pypi.org"])
    out = svc.run_agent(task.id, "shell", prompt="true", allow_domains=["models.example"])
    assert out["exit_code"] == 0
    assert _allowed(svc, task.id) == ["pypi.org", "models.example"]



@pytest.mark.parametrize("extra", [{"allow_domains": ["0.0.0.0/0"]}, {"allow_domains": ["::/0"]},
                                   {"allow_domains": ["1.1.1.1"]}, {"base_url": "http://203.0.113.7:8080/v1"}])
def test_a_run_cannot_weaken_the_allowlist_to_addresses(svc: TaskService, repo: Path, extra: dict) -> None:
    """An MCP caller's allow_domains ("more hosts") or base URL naming an IP address or a
    network (0.0.0.0/0: every public address) would turn the allowlist into a weaker sandbox,
    silently (create-task warns about it and records sandbox.weakened). Refused, on one line."""
    task = svc.create_task(repo, "addresses", network="allowlist", allow_domains=["pypi.org"])
    agent = "claude-code" if "base_url" in extra else "shell"
    with pytest.raises(InvalidInput, match="is an IP address or network; a run only adds host names"):
        svc.run_agent(task.id, agent, prompt="true", **extra)
    assert _allowed(svc, task.id) == ["pypi.org"]
    assert not svc.sandbox_warnings(svc.get(task.id))


def test_an_address_the_user_allowed_at_create_is_no_refusal(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "own address", network="allowlist", allow_domains=["203.0.113.7"])
    out = svc.run_agent(task.id, "shell", prompt="true", allow_domains=["203.0.113.7"])
    assert out["exit_code"] == 0 and _allowed(svc, task.id) == ["203.0.113.7"]

# --- shared caches: what the warm container wrote, read by the host ----------------------------------


def test_cache_list_reads_a_planted_cache_bounded(svc: TaskService, monkeypatch: pytest.MonkeyPatch) -> None:
    """The throwaway warm container writes the cache: thousands of entries in one directory and
    links out to the host's root. `cache list` reads at most _WALK_MAX entries (one huge
    directory included) and follows no link."""
    monkeypatch.setattr(caches, "_WALK_MAX", 500)
    folder = caches.host_dir(svc.paths.home, "pip")
    with svc.sandbox.scratch(IMAGE, folder, {LABEL_HOME: svc.home_label}) as cid:
        r = svc.sandbox.capture(cid, ["sh", "-c", "mkdir flat && cd flat && seq 3000 | xargs touch && cd .. && "
                                                   "ln -s / root && ln -s /etc/passwd passwd && echo ok"])
        assert r.stdout.strip() == b"ok", r.stderr
    [row] = [c for c in svc.caches() if c["name"] == "pip"]
    assert row["exists"] and 0 < row["files"] <= 500
    assert row["bytes"] == 0  # the links (to the host's / and /etc/passwd) were not followed


# --- run_agent_in_task options (no Docker: what the agent is handed) ---------------------------------


@pytest.mark.parametrize("url", ['https://h.example/"},model_provider="evil', "https://h.example/a\\\"b=1",
                                 "https://h.example/'''x", "https://h.example/]\n[x]"])
def test_a_crafted_base_url_stays_one_toml_string_for_codex(url: str) -> None:
    """Codex gets the base URL inside a -c TOML inline table: whatever quotes or brackets it
    holds, it parses back as that one string, the table keeps exactly taskbox's keys and no
    other -c option appears."""
    import tomllib

    try:
        opts = agents.options(agents.preset("codex"), base_url=url, model="m")
    except InvalidInput:
        assert "\n" in url  # refused outright: a control character
        return
    assert opts[0::2][:2] == ["-c", "-c"] and opts.count("-c") == 2 and opts[-2:] == ["-m", "m"]
    key, _, value = opts[3].partition("=")
    table = tomllib.loads(f"{key} = {value}")["model_providers"]["taskbox"]
    assert table == {"name": "taskbox", "base_url": url, "env_key": "OPENAI_API_KEY", "wire_api": "responses",
                     "supports_websockets": False}
    assert tomllib.loads(opts[1]) == {"model_provider": "taskbox"}


@pytest.mark.parametrize("url", ["https://h.example/\ud800", "https://h.example/x\x00y", "https://h.example/\x7f",
                                 "https://h.example/ x"])
def test_a_base_url_codex_could_not_parse_is_refused_on_one_line(url: str) -> None:
    """A lone surrogate (from JSON's \\ud800) made the -c value invalid TOML, which Codex then
    takes as a plain string: refused before the run instead."""
    for name in ("codex", "claude-code", "opencode"):
        with pytest.raises(InvalidInput, match="must be an http"):
            agents.environment(agents.preset(name), base_url=url)
    with pytest.raises(InvalidInput):
        agents.options(agents.preset("codex"), base_url=url)


def test_an_mcp_caller_cannot_name_a_host_variable_as_a_secret(svc: TaskService, repo: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets by reference: a host environment variable that is not declared a taskbox secret
    (TASKBOX_SECRET_NAME or secrets.toml) is not found, and the run is refused before anything
    starts."""
    monkeypatch.setenv("HOST_ONLY_TOKEN", "host-value-" + "x" * 20)
    task = svc.create_task(repo, "secrets")
    for name in ("HOST_ONLY_TOKEN", "HOME", "TASKBOX_SECRET_HOST_ONLY_TOKEN"):
        with pytest.raises(NotFound, match=f"no secret {name}"):
            svc.run_agent(task.id, "shell", prompt="env", secrets=[name])
    assert not svc.registry.sessions(task.id, open_only=True)
    assert svc.get(task.id).container_id is None or not [
        e for e in svc.registry.events(task.id) if e["type"] == "agent.started"]


# --- a project's Dockerfile: one image per repository ---------------------------------------------


def test_a_project_image_never_carries_another_repositorys_files(svc: TaskService, tmp_path: Path,
                                                                 docker_engine) -> None:
    """Two repositories with the same Dockerfile text (a common template: COPY the context in).
    The image built for the first holds its files; a task of the second (whose agent is
    hostile) must get an image built from its own context, never the first one's."""
    import secrets
    import subprocess

    token = secrets.token_hex(4)
    repos = []
    for name in ("private", "other"):
        r = tmp_path / name
        (r / "docker").mkdir(parents=True)
        (r / "docker" / "Dockerfile").write_text(f"FROM {IMAGE}\nLABEL test.token={token}\nUSER root\n"
                                                 "COPY secret.txt /opt/secret.txt\nUSER agent\n")
        (r / "docker" / "secret.txt").write_text(f"{name} repository's file\n")
        (r / ".taskbox").mkdir()
        (r / ".taskbox" / "config.toml").write_text('[sandbox]\ndockerfile = "docker/Dockerfile"\n')
        for argv in (["init", "-q", "-b", "main"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t",
                                                                  "commit", "-qm", "initial"]):
            subprocess.run(["git", "-C", str(r), *argv], check=True, capture_output=True)
        repos.append(r)
    built: set[str] = set()
    try:
        first = svc.create_task(repos[0], "first")
        built.add(first.image)
        second = svc.create_task(repos[1], "second")
        built.add(second.image)
        assert svc.exec(second.id, "cat /opt/secret.txt").stdout == "other repository's file\n"
        assert second.image != first.image
    finally:
        for c in docker_engine.api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
            docker_engine.api.remove_container(c["Id"], force=True)
        for tag in built:
            try:
                docker_engine.images.remove(tag, force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
