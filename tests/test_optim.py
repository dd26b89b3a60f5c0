"""prorec.optim.RowSparseAdam: row-sparse updates give the parameters dense Adam gives when every row
takes part in every step, leave the other rows alone, and work for both models' per-item tables."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from prorec.models.din import DIN, DINConfig
from prorec.models.generator import Generator, GeneratorConfig
from prorec.optim import RowSparseAdam


def _train(model, opt, batches, loss_fn):
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, *batch).backward()
        opt.step()


@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.01, False), (0.01, True)])
def test_sparse_rows_equal_dense_adam_when_every_row_is_touched(wd, decoupled):
    torch.manual_seed(0)
    dense = torch.nn.Embedding(50, 8)
    sparse = copy.deepcopy(dense)
    sparse.sparse = True
    opt_d = torch.optim.Adam(dense.parameters(), lr=0.05, weight_decay=wd, decoupled_weight_decay=decoupled)
    opt_s = RowSparseAdam(sparse.parameters(), lr=0.05, weight_decay=wd, decoupled_weight_decay=decoupled)
    target = torch.randn(50, 8)
    batches = [(torch.cat([torch.randperm(50), torch.randint(0, 50, (20,))]),) for _ in range(6)]  # all rows, some twice

    def loss(m, idx):
        return ((m(idx) - target[idx]) ** 2).sum()

    _train(dense, opt_d, batches, loss)
    _train(sparse, opt_s, batches, loss)
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-5, atol=1e-6)
    # The same state, so a checkpoint of one is a checkpoint of the other.
    sd, ss = opt_d.state_dict()["state"][0], opt_s.state_dict()["state"][0]
    torch.testing.assert_close(ss["exp_avg"], sd["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ss["exp_avg_sq"], sd["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert float(ss["step"]) == float(sd["step"]) == len(batches)


@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.05, True)])
def test_rows_a_step_skips_are_caught_up_to_what_dense_adam_gives(wd, decoupled, tmp_path):
    """A few rows a step, a warm-up schedule, 300 steps: the rows that steps skipped are caught up
    (as a forward reads them, and all of them at flush), to dense Adam's weights and moments; a
    checkpoint in the middle (saved and loaded weights_only) changes nothing."""
    torch.manual_seed(0)
    n = 40
    dense = torch.nn.Embedding(n, 6)
    target = torch.randn(n, 6)
    kw = dict(lr=0.02, weight_decay=wd, decoupled_weight_decay=decoupled)

    def sparse_twin():
        m = copy.deepcopy(dense)
        m.sparse = True
        o = RowSparseAdam(m.parameters(), **kw)
        o.track(m)
        return m, o, torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 10))

    rows = [torch.randint(0, n, (5,), generator=torch.Generator().manual_seed(s)) for s in range(300)]

    def run(m, o, sched, steps):
        for idx in steps:
            o.zero_grad(set_to_none=True)
            ((m(idx) - target[idx]) ** 2).sum().backward()
            o.step()
            sched.step()

    od = torch.optim.Adam(dense.parameters(), **kw)
    sparse, os_, ss = sparse_twin()  # made before dense trains: the same start
    run(dense, od, torch.optim.lr_scheduler.LambdaLR(od, lambda s: min(1.0, (s + 1) / 10)), rows)
    run(sparse, os_, ss, rows[:150])
    torch.save({"m": sparse.state_dict(), "o": os_.state_dict(), "s": ss.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed, ro, rs = sparse_twin()
    resumed.load_state_dict(saved["m"])
    ro.load_state_dict(saved["o"])
    rs.load_state_dict(saved["s"])
    assert ro.state[resumed.weight]["last"].dtype == torch.long
    run(resumed, ro, rs, rows[150:])
    ro.flush()
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(resumed.weight, dense.weight, rtol=1e-4, atol=2e-4)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ro.state[resumed.weight][k], od.state[dense.weight][k], rtol=1e-2, atol=1e-5)


def test_dense_parameters_still_take_torch_adam():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    twin = copy.deepcopy(lin)
    a, b = torch.optim.Adam(lin.parameters(), lr=0.01), RowSparseAdam(twin.parameters(), lr=0.01)
    x = torch.randn(16, 5)
    for opt, m in ((a, lin), (b, twin)):
        for _ in range(3):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    assert torch.equal(lin.weight, twin.weight) and torch.equal(lin.bias, twin.bias)


@pytest.mark.parametrize("tied", [False, True])
def test_the_generator_trains_to_the_same_weights_with_sparse_item_tables(tied):
    # 256 items, codes (prefix, token) with K=16: every batch's histories hold every item, and its
    # targets every prefix, so every row of the item-ID embedding and of the item head is touched.
    # Tied (stage2.tie_item_head), the one table gets both uses' row-sparse gradients.
    torch.manual_seed(0)
    n, k = 256, 16
    codes = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.stack([torch.arange(n) // k, torch.arange(n) % k], 1)])
    cfg = GeneratorConfig(n_items=n, k=k, code_length=2, d_model=32, n_heads=2, ff_dim=64, dropout=0.0,
                          decoder_layers=1, distill=False, tie_item_head=tied)
    dense = Generator(cfg, codes)
    sparse = copy.deepcopy(dense)
    sparse.set_sparse_grads(True)
    batches = [((torch.randperm(n) + 1).view(-1, 4), (torch.arange(64) * 4) % n + 1) for _ in range(4)]

    def loss(m, h, t):
        return m(h, t)["loss"]

    _train(dense, torch.optim.Adam(dense.parameters(), lr=1e-2), batches, loss)
    _train(sparse, RowSparseAdam(sparse.parameters(), lr=1e-2), batches, loss)
    assert sparse.item_out.weight.grad.is_sparse and sparse.item_out_bias.weight.grad.is_sparse
    assert sparse.item_emb.weight.grad.is_sparse
    for (name, a), b in zip(dense.state_dict().items(), sparse.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)


def test_din_trains_to_the_same_weights_with_a_sparse_item_table():
    torch.manual_seed(0)
    din = DIN(DINConfig(n_items=40, dim=16, max_history=5, dropout=0.0))
    twin = copy.deepcopy(din)
    twin.item_emb.sparse = True
    hist = torch.arange(1, 41).view(8, 5)  # every item in every batch's histories

    def loss(m, h, t):
        return m.full_softmax_loss(h, t)

    batches = [(hist[torch.randperm(8)], torch.randint(1, 41, (8,))) for _ in range(4)]
    _train(din, torch.optim.Adam(din.parameters(), lr=1e-2), batches, loss)
    _train(twin, RowSparseAdam(twin.parameters(), lr=1e-2), batches, loss)
    assert twin.item_emb.weight.grad.is_sparse
    torch.testing.assert_close(twin.item_emb.weight, din.item_emb.weight, rtol=1e-5, atol=1e-6)
    # The score MLP's output bias gets a zero gradient up to float rounding (a softmax does not see a
    # shift), and Adam turns that rounding noise into steps of up to lr each: it may differ by up to
    # lr a step. Its lin2.bias feeds the score almost as a shift: compare it loosely too.
    tolerance = {"score_mlp.out.bias": len(batches) * 1e-2, "score_mlp.lin2.bias": 2e-3}
    for (name, a), b in zip(din.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=tolerance.get(name, 1e-5), msg=name)


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    """One of `world` gloo processes: a sparse table and a dense layer under DDP, the table left to
    RowSparseAdam, trained a few steps on rank-specific rows (rank 1 touches none of `other` on step 0)."""
    import torch.distributed as dist

    from prorec.optim import RowSparseAdam, exclude_row_sparse_from_ddp

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(50, 4, sparse=True),
                                 "other": torch.nn.Embedding(50, 4, sparse=True), "lin": torch.nn.Linear(4, 1)})

    class Net(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.register_buffer("fixed", torch.full((3,), float(rank)))  # a fixed table, per worker here

        def forward(self, rows, other):
            x = self.m["emb"](rows).sum(1)
            if other is not None:
                x = x + self.m["other"](other).sum(1)
            return self.m["lin"](x).pow(2).mean()

    net = Net(model)
    assert exclude_row_sparse_from_ddp(net) == ["m.emb.weight", "m.other.weight"]
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = RowSparseAdam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(4):
        rows = torch.randint(1, 50, (6, 3), generator=g)
        other = None if (rank == 1 and step == 0) else torch.randint(1, 50, (6, 2), generator=g)
        opt.zero_grad(set_to_none=True)
        ddp(rows, other).backward()
        opt.step()
    opt.flush()
    assert torch.equal(net.fixed, torch.full((3,), float(rank)))  # DDP broadcast no buffer from rank 0
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_row_sparse_gradients_average_over_workers_like_dense_ddp(tmp_path):
    """Two gloo workers: the sparse tables, all-reduced by RowSparseAdam instead of DDP, train to the
    weights one process reaches on the mean of the two workers' gradients; and both workers hold the
    same weights."""
    import torch.multiprocessing as mp

    world, out = 2, str(tmp_path / "w")
    mp.spawn(_ddp_worker, args=(world, f"file://{tmp_path / 'init'}", out), nprocs=world, join=True)
    w0, w1 = torch.load(f"{out}.0", weights_only=True), torch.load(f"{out}.1", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # The reference: one process, the mean of both workers' losses (= the mean gradient).
    torch.manual_seed(0)
    ref = torch.nn.ModuleDict({"emb": torch.nn.Embedding(50, 4, sparse=True), "other": torch.nn.Embedding(50, 4, sparse=True),
                               "lin": torch.nn.Linear(4, 1)})
    opt = RowSparseAdam(ref.parameters(), lr=0.05)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(world)]
    for step in range(4):
        loss = 0.0
        for r in range(world):
            rows = torch.randint(1, 50, (6, 3), generator=gens[r])
            x = ref["emb"](rows).sum(1)
            if not (r == 1 and step == 0):
                x = x + ref["other"](torch.randint(1, 50, (6, 2), generator=gens[r])).sum(1)
            loss = loss + ref["lin"](x).pow(2).mean() / world
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.flush()
    for k, v in ref.state_dict().items():
        assert torch.allclose(w0[k], v, atol=1e-6), k


def test_rows_skipped_for_longer_than_the_tail_take_the_cached_tail_and_equal_dense_adam(tmp_path):
    """Rows left alone for more than TAIL_STEPS steps are caught up through the cached whole-tail
    coefficient (`RowSparseAdam._tail`, by their last step), the others term by term: both equal
    dense Adam under a varying learning rate, also after a checkpoint that lacks the cache (saved
    before it existed) or holds it."""
    from prorec.optim import TAIL_STEPS

    torch.manual_seed(1)
    n, steps = 30, TAIL_STEPS * 2 + 100
    dense = torch.nn.Embedding(n, 4)
    target = torch.randn(n, 4)
    schedule = lambda s: 0.55 + 0.45 * math.cos(s / 37)  # noqa: E731  every step's size differs

    half = TAIL_STEPS + 40

    def rows_at(s):
        """Rows 0-9 early on and again just before `half`, so that the last flush catches them up over
        more than TAIL_STEPS steps from fresh moments (the cache's entries after the checkpoint); 10-19
        always; row 20 once mid-run; rows 21 and 22 left exactly TAIL_STEPS and TAIL_STEPS - 1 steps
        before the last flush (the two paths' boundary); 23-29 never."""
        idx = [10 + s % 10, 10 + (s * 7) % 10]
        if s < 15 or half - 15 <= s < half:
            idx += [s % 10]
        if s == TAIL_STEPS // 2:
            idx += [20]
        if s == steps - TAIL_STEPS - 1:
            idx += [21]
        if s == steps - TAIL_STEPS:
            idx += [22]
        return torch.tensor(idx)

    def twin():
        m = copy.deepcopy(dense)
        m.sparse = True
        o = RowSparseAdam(m.parameters(), lr=0.03)
        o.track(m)
        return m, o, torch.optim.lr_scheduler.LambdaLR(o, schedule)

    def run(m, o, sched, span):
        for s in span:
            idx = rows_at(s)
            o.zero_grad(set_to_none=True)
            ((m(idx) - target[idx]) ** 2).sum().backward()
            o.step()
            sched.step()

    od = torch.optim.Adam(dense.parameters(), lr=0.03)
    runs = [twin() for _ in range(3)]
    run(dense, od, torch.optim.lr_scheduler.LambdaLR(od, schedule), range(steps))
    tails = []
    for which, (m, o, sched) in enumerate(runs):
        run(m, o, sched, range(half))
        o.flush()  # rows 0-9 skipped > TAIL_STEPS steps: the cached tail; row 20 fewer: term by term
        if which:  # through a checkpoint: with the cache (1), without it as saved before it existed (2)
            torch.save({"m": m.state_dict(), "o": o.state_dict(), "s": sched.state_dict()}, tmp_path / "c.pt")
            saved = torch.load(tmp_path / "c.pt", weights_only=True)
            if which == 2:
                assert "tail" in saved["o"]["state"][0]
                del saved["o"]["state"][0]["tail"]
            m, o, sched = twin()
            m.load_state_dict(saved["m"])
            o.load_state_dict(saved["o"])
            sched.load_state_dict(saved["s"])
            assert which == 2 or o.state[m.weight]["tail"].dtype == torch.float64
        run(m, o, sched, range(half, steps))
        o.flush()
        torch.testing.assert_close(m.weight, dense.weight, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(o.state[m.weight]["exp_avg"], od.state[dense.weight]["exp_avg"], rtol=1e-2, atol=1e-5)
        tails.append(o.state[m.weight]["tail"])
    assert tails[0].numel() >= steps - TAIL_STEPS + 1  # the cached path really ran, up to the last flush
    for t in tails[1:]:  # saved and reloaded, or rebuilt in one go from the step sizes: the same table
        torch.testing.assert_close(t[: tails[0].numel()], tails[0], rtol=1e-12, atol=0)


def test_the_cached_tail_is_the_sum_of_its_terms():
    from prorec.optim import TAIL_STEPS

    sizes = torch.rand(TAIL_STEPS + 50, dtype=torch.float64)
    state, r = {"sizes": sizes}, 0.9 / math.sqrt(0.999)
    first = RowSparseAdam._tail(state, r, 10).clone()  # s = 0 .. 10
    tail = RowSparseAdam._tail(state, r, 50)  # extended, not recomputed
    assert tail.numel() == 51 and torch.equal(tail[:11], first)
    for s in (0, 7, 50):
        want = sum(float(sizes[s + j - 1]) * r ** j for j in range(1, TAIL_STEPS + 1))
        assert math.isclose(float(tail[s]), want, rel_tol=1e-12)
