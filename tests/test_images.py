"""The sandbox image, built and run on the real Docker engine (never skipped)."""

from __future__ import annotations

import uuid
from pathlib import Path

import docker
import pytest

from taskbox import images
from taskbox.engine import connect
from taskbox.errors import ImageMissing, InvalidInput

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def client() -> docker.DockerClient:
    # No skip: without an engine this raises DockerUnavailable and the tests fail.
    return connect()


@pytest.fixture(scope="module")
def built(client: docker.DockerClient) -> images.BuildResult:
    # The first build of a fresh machine bootstraps the base and takes minutes.
    return images.build(client)


def run(client: docker.DockerClient, image: str, *cmd: str, user: str | None = None) -> str:
    output = client.containers.run(image, list(cmd), remove=True, user=user)
    return output.decode().strip()


def test_second_build_is_cached(
    client: docker.DockerClient, built: images.BuildResult
) -> None:
    again = images.build(client)

    assert again.cached is True
    assert again.tag == built.tag == images.image_tag(built.base)
    assert again.image_id == built.image_id
    assert client.images.get(images.DEFAULT_IMAGE).id == built.image_id
    assert client.images.get(built.tag).labels["taskbox.recipe"] == images.recipe_hash(built.base)


def test_image_runs_as_agent_with_tools(
    client: docker.DockerClient, built: images.BuildResult
) -> None:
    assert run(client, built.tag, "id", "-u") == "1000"
    assert run(client, built.tag, "pwd") == "/workspace"
    for tool in ("git", "python3", "node", "npm", "curl"):
        assert run(client, built.tag, "sh", "-c", f"command -v {tool}").startswith("/usr/bin/")
    versions = run(client, built.tag, "sh", "-c", "git --version && node --version")
    git, node = versions.splitlines()
    assert git.startswith("git version") and node.startswith("v")


def test_home_is_writable_for_another_uid(
    client: docker.DockerClient, built: images.BuildResult
) -> None:
    out = run(client, built.tag, "sh", "-c", 'touch "$HOME/probe" && echo $HOME', user="4321:4321")
    assert out == "/home/agent"


def test_ensure(client: docker.DockerClient, built: images.BuildResult) -> None:
    images.ensure(client, built.tag)
    images.ensure(client, images.DEFAULT_IMAGE)
    missing = f"taskbox-no-such-image:{uuid.uuid4().hex[:8]}"
    with pytest.raises(ImageMissing, match="taskbox image build"):
        images.ensure(client, missing)


def test_recipe_hash_is_stable_and_depends_on_base() -> None:
    first = images.recipe_hash(images.BASE_IMAGE)
    assert first == images.recipe_hash(images.BASE_IMAGE)
    assert len(first) == 12 and int(first, 16) >= 0
    assert first != images.recipe_hash(images.BOOTSTRAP_BASE)
    assert f"FROM {images.BOOTSTRAP_BASE}\n" in images.recipe(images.BOOTSTRAP_BASE)


def test_recipe_rejects_a_base_that_is_not_an_image_reference() -> None:
    with pytest.raises(InvalidInput):
        images.recipe("debian\nRUN rm -rf /")


def test_debian_mirrors_reads_deb822_and_one_line_sources(tmp_path: Path) -> None:
    listd = tmp_path / "sources.list.d"
    listd.mkdir()
    (listd / "other.sources").write_text(
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
    )
    (listd / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/x\n"
        "URIs: http://mirror.example/debian/\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
    )
    (listd / "old.list.disabled").write_text("deb http://ignored.example/debian bookworm main\n")
    assert images.debian_mirrors([tmp_path / "sources.list", listd]) == (
        "http://mirror.example/debian",
        "http://mirror.example/debian-security",
    )

    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# deb http://commented.example/debian\n"
        "deb [arch=amd64] http://m.example/debian bookworm main\n"
    )
    assert images.debian_mirrors([one_line]) == ("http://m.example/debian", None)
    assert images.debian_mirrors([tmp_path / "absent"]) == (
        images.DEFAULT_MIRROR,
        "http://deb.debian.org/debian-security",
    )
