"""A deterministic synthetic dataset in the canonical format: the project's default and test fixture.

Two signals drive the user sequences:
- semantic: each user prefers one or two categories, and an item's text (its category path and
  product noun) reveals its category;
- collaborative: every item has hidden complements in *other* categories (an eyeliner is bought
  after a particular shampoo), which no text reveals.
So a model that fuses both modalities can beat either one alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from prorec.config import SyntheticConfig
from prorec.data.canonical import Dataset, Item, write_canonical

# (top-level category, sub-category, product nouns)
_CATEGORIES = [
    ("Makeup", "Lips", ["Lipstick", "Lip Gloss", "Lip Liner"]),
    ("Makeup", "Eyes", ["Mascara", "Eyeliner", "Eyeshadow Palette"]),
    ("Makeup", "Face", ["Foundation", "Concealer", "Blush"]),
    ("Makeup", "Nails", ["Nail Polish", "Top Coat", "Nail Polish Remover"]),
    ("Hair Care", "Shampoos", ["Shampoo", "Clarifying Shampoo", "Dry Shampoo"]),
    ("Hair Care", "Conditioners", ["Conditioner", "Leave-In Conditioner", "Hair Mask"]),
    ("Hair Care", "Styling Products", ["Hair Spray", "Styling Gel", "Hair Mousse"]),
    ("Skin Care", "Face", ["Face Moisturizer", "Facial Cleanser", "Serum"]),
    ("Skin Care", "Sun", ["Sunscreen", "After Sun Gel", "Tanning Lotion"]),
    ("Skin Care", "Body", ["Body Lotion", "Body Wash", "Body Scrub"]),
    ("Fragrance", "Women's", ["Eau de Parfum", "Body Mist", "Perfume Oil"]),
    ("Tools & Accessories", "Brushes", ["Makeup Brush Set", "Blending Sponge", "Kabuki Brush"]),
    ("Fragrance", "Men's", ["Cologne", "Aftershave", "Eau de Toilette"]),
    ("Tools & Accessories", "Hair Tools", ["Hair Dryer", "Flat Iron", "Curling Iron"]),
    ("Skin Care", "Eyes", ["Eye Cream", "Eye Gel", "Under Eye Patches"]),
    ("Bath & Body", "Bath", ["Bath Bomb", "Bubble Bath", "Bath Salts"]),
]
_BRANDS = ["Lumina", "Verde", "Aurelle", "Northfield", "Solace", "Kiyo", "Bellamar", "Onyx & Rose",
           "Petalis", "Clearwater", "Maison Lys", "Urbanglow", "Tern", "Halcyon", "Oakmere", "Vivra"]
_ATTRIBUTES = ["Matte", "Hydrating", "Organic", "Long-Lasting", "Volumizing", "Sensitive", "Travel Size",
               "Vegan", "Fragrance-Free", "Deluxe", "Waterproof", "Nourishing", "Classic", "Ultra Light",
               "Radiant", "Professional"]


def _items(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[list[Item], np.ndarray, int]:
    """Items with their titles, and each item's category (the first draws of the stream)."""
    n_cat = min(cfg.n_categories, len(_CATEGORIES))
    cats = _CATEGORIES[:n_cat]
    item_cat = np.concatenate([np.arange(n_cat), rng.integers(0, n_cat, cfg.n_items - n_cat)])
    rng.shuffle(item_cat)
    items: list[Item] = []
    for i, c in enumerate(item_cat):
        top, sub, nouns = cats[c]
        noun = nouns[rng.integers(len(nouns))]
        attrs = rng.choice(len(_ATTRIBUTES), size=2, replace=False)
        brand = _BRANDS[rng.integers(len(_BRANDS))]
        title = f"{brand} {_ATTRIBUTES[attrs[0]]} {_ATTRIBUTES[attrs[1]]} {noun}"
        items.append(Item(item_id=f"S{i:06d}", title=title, categories=[["Beauty", top, sub]],
                          keywords=title.lower()))
    return items, item_cat, n_cat


def _dataset(cfg: SyntheticConfig, rng: np.random.Generator, items: list[Item], n_cat: int, complements: np.ndarray,
             from_categories: Callable[[np.ndarray, set[int]], int]) -> Dataset:
    """The users (the last draws of the stream): preferred categories, a length, then items that follow
    a hidden complement with probability p_transition or are drawn from the preferred categories."""
    sequences: list[tuple[str, list[str]]] = []
    for u in range(cfg.n_users):
        n_pref = 1 + int(rng.random() < 0.5)
        pref = rng.choice(n_cat, size=min(n_pref, n_cat), replace=False)
        length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        length = min(length, cfg.n_items)
        seen: set[int] = set()
        seq: list[int] = []
        cur = from_categories(pref, seen)
        while True:
            seq.append(cur)
            seen.add(cur)
            if len(seq) == length:
                break
            nxt = [int(c) for c in complements[cur] if int(c) not in seen]
            cur = nxt[int(rng.integers(len(nxt)))] if nxt and rng.random() < cfg.p_transition else from_categories(pref, seen)
        sequences.append((f"U{u:06d}", [items[i].item_id for i in seq]))
    return Dataset(items=items, sequences=sequences, source=f"synthetic(seed={cfg.seed})")



def generate(cfg: SyntheticConfig | None = None) -> Dataset:
    """The synthetic dataset. Draw for draw the process of `generate_reference`, at O(1) work a draw
    (plus O(log n_items) searches), so that it scales to a million items (benchmarks/scale.py):
    - a complement is drawn from a per-category table of the items outside the category, built once;
    - a popularity-weighted draw from the user's categories, minus what she has seen, searches the
      categories' cumulative popularity once per seen item in range instead of renormalising the pool.
    """
    cfg = cfg or SyntheticConfig()
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    items, item_cat, n_cat = _items(cfg, rng)
    n = cfg.n_items
    by_cat = [np.flatnonzero(item_cat == c) for c in range(n_cat)]
    rank_in_cat = np.empty(n, dtype=np.int64)
    for members in by_cat:
        rank_in_cat[members] = np.arange(len(members))
    pop = rng.pareto(1.5, n) + 1.0
    cum = [np.cumsum(pop[members]) for members in by_cat]  # cumulative popularity inside each category

    complements = np.empty((n, 2), dtype=np.int64)
    outside = [np.flatnonzero(item_cat != c) for c in range(n_cat)]
    for i in range(n):
        others = outside[item_cat[i]]
        if len(others) < 2:  # one category, or all but one item in this one: any other item
            others = np.delete(np.arange(n), i)
        complements[i] = rng.choice(others, size=2, replace=False)

    def from_categories(pref: np.ndarray, seen: set[int]) -> int:
        # The pool is the preferred categories' items in that order; the reference draws
        # searchsorted(cumsum(w), u) over the pool without the seen items. Here the seen items in the
        # pool are skipped by adding their weight to the threshold as the search passes them.
        sizes = [len(by_cat[c]) for c in pref]
        starts = np.cumsum([0] + sizes[:-1])
        totals = [cum[c][-1] for c in pref]
        seen_pos = sorted((int(starts[k]) + int(rank_in_cat[s]), pop[s])
                          for s in seen for k, c in enumerate(pref) if item_cat[s] == c)
        if len(seen_pos) == sum(sizes):  # every preferred item seen: the reference's fallback
            rest = np.array([p for p in range(n) if p not in seen])
            return int(rng.choice(rest, p=pop[rest] / pop[rest].sum()))

        def position(x: float) -> int:  # first pool position whose cumulative weight exceeds x
            for k, c in enumerate(pref):
                if x < totals[k] or k == len(pref) - 1:
                    return int(starts[k]) + min(int(np.searchsorted(cum[c], x, side="right")), sizes[k] - 1)
                x -= totals[k]
            raise AssertionError

        x = rng.random() * (sum(totals) - sum(w for _, w in seen_pos))
        j = position(x)
        for p, w in seen_pos:
            if p > j:
                break
            x += w
            j = position(x)
        k = int(np.searchsorted(starts, j, side="right")) - 1
        return int(by_cat[pref[k]][j - starts[k]])

    return _dataset(cfg, rng, items, n_cat, complements, from_categories)


def generate_reference(cfg: SyntheticConfig | None = None) -> Dataset:
    """The literal generator: O(n_items) work for every item and every draw, so only for small
    catalogues. `generate` is the same process, draw for draw, at O(1) a draw (tests check they agree)."""
    cfg = cfg or SyntheticConfig()
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    items, item_cat, n_cat = _items(cfg, rng)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(n_cat)]
    # Zipf-like popularity inside a category.
    pop = rng.pareto(1.5, cfg.n_items) + 1.0

    # Hidden complements: two items from other categories, chosen at random.
    complements = np.empty((cfg.n_items, 2), dtype=np.int64)
    for i in range(cfg.n_items):
        others = np.flatnonzero(item_cat != item_cat[i])
        if len(others) < 2:  # one category, or all but one item in this one: any other item
            others = np.delete(np.arange(cfg.n_items), i)
        complements[i] = rng.choice(others, size=2, replace=False)

    def from_categories(pref: np.ndarray, seen: set[int]) -> int:
        pool = np.concatenate([by_cat[c] for c in pref])
        pool = np.array([p for p in pool if p not in seen]) if len(seen) else pool
        if len(pool) == 0:
            pool = np.array([p for p in range(cfg.n_items) if p not in seen])
        w = pop[pool] / pop[pool].sum()
        return int(rng.choice(pool, p=w))

    return _dataset(cfg, rng, items, n_cat, complements, from_categories)


def write_synthetic(out_dir: str | Path, cfg: SyntheticConfig | None = None) -> Path:
    """Generate the dataset and write it in the canonical format."""
    return write_canonical(generate(cfg), out_dir)
