"""Secrets passed by reference, and the redactor that keeps their values out of every record.

A secret is a *name* (``GITHUB_TOKEN``); its value comes from the host, never from a task:

1. the environment variable ``TASKBOX_SECRET_<NAME>`` of the taskbox process, or
2. ``$TASKBOX_HOME/secrets.toml`` — ``NAME = "value"`` lines — which must be a regular file
   owned by the current user and readable by nobody else (``chmod 600``); any other file is
   refused with an error saying so.

Only names declared one of these ways exist: an agent asking for ``secrets=["HOME"]`` does
not get an arbitrary host environment variable. ``exec(secrets=[NAME])`` puts the values
into that one command's process environment (``docker exec``), under ``NAME``; they are never
part of the container's configuration, the registry, memory, events, audit or exec logs.

:class:`Redactor` replaces every known secret value (each declared one, and each resolved
for a command) with ``[REDACTED:NAME]``. The service applies it at the few places that
record anything — the memory writer, :meth:`taskbox.registry.Registry.add_event` and every
other event, the audit writer — and to the output of a command before it is returned. With
no secrets declared it costs one ``stat`` per record.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import InvalidInput, NotFound

FILE = "secrets.toml"
ENV_PREFIX = "TASKBOX_SECRET_"
MIN_LENGTH = 4  # shorter values would redact ordinary text, and protect nothing
MAX_FILE = 64 * 1024
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(f"secret name {name!r} must be letters, digits and _ (not starting with a digit)")
    return name


def _read_file(path: Path, *, strict: bool) -> dict[str, str]:
    """The ``NAME = "value"`` pairs of a secrets file ({} if absent).

    ``strict`` (used when a value is about to be handed out) refuses a file that is not a
    regular file owned by this user with no group or other permissions.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if not strict:
            return {}
        raise InvalidInput(f"cannot read {path}: {exc.strerror} (it must be a regular file, not a link)") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if strict:
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput(f"{path} is not a regular file")
            if st.st_uid != os.geteuid():
                raise InvalidInput(f"{path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); "
                                   "refusing to read secrets from it")
            if st.st_mode & 0o077:
                raise InvalidInput(f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                                   f"run `chmod 600 {path}`")
        elif not stat.S_ISREG(st.st_mode):
            return {}
        data = fh.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        if not strict:
            return {}
        raise InvalidInput(f"{path} is larger than {MAX_FILE} bytes")
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        if not strict:
            return {}
        raise InvalidInput(f"{path}: invalid TOML: {exc}") from None
    out: dict[str, str] = {}
    for name, value in parsed.items():
        if not isinstance(value, str) or not _NAME.match(name):
            if strict:
                raise InvalidInput(f"{path}: {name!r} must be a NAME = \"value\" line")
            continue
        out[name] = value
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {k[len(ENV_PREFIX):]: v for k, v in environ.items()
            if k.startswith(ENV_PREFIX) and _NAME.match(k[len(ENV_PREFIX):])}


def resolve(home: Path, names: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The values of the secrets ``names``: from ``TASKBOX_SECRET_<NAME>``, else from ``secrets.toml``.

    Raises :class:`NotFound` for a name declared nowhere, :class:`InvalidInput` for a bad
    name, an unsafe secrets file or a value too short to redact.
    """
    wanted = [check_name(n) for n in names]
    if not wanted:
        return {}
    env = _from_env(os.environ if environ is None else environ)
    stored: dict[str, str] | None = None
    out: dict[str, str] = {}
    for name in wanted:
        if name in env:
            value = env[name]
        else:
            if stored is None:
                stored = _read_file(home / FILE, strict=True)
            if name not in stored:
                raise NotFound(f"no secret {name}: set {ENV_PREFIX}{name} in taskbox's environment or add "
                               f"{name} = \"…\" to {home / FILE}", secret=name)
            value = stored[name]
        if len(value) < MIN_LENGTH:
            raise InvalidInput(f"secret {name} is shorter than {MIN_LENGTH} characters; it could not be "
                               "told apart from ordinary text to keep it out of logs", secret=name)
        out[name] = value
    return out


class Redactor:
    """Replaces secret values with ``[REDACTED:NAME]`` in text and in JSON-like data.

    Knows every secret declared for ``home`` (re-read when ``secrets.toml`` changes) and
    every value :meth:`add`-ed by this process. Callable: ``redactor(obj)`` redacts strings,
    and the strings inside dicts, lists and tuples. Safe to share between threads.
    """

    def __init__(self, home: Path | None) -> None:
        self.home = home
        self._lock = threading.Lock()
        self._file_key: tuple[int, int, int] | None = None
        self._declared: dict[str, str] = {}
        self._added: dict[str, str] = {}
        self._pairs: list[tuple[str, str]] = []
        self._refresh(force=True)

    def add(self, values: Mapping[str, str]) -> None:
        """Also redact these values (secrets resolved for a command)."""
        with self._lock:
            self._added.update({k: v for k, v in values.items() if len(v) >= MIN_LENGTH})
            self._rebuild()

    def _refresh(self, force: bool = False) -> None:
        key = None
        if self.home is not None:
            try:
                st = os.stat(self.home / FILE)
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                key = None
        if not force and key == self._file_key:
            return
        with self._lock:
            self._file_key = key
            found = _from_env(os.environ)
            if key is not None and self.home is not None:
                found = {**_read_file(self.home / FILE, strict=False), **found}
            self._declared = {k: v for k, v in found.items() if len(v) >= MIN_LENGTH}
            self._rebuild()

    def _rebuild(self) -> None:
        pairs = {v: k for k, v in {**self._declared, **self._added}.items()}
        self._pairs = sorted(pairs.items(), key=lambda p: -len(p[0]))  # longest first: no half-redacted value

    @property
    def active(self) -> bool:
        self._refresh()
        return bool(self._pairs)

    def longest(self) -> int:
        """The length of the longest secret value (0 with none): a stream cut this far from
        its end never splits one (see taskbox.live_output)."""
        self._refresh()
        pairs = self._pairs
        return len(pairs[0][0]) if pairs else 0

    def straddling(self, value: str, at: int) -> int | None:
        """Where a secret value that straddles index ``at`` of ``value`` starts, if one does
        (cutting ``value`` there would leave part of it on each side)."""
        for secret, _name in self._pairs:
            # Found within [at - len + 1, at + len - 1): it starts before ``at`` and ends after it.
            found = value.find(secret, max(0, at - len(secret) + 1), at + len(secret) - 1)
            if found != -1:
                return found
        return None

    def text(self, value: str) -> str:
        self._refresh()
        return self._text(value, self._pairs)

    @staticmethod
    def _text(value: str, pairs: list[tuple[str, str]]) -> str:
        for secret, name in pairs:
            if secret in value:
                value = value.replace(secret, f"[REDACTED:{name}]")
        return value

    def output(self, value: str) -> str:
        """:meth:`text`, and a value cut off at the end (output truncated mid-secret) too."""
        value = self.text(value)
        for secret, name in self._pairs:
            for k in range(len(secret) - 1, MIN_LENGTH - 1, -1):
                if value.endswith(secret[:k]):
                    return value[:-k] + f"[REDACTED:{name}]"
        return value

    def __call__(self, obj: Any) -> Any:
        self._refresh()
        pairs = self._pairs
        if not pairs:
            return obj
        return self._walk(obj, pairs)

    def _walk(self, obj: Any, pairs: list[tuple[str, str]]) -> Any:
        if isinstance(obj, str):
            return self._text(obj, pairs)
        if isinstance(obj, dict):
            return {self._walk(k, pairs) if isinstance(k, str) else k: self._walk(v, pairs) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._walk(v, pairs) for v in obj)
        return obj
