"""Built-in plugin: task branch names ``<agent>-<model>/<description-slug>`` (SPEC §4)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..models import clean_name as _clean
from ..models import slugify


def agent_part(agent: str, model: str) -> str:
    agent_s = _clean(agent, "a-z0-9") or "agent"
    model_s = _clean(model, "a-z0-9.") or "model"
    if model_s.endswith(".lock"):
        model_s = model_s[: -len(".lock")] or "model"
    return f"{agent_s[:30]}-{model_s[:40]}".strip("-.")


@hookimpl(trylast=True)
def branch_name(agent: str, model: str, description: str) -> str:
    return f"{agent_part(agent, model)}/{slugify(description)}"
