"""Connecting to the Docker engine, with a friendly error when it is not there."""

from __future__ import annotations

import os
from functools import lru_cache

import docker
import requests
from docker.errors import APIError, DockerException

from .errors import DockerUnavailable, InvalidInput, SandboxError, TaskboxError

# What a Docker API call can raise: the SDK's errors, and requests' own when the engine's
# socket goes away mid-session (those are not DockerExceptions).
DOCKER_ERRORS = (DockerException, requests.RequestException)

HOW_TO_START = (
    "start it with `sudo systemctl start docker` (or `sudo dockerd >/var/log/dockerd.log 2>&1 &`), "
    "or install and start it with `scripts/setup`"
)


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


@lru_cache(maxsize=1)
def _client() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as exc:
        raise DockerUnavailable(
            f"cannot reach the Docker engine at {docker_host()}: {_reason(exc)}; {HOW_TO_START}"
        ) from exc
    return client


def connect() -> docker.DockerClient:
    """A connected Docker client, or :class:`DockerUnavailable` saying how to start Docker."""
    return _client()


def reset() -> None:
    """Forget the cached client (after the engine restarted, or in tests)."""
    _client.cache_clear()


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "FileNotFoundError" in text or "No such file" in text:
        return "the Docker socket does not exist (the engine is not running)"
    if "ConnectionRefused" in text or "Connection refused" in text:
        return "connection refused (the engine is not running)"
    if "PermissionError" in text or "Permission denied" in text:
        return "permission denied on the Docker socket (add yourself to the `docker` group)"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def translate(exc: Exception, what: str) -> TaskboxError:
    """The taskbox error for a failed Docker call; ``what`` says what was being done.

    A lost engine becomes :class:`DockerUnavailable` (with how to start it), a request the
    engine refused as malformed :class:`InvalidInput`, anything else :class:`SandboxError`.
    """
    if isinstance(exc, requests.ConnectionError):
        return DockerUnavailable(f"{what}: lost the Docker engine at {docker_host()}; {HOW_TO_START}")
    if isinstance(exc, APIError):
        text = str(exc.explanation or exc)
        return (InvalidInput if exc.status_code == 400 else SandboxError)(f"{what}: {text}")
    text = str(exc).strip()
    return SandboxError(f"{what}: {text.splitlines()[0][:300] if text else type(exc).__name__}")
