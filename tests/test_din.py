"""DIN scorer, modality adapter and alignment loss: the factorised code against literal references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prorec.models.din import DIN, DINConfig
from prorec.models.modality import AdaLN, ModalityAdapter, alignment_loss, alignment_loss_reference


def _din(softmax: bool = False, n_items: int = 40) -> DIN:
    torch.manual_seed(0)
    return DIN(DINConfig(n_items=n_items, dim=8, max_history=6, attention_hidden=5, mlp_hidden=(7, 3),
                         dropout=0.0, attention_softmax=softmax)).eval()


def _history(b: int = 5, t: int = 6, n_items: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    h = torch.randint(1, n_items + 1, (b, t), generator=g)
    lens = torch.tensor([1, 2, 6, 3, 4][:b])
    return torch.where(torch.arange(t)[None] >= t - lens[:, None], h, 0)  # right-aligned, 0-padded


@pytest.mark.parametrize("softmax", [False, True])
def test_factorised_scores_match_the_literal_din(softmax):
    din, hist = _din(softmax), _history()
    h, mask = din.encode_history(hist)
    for cands in (torch.randint(1, 41, (1, 9)), torch.randint(1, 41, (5, 3))):  # shared and per-user
        c = din.item_emb(cands)
        torch.testing.assert_close(din.score_embedded(h, mask, c), din.score_embedded(h, mask, c, reference=True))


def test_padding_never_changes_a_score():
    din = _din()
    short = torch.tensor([[0, 0, 0, 3, 7, 2]])
    longer_padding = torch.tensor([[0, 3, 7, 2]])  # same items, less padding: recency is from the end
    c = torch.tensor([[5, 9, 11]])
    torch.testing.assert_close(din(short, c), din(longer_padding, c))


def test_score_all_ranks_the_whole_catalogue_in_chunks():
    din, hist = _din(), _history()
    all_items = torch.arange(1, 41)[None]
    full = din.score_all(hist, chunk=7)  # chunks that do not divide N
    assert full.shape == (5, 41) and torch.isinf(full[:, 0]).all()
    torch.testing.assert_close(full[:, 1:], din(hist, all_items))


def test_sampled_softmax_ignores_a_negative_equal_to_the_target():
    din, hist = _din(), _history(b=2)
    target = torch.tensor([4, 9])
    negs = torch.tensor([1, 2, 3])
    base = din.sampled_softmax_loss(hist, target, negs)
    with_dup = din.sampled_softmax_loss(hist, target, torch.tensor([1, 2, 3, 4]))  # 4 is user 0's target
    scores = din(hist, torch.tensor([[4, 1, 2, 3], [9, 1, 2, 3]]).view(2, 4))
    # user 1 still sees item 4 as a negative, user 0 must not
    expected = 0.5 * (F.cross_entropy(scores[:1], torch.tensor([0])) +
                      F.cross_entropy(torch.cat([scores[1:], din(hist[1:], torch.tensor([[4]]))], 1), torch.tensor([0])))
    torch.testing.assert_close(with_dup, expected)
    assert not torch.isclose(base, with_dup)


def test_in_batch_loss_equals_the_full_softmax_when_the_batch_is_the_catalogue():
    din = _din(n_items=4)
    hist = torch.tensor([[0, 2], [1, 3], [0, 4], [2, 1]])
    target = torch.tensor([1, 2, 3, 4])
    # every item once in the batch: expected count 1, log_q = 0, so in-batch = full softmax
    torch.testing.assert_close(din.in_batch_loss(hist, target, torch.zeros(4)), din.full_softmax_loss(hist, target))


def test_adaln_starts_as_a_plain_layernorm_then_modulates_by_the_condition():
    torch.manual_seed(0)
    ln = AdaLN(6, cond_dim=4)
    x, cond = torch.randn(3, 6), torch.randn(3, 4)
    torch.testing.assert_close(ln(x, cond), F.layer_norm(x, (6,), eps=1e-6))
    with torch.no_grad():
        ln.modulation.weight.normal_()
    a, b = ln(x, cond), ln(x, -cond)
    assert not torch.allclose(a, b)  # the scale and shift follow the conditioning vector
    assert ModalityAdapter(4, 6)(cond).shape == (3, 6)


def test_alignment_loss_prefers_matched_pairs():
    torch.manual_seed(0)
    e = torch.randn(16, 8)
    matched = alignment_loss(e, e + 0.01 * torch.randn(16, 8), tau=0.1)
    shuffled = alignment_loss(e, e[torch.randperm(16)], tau=0.1)
    assert matched < 0.1 < shuffled
    with pytest.raises(ValueError):
        alignment_loss(e, e[:3], tau=0.1)


def _loss_and_grads(fn, e_c, e_t):
    c, t = e_c.clone().requires_grad_(), e_t.clone().requires_grad_()
    loss = fn(c, t)
    loss.backward()
    return loss.detach(), c.grad, t.grad


def test_alignment_loss_equals_the_plain_cross_entropy_and_so_does_every_row_as_negatives():
    """The logsumexp form and the sampled form over every row (in any order) are the reference's
    loss and gradients."""
    torch.manual_seed(1)
    e_c, e_t = torch.randn(40, 8), torch.randn(40, 8)
    ref = _loss_and_grads(lambda c, t: alignment_loss_reference(c, t, 0.1), e_c, e_t)
    for negatives, fused in ((None, True), (None, False), (torch.randperm(40), True)):
        got = _loss_and_grads(lambda c, t: alignment_loss(c, t, 0.1, negatives, fused=fused), e_c, e_t)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0.026, 0.07, 1.0, 0.01])
@pytest.mark.parametrize("m", [1, 2, 300])
def test_the_fused_full_alignment_loss_equals_the_autograd_one_at_every_temperature(tau, m):
    """`_FullInfoNCE` (one exp pass with a shared shift, the gradient written by hand) against the
    autograd logsumexp form: loss and both gradients, from nearly matched pairs (a loss near zero)
    to unrelated ones, for temperatures down to the shared shift's limit (0.01 is below it: the
    autograd form then runs, and the results must still agree)."""
    torch.manual_seed(5)
    e_c = torch.randn(m, 16)
    for e_t in (e_c + 1e-3 * torch.randn(m, 16), torch.randn(m, 16), -e_c):
        fused = _loss_and_grads(lambda c, t: alignment_loss(c, t, tau), e_c, e_t)
        plain = _loss_and_grads(lambda c, t: alignment_loss(c, t, tau, fused=False), e_c, e_t)
        ref = _loss_and_grads(lambda c, t: alignment_loss_reference(c, t, tau), e_c, e_t)
        assert torch.isfinite(fused[0]) and fused[0] >= 0
        for a, b, r in zip(fused, plain, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_alignment_loss_with_sampled_negatives_matches_a_row_by_row_brute_force():
    """Each anchor: its own pair against the shared negatives other than itself, both directions."""
    torch.manual_seed(2)
    e_c, e_t = torch.randn(30, 8), torch.randn(30, 8)
    negatives = torch.tensor([3, 7, 11, 12, 20, 29])
    got = alignment_loss(e_c, e_t, 0.2, negatives)
    c, t = torch.nn.functional.normalize(e_c, dim=-1), torch.nn.functional.normalize(e_t, dim=-1)
    total = 0.0
    for anchor, other in ((c, t), (t, c)):
        for i in range(30):
            cand = [i] + [j for j in negatives.tolist() if j != i]
            logits = torch.stack([anchor[i] @ other[j] for j in cand]) / 0.2
            total += float(-torch.log_softmax(logits, 0)[0]) / 30
    assert float(got) == pytest.approx(total / 2, rel=1e-5)
    matched = alignment_loss(e_c, e_c + 0.01 * torch.randn(30, 8), 0.1, negatives)
    shuffled = alignment_loss(e_c, e_c[torch.randperm(30)], 0.1, negatives)
    assert matched < 0.1 < shuffled


@pytest.mark.parametrize("dot, cand_shape", [(True, (1, 11)), (False, (1, 11)), (True, (5, 1)), (True, (5, 9))])
def test_shared_candidate_scorer_matches_the_literal_din_in_scores_and_gradients(dot, cand_shape):
    """The paths for candidates shared by the batch (what Stage I's negatives, validation and the
    reranker's catalogue chunks use: the attention's candidate-side bilinear product and the
    one-product scorer), and per-user candidates on either side of the history's length (one a user,
    Stage I's target, takes the candidate side; nine, more than the six history columns, the history
    side): the same scores and the same gradients for every weight, E_C included, as the literal DIN."""
    torch.manual_seed(3)
    din = DIN(DINConfig(n_items=40, dim=8, max_history=6, attention_hidden=5, mlp_hidden=(7, 3), dropout=0.0,
                        dot_residual=dot))
    hist, cands = _history(), torch.randint(1, 41, cand_shape)

    def grads(reference: bool):
        din.zero_grad()
        h, mask = din.encode_history(hist)
        score = din.score_embedded(h, mask, din.item_emb(cands), reference=reference)
        (score * torch.linspace(-1, 2, score.numel()).view_as(score)).sum().backward()
        return score.detach(), {n: p.grad.clone() for n, p in din.named_parameters() if p.grad is not None}

    (fast, g_fast), (ref, g_ref) = grads(False), grads(True)
    torch.testing.assert_close(fast, ref)
    assert g_fast.keys() == g_ref.keys() and "item_emb.weight" in g_fast
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], msg=name)


def test_under_bf16_autocast_the_shared_scorer_and_the_alignment_keep_fp32_where_the_literal_code_does():
    """Under autocast (Stage I's `bf16`), the shared-candidate scorer returns fp32 scores close to the
    literal DIN's (its <v, c> is an fp32 sum there too), and the alignment loss is computed in fp32:
    the reference's value on the same inputs, never below zero."""
    torch.manual_seed(4)
    din = DIN(DINConfig(n_items=40, dim=8, max_history=6, attention_hidden=5, mlp_hidden=(7, 3), dropout=0.0))
    hist, cands = _history(), torch.randint(1, 41, (1, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, mask = din.encode_history(hist)
        fast = din.score_embedded(h, mask, din.item_emb(cands))
        ref = din.score_embedded(h, mask, din.item_emb(cands), reference=True)
    assert fast.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=0.05, atol=0.05)
    e = torch.randn(50, 8)
    t = e + 1e-3 * torch.randn(50, 8)  # nearly matched pairs: a small loss that bf16 rounding would bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [alignment_loss(e, t, 0.07), alignment_loss(e, t, 0.07, torch.randperm(50)[:20])]
    assert all(x.dtype == torch.float32 and x >= 0 for x in losses)
    torch.testing.assert_close(losses[0], alignment_loss_reference(e, t, 0.07), rtol=1e-4, atol=1e-6)


def test_attention_weights_start_near_zero_whatever_the_seed():
    """DIN's raw attention weights all start from the output layer's bias. nn.Linear's default draws it
    from U(-1/sqrt(J), 1/sqrt(J)); a seed that drew -0.44 at J = 4 made the interest start as minus the
    history's sum, and Stage I stalled for epochs on Sports (benchmarks/results/stage1_attention_bias.notes.md)."""
    means = []
    for seed in range(20):
        torch.manual_seed(seed)
        din = DIN(DINConfig(n_items=200, dim=32, max_history=6, attention_hidden=4, mlp_hidden=(8, 4), dropout=0.0))
        assert din.attention.lin2.bias.item() == 0.0
        h, _ = din.encode_history(torch.randint(1, 201, (16, 6)))
        with torch.no_grad():
            means.append(din.attention(h, din.item_emb(torch.randint(1, 201, (1, 32)))).mean().item())
    assert max(abs(m) for m in means) < 0.15, means  # a default bias: up to 0.5 in size
