"""Constrained beam search over the code trie (PRORec §3.4, inference), and its brute-force reference.

`BeamSearch` decodes many users at once: the encoder runs once per user, decoder self-attention
uses a KV cache, cross-attention K/V are computed once per user and shared by its beams, and every
step is masked by the trie (log-softmax over K, invalid tokens set to -inf, node ids tracked per
beam through `trie.child`). A code's score is the sum of its L per-level log-probabilities.

Ties are broken deterministically: candidates are ordered by (score descending, flat candidate
index ascending), where the flat index is (parent beam rank) * K + token (at the last level,
(parent beam rank) * width + column, the same order: see below).

The last level is compact. A last-level prefix holds about N / (its level's prefixes) items, often
far fewer than K (1.2M items at K = 2,048: about 586 of 2,048 tokens), so that level works on
`width` columns a beam, the most items any prefix holds: column j is the prefix's j-th item in
token order (`compact_children`). The item head scores those columns directly; a token head's
log-softmax is taken over K as at any level and then gathered to them. The masks, the exclusion and
the top-k over beams x width candidates follow. Columns keep the tokens' order, so the tie rule is
that of a search over all K tokens, and so are the scores: bit for bit with a token head, and up to
the float rounding of the log-softmax's normaliser (a sum over `width` columns instead of K with
the empty ones at -inf) with the item head. tests/test_beam.py checks both against brute force.

History exclusion (`exclude_history=True`). The beam is the candidate set, and it runs over the
catalogue *without* the user's history: a candidate prefix is masked out when every item below it
is in the user's history (at the last level: when the item itself is). So the search spends none of
its W slots on items that would be dropped, and the result equals a beam search over the trie of
the remaining items. The brute-force reference drops the same items from the full ranking.

`score_all_codes` is the reference: it teacher-forces every valid code of the trie and sums the
same per-level log-probabilities. With beam_size >= the number of items the beam search returns
exactly its top-k (tests/test_beam.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from prorec.codes import CodeTrie
from prorec.models.generator import DecoderCache, Generator

NEG_INF = float("-inf")


@dataclass
class BeamResult:
    items: torch.Tensor  # [B, n] long item_idx, best first; -1 where fewer than n valid items exist
    scores: torch.Tensor  # [B, n] float32 log-probabilities; -inf where items is -1


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of x [B, M], ordered by (value desc, index asc): a deterministic top-k.

    torch.topk leaves the choice among equal values unspecified, so rows whose k-th finite value is
    tied with an unselected entry fall back to a stable full sort (rare: exact float ties).
    """
    vals, idx = x.topk(k, dim=1)  # (B, k)
    idx, perm = idx.sort(dim=1)
    vals, perm = vals.gather(1, perm).sort(dim=1, descending=True, stable=True)
    idx = idx.gather(1, perm)
    kth = vals[:, -1:]
    tied = torch.isfinite(kth[:, 0]) & ((x >= kth).sum(1, dtype=torch.int32) > k)  # int32: a bool sum widens to int64
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        v, i = x[rows].sort(dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = v[:, :k], i[:, :k]
    return vals, idx


def compact_children(child: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last level's child table [P, K] (item_idx, -1 = no item) in compact columns:
    (items [P + 1, width] item_idx, 0 = none; tokens [P + 1, width], each column's token (0 where
    none); column [max item_idx + 1], each item's column in its prefix's row). width is the most
    items a prefix holds (at least 1); a prefix's items fill its first columns in token order; the
    extra last row (nothing) is the sentinel that a dead beam (node -1) reads."""
    real = child >= 0
    width = max(int(real.sum(1).max()), 1) if child.shape[0] else 1
    row, tok = real.nonzero(as_tuple=True)  # row-major: the tokens of a row ascend
    col = (real.cumsum(1) - 1)[row, tok]
    items = child.new_zeros(child.shape[0] + 1, width)
    tokens = torch.zeros_like(items)
    items[row, col] = child[row, tok]
    tokens[row, col] = tok
    column = child.new_zeros(int(child.max()) + 1 if child.numel() else 1)
    column[child[row, tok]] = col
    return items, tokens, column


class _TriePaths:
    """Per item: its prefix node at every level, and how many items lie under each of its prefixes.

    Used only for history exclusion: a history item's level-(l+1) prefix is dead for a user when
    the user's history contains every item under it. At the last level the item is named by its
    column of the compact last level (`compact_children`), not by its token.
    """

    def __init__(self, trie: CodeTrie, item_codes: torch.Tensor, column: torch.Tensor) -> None:
        L = trie.length
        codes = item_codes[1:].to(trie.child[0].device)  # (N, L)
        n = codes.shape[0]
        node = torch.zeros(n, dtype=torch.long, device=codes.device)
        path, key, leaves = [], [], []
        for level in range(L):
            path.append(node)
            nxt = trie.child[level][node, codes[:, level]]  # level+1 node, or the item at the last level
            if level < L - 1:
                size = torch.bincount(nxt.clamp(min=0), minlength=trie.child[level + 1].shape[0])
                leaves.append(size[nxt.clamp(min=0)])
            else:
                expected = torch.arange(1, n + 1, device=codes.device)
                if not torch.equal(nxt, expected):
                    bad = int((nxt != expected).nonzero()[0, 0]) + 1
                    raise ValueError(f"the model's code of item {bad} is not that item's code in the trie: "
                                     "build the trie from the codes the generator was trained on")
                leaves.append(torch.ones_like(nxt))
            key.append(nxt)
            node = nxt
        pad = lambda t, v: torch.cat([torch.full((1,), v, dtype=t.dtype, device=t.device), t])  # noqa: E731
        self.path = torch.stack([pad(p, -2) for p in path], 1)  # (N+1, L); row 0 matches no beam
        self.key = torch.stack([pad(q, -1) for q in key], 1)  # (N+1, L) the level-(l+1) prefix id
        self.leaves = torch.stack([pad(c, 1 << 30) for c in leaves], 1)  # (N+1, L)
        cols = torch.cat([codes[:, :-1], column[1:n + 1, None].to(codes.device)], 1)  # last level: the compact column
        self.codes = torch.cat([torch.zeros(1, L, dtype=torch.long, device=codes.device), cols])

    def dead(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """history [B, S] -> (parent node [B, S, L], token [B, S, L], dead [B, S, L] bool): at level l,
        token `token` (at the last level: compact column) after prefix `parent` leads only to items
        in the history when dead."""
        valid = history > 0
        same_item = history[:, :, None] == history[:, None, :]  # (B, S, S)
        earlier = torch.ones_like(same_item[0]).tril(-1)  # (S, S): s' < s
        first = valid & ~(same_item & earlier).any(-1)  # first occurrence of each distinct item
        key = self.key[history]  # (B, S, L)
        same = key[:, :, None, :] == key[:, None, :, :]  # (B, S, S, L)
        count = (same & first[:, None, :, None]).sum(2)  # distinct history items under the prefix
        dead = valid[..., None] & (count >= self.leaves[history])
        return self.path[history], self.codes[history], dead


class BeamSearch:
    """Batched trie-constrained beam search of a `Generator`: `search(history) -> BeamResult`."""

    def __init__(self, model: Generator, trie: CodeTrie, beam_size: int, topk: int,
                 exclude_history: bool = False, autocast: bool = False) -> None:
        if beam_size < topk:
            raise ValueError(f"beam_size ({beam_size}) must be >= the largest top-k asked for ({topk}): "
                             "the final beam is the ranked candidate list")
        if trie.length != model.cfg.code_length or trie.k != model.cfg.k:
            raise ValueError(f"trie (L={trie.length}, K={trie.k}) does not match the model "
                             f"(L={model.cfg.code_length}, K={model.cfg.k})")
        device = model.item_codes.device
        self.model, self.beam_size, self.topk = model, beam_size, topk
        self.trie = trie.to(device)
        # Per level: allowed[l] [nodes + 1, C] and child[l] [nodes + 1, C] (the next node, or at the last
        # level the item). C = K, but the last level is compact (module docstring): its columns are its
        # prefixes' items (child 0 = none) and C its width. A sentinel last row (nothing allowed, no
        # child) lets dead beams (node -1) index the tables.
        items, tokens, self.last_column = compact_children(self.trie.child[-1])
        self.allowed = [torch.cat([a, a.new_zeros(1, trie.k)]) for a in self.trie.allowed[:-1]] + [items > 0]
        self.child = [torch.cat([c, c.new_full((1, trie.k), -1)]) for c in self.trie.child[:-1]] + [items]
        self.last_tokens = tokens if model.item_out is None else None  # only a token head reads them
        self.exclude_history = exclude_history
        self._paths = _TriePaths(self.trie, model.item_codes, self.last_column) if exclude_history else None
        self.autocast = autocast

    @property
    def paths(self) -> "_TriePaths":
        if self._paths is None:  # built on first use when only explicit exclusions are asked for
            self._paths = _TriePaths(self.trie, self.model.item_codes, self.last_column)
        return self._paths

    @torch.inference_mode()
    def search(self, history: torch.Tensor, exclude: torch.Tensor | None = None) -> BeamResult:
        """history [B, S] item_idx (right-padded with 0) -> the top-`topk` items of each user.

        `exclude` [B, E] (0 = padding): more items to leave out of each user's list, beside the
        history when `exclude_history`; the search runs over the catalogue without them."""
        model, trie, W = self.model, self.trie, self.beam_size
        was_training = model.training
        if was_training:  # eval() and train() walk every module: 0.27 ms, 3% of one user's search
            model.eval()
        history = history.to(model.item_codes.device)
        B = history.shape[0]
        amp = torch.autocast(history.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        banned = history if self.exclude_history else None
        if exclude is not None and exclude.shape[1] > 0:
            exclude = exclude.to(history.device)
            banned = exclude if banned is None else torch.cat([banned, exclude], dim=1)
        excl = self.paths.dead(banned) if banned is not None else None
        try:
            with amp:
                memory = model.encode(history)
                cache = DecoderCache(len(model.decoder), trie.length)
                scores = torch.zeros(B, 1, device=history.device)  # (B, G) log-prob of each beam
                nodes = torch.zeros(B, 1, dtype=torch.long, device=history.device)  # trie node per beam
                prev = None
                for level in range(trie.length):
                    G = nodes.shape[1]
                    # At the last level the item head scores each beam's items in compact columns: the
                    # rows of child[-1] named by the beams' nodes (-1, a dead beam, scores nothing).
                    logits = model.step(memory, cache, level, prev, B, prefix=nodes.view(B * G),
                                        siblings=self.child[-1])  # (B*G, K, or the compact width)
                    logp = F.log_softmax(logits.float(), dim=-1)
                    if level == trie.length - 1 and self.last_tokens is not None:  # a token head: to the columns
                        logp = logp.gather(1, self.last_tokens[nodes.view(B * G)])
                    C = logp.shape[1]  # K, or the compact width at the last level
                    logp = logp.view(B, G, C)
                    ok = self.allowed[level][nodes]  # (B, G, C); node -1 reads the sentinel row
                    if excl is not None:
                        self._exclude(ok, nodes, excl, level)
                    # In place on the fresh log-softmax and mask: the same floats as torch.where(ok,
                    # scores + logp, -inf), without its two beam x C temporaries.
                    cand = logp.add_(scores[..., None]).masked_fill_(ok.logical_not_(), NEG_INF).view(B, G * C)
                    scores, flat = stable_topk(cand, min(W, G * C))  # (B, G')
                    parent, token = flat // C, flat % C
                    nodes = self.child[level][nodes.gather(1, parent), token]
                    nodes = nodes.masked_fill(~torch.isfinite(scores), -1)
                    if level < trie.length - 1:
                        cache.reorder((torch.arange(B, device=nodes.device)[:, None] * G + parent).view(-1))
                        prev = token.view(-1)
        finally:
            if was_training:
                model.train()
        n = self.topk
        items, scores = nodes[:, :n], scores[:, :n]
        if items.shape[1] < n:  # fewer candidates than topk (tiny catalogues)
            pad = n - items.shape[1]
            items = F.pad(items, (0, pad), value=-1)
            scores = F.pad(scores, (0, pad), value=NEG_INF)
        return BeamResult(items.masked_fill(~torch.isfinite(scores), -1), scores)

    @staticmethod
    def _exclude(ok: torch.Tensor, nodes: torch.Tensor, excl: tuple[torch.Tensor, ...], level: int) -> None:
        """Clear ok [B, G, C] where the token's (column's) subtree holds only history items (in place)."""
        parent, token, dead = (t[:, :, level] for t in excl)  # (B, S) each
        hit = (nodes[:, :, None] == parent[:, None, :]) & dead[:, None, :]  # (B, G, S)
        b, g, s = hit.nonzero(as_tuple=True)
        ok[b, g, token[b, s]] = False


def beam_search(model: Generator, history: torch.Tensor, trie: CodeTrie, beam_size: int, topk: int,
                exclude_history: bool = False) -> BeamResult:
    """One-off convenience wrapper; build a `BeamSearch` once when searching many batches."""
    return BeamSearch(model, trie, beam_size, topk, exclude_history).search(history)


# ----------------------------------------------------------------------------------------------
# Brute-force reference

def trie_codes(trie: CodeTrie) -> tuple[torch.Tensor, torch.Tensor]:
    """Every valid code of the trie: (codes [N, L] long, item_idx [N] long), in code order."""
    prefixes = torch.zeros(1, 0, dtype=torch.long)
    nodes = torch.zeros(1, dtype=torch.long)
    for level in range(trie.length):
        allowed, child = trie.allowed[level].cpu(), trie.child[level].cpu()
        pairs = allowed[nodes].nonzero()  # (M, 2): (row in nodes, token), sorted
        prefixes = torch.cat([prefixes[pairs[:, 0]], pairs[:, 1:]], dim=1)
        nodes = child[nodes[pairs[:, 0]], pairs[:, 1]]
    return prefixes, nodes


@torch.inference_mode()
def score_all_codes(model: Generator, history: torch.Tensor, trie: CodeTrie) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-force every valid code: (item_idx [N], logp [B, N]) with logp = sum_l log p(c_l | c_<l, history)."""
    was_training = model.training
    model.eval()
    device = model.item_codes.device
    codes, items = trie_codes(trie)
    codes = codes.to(device)
    out = []
    for row in history.to(device):
        memory = model.encode(row[None].expand(codes.shape[0], -1))
        logits = model.code_logits(model.decode(memory, codes), items.to(device))  # (N, L, K)
        logp = F.log_softmax(logits.float(), dim=-1).gather(2, codes[..., None])[..., 0]  # (N, L)
        out.append(logp.sum(1))
    model.train(was_training)
    return items.to(device), torch.stack(out)


def brute_force_topk(model: Generator, history: torch.Tensor, trie: CodeTrie, topk: int,
                     exclude_history: bool = False, exclude: torch.Tensor | None = None) -> BeamResult:
    """The exact top-k of every user by `score_all_codes` (ties: lower code order first), leaving out
    the history items (`exclude_history`) and the items of `exclude` [B, E]."""
    items, logp = score_all_codes(model, history, trie)
    history = history.to(logp.device)
    banned = [history] if exclude_history else []
    if exclude is not None:
        banned.append(exclude.to(logp.device))
    if banned:
        b = torch.cat(banned, dim=1)
        seen = (items[None, :, None] == b[:, None, :]).any(-1)  # (B, N); items are >= 1, so padding never matches
        logp = logp.masked_fill(seen, NEG_INF)
    n = min(topk, items.shape[0])
    scores, idx = stable_topk(logp, n)
    top = items[idx].masked_fill(~torch.isfinite(scores), -1)
    if n < topk:
        top = F.pad(top, (0, topk - n), value=-1)
        scores = F.pad(scores, (0, topk - n), value=NEG_INF)
    return BeamResult(top, scores)


def rank_users(search: BeamSearch, history: torch.Tensor, batch_size: int,
               reorder: Callable[[torch.Tensor, BeamResult], torch.Tensor] | None = None) -> np.ndarray:
    """Beam-search users in batches of batch_size: ranked items [U, topk] (-1 = empty slot).

    `reorder(history_batch, result) -> items` replaces the beam's order (e.g. `prorec.rerank.Reranker`);
    it may return more candidates than the beam's (cold candidates): the first topk are kept."""
    ranked = [np.zeros((0, search.topk), dtype=np.int64)]
    for s in range(0, history.shape[0], batch_size):
        h = history[s:s + batch_size]
        h = h[:, : int((h > 0).sum(1).max())]  # trim the padding this batch does not need
        res = search.search(h)
        ranked.append((res.items if reorder is None else reorder(h, res)[:, :search.topk]).cpu().numpy())
    return np.concatenate(ranked)
