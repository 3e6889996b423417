"""Requests as text: held-out users see only their history before the cut-off; queries their text; items
render through templates whose fields are checked."""

from __future__ import annotations

import pytest

from twostage.config import RelevanceConfig, SplitConfig, TextConfig
from twostage.errors import ConfigError, NotFoundError
from twostage.requests import Catalogue, split_requests, user_text
from twostage.store import Store

ITEMS = "item_id,title,genres\n1,Heat (1995),Action|Crime\n2,Casino (1995),Crime\n3,Toy Story (1995),Animation\n4,Up (2009),Animation\n"
# u1 watches 1, 2, 3, 4 in that order; leave-last-out holds out 4 (test) and 3 (valid)
EVENTS = "user_id,item_id,ts\nu1,1,100\nu1,2,200\nu1,3,300\nu1,4,400\nu2,2,100\nu2,1,150\nu2,4,160\n"


@pytest.fixture
def store(tmp_path) -> Store:
    (tmp_path / "items.csv").write_text(ITEMS)
    (tmp_path / "events.csv").write_text(EVENTS)
    store = Store(tmp_path / "p.duckdb")
    store.ingest(tmp_path / "items.csv", "items", mapping={"categories": "genres"})
    store.ingest(tmp_path / "events.csv", "events")
    store.split(SplitConfig(min_events=3), RelevanceConfig())
    return store


def test_held_out_users_see_only_their_history_before_the_cut_off(store):
    catalogue = Catalogue.from_store(store, "{title}")
    test = {
        r.request_id: r
        for r in split_requests(store, catalogue, TextConfig(), split="leave-last-out", part="test")
    }
    valid = {
        r.request_id: r
        for r in split_requests(store, catalogue, TextConfig(), split="leave-last-out", part="valid")
    }
    assert test["u1"].history == ("3", "2", "1") and valid["u1"].history == ("2", "1")
    assert test["u1"].exclude == {"1", "2", "3"}  # the full-ranking protocol: seen items are not candidates
    assert test["u1"].text == "Recently: Toy Story (1995); Casino (1995); Heat (1995)"
    assert "4" not in test["u1"].text and "4" not in test["u1"].history  # the held-out item never leaks
    kept = split_requests(
        store, catalogue, TextConfig(), split="leave-last-out", part="test", exclude_seen=False
    )
    assert all(not r.exclude for r in kept)
    first = split_requests(
        store, catalogue, TextConfig(), split="leave-last-out", part="test", max_requests=1
    )
    assert [r.request_id for r in first] == ["u1"]


def test_a_missing_part_names_the_parts_there_are(store):
    catalogue = Catalogue.from_store(store, "{title}")
    with pytest.raises(NotFoundError, match=r"no part 'dev' \(parts: test, valid\)"):
        split_requests(store, catalogue, TextConfig(), split="leave-last-out", part="dev")


def test_user_text_keeps_the_newest_history_size_items():
    catalogue = Catalogue([{"item_id": str(i), "title": f"Film {i}"} for i in range(5)], "{title}")
    config = TextConfig(history_size=2, user_template="Seen: {history}", history_separator=" | ")
    assert user_text(["4", "3", "2"], catalogue, config) == "Seen: Film 4 | Film 3"
    assert user_text(["unknown", "1"], catalogue, config) == "Seen: Film 1"


def test_templates_render_fields_and_refuse_unknown_ones_with_a_suggestion():
    catalogue = Catalogue(
        [{"item_id": "1", "title": "Heat", "categories": ["Action", "Crime"], "attrs": {"year": 1995}}],
        "{title} ({year}). {categories}",
    )
    assert catalogue.text("1") == "Heat (1995). Action, Crime"
    assert catalogue.title("1") == "Heat" and catalogue.title("missing") == "missing"
    with pytest.raises(ConfigError, match=r"text.item_template: no item has the field \{yeer\}.*'year'"):
        catalogue.check_templates({"text.item_template": "{title} {yeer}"})


def test_no_requests_asked_is_an_empty_list_of_an_existing_part(store):
    catalogue = Catalogue.from_store(store, "{title}")
    assert (
        split_requests(store, catalogue, TextConfig(), split="leave-last-out", part="valid", max_requests=0)
        == []
    )
    with pytest.raises(NotFoundError, match="no part 'dev'"):
        split_requests(store, catalogue, TextConfig(), split="leave-last-out", part="dev", max_requests=0)
