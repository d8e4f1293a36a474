"""Built-in plugin: task branch names ``<agent>-<model>/<description-slug>`` (SPEC §4)."""

from __future__ import annotations

import re
import unicodedata

from ..hookspecs import hookimpl

SLUG_MAX = 50


def _clean(text: str, allowed: str) -> str:
    # Fold accents (é -> e) so non-English descriptions keep readable slugs.
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(f"[^{allowed}]+", "-", text.lower())
    text = re.sub(r"-{2,}", "-", text)
    text = re.sub(r"\.{2,}", ".", text)
    return text.strip("-.")


def slugify(text: str, limit: int = SLUG_MAX) -> str:
    """Lowercase ``a-z0-9-`` slug of at most ``limit`` characters, cut at a word boundary."""
    slug = _clean(text, "a-z0-9")
    if len(slug) > limit:
        cut = slug[:limit]
        slug = cut.rsplit("-", 1)[0] if "-" in cut[limit // 2 :] else cut
    return slug.strip("-") or "task"


def agent_part(agent: str, model: str) -> str:
    agent_s = _clean(agent, "a-z0-9") or "agent"
    model_s = _clean(model, "a-z0-9.") or "model"
    if model_s.endswith(".lock"):
        model_s = model_s[: -len(".lock")] or "model"
    return f"{agent_s[:30]}-{model_s[:40]}".strip("-.")


@hookimpl(trylast=True)
def branch_name(agent: str, model: str, description: str) -> str:
    return f"{agent_part(agent, model)}/{slugify(description)}"
