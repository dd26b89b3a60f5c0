"""The shared epoch loop (early stopping, the epoch count, resume from a checkpoint) and its batching."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from prorec.trainer import LocalContext, length_grouped_batches, run_epochs


class ScriptedTrainer:
    """Validation scores from a script; the 'model' is one tensor that counts trained epochs."""

    def __init__(self, scores: list[float]):
        self.scores, self.w = scores, torch.zeros(1)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.w += 1
        return {"loss": 1.0 / (epoch + 1)}

    def validate(self) -> dict[str, float]:
        return {"score": self.scores[int(self.w.item()) - 1]}

    def state_dict(self):
        return {"w": self.w.clone()}

    def load_state_dict(self, state):
        self.w = state["w"].clone()

    def model_state(self):
        return {"w": self.w}


def test_patience_stops_and_counts_only_epochs_that_ran(tmp_path):
    fit = run_epochs(ScriptedTrainer([0.1, 0.3, 0.2, 0.25, 0.1, 0.9]), LocalContext(tmp_path, verbose=False),
                     max_epochs=6, patience=2, score_key="score")
    assert [h["epoch"] for h in fit.history] == [0, 1, 2, 3]  # epochs 2 and 3 did not beat 0.3
    assert fit.epochs_run == 4
    assert fit.best_metrics["epoch"] == 1 and fit.best_model_state["w"].item() == 2.0


def test_resume_continues_after_the_last_checkpointed_epoch(tmp_path):
    scores = [0.1, 0.2, 0.3, 0.4]
    first = run_epochs(ScriptedTrainer(scores), LocalContext(tmp_path, verbose=False), 4, 3, "score",
                       stop_after_epoch=1)
    assert first.epochs_run == 2
    resumed = run_epochs(ScriptedTrainer(scores), LocalContext(tmp_path, verbose=False), 4, 3, "score")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3] and resumed.epochs_run == 4
    assert resumed.best_model_state["w"].item() == 4.0  # the weights continued from the checkpoint


class StaleCopyCheck(ScriptedTrainer):
    """Fails if, while it trains, a stale copy of its state is still alive: the checkpoint it resumed
    from, or the previous best weights once a new best is being copied (run_epochs keeps one copy)."""

    def __init__(self, scores: list[float]):
        super().__init__(scores)
        self.loaded, self.best_copies = None, []

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.loaded = weakref.ref(state["w"])

    def train_epoch(self, epoch: int) -> dict[str, float]:
        gc.collect()
        assert self.loaded is None or self.loaded() is None, "the resumed checkpoint is still held"
        return super().train_epoch(epoch)

    def model_state(self):
        gc.collect()
        assert all(ref() is None for ref in self.best_copies), "the previous best copy is still held"
        return super().model_state()


class RecordingContext(LocalContext):
    def __init__(self, ckpt_dir, trainer: StaleCopyCheck):
        super().__init__(ckpt_dir, verbose=False)
        self.trainer = trainer

    def report(self, metrics, state):
        super().report(metrics, state)
        self.trainer.best_copies.append(weakref.ref(state["best_model"]["w"]))


def test_run_epochs_holds_one_best_copy_and_lets_the_resumed_checkpoint_go(tmp_path):
    """Memory: at a million items a copy of the model is GBs; run_epochs must not hold two best copies
    at once, nor carry the checkpoint it resumed from through training."""
    scores = [0.1, 0.2, 0.3, 0.4]
    first = StaleCopyCheck(scores)
    run_epochs(first, RecordingContext(tmp_path, first), 4, 3, "score", stop_after_epoch=1)
    resumed = StaleCopyCheck(scores)
    fit = run_epochs(resumed, RecordingContext(tmp_path, resumed), 4, 3, "score")
    assert resumed.loaded is not None and fit.epochs_run == 4 and fit.best_model_state["w"].item() == 4.0


def test_all_finite_agrees_with_isfinite_and_never_checks_more_than_a_block(monkeypatch):
    """The epoch-end weight check, block by block: the same answer as torch.isfinite(t).all(), for a
    bad value anywhere (the last, partial block too), without a mask the size of the table."""
    from prorec import trainer

    t = torch.randn(1000, 7)
    assert trainer.all_finite(t, block=64) and trainer.all_finite(torch.zeros(0), block=64)
    seen, real = [], torch.isfinite

    def spy(x):
        seen.append(x.numel())
        return real(x)

    monkeypatch.setattr(torch, "isfinite", spy)
    for at in (0, 63, 64, 6999):
        for bad in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u.view(-1)[at] = bad
            assert not trainer.all_finite(u, block=64), (at, bad)
    assert max(seen) <= 64
    monkeypatch.setattr(torch, "isfinite", real)
    guard = trainer.DivergenceGuard("stage2", "cpu")
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(trainer.TrainingDiverged, match="weight weight is not finite"):
        guard.check(0, model, "lower the rate")


def test_length_grouped_batches_cover_rows_once_and_cut_padding():
    rng = np.random.default_rng(0)
    rows = np.arange(10_000)
    lengths = rng.integers(1, 21, size=rows.size)
    batches = length_grouped_batches(rows, lengths, 64, steps=10_000, rng=np.random.default_rng(1), group=8)
    together = np.concatenate(batches)
    assert np.array_equal(np.sort(together), rows)  # every row exactly once
    # Padded tokens (each batch to its longest row) against a plain shuffle's.
    grouped = sum(len(b) * lengths[b].max() for b in batches)
    plain = sum(len(b) * lengths[b].max() for b in np.array_split(np.random.default_rng(1).permutation(rows), len(batches)))
    assert grouped < 0.75 * plain
    # Deterministic for a seed, different for another, and `steps` truncates.
    again = length_grouped_batches(rows, lengths, 64, steps=10_000, rng=np.random.default_rng(1), group=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = length_grouped_batches(rows, lengths, 64, steps=10_000, rng=np.random.default_rng(2), group=8)
    assert not np.array_equal(batches[0], other[0])
    assert len(length_grouped_batches(rows, lengths, 64, steps=5, rng=np.random.default_rng(1))) == 5


def test_a_capped_epoch_draws_only_the_groups_its_steps_use():
    """steps well below a whole pass: `steps` full batches of distinct rows drawn from all over the
    split, as length-grouped as a whole pass's, from only ceil(steps / group) groups' worth of rows."""
    rng = np.random.default_rng(0)
    rows = np.arange(3, 2_000_003)  # row ids, not positions
    lengths = np.zeros(rows.max() + 1, dtype=np.int64)
    lengths[rows] = rng.integers(1, 21, size=rows.size)
    batches = length_grouped_batches(rows, lengths, 64, steps=10, rng=np.random.default_rng(1), group=8)
    assert len(batches) == 10 and all(len(b) == 64 for b in batches)
    together = np.concatenate(batches)
    assert len(np.unique(together)) == 640 and np.isin(together, rows).all()
    assert together.min() < 200_000 and together.max() > 1_800_000  # from the whole split, not its head
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 6  # length-grouped: a batch of 64 uniform draws spans about 19
    again = length_grouped_batches(rows, lengths, 64, steps=10, rng=np.random.default_rng(1), group=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_decoupled_weight_decay_shrinks_the_weights_whatever_the_gradient_scale():
    """With a zero gradient, Adam's L2 decay is rescaled by Adam itself (each step moves the weight
    by about lr, whatever the decay); the decoupled decay shrinks it by lr * weight_decay a step."""

    from prorec.config import Stage2Config
    from prorec.trainer import adam

    def after_one_step(decoupled: bool) -> float:
        w = torch.nn.Parameter(torch.tensor([2.0]))
        opt = adam([w], Stage2Config(lr=0.1, weight_decay=0.01, decoupled_weight_decay=decoupled))
        w.grad = torch.zeros(1)
        opt.step()
        return float(w.detach())

    assert after_one_step(True) == pytest.approx(2.0 * (1 - 0.1 * 0.01))
    assert after_one_step(False) == pytest.approx(2.0 - 0.1, abs=1e-4)  # Adam normalises the L2 gradient


def test_an_unreadable_checkpoint_is_set_aside_and_the_one_before_is_used(tmp_path, capsys):
    ctx = LocalContext(tmp_path, verbose=False)
    ctx.report({}, {"epoch": 0})
    ctx.report({}, {"epoch": 1})  # state.pt = epoch 1, state.prev.pt = epoch 0
    (tmp_path / "state.pt").write_bytes(b"truncated")
    assert ctx.load_checkpoint() == {"epoch": 0}
    assert (tmp_path / "state.pt.corrupt").is_file() and "cannot be read" in capsys.readouterr().out
    (tmp_path / "state.prev.pt").write_bytes(b"")
    assert ctx.load_checkpoint() is None  # nothing readable: train from scratch


def test_the_divergence_guard_names_the_epoch_the_step_and_the_last_finite_loss():
    from prorec.trainer import DivergenceGuard, TrainingDiverged

    model = torch.nn.Linear(2, 2)
    guard = DivergenceGuard("stage2", "cpu")
    for step, loss in enumerate([3.0, 2.5, float("nan"), 1.0]):
        guard.update(step, torch.tensor(loss))
    with pytest.raises(TrainingDiverged, match=r"epoch 4, step 2 \(the last finite loss was 2.5 at step 1\)\. Fix: x"):
        guard.check(4, model, "x")
    guard.reset()
    guard.update(0, torch.tensor(1.0))
    guard.check(0, model, "x")  # finite: no error
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="weight weight is not finite after epoch 1"):
        guard.check(1, model, "x")


def test_steps_per_epoch_caps_an_epoch_and_zero_means_a_whole_pass():
    from prorec.trainer import capped_steps

    assert capped_steps(500, 0) == 500
    assert capped_steps(500, 200) == 200
    assert capped_steps(100, 200) == 100


def test_sparse_gradients_fall_back_to_dense_only_for_several_gpu_workers(capsys):
    """Several GPU workers train dense (their sparse path is untested); CPU workers and a single worker
    take sparse gradients."""
    from prorec.config import Stage1Config
    from prorec.trainer import use_sparse_grads

    cfg = Stage1Config()
    assert use_sparse_grads(cfg, torch.device("cpu"), 4, "stage1")
    assert use_sparse_grads(cfg, torch.device("cuda"), 1, "stage1")
    assert capsys.readouterr().out == ""
    assert not use_sparse_grads(cfg, torch.device("cuda"), 2, "stage1")
    assert "GPU workers train with dense gradients" in capsys.readouterr().out
    assert not use_sparse_grads(Stage1Config(sparse_grads=False), torch.device("cpu"), 1, "stage1")


def test_strict_spread_on_too_few_nodes_warns_at_once_with_the_fix(monkeypatch, capsys):
    import ray

    from prorec.config import Stage2Config
    from prorec.trainer import _check_spread

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    _check_spread(Stage2Config(num_workers=2, placement_strategy="STRICT_SPREAD"), "stage2")  # no Ray yet: nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    _check_spread(Stage2Config(num_workers=2, placement_strategy="STRICT_SPREAD"), "stage2")
    err = capsys.readouterr().err
    assert "needs 2 nodes" in err and "1 is alive" in err and "stage2.placement_strategy=SPREAD" in err
    for fine in (Stage2Config(num_workers=2, placement_strategy="SPREAD"), Stage2Config(num_workers=1, placement_strategy="STRICT_SPREAD")):
        _check_spread(fine, "stage2")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * 2)
    _check_spread(Stage2Config(num_workers=2, placement_strategy="STRICT_SPREAD"), "stage2")
    assert capsys.readouterr().err == ""


def test_the_learning_rate_warms_up_then_stays_or_falls_along_a_cosine_to_zero():
    from prorec.trainer import warmup_lambda

    const, cos = warmup_lambda(10), warmup_lambda(10, "cosine", 110)
    for step in range(10):  # the same warm-up either way
        assert const(step) == cos(step) == pytest.approx((step + 1) / 10)
    assert [const(s) for s in (10, 60, 109, 500)] == [1.0] * 4
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12)
    falling = [cos(s) for s in range(10, 111)]
    assert all(a > b for a, b in zip(falling, falling[1:]))
    assert cos(200) == pytest.approx(0.0, abs=1e-12)  # past the last planned step it stays at 0
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        warmup_lambda(10, "linear", 100)


@pytest.mark.parametrize("sparse,tied", [(False, False), (True, False), (False, True), (True, True)])
def test_item_weight_decay_reaches_the_per_item_tables_only(sparse, tied):
    """stage2.item_weight_decay: with a zero gradient, Adam's L2 moves exactly the weights it decays,
    so one step shows which group each weight is in, dense or with row-sparse item tables."""
    from prorec.config import Stage2Config
    from prorec.models.generator import Generator, GeneratorConfig
    from prorec.stage2 import param_groups
    from prorec.trainer import adam

    def step(**kw) -> tuple[bool, bool]:
        """(whether the per-item tables moved, whether any other weight moved)."""
        torch.manual_seed(0)
        codes = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 0], [1, 1], [2, 0]])  # row 0: padding
        model = Generator(GeneratorConfig(n_items=5, k=3, code_length=2, d_model=16, n_heads=2, ff_dim=32,
                                          decoder_layers=1, tie_item_head=tied), codes)
        model.set_sparse_grads(sparse)
        cfg = Stage2Config(lr=0.1, **kw)
        opt = adam(param_groups(model, cfg), cfg)
        if sparse:
            opt.track(*model.item_tables())  # each tracked table finds its own group
        item = {id(t.weight) for t in model.item_tables()}
        params = list(model.parameters())
        assert sum(len(g["params"]) for g in opt.param_groups) == len(params)  # each weight once
        before = [p.detach().clone() for p in params]
        hist = torch.tensor([[1, 2, 0]])
        loss = 0.0 * model(hist, torch.tensor([3]))["loss"]  # every weight gets a gradient of 0
        loss.backward()
        opt.step()
        if sparse:
            opt.flush()
        moved = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
        return (any(m for m, p in zip(moved, params) if id(p) in item),
                any(m for m, p in zip(moved, params) if id(p) not in item))

    assert step(weight_decay=0.01) == (True, True)  # sparse: the rows this batch read
    assert step(weight_decay=0.01, item_weight_decay=0.0) == (False, True)
    assert step(weight_decay=0.0, item_weight_decay=0.01) == (True, False)
    assert step(weight_decay=0.0) == (False, False)


def test_a_cosine_that_the_warm_up_covers_says_the_rate_never_falls(capsys):
    from prorec.config import Stage2Config
    from prorec.trainer import lr_scheduler

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    lr_scheduler(opt, Stage2Config(lr_schedule="cosine", warmup_steps=100, max_epochs=2), 40, "stage2")
    assert "warm-up (100 steps) covers all 80 training steps" in capsys.readouterr().err
    lr_scheduler(opt, Stage2Config(lr_schedule="cosine", warmup_steps=100, max_epochs=3), 40, "stage2")
    lr_scheduler(opt, Stage2Config(lr_schedule="constant", warmup_steps=100, max_epochs=1), 40, "stage2")
    assert capsys.readouterr().err == ""


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch):
    import warnings

    from prorec import devices, trainer

    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="stage1.bf16 is on, but this CPU has no bfloat16 instructions.*stage1.bf16=false"):
        trainer.warn_if_bf16_is_emulated("stage1", torch.device("cpu"))
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.warn_if_bf16_is_emulated("stage1", torch.device("cpu"))
        trainer.warn_if_bf16_is_emulated("stage1", torch.device("cuda"))  # a GPU's bf16 is its own
