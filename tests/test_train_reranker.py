"""Listwise reranker training: list building, the ListNet formula, one step of learning, end-to-end save."""

from __future__ import annotations

import json

import numpy as np
import pytest

from twostage.errors import ConfigError, InputError, MissingDependencyError
from twostage.train.reranker import (
    RerankList,
    build_loss,
    make_list,
    make_lists,
    ndcg_at_k,
    train_reranker,
)

# Distinct word counts: the texts stay distinguishable to the tiny BERT whatever its tokenizer knows.
LISTS = [
    RerankList(
        "science fiction movie about space",
        [
            "space war science fiction film",
            "a drama",
            "children animation adventure",
            "love story in the city",
        ],
        [2.0, 0.0, 0.0, 1.0],
    ),
    RerankList(
        "cancer study", ["cancer study patients treatment risk", "comedy", "brain blood"], [1.0, 0.0, 0.0]
    ),
]


def _validation_ndcg(reranker) -> float:
    """Mean NDCG@10 of ``reranker`` on LISTS, recomputed as the trainer's evaluator does: all pairs in one
    pass (a tiny model's scores are close enough that another batch layout can reorder them)."""
    flat = reranker.score([(rl.request, d) for rl in LISTS for d in rl.docs])
    return float(np.mean([ndcg_at_k(LISTS[0].labels, flat[:4]), ndcg_at_k(LISTS[1].labels, flat[4:])]))


def _tiny_model(path, seed: int = 0, *, spread: bool = False):
    import torch
    from transformers import set_seed

    from twostage.rerank import load_cross_encoder

    set_seed(seed)
    model, fresh = load_cross_encoder(path, device="cpu", max_length=64)
    assert fresh
    model.eval()  # no dropout: the loss is a deterministic function of the weights
    if spread:
        # A random tiny BERT's features barely vary between inputs, so a fresh head scores every doc alike and
        # any listwise loss sits at log(n). Point the head along the features' main direction of variation
        # (unit spread) so the scores differ by O(1), as a trained head's would.
        feats: list[torch.Tensor] = []
        head = model.model.classifier
        hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach()))
        with torch.no_grad():
            model(model.preprocess([[rl.request, d] for rl in LISTS for d in rl.docs]))
        hook.remove()
        h = torch.cat(feats).double()
        centred = h - h.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        with torch.no_grad():
            head.weight.copy_((direction / (centred @ direction).std()).float().unsqueeze(0))
    return model


def _batch(lists):
    import torch

    inputs = [[rl.request for rl in lists], [rl.docs for rl in lists]]
    labels = [torch.tensor(rl.labels) for rl in lists]
    return inputs, labels


def test_make_list_inserts_positives_in_place_of_lowest_negatives():
    cands = [(f"c{i}", f"text {i}") for i in range(6)]
    rl = make_list(
        "q", cands, {"c1": 1.0, "p9": 2.0, "p8": 1.0}, list_size=4, item_texts={"p9": "nine", "p8": "eight"}
    )
    # Window c0..c3; the two missing positives (higher grade first) replace the two lowest negatives c3, c2.
    assert rl.docs == ["text 0", "text 1", "nine", "eight"]
    assert rl.labels == [0.0, 1.0, 2.0, 1.0]


def test_make_list_truncates_and_does_not_pad():
    cands = [(f"c{i}", f"text {i}") for i in range(10)]
    assert len(make_list("q", cands, {"c0": 1.0}, list_size=5).docs) == 5
    short = make_list("q", cands[:3], {"c2": 1.0}, list_size=8)
    assert short.docs == ["text 0", "text 1", "text 2"] and short.labels == [0.0, 0.0, 1.0]
    with pytest.raises(InputError, match="item_texts"):
        make_list("q", cands, {"zz": 1.0}, list_size=5)


def test_make_lists_skips_requests_without_positives():
    cands = [("a", "A"), ("b", "B")]
    lists = make_lists([("q1", cands, {"a": 1.0}), ("q2", cands, {}), ("q3", cands, {"b": 0.0})], list_size=2)
    assert [rl.request for rl in lists] == ["q1"]


def test_ndcg_at_k_hand_example():
    # Sorted by score: labels [0, 2, 1]. Linear gain (as trec_eval and our evaluation):
    # DCG = 0 + 2/log2(3) + 1/log2(4); IDCG = 2/log2(2) + 1/log2(3).
    expected = (2 / np.log2(3) + 1 / 2) / (2 + 1 / np.log2(3))
    assert ndcg_at_k([0, 2, 1], [3.0, 2.0, 1.0]) == pytest.approx(expected)
    assert ndcg_at_k([0, 0], [1.0, 2.0]) == 0.0
    assert ndcg_at_k([1, 0, 0], [0.0, 0.0, 0.0]) == 1.0  # ties keep list order


def test_listnet_loss_matches_hand_computed_formula(tiny_bert_path):
    import torch

    model = _tiny_model(tiny_bert_path, spread=True)
    loss = build_loss("listnet", model, mini_batch_size=0)  # all pairs in one forward pass
    inputs, labels = _batch(LISTS)
    pairs = [[rl.request, d] for rl in LISTS for d in rl.docs]
    with torch.no_grad():
        value = float(loss(inputs, labels))
        flat = model(model.preprocess(pairs))["scores"].view(-1).double().numpy()  # the same single pass
    scores = [flat[:4], flat[4:]]
    assert np.ptp(scores[0]) > 0.5  # scores really differ, so the test can tell target distributions apart

    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        return x - x.max() - np.log(np.exp(x - x.max()).sum())

    # sentence-transformers' ListNet targets are softmax(labels), NOT labels / sum(labels): with targets
    # p = softmax(y) the loss is L = -sum_i p_i log softmax(s)_i, i.e. the "-sum y_i log softmax(s)_i" of the
    # ListNet paper with y replaced by its top-one probability. Lists shorter than the batch's longest are
    # padded inside the loss with zero target mass, so each list contributes only its own docs; the batch
    # loss is the mean over lists.
    per_list = [
        -(np.exp(log_softmax(rl.labels)) * log_softmax(s)).sum() for rl, s in zip(LISTS, scores, strict=True)
    ]
    assert value == pytest.approx(float(np.mean(per_list)), rel=1e-5, abs=1e-6)
    # The softmax(y) reading matters: the linear normalisation gives another number for graded labels.
    linear = [
        -(np.asarray(rl.labels) / sum(rl.labels) * log_softmax(s)).sum()
        for rl, s in zip(LISTS, scores, strict=True)
    ]
    assert abs(float(np.mean(linear)) - value) > 1e-3


@pytest.mark.parametrize("name", ["listnet", "lambdaloss", "listmle"])
def test_one_step_lowers_listwise_loss_and_changes_weights(tiny_bert_path, name):
    import torch

    model = _tiny_model(tiny_bert_path, spread=True)
    loss = build_loss(name, model)
    inputs, labels = _batch(LISTS)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    value = loss(inputs, labels)
    value.backward()
    optimizer.step()
    with torch.no_grad():
        after_value = float(loss(inputs, labels))
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any("encoder" in k for k in changed) and any("embeddings" in k for k in changed)
    assert after_value < value.item() - 1e-4  # drops are ~1e-3 at this step size


def test_unknown_loss_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'listnet'") as err:
        train_reranker(LISTS, output_dir="never-written", loss="listnett")
    assert err.value.key == "reranker.loss" and err.value.suggestion == "listnet"
    with pytest.raises(ConfigError, match="lambdaloss"):
        build_loss("lamdaloss", None)  # type: ignore[arg-type]


def test_no_lists_and_bad_options_raise(tmp_path):
    with pytest.raises(InputError):
        train_reranker([], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        train_reranker(LISTS, output_dir=tmp_path, warmup_ratio=1.0)


def test_lora_without_peft_raises(tmp_path):
    pytest.importorskip("torch")
    try:
        import peft  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="lora"):
            train_reranker(LISTS, output_dir=tmp_path, lora=True)
    else:
        pytest.skip("peft is installed")


def test_train_end_to_end_writes_model_and_training_json(tiny_bert_path, tmp_path, monkeypatch, capsys):
    import torch
    from sentence_transformers import CrossEncoder

    from twostage.rerank import Reranker

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "reranker"
    result = train_reranker(
        LISTS * 3,
        base_model=tiny_bert_path,
        output_dir=out,
        val_lists=LISTS,
        epochs=2,
        batch_size=2,
        learning_rate=1e-3,
        max_length=64,
        eval_steps=1,
        patience=2,
        device="cpu",
    )
    assert list(cwd.iterdir()) == []  # nothing written into the working directory
    assert capsys.readouterr().out == ""  # the library never prints (no trainer log dicts on stdout)
    record = json.loads((out / "training.json").read_text())
    assert record["loss"] == "listnet" and record["train_lists"] == 6 and record["val_lists"] == 2
    assert 0.0 < record["metrics"]["ndcg@10"] <= 1.0
    assert record["best_metric"] == pytest.approx(record["metrics"]["ndcg@10"])
    assert result.best_metric == record["best_metric"] and result.model_path == out
    assert 1 <= result.steps <= 6 and result.seconds > 0
    # The saved model reloads with raw-logit output and a trained (not fresh) head.
    model = CrossEncoder(str(out))
    assert isinstance(model.activation_fn, torch.nn.Identity)
    rr = Reranker(out, device="cpu", max_length=64)
    assert not rr.fresh_head
    # Its validation NDCG@10, recomputed here, is the one recorded.
    assert _validation_ndcg(rr) == pytest.approx(record["metrics"]["ndcg@10"], abs=1e-6)
    base = _tiny_model(tiny_bert_path)
    trained = dict(rr.model.named_parameters())
    assert any(not torch.equal(p, trained[k]) for k, p in base.named_parameters() if k in trained)


def test_lora_training_changes_weights_and_saves_a_plain_model(tiny_bert_path, tmp_path):
    pytest.importorskip("peft")
    import torch
    from sentence_transformers import CrossEncoder

    before = CrossEncoder(str(tiny_bert_path), num_labels=1, device="cpu")
    q_before = before.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    ffn_before = before.model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    result = train_reranker(
        LISTS * 4,
        output_dir=tmp_path / "lora",
        base_model=str(tiny_bert_path),
        val_lists=LISTS,  # the best checkpoint is reloaded with its adapters before they are merged
        lora=True,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        seed=0,
    )
    after = CrossEncoder(str(result.model_path), device="cpu")
    # the adapter was merged: a plain BERT checkpoint whose attention weights moved
    assert not any("lora" in name for name, _ in after.model.named_parameters())
    q_after = after.model.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.allclose(q_before, q_after)
    # only the adapted projections (and the head) learn: the feed-forward weights are the base's
    assert torch.equal(ffn_before, after.model.bert.encoder.layer[0].intermediate.dense.weight)
    # the fresh head was trained with the adapters, not left at its random start (same seed, same start)
    from transformers import set_seed

    from twostage.rerank import load_cross_encoder

    set_seed(0)
    start, _ = load_cross_encoder(str(tiny_bert_path), device="cpu")
    assert not torch.allclose(start.model.classifier.weight, after.model.classifier.weight)


@pytest.mark.parametrize("window", [1, 3])
def test_training_requests_label_the_next_window_of_events(tmp_path, window):
    from twostage.config import from_dict
    from twostage.requests import Catalogue
    from twostage.store import Store
    from twostage.train.examples import reranker_requests

    (tmp_path / "items.csv").write_text("item_id,title\n" + "".join(f"{i},Film {i}\n" for i in range(8)))
    # one user: items 0..5, then 2 again (a re-watch is never a positive); the last two are held out
    order = [0, 1, 2, 3, 4, 2, 6, 7]
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,ts,value\n" + "".join(f"u,{i},{t},{4 + t % 2}\n" for t, i in enumerate(order))
    )
    store = Store(tmp_path / "p.duckdb")
    store.ingest(tmp_path / "items.csv", "items")
    store.ingest(tmp_path / "events.csv", "events", event="rating")
    config = from_dict({"reranker": {"label_window": window}})
    store.split(config.split, config.relevance)
    catalogue = Catalogue.from_store(store, config.text.item_template)
    labelled = reranker_requests(store, catalogue, config, split="leave-last-out", max_requests=40, seed=0)
    assert labelled
    for x in labelled:
        t = int(x.request.request_id.split("@")[1])
        history = {str(i) for i in order[:t]}
        expected = [str(i) for i in order[:6][t : t + window] if str(i) not in history]
        assert sorted(x.positives) == sorted(set(expected))
        assert set(x.positives).isdisjoint(x.request.exclude) and x.user_id == "u"
        # the history and the user's later training items are never candidates (so never negatives)
        assert x.request.exclude == {str(i) for i in order[:6]} - set(x.positives)


def test_sampled_negatives_come_from_the_whole_depth_and_keep_the_positives():
    import random

    cands = [(f"c{n}", f"text {n}") for n in range(50)]
    rng = random.Random(0)
    drawn = set()
    for _ in range(20):
        rl = make_list("q", cands, {"c30": 2.0, "c3": 1.0}, list_size=8, rng=rng)
        assert len(rl.docs) == 8 and sorted(rl.labels)[-2:] == [1.0, 2.0]
        drawn |= {d for d, y in zip(rl.docs, rl.labels, strict=True) if y == 0}
    assert any(int(d.split()[1]) >= 8 for d in drawn)  # top-only would never go past the first 8
    top = make_list("q", cands, {"c30": 2.0}, list_size=8)
    assert top.docs[:7] == [f"text {n}" for n in range(7)]
    lists = make_lists([("q", cands, {"c30": 1.0})] * 2, list_size=8, sample_seed=1)
    assert lists == make_lists([("q", cands, {"c30": 1.0})] * 2, list_size=8, sample_seed=1)


def test_a_fresh_head_is_announced_once_in_our_words(tiny_bert_path, tmp_path, capfd, caplog):
    import logging

    from twostage.rerank import load_cross_encoder

    with caplog.at_level(logging.INFO):
        # for serving: one warning of ours; the libraries' conversion notice and LOAD REPORT are not shown
        load_cross_encoder(str(tiny_bert_path), device="cpu")
        err = capfd.readouterr().err
        assert "LOAD REPORT" not in err and "Converting" not in err
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 1 and "UNTRAINED" in warned[0]
        caplog.clear()
        # for training the fresh head is the point: no warning at all
        train_reranker(LISTS, output_dir=tmp_path / "m", base_model=str(tiny_bert_path), seed=0)
        err = capfd.readouterr().err
        assert "LOAD REPORT" not in err and "Converting" not in err
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # the libraries' own levels are back as they were
    assert logging.getLogger("transformers").getEffectiveLevel() <= logging.WARNING
    # also when two loads overlap (threads, two engines): the last to finish restores them
    from twostage.rerank import _expected_fresh_head_notices_silenced

    library = logging.getLogger("sentence_transformers")
    level = library.level
    first, second = _expected_fresh_head_notices_silenced(), _expected_fresh_head_notices_silenced()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert library.level == logging.ERROR  # the second load is still running
    second.__exit__(None, None, None)
    assert library.level == level


def test_lora_with_early_stopping_saves_the_best_evaluated_weights(tiny_bert_path, tmp_path, caplog):
    import logging

    from twostage.rerank import Reranker

    pytest.importorskip("peft")
    with caplog.at_level(logging.WARNING):
        result = train_reranker(
            LISTS * 4,
            output_dir=tmp_path / "lora",
            base_model=str(tiny_bert_path),
            val_lists=LISTS,
            lora=True,
            epochs=6,
            learning_rate=5e-2,
            warmup_ratio=0.0,
            eval_steps=1,
            patience=3,
            device="cpu",
            seed=0,
        )
    # no failed best-checkpoint reload (it used to restore the head alone, leaving the adapters at the end)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    record = json.loads((tmp_path / "lora" / "training.json").read_text())
    assert record["best_metric"] == pytest.approx(record["metrics"]["ndcg@10"])
    # the saved (merged) model is the one that scored the recorded best on validation
    rr = Reranker(tmp_path / "lora", device="cpu", max_length=256)
    assert _validation_ndcg(rr) == pytest.approx(result.best_metric, abs=1e-6)


def test_pair_length_is_sized_from_the_data_within_its_bounds(tiny_bert_path):
    from transformers import AutoTokenizer

    from twostage.train.reranker import LENGTH_FLOOR, pair_length

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_path))
    short = [RerankList("heat", ["heat movie", "toy story"], [1.0, 0.0])] * 10
    assert pair_length(tokenizer, short) == LENGTH_FLOOR  # a few tokens: the floor
    words = "space war love heat casino toy story night day city".split()
    long_docs = [" ".join(words[(n + k) % 10] for k in range(20 + n * 10)) for n in range(20)]
    lists = [RerankList("space war", long_docs[n : n + 2], [1.0, 0.0]) for n in range(0, 20, 2)]
    lengths = sorted(len(tokenizer("space war", d)["input_ids"]) for d in long_docs)
    got = pair_length(tokenizer, lists)
    assert got % 16 == 0 and got >= lengths[int(0.95 * (len(lengths) - 1))] and got - 16 < max(lengths)
    assert pair_length(tokenizer, lists, limit=96) == 96
    assert pair_length(tokenizer, short, limit=32) == 32  # a model with fewer positions than the floor
