"""Modality adaptation layer and cross-modality knowledge alignment (PRORec §3.3).

The frozen semantic embedding E_S of an item (a language model's view of its text) lives in a
different space from the collaborative embedding E_C that the sequential recommender learns. The
modality adaptation layer maps E_S into the collaborative space,

    E_T = AdaLN(W · E_S + b),

and the cross-modality knowledge alignment (CKA) pulls E_C[i] towards E_T[i] with an InfoNCE loss
whose negatives are the other items of the batch. Gradients flow into both E_C and the adapter, so
semantic structure is written into the collaborative table that Stage I hands on.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class AdaLN(nn.Module):
    """LayerNorm without its own affine; the scale and shift are regressed from a conditioning vector.

    AdaLN(x | c) = LN(x) · (1 + γ(c)) + β(c), with [γ, β] = Linear(c).

    Conditioning: we use the item's own raw semantic embedding E_S (before the projection). A learned
    global vector would make γ and β constants, i.e. an ordinary LayerNorm affine; conditioning on
    E_S lets the layer rescale each item's coordinates according to what the text says, which is
    the point of an *adaptive* norm. The regressor starts at zero (as adaLN-Zero in DiT), so the
    layer starts as a plain LayerNorm and only learns modulation the alignment asks for.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.modulation = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (..., dim), cond: (..., cond_dim)
        gamma, beta = self.modulation(cond).chunk(2, dim=-1)  # (..., dim) each
        return self.norm(x) * (1.0 + gamma) + beta


class ModalityAdapter(nn.Module):
    """E_T = AdaLN(W · E_S + b): semantic space -> collaborative space."""

    def __init__(self, semantic_dim: int, dim: int):
        super().__init__()
        self.semantic_dim, self.dim = semantic_dim, dim
        self.proj = nn.Linear(semantic_dim, dim)
        self.adaln = AdaLN(dim, cond_dim=semantic_dim)

    def forward(self, e_s: torch.Tensor) -> torch.Tensor:
        # e_s: (M, semantic_dim) -> (M, dim)
        return self.adaln(self.proj(e_s), e_s)


def alignment_loss(e_c: torch.Tensor, e_t: torch.Tensor, tau: float,
                   negatives: torch.Tensor | None = None, fused: bool = True) -> torch.Tensor:
    """InfoNCE between E_C[i] and E_T[i]; the other rows (or the rows `negatives` names) are the negatives.

    e_c, e_t: (M, dim), row i of both is the same item and rows are distinct items (the caller
    deduplicates). Cosine similarity with temperature tau. We average both directions (C -> T and
    T -> C, as in CLIP): each side then gets a full set of negatives, and neither modality can satisfy
    the loss by collapsing on its own.

    negatives: None = every other row, the paper's (an (M, M) product). Else (S,) distinct row
    indices shared by all the anchors: every row still has its own pair as the positive, so every item of
    the batch keeps its pull towards its text, and only the contrast shrinks to S rows (an (M, S)
    product in each direction). A row that is its own anchor's pair is masked out. With
    negatives = every row it is the full loss (tests/test_din.py checks this against
    `alignment_loss_reference`).

    fused: the full loss (negatives None) through `_FullInfoNCE`, which computes the (M, M) exponentials
    once and writes the gradient in one pass, instead of autograd's logsumexp both ways (measured at
    Beauty's M = 1,800, d 128, one thread: 52 against 125 ms forward + backward, the same values); False, or a
    temperature below 2 / _EXP_RANGE, takes the autograd form, which tests compare it against.
    """
    if e_c.shape != e_t.shape:
        raise ValueError(f"alignment_loss needs equal shapes, got {tuple(e_c.shape)} and {tuple(e_t.shape)}")
    # fp32 under autocast too, so that the positives and the logits they sit among are rounded alike.
    with torch.autocast(e_c.device.type, enabled=False):
        c, t = F.normalize(e_c.float(), dim=-1), F.normalize(e_t.float(), dim=-1)
        if negatives is None:
            if fused and 2.0 / tau <= _EXP_RANGE:
                return _FullInfoNCE.apply(c, t, 1.0 / tau)
            logits = c @ t.T / tau  # (M, M), the matched pairs on its diagonal
            pos = logits.diagonal()  # logsumexp over dim 0 below avoids a transposed copy
            return 0.5 * ((logits.logsumexp(1) - pos).mean() + (logits.logsumexp(0) - pos).mean())
        pos = (c * t).sum(-1) / tau  # (M,) the matched pairs
        own = negatives[None, :] == torch.arange(c.shape[0], device=c.device)[:, None]  # (M, S)
        losses = [(torch.cat([pos[:, None], (a @ b[negatives].T / tau).masked_fill(own, float("-inf"))], dim=1)
                   .logsumexp(1) - pos).mean() for a, b in ((c, t), (t, c))]  # (M, 1 + S) logits each way
        return 0.5 * (losses[0] + losses[1])


# The fused loss takes exp of (cos - 1) / tau >= -2 / tau: at most 70 keeps every term a normal fp32
# number (down to exp(-87)) and the ratio negatives / positive finite for any M below 1e8.
_EXP_RANGE = 70.0


class _FullInfoNCE(torch.autograd.Function):
    """The full two-way InfoNCE of unit rows c, t (M, d) at inverse temperature s = 1 / tau.

    Cosines lie in [-1, 1], so every logit s * cos_ij is at most s: one shared shift instead of a max
    per row and per column. E = exp(s * (cos - 1)), computed once (the shift folded into the
    product), gives both directions' sums, and the loss
        0.5 / M * sum_i log(rowsum_i / E_ii) + 0.5 / M * sum_j log(colsum_j / E_jj),
    which is logsumexp - positive both ways, as `alignment_loss_reference` writes it. Its gradient
    with respect to the logits is 0.5 / M * (E / rowsum + E / colsum - 2 I): one (M, M) pass, then two
    products. E is kept for the backward pass ((M, M) floats, which autograd's form keeps too).
    """

    @staticmethod
    def forward(ctx, c: torch.Tensor, t: torch.Tensor, s: float) -> torch.Tensor:
        m = c.shape[0]
        e = torch.addmm(c.new_full((1, 1), -s), c * s, t.T).exp_()  # (M, M) exp(s (cos - 1))
        pos = e.diagonal().clone()  # the matched pairs' terms
        e.diagonal().zero_()
        rows, cols = e.sum(1), e.sum(0)  # the negatives' sums each way
        e.diagonal().copy_(pos)
        # logsumexp - positive = log(1 + negatives / positive): never below zero, exact near zero
        loss = 0.5 * (torch.log1p(rows / pos).sum() + torch.log1p(cols / pos).sum()) / m
        rows += pos
        cols += pos
        ctx.save_for_backward(c, t, e, rows, cols)
        ctx.s = s
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        c, t, e, rows, cols = ctx.saved_tensors
        m = c.shape[0]
        g = e * rows.reciprocal()[:, None]
        g.addcmul_(e, cols.reciprocal()[None, :])
        g.diagonal().sub_(2.0)
        scale = grad * (0.5 * ctx.s / m)  # d loss / d cos = 0.5 s / M * g
        return (g @ t) * scale, (g.T @ c) * scale, None


def alignment_loss_reference(e_c: torch.Tensor, e_t: torch.Tensor, tau: float) -> torch.Tensor:
    """The full InfoNCE written plainly (cross-entropy both ways), which `alignment_loss` must equal."""
    logits = F.normalize(e_c, dim=-1) @ F.normalize(e_t, dim=-1).T / tau  # (M, M)
    labels = torch.arange(e_c.shape[0], device=e_c.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ----------------------------------------------------------------------------------------------
# The adapter's files (read by `prorec items add`, which maps a new item's text into E_C's space)

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def save_adapter(folder: str | Path, adapter: ModalityAdapter) -> Path:
    from prorec.artifacts import save_weights

    return save_weights(folder, ADAPTER_FILE, adapter.state_dict(), ADAPTER_CONFIG_FILE,
                        {"semantic_dim": adapter.semantic_dim, "dim": adapter.dim})


def load_adapter(folder: str | Path) -> ModalityAdapter:
    from prorec.artifacts import load_weights

    state, cfg = load_weights(folder, ADAPTER_FILE, ADAPTER_CONFIG_FILE)
    adapter = ModalityAdapter(cfg["semantic_dim"], cfg["dim"])
    adapter.load_state_dict(state)
    return adapter.eval()
