"""Project setup (``.taskbox/config.toml`` in the user's repository) and named templates.

A new task's workspace starts ready to work::

    [setup]
    copy = [".env", "config/local.toml"]   # ignored files copied from the repository into each new workspace
    commands = ["pip install -e ."]        # run once in the sandbox after create (output logged)
    timeout = 600                          # seconds per command (default: the setup_timeout setting)

    [sandbox]
    image = "my-image:1"                   # the image (default: devcontainer.json's "image", else the setting)
    # dockerfile = "docker/dev.Dockerfile" # or build one (instead of image); context defaults to its folder
    caches = ["pip", "npm"]                # host caches shared read-only (taskbox.caches; `taskbox cache warm`)

    [agent]
    default = "claude-code"                # `taskbox run` without --agent
    packages = ["cowsay@1.6.0"]            # extra npm packages for `taskbox image build --agents --repo .`

When the repository has ``.devcontainer/devcontainer.json`` (or ``.devcontainer.json``), its
``image`` or ``build.dockerfile``/``build.context``, and ``postCreateCommand``, are used where
the file above says nothing.

A **template** is the same settings kept under ``TASKBOX_HOME/templates/NAME.toml``
(`taskbox template save|list|show`) or shipped by a plugin (the ``project_templates`` hook);
``create-task --template NAME`` applies it, the project's own file filling what the template
leaves out.

The repository is the user's own (trusted for reading); the destination workspace is hostile:
files are written through :mod:`taskbox.files` on descriptors, never following a link.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import caches
from .config import load_project_file
from .confine import normalize
from .errors import InvalidInput, NotFound

FILE = ".taskbox/config.toml"
COPY_LIMIT = 16 * 1024**2  # most bytes of one copied file
COPY_TOTAL = 64 * 1024**2
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


@dataclass
class ProjectSetup:
    """What a new task of a project gets: copied files, setup commands, image, default agent."""

    copy: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    timeout: int | None = None
    image: str | None = None
    dockerfile: str | None = None  # relative to the repository, like context
    context: str | None = None
    agent: str | None = None
    packages: list[str] = field(default_factory=list)
    caches: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # where these came from (files, template)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        def q(v: Any) -> str:
            return json.dumps(v)  # a JSON string or list of strings is valid TOML

        lines = ["[setup]", f"copy = {q(self.copy)}", f"commands = {q(self.commands)}"]
        if self.timeout:
            lines.append(f"timeout = {int(self.timeout)}")
        lines += ["", "[sandbox]"] + ([f"image = {q(self.image)}"] if self.image else [])
        lines += [f"dockerfile = {q(self.dockerfile)}"] if self.dockerfile else []
        lines += [f"context = {q(self.context)}"] if self.dockerfile and self.context else []
        lines += [f"caches = {q(self.caches)}"] if self.caches else []
        lines += ["", "[agent]"] + ([f"default = {q(self.agent)}"] if self.agent else [])
        lines.append(f"packages = {q(self.packages)}")
        return "\n".join(lines) + "\n"

    def over(self, base: ProjectSetup) -> ProjectSetup:
        """These settings, with ``base`` filling what they leave out (lists: these if non-empty).

        The image and the Dockerfile go together: either names the sandbox's image."""
        img = self if self.image or self.dockerfile else base
        return ProjectSetup(copy=self.copy or base.copy, commands=self.commands or base.commands,
                            timeout=self.timeout or base.timeout, image=img.image, dockerfile=img.dockerfile,
                            context=img.context,
                            agent=self.agent or base.agent, packages=self.packages or base.packages,
                            caches=self.caches or base.caches,
                            sources=[*self.sources, *base.sources])


def parse(data: dict[str, Any], where: str) -> ProjectSetup:
    """Validate parsed TOML; :class:`InvalidInput` names the bad entry."""
    unknown = set(data) - {"setup", "sandbox", "agent"}
    if unknown:
        raise InvalidInput(f"{where}: unknown sections {', '.join(sorted(unknown))}")
    setup, sandbox, agent = (data.get(k) or {} for k in ("setup", "sandbox", "agent"))
    for name, section, keys in (("setup", setup, {"copy", "commands", "timeout"}), ("sandbox", sandbox, {"image", "dockerfile", "context", "caches"}),
                                ("agent", agent, {"default", "packages"})):
        if not isinstance(section, dict):
            raise InvalidInput(f"{where}: [{name}] must be a table")
        extra = set(section) - keys
        if extra:
            raise InvalidInput(f"{where}: unknown keys in [{name}]: {', '.join(sorted(extra))}")

    def strings(value: Any, key: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise InvalidInput(f"{where}: {key} must be a list of non-empty strings")
        return list(value)

    copy = strings(setup.get("copy", []), "setup.copy")
    for rel in copy:
        try:
            normalize(rel, allow_root=False)
        except Exception as exc:  # noqa: BLE001 - any refusal of the path is a bad entry
            raise InvalidInput(f"{where}: setup.copy entry {rel!r} must be a path inside the repository") from exc
    timeout = setup.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or not 0 < timeout <= 24 * 3600):
        raise InvalidInput(f"{where}: setup.timeout must be a number of seconds between 1 and 86400")
    image = sandbox.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise InvalidInput(f"{where}: sandbox.image must be an image name")
    paths: dict[str, str | None] = {}
    for key in ("dockerfile", "context"):
        value = sandbox.get(key)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise InvalidInput(f"{where}: sandbox.{key} must be a path in the repository")
            try:
                value = normalize(value, allow_root=key == "context")
            except Exception as exc:  # noqa: BLE001 - any refusal of the path is a bad entry
                raise InvalidInput(f"{where}: sandbox.{key} {value!r} must be a path inside the repository") from exc
        paths[key] = value
    if image and paths["dockerfile"]:
        raise InvalidInput(f"{where}: name sandbox.image or sandbox.dockerfile, not both")
    if paths["context"] and not paths["dockerfile"]:
        raise InvalidInput(f"{where}: sandbox.context is the build context of sandbox.dockerfile; name that too")
    if paths["dockerfile"] and not paths["context"]:
        paths["context"] = str(Path(paths["dockerfile"]).parent)
    default = agent.get("default")
    if default is not None and not isinstance(default, str):
        raise InvalidInput(f"{where}: agent.default must be an agent name")
    names = caches.check_names(strings(sandbox.get("caches", []), "sandbox.caches"), where)
    return ProjectSetup(copy=copy, commands=strings(setup.get("commands", []), "setup.commands"), timeout=timeout,
                        image=image, dockerfile=paths["dockerfile"], context=paths["context"], caches=names, agent=default, packages=strings(agent.get("packages", []), "agent.packages"),
                        sources=[where])


def _parse_text(text: str, path: Path) -> ProjectSetup:
    try:
        return parse(tomllib.loads(text), str(path))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: invalid TOML: {exc}") from exc


_JSONC = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/|,(?=\s*[}\]])', re.S)


def strip_jsonc(text: str) -> str:
    """JSON with comments (``//``, ``/* */``) and trailing commas, as devcontainer.json allows, made JSON."""
    return _JSONC.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)


def _devcontainer(repo: Path) -> ProjectSetup:
    for rel in (".devcontainer/devcontainer.json", ".devcontainer.json"):
        path = repo / rel
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(strip_jsonc(text))
            if not isinstance(data, dict):
                raise json.JSONDecodeError("not an object", text, 0)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{path}: cannot read it as JSON: {exc}") from exc
        post = data.get("postCreateCommand")
        if isinstance(post, list):
            import shlex

            post = shlex.join(str(p) for p in post)
        elif isinstance(post, dict):
            post = " && ".join(str(v) if isinstance(v, str) else " ".join(map(str, v)) for v in post.values())
        image = data.get("image") if isinstance(data.get("image"), str) else None
        build: dict[str, Any] = data["build"] if isinstance(data.get("build"), dict) else {}
        dockerfile = build.get("dockerfile") or data.get("dockerFile")  # "dockerFile": the older spelling
        context = build.get("context") or data.get("context") or "."
        rels: list[str | None] = [None, None]
        if isinstance(dockerfile, str) and dockerfile.strip() and not image:
            folder = Path(rel).parent  # devcontainer.json's paths are relative to its own folder
            try:
                rels = [normalize(str(folder / dockerfile), allow_root=False),
                        normalize(str(folder / str(context)), allow_root=True)]
            except Exception as exc:  # noqa: BLE001 - any refusal of the path is a bad entry
                raise InvalidInput(f"{path}: build.dockerfile and build.context must be inside the repository") from exc
        return ProjectSetup(commands=[post] if isinstance(post, str) and post.strip() else [], image=image,
                            dockerfile=rels[0], context=rels[1], sources=[str(path)])
    return ProjectSetup()


def load(repo: Path) -> ProjectSetup:
    """The project's setup: ``.taskbox/config.toml``, then ``devcontainer.json`` for what it leaves out."""
    own = load_project_file(repo / FILE, _parse_text) or ProjectSetup()
    return own.over(_devcontainer(repo))


# --- templates ---------------------------------------------------------------------------------------


def _template_path(home: Path, name: str) -> Path:
    if not _NAME.match(name):
        raise InvalidInput(f"template name {name!r} must be lowercase letters, digits, . _ - (max 63)")
    return home / "templates" / f"{name}.toml"


def template(home: Path, name: str, shipped: dict[str, Any] | None = None) -> ProjectSetup:
    """Template ``name``: saved under ``home``, else one a plugin ships (``shipped``)."""
    path = _template_path(home, name)
    found = load_project_file(path, _parse_text)
    if found is None and name in (shipped or {}):
        settings, where = (shipped or {})[name], f"template {name} (from a plugin)"
        if isinstance(settings, str):
            try:
                settings = tomllib.loads(settings)
            except tomllib.TOMLDecodeError as exc:
                raise InvalidInput(f"{where}: invalid TOML: {exc}") from exc
        if not isinstance(settings, dict):
            raise InvalidInput(f"{where}: settings must be a table or TOML text")
        found = parse(settings, where)
    if found is None:
        names = ", ".join(t["name"] for t in templates(home, shipped)) or "none"
        raise NotFound(f"no template {name!r} (templates: {names}); save one with `taskbox template save`",
                       template=name)
    return found


def templates(home: Path, shipped: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The saved templates and those plugins ship (a saved one hides a shipped one of its name)."""
    folder = home / "templates"
    rows: dict[str, dict[str, Any]] = {p.stem: {"name": p.stem, "path": str(p), "source": "saved"}
            for p in (sorted(folder.glob("*.toml")) if folder.is_dir() else []) if _NAME.match(p.stem)}
    for name in shipped or {}:
        if isinstance(name, str) and _NAME.match(name) and name not in rows:
            rows[name] = {"name": name, "path": None, "source": "plugin"}
    return [rows[n] for n in sorted(rows)]


def save_template(home: Path, name: str, setup: ProjectSetup) -> Path:
    from .files import write_durably

    path = _template_path(home, name)
    text = setup.to_toml()
    parse(tomllib.loads(text), str(path))  # what is saved reads back
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, text.encode(), 0o644)
    return path


# --- copying ignored files into a new workspace -------------------------------------------------------


def read_copies(repo: Path, entries: list[str]) -> list[tuple[str, bytes, int]]:
    """The files to copy (``rel``, content, mode) from the user's repository; a missing one is an error.

    A directory entry copies the regular files under it. Links are not followed out of the
    repository: a link entry is refused, links inside a directory are skipped.
    """
    out: list[tuple[str, bytes, int]] = []
    total = 0
    root = repo.resolve()
    for entry in entries:
        rel = normalize(entry, allow_root=False)
        path = root / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise InvalidInput(f"setup.copy: {rel} does not exist in {repo}") from None
        if stat.S_ISLNK(st.st_mode):
            raise InvalidInput(f"setup.copy: {rel} is a symbolic link; copy the file it points to instead")
        real = path.resolve()
        if real != root and root not in real.parents:  # a linked folder on the way leads out of the repository
            raise InvalidInput(f"setup.copy: {rel} leads out of the repository through a symbolic link")
        files = [path] if stat.S_ISREG(st.st_mode) else sorted(
            p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if stat.S_ISDIR(st.st_mode) else []
        for f in files:
            if f.resolve().parent != f.parent.resolve() or root not in f.resolve().parents:
                continue
            size = f.stat().st_size
            if size > COPY_LIMIT:
                raise InvalidInput(f"setup.copy: {f.relative_to(root)} is larger than {COPY_LIMIT} bytes")
            total += size
            if total > COPY_TOTAL:
                raise InvalidInput(f"setup.copy: the files add up to more than {COPY_TOTAL} bytes")
            out.append((str(f.relative_to(root)), f.read_bytes(), stat.S_IMODE(f.stat().st_mode) & 0o755))
    return out
