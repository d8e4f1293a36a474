"""The sandbox image every task container runs, and how it gets built.

The recipe is ``taskbox/recipes/sandbox.Dockerfile``. The built image is tagged with a hash
of the recipe text (base image included), so an unchanged recipe is never rebuilt and an
edited one always is; ``taskbox-sandbox:latest`` points at the newest build.

The base is ``debian:bookworm-slim`` when Docker Hub can provide it. Many machines cannot
reach Docker Hub (air-gapped, or only a Debian mirror allowed), so the fallback bootstraps
the same Debian release from the apt mirror with ``debootstrap`` and imports it as
``taskbox-base:bookworm``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import docker
from docker.errors import NotFound
from docker.models.images import Image

from .engine import DOCKER_ERRORS, connect, translate
from .errors import ImageMissing, InvalidInput, SandboxError, TaskboxError

__all__ = [
    "BASE_IMAGE",
    "BOOTSTRAP_BASE",
    "DEFAULT_IMAGE",
    "IMAGE_REPO",
    "PROXY_IMAGE",
    "AGENTS_IMAGE",
    "BuildResult",
    "agents_recipe",
    "build",
    "build_agents",
    "build_project",
    "project_image",
    "build_proxy",
    "ensure",
    "image_tag",
    "recipe",
    "recipe_hash",
]

BASE_IMAGE = "debian:bookworm-slim"
BOOTSTRAP_BASE = "taskbox-base:bookworm"
IMAGE_REPO = "taskbox-sandbox"
DEFAULT_IMAGE = f"{IMAGE_REPO}:latest"
RECIPE_LABEL = "taskbox.recipe"
PROXY_REPO = "taskbox-proxy"
PROXY_IMAGE = f"{PROXY_REPO}:latest"

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# A pull that cannot reach the registry may hang on DNS or TCP; the bootstrap fallback is
# better than waiting, so the pull gets this long before it is abandoned.
PULL_TIMEOUT = 60.0
SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
_RECIPE_FILE = "recipes/sandbox.Dockerfile"
_PROXY_RECIPE_FILE = "recipes/proxy.Dockerfile"
_AGENTS_RECIPE_FILE = "recipes/agents.Dockerfile"
AGENTS_REPO = "taskbox-sandbox-agents"
AGENTS_IMAGE = f"{AGENTS_REPO}:latest"
# A base is pasted into a Dockerfile FROM line: allow image references only, nothing that
# could add a line or an instruction.
_IMAGE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")
_LOG_TAIL = 30

Progress = Callable[[str], None]


@dataclass
class BuildResult:
    """What :func:`build` did: the hash tag built (or found), its id, and the base used."""

    tag: str
    image_id: str
    cached: bool
    base: str
    seconds: float


def recipe(base: str, file: str = _RECIPE_FILE) -> str:
    """The sandbox Dockerfile text for ``base`` (or another recipe ``file`` of the package)."""
    if not _IMAGE_REF.fullmatch(base):
        raise InvalidInput(f"not a valid base image reference: {base!r}", base=base)
    template = resources.files("taskbox").joinpath(file).read_text(encoding="utf-8")
    return template.replace("{base}", base)


def proxy_recipe(base: str) -> str:
    """The egress proxy Dockerfile text for ``base``."""
    return recipe(base, _PROXY_RECIPE_FILE)


def recipe_hash(base: str) -> str:
    """Short sha256 of the recipe text for ``base``: it names the image built from it."""
    return hashlib.sha256(recipe(base).encode("utf-8")).hexdigest()[:12]


def image_tag(base: str) -> str:
    """The content-addressed tag of the sandbox image built on ``base``."""
    return f"{IMAGE_REPO}:{recipe_hash(base)}"


def build(
    client: docker.DockerClient | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Build the sandbox image (or find it already built) and point ``:latest`` at it.

    Without ``force`` an image already built from the current recipe is returned at once.
    ``force`` rebuilds without the layer cache (fresh packages) but keeps the base image.
    Raises :class:`SandboxError` with the build log's tail when the build fails.
    """
    client = client or connect()
    say: Progress = progress or _quiet
    started = time.monotonic()

    if not force:
        # Checked before anything slow (a pull attempt, a bootstrap): a built recipe on a
        # base that is already here is the common case and must answer in milliseconds.
        base = _local_base(client)
        if base is not None:
            found = _get(client, image_tag(base))
            if found is not None:
                _tag_latest(found)
                return BuildResult(
                    image_tag(base), found.id, True, base, time.monotonic() - started
                )

    base = _choose_base(client, say)
    tag = image_tag(base)
    if not force:
        found = _get(client, tag)
        if found is not None:
            _tag_latest(found)
            return BuildResult(tag, found.id, True, base, time.monotonic() - started)

    say(f"==> building {tag} from {base}")
    image_id = _build_image(client, base, tag, nocache=force, say=say)
    built = _get(client, image_id)
    if built is None:
        raise SandboxError(f"docker built {tag} but the image {image_id} is gone", tag=tag)
    _tag_latest(built)
    say(f"==> built {tag} ({built.short_id}), tagged {DEFAULT_IMAGE}")
    return BuildResult(tag, built.id, False, base, time.monotonic() - started)


def build_proxy(
    client: docker.DockerClient | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Build the egress proxy image (squid from Debian) on the sandbox's base; tag ``:latest``.

    Like :func:`build`: an image already built from the current recipe returns at once.
    """
    client = client or connect()
    say: Progress = progress or _quiet
    started = time.monotonic()
    base = _local_base(client) if not force else None
    base = base or _choose_base(client, say)
    text = proxy_recipe(base)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    tag = f"{PROXY_REPO}:{digest}"
    found = None if force else _get(client, tag)
    cached = found is not None
    if found is None:
        say(f"==> building {tag} from {base}")
        built = _get(client, _build_image(client, base, tag, nocache=force, say=say, text=text))
        if built is None:
            raise SandboxError(f"docker built {tag} but the image is gone", tag=tag)
        found = built
    _tag_latest(found, PROXY_IMAGE)
    return BuildResult(tag, found.id, cached, base, time.monotonic() - started)


def agents_recipe(base: str, packages: Iterable[str]) -> str:
    """The agents layer's Dockerfile text: ``base`` (a sandbox image tag) plus the npm ``packages``."""
    specs = sorted(dict.fromkeys(packages))
    if not specs:
        raise InvalidInput("no agent packages to install")
    for spec in specs:
        if not re.fullmatch(r"@?[a-z0-9][a-z0-9._/-]*@[0-9][0-9A-Za-z.+-]*", spec):
            raise InvalidInput(f"npm package {spec!r} must be name@version with a pinned version")
    return recipe(base, _AGENTS_RECIPE_FILE).replace("{packages}", " ".join(specs))


def build_agents(
    client: docker.DockerClient | None = None,
    *,
    packages: Iterable[str],
    force: bool = False,
    progress: Progress | None = None,
    npm_cafile: Path | None = None,
    npm_registry: str | None = None,
) -> BuildResult:
    """Build the agent CLIs layer on the current sandbox image (built first if needed); tag ``:latest``.

    Cached by the recipe's hash like the base image: the same sandbox image and packages
    answer at once. The build step runs on the host's network (npm must be reachable; task
    containers never are), with the host's npm CA bundle and registry when given.
    """
    client = client or connect()
    say: Progress = progress or _quiet
    started = time.monotonic()
    base = build(client, progress=say).tag
    text = agents_recipe(base, packages)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    tag = f"{AGENTS_REPO}:{digest}"
    found = None if force else _get(client, tag)
    cached = found is not None
    if found is None:
        say(f"==> building {tag} on {base}")
        extra: dict[str, bytes] = {}
        if npm_cafile is not None:
            try:
                extra["npm-build/ca.pem"] = npm_cafile.read_bytes()
            except OSError as exc:
                raise InvalidInput(f"cannot read the npm CA bundle {npm_cafile}: {exc.strerror}") from exc
        if npm_registry:
            extra["npm-build/registry"] = npm_registry.encode()
        built = _get(client, _build_image(client, base, tag, nocache=force, say=say, text=text, files=extra,
                                          network_mode="host"))
        if built is None:
            raise SandboxError(f"docker built {tag} but the image is gone", tag=tag)
        found = built
    _tag_latest(found, AGENTS_IMAGE)
    return BuildResult(tag, found.id, cached, base, time.monotonic() - started)


PROJECT_REPO = "taskbox-project"


def project_tag(dockerfile_text: str, dockerfile: str, context: str) -> str:
    """The tag of a project's image: a hash of its Dockerfile's text and where it and its context are."""
    key = "\0".join((dockerfile_text, dockerfile, context)).encode("utf-8")
    return f"{PROJECT_REPO}:{hashlib.sha256(key).hexdigest()[:12]}"


def project_image(repo: Path, dockerfile: str, context: str) -> tuple[str, Path, Path]:
    """The tag a project's Dockerfile builds to, the Dockerfile and the context (inside ``repo``)."""
    root = repo.resolve()
    file_path, context_path = (root / dockerfile).resolve(), (root / context).resolve()
    for what, path in (("dockerfile", file_path), ("context", context_path)):
        if path != root and root not in path.parents:
            raise InvalidInput(f"sandbox.{what} {path} is outside the repository {root}")
    try:
        text = file_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read the project's Dockerfile {file_path}: {exc}") from exc
    if not context_path.is_dir():
        raise InvalidInput(f"the Dockerfile's build context {context_path} is not a directory")
    return project_tag(text, dockerfile, context), file_path, context_path


def build_project(
    client: docker.DockerClient | None = None,
    *,
    repo: Path,
    dockerfile: str,
    context: str,
    force: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Build (or find) the image of a project's own Dockerfile (``[sandbox] dockerfile`` or
    devcontainer.json's ``build``); ``dockerfile`` and ``context`` are relative to ``repo``.

    The user's repository and Dockerfile are theirs, built as ``docker build`` would. The tag
    is a hash of the Dockerfile's text: an edited Dockerfile is rebuilt at the next create;
    ``force`` (``taskbox image build --repo . --force``) rebuilds for changed context files.
    """
    client = client or connect()
    say: Progress = progress or _quiet
    started = time.monotonic()
    tag, file_path, context_path = project_image(repo, dockerfile, context)
    found = None if force else _get(client, tag)
    if found is not None:
        return BuildResult(tag, found.id, True, "", time.monotonic() - started)
    say(f"==> building {tag} from {file_path}")
    tail: deque[str] = deque(maxlen=_LOG_TAIL)
    error: str | None = None
    image_id: str | None = None
    try:
        for chunk in client.api.build(path=str(context_path), dockerfile=str(file_path), tag=tag, rm=True,
                                      forcerm=True, nocache=force, decode=True,
                                      labels={RECIPE_LABEL: tag.split(":", 1)[1]}):
            image_id = _consume(chunk, tail, say) or image_id
            if "error" in chunk:
                error = str(chunk["error"]).strip()
    except DOCKER_ERRORS as exc:
        raise _translate(exc, f"building {tag}", tail) from exc
    if error is not None:
        raise SandboxError(f"building the project's Dockerfile {dockerfile} failed: {error.splitlines()[-1][:300]}",
                           tag=tag)
    built = _get(client, tag)
    if built is None:
        raise SandboxError(f"docker built {tag} but the image is gone", tag=tag)
    return BuildResult(tag, built.id, False, "", time.monotonic() - started)


def host_npm_settings() -> tuple[Path | None, str | None]:
    """The host's npm CA bundle and registry (``npm_config_cafile``/``NODE_EXTRA_CA_CERTS``,
    ``npm_config_registry``), for a build behind a TLS-intercepting proxy or a mirror."""
    cafile = os.environ.get("npm_config_cafile") or os.environ.get("NODE_EXTRA_CA_CERTS")
    registry = os.environ.get("npm_config_registry")
    return (Path(cafile) if cafile and Path(cafile).is_file() else None), registry or None


def ensure(client: docker.DockerClient, image: str, build: str = "taskbox image build") -> None:
    """Raise :class:`ImageMissing` (saying to run ``build``) unless ``image`` exists locally."""
    if _get(client, image) is None:
        raise ImageMissing(f"image {image} is not built; run `{build}`", image=image)


# -- base image -------------------------------------------------------------------------


def _local_base(client: docker.DockerClient) -> str | None:
    for base in (BASE_IMAGE, BOOTSTRAP_BASE):
        if _get(client, base) is not None:
            return base
    return None


def _choose_base(client: docker.DockerClient, say: Progress) -> str:
    if _get(client, BASE_IMAGE) is not None:
        return BASE_IMAGE
    if _pull(client, BASE_IMAGE, say):
        return BASE_IMAGE
    if _get(client, BOOTSTRAP_BASE) is not None:
        say(f"==> using the bootstrapped base {BOOTSTRAP_BASE}")
        return BOOTSTRAP_BASE
    _bootstrap(client, say)
    return BOOTSTRAP_BASE


def _pull(client: docker.DockerClient, ref: str, say: Progress) -> bool:
    """Try to pull ``ref`` for at most :data:`PULL_TIMEOUT` seconds; failing is expected."""
    say(f"==> pulling {ref}")
    repository, _, tag = ref.partition(":")
    failure: list[str] = []

    def run() -> None:
        try:
            for event in client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                if "error" in event:
                    failure.append(str(event["error"]))
                # Per-layer byte counters arrive many times a second; only states are news.
                elif "status" in event and "progress" not in event:
                    say(f"    {event.get('id', ref)}: {event['status']}")
        except DOCKER_ERRORS as exc:
            failure.append(_first_line(exc))

    # The SDK sends pulls without a timeout, so a daemon thread bounds the wait.
    worker = threading.Thread(target=run, name="taskbox-pull", daemon=True)
    worker.start()
    worker.join(PULL_TIMEOUT)
    if worker.is_alive():
        say(f"    pull of {ref} still not done after {PULL_TIMEOUT:.0f}s; not waiting for it")
        return False
    if failure or _get(client, ref) is None:
        say(f"    cannot pull {ref}: {failure[0] if failure else 'unknown error'}")
        return False
    return True


def _bootstrap(client: docker.DockerClient, say: Progress) -> None:
    """Build ``taskbox-base:bookworm`` from the Debian mirror with debootstrap."""
    debootstrap = shutil.which("debootstrap") or _first_existing(
        ["/usr/sbin/debootstrap", "/sbin/debootstrap"]
    )
    if debootstrap is None:
        raise SandboxError(
            f"{BASE_IMAGE} cannot be pulled and debootstrap is not installed to build a base "
            "image locally; install it with `sudo apt-get install debootstrap` "
            "(or run `scripts/setup`), then run `taskbox image build` again"
        )
    if os.geteuid() != 0:
        raise SandboxError(
            f"{BASE_IMAGE} cannot be pulled, and bootstrapping {BOOTSTRAP_BASE} with debootstrap "
            "needs root: run `sudo taskbox image build` once"
        )
    mirror, security = debian_mirrors()
    say(f"==> {BASE_IMAGE} unavailable; bootstrapping {BOOTSTRAP_BASE} from {mirror}")
    started = time.monotonic()
    rootfs = Path(tempfile.mkdtemp(prefix="taskbox-rootfs-", dir="/var/tmp"))
    try:
        _run(
            [debootstrap, "--variant=minbase", SUITE, str(rootfs), mirror],
            say,
            what="debootstrap",
        )
        _finish_rootfs(rootfs, mirror, security)
        say(f"==> importing the root filesystem as {BOOTSTRAP_BASE}")
        _import(client, rootfs)
    finally:
        _remove_rootfs(rootfs)
    say(f"==> bootstrapped {BOOTSTRAP_BASE} in {time.monotonic() - started:.0f}s")


def debian_mirrors(sources: Iterable[Path] = SOURCES) -> tuple[str, str | None]:
    """The first plain-http Debian mirror in the apt sources, and its security counterpart.

    Plain http because the bootstrapped system has no CA certificates until the recipe
    installs them; apt verifies packages by their signatures either way.
    """
    mirror: str | None = None
    security: str | None = None
    for uri in _apt_uris(sources):
        uri = uri.rstrip("/")
        if not uri.startswith("http://"):
            continue
        if uri.endswith("/debian-security"):
            security = security or uri
        elif uri.endswith("/debian"):
            mirror = mirror or uri
    if mirror is None:
        mirror = DEFAULT_MIRROR
    if security is None and mirror == DEFAULT_MIRROR:
        security = "http://deb.debian.org/debian-security"
    return mirror, security


def _apt_uris(sources: Iterable[Path]) -> list[str]:
    files: list[Path] = []
    for path in sources:
        if path.is_dir():
            # Only what apt itself reads: *.list and deb822 *.sources, not disabled copies.
            files += sorted(p for p in path.iterdir() if p.suffix in {".list", ".sources"})
        elif path.is_file():
            files.append(path)
    uris: list[str] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if file.suffix == ".sources":
                if line.lower().startswith("uris:"):
                    uris += line.split(":", 1)[1].split()
            else:
                match = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
                if match:
                    uris.append(match.group(1))
    return uris


def _finish_rootfs(rootfs: Path, mirror: str, security: str | None) -> None:
    # debootstrap lists only the release itself; add updates and security like the official
    # image does, so the sandbox gets current packages.
    lines = [f"deb {mirror} {SUITE} main", f"deb {mirror} {SUITE}-updates main"]
    if security:
        lines.append(f"deb {security} {SUITE}-security main")
    (rootfs / "etc/apt/sources.list").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Downloaded packages and indexes are dead weight in a base image.
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
        for path in rootfs.glob(pattern):
            if path.is_file() and not path.is_symlink():
                path.unlink()


def _import(client: docker.DockerClient, rootfs: Path) -> None:
    repository, _, tag = BOOTSTRAP_BASE.partition(":")
    # Streamed from tar so a few hundred MB of rootfs never sit in memory; numeric owners
    # because the names resolve against the host's users, not the rootfs's.
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tar.stdout is not None and tar.stderr is not None
    try:
        client.api.import_image(
            src=tar.stdout,
            repository=repository,
            tag=tag,
            changes=[
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                'CMD ["bash"]',
            ],
            stream_src=True,
        )
    except DOCKER_ERRORS as exc:
        tar.kill()
        raise _translate(exc, f"importing {BOOTSTRAP_BASE}") from exc
    finally:
        tar.stdout.close()
        stderr = tar.stderr.read().decode(errors="replace")
        code = tar.wait()
    if code != 0:
        raise SandboxError(f"tar of the bootstrapped rootfs failed ({code}): {stderr.strip()}")
    if _get(client, BOOTSTRAP_BASE) is None:
        raise SandboxError(f"docker accepted the import but {BOOTSTRAP_BASE} does not exist")


def _remove_rootfs(rootfs: Path) -> None:
    # debootstrap bind-mounts /dev, /proc and /sys into the target while it works and may
    # leave them behind when it fails; deleting through a live bind mount would delete the
    # host's files, so unmount first and refuse to delete if anything is still mounted.
    prefix = str(rootfs) + "/"
    for mountpoint in sorted(_mountpoints(prefix), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
    if _mountpoints(prefix):
        return
    shutil.rmtree(rootfs, ignore_errors=True)


def _mountpoints(prefix: str) -> list[str]:
    try:
        text = Path("/proc/self/mounts").read_text(encoding="utf-8")
    except OSError:
        return []
    points = [line.split()[1].replace("\\040", " ") for line in text.splitlines() if line]
    return [p for p in points if p.startswith(prefix)]


# -- building ---------------------------------------------------------------------------


def _build_image(
    client: docker.DockerClient, base: str, tag: str, *, nocache: bool, say: Progress,
    text: str | None = None, files: dict[str, bytes] | None = None, network_mode: str | None = None,
) -> str:
    text = recipe(base) if text is None else text
    tail: deque[str] = deque(maxlen=_LOG_TAIL)
    error: str | None = None
    image_id: str | None = None
    context: dict[str, Any] = {"fileobj": io.BytesIO(text.encode("utf-8"))}
    if files is not None:  # a build context: the Dockerfile and these files (an empty dir at least)
        context = {"fileobj": _context_tar(text, files), "custom_context": True}
    try:
        stream = client.api.build(
            **context,
            network_mode=network_mode,
            tag=tag,
            rm=True,
            forcerm=True,
            nocache=nocache,
            pull=False,
            labels={RECIPE_LABEL: hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]},
            decode=True,
        )
        for chunk in stream:
            image_id = _consume(chunk, tail, say) or image_id
            if "error" in chunk:
                error = str(chunk["error"]).strip()
    except DOCKER_ERRORS as exc:
        raise _translate(exc, f"building {tag}", tail) from exc
    if error is not None:
        raise SandboxError(
            f"building {tag} failed: {error}\n--- build log tail ---\n" + "\n".join(tail),
            tag=tag,
        )
    if image_id is None:
        found = _get(client, tag)
        if found is None:
            raise SandboxError(f"building {tag} reported success but produced no image")
        image_id = found.id
    return image_id


def _context_tar(dockerfile: str, files: dict[str, bytes]) -> io.BytesIO:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        entries = {"Dockerfile": dockerfile.encode("utf-8"), **files}
        dirs = {"npm-build"} | {name.rsplit("/", 1)[0] for name in files if "/" in name}
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def _consume(chunk: dict[str, Any], tail: deque[str], say: Progress) -> str | None:
    for line in str(chunk.get("stream") or chunk.get("error") or "").splitlines():
        if line.strip():
            tail.append(line)
            say(line)
    aux = chunk.get("aux")
    if isinstance(aux, dict) and aux.get("ID"):
        return str(aux["ID"])
    return None


def _tag_latest(image: Image, ref: str = DEFAULT_IMAGE) -> None:
    repository, _, tag = ref.partition(":")
    try:
        image.tag(repository, tag)
    except DOCKER_ERRORS as exc:
        raise _translate(exc, f"tagging {ref}") from exc


# -- helpers ----------------------------------------------------------------------------


def _get(client: docker.DockerClient, ref: str) -> Image | None:
    try:
        return client.images.get(ref)
    except NotFound:
        return None
    except DOCKER_ERRORS as exc:
        raise _translate(exc, f"looking up image {ref}") from exc


def _run(cmd: list[str], say: Progress, *, what: str) -> None:
    tail: deque[str] = deque(maxlen=_LOG_TAIL)
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                say(f"    {line}")
        code = proc.wait()
    if code != 0:
        raise SandboxError(
            f"{what} failed with exit code {code}:\n" + "\n".join(tail), command=cmd, exit_code=code
        )


def _translate(exc: Exception, doing: str, tail: Iterable[str] = ()) -> TaskboxError:
    err = translate(exc, f"docker failed {doing}")
    lines = list(tail)
    if lines and isinstance(err, SandboxError):
        err.message += "\n--- build log tail ---\n" + "\n".join(lines)
        err.args = (err.message,)
    return err


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _first_existing(paths: list[str]) -> str | None:
    return next((p for p in paths if os.access(p, os.X_OK)), None)


def _quiet(_line: str) -> None:
    pass
