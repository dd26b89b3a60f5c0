"""Adam for models whose per-item tables get row-sparse gradients.

A training step touches a few thousand rows of a per-item table (the batch's histories, targets and
sampled negatives), but a dense gradient is the size of the whole table, and Adam then updates every
row and both of its moment tables: at 1.2 million items x 128 that is three 600 MB passes a step,
growing with the catalogue while the step's real work does not. With `sparse=True` embeddings the
gradient holds only the touched rows, and `RowSparseAdam` updates only those rows (and their
moments): a step's cost no longer depends on the catalogue size (benchmarks/results/scale.md).

Dense Adam keeps moving a row on the steps that do not touch it: its gradient is zero there, but its
momentum is not, so every touch is followed by a geometric tail of updates. Plain "lazy" Adam
(`torch.optim.SparseAdam`) drops that tail, and on Beauty it trained Stage I visibly worse
(benchmarks/results/sparse_grads_beauty_lazy.md). `RowSparseAdam` instead *catches a row up* when it is
next touched (and every row at `flush`, before a validation or a checkpoint): for the k steps it
skipped,

    m <- beta1^k m,   v <- beta2^k v,
    w <- w - (m / sqrt(v)) * sum_{j=1..k} a_(s+j) r^j,   r = beta1 / sqrt(beta2),
    a_t = lr_t * sqrt(1 - beta2^t) / (1 - beta1^t)        (the step size Adam used at step t),

with s the row's last step. That is dense Adam's own recurrence for a zero gradient, exact but for
Adam's eps (negligible beside sqrt(v) for a row that was ever touched); the sum is cut after
TAIL_STEPS steps, where r^j is below 1e-11. That whole-tail sum depends on s alone, so a row skipped
for at least TAIL_STEPS steps reads it from a table by s (`RowSparseAdam._tail`, each entry computed
once); a row skipped for fewer sums its own k terms. Decoupled weight decay (AdamW) multiplies
the skipped steps' factors (1 - lr_t * wd) in as well, every row term by term (the factors depend
on the step the row is caught up to, so there is no table for them). L2 weight decay (added to
the gradient, torch Adam's default) is not caught up: dense Adam feeds it to every row on every
step, a sparse step only to the rows it touches. tests/test_optim.py checks the parameters against
torch's Adam.

Dense-gradient parameters go through torch's Adam unchanged.

Data-parallel workers. DDP all-reduces the dense gradients; the row-sparse ones it is told to leave
alone (`exclude_row_sparse_from_ddp`, which flags them), and `step` averages those over the workers
itself (`all_reduce_row_sparse`): each worker's touched rows and their values are all-gathered with
dense collectives and summed row by row. DDP's own sparse all-reduce over gloo corrupted the heap
here ("double free or corruption", "malloc(): unaligned tcache chunk": a worker aborted in about
one Stage II run in two on 2 CPU workers, Ray Train 2.60, torch 2.13).
"""
from __future__ import annotations

import math

import torch

TAIL_STEPS = 256  # r^j < 1e-11 past this with Adam's default betas
CATCH_UP_ROWS = 8192  # rows (or tail entries) at once: a block's (rows, TAIL_STEPS) float64 work is 16 MB


ROW_SPARSE_ALL_REDUCE = "row_sparse_all_reduce"  # a parameter flag: RowSparseAdam averages its gradient over the workers


def exclude_row_sparse_from_ddp(model: torch.nn.Module) -> list[str]:
    """Before wrapping `model` in DDP: keep DDP away from the weights of its sparse embedding tables
    (nn.Embedding(sparse=True)) and flag them, so that RowSparseAdam.step all-reduces their
    gradients instead. Returns their names.

    DDP is also kept away from the model's buffers. The project's models hold only fixed tables
    there, which every worker builds from the same artifacts (the generator's codes, sibling
    tables, Stage I rows; nothing like BatchNorm's running statistics). DDP would otherwise
    broadcast them from rank 0 before every forward: at a million items, the Stage I rows alone
    are about 0.5 GB a step."""
    names = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    buffers = [name for name, _ in model.named_buffers()]
    if names or buffers:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names + buffers)
        params = dict(model.named_parameters())
        for n in names:
            setattr(params[n], ROW_SPARSE_ALL_REDUCE, True)
    return names


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def all_reduce_row_sparse(params: list[torch.Tensor]) -> None:
    """Replace each parameter's row-sparse gradient (None = no row touched) by its mean over the
    workers of the default process group, as DDP averages a dense one. Dense collectives only: the
    touched-row counts, then every worker's rows and values padded to the largest count, all-gathered
    and summed row by row (coalesce), in rank order on every worker, so every worker gets the same
    gradient. Every worker must call it with the same parameters in the same order."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in params:
        g = p.grad
        if g is None:
            g = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long, device=p.device),
                                        torch.zeros(0, *p.shape[1:], dtype=p.dtype, device=p.device), p.shape)
        g = g.coalesce()
        rows, values = g.indices()[0], g.values()
        counts = [torch.zeros(1, dtype=torch.long, device=p.device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([rows.numel()], device=p.device))
        most = int(max(int(c) for c in counts))
        pad = most - rows.numel()
        rows_p = torch.cat([rows, rows.new_zeros(pad)])
        values_p = torch.cat([values, values.new_zeros(pad, *values.shape[1:])])
        all_rows = [torch.empty_like(rows_p) for _ in range(world)]
        all_values = [torch.empty_like(values_p) for _ in range(world)]
        dist.all_gather(all_rows, rows_p)
        dist.all_gather(all_values, values_p)
        rows = torch.cat([r[: int(c)] for r, c in zip(all_rows, counts)])
        values = torch.cat([v[: int(c)] for v, c in zip(all_values, counts)]) / world
        p.grad = torch.sparse_coo_tensor(rows[None], values, p.shape).coalesce() if rows.numel() else None


class RowSparseAdam(torch.optim.Adam):
    """torch.optim.Adam that also takes sparse (COO, row-indexed) gradients: each step updates the
    touched rows, after catching them up on the steps they skipped (see the module docstring)."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        synced = [p for group in self.param_groups for p in group["params"] if getattr(p, ROW_SPARSE_ALL_REDUCE, False)]
        if synced and _distributed():  # a flagged model stepped in a plain process has no one to average with
            all_reduce_row_sparse(synced)
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

    # -- the step sizes of the steps so far (each step's lr is the group's at that step)

    @staticmethod
    def _record(group: dict, state: dict, t: int) -> None:
        """Write step t's size a_t (index t - 1 of state["sizes"]) and its cumulative log decay factor
        (index t of state["log_decay"]); both grow by doubling, so a step costs O(1) here."""
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), group["weight_decay"]
        if len(state["sizes"]) < t:
            state["sizes"] = torch.cat([state["sizes"], torch.zeros_like(state["sizes"])])
            state["log_decay"] = torch.cat([state["log_decay"], torch.zeros_like(state["log_decay"])])
        state["sizes"][t - 1] = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        decay = 1 - lr * wd if (wd and group.get("decoupled_weight_decay", False)) else 1.0
        state["log_decay"][t] = state["log_decay"][t - 1] + math.log(max(decay, 1e-300))

    def _catch_up(self, group: dict, p: torch.Tensor, rows: torch.Tensor, until: int) -> None:
        """Bring `rows` of p (and their moments) to step `until`, as dense Adam with zero gradients would;
        CATCH_UP_ROWS rows at a time (the work is at most rows x TAIL_STEPS, and one read a row for a
        row skipped for TAIL_STEPS steps or more)."""
        for lo in range(0, rows.numel(), CATCH_UP_ROWS):
            self._catch_up_block(group, p, rows[lo:lo + CATCH_UP_ROWS], until)

    @staticmethod
    def _tail(state: dict, r: float, upto: int) -> torch.Tensor:
        """tail[s] = sum_{j=1..TAIL_STEPS} a_(s+j) r^j, the whole tail's coefficient of a row last
        stepped at s and skipped for at least TAIL_STEPS steps, for s = 0 .. upto (at least): final
        once step s + TAIL_STEPS is recorded, so it is computed once (here, as needed, CATCH_UP_ROWS
        entries at a time) and kept. It assumes the group's betas (r) never change during a run, as
        no schedule of this project changes them."""
        tail = state.get("tail")
        if tail is None:
            tail = state["sizes"].new_zeros(0)
        if tail.numel() <= upto:
            rpow = r ** torch.arange(1, TAIL_STEPS + 1, dtype=torch.float64, device=tail.device)
            parts = [tail]
            for lo in range(tail.numel(), upto + 1, CATCH_UP_ROWS):  # a block at a time: unfold's product copies it
                hi = min(lo + CATCH_UP_ROWS, upto + 1)
                window = state["sizes"][lo: hi - 1 + TAIL_STEPS].unfold(0, TAIL_STEPS, 1)  # rows s, cols j - 1
                parts.append(window @ rpow)
            tail = torch.cat(parts)
            state["tail"] = tail
        return tail

    def _catch_up_block(self, group: dict, p: torch.Tensor, rows: torch.Tensor, until: int) -> None:
        state = self.state[p]
        last = state["last"].index_select(0, rows)
        k = (until - last).clamp(min=0)
        busy = k > 0
        if not bool(busy.any()):
            return
        rows, last, k = rows[busy], last[busy], k[busy]
        beta1, beta2 = group["betas"]
        r = beta1 / math.sqrt(beta2)
        sizes = state["sizes"]
        m, v = state["exp_avg"].index_select(0, rows), state["exp_avg_sq"].index_select(0, rows)
        direction = torch.where(v > 0, m / v.sqrt().clamp(min=1e-30), torch.zeros_like(m))
        w = p.index_select(0, rows)
        shape = (-1, *[1] * (w.dim() - 1))
        decoupled = bool(group["weight_decay"]) and group.get("decoupled_weight_decay", False)
        # A row skipped for >= TAIL_STEPS steps takes the whole tail, whose coefficient depends on its
        # last step alone (`_tail`, one read); the others (and every row under decoupled weight decay,
        # whose factors depend on `until`) sum their own live terms, up to the block's longest gap.
        whole = (k >= TAIL_STEPS) & (not decoupled)
        coef = torch.zeros(k.numel(), dtype=torch.float64, device=p.device)
        if bool(whole.any()):
            coef[whole] = self._tail(state, r, until - TAIL_STEPS)[last[whole]]
        part = (~whole).nonzero()[:, 0]
        if part.numel():
            lp, kp = last[part], k[part]
            j = torch.arange(1, min(int(kp.max()), TAIL_STEPS) + 1, device=p.device)
            steps = lp[:, None] + j[None, :]  # (R, J): the skipped steps s + j, 1-based
            live = j[None, :] <= kp[:, None]
            at = (steps - 1).clamp(max=until - 1)
            term = sizes[at] * r ** j.double()  # (R, J): dense Adam's update of step s + j, over m / sqrt(v)
            if decoupled:
                # p_T = D(s, T) p_s - sum_j u_(s+j) D(s+j, T), D(a, b) = prod of (1 - lr_t * wd) for t in (a, b]
                term = term * torch.exp(state["log_decay"][until] - state["log_decay"][at + 1])
            coef[part] = torch.where(live, term, 0.0).sum(1)
        if decoupled:
            log_decay = state["log_decay"]
            w.mul_(torch.exp(log_decay[until] - log_decay[last]).to(w.dtype).view(shape))
        w.sub_(direction * coef.to(w.dtype).view(shape))
        kk = k.double().view(-1, *[1] * (m.dim() - 1))
        state["exp_avg"].index_copy_(0, rows, m * (beta1 ** kk).to(m.dtype))
        state["exp_avg_sq"].index_copy_(0, rows, v * (beta2 ** kk).to(v.dtype))
        p.index_copy_(0, rows, w)
        state["last"].index_fill_(0, rows, until)

    def _row_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["last"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)  # step a row is current to
            # a_t of this parameter's steps t = 1, 2, ... (index t - 1), and the sum of log(1 - lr_t * wd)
            # up to step t (index t); float64, beside the parameter, so a catch-up never copies them
            state["sizes"] = torch.zeros(1024, dtype=torch.float64, device=p.device)
            state["log_decay"] = torch.zeros(1025, dtype=torch.float64, device=p.device)
        state["step"] += 1
        t = int(state["step"])
        self._record(group, state, t)
        grad = grad.coalesce()
        rows, g = grad.indices()[0], grad.values()
        if rows.numel() == 0:
            return
        self._catch_up(group, p, rows, t - 1)
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
        bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
        denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
        w.addcdiv_(m, denom, value=-lr / bias1)
        p.index_copy_(0, rows, w)
        state["last"].index_fill_(0, rows, t)

    def track(self, *tables: torch.nn.Module | None) -> None:
        """Catch a table's rows up as a forward pass reads them (a pre-hook on each sparse table, e.g.
        nn.Embedding(sparse=True)), so that the forward sees the weights dense Adam would have:
        without it a row read after skipped steps would be stale until the optimiser touched it."""
        for table in tables:
            if table is None:
                continue
            group = next(g for g in self.param_groups if any(p is table.weight for p in g["params"]))

            def hook(module, args, group=group):
                state = self.state.get(module.weight)
                if state and "last" in state:
                    with torch.no_grad():
                        self._catch_up(group, module.weight, args[0].reshape(-1).unique(), int(state["step"]))

            table.register_forward_pre_hook(hook)

    @torch.no_grad()
    def flush(self) -> None:
        """Catch every row of every sparse parameter up to the last step (call before reading the
        weights: a validation, a checkpoint, the end of training). O(rows) once, not a step."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "last" in state:
                    self._catch_up(group, p, torch.arange(p.shape[0], device=p.device), int(state["step"]))

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        """torch's load casts every state tensor to its parameter's dtype; the row bookkeeping (the
        long `last` steps; the float64 step sizes, log decay factors and whole-tail coefficients) is
        set aside and put back as it was saved. A checkpoint from before the tail cache has none: it
        is rebuilt from the step sizes when first needed."""
        keep = ("last", "sizes", "log_decay", "tail")
        extras, state = {}, {}
        for idx, st in state_dict["state"].items():
            extras[idx] = {k: v for k, v in st.items() if k in keep}
            state[idx] = {k: v for k, v in st.items() if k not in keep}
        super().load_state_dict({**state_dict, "state": state})
        params = [p for group in self.param_groups for p in group["params"]]
        for idx, ex in extras.items():
            p = params[int(idx)]
            for k, v in ex.items():
                self.state[p][k] = v.to(p.device) if k == "last" else v.to(p.device, torch.float64)
