"""Project setup (.taskbox/config.toml, devcontainer.json) and templates, with real Docker and git."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from taskbox import ImageMissing, InvalidInput, NotFound, SandboxError, TaskService, projects
from taskbox.hookspecs import hookimpl
from taskbox.sandbox import LABEL_HOME

from .conftest import git, run_cli


def _project(repo: Path, text: str) -> None:
    (repo / ".taskbox").mkdir(exist_ok=True)
    (repo / ".taskbox" / "config.toml").write_text(text)
    (repo / ".gitignore").write_text(".env\nlocal/\n")
    git(repo, "add", ".gitignore", ".taskbox")
    git(repo, "commit", "-qm", "project setup")


def test_env_copied_and_setup_run_once(svc: TaskService, repo: Path) -> None:
    (repo / ".env").write_text("API_URL=http://localhost\n")
    (repo / "local").mkdir()
    (repo / "local" / "conf.toml").write_text("x = 1\n")
    _project(repo, '[setup]\ncopy = [".env", "local"]\n'
                   'commands = ["echo setup-ran >> setup.log", "cat .env > seen-env.txt"]\n'
                   '[agent]\ndefault = "shell"\n')
    task = svc.create_task(repo, "ready to work")
    ws = Path(task.workspace_path)
    assert (ws / ".env").read_text() == "API_URL=http://localhost\n"
    assert (ws / "local" / "conf.toml").read_text() == "x = 1\n"
    assert (ws / "setup.log").read_text() == "setup-ran\n"  # once
    assert (ws / "seen-env.txt").read_text() == "API_URL=http://localhost\n"  # the sandbox sees it
    assert task.status.value == "active"
    events = [e for e in svc.registry.events(task.id) if e["type"].startswith("setup.")]
    assert [e["type"] for e in events] == ["setup.copied", "setup.command", "setup.command"]
    svc.attach(task.id, "me")
    svc.detach(task.id)
    assert (ws / "setup.log").read_text() == "setup-ran\n"  # not again on resume
    out = svc.run_agent(task.id, prompt="echo default-agent")  # [agent] default
    assert out["agent"] == "shell"
    # .env is ignored: it never reaches the user's branch
    assert ".env" not in git(repo, "ls-tree", "-r", "--name-only", task.branch).split()


def test_failing_and_hanging_setup_fail_the_task_with_the_log(svc: TaskService, repo: Path) -> None:
    _project(repo, '[setup]\ncommands = ["echo installing; echo broken >&2; exit 4"]\n')
    r = run_cli("create-task", "broken setup", "--repo", str(repo), "--id", "broken")
    assert r.returncode == 6 and r.stderr.strip().splitlines()[-1] == (
        "error: task broken failed: setup command 1 `echo installing; echo broken >&2; exit 4` exited with code 4; "
        "its output is in `taskbox task-executions broken`")
    task = svc.get("broken")
    assert task.status.value == "failed"
    log = svc.executions(task.id)[-1]
    assert log["stdout"] == "installing\n" and log["stderr"] == "broken\n" and log["exit_code"] == 4
    _project(repo, '[setup]\ncommands = ["sleep 30"]\ntimeout = 1\n')
    with pytest.raises(SandboxError, match="setup command 1 `sleep 30` command timed out after 1s"):
        svc.create_task(repo, "hanging setup", task_id="hangs")
    assert svc.get("hangs").status.value == "failed"


def test_bad_setup_is_refused_before_anything(svc: TaskService, repo: Path) -> None:
    _project(repo, '[setup]\ncopy = [".env"]\n')  # .env does not exist
    with pytest.raises(InvalidInput, match=r"setup.copy: \.env does not exist"):
        svc.create_task(repo, "missing file")
    _project(repo, '[setup]\ncopy = ["../outside"]\n')
    with pytest.raises(InvalidInput, match="must be a path inside the repository"):
        svc.create_task(repo, "outside")
    (repo / "link").symlink_to("/etc/passwd")
    _project(repo, '[setup]\ncopy = ["link"]\n')
    with pytest.raises(InvalidInput, match="symbolic link"):
        svc.create_task(repo, "link")
    outside = repo.parent / "outside"
    outside.mkdir()
    (outside / "secret.toml").write_text("not yours\n")
    (repo / "conf").symlink_to(outside)  # a folder on the way that leads out of the repository
    _project(repo, '[setup]\ncopy = ["conf/secret.toml"]\n')
    with pytest.raises(InvalidInput, match="conf/secret.toml leads out of the repository through a symbolic link"):
        svc.create_task(repo, "through a linked folder")
    (repo / "local").mkdir()
    (repo / "local" / "ok.txt").write_text("ok\n")
    (repo / "local" / "out").symlink_to(outside)  # links inside a copied folder are skipped
    (repo / "local" / "pw").symlink_to("/etc/passwd")
    assert [c[0] for c in projects.read_copies(repo, ["local"])] == ["local/ok.txt"]
    _project(repo, '[setup]\nbogus = 1\n')
    with pytest.raises(InvalidInput, match=r"unknown keys in \[setup\]: bogus"):
        svc.create_task(repo, "bogus")
    assert svc.list_tasks() == []


def test_devcontainer_and_templates(svc: TaskService, repo: Path, home: Path) -> None:
    (repo / ".devcontainer").mkdir()
    (repo / ".devcontainer" / "devcontainer.json").write_text(  # JSONC: comments and trailing commas
        '// made by an editor\n{\n  "name": "py // dev", /* the image */ "image": "taskbox-sandbox:latest",\n'
        '  "postCreateCommand": "echo from-devcontainer > dc.txt", // once\n  "features": {},\n}\n')
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "devcontainer")
    task = svc.create_task(repo, "devcontainer")
    assert (Path(task.workspace_path) / "dc.txt").read_text() == "from-devcontainer\n"
    # save the project's setup as a template, then apply it to another repository
    r = run_cli("template", "save", "py", "--repo", str(repo))
    assert r.returncode == 0, r.stderr
    assert "py" in run_cli("template", "list").stdout
    shown = json.loads(run_cli("template", "show", "py", "--json").stdout)
    assert shown["commands"] == ["echo from-devcontainer > dc.txt"]
    other = repo.parent / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    (other / "a.txt").write_text("a\n")
    git(other, "add", ".")
    git(other, "commit", "-qm", "a")
    t2 = svc.create_task(other, "from template", template="py")
    assert t2.template == "py" and (Path(t2.workspace_path) / "dc.txt").exists()
    with pytest.raises(NotFound, match="no template 'nope' \\(templates: py\\)"):
        svc.create_task(other, "no such template", template="nope")
    (other / ".devcontainer.json").write_text('{"image": "example.invalid/not-here:1"}')
    with pytest.raises(ImageMissing, match=r"run `docker pull example.invalid/not-here:1`"):
        svc.create_task(other, "missing image")


def test_lazy_task_runs_setup_once_when_its_sandbox_first_starts(svc: TaskService, repo: Path) -> None:
    (repo / ".env").write_text("K=v\n")
    _project(repo, '[setup]\ncopy = [".env"]\ncommands = ["echo ran >> setup.log"]\n')
    task = svc.create_task(repo, "lazy with setup", lazy=True)
    ws = Path(task.workspace_path)
    assert task.status.value == "pending" and (ws / ".env").read_text() == "K=v\n"
    assert not (ws / "setup.log").exists()  # no sandbox yet: nothing ran
    # the project file changing afterwards does not change what this task runs
    _project(repo, '[setup]\ncommands = ["echo changed >> setup.log"]\n')
    svc.attach(task.id, "me")  # first use starts the sandbox: the setup runs there, once
    assert (ws / "setup.log").read_text() == "ran\n"
    assert svc.get(task.id).status.value == "active" and "setup_pending" not in svc.get(task.id).metadata
    svc.detach(task.id)
    svc.exec(task.id, "true")
    assert (ws / "setup.log").read_text() == "ran\n"
    assert [e["payload"]["exit_code"] for e in svc.registry.events(task.id) if e["type"] == "setup.command"] == [0]


def test_lazy_task_whose_setup_fails_is_failed_with_the_log(svc: TaskService, repo: Path) -> None:
    _project(repo, '[setup]\ncommands = ["echo half; exit 3"]\n')
    task = svc.create_task(repo, "lazy broken", task_id="lazy-broken", lazy=True)
    with pytest.raises(SandboxError, match="setup command 1 `echo half; exit 3` exited with code 3"):
        svc.exec(task.id, "echo hi")
    failed = svc.get(task.id)
    assert failed.status.value == "failed" and "setup_pending" not in failed.metadata
    assert svc.executions(task.id)[-1]["stdout"] == "half\n"
    r = run_cli("create-task", "lazy cli", "--repo", str(repo), "--id", "lazy-cli", "--lazy")
    assert r.returncode == 0, r.stderr
    r = run_cli("resume-task", "lazy-cli")
    assert r.returncode == 6 and "setup command 1 `echo half; exit 3` exited with code 3" in r.stderr
    assert svc.get("lazy-cli").status.value == "failed"


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (one module printing a marker), built without any tool."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "MARK = 'from-the-shared-cache'\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()}"
                     f",{len(t.encode())}\n" for p, t in files.items()) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, t in {**files, f"{dist}/RECORD": record}.items():
            z.writestr(p, t)
    return path


def test_pip_cache_is_mounted_read_only_and_used_offline(svc: TaskService, repo: Path, home: Path,
                                                         docker_engine) -> None:
    _project(repo, '[sandbox]\ncaches = ["pip"]\n')
    task = svc.create_task(repo, "cached installs")  # network none: no index to reach
    shared = home / "caches" / "pip"
    assert shared.is_dir()  # made by taskbox when a task first names it
    _wheel(shared, "tbcachedemo", "1.0")  # what `taskbox cache warm` leaves there
    before = sorted(p.name for p in shared.iterdir())
    mounts = docker_engine.api.inspect_container(task.container_id)["Mounts"]
    cache_mount = next(m for m in mounts if m["Destination"] == "/opt/taskbox/caches/pip")
    assert cache_mount["RW"] is False and Path(cache_mount["Source"]) == shared
    r = svc.exec(task.id, "python3 -m venv /tmp/v && /tmp/v/bin/pip install tbcachedemo && "
                          "/tmp/v/bin/python -c 'import tbcachedemo; print(tbcachedemo.MARK)'", timeout=300)
    assert r.exit_code == 0, r.stderr
    assert "from-the-shared-cache" in r.stdout and "Successfully installed tbcachedemo-1.0" in r.stdout
    # the sandbox cannot write to it, not even where it owns the files
    for attempt in ("touch /opt/taskbox/caches/pip/evil.whl", "rm /opt/taskbox/caches/pip/tbcachedemo-1.0-py3-none-any.whl",
                    "echo x > /opt/taskbox/caches/pip/tbcachedemo-1.0-py3-none-any.whl"):
        bad = svc.exec(task.id, attempt)
        assert bad.exit_code != 0 and "Read-only file system" in bad.stderr, attempt
    assert sorted(p.name for p in shared.iterdir()) == before
    with pytest.raises(InvalidInput, match="requirements file /dev/null is not a regular file"):
        svc.warm_cache("pip", [], requirements="/dev/null")
    with pytest.raises(InvalidInput, match=r"name packages \(or a requirements file\)"):
        svc.warm_cache("pip", [])
    with pytest.raises(InvalidInput, match="'--index-url=http://evil' is not a package name"):
        svc.warm_cache("pip", ["--index-url=http://evil"])
    # a project naming an unknown cache is refused before anything
    _project(repo, '[sandbox]\ncaches = ["maven"]\n')
    with pytest.raises(InvalidInput, match="unknown cache 'maven' in sandbox.caches; known: npm, pip, uv"):
        svc.create_task(repo, "unknown cache")


def test_cache_warm_fills_pip_and_npm_caches_that_offline_tasks_install_from(svc: TaskService, repo: Path,
                                                                              home: Path) -> None:
    (repo / "requirements.txt").write_text("six==1.17.0\n")
    r = run_cli("cache", "warm", "pip", "-r", str(repo / "requirements.txt"), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] >= 1 and (home / "caches" / "pip" / "six-1.17.0-py2.py3-none-any.whl").is_file()
    r = run_cli("cache", "warm", "npm", "is-odd@3.0.1", timeout=600)
    assert r.returncode == 0, r.stderr
    listed = {row["name"]: row for row in json.loads(run_cli("cache", "list", "--json").stdout)}
    assert listed["npm"]["files"] > 0 and listed["pip"]["files"] >= 1 and not listed["uv"]["exists"]
    r = run_cli("cache", "warm", "uv", "uv", "idna", timeout=600)  # uv itself too: the image has none
    assert r.returncode == 0, r.stderr
    _project(repo, '[sandbox]\ncaches = ["pip", "npm", "uv"]\n')
    task = svc.create_task(repo, "offline installs")
    r = svc.exec(task.id, "python3 -m venv /tmp/v && /tmp/v/bin/pip install six && "
                          "mkdir -p /tmp/n && cd /tmp/n && npm install --no-audit --no-fund is-odd@3.0.1 && "
                          "node -e 'console.log(require(\"is-odd\")(3))'", timeout=300)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "Successfully installed six-1.17.0" in r.stdout and r.stdout.strip().endswith("true")
    r = svc.exec(task.id, "/tmp/v/bin/pip install --find-links /opt/taskbox/caches/uv uv && "
                          "/tmp/v/bin/uv pip install --python /tmp/v/bin/python idna && /tmp/v/bin/python -c 'import idna'",
                 timeout=300)
    assert r.exit_code == 0 and "+ idna==" in r.stdout + r.stderr, r.stdout + r.stderr
    bad = run_cli("cache", "warm", "cargo", "serde")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown cache 'cargo'; known: npm, pip, uv"


def test_project_dockerfile_and_devcontainer_build(svc: TaskService, repo: Path, docker_engine) -> None:
    import secrets

    token = secrets.token_hex(4)  # a Dockerfile of its own: built by this test, never found from an earlier run
    (repo / "docker").mkdir()
    (repo / "docker" / "hello.txt").write_text("from the context\n")
    (repo / "docker" / "Dockerfile").write_text(
        f"FROM taskbox-sandbox:latest\nLABEL test.token={token}\nUSER root\nCOPY hello.txt /opt/hello.txt\n"
        "RUN echo built > /opt/marker\nUSER agent\n")
    _project(repo, '[sandbox]\ndockerfile = "docker/Dockerfile"\n[setup]\ncommands = ["cat /opt/hello.txt > seen.txt"]\n')
    built: list[str] = []
    try:
        task = svc.create_task(repo, "own dockerfile")
        built.append(task.image)
        assert task.image.startswith("taskbox-project:") and task.image != svc.settings.image
        assert (Path(task.workspace_path) / "seen.txt").read_text() == "from the context\n"  # context, then setup
        assert svc.exec(task.id, "cat /opt/marker").stdout == "built\n"
        again = svc.create_task(repo, "own dockerfile again")
        assert again.image == task.image  # the same Dockerfile: built once
        r = run_cli("image", "build", "--repo", str(repo), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["project"]["image"] == {**json.loads(r.stdout)["project"]["image"],
                                                            "tag": task.image, "cached": True}
        # a lazy task builds nothing at create, and its own Dockerfile when its sandbox first starts
        (repo / "docker" / "Dockerfile").write_text((repo / "docker" / "Dockerfile").read_text() + "LABEL lazy=1\n")
        lazy = svc.create_task(repo, "lazy own dockerfile", lazy=True)
        built.append(lazy.image)
        assert lazy.image != task.image and not docker_engine.api.images(name=lazy.image)
        assert svc.exec(lazy.id, "cat /opt/marker").stdout == "built\n"
        assert svc.get(lazy.id).image == lazy.image and docker_engine.api.images(name=lazy.image)
        # devcontainer.json's build: paths relative to its own folder
        _project(repo, "")
        (repo / ".devcontainer").mkdir()
        (repo / ".devcontainer" / "devcontainer.json").write_text(json.dumps(
            {"build": {"dockerfile": "../docker/Dockerfile", "context": "../docker"},
             "postCreateCommand": "cat /opt/marker > dc.txt"}))
        dc = svc.create_task(repo, "devcontainer build")
        assert dc.image == lazy.image and (Path(dc.workspace_path) / "dc.txt").read_text() == "built\n"
        # a Dockerfile that fails to build: one line, nothing created
        (repo / "docker" / "Dockerfile").write_text(f"FROM taskbox-sandbox:latest\nLABEL t={token}-bad\nRUN exit 3\n")
        before = {t.id for t in svc.list_tasks()}
        r = run_cli("create-task", "broken image", "--repo", str(repo))
        assert r.returncode == 6 and len(r.stderr.strip().splitlines()) >= 1
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: building the project's Dockerfile docker/Dockerfile failed:") and "3" in last
        assert {t.id for t in svc.list_tasks()} == before
        _project(repo, '[sandbox]\nimage = "x:1"\ndockerfile = "docker/Dockerfile"\n')
        with pytest.raises(InvalidInput, match="name sandbox.image or sandbox.dockerfile, not both"):
            svc.create_task(repo, "both")
    finally:
        for c in docker_engine.api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
            docker_engine.api.remove_container(c["Id"], force=True)  # they hold the image
        for tag in built:
            try:
                docker_engine.images.remove(tag, force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def test_templates_shipped_by_a_plugin(svc: TaskService, repo: Path, home: Path) -> None:
    class Shipped:
        @hookimpl
        def project_templates(self) -> dict[str, object]:
            return {"node-app": {"setup": {"commands": ["echo from-plugin > plugin.txt"]}, "agent": {"default": "shell"}},
                    "as-text": '[setup]\ncommands = ["echo text > text.txt"]\n', "Bad Name": {}}

    svc.pm.register(Shipped(), name="shipped")
    assert [(t["name"], t["source"]) for t in svc.templates()] == [("as-text", "plugin"), ("node-app", "plugin")]
    task = svc.create_task(repo, "plugin template", template="node-app")
    assert (Path(task.workspace_path) / "plugin.txt").read_text() == "from-plugin\n" and task.template == "node-app"
    assert svc.show_setup("as-text")["commands"] == ["echo text > text.txt"]
    # a template saved under TASKBOX_HOME with the same name wins over the plugin's
    _project(repo, '[setup]\ncommands = ["echo saved > saved.txt"]\n')
    svc.save_template("node-app", repo)
    assert [(t["name"], t["source"]) for t in svc.templates()] == [("as-text", "plugin"), ("node-app", "saved")]
    assert svc.show_setup("node-app")["commands"] == ["echo saved > saved.txt"]


def test_template_through_mcp_and_the_web_api(svc: TaskService, repo: Path) -> None:
    """Every adapter applies a template: the same core call, not a CLI-only option."""
    import anyio
    import httpx

    from .test_mcp import call, stdio
    from .webserver import running

    _project(repo, '[setup]\ncommands = ["echo templated > t.txt"]\n')
    svc.save_template("tpl", repo)
    _project(repo, "")

    async def main() -> dict[str, Any]:
        async with stdio()() as client:
            return await call(client, "create_task_sandbox", task_id="via-mcp", task_description="mcp template",
                              workspace_path=str(repo), template="tpl")

    made = anyio.run(main)
    assert made["task_id"] == "via-mcp" and svc.get("via-mcp").template == "tpl"
    assert (Path(svc.get("via-mcp").workspace_path) / "t.txt").read_text() == "templated\n"
    with running(svc) as base, httpx.Client(base_url=base, timeout=120) as c:
        r = c.post("/api/tasks", json={"repo": str(repo), "description": "web template", "id": "via-web",
                                       "template": "tpl"})
        assert r.status_code == 200, r.text
    assert svc.get("via-web").template == "tpl" and (Path(svc.get("via-web").workspace_path) / "t.txt").exists()
