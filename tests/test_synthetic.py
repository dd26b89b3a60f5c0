"""prorec.data.synthetic: deterministic by seed, and it holds both a semantic and a collaborative signal."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from prorec.config import ConfigError, SyntheticConfig
from prorec.data.canonical import load_canonical
from prorec.data.synthetic import generate, write_synthetic

CFG = SyntheticConfig(seed=0, n_users=400, n_items=150, n_categories=8, min_len=5, max_len=10)


def test_same_seed_same_data_other_seed_other_data():
    a, b = generate(CFG), generate(CFG)
    assert a.items == b.items and a.sequences == b.sequences
    c = generate(SyntheticConfig(**{**CFG.__dict__, "seed": 1}))
    assert c.sequences != a.sequences


def test_shape_follows_the_config():
    ds = generate(CFG)
    assert len(ds.items) == CFG.n_items and len(ds.sequences) == CFG.n_users
    lengths = [len(s) for _, s in ds.sequences]
    assert min(lengths) >= CFG.min_len and max(lengths) <= CFG.max_len
    assert all(len(set(s)) == len(s) for _, s in ds.sequences)  # no repeated items within a user
    assert len({it.categories[0][2] + it.categories[0][1] for it in ds.items}) == CFG.n_categories


def test_written_dataset_loads(tmp_path):
    ds = load_canonical(write_synthetic(tmp_path, CFG))
    assert ds.stats() == {"users": 400, "items": 150, "interactions": sum(len(s) for _, s in generate(CFG).sequences),
                          "items_without_title": 0}


def _category(ds):
    return {it.item_id: tuple(it.categories[0]) for it in ds.items}


def _top2_category_share(seqs: list[list[str]], cat: dict) -> float:
    """Mean share of a user's items that lie in that user's two most frequent categories."""
    return float(np.mean([sum(n for _, n in Counter(cat[i] for i in s).most_common(2)) / len(s) for s in seqs]))


def test_semantic_signal_users_concentrate_in_few_categories():
    ds = generate(CFG)
    cat = _category(ds)
    seqs = [s for _, s in ds.sequences]
    # Chance level: the same interactions dealt to users at random (item popularity kept).
    flat = np.random.default_rng(0).permutation([i for s in seqs for i in s])
    cuts = np.cumsum([len(s) for s in seqs])[:-1]
    dealt = [list(part) for part in np.split(flat, cuts)]
    assert _top2_category_share(seqs, cat) > _top2_category_share(dealt, cat) + 0.1
    # Without the hidden transitions every item comes from the user's one or two categories.
    no_cf = generate(SyntheticConfig(**{**CFG.__dict__, "p_transition": 0.0}))
    assert _top2_category_share([s for _, s in no_cf.sequences], _category(no_cf)) == 1.0
    # And the title reveals the category: every title ends with a product noun of its category.
    nouns_by_cat: dict[tuple, set[str]] = {}
    for it in ds.items:
        nouns_by_cat.setdefault(cat[it.item_id], set()).add(it.title.split(" ", 3)[-1])
    for a in nouns_by_cat:
        for b in nouns_by_cat:
            if a != b:
                assert not (nouns_by_cat[a] & nouns_by_cat[b]), (a, b)


def _recurring_transition_share(seqs: list[list[str]]) -> float:
    """Share of consecutive (a, b) transitions whose pair occurs for 3 or more users."""
    users_per_pair: Counter = Counter()
    for s in seqs:
        users_per_pair.update(set(zip(s, s[1:])))
    total = sum(len(s) - 1 for s in seqs)
    return sum(n for n in users_per_pair.values() if n >= 3) / total


def test_collaborative_signal_hidden_transitions_recur_across_users():
    ds = generate(CFG)
    seqs = [s for _, s in ds.sequences]
    real = _recurring_transition_share(seqs)
    # Chance level: the same users, items and categories, each user's order shuffled.
    rng = np.random.default_rng(0)
    shuffled = _recurring_transition_share([list(rng.permutation(s)) for s in seqs])
    assert real > 3 * shuffled, (real, shuffled)
    # The recurring transitions cross categories: the text cannot reveal them.
    cat = _category(ds)
    pairs = Counter(p for s in seqs for p in set(zip(s, s[1:])))
    top = [p for p, _ in pairs.most_common(30)]
    assert sum(cat[a] != cat[b] for a, b in top) >= 20


def test_without_transitions_the_collaborative_signal_disappears():
    no_cf = generate(SyntheticConfig(**{**CFG.__dict__, "p_transition": 0.0}))
    seqs = [s for _, s in no_cf.sequences]
    rng = np.random.default_rng(0)
    shuffled = _recurring_transition_share([list(rng.permutation(s)) for s in seqs])
    assert _recurring_transition_share(seqs) < 1.5 * shuffled + 0.02


def test_small_catalogues_work():
    # Two categories and four items: some items have a single item outside their category.
    for seed in range(5):
        ds = generate(SyntheticConfig(seed=seed, n_users=5, n_items=4, n_categories=2, min_len=3, max_len=4))
        assert len(ds.sequences) == 5


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="min_len"):
        generate(SyntheticConfig(min_len=2))


@pytest.mark.parametrize("kw", [
    {},  # the default
    {"seed": 3, "n_users": 500, "n_items": 150, "n_categories": 5, "p_transition": 0.2},
    {"seed": 1, "n_users": 60, "n_items": 8, "n_categories": 2, "min_len": 3, "max_len": 7},  # pools run dry
    {"seed": 2, "n_users": 30, "n_items": 4, "n_categories": 1, "min_len": 3, "max_len": 4},  # one category
])
def test_the_fast_generator_draws_exactly_what_the_reference_draws(kw):
    from prorec.data.synthetic import generate_reference

    cfg = SyntheticConfig(**kw)
    fast, ref = generate(cfg), generate_reference(cfg)
    assert fast.sequences == ref.sequences
    assert [vars(i) for i in fast.items] == [vars(i) for i in ref.items]
