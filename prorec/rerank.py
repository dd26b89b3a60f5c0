"""Rerank the generator's beam with Stage I's DIN (not in the paper; `eval.rerank_weight`).

The beam search returns each user's `eval.beam_size` most likely items under the generator, with
their log-probabilities log p_G(i | u). Stage I trained a DIN retriever on the same histories; its
score s_D(u, i) is a logit of a softmax over the catalogue. The reranked order is

    log p_G(i | u) + w * s_D(u, i)      over the beam's candidates,

a product of the two models' distributions restricted to the beam (DIN's normaliser is the same
for every candidate of a user, so it drops out). w = 0 is the generator alone, the paper's
inference. Scoring 100 candidates costs DIN O(100 * T) per user, small beside the beam search.
Why it helps, measured on Beauty: benchmarks/results/beauty_rerank.md.

Stage I writes the DIN it trained to `stage1/din.safetensors` (`save_din`); `load_din` rebuilds it,
and for a run directory made before that file existed it exports it from Stage I's last checkpoint.
"""
from __future__ import annotations

from pathlib import Path
import torch

from prorec.beam import NEG_INF, BeamResult
from prorec.models.din import DIN, DINConfig
from prorec.trainer import CKPT_FILE

DIN_FILE = "din.safetensors"
DIN_PREFIX = "din."  # Stage I's model holds its DIN under this prefix


def din_state(stage1_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DIN's weights out of Stage I's model state (its "din." entries, prefix removed)."""
    return {k[len(DIN_PREFIX):]: v for k, v in stage1_state.items() if k.startswith(DIN_PREFIX)}


def save_din(stage1_dir: Path, din_state: dict[str, torch.Tensor]) -> Path:
    """Write DIN's weights (keys of `DIN.state_dict()`) to stage1_dir/din.safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(stage1_dir) / DIN_FILE
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in din_state.items()}, str(tmp))
    tmp.replace(path)
    return path


def din_config_of(state: dict[str, torch.Tensor]) -> DINConfig:
    """The DINConfig whose model has these weights: sizes read from the tensors' shapes, the rest
    (attention without softmax, dot residual) as Stage I builds it."""
    n_items, dim = state["item_emb.weight"].shape
    return DINConfig(n_items=n_items - 1, dim=dim, max_history=state["recency_emb.weight"].shape[0],
                     attention_hidden=state["attention.lin2.weight"].shape[1],
                     mlp_hidden=(state["score_mlp.lin2.weight"].shape[1], state["score_mlp.lin2.weight"].shape[0]))


def _from_checkpoint(stage1_dir: Path) -> dict[str, torch.Tensor] | None:
    """DIN's best weights from the newest Stage I checkpoint under stage1_dir (in-process or Ray), if any."""
    found = sorted((p for p in stage1_dir.rglob(CKPT_FILE)), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    return din_state(torch.load(found[-1], weights_only=True, map_location="cpu")["best_model"])


def load_din(stage1_dir: str | Path, device: torch.device | str = "cpu") -> DIN:
    """Stage I's DIN from stage1_dir/din.safetensors, in eval mode."""
    from safetensors.torch import load_file

    stage1_dir = Path(stage1_dir)
    path = stage1_dir / DIN_FILE
    if path.is_file():
        state = load_file(str(path))
    else:
        state = _from_checkpoint(stage1_dir)
        if state is None:
            raise FileNotFoundError(
                f"{path} is missing, and {stage1_dir} holds no Stage I checkpoint to export it from: "
                "eval.rerank_weight > 0 needs the DIN that Stage I trained (fusion prorec, collaborative or concat). "
                "Set eval.rerank_weight=0, or rerun Stage I (python jobs/pipeline.py ... --from-stage stage1; "
                "that retrains it, and the codes and Stage II after it)")
        save_din(stage1_dir, state)
        print(f"rerank: exported Stage I's DIN from its checkpoint to {path}", flush=True)
    din = DIN(din_config_of(state))
    din.load_state_dict(state)
    return din.to(device).eval()


def right_aligned(history: torch.Tensor) -> torch.Tensor:
    """[U, S] histories right-padded with 0 (the generator's layout) -> left-padded, most recent item
    in the last column (DIN's layout)."""
    s = history.shape[1]
    lens = (history > 0).sum(1, keepdim=True)
    src = torch.arange(s, device=history.device)[None, :] - (s - lens)  # column each slot copies from
    return torch.where(src >= 0, history.gather(1, src.clamp(min=0)), torch.zeros_like(history))


def rerank(items: torch.Tensor, scores: torch.Tensor, din_scores: torch.Tensor, weight: float) -> torch.Tensor:
    """items [U, W] (-1 = empty), their beam log-probs and DIN scores [U, W] -> items reordered by
    log p + weight * DIN (stable: ties keep the beam's order; empty slots last)."""
    total = torch.where(items >= 0, scores.float() + weight * din_scores.float(), NEG_INF)
    return items.gather(1, total.argsort(dim=1, descending=True, stable=True))


class Reranker:
    """Reorders a beam's candidates by log p_G + weight * DIN score."""

    def __init__(self, din: DIN, weight: float) -> None:
        self.din, self.weight = din, weight

    @torch.inference_mode()
    def din_scores(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history [U, S] right-padded, items [U, W] (-1 = empty) -> DIN's scores [U, W] (on items' device)."""
        h = right_aligned(history.to(items.device))[:, -self.din.cfg.max_history:]
        return self.din(h, items.clamp(min=0)).float()

    def __call__(self, history: torch.Tensor, beam: BeamResult) -> torch.Tensor:
        """history [U, S] right-padded and the beam's result -> its items [U, W] reordered."""
        return rerank(beam.items, beam.scores, self.din_scores(history, beam.items), self.weight)
