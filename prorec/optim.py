"""Adam for models whose per-item tables get row-sparse gradients.

A training step touches a few thousand rows of a per-item table (the batch's histories, targets and
sampled negatives), but a dense gradient is the size of the whole table, and Adam then updates every
row and both of its moment tables: at 1.2 million items x 128 that is three 600 MB passes a step,
growing with the catalogue while the step's real work does not. With `sparse=True` embeddings the
gradient holds only the touched rows, and `RowSparseAdam` updates only those rows (and their
moments): a step's cost no longer depends on the catalogue size (benchmarks/results/scale.md).

The update of a touched row is exactly torch's Adam (same moments, bias correction by the
parameter's step count, L2 or decoupled weight decay). Rows a step does not touch are left alone,
moments included ("lazy Adam", as `torch.optim.SparseAdam` and TensorFlow's LazyAdam): dense Adam
would keep moving them by their decaying momentum. So the two agree exactly when every row is
touched every step (tests/test_optim.py) and differ, by design, for rows left out of a step.
Dense-gradient parameters go through torch's Adam unchanged.
"""
from __future__ import annotations

import math

import torch


class RowSparseAdam(torch.optim.Adam):
    """torch.optim.Adam that also takes sparse (COO, row-indexed) gradients and updates only their rows."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse: list[tuple[dict, torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    sparse.append((group, p, p.grad))
                    p.grad = None  # torch's Adam skips it; the row update below does it
        try:
            super().step()
        finally:
            for _, p, g in sparse:
                p.grad = g
        for group, p, g in sparse:
            self._row_step(group, p, g)
        return loss

    def _row_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad = grad.coalesce()
        rows, g = grad.indices()[0], grad.values()
        if rows.numel() == 0:
            return
        state["step"] += 1
        step = float(state["step"])
        w = p.index_select(0, rows)
        if wd != 0:
            if group.get("decoupled_weight_decay", False):
                w.mul_(1 - lr * wd)
            else:
                g = g + wd * w
        m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(g, alpha=1 - beta1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
        w.addcdiv_(m, denom, value=-lr / bias1)
        p.index_copy_(0, rows, w)
