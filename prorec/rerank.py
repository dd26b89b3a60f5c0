"""Rerank the generator's beam with other signals the pipeline already has (not in the paper).

The beam search returns each user's `eval.beam_size` most likely items under the generator, with
their log-probabilities log p_G(i | u). The reranked order is

    log p_G(i | u) + w_din * s_D(u, i) + w_sem * a_S(u, i) + w_tr * t(u, i)    over the beam's candidates,

with three signals, each on when its weight (`eval.rerank_weight`, `eval.rerank_semantic_weight`,
`eval.rerank_transition_weight`) is > 0; all 0 is the generator alone, the paper's inference:

- s_D, Stage I's DIN: the logit of DIN's softmax over the catalogue. With the first term alone the
  order is the product of the two models' distributions restricted to the beam (DIN's normaliser is
  the same for every candidate of a user, so it drops out).
- a_S, semantic affinity: the largest cosine between the candidate's semantic embedding (the frozen
  encoder's, embeddings/semantic.parquet) and those of the items in the user's history.
- t, transitions: log(1 + n), n = how many training rows have the user's last item directly
  followed by the candidate (the train split only, so validation and test targets are never counted).
- cold items (`eval.rerank_cold_weight`, `eval.rerank_cold_semantic_weight`): for a candidate that
  `prorec items add` appended after training (the run's manifest counts them), a lift w_cold plus
  w_cold_sem * a_S(u, i). Its collaborative terms know nothing of it (no transitions; DIN and generator rows mapped
  from its text), so without them the beam's order puts a new item below the items users bought.
- cold candidates (`eval.rerank_cold_candidates` = m): the beam finds few of the added items (on
  Beauty, a new item that is the validation target is in the beam of 200 for 18% of its users), so
  the m added items with the highest a_S(u, i) that the beam did not return join the candidates,
  scored at the user's lowest beam log-probability: only the cold-item terms lift them. Cost
  O(added items * history) a user, in chunks (`ColdCandidates`; a catalogue that adds millions of
  items would want an index instead).

The list is still drawn from the full catalogue by the beam search; the signals only reorder it.
Scoring 200 candidates costs O(200 * T) per user for each signal, small beside the beam search.
Why it helps, measured on Beauty: benchmarks/results/beauty_rerank.md.

Stage I writes the DIN it trained to `stage1/din.safetensors` with its config beside it
(`prorec.models.din.save_din`); `prorec.models.din.load_din` rebuilds it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from prorec.artifacts import items_added, read_item_table
from prorec.beam import NEG_INF, BeamResult
from prorec.config import RERANK_FIELDS, EvalConfig
from prorec.data.history import realign_right
from prorec.data.splits import read_split
from prorec.models.din import DIN, DIN_FILE, load_din


class SemanticAffinity:
    """a_S(u, i) = max over u's history h of cos(e_h, e_i), e = the frozen encoder's item embeddings."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = torch.nn.functional.normalize(table.float(), dim=1)  # [N + 1, D], row 0 = padding

    @classmethod
    def from_parquet(cls, path: str | Path, n_items: int, weight: str = "eval.rerank_semantic_weight") -> "SemanticAffinity":
        """`weight`: the setting that asked for it, named in the error."""
        try:
            return cls(torch.from_numpy(read_item_table(path, n_items, "semantic embeddings")))
        except ValueError as e:
            raise ValueError(f"{e} (or set {weight}=0)") from None

    def to(self, device: torch.device | str) -> "SemanticAffinity":
        self.table = self.table.to(device)
        return self

    def __call__(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history [U, S] (0 = padding), items [U, W] (-1 = empty) -> [U, W]."""
        h = history.to(self.table.device)
        sim = self.table[items.clamp(min=0).to(h.device)] @ self.table[h].transpose(1, 2)  # [U, W, S]
        return sim.masked_fill((h == 0)[:, None, :], -1.0).amax(dim=2)


class Transitions:
    """t(u, i) = log(1 + n(last item of u -> i)), counted over the training rows (history, target)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, n_items: int) -> None:
        self.keys, self.values, self.n_items = keys, values, n_items  # sorted pair keys a * (N + 1) + b

    @classmethod
    def from_rows(cls, last: np.ndarray, target: np.ndarray, n_items: int) -> "Transitions":
        keys, counts = np.unique(last.astype(np.int64) * (n_items + 1) + target.astype(np.int64), return_counts=True)
        return cls(torch.from_numpy(keys), torch.from_numpy(np.log1p(counts).astype(np.float32)), n_items)

    @classmethod
    def from_split(cls, table: pa.Table, n_items: int) -> "Transitions":
        """From a split table (history list<int>, target): each row's last history item -> its target."""
        hist = table.column("history").combine_chunks()
        ends = hist.offsets.to_numpy()[1:].astype(np.int64) - 1
        last = hist.values.to_numpy(zero_copy_only=False)[ends]
        return cls.from_rows(last, table.column("target").to_numpy(), n_items)

    def to(self, device: torch.device | str) -> "Transitions":
        self.keys, self.values = self.keys.to(device), self.values.to(device)
        return self

    def __call__(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history [U, S] right-padded with 0, items [U, W] (-1 = empty) -> [U, W]."""
        last = realign_right(history.to(self.keys.device))[:, -1:]  # [U, 1]
        want = last * (self.n_items + 1) + items.clamp(min=0).to(last.device)
        if len(self.keys) == 0:
            return torch.zeros(want.shape, device=want.device)
        at = torch.searchsorted(self.keys, want).clamp(max=len(self.keys) - 1)
        return torch.where(self.keys[at] == want, self.values[at], 0.0)


class ColdItems:
    """c(i) = 1 for an item that `prorec items add` appended to the catalogue after training, else 0.

    Not "every item no training row mentions": in a leave-one-out split such an item can only be a
    validation or test target, so lifting it would lift exactly the held-out answers."""

    def __init__(self, cold: torch.Tensor) -> None:
        self.cold = cold  # [N + 1] float, row 0 (padding) 0

    @classmethod
    def added(cls, n_items: int, n_added: int) -> "ColdItems":
        """The last n_added of items 1..n_items (`items add` appends them)."""
        if not 0 <= n_added <= n_items:
            raise ValueError(f"{n_added} items added to a catalogue of {n_items}: the run's manifest and items disagree")
        cold = torch.zeros(n_items + 1)
        cold[n_items - n_added + 1:] = 1.0
        return cls(cold)

    def to(self, device: torch.device | str) -> "ColdItems":
        self.cold = self.cold.to(device)
        return self

    def __call__(self, items: torch.Tensor) -> torch.Tensor:
        """items [U, W] (-1 = empty) -> [U, W]."""
        return self.cold[items.clamp(min=0).to(self.cold.device)]


def rerank_totals(items: torch.Tensor, scores: torch.Tensor, signals: dict[str, torch.Tensor],
                  weights: dict[str, float]) -> torch.Tensor:
    """items [U, W] (-1 = empty), their beam log-probs and signals {name: [U, W]} -> log p + sum of
    weights[name] * signals[name] [U, W], in the candidates' order (-inf on empty slots)."""
    total = scores.float()
    for name, w in weights.items():
        if w:
            total = total + w * signals[name].float().to(total.device)
    return torch.where(items >= 0, total, NEG_INF)


def rerank_scored(items: torch.Tensor, scores: torch.Tensor, signals: dict[str, torch.Tensor],
                  weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """items [U, W] (-1 = empty), their beam log-probs and signals {name: [U, W]} -> (items reordered by
    `rerank_totals`, those totals) (stable: ties keep the beam's order; empty slots last, with total -inf)."""
    total = rerank_totals(items, scores, signals, weights)
    order = total.argsort(dim=1, descending=True, stable=True)
    return items.gather(1, order), total.gather(1, order)


def rerank(items: torch.Tensor, scores: torch.Tensor, signals: dict[str, torch.Tensor],
           weights: dict[str, float]) -> torch.Tensor:
    """`rerank_scored`'s items alone."""
    return rerank_scored(items, scores, signals, weights)[0]


def _chunk_top(sims: torch.Tensor, ids: torch.Tensor, best: tuple[torch.Tensor, torch.Tensor] | None,
               m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a chunk's (sims [U, C], item ids [C]) into the running top m (values, ids), ties to the lower id."""
    vals, items = sims, ids.expand_as(sims)
    if best is not None:
        vals, items = torch.cat([best[0], vals], 1), torch.cat([best[1], items], 1)
    # Sort by item id first, so that a stable sort by value keeps the lower id first among equals.
    order = items.argsort(dim=1, stable=True)
    vals, items = vals.gather(1, order), items.gather(1, order)
    order = vals.argsort(dim=1, descending=True, stable=True)[:, :m]
    return vals.gather(1, order), items.gather(1, order)


class ColdCandidates:
    """The m items `prorec items add` appended (indices first..n_items) that are most similar by text
    to a user's history (a_S, the largest cosine to a history item), among those the beam did not
    return and the list may hold (not excluded; not in the history when history is excluded). They are
    appended after the beam's candidates, best first, with the user's lowest beam log-probability
    (0 if the beam found nothing), so that only the cold-item terms can lift them."""

    def __init__(self, semantic: SemanticAffinity, first: int, n_items: int, m: int, exclude_history: bool,
                 budget: int = 1 << 24) -> None:
        if not 1 <= first <= n_items + 1 or m < 0:
            raise ValueError(f"added items {first}..{n_items} and m={m}: not a range of a catalogue of {n_items}")
        self.semantic, self.first, self.n_items, self.m = semantic, first, n_items, m
        self.exclude_history, self.budget = exclude_history, budget  # budget: floats a chunk's [U, S, C] may hold

    def top(self, history: torch.Tensor, banned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """history [U, S] (0 = padding), banned [U, B] item indices (any, -1/0 ignored) -> the top m
        allowed added items [U, m] (-1 where fewer are left) and their affinities [U, m], best first."""
        table = self.semantic.table
        h = history.to(table.device)
        # In float32 even under bf16 autocast (eval.bf16, a GPU): in bf16, cosines near 1 tie in
        # bunches and the choice would lean to low indices.
        with torch.autocast(table.device.type, enabled=False):
            return self._top(table.float(), h, banned)

    def _top(self, table: torch.Tensor, h: torch.Tensor, banned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e_h = table[h]  # [U, S, D]
        pad = (h == 0)[:, :, None]
        added = self.n_items - self.first + 1
        m = min(self.m, added)
        if m == 0 or h.shape[0] == 0:
            empty = torch.full((h.shape[0], self.m), -1, dtype=torch.long, device=table.device)
            return empty, torch.full(empty.shape, NEG_INF, device=table.device)
        chunk = max(1, self.budget // max(1, h.shape[0] * h.shape[1]))
        banned = banned.to(table.device)
        best = None
        for lo in range(self.first, self.n_items + 1, chunk):
            hi = min(lo + chunk, self.n_items + 1)
            ids = torch.arange(lo, hi, device=table.device)
            sims = (e_h @ table[lo:hi].T).masked_fill(pad, -1.0).amax(dim=1)  # [U, C]
            at = banned - lo
            inside = (at >= 0) & (at < hi - lo)
            hit = torch.zeros(sims.shape[0], hi - lo + 1, dtype=torch.bool, device=sims.device)
            hit.scatter_(1, torch.where(inside, at, hi - lo), True)
            sims = sims.masked_fill(hit[:, :-1], NEG_INF)
            best = _chunk_top(sims, ids, best, m)
        vals, items = best
        items = items.masked_fill(~torch.isfinite(vals), -1)
        if m < self.m:
            items = torch.nn.functional.pad(items, (0, self.m - m), value=-1)
            vals = torch.nn.functional.pad(vals, (0, self.m - m), value=NEG_INF)
        return items, vals

    def __call__(self, history: torch.Tensor, beam: BeamResult, exclude: torch.Tensor | None = None) -> BeamResult:
        """The beam's candidates [U, W] followed by the cold candidates [U, m] (-1 = none), with scores."""
        banned = [beam.items]
        if self.exclude_history:
            banned.append(history.to(beam.items.device))
        if exclude is not None:
            banned.append(exclude.to(beam.items.device))
        items, _ = self.top(history, torch.cat(banned, 1))
        items = items.to(beam.items.device)
        scores = beam.scores.float()
        floor = torch.where(torch.isfinite(scores), scores, torch.inf).amin(dim=1, keepdim=True)
        floor = torch.where(torch.isfinite(floor), floor, 0.0)
        extra = torch.where(items >= 0, floor.expand_as(items), NEG_INF)
        return BeamResult(torch.cat([beam.items, items], 1), torch.cat([scores, extra], 1))


def cold_candidates_reference(table: torch.Tensor, history: list[list[int]], beam: list[list[int]], exclude: list[list[int]],
                              first: int, n_items: int, m: int, exclude_history: bool) -> list[list[int]]:
    """`ColdCandidates.top` one user at a time, in plain loops (the reference its test compares with):
    table [N + 1, D] (normalised or not), per user the history, the beam's items and the excluded items."""
    t = torch.nn.functional.normalize(table.float(), dim=1)
    out = []
    for hist, got, excl in zip(history, beam, exclude):
        hist = [i for i in hist if i > 0]
        banned = set(got) | set(excl) | (set(hist) if exclude_history else set())
        scored = []
        for i in range(first, n_items + 1):
            if i in banned:
                continue
            scored.append((max(float(t[i] @ t[j]) for j in hist) if hist else -1.0, i))
        scored.sort(key=lambda x: (-x[0], x[1]))
        out.append([i for _, i in scored[:m]])
    return out


class Reranker:
    """Reorders a beam's candidates by log p_G + the weighted signals it was given ("din", "semantic",
    "transition", "cold", "cold_semantic": the keys of `prorec.config.RERANK_FIELDS`)."""

    def __init__(self, din: DIN | None = None, weight: float = 0.0, *, semantic: SemanticAffinity | None = None,
                 semantic_weight: float = 0.0, transitions: Transitions | None = None,
                 transition_weight: float = 0.0, cold: ColdItems | None = None, cold_weight: float = 0.0,
                 cold_semantic_weight: float = 0.0, cold_candidates: ColdCandidates | None = None) -> None:
        self.weights = {"din": weight, "semantic": semantic_weight, "transition": transition_weight,
                        "cold": cold_weight, "cold_semantic": cold_semantic_weight}
        self.din, self.semantic, self.transitions, self.cold = din, semantic, transitions, cold
        self.cold_candidates = cold_candidates
        for name, needs in (("din", [din]), ("semantic", [semantic]), ("transition", [transitions]), ("cold", [cold]),
                            ("cold_semantic", [cold, semantic])):
            if self.weights[name] > 0 and any(m is None for m in needs):
                raise ValueError(f"a {name} weight > 0 needs its model")

    @torch.inference_mode()
    def din_scores(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history [U, S] right-padded, items [U, W] (-1 = empty) -> DIN's scores [U, W] (on items' device)."""
        h = realign_right(history.to(items.device))[:, -self.din.cfg.max_history:]
        return self.din(h, items.clamp(min=0)).float()

    @torch.inference_mode()
    def signals(self, history: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every signal this reranker has, for items [U, W] of users with history [U, S] right-padded."""
        out = {}
        if self.din is not None:
            out["din"] = self.din_scores(history, items)
        if self.semantic is not None:
            out["semantic"] = self.semantic(history, items)
        if self.transitions is not None:
            out["transition"] = self.transitions(history, items)
        if self.cold is not None:
            out["cold"] = self.cold(items)
            if self.semantic is not None:
                out["cold_semantic"] = out["cold"] * out["semantic"]
        return out

    def extend(self, history: torch.Tensor, beam: BeamResult, exclude: torch.Tensor | None = None) -> BeamResult:
        """The candidates to reorder: the beam's, and the cold candidates when there are any."""
        return beam if self.cold_candidates is None else self.cold_candidates(history, beam, exclude)

    def order(self, history: torch.Tensor, beam: BeamResult, exclude: torch.Tensor | None = None) -> BeamResult:
        """history [U, S] right-padded and the beam's result -> its items [U, W] reordered, with their
        totals (W + m with m cold candidates; `exclude` [U, E]: items they must not include)."""
        beam = self.extend(history, beam, exclude)
        return BeamResult(*rerank_scored(beam.items, beam.scores, self.signals(history, beam.items), self.weights))

    def __call__(self, history: torch.Tensor, beam: BeamResult) -> torch.Tensor:
        """history [U, S] right-padded and the beam's result -> its items reordered."""
        return self.order(history, beam).items


def check_inputs(cfg: EvalConfig, stage1_dir: str | Path | None, semantic_path: str | Path | None,
                 data_dir: str | Path | None) -> None:
    """ValueError naming the weight and what it needs, for each signal that is on without its input."""
    din, sem, train = ((stage1_dir, "the Stage I folder (its DIN)"), (semantic_path, "the semantic embeddings' Parquet"),
                       (data_dir, "the dataset folder (its train split)"))
    need = {"din": [din], "semantic": [sem], "transition": [train], "cold": [train], "cold_semantic": [train, sem]}
    for signal, w in cfg.rerank_weights.items():
        key = f"eval.{RERANK_FIELDS[signal]}"
        for path, what in need[signal]:
            if w > 0 and path is None:
                raise ValueError(f"{key} > 0 needs {what}: pass it, or set {key}=0")
    if cfg.rerank_cold_candidates > 0 and cfg.reranks:
        for path, what in (sem, train):
            if path is None:
                raise ValueError(f"eval.rerank_cold_candidates > 0 needs {what}: pass it, or set eval.rerank_cold_candidates=0")
    if cfg.rerank_weights["din"] > 0 and not (Path(stage1_dir) / DIN_FILE).is_file():
        raise ValueError(f"eval.rerank_weight > 0 reranks with the DIN that Stage I trains, and {Path(stage1_dir) / DIN_FILE} "
                         "is missing (stage1.fusion=semantic trains none). Fix: set eval.rerank_weight=0, or rerun "
                         "Stage I with another fusion")


def build_reranker(cfg: EvalConfig, n_items: int, device: torch.device | str, stage1_dir: str | Path | None,
                   semantic_path: str | Path | None, data_dir: str | Path | None) -> Reranker | None:
    """The reranker `cfg` asks for (None when every weight is 0), each signal loaded from its artifact:
    the DIN from stage1_dir, the semantic embeddings from semantic_path, transitions from data_dir's train split."""
    if not cfg.reranks:
        return None
    check_inputs(cfg, stage1_dir, semantic_path, data_dir)
    w = cfg.rerank_weights
    din = load_din(stage1_dir, device) if w["din"] > 0 else None
    asks = ("eval.rerank_semantic_weight" if w["semantic"] > 0 else "eval.rerank_cold_semantic_weight"
            if w["cold_semantic"] > 0 else "eval.rerank_cold_candidates")
    semantic = (SemanticAffinity.from_parquet(semantic_path, n_items, asks).to(device)
                if w["semantic"] > 0 or w["cold_semantic"] > 0 or cfg.rerank_cold_candidates > 0 else None)
    transitions = (Transitions.from_split(read_split(Path(data_dir), "train"), n_items).to(device)
                   if w["transition"] > 0 else None)
    cold = None
    # How many items `prorec items add` appended, from the run directory that holds data/.
    added = (items_added(Path(data_dir).parent)
             if w["cold"] > 0 or w["cold_semantic"] > 0 or cfg.rerank_cold_candidates > 0 else 0)
    if w["cold"] > 0 or w["cold_semantic"] > 0:
        if added == 0:
            print(f"warning: eval.rerank_cold_weight / rerank_cold_semantic_weight > 0, but {Path(data_dir).parent} has no "
                  "items added by `prorec items add`: the cold-item terms change nothing", file=sys.stderr)
        cold = ColdItems.added(n_items, added).to(device)
    extra = None
    if cfg.rerank_cold_candidates > 0:
        if added == 0:
            print(f"warning: eval.rerank_cold_candidates > 0, but {Path(data_dir).parent} has no items added by "
                  "`prorec items add`: no candidate is added", file=sys.stderr)
        else:
            extra = ColdCandidates(semantic, n_items - added + 1, n_items, cfg.rerank_cold_candidates, cfg.exclude_history)
    return Reranker(din, w["din"], semantic=semantic, semantic_weight=w["semantic"],
                    transitions=transitions, transition_weight=w["transition"], cold=cold, cold_weight=w["cold"],
                    cold_semantic_weight=w["cold_semantic"], cold_candidates=extra)
