"""DIN: a Deep Interest Network over item IDs, the collaborative recommender of PRORec Stage I (§3.3).

The item embedding table of this model is E_C, the collaborative embeddings Stage I hands on.
A user is her history of items (oldest first, right-aligned, 0 = padding). For a candidate item c
DIN's target attention weighs every history item h by an activation unit over [h, c, h - c, h * c],
pools the history with those weights into an interest vector v(c), and an MLP over
[v(c), c, v(c) * c] gives the score. Because v depends on the candidate, scoring costs
O(T) per (user, candidate) pair, which decides how we train and evaluate (see `prorec.stage1`).

Attention weights are DIN's: the activation unit's raw output, masked, with no softmax. The DIN
paper drops the softmax so that the pooled vector keeps the *intensity* of interest: a candidate
that matches five history items yields a larger interest vector than one matching a single item,
while a softmax would normalise both to the same scale; how many recent items relate to the
candidate is itself evidence for the next item. `attention_softmax=True` gives the normalised
variant. The evidence is thin and split: on the tiny synthetic data (dim 32, 12 epochs) softmax
reached Recall@10 0.40-0.42 against 0.32-0.37; on Beauty, after 250 steps from the same start
(1,000 validation users, benchmarks/results/stage1_beauty_probes.md), raw weights reached 0.016
against 0.007. We keep DIN's raw weights, the real data's choice.

The score is MLP([v, c, v * c]) + <v, c>. The MLP alone can represent the inner product, but from
a random start every path from an embedding to the score runs through three small layers and
training sat on a plateau (loss = log(1 + S)) for hundreds of steps on Beauty; the direct inner
product gives E_C a well-conditioned gradient from the first step (Recall@10 after 250 Beauty
steps: 0.016 with it, 0.009 without). `dot_residual=False` gives the plain DIN head.

History items also get a learned recency embedding (position counted from the most recent item):
DIN's pooling is order-blind, and in next-item prediction the last items matter most.

Two implementations of the scorer sit side by side: `*_reference` builds the concatenations
literally, the default path factorises the first linear layers so that the per-pair cost is one
(d x J) bilinear form instead of a (4d x J) matmul on a materialised 4d-wide tensor; a test checks
that both agree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DINConfig:
    n_items: int  # catalogue size N: item indices are 1..N, 0 is padding
    dim: int = 128  # size of E_C
    max_history: int = 20  # longest history (sets the size of the recency table)
    # Hidden units of the activation unit (DIN paper: 36). The (B, J, T, C) activations dominate
    # the cost of ranking the catalogue; J = 16 matched 36 in the Beauty probe (Recall@10 0.016
    # both after 250 steps).
    attention_hidden: int = 16
    # Scoring MLP. DIN's (200, 80) served dozens of CTR features; over three d-wide inputs (64, 32)
    # costs a quarter as much per (user, candidate) pair.
    mlp_hidden: tuple[int, int] = (64, 32)
    dropout: float = 0.1
    attention_softmax: bool = False  # False = DIN (raw weights); True = softmax over the history
    dot_residual: bool = True  # add <v, c> to the MLP score (see DIN.score_embedded)

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise ValueError(f"DINConfig.n_items must be >= 1, got {self.n_items}")
        if self.dim < 2 or self.max_history < 1 or self.attention_hidden < 1 or min(self.mlp_hidden) < 1:
            raise ValueError(f"DINConfig sizes must be positive: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DINConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DINConfig":
        d = dict(d)
        d["mlp_hidden"] = tuple(d["mlp_hidden"])  # JSON has no tuples
        return cls(**d)


def _prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """PReLU with one slope per channel on the LAST dim (F.prelu wants the channels on dim 1)."""
    return F.prelu(x.reshape(-1, x.shape[-1]), slope).view_as(x)


class DINActivationUnit(nn.Module):
    """Attention weight of each history item for each candidate: MLP([h, c, h - c, h * c]) -> 1."""

    def __init__(self, cfg: DINConfig):
        super().__init__()
        d, j = cfg.dim, cfg.attention_hidden
        self.dim = d
        self.lin1 = nn.Linear(4 * d, j)
        self.slope = nn.Parameter(torch.full((j,), 0.25))
        self.lin2 = nn.Linear(j, 1)
        # The attention weights start near 0 whatever the seed. nn.Linear's default bias is drawn from
        # U(-1/sqrt(J), 1/sqrt(J)), one value that every weight of every history item starts from: at J = 4
        # it was -0.44 for seed 1, so the interest began as about -0.44 x the history's sum and the dot
        # residual scored items unlike the history above those like it. On Sports, after six epochs from that
        # seed, Stage I's validation was still below J = 16's after two
        # (benchmarks/results/stage1_attention_bias.notes.md).
        nn.init.zeros_(self.lin2.bias)

    def reference(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h: (B, T, d), c: (B or 1, C, d) -> weights (B, T, C). Literal concatenation; for tests."""
        b, t, d = h.shape
        n_c = c.shape[1]
        hh = h[:, :, None, :].expand(b, t, n_c, d)
        cc = c[:, None, :, :].expand(b, t, n_c, d)
        x = torch.cat([hh, cc, hh - cc, hh * cc], dim=-1)  # (B, T, C, 4d)
        return self.lin2(_prelu(self.lin1(x), self.slope)).squeeze(-1)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Same as `reference`, factorised.

        lin1([h, c, h - c, h * c]) = (W_h + W_d) h + (W_c - W_d) c + W_p (h * c) + b, and the only
        term that couples h and c is the bilinear W_p (h * c), computed as one batched matmul.
        """
        b, t, d = h.shape
        w_h, w_c, w_d, w_p = self.lin1.weight.split(d, dim=1)  # (J, d) each
        j = w_p.shape[0]
        if c.shape[0] == 1 or c.shape[1] <= t:
            return self._candidate_side(h, c, w_h + w_d, w_c - w_d, w_p)
        # Hidden units go on dim 1 so that F.prelu (one slope per channel on dim 1) applies.
        hu = (h @ (w_h + w_d).T + self.lin1.bias).transpose(1, 2)  # (B, J, T)
        cv = (c @ (w_c - w_d).T).transpose(1, 2)  # (B|1, J, C)
        hp = (w_p[None, :, None, :] * h[:, None, :, :]).reshape(b, j * t, d)  # (B, J*T, d)
        bil = (hp @ c.transpose(1, 2)).view(b, j, t, -1)  # (B, J, T, C)
        act = F.prelu(bil + hu[..., None] + cv[:, :, None, :], self.slope)  # (B, J, T, C)
        return torch.einsum("bjtc,j->btc", act, self.lin2.weight[0]) + self.lin2.bias  # (B, T, C)

    def _candidate_side(self, h: torch.Tensor, c: torch.Tensor, w_hd: torch.Tensor, w_cd: torch.Tensor,
                        w_p: torch.Tensor) -> torch.Tensor:
        """`forward` with the bilinear term W_p (h * c) taken from the candidate side: h (B, T, d),
        c (B or 1, C, d) -> (B, T, C). Used for candidates shared by the batch (Stage I's negatives,
        validation's catalogue chunks) and for per-user candidates no more than the history (Stage I's
        target: C = 1).

        The rows w_p[j] * c, (J * C, d), are built per candidate, and one product, (B * T, d) @
        (d, J * C) when shared, gives every (user, history item, unit, candidate) value, already in the
        (B, T, J, C) layout that F.prelu (units on dim 1 of a (B * T, J, C) view) and the sum over units
        read. The history side instead builds the (B, J, T, d) operand w_p[j] * h and its gradient, and
        transposes (B, J, T, C): for shared candidates about a quarter more time for the attention's
        forward and backward at B 256, T 16, C 128, J 4 (one thread), and for one candidate a user an
        operand T times the size."""
        b, t, d = h.shape
        j, cb, n = w_p.shape[0], c.shape[0], c.shape[1]
        cw = (w_p[None, :, None, :] * c[:, None, :, :]).reshape(cb, j * n, d)  # (B|1, J * C, d)
        if cb == 1:
            x = (h.reshape(b * t, d) @ cw[0].T).view(b, t, j, n)  # (B, T, J, C)
        else:
            x = torch.bmm(h, cw.transpose(1, 2)).view(b, t, j, n)
        cv = (c @ w_cd.T).transpose(1, 2)[:, None]  # (B|1, 1, J, C)
        x = x + (h @ w_hd.T + self.lin1.bias)[..., None] + cv
        act = F.prelu(x.view(b * t, j, n), self.slope).view(b, t, j, n)
        return torch.einsum("btjc,j->btc", act, self.lin2.weight[0]) + self.lin2.bias  # (B, T, C)


class DINScoreMLP(nn.Module):
    """Score of a candidate given the pooled interest: MLP([v, c, v * c]) -> 1."""

    def __init__(self, cfg: DINConfig):
        super().__init__()
        d = cfg.dim
        h1, h2 = cfg.mlp_hidden
        self.dim = d
        self.lin1 = nn.Linear(3 * d, h1)
        self.slope1 = nn.Parameter(torch.full((h1,), 0.25))
        self.lin2 = nn.Linear(h1, h2)
        self.slope2 = nn.Parameter(torch.full((h2,), 0.25))
        self.out = nn.Linear(h2, 1)
        self.p = cfg.dropout

    def _head(self, x1: torch.Tensor) -> torch.Tensor:
        # F.dropout, not a cheaper mask: masks read from 16-bit slices of 64-bit random words
        # (6d28e7a; `bernoulli_` was about 7% of a J = 4 Stage I step in a profile) lowered validation after
        # three epochs on Beauty in every run (N@10 0.0641-0.0657 over six runs against 0.0669-0.0692
        # over four with F.dropout), for a reason not found (benchmarks/results/stage1_dropout_stream.md).
        x = F.dropout(_prelu(x1, self.slope1), self.p, self.training)
        x = F.dropout(_prelu(self.lin2(x), self.slope2), self.p, self.training)
        return self.out(x).squeeze(-1)

    def reference(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """v: (B, C, d), c: (B or 1, C, d) -> (B, C)."""
        return self._head(self.lin1(torch.cat([v, c.expand_as(v), v * c], dim=-1)))

    def forward(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # The candidate's own term is computed once per candidate, not once per (user, candidate).
        w_v, w_c, w_p = self.lin1.weight.split(self.dim, dim=1)  # (H1, d) each
        x1 = v @ w_v.T + (v * c) @ w_p.T + (c @ w_c.T + self.lin1.bias)  # (B, C, H1)
        return self._head(x1)

    def shared(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """`forward` for candidates shared by the batch: v (B, C, d), c (1, C, d) -> scores (B, C).

        Candidate c's first layer is one (d, H1) matrix, W_v + diag(c) W_p: a single batched product
        over the candidates, (C, B, d) @ (C, d, H1), replaces `forward`'s two (B * C, d) products and
        the (B, C, d) elementwise v * c, which (with its gradients) took a third of a Stage I step at
        J = 4 (benchmarks/results/stage1_fast_step.md). <v, c> is not a column of it
        (`DIN.score_embedded` takes it from the history side): with H1 + 1 columns the backward's
        (C, B, H1 + 1) @ (C, H1 + 1, d) product ran at a third of the forward's speed (an inner
        dimension of 33, over a whole Stage I epoch at J = 4: benchmarks/results/stage1_scorer_width.md).
        """
        w_v, w_c, w_p = self.lin1.weight.split(self.dim, dim=1)  # (H1, d) each
        cc = c[0]  # (C, d)
        m = w_v[None] + cc[:, None, :] * w_p[None]  # (C, H1, d)
        # Candidate-major (C, B, .) throughout, so that the backward's products get contiguous gradients.
        x1 = torch.bmm(v.transpose(0, 1), m.transpose(1, 2)) + (cc @ w_c.T + self.lin1.bias)[:, None, :]  # (C, B, H1)
        return self._head(x1).T


class DIN(nn.Module):
    """DIN over item IDs; `item_emb` is E_C."""

    def __init__(self, cfg: DINConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.dim, padding_idx=0)  # E_C
        self.recency_emb = nn.Embedding(cfg.max_history, cfg.dim)  # 0 = the most recent item
        nn.init.normal_(self.item_emb.weight, std=cfg.dim ** -0.5)  # rows of about unit norm
        nn.init.normal_(self.recency_emb.weight, std=0.1 * cfg.dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.attention = DINActivationUnit(cfg)
        self.score_mlp = DINScoreMLP(cfg)

    def encode_history(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """history: (B, T) right-aligned item indices (0 = padding) -> h (B, T, d), mask (B, T)."""
        t = history.shape[1]
        if t > self.cfg.max_history:
            raise ValueError(f"history has {t} columns, the model was built for at most {self.cfg.max_history}")
        recency = self.recency_emb.weight[:t].flip(0)  # (T, d): the last column is recency 0
        return self.item_emb(history) + recency, (history > 0)

    def score_embedded(self, h: torch.Tensor, mask: torch.Tensor, c: torch.Tensor,
                       reference: bool = False) -> torch.Tensor:
        """h: (B, T, d), mask: (B, T), c: (B or 1, C, d) candidate embeddings -> scores (B, C)."""
        att = self.attention.reference if reference else self.attention
        w = att(h, c)  # (B, T, C)
        if self.cfg.attention_softmax:
            w = w.masked_fill(~mask[..., None], float("-inf")).softmax(dim=1)
        else:
            w = w * mask[..., None]
        v = torch.einsum("btc,btd->bcd", w, h)  # (B, C, d) interest per candidate
        if c.shape[0] == 1 and not reference:  # candidates shared by the batch
            score = self.score_mlp.shared(v, c)
            if self.cfg.dot_residual:
                # <v, c> = sum_t w[b, t, c] <h[b, t], c>: one (B * T, d) @ (d, C) product on the history side.
                # An fp32 sum under autocast too, as the literal path's: a bf16 product would round
                # every score (more ties in a ranking).
                with torch.autocast(h.device.type, enabled=False):
                    hc = (h.float().reshape(-1, h.shape[-1]) @ c[0].float().T).view(h.shape[0], h.shape[1], -1)
                    score = score + (w.float() * hc).sum(1)
            return score
        score = (self.score_mlp.reference if reference else self.score_mlp)(v, c)
        if self.cfg.dot_residual:
            score = score + (v * c).sum(-1)
        return score

    def forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """history: (B, T); candidates: (B, C) per-user or (1, C) shared item indices -> (B, C)."""
        h, mask = self.encode_history(history)
        return self.score_embedded(h, mask, self.item_emb(candidates))

    @torch.no_grad()
    def score_all(self, history: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Scores of every item 1..N for each user: (B, N + 1), column 0 (padding) is -inf.

        The catalogue is scored in chunks of `chunk` items so memory stays O(B * T * J * chunk).
        """
        h, mask = self.encode_history(history)
        n = self.cfg.n_items
        out = torch.full((history.shape[0], n + 1), float("-inf"), device=history.device)
        for lo in range(1, n + 1, chunk):
            hi = min(n + 1, lo + chunk)
            c = self.item_emb.weight[lo:hi][None]  # (1, C, d)
            out[:, lo:hi] = self.score_embedded(h, mask, c)
        return out

    def sampled_softmax_loss(self, history: torch.Tensor, target: torch.Tensor,
                             negatives: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the target against a shared set of sampled negatives.

        history: (B, T), target: (B,), negatives: (S,) item indices drawn uniformly from 1..N.
        With a uniform proposal the logQ correction is the same constant for every negative and
        cancels in the softmax, so no correction is applied. A negative that equals a user's own
        target is masked out for that user (it would be a false negative).
        """
        h, mask = self.encode_history(history)
        pos = self.score_embedded(h, mask, self.item_emb(target)[:, None, :])  # (B, 1)
        neg = self.score_embedded(h, mask, self.item_emb(negatives)[None])  # (B, S)
        neg = neg.masked_fill(negatives[None, :] == target[:, None], float("-inf"))
        logits = torch.cat([pos, neg], dim=1)  # (B, 1 + S), the target is column 0
        return F.cross_entropy(logits, torch.zeros_like(target))

    def in_batch_loss(self, history: torch.Tensor, target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each target against the other targets of the batch, logQ-corrected.

        history: (B, T), target: (B,), log_q: (B,) log of the expected number of times each target
        appears in a batch (B * its share of training targets). In-batch negatives are drawn by
        popularity, so without the correction popular items would be pushed down for being
        popular; subtracting log_q makes the sampled softmax estimate the full one. Repeated targets
        in the batch are masked off the diagonal (they would be false negatives).
        """
        h, mask = self.encode_history(history)
        logits = self.score_embedded(h, mask, self.item_emb(target)[None]) - log_q[None, :]  # (B, B)
        dup = (target[None, :] == target[:, None]) & ~torch.eye(len(target), dtype=torch.bool, device=target.device)
        logits = logits.masked_fill(dup, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(target), device=target.device))

    def full_softmax_loss(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the whole catalogue (cost O(B * N * T); for small N or a GPU)."""
        logits = self(history, torch.arange(1, self.cfg.n_items + 1, device=history.device)[None])  # (B, N)
        return F.cross_entropy(logits, target - 1)


# ----------------------------------------------------------------------------------------------
# The model's files: weights and the config that rebuilds it

DIN_FILE = "din.safetensors"
DIN_CONFIG_FILE = "din_config.json"


def save_din(folder: str | Path, din: DIN) -> Path:
    """Write `din` to folder/din.safetensors with its config in folder/din_config.json."""
    from prorec.artifacts import save_weights

    return save_weights(folder, DIN_FILE, din.state_dict(), DIN_CONFIG_FILE, dataclasses.asdict(din.cfg))


def load_din(folder: str | Path, device: torch.device | str = "cpu") -> DIN:
    """The DIN that `save_din` wrote to `folder`, in eval mode."""
    from prorec.artifacts import load_weights

    state, cfg = load_weights(folder, DIN_FILE, DIN_CONFIG_FILE)
    din = DIN(DINConfig.from_dict(cfg))
    din.load_state_dict(state)
    return din.to(device).eval()
