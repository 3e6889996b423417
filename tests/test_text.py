"""Item and user-context templates."""

from __future__ import annotations

from twostage.config import TextConfig
from twostage.text import render_item, render_user, template_fields


def test_item_template_with_missing_fields():
    template = "{title}. {categories}. {body}"
    assert (
        render_item({"title": "Heat (1995)", "categories": ["Action", "Crime"]}, template)
        == "Heat (1995). Action, Crime."
    )
    assert (
        render_item({"title": "Heat (1995)", "categories": [], "body": "A cop."}, template)
        == "Heat (1995). A cop."
    )
    assert render_item({"title": None, "body": "Only body."}, template) == "Only body."


def test_attrs_are_template_fields():
    item = {"title": "Dr. No (1962)", "attrs": {"tags": ["bond", "spy"]}}
    assert render_item(item, "{title}. Tags: {tags}") == "Dr. No (1962). Tags: bond, spy"
    assert template_fields("{title}. {tags}") == ["title", "tags"]


def test_user_context_newest_first_and_capped():
    history = [{"title": f"M{i}"} for i in range(20)]
    text = render_user(history, TextConfig(history_size=3))
    assert text == "Recently: M0; M1; M2"
