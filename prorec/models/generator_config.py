"""The generator's configuration: the one place its settings and their defaults live.

`GeneratorArch` holds what a user chooses (sizes, the item head, distillation); `Stage2Config`
inherits it, so `stage2.d_model=...` sets it from the command line. `GeneratorConfig` adds what the
artifacts fix (catalogue size, K, code length, teacher width, longest history) and is what
`prorec.models.generator.Generator` is built from and what `model_config.json` holds. This module
imports no torch, so the pipeline's configuration can read it cheaply.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class GeneratorArch:
    """The generator's shape and losses, as a user sets them (section stage2 of the pipeline config)."""

    d_model: int = 128
    n_heads: int = 4
    encoder_layers: int = 1
    decoder_layers: int = 4
    ff_dim: int = 512
    dropout: float = 0.1
    # Add an item-ID embedding to each history token on top of its code embeddings. On by default:
    # chosen on validation (Beauty and the synthetic default; benchmarks/results/beauty_quality.md).
    item_id_embedding: bool = True
    # Score the last code level per item (output embeddings over the prefix's own items) instead of
    # with a shared K-way head whose token t means unrelated items in different groups. On by
    # default, chosen on validation as above; false + item_id_embedding false is the paper's Stage II.
    item_head: bool = True
    # The item head's output embeddings are the item-ID embedding's rows (one table, as SASRec ties
    # its input and output item embeddings): half the per-item weights. Needs item_head and
    # item_id_embedding; the head keeps its own per-item biases.
    tie_item_head: bool = False
    distill: bool = True  # False = the paper's "CKA only" ablation
    beta: float = 1.0  # weight of L_distill
    tau: float = 0.07  # InfoNCE temperature of L_distill
    n_negatives: int = 256  # random other items per batch for L_distill
    # Label smoothing of L_gen: each code level's target gets 1 - label_smoothing of the mass and the
    # rest is spread evenly over the level's allowed tokens (all K at the shared heads; at the item
    # head, the prefix's own items). 0 = the plain cross-entropy.
    label_smoothing: float = 0.0
    # Add to each history token a learned projection of the item's Stage I embedding (fixed,
    # L2-normalised, saved with the model): the encoder then sees Stage I's fused text and
    # collaborative view of every history item, also of items with few training rows, whose code and
    # item-ID embeddings have had few updates. Off by default (added 2026-12-01).
    history_stage1: bool = False
    # The item head's output embedding of each item adds a learned projection of the item's Stage I
    # embedding (fixed, L2-normalised, saved with the model, as for history_stage1): an item with few
    # training rows, whose own output row has had few updates, is scored through what Stage I learned
    # of it and of items like it. Needs item_head. Off: on Beauty it gained on the rarest targets and
    # lost more on popular ones, all-user validation N@10 0.0649 against 0.0689 for the same seed
    # (benchmarks/results/beauty_generator_item_head_stage1.md; added 2026-12-01).
    item_head_stage1: bool = False
    # Train the item head with a sampled softmax: a row's target against at most item_head_samples - 1
    # of its prefix's other items, drawn uniformly without replacement, each with the log-Q
    # correction log((n - 1) / drawn) for a prefix of n items (an unbiased estimate of the full
    # softmax's denominator). A step's item-head work and its sparse updates then hold at most
    # item_head_samples items a row instead of the prefix's n (about N / prefixes: ~586 at 1.2M items
    # with codes.grow_k, ~47 on Beauty). Training only: validation, the search and the reference
    # score every item. 0 = every item of the prefix, always; a prefix of <= item_head_samples items
    # is scored whole either way. The training loss it reports estimates the full one from below (the
    # log of an unbiased estimate of the denominator), and with label_smoothing the uniform part is
    # spread over the drawn items: neither is comparable with a run at 0 (added 2026-12-02).
    item_head_samples: int = 0

    def arch_problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are valid)."""
        checks = [
            (self.d_model >= 1 and self.n_heads >= 1, "d_model and n_heads must be >= 1"),
            (self.n_heads >= 1 and self.d_model % max(self.n_heads, 1) == 0, "d_model must be divisible by n_heads"),
            (self.encoder_layers >= 1 and self.decoder_layers >= 1, "need >= 1 encoder and decoder layer"),
            (self.ff_dim >= 1, "ff_dim must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.beta >= 0, "beta must be >= 0"),
            (self.tau > 0, "tau must be > 0"),
            (self.n_negatives >= 1, "n_negatives must be >= 1"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (not self.tie_item_head or (self.item_head and self.item_id_embedding),
             "tie_item_head needs item_head and item_id_embedding (the two tables it makes one)"),
            (not self.item_head_stage1 or self.item_head,
             "item_head_stage1 needs item_head (it adds to the item head's output embeddings)"),
            (self.item_head_samples == 0 or self.item_head_samples >= 2,
             f"item_head_samples must be 0 (every item) or >= 2 (the target and >= 1 other), got {self.item_head_samples}"),
            (self.item_head_samples == 0 or self.item_head,
             "item_head_samples needs item_head (it samples the item head's softmax)"),
        ]
        return [msg for ok, msg in checks if not ok]

    @property
    def stage1_in_model(self) -> bool:
        """Whether the model keeps the Stage I rows in its weights file (a request reads them)."""
        return self.history_stage1 or self.item_head_stage1

    @property
    def reads_stage1(self) -> bool:
        """Whether training reads the Stage I embeddings (as a teacher, or as rows the model keeps)."""
        return self.distill or self.stage1_in_model

    def arch(self) -> dict[str, Any]:
        """This object's GeneratorArch fields (also of a Stage2Config, which has more)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GeneratorArch)}


@dataclass(kw_only=True)
class GeneratorConfig(GeneratorArch):
    """Everything that fixes a trained generator: its GeneratorArch plus what the artifacts decide."""

    n_items: int  # items are 1..n_items; 0 is padding
    k: int  # code vocabulary per level
    code_length: int  # L
    # Width of the Stage I embeddings: what [c_dis] is distilled towards and, with history_stage1, what
    # the history tokens read (ignored when both are off).
    distill_dim: int = 128
    # Longest history the encoder sees; longer ones keep their most recent items.
    max_history: int = 20

    def __post_init__(self) -> None:
        problems = self.arch_problems() + [msg for ok, msg in [
            (self.n_items >= 1, "n_items must be >= 1"),
            (self.k >= 2, "k must be >= 2"),
            (self.code_length >= 1, "code_length must be >= 1"),
            (not self.reads_stage1 or self.distill_dim >= 1,
             "distill_dim must be >= 1 when distill, history_stage1 or item_head_stage1 is on"),
            (self.max_history >= 1, "max_history must be >= 1"),
        ] if not ok]
        if problems:
            raise ValueError("GeneratorConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeneratorConfig":
        """This config from a dict with exactly its fields (model_config.json); anything else is refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"GeneratorConfig: unknown field(s) {unknown}; was the model saved by another version?")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
