"""Typed service results: attributes for code, to_dict() for adapters, read-only mapping access."""

from __future__ import annotations

import json

import pytest

from taskbox.output import to_json
from taskbox.results import Completed, Detached, Synced, plain


def test_results_are_typed_and_render_as_plain_json() -> None:
    res = Completed("t1", "agent/t1", "abc", None, False, "cp-1", "completed")
    assert res.branch == "agent/t1" and res["final_checkpoint_id"] == "cp-1" and "status" in res
    assert res.get("missing", 7) == 7
    with pytest.raises(KeyError):
        res["missing"]
    assert json.loads(to_json({"done": res}))["done"] == res.to_dict()
    assert {**Synced("t1", "b", "c1", "c0")} == {"task_id": "t1", "branch": "b", "commit": "c1", "new_commit": "c0"}
    det = Detached("t1", "s1", True, "c1", "b")
    assert det.to_dict()["remaining_sessions"] == [] and "success" not in det
    assert plain(det) == det.to_dict() and plain(3.5) == "3.5"
