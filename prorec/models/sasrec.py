"""SASRec (Kang & McAuley, 2018) with cross-entropy over the full catalogue: the sequential baseline.

A user is her history, oldest first, in the project's "left" layout (items from column 0,
right-padded with 0; `prorec.data.history`). Items and positions are embedded, `n_layers` causal
pre-LayerNorm transformer blocks (nanoGPT's) run over them, and the hidden state at a position
scores every item of the catalogue by its inner product with that item's embedding: the input
embedding is tied as the output layer. The loss is the cross-entropy over all N items, not the
paper's one sampled negative with binary cross-entropy: a full softmax is the stronger SASRec
(Klenitskiy & Vasilev, RecSys 2023) and costs little at Beauty's 12k items.

With right padding and causal attention a real position never attends to padding (all padding
comes after the last item), so no padding mask is needed, and position t is computed from exactly
the first t + 1 items: one forward pass over a sequence gives the loss of every one of its prefixes.
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
class SASRecConfig:
    n_items: int  # catalogue size N: item indices are 1..N, 0 is padding
    max_len: int = 20  # longest history it reads (the size of the position table)
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    ff_dim: int = 256  # 4 * d_model, as nanoGPT
    dropout: float = 0.5  # on embeddings, attention weights and residual branches

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.max_len < 1:
            raise ValueError(f"SASRecConfig needs n_items >= 1 and max_len >= 1: {self}")
        if min(self.d_model, self.n_heads, self.n_layers, self.ff_dim) < 1:
            raise ValueError(f"SASRecConfig sizes must be >= 1: {self}")
        if self.d_model % self.n_heads:
            raise ValueError(f"SASRecConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SASRecConfig":
        return cls(**d)


class SASRecAttention(nn.Module):
    """Causal multi-head self-attention (one fused q, k, v projection)."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # (B, T, d) each
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(b, t, d)  # (B, T, d)
        return self.resid_drop(self.proj(y))


class SASRecMLP(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class SASRecBlock(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SASRecAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = SASRecMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d_model, padding_idx=0)  # also the output layer
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)  # 0 = the oldest item of the history
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)  # nanoGPT's
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, T) item indices, right-padded with 0 -> hidden states (B, T, d)."""
        t = history.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(f"history has {t} columns, the model was built for at most {self.cfg.max_len}")
        x = self.drop(self.item_emb(history) + self.pos_emb.weight[:t])  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> scores of every item (..., N + 1); column 0 (padding) is -inf."""
        out = h @ self.item_emb.weight.T  # (..., N + 1)
        return out.index_fill(-1, torch.zeros(1, dtype=torch.long, device=out.device), float("-inf"))

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, T) -> the scores of the next item at every position (B, T, N + 1)."""
        return self.logits(self.hidden(history))

    def loss(self, sequence: torch.Tensor, first_scored: torch.Tensor | None = None,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy over the catalogue of every next item of `sequence`.

        sequence (B, T + 1) items, right-padded with 0: position t reads items 0..t and predicts item
        t + 1. first_scored (B,): positions before it are read but not scored (a row whose early
        positions some other row already scores); None = score them all. label_smoothing spreads that
        share of each target's mass evenly over the N items (never over the padding column, whose
        -inf score would make PyTorch's smoothing infinite); 0 is the plain cross-entropy.
        """
        inputs, targets = sequence[:, :-1], sequence[:, 1:]  # (B, T) each
        scored = targets > 0  # (B, T)
        if first_scored is not None:
            scored &= torch.arange(targets.shape[1], device=targets.device)[None, :] >= first_scored[:, None]
        h = self.hidden(inputs)[scored]  # (M, d): the logits only where a target is scored
        if not label_smoothing:
            return F.cross_entropy(self.logits(h), targets[scored])
        return F.cross_entropy(self.logits(h)[:, 1:], targets[scored] - 1, label_smoothing=label_smoothing)

    @torch.no_grad()
    def score(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, T) right-padded, each row at least one item -> scores of every item (B, N + 1)
        after the last item of each row; column 0 (padding) is -inf."""
        last = (history > 0).sum(1) - 1  # (B,)
        h = self.hidden(history)[torch.arange(history.shape[0], device=history.device), last]  # (B, d)
        return self.logits(h)


# ----------------------------------------------------------------------------------------------
# The model's files: weights and the config that rebuilds it

SASREC_FILE = "sasrec.safetensors"
SASREC_CONFIG_FILE = "sasrec_config.json"


def save_sasrec(folder: str | Path, model: SASRec) -> Path:
    """Write `model` to folder/sasrec.safetensors with its config in folder/sasrec_config.json."""
    from prorec.artifacts import save_weights

    return save_weights(folder, SASREC_FILE, model.state_dict(), SASREC_CONFIG_FILE, dataclasses.asdict(model.cfg))


def load_sasrec(folder: str | Path, device: torch.device | str = "cpu") -> SASRec:
    """The SASRec that `save_sasrec` wrote to `folder`, in eval mode."""
    from prorec.artifacts import load_weights

    state, cfg = load_weights(folder, SASREC_FILE, SASREC_CONFIG_FILE)
    model = SASRec(SASRecConfig.from_dict(cfg))
    model.load_state_dict(state)
    return model.to(device).eval()
