"""The event catalogue (taskbox.events) names every event the code records, and the docs show it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from taskbox import events
from taskbox.registry import Registry

PACKAGE = Path(__file__).resolve().parent.parent / "taskbox"
RECORDERS = {"add_event", "add_events", "_event"}


def recorded_names() -> dict[str, set[str]]:
    """Literal event names in the code, by file: first argument of the registry's recorders
    (for ``_event``, the second), and ``("kind.name", {...})`` event tuples given to row writes."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if func in RECORDERS and node.args:
                    arg = node.args[1] if func == "_event" and len(node.args) > 1 else node.args[0]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        name = arg.value
            elif (isinstance(node, ast.Tuple) and len(node.elts) == 2 and isinstance(node.elts[0], ast.Constant)
                  and isinstance(node.elts[0].value, str) and isinstance(node.elts[1], ast.Dict)
                  and "." in node.elts[0].value and " " not in node.elts[0].value):
                name = node.elts[0].value
            if name is not None:
                found.setdefault(name, set()).add(path.name)
    return found


def test_every_recorded_event_is_in_the_catalogue() -> None:
    names = recorded_names()
    assert len(names) > 40  # the scan finds the recorders at all
    missing = {n: sorted(f) for n, f in names.items() if n not in events.EVENTS}
    assert not missing, f"events recorded but not catalogued in taskbox/events.py: {missing}"


def test_the_catalogue_has_no_duplicates_and_every_entry_is_documented() -> None:
    assert len(events.EVENTS) == len(events.CATALOGUE)
    docs = (PACKAGE.parent / "docs" / "events.md").read_text()
    for e in events.CATALOGUE:
        assert e.doc.endswith(".") and e.doc[0].isupper(), e.name
        assert f"`{e.name}`" in docs


def test_strict_mode_refuses_an_unknown_type_or_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKBOX_STRICT_EVENTS", "1")
    reg = Registry(tmp_path / "registry.db")
    with pytest.raises(ValueError, match="not in taskbox.events"):
        reg.add_event("made.up", None, {})
    with pytest.raises(ValueError, match="does not name"):
        reg.add_event("task.synced", "t", {"commit": "abc", "surprise": 1})
    assert reg.add_event("task.synced", "t", {"commit": "abc"})
    monkeypatch.setenv("TASKBOX_STRICT_EVENTS", "0")
    assert reg.add_event("made.up", None, {})  # outside tests, an unknown event is still recorded


def test_event_ids_are_monotonic_so_a_reader_resumes_after_n(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db")
    for i in range(5):
        reg.add_event("task.synced", f"t{i}", {"commit": str(i)})
    first = reg.events(limit=2)
    rest = reg.events(after_id=first[-1]["id"])
    ids = [e["id"] for e in first + rest]
    assert ids == sorted(ids) and len(set(ids)) == 5
