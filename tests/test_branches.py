"""Branch naming rules (SPEC §4): pure logic plus git's own ref-format check."""

from __future__ import annotations

import subprocess

import pytest

from taskbox.default_plugins.branch import branch_name, slugify


@pytest.mark.parametrize(
    ("agent", "model", "description", "expected"),
    [
        ("sisyphus", "claude-opus-4.5", "Add OAuth login", "sisyphus-claude-opus-4.5/add-oauth-login"),
        ("Codex", "GPT-5", "Fix: the ~^:? [bug] in ..lock", "codex-gpt-5/fix-the-bug-in-lock"),
        ("a b", "m..x.lock", "../../etc/passwd", "a-b-m.x/etc-passwd"),
        ("agent", "model", "!!!", "agent-model/task"),
        ("agent", "m", "Ünïcödé façade — café", "agent-m/unicode-facade-cafe"),
    ],
)
def test_branch_names(agent: str, model: str, description: str, expected: str) -> None:
    name = branch_name(agent=agent, model=model, description=description)
    assert name == expected
    assert subprocess.run(["git", "check-ref-format", "--branch", name]).returncode == 0


def test_slug_is_at_most_50_chars_and_cut_at_a_word() -> None:
    slug = slugify("implement the complete user authentication flow with oauth providers and sessions")
    assert len(slug) <= 50 and not slug.endswith("-")
    assert slug == "implement-the-complete-user-authentication-flow"
