"""The encoder-decoder generator with the distillation token (PRORec §3.4).

Encoder: one token per history item = the sum of its per-level code embeddings (+ an optional
item-ID embedding, + an optional projection of its fixed Stage I embedding) + a recency position
embedding; padding is masked. Decoder: <BOS>, the target's
code tokens, then the learnable distillation token [c_dis], under a causal mask; per-level heads
predict code token l from position l. With `item_head`, the last level is scored per item instead:
the logit of last token t after prefix p is h . e_out[item(p, t)] + b[item(p, t)], normalised over
the prefix's own items, so that token t no longer has to mean unrelated items in different groups.
L = L_gen + beta * L_distill, where L_distill is an InfoNCE
between a projection of [c_dis]'s last hidden state and the fixed Stage I embedding of the target.

Attention is written out (nanoGPT style, fused `scaled_dot_product_attention`) so the decoder has
a clean incremental path for beam search: a per-layer self-attention KV cache (`DecoderCache`) and
cross-attention K/V computed once per user (`Generator.cross_kv`). In that path the beams of one
user are extra *query positions* of the user's cross-attention, so the encoder K/V are never copied
per beam.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prorec.models.generator_config import GeneratorArch, GeneratorConfig  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------------------------
# Attention and blocks

def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.view(b, t, n_heads, c // n_heads).transpose(1, 2)  # (B, nh, T, hs)


def _merge(y: torch.Tensor) -> torch.Tensor:
    b, nh, t, hs = y.shape
    return y.transpose(1, 2).reshape(b, t, nh * hs)  # (B, T, C)


class DecoderCache:
    """Self-attention keys/values of the decoded prefix, per decoder layer, position-major:
    (max_len, N, nh, hs), so that a step writes one contiguous slab and a beam reorder copies only
    the filled positions (one index_select per layer per step; L is 3-4 tokens).
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len, self.length = max_len, 0
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (N, nh, hs) of the new position -> the keys/values so far, (t + 1, N, nh, hs) each."""
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(self.max_len, *k.shape)
            self.v[layer] = v.new_empty(self.max_len, *v.shape)
        t = self.length
        self.k[layer][t] = k
        self.v[layer][t] = v
        if layer == len(self.k) - 1:
            self.length += 1
        return self.k[layer][: t + 1], self.v[layer][: t + 1]

    @torch.no_grad()
    def reorder(self, rows: torch.Tensor) -> None:
        """rows [N'] long: new row i continues old row rows[i]. (Decoding only: no gradients.)"""
        t = self.length
        for i in range(len(self.k)):
            for buf in (self.k, self.v):
                old = buf[i]
                if old is None:
                    continue
                new = old.new_empty(self.max_len, rows.shape[0], *old.shape[2:])
                torch.index_select(old[:t], 1, rows, out=new[:t])
                buf[i] = new


class SelfAttention(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x).split(x.shape[-1], dim=2)
        q, k, v = _heads(q, self.n_heads), _heads(k, self.n_heads), _heads(v, self.n_heads)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(_merge(y))

    def step(self, x: torch.Tensor, cache: DecoderCache, layer: int) -> torch.Tensor:
        """Incremental decoding, x (N, 1, C): the new position attends to the cached prefix and
        itself (no mask needed). With at most L + 1 keys, a broadcast product beats a kernel call."""
        n, _, c = x.shape
        hs = c // self.n_heads
        q, k, v = self.qkv(x[:, 0]).view(n, 3, self.n_heads, hs).unbind(1)  # (N, nh, hs) each
        keys, values = cache.write(layer, k, v)  # (t+1, N, nh, hs)
        att = ((keys * q).sum(-1) * hs ** -0.5).softmax(dim=0)  # (t+1, N, nh)
        y = (att[..., None] * values).sum(0)  # (N, nh, hs)
        return self.proj(y.reshape(n, 1, c))


class CrossAttention(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).split(memory.shape[-1], dim=2)
        return _heads(k, self.n_heads), _heads(v, self.n_heads)  # (B, nh, S, hs) each

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mem_mask: torch.Tensor) -> torch.Tensor:
        """x (N, T, C) with N = B * G: G groups (beams) share user b's memory; mem_mask (B, 1, 1, S)."""
        n, t, c = x.shape
        b = kv[0].shape[0]
        q = _heads(self.q(x).reshape(b, (n // b) * t, c), self.n_heads)  # (B, nh, G*T, hs)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mem_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(_merge(y).reshape(n, t, c))


class FeedForward(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.out = nn.Linear(cfg.ff_dim, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class EncoderBlock(nn.Module):
    """Pre-LN: x + SA(LN(x)), then x + FF(LN(x))."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn, self.ff = SelfAttention(cfg), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attn_mask=attn_mask))
        return x + self.ff(self.ln2(x))


class DecoderBlock(nn.Module):
    """Pre-LN: causal self-attention, cross-attention to the encoder, feed-forward."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn, self.cross_attn, self.ff = SelfAttention(cfg), CrossAttention(cfg), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mem_mask: torch.Tensor,
                cache: DecoderCache | None = None, layer: int = 0) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.self_attn(h, causal=True) if cache is None else self.self_attn.step(h, cache, layer))
        x = x + self.drop(self.cross_attn(self.ln2(x), kv, mem_mask))
        return x + self.ff(self.ln3(x))


# ----------------------------------------------------------------------------------------------
# The generator

NEG_INF = float("-inf")
# Generator.item_logits: a prefix with fewer rows than this is scored pair by pair (loop-free), not by
# its own matmul, whose call overhead (about 8 us on a CPU) is more than a lone row's dot products
# cost; 2 (lone rows only) measured best from 1 user at beam 50 to 256 users at beam 200.
GROUP_MIN_ROWS = 2


def sibling_tables(item_codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """item_codes [n_items + 1, L] -> (siblings [P, K]: the item_idx of last token t after prefix p,
    0 = none; item_prefix [n_items + 1]: each item's prefix id p). Row 0 (padding) gets prefix 0."""
    codes = item_codes[1:]
    n, L = codes.shape
    if L > 1:
        _, prefix = torch.unique(codes[:, : L - 1], dim=0, return_inverse=True)
    else:
        prefix = torch.zeros(n, dtype=torch.long)
    siblings = torch.zeros(int(prefix.max()) + 1, k, dtype=torch.long)
    siblings[prefix, codes[:, L - 1]] = torch.arange(1, n + 1)
    if int((siblings > 0).sum()) != n:
        raise ValueError("item_head needs one code per item, but some items share a code "
                         "(every quantizer in prorec.quantizers makes unique codes)")
    return siblings, torch.cat([prefix.new_zeros(1), prefix])


def _upgrade_state(module, state_dict, prefix, *args) -> None:
    """Weights saved before the item head's biases became a table: "item_out_b" [N + 1] is now
    "item_out_bias.weight" [N + 1, 1]."""
    old = state_dict.pop(prefix + "item_out_b", None)
    if old is not None:
        state_dict[prefix + "item_out_bias.weight"] = old.reshape(-1, 1)


@dataclass
class Memory:
    """What the encoder hands the decoder, per user: cross-attention K/V of every decoder layer."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, nh, S, hs) each
    mask: torch.Tensor  # (B, 1, 1, S) bool, True = a real history item


class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig, item_codes: torch.Tensor) -> None:
        """item_codes [n_items + 1, L] long: the code of every item (row 0, padding, is ignored)."""
        super().__init__()
        if tuple(item_codes.shape) != (cfg.n_items + 1, cfg.code_length):
            raise ValueError(f"item_codes must have shape [{cfg.n_items + 1}, {cfg.code_length}], "
                             f"got {tuple(item_codes.shape)}")
        self.cfg = cfg
        d, L, K = cfg.d_model, cfg.code_length, cfg.k
        self.register_buffer("item_codes", item_codes.long().clone())
        self.register_buffer("level_offset", torch.arange(L) * K, persistent=False)
        # One table for all levels (level l's token c is row l*K + c), shared by the encoder's
        # history tokens and the decoder's code tokens, as seq2seq models share their vocabulary.
        self.code_emb = nn.Embedding(L * K, d)
        self.item_emb = nn.Embedding(cfg.n_items + 1, d, padding_idx=0) if cfg.item_id_embedding else None
        self.enc_pos = nn.Embedding(cfg.max_history, d)  # by recency: 0 = the most recent item
        self.dec_pos = nn.Embedding(L + 2, d)  # <BOS>, L code tokens, [c_dis]
        self.bos = nn.Parameter(torch.zeros(d))
        self.enc_drop, self.dec_drop = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_layers))
        self.enc_ln = nn.LayerNorm(d)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_layers))
        self.dec_ln = nn.LayerNorm(d)
        # Per-level output heads; with item_head the last level is scored by item_out instead.
        n_heads = L - 1 if cfg.item_head else L
        if n_heads > 0:
            self.head_w = nn.Parameter(torch.zeros(n_heads, d, K))
            self.head_b = nn.Parameter(torch.zeros(n_heads, K))
        else:  # one-level codes with the item head: no shared head, and no empty parameter for DDP
            self.register_buffer("head_w", torch.zeros(0, d, K), persistent=False)
            self.register_buffer("head_b", torch.zeros(0, K), persistent=False)
        if cfg.item_head:
            if not cfg.tie_item_head:  # tied: `item_out` is `item_emb` (the property below)
                self.item_out = nn.Embedding(cfg.n_items + 1, d)
            # The item head's biases, one a row: an embedding table (not a bare vector) so that it can
            # take row-sparse gradients, which DDP accepts from nn.Embedding(sparse=True) alone.
            # Zeros from the start, drawing no random numbers (the other weights' init stays as before).
            self.item_out_bias = nn.Embedding(cfg.n_items + 1, 1, _weight=torch.zeros(cfg.n_items + 1, 1))
            self.item_out_bias.skip_init = True
            siblings, item_prefix = sibling_tables(self.item_codes, K)
            self.register_buffer("siblings", siblings, persistent=False)  # [n_prefixes, K] item_idx, 0 = none
            self.register_buffer("item_prefix", item_prefix, persistent=False)  # [n_items + 1] prefix id
        if cfg.distill:
            self.dis_token = nn.Parameter(torch.zeros(d))
            self.dis_proj = nn.Linear(d, cfg.distill_dim)
        # The Stage I item embeddings, L2-normalised (set_stage1), one table: with history_stage1 the
        # encoder reads each history item's row at every request (with item_head_stage1 the item head
        # reads each candidate's), so the table is saved with the weights (stage1_emb) and the
        # distillation reads the same rows; without either the distillation's teacher is not saved with
        # the model.
        if cfg.stage1_in_model:
            self.register_buffer("stage1_emb", torch.zeros(cfg.n_items + 1, cfg.distill_dim))
        if cfg.history_stage1:
            self.stage1_proj = nn.Linear(cfg.distill_dim, d)  # to the model's width
        if cfg.item_head_stage1:  # the item head's output rows: item_out[i] + out_stage1_proj(stage1_emb[i])
            self.out_stage1_proj = nn.Linear(cfg.distill_dim, d)
        self._out_cache: tuple[tuple, torch.Tensor] | None = None
        if not cfg.stage1_in_model and cfg.distill:
            self.register_buffer("teacher", torch.zeros(cfg.n_items + 1, cfg.distill_dim), persistent=False)
        self.sparse_grads = False
        self.apply(self._init)
        self.register_load_state_dict_pre_hook(_upgrade_state)
        nn.init.normal_(self.bos, std=0.02)
        nn.init.normal_(self.head_w, std=0.02)
        if cfg.distill:
            nn.init.normal_(self.dis_token, std=0.02)

    @property
    def item_out(self) -> nn.Embedding | None:
        """The item head's output embeddings [n_items + 1, d]: a table of their own, the item-ID
        embedding itself when `tie_item_head`, None without the item head."""
        if self.cfg.item_head and self.cfg.tie_item_head:
            return self.item_emb
        return self._modules.get("item_out")

    def item_tables(self) -> list[nn.Embedding]:
        """The per-item tables, each once (a tied head is the item-ID embedding)."""
        out: list[nn.Embedding] = []
        for table in (self.item_emb, self.item_out, getattr(self, "item_out_bias", None)):
            if table is not None and all(table is not t for t in out):
                out.append(table)
        return out

    def set_sparse_grads(self, on: bool) -> None:
        """Row-sparse gradients for the per-item tables (item-ID embedding, item head weights and
        bias), for `prorec.optim.RowSparseAdam`: a training step's cost then does not grow with the
        catalogue. Training-only; the weights and their files are the same either way."""
        self.sparse_grads = bool(on)
        for table in self.item_tables():
            table.sparse = self.sparse_grads

    def out_rows(self, items: torch.Tensor) -> torch.Tensor:
        """The item head's output embeddings of `items` (any shape, item_idx) -> [..., d]: the rows of
        `item_out`, plus the projected Stage I rows with item_head_stage1 (differentiable)."""
        rows = self.item_out(items)
        if self.cfg.item_head_stage1:
            rows = rows + self.out_stage1_proj(self.stage1_emb[items])
        return rows

    def out_table(self) -> torch.Tensor:
        """`out_rows` of every item, [n_items + 1, d], for decoding (no gradients): `item_out`'s own
        weight without item_head_stage1; with it, the sums, computed once and kept until one of the
        tables they come from changes (its version counter moves: a training step, a load)."""
        w = self.item_out.weight
        if not self.cfg.item_head_stage1:
            return w
        parts = (w, self.out_stage1_proj.weight, self.out_stage1_proj.bias, self.stage1_emb)
        key = tuple((id(t), t._version, t.device, t.dtype) for t in parts)
        if self._out_cache is None or self._out_cache[0] != key:
            # in float32 whatever autocast is on: the kept table must not depend on the first caller's
            with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
                self._out_cache = (key, w + self.out_stage1_proj(self.stage1_emb))
        return self._out_cache[1]

    @property
    def item_out_b(self) -> torch.Tensor:
        """The item head's biases as a vector [n_items + 1] (a view of `item_out_bias.weight`)."""
        return self.item_out_bias.weight[:, 0]

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and not getattr(m, "skip_init", False):
            nn.init.normal_(m.weight, std=0.02)

    def set_stage1(self, emb: torch.Tensor) -> None:
        """emb [n_items + 1, distill_dim]: Stage I integrated item embeddings (row 0 unused), stored
        L2-normalised as the distillation target (distill), as the history tokens' Stage I features
        (history_stage1) and as the item head's Stage I term (item_head_stage1); a model with none of
        these (`GeneratorArch.reads_stage1` false) ignores them."""
        if not self.cfg.reads_stage1:
            return
        want = (self.cfg.n_items + 1, self.cfg.distill_dim)
        if tuple(emb.shape) != want:
            raise ValueError(f"Stage I embeddings must have shape {want}, got {tuple(emb.shape)}")
        rows = self.stage1_rows
        rows.copy_(F.normalize(emb.float(), dim=-1))
        rows[0] = 0.0  # padding (the distillation never reads row 0: targets and negatives are items 1..N)

    @property
    def stage1_rows(self) -> torch.Tensor:
        """The Stage I rows [n_items + 1, distill_dim]: `stage1_emb` with history_stage1 or
        item_head_stage1, else the distillation's `teacher`."""
        return self.stage1_emb if self.cfg.stage1_in_model else self.teacher

    @torch.no_grad()
    def init_item_head(self, emb: torch.Tensor) -> None:
        """Start the item head's output embeddings at emb [n_items + 1, d_model] (Stage I item
        embeddings), L2-normalised; row 0 is padding and stays as it is."""
        if self.item_out is None:
            raise ValueError("init_item_head: this model has no item head (item_head=False)")
        want = tuple(self.item_out.weight.shape)
        if tuple(emb.shape) != want:
            raise ValueError(f"item head init: Stage I embeddings have shape {tuple(emb.shape)}, the item head "
                             f"needs {want}: set stage1.dim equal to stage2.d_model, or stage2.item_head_init=random")
        self.item_out.weight[1:] = F.normalize(emb[1:].float(), dim=-1).to(self.item_out.weight.dtype)

    # -- encoder -------------------------------------------------------------------------------

    def encode(self, history: torch.Tensor) -> Memory:
        """history [B, S] item_idx, oldest first, right-padded with 0; every row has >= 1 item."""
        valid = history > 0  # (B, S)
        codes = self.item_codes[history] + self.level_offset  # (B, S, L)
        x = self.code_emb(codes).sum(dim=2)  # (B, S, d)
        if self.item_emb is not None:
            x = x + self.item_emb(history)
        if self.cfg.history_stage1:
            x = x + self.stage1_proj(self.stage1_emb[history])
        lengths = valid.sum(1, keepdim=True)  # (B, 1)
        recency = (lengths - 1 - torch.arange(history.shape[1], device=history.device)).clamp(min=0)
        x = self.enc_drop(x + self.enc_pos(recency))
        mask = valid[:, None, None, :]  # (B, 1, 1, S)
        for block in self.encoder:
            x = block(x, mask)
        x = self.enc_ln(x)
        return Memory([blk.cross_attn.project_kv(x) for blk in self.decoder], mask)

    # -- decoder -------------------------------------------------------------------------------

    def _code_tokens(self, codes: torch.Tensor, first_level: int = 0) -> torch.Tensor:
        """codes [..., T] of levels first_level.. -> embeddings [..., T, d]."""
        levels = torch.arange(first_level, first_level + codes.shape[-1], device=codes.device)
        return self.code_emb(codes + levels * self.cfg.k)

    def decode(self, memory: Memory, codes: torch.Tensor, with_distill: bool = False) -> torch.Tensor:
        """Teacher forcing. codes [B, L] -> final hidden states [B, L (+1), d]: position l predicts
        code token l; with with_distill the last position is [c_dis] (which has seen all L codes)."""
        b, L = codes.shape
        tokens = [self.bos.expand(b, 1, -1), self._code_tokens(codes[:, : L - 1])]
        if with_distill:
            tokens += [self._code_tokens(codes[:, L - 1:], L - 1), self.dis_token.expand(b, 1, -1)]
        x = torch.cat(tokens, dim=1)  # (B, T, d)
        x = self.dec_drop(x + self.dec_pos.weight[: x.shape[1]])
        for i, blk in enumerate(self.decoder):
            x = blk(x, memory.kv[i], memory.mask)
        x = self.dec_ln(x)
        return torch.cat([x[:, :L], x[:, L + 1:]], dim=1) if with_distill else x

    def code_logits(self, hidden: torch.Tensor, items: torch.Tensor | None = None, samples: int = 0) -> torch.Tensor:
        """hidden [B, L, d] (position l) -> logits [B, L, K] from the level-l head.

        With item_head, items [B] (the item each row's code belongs to) names the last level's prefix:
        the last level's logits are over that prefix's items, -inf where token t leads to no item.
        samples >= 2: a sampled softmax at the last level (`sample_siblings`): row b keeps items[b] and
        at most samples - 1 other items of its prefix, log-Q corrected; the rest are -inf."""
        n = self.head_w.shape[0]
        logits = torch.einsum("bld,ldk->blk", hidden[:, :n], self.head_w) + self.head_b
        if self.item_out is None:
            return logits
        if items is None:
            raise ValueError("code_logits: a model with item_head needs the rows' items")
        children = self.siblings[self.item_prefix[items]]
        if samples:
            children, correction = sample_siblings(children, self.item_codes[items, -1], samples)
            last = self.item_logits_compact(hidden[:, n], children) + correction
        else:
            last = self.item_logits_compact(hidden[:, n], children)
        return torch.cat([logits.float(), last[:, None]], dim=1)

    # The item head three ways, equal up to float rounding (tests/test_generator.py):
    # - item_logits_reference: the plain per-row gather, [N, K, d]; the definition.
    # - item_logits_compact: one dot product per (row, real item) pair; differentiable, loop-free;
    #   for rows of mostly different prefixes (training batches, `code_logits`).
    # - item_logits: rows grouped by prefix, one dense matmul per prefix; for many rows that share
    #   few prefixes (the last level of a beam search: N / n_prefixes beams a prefix).

    def item_logits_reference(self, h: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
        """The item head by a per-row gather (the reference): h [N, d], children [N, K] item_idx
        after each row's prefix (<= 0 = none) -> float32 logits [N, K], -inf where there is no item.
        It reads item_out(children), an [N, K, d] tensor: at the last level of a wide beam search
        that is N * K * d floats a step (gigabytes for a batch of users at beam 200)."""
        idx = children.clamp(min=0)
        logits = torch.einsum("nd,nkd->nk", h, self.out_rows(idx)).float() + self.item_out_b[idx].float()
        return logits.masked_fill(children <= 0, NEG_INF)

    def item_logits_compact(self, h: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
        """`item_logits_reference`, computed for the real items alone (differentiable): one dot
        product per (row, item) pair, so it reads the rows' real items (about n_items / n_prefixes
        a row) instead of K output embeddings a row, and never gathers row 0 for an empty slot."""
        n, K = children.shape
        flat = (children > 0).view(-1).nonzero()[:, 0]  # row * K + token of every real item
        items = children.view(-1).index_select(0, flat)
        rows = h.index_select(0, torch.div(flat, K, rounding_mode="floor"))
        vals = torch.einsum("td,td->t", rows, self.out_rows(items)).float() + self.item_out_bias(items)[:, 0].float()
        out = torch.full((n * K,), NEG_INF, dtype=torch.float32, device=h.device)
        return out.index_copy(0, flat, vals).view(n, K)

    def item_logits(self, h: torch.Tensor, prefix: torch.Tensor, siblings: torch.Tensor | None = None) -> torch.Tensor:
        """The item head, grouped by prefix (decoding; no gradients): h [N, d], prefix [N] long, the
        row of `siblings` [P, C] that holds each row's items, negative = no prefix (the row is all
        -inf). siblings: item_idx by column, <= 0 = none; the model's own `self.siblings` (C = K,
        column = last token) by default, or any other layout, such as the beam search's compact one
        (`prorec.beam.compact_children`: column j = the prefix's j-th item).
        -> float32 logits [N, C], equal to `item_logits_reference(h, siblings[prefix])`.

        Rows are sorted by prefix; each prefix's rows are one dense matmul against the output
        embeddings of the prefix's real items alone (read once per call, not once per row), written
        into those items' token columns; a prefix with a lone row (fewer than GROUP_MIN_ROWS) is
        scored with the others like it by `item_logits_compact`, without a call of its own. So the
        per-row [N, K, d] gather of the reference is never built: the work is at most the shared
        head's [N, d] x [d, K] (fewer columns where a prefix has fewer than K items), plus a Python
        loop over the distinct prefixes of the call. At the last level of a beam search with L=2
        there are at most K prefixes, so N / K beams share each one."""
        if torch.is_grad_enabled() and (h.requires_grad or self.item_out.weight.requires_grad):
            raise RuntimeError("item_logits has no backward (it writes into preallocated rows): call it under "
                               "torch.no_grad() or inference_mode; training uses item_logits_compact")
        if siblings is None:
            siblings = self.siblings
        n, K = h.shape[0], siblings.shape[1]
        key, order = prefix.sort(stable=True)
        nodes, rows = torch.unique_consecutive(key, return_counts=True)
        live = nodes >= 0  # negative prefixes sort first and stay -inf
        first_live = int(rows[~live].sum())
        nodes, rows = nodes[live], rows[live]
        if nodes.numel() == 0:
            return torch.full((n, K), NEG_INF, dtype=torch.float32, device=h.device)
        kids = siblings[nodes]  # (P', K) item_idx, <= 0 = none
        hs = h.index_select(0, order[first_live:])  # rows grouped by prefix
        res = torch.full((hs.shape[0], K), NEG_INF, dtype=torch.float32, device=h.device)
        small = rows < GROUP_MIN_ROWS
        if bool(small.any()):  # prefixes of few rows: one loop-free dot product per (row, item) pair
            group = torch.repeat_interleave(torch.arange(nodes.numel(), device=h.device), rows)
            sel = small[group].nonzero()[:, 0]
            res.index_copy_(0, sel, self.item_logits_compact(hs[sel], kids[group[sel]]))
        big = ~small  # the other prefixes: one dense matmul each
        start, rows, kids = (rows.cumsum(0) - rows)[big].tolist(), rows[big].tolist(), kids[big]
        slot, tok = (kids > 0).nonzero(as_tuple=True)  # each prefix's real items, by prefix
        items = kids[slot, tok]
        w = self.out_table().index_select(0, items)  # (T, d): the prefixes' items, read once
        b = self.item_out_b.index_select(0, items)
        width = torch.bincount(slot, minlength=len(rows)).tolist()  # items a prefix
        for s_p, n_p, w_p, b_p, t_p in zip(start, rows, w.split(width), b.split(width), tok.split(width)):
            if t_p.numel():
                res[s_p:s_p + n_p].index_copy_(1, t_p, torch.addmm(b_p, hs[s_p:s_p + n_p], w_p.T).to(res.dtype))
        out = res.new_empty(n, K).index_copy_(0, order[first_live:], res)
        if first_live:
            out.index_fill_(0, order[:first_live], NEG_INF)
        return out

    def step(self, memory: Memory, cache: DecoderCache, level: int, prev: torch.Tensor | None,
             n_users: int, children: torch.Tensor | None = None, *, prefix: torch.Tensor | None = None,
             siblings: torch.Tensor | None = None) -> torch.Tensor:
        """One incremental decoder step for N = n_users * G beams (G beams per user, grouped by user).

        prev [N] long: the code token chosen at level-1 (None at level 0, where the input is <BOS>).
        At the last level of a model with item_head, the beams' items are named either by `prefix`
        [N] long, each beam's row of `siblings` [P, C] (item_idx by column, <= 0 = none; default the
        model's `siblings`, by its own prefix ids, C = K; negative = a dead beam), scored by the
        grouped `item_logits` (`BeamSearch` passes its compact rows), or by children [N, C] item_idx
        (<= 0 = none), scored by `item_logits_reference`. Returns logits [N, K] for code level
        `level` ([N, C] at an item head's last level).
        """
        if prev is None:
            x = self.bos.expand(n_users, 1, -1)  # (N, 1, d)
        else:
            x = self._code_tokens(prev[:, None], level - 1)  # (N, 1, d)
        x = x + self.dec_pos.weight[level]
        for i, blk in enumerate(self.decoder):
            x = blk(x, memory.kv[i], memory.mask, cache=cache, layer=i)
        h = self.dec_ln(x[:, 0])  # (N, d)
        if self.item_out is not None and level == self.cfg.code_length - 1:
            if prefix is not None:
                return self.item_logits(h, prefix, siblings)
            if children is None:
                raise ValueError("step: a model with item_head needs the beams' prefix (or children) at the last level")
            return self.item_logits_reference(h, children)
        return h @ self.head_w[level] + self.head_b[level]

    # -- training ------------------------------------------------------------------------------

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """history [B, S], target [B] item_idx -> {"loss", "gen", "distill"} (scalars)."""
        memory = self.encode(history)
        codes = self.item_codes[target]  # (B, L)
        hidden = self.decode(memory, codes, with_distill=self.cfg.distill)
        L = self.cfg.code_length
        samples = self.cfg.item_head_samples if self.training else 0  # validation scores every item
        logits = self.code_logits(hidden[:, :L], target, samples).float()  # (B, L, K)
        gen = code_loss(logits.reshape(-1, self.cfg.k), codes.reshape(-1), self.cfg.label_smoothing)
        out = {"gen": gen}
        if self.cfg.distill:
            out["distill"] = self.distill_loss(hidden[:, L], target)
            out["loss"] = gen + self.cfg.beta * out["distill"]
        else:
            out["distill"] = torch.zeros((), device=gen.device)
            out["loss"] = gen
        return out

    def distill_loss(self, h_dis: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """InfoNCE: [c_dis] -> the target's Stage I embedding, against n_negatives random items
        shared by the batch (a negative that happens to be the target is masked out)."""
        q = F.normalize(self.dis_proj(h_dis).float(), dim=-1)  # (B, D)
        negs = torch.randint(1, self.cfg.n_items + 1, (self.cfg.n_negatives,), device=target.device)
        teacher = self.stage1_rows
        pos = (q * teacher[target]).sum(-1, keepdim=True)  # (B, 1)
        neg = q @ teacher[negs].T  # (B, n_neg)
        neg = neg.masked_fill(negs[None, :] == target[:, None], float("-inf"))
        logits = torch.cat([pos, neg], dim=1) / self.cfg.tau
        return F.cross_entropy(logits, torch.zeros_like(target))


def sample_siblings(children: torch.Tensor, target: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sampled softmax's rows: children [B, K] (item_idx by last token, <= 0 = none), target [B]
    each row's target token (a real item) -> (children with all but the target and at most
    samples - 1 others, drawn uniformly without replacement, set to 0; the log-Q correction [B, K]
    to add to the logits: log((n - 1) / drawn) on the drawn others of a row of n items, 0 on the
    target and on rows of <= samples items, which keep every item and so the exact softmax)."""
    real = children > 0
    key = torch.rand(children.shape, device=children.device).masked_fill_(~real, -1.0)
    key.scatter_(1, target[:, None], 2.0)  # the target is always kept
    drawn = torch.zeros_like(real).scatter_(1, key.topk(min(samples, key.shape[1]), dim=1).indices, True) & real
    others = drawn.sum(1, keepdim=True) - 1
    weight = (real.sum(1, keepdim=True) - 1).clamp(min=1).float() / others.clamp(min=1).float()  # 1 when all kept
    correction = weight.log() * drawn.scatter(1, target[:, None], False)  # the drawn others
    return children.masked_fill(~drawn, 0), correction


def code_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """The mean cross-entropy of rows of logits [R, K] (-inf = a token the row cannot take) against
    targets [R], label-smoothed over each row's own allowed (finite) tokens: (1 - smoothing) x the
    target's NLL + smoothing x the mean NLL of the allowed tokens. `F.cross_entropy(label_smoothing=)`
    spreads the mass over all K columns, and a -inf column would make the loss infinite."""
    if smoothing == 0.0:
        return F.cross_entropy(logits, targets)
    logp = logits.log_softmax(-1)
    nll = -logp.gather(1, targets[:, None])[:, 0]
    allowed = torch.isfinite(logits)
    uniform = -logp.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


# ----------------------------------------------------------------------------------------------
# The model's files: weights and the config that rebuilds it

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


def save_generator(folder: str | Path, cfg: GeneratorConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write a generator's weights (`state`, its state_dict) to folder/model.safetensors and its
    GeneratorConfig to folder/model_config.json."""
    from prorec.artifacts import save_weights

    return save_weights(folder, MODEL_FILE, state, CONFIG_FILE, cfg.to_dict())


def load_generator_config(folder: str | Path) -> GeneratorConfig:
    import json

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing. Fix: rerun Stage II")
    return GeneratorConfig.from_dict(json.loads(path.read_text()))


def load_generator(folder: str | Path, device: torch.device | str = "cpu") -> Generator:
    """The generator `save_generator` wrote to `folder`, in eval mode (no Stage I teacher needed)."""
    from prorec.artifacts import load_weights

    state, cfg = load_weights(folder, MODEL_FILE, CONFIG_FILE)
    model = Generator(GeneratorConfig.from_dict(cfg), state["item_codes"])
    model.load_state_dict(state)
    return model.to(device).eval()
