"""The generator (prorec/models/generator.py): KV-cached decoding, masking, losses, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prorec.models.generator import DecoderCache, Generator, GeneratorConfig, code_loss, sample_siblings

torch.set_num_threads(1)
N, K, L = 40, 6, 3


def make_model(**kw) -> Generator:
    torch.manual_seed(0)
    cfg = GeneratorConfig(n_items=N, k=K, code_length=L, d_model=32, n_heads=4, decoder_layers=2, ff_dim=64,
                          distill_dim=8, n_negatives=16, dropout=0.0,
                          **{"item_head": False, "item_id_embedding": False, **kw})  # the paper's head unless asked
    every = torch.cartesian_prod(*[torch.arange(K)] * L)  # [K^L, L]: N distinct codes, row 0 padding
    codes = torch.cat([torch.zeros(1, L, dtype=torch.long), every[torch.randperm(len(every))[:N]]])
    model = Generator(cfg, codes)
    for p in model.parameters():  # larger weights than the init, so that mistakes show in the outputs
        torch.nn.init.normal_(p, std=0.3)
    model.set_stage1(torch.randn(N + 1, 8))
    return model.eval()


def history() -> torch.Tensor:
    return torch.tensor([[3, 9, 27, 4], [5, 0, 0, 0], [12, 33, 0, 0]])


def test_kv_cached_decoding_equals_full_recomputation():
    model = make_model(item_id_embedding=True)
    hist = history()
    B, G = hist.shape[0], 5
    codes = torch.randint(0, K, (B, G, L))  # G different prefixes per user, decoded as G beams
    memory = model.encode(hist)
    cache = DecoderCache(len(model.decoder), L)
    stepped = [model.step(memory, cache, 0, None, B).repeat_interleave(G, 0)]  # <BOS> is the same for all beams
    cache.reorder(torch.arange(B).repeat_interleave(G))
    for level in range(1, L):
        stepped.append(model.step(memory, cache, level, codes[:, :, level - 1].reshape(-1), B))
    stepped = torch.stack(stepped, 1).view(B, G, L, K)
    for g in range(G):
        full = model.code_logits(model.decode(memory, codes[:, g]))  # (B, L, K) by teacher forcing
        torch.testing.assert_close(stepped[:, g], full, atol=1e-5, rtol=1e-5)


def test_cache_reorder_follows_the_surviving_beams():
    model = make_model()
    hist = history()[:1]
    memory = model.encode(hist)
    a, b = torch.tensor([1, 2]), torch.tensor([4, 0])
    cache = DecoderCache(len(model.decoder), L)
    model.step(memory, cache, 0, None, 1)
    cache.reorder(torch.tensor([0, 0]))
    model.step(memory, cache, 1, torch.tensor([a[0], b[0]]), 1)
    cache.reorder(torch.tensor([1, 0]))  # swap the two beams: beam 0 now continues prefix b
    swapped = model.step(memory, cache, 2, torch.tensor([b[1], a[1]]), 1)
    full_b = model.code_logits(model.decode(memory, torch.tensor([[b[0], b[1], 0]])))[0, 2]
    torch.testing.assert_close(swapped[0], full_b, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_the_encoding():
    model = make_model(item_id_embedding=True)
    short = torch.tensor([[7, 8, 9]])
    padded = torch.tensor([[7, 8, 9, 0, 0, 0]])
    codes = torch.tensor([[1, 2, 3]])
    a = model.code_logits(model.decode(model.encode(short), codes))
    b = model.code_logits(model.decode(model.encode(padded), codes))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decoding_is_causal_and_the_distillation_token_sees_the_whole_code():
    model = make_model()
    memory = model.encode(history())
    c1 = torch.tensor([[1, 2, 3]] * 3)
    c2 = torch.tensor([[1, 2, 5]] * 3)
    h1, h2 = model.decode(memory, c1, with_distill=True), model.decode(memory, c2, with_distill=True)
    torch.testing.assert_close(h1[:, :L], h2[:, :L])  # code positions do not see the last token
    assert (h1[:, L] - h2[:, L]).abs().max() > 1e-4  # [c_dis] does


@pytest.mark.parametrize("distill", [True, False])
def test_losses_and_every_parameter_gets_a_gradient(distill):
    model = make_model(distill=distill, item_id_embedding=True).train()
    out = model(history(), torch.tensor([1, 2, 3]))
    assert set(out) == {"loss", "gen", "distill"}
    assert torch.isfinite(out["loss"])
    assert out["gen"].item() > 0
    if distill:
        assert out["distill"].item() > 0
        torch.testing.assert_close(out["loss"], out["gen"] + model.cfg.beta * out["distill"])
    else:
        assert not hasattr(model, "dis_token")  # "CKA only": no unused parameters (DDP would stall)
        assert out["distill"].item() == 0 and out["loss"] is out["gen"]
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # item 0 (padding) row of item_emb never gets a gradient, but the table as a whole does
    assert missing == []


def test_generation_loss_is_the_mean_code_cross_entropy():
    model = make_model(distill=False)
    hist, target = history(), torch.tensor([1, 2, 3])
    logits = model.code_logits(model.decode(model.encode(hist), model.item_codes[target]))
    logp = torch.log_softmax(logits, -1).gather(2, model.item_codes[target][..., None])[..., 0]
    torch.testing.assert_close(model(hist, target)["gen"], -logp.mean())


def test_code_loss_smooths_over_the_allowed_tokens_alone():
    torch.manual_seed(0)
    logits, targets = torch.randn(7, K), torch.randint(0, K, (7,))
    # Every token allowed: PyTorch's own label smoothing.
    for eps in (0.0, 0.1, 0.5):
        torch.testing.assert_close(code_loss(logits, targets, eps), F.cross_entropy(logits, targets, label_smoothing=eps))
    # Some tokens forbidden (-inf, as the item head writes them): the smoothed mass goes to the others only,
    # i.e. the same as PyTorch's smoothing over the row's allowed columns.
    allowed = torch.rand(7, K) < 0.6
    allowed[torch.arange(7), targets] = True
    masked = logits.masked_fill(~allowed, float("-inf"))
    loss = code_loss(masked, targets, 0.2)
    assert torch.isfinite(loss)
    by_row = []
    for r in range(7):
        cols = allowed[r].nonzero()[:, 0]
        t = (cols == targets[r]).nonzero()[0]
        by_row.append(F.cross_entropy(logits[r, cols][None], t, label_smoothing=0.2))
    torch.testing.assert_close(loss, torch.stack(by_row).mean())
    # the gradient: finite everywhere, 0 on the forbidden tokens
    leaf = masked.clone().requires_grad_(True)
    code_loss(leaf, targets, 0.2).backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[~allowed] == 0).all()


def test_label_smoothing_reaches_the_generation_loss():
    hist, target = history(), torch.tensor([4, 17, 33])
    plain, smooth = make_model(item_head=True, distill=False), make_model(item_head=True, distill=False, label_smoothing=0.3)
    codes = plain.item_codes[target]
    logits = plain.code_logits(plain.decode(plain.encode(hist), codes), target)
    assert torch.isinf(logits[:, L - 1]).any()  # the item head's forbidden tokens, which the smoothing skips
    want = code_loss(logits.reshape(-1, K), codes.reshape(-1), 0.3)
    torch.testing.assert_close(smooth(hist, target)["gen"], want)
    assert not torch.allclose(plain(hist, target)["gen"], want)
    with pytest.raises(ValueError, match="label_smoothing"):
        GeneratorConfig(n_items=5, k=4, code_length=2, label_smoothing=1.0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        GeneratorConfig(n_items=5, k=4, code_length=2, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="item_codes"):
        Generator(GeneratorConfig(n_items=5, k=4, code_length=2, item_head=False), torch.zeros(5, 2, dtype=torch.long))


def siblings_of(model: Generator, items: torch.Tensor) -> torch.Tensor:
    """[B, K] item_idx after each item's code prefix, by brute force over the code table (0 = none)."""
    codes = model.item_codes
    out = torch.zeros(len(items), K, dtype=torch.long)
    for r, item in enumerate(items.tolist()):
        for j in range(1, N + 1):
            if torch.equal(codes[j, : L - 1], codes[item, : L - 1]):
                out[r, codes[j, L - 1]] = j
    return out


def test_item_head_scores_the_prefix_items_and_decodes_like_teacher_forcing():
    model = make_model(item_head=True, distill=False)
    hist, target = history(), torch.tensor([4, 17, 33])
    kids = siblings_of(model, target)
    codes = model.item_codes[target]
    memory = model.encode(hist)
    full = model.code_logits(model.decode(memory, codes), target)  # (B, L, K)
    last = full[:, L - 1]
    assert torch.equal(torch.isfinite(last), kids > 0)  # only the prefix's own items can be scored
    # by hand: h . item_out[item] + b[item] at the last position, for every sibling
    hidden = model.decode(memory, codes)[:, L - 1]
    for b in range(3):
        for t in (kids[b] > 0).nonzero()[:, 0].tolist():
            j = kids[b, t]
            want = hidden[b] @ model.item_out.weight[j] + model.item_out_b[j]
            torch.testing.assert_close(last[b, t], want, atol=1e-5, rtol=1e-5)
    # the incremental path with the beams' children gives the same logits
    cache = DecoderCache(len(model.decoder), L)
    stepped = [model.step(memory, cache, 0, None, 3)]
    for level in range(1, L):
        stepped.append(model.step(memory, cache, level, codes[:, level - 1], 3,
                                  kids if level == L - 1 else None))
    torch.testing.assert_close(torch.stack(stepped, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="children"):
        model.step(memory, DecoderCache(len(model.decoder), L), L - 1, codes[:, 0], 3)


def test_item_head_loss_is_normalised_over_the_prefix_items_and_trains_every_parameter():
    model = make_model(item_head=True, distill=True).train()
    hist, target = history(), torch.tensor([4, 17, 33])
    out = model(hist, target)
    codes = model.item_codes[target]
    logits = model.code_logits(model.decode(model.encode(hist), codes), target)
    logp = torch.log_softmax(logits, -1).gather(2, codes[..., None])[..., 0]
    torch.testing.assert_close(out["gen"], -logp.mean())
    # the last level's probabilities sum to 1 over the prefix's items alone
    torch.testing.assert_close(logits[:, L - 1].softmax(-1).sum(-1), torch.ones(3))
    assert model.head_w.shape[0] == L - 1  # no unused shared head for the last level (DDP)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_item_head_rejects_shared_codes():
    cfg = GeneratorConfig(n_items=3, k=4, code_length=2, d_model=8, n_heads=2, item_head=True, distill=False)
    codes = torch.tensor([[0, 0], [1, 2], [3, 0], [1, 2]])
    with pytest.raises(ValueError, match="share a code"):
        Generator(cfg, codes)


def test_item_head_starts_from_the_stage1_embeddings_when_asked():
    model = make_model(item_head=True, distill=False)
    emb = torch.randn(N + 1, 32)
    model.init_item_head(emb)
    torch.testing.assert_close(model.item_out.weight[1:], torch.nn.functional.normalize(emb[1:], dim=-1))
    with pytest.raises(ValueError, match="stage1.dim equal to stage2.d_model"):
        model.init_item_head(torch.randn(N + 1, 16))
    with pytest.raises(ValueError, match="no item head"):
        make_model(distill=False).init_item_head(emb)


def test_item_head_with_one_level_codes_is_a_softmax_over_the_catalogue():
    """K >= n_items gives codes of length 1: the item head then scores every item, and no parameter
    is left without a gradient (DDP refuses those)."""
    cfg = GeneratorConfig(n_items=5, k=8, code_length=1, d_model=16, n_heads=2, decoder_layers=1, ff_dim=32,
                          item_head=True, distill=False, dropout=0.0)
    model = Generator(cfg, torch.tensor([[0], [3], [0], [7], [1], [5]]))
    hist, target = torch.tensor([[1, 2], [4, 0]]), torch.tensor([3, 5])
    out = model(hist, target)
    logits = model.code_logits(model.decode(model.encode(hist), model.item_codes[target]), target)[:, 0]
    assert torch.isfinite(logits).sum(1).tolist() == [5, 5]
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def item_table(model: Generator) -> torch.Tensor:
    """A [P + 2, K] children table: the model's own sibling rows, some slots emptied (0 and -1), an
    all-empty row and a row with a lone item."""
    table = model.siblings.clone()
    table[0, :] = -1
    table[1, 1::2] = 0
    lone = torch.zeros(1, K, dtype=torch.long)
    lone[0, K - 1] = 7
    return torch.cat([table, torch.full((1, K), -1, dtype=torch.long), lone])


@pytest.mark.parametrize("head_stage1", [False, True])
@pytest.mark.parametrize("min_rows", [1, 2, 1000])  # matmul for every prefix / lone rows pair by pair / no matmul
def test_grouped_item_head_equals_the_reference_gather(min_rows, head_stage1, monkeypatch):
    import prorec.models.generator as generator

    monkeypatch.setattr(generator, "GROUP_MIN_ROWS", min_rows)
    model = make_model(item_head=True, distill=False, item_head_stage1=head_stage1)
    table = item_table(model)
    g = torch.Generator().manual_seed(5)
    # Prefixes with many rows, with one row, dead rows (negative), the empty row, in shuffled order.
    prefix = torch.cat([torch.randint(0, table.shape[0], (40,), generator=g), torch.tensor([2, 2, 2, 3, -1, -1, -5]),
                        torch.tensor([table.shape[0] - 2, table.shape[0] - 1])])
    prefix = prefix[torch.randperm(len(prefix), generator=g)]
    h = torch.randn(len(prefix), 32, generator=g)
    with torch.no_grad():
        got = model.item_logits(h, prefix, table)
        want = model.item_logits_reference(h, table[prefix.clamp(min=0)])
        want = want.masked_fill(prefix[:, None] < 0, float("-inf"))
        own_prefix = model.item_prefix[torch.tensor([4, 17, 33, 4, 1])]
        own = model.item_logits(h[:5], own_prefix)  # the model's own table
        own_want = model.item_logits_reference(h[:5], model.siblings[own_prefix])
        empty = model.item_logits(h[:0], prefix[:0], table)
    assert got.dtype == torch.float32 and got.shape == (len(prefix), K)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))  # empty slots and dead rows stay -inf
    assert torch.isneginf(got[prefix < 0]).all() and torch.isneginf(got[prefix == table.shape[0] - 2]).all()
    assert torch.equal(torch.isfinite(got), (table[prefix.clamp(min=0)] > 0) & (prefix[:, None] >= 0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own, own_want, atol=1e-5, rtol=1e-5)
    assert empty.shape == (0, K)


def test_grouped_item_head_has_no_backward():
    model = make_model(item_head=True, distill=False)
    with pytest.raises(RuntimeError, match="no backward"):
        model.item_logits(torch.randn(3, 32), torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("head_stage1", [False, True])
def test_compact_item_head_equals_the_reference_gather_with_gradients(head_stage1):
    """code_logits (training) scores the item head pair by pair: the same logits as the gather, and
    the same gradients for the hidden states, the output embeddings and their biases (and the Stage I
    projection of item_head_stage1)."""
    model = make_model(item_head=True, distill=False, item_head_stage1=head_stage1)
    table = item_table(model)
    children = table[torch.tensor([0, 1, 1, 2, 3, 5, table.shape[0] - 1, 4])]
    grads = []
    for fn in (model.item_logits_compact, model.item_logits_reference):
        model.zero_grad(set_to_none=True)
        h = torch.randn(len(children), 32, generator=torch.Generator().manual_seed(6), requires_grad=True)
        logits = fn(h, children)
        finite = torch.isfinite(logits)
        (logits[finite] * torch.linspace(-1, 1, int(finite.sum()))).sum().backward()
        grads.append((logits.detach(), h.grad, model.item_out.weight.grad, model.item_out_bias.weight.grad)
                     + ((model.out_stage1_proj.weight.grad,) if head_stage1 else ()))
    (a, *ga), (b, *gb) = grads
    assert torch.equal(torch.isfinite(a), children > 0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_item_head_step_by_prefix_equals_step_by_children():
    """The search's path (beams named by prefix, grouped matmuls) and the reference path (beams'
    children gathered) give the same last-level logits, beams of one prefix and of several."""
    model = make_model(item_head=True, distill=False)
    hist = history()
    target = torch.tensor([[4, 17, 33, 4], [17, 17, 2, 9], [33, 5, 5, 5]])  # 4 beams a user
    B, G = target.shape
    codes = model.item_codes[target.view(-1)]
    memory = model.encode(hist)
    with torch.no_grad():
        out = []
        for by_prefix in (True, False):
            cache = DecoderCache(len(model.decoder), L)
            model.step(memory, cache, 0, None, B)
            cache.reorder(torch.arange(B).repeat_interleave(G))
            for level in range(1, L - 1):
                model.step(memory, cache, level, codes[:, level - 1], B)
            prefix = model.item_prefix[target.view(-1)]
            kw = {"prefix": prefix} if by_prefix else {"children": model.siblings[prefix]}
            out.append(model.step(memory, cache, L - 1, codes[:, L - 2], B, **kw))
    assert torch.equal(torch.isfinite(out[0]), torch.isfinite(out[1]))
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)


def test_weights_saved_with_the_item_bias_as_a_vector_still_load():
    """Before the item head's biases became a table (for sparse gradients) they were saved as
    "item_out_b" [N + 1]; such files load into "item_out_bias.weight" [N + 1, 1]."""
    model = make_model(item_head=True)
    with torch.no_grad():
        model.item_out_bias.weight.normal_()
    state = model.state_dict()
    old = {k: v for k, v in state.items() if k != "item_out_bias.weight"}
    old["item_out_b"] = state["item_out_bias.weight"][:, 0].clone()
    twin = make_model(item_head=True)
    twin.load_state_dict(old)
    assert torch.equal(twin.item_out_b, model.item_out_b)


def test_a_tied_item_head_is_the_item_id_embedding_and_round_trips(tmp_path):
    """stage2.tie_item_head: the head's output embeddings are the item-ID embedding's rows (one
    table, saved once); the loss is the untied model's with that table copied into its head, both
    uses of the table get gradient, and the saved model loads to the same scores."""
    from prorec.models.generator import load_generator, save_generator

    tied = make_model(item_head=True, item_id_embedding=True, tie_item_head=True, distill=False)
    assert tied.item_out is tied.item_emb and tied.item_tables() == [tied.item_emb, tied.item_out_bias]
    assert "item_out.weight" not in tied.state_dict()
    assert sum(p.numel() for p in tied.parameters()) == sum(
        p.numel() for p in make_model(item_head=True, item_id_embedding=True, distill=False).parameters()) - (N + 1) * 32
    untied = make_model(item_head=True, item_id_embedding=True, distill=False)
    state = {**tied.state_dict(), "item_out.weight": tied.item_emb.weight.detach()}
    untied.load_state_dict(state)
    hist, target = history(), torch.tensor([4, 17, 33])
    torch.testing.assert_close(tied(hist, target)["loss"], untied(hist, target)["loss"])
    # the gradient of the one table is the sum of the input's and the head's
    tied(hist, target)["loss"].backward()
    untied(hist, target)["loss"].backward()
    torch.testing.assert_close(tied.item_emb.weight.grad, untied.item_emb.weight.grad + untied.item_out.weight.grad)
    save_generator(tmp_path, tied.cfg, tied.state_dict())
    back = load_generator(tmp_path)
    assert back.item_out is back.item_emb
    torch.testing.assert_close(back(hist, target)["loss"], tied.eval()(hist, target)["loss"])
    with pytest.raises(ValueError, match="tie_item_head needs item_head and item_id_embedding"):
        make_model(item_head=True, item_id_embedding=False, tie_item_head=True)


def test_history_stage1_adds_the_projected_stage1_features_of_each_history_item(tmp_path):
    """stage2.history_stage1: each history token gains stage1_proj(unit Stage I row of its item). With
    the projection zeroed the encoding is the plain model's with the same weights; a changed Stage I
    row changes the encoding of exactly the users who have that item; the features are a saved
    buffer, not a weight, and the projection learns."""
    from prorec.models.generator import load_generator, save_generator

    model = make_model(item_head=True, item_id_embedding=True, history_stage1=True, distill=False)
    assert "stage1_emb" in model.state_dict() and all(p is not model.stage1_emb for p in model.parameters())
    torch.testing.assert_close(model.stage1_emb[1:].norm(dim=-1), torch.ones(N))
    assert torch.equal(model.stage1_emb[0], torch.zeros(8))  # padding
    plain = make_model(item_head=True, item_id_embedding=True, distill=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("stage1_")})
    hist = history()
    with torch.no_grad():
        differs = (model.encode(hist).kv[0][0] - plain.encode(hist).kv[0][0]).abs().amax()
        assert differs > 1e-3
        model.stage1_proj.weight.zero_()
        model.stage1_proj.bias.zero_()
        torch.testing.assert_close(model.encode(hist).kv[0][0], plain.encode(hist).kv[0][0])
        torch.nn.init.normal_(model.stage1_proj.weight, std=0.3)
        before = model.encode(hist).kv[0][0]
        model.stage1_emb[27] = -model.stage1_emb[27]  # item 27 is in user 0's history only
        after = model.encode(hist).kv[0][0]
    changed = (after - before).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert changed.tolist() == [True, False, False]
    target = torch.tensor([4, 17, 33])
    model(hist, target)["loss"].backward()
    assert model.stage1_proj.weight.grad.abs().sum() > 0
    save_generator(tmp_path, model.cfg, model.state_dict())
    back = load_generator(tmp_path)
    assert torch.equal(back.stage1_emb, model.stage1_emb)
    torch.testing.assert_close(back(hist, target)["loss"], model.eval()(hist, target)["loss"])
    with pytest.raises(ValueError, match=r"Stage I embeddings must have shape \(41, 8\)"):
        model.set_stage1(torch.randn(N + 1, 5))


def test_with_history_stage1_the_distillation_reads_the_same_stage1_rows():
    """distill + history_stage1: the Stage I rows are held once (the saved stage1_emb), and the
    distillation's teacher is those rows."""
    model = make_model(item_head=True, item_id_embedding=True, history_stage1=True, distill=True)
    assert [n for n, _ in model.named_buffers() if n in ("teacher", "stage1_emb")] == ["stage1_emb"]
    assert model.stage1_rows is model.stage1_emb
    torch.manual_seed(3)
    hist, target = history(), torch.tensor([4, 17, 33])
    h_dis = model.decode(model.encode(hist), model.item_codes[target], with_distill=True)[:, L]
    got = model.distill_loss(h_dis, target)
    torch.manual_seed(3)
    negs = torch.randint(1, N + 1, (model.cfg.n_negatives,))
    q = F.normalize(model.dis_proj(h_dis).float(), dim=-1)
    rows = F.normalize(model.stage1_emb, dim=-1)
    logits = torch.cat([(q * rows[target]).sum(-1, keepdim=True),
                        (q @ rows[negs].T).masked_fill(negs[None, :] == target[:, None], float("-inf"))], 1)
    torch.testing.assert_close(got, F.cross_entropy(logits / model.cfg.tau, torch.zeros_like(target)))


def test_item_head_stage1_adds_the_projected_stage1_row_to_each_output_embedding(tmp_path):
    """stage2.item_head_stage1: item i's output embedding is item_out[i] + out_stage1_proj(its unit
    Stage I row). With the projection zeroed the logits are the plain item head's with the same
    weights; a changed Stage I row (or projection) changes the logits of that item alone, also in
    the decoding path, whose summed table is kept between calls; the projection learns; the rows are
    saved with the weights."""
    from prorec.models.generator import load_generator, save_generator

    model = make_model(item_head=True, item_id_embedding=True, item_head_stage1=True, distill=False)
    assert "stage1_emb" in model.state_dict() and not hasattr(model, "stage1_proj")  # no history features
    torch.testing.assert_close(model.stage1_emb[1:].norm(dim=-1), torch.ones(N))
    items = torch.tensor([[4, 17], [33, 1]])
    torch.testing.assert_close(model.out_rows(items),
                               model.item_out(items) + model.out_stage1_proj(model.stage1_emb[items]))
    plain = make_model(item_head=True, item_id_embedding=True, distill=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("stage1_", "out_stage1"))})
    hist, target = history(), torch.tensor([4, 17, 33])
    prefix = model.item_prefix[target]
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = model.item_logits(h, prefix)
        assert (first - plain.item_logits(h, prefix)).nan_to_num().abs().amax() > 1e-3
        cached = model.out_table()
        assert model.out_table() is cached  # kept while no table changes
        model.stage1_emb[17] = -model.stage1_emb[17]
        after = model.item_logits(h, prefix)
        moved = (after - first).nan_to_num().abs() > 1e-5
        assert moved.nonzero().tolist() == [[1, int(model.item_codes[17, -1])]]  # item 17's slot, row 1 alone
        model.out_stage1_proj.weight.zero_()
        model.out_stage1_proj.bias.zero_()
        torch.testing.assert_close(model.item_logits(h, prefix), plain.item_logits(h, prefix))
        torch.nn.init.normal_(model.out_stage1_proj.weight, std=0.3)
    model.train()
    model(hist, target)["loss"].backward()
    assert model.out_stage1_proj.weight.grad.abs().sum() > 0
    model.eval()
    save_generator(tmp_path, model.cfg, model.state_dict())
    back = load_generator(tmp_path)
    assert torch.equal(back.stage1_emb, model.stage1_emb)
    with torch.no_grad():
        torch.testing.assert_close(back.item_logits(h, prefix), model.item_logits(h, prefix))
    with pytest.raises(ValueError, match="item_head_stage1 needs item_head"):
        make_model(item_head=False, item_head_stage1=True)


def test_sample_siblings_keeps_the_target_draws_uniformly_and_corrects_by_log_q():
    children = torch.tensor([[0, 7, 3, 9, 4, 8], [5, 0, 0, 2, 0, 0], [0, 0, 6, 0, 0, 0]])  # 5, 2 and 1 items
    target = torch.tensor([2, 0, 2])  # the token of each row's target: items 3, 5, 6
    torch.manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(4000):
        kept, corr = sample_siblings(children, target, samples=3)
        assert ((kept > 0) <= (children > 0)).all() and torch.equal(kept[kept > 0], children[kept > 0])
        assert (kept[torch.arange(3), target] == children[torch.arange(3), target]).all()  # the target stays
        assert int((kept[0] > 0).sum()) == 3  # the target and 2 of the 4 others
        assert torch.equal(kept[1:], children[1:])  # rows of <= 3 items keep them all ...
        assert torch.equal(corr[1:], torch.zeros(2, 6))  # ... uncorrected: the exact softmax
        drawn = (kept[0] > 0) & (torch.arange(6) != 2)
        torch.testing.assert_close(corr[0][drawn], torch.full((2,), torch.log(torch.tensor(4 / 2))))
        assert (corr[0][~drawn] == 0).all()
        counts += drawn.float()
    freq = counts[[1, 3, 4, 5]] / 4000
    assert ((freq - 0.5).abs() < 0.04).all(), freq  # each other drawn with probability 2 / 4


def test_the_sampled_item_head_estimates_the_full_softmax_and_touches_only_the_drawn_rows():
    """item_head_samples: the training loss's last level keeps the target and samples - 1 others a row
    (so the item head's sparse gradient has at most B * samples rows), its log-Q corrected partition
    sum is unbiased, evaluation mode scores every item, and samples >= the largest prefix is exact."""
    model = make_model(item_head=True, distill=False, item_id_embedding=True, item_head_samples=2)
    size = (model.siblings[model.item_prefix] > 0).sum(1)  # the items of each item's prefix
    hist, target = history(), size[1:].argsort(descending=True, stable=True)[:3] + 1  # from the largest prefixes
    codes = model.item_codes[target]
    hidden = model.decode(model.encode(hist), codes)
    full = model.code_logits(hidden, target)[:, L - 1]
    n_items = torch.isfinite(full).sum(1)
    assert (n_items > 2).any()  # some prefix holds more items than are drawn
    torch.manual_seed(1)
    est = torch.stack([model.code_logits(hidden, target, samples=2)[:, L - 1].exp().sum(1) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(est, full.exp().sum(1), rtol=0.05, atol=0)
    assert not torch.allclose(model.train()(hist, target)["gen"], model.eval()(hist, target)["gen"])  # eval: every item
    model.train().zero_grad()
    model(hist, target)["loss"].backward()
    touched = int((model.item_out.weight.grad.abs().sum(1) > 0).sum())
    assert touched <= 3 * 2 and touched < int(n_items.sum())
    exact = make_model(item_head=True, distill=False, item_id_embedding=True, item_head_samples=K).train()
    plain = make_model(item_head=True, distill=False, item_id_embedding=True).train()
    torch.testing.assert_close(exact(hist, target)["gen"], plain(hist, target)["gen"])


def test_item_head_samples_needs_the_item_head_and_two_items():
    with pytest.raises(ValueError, match="item_head_samples must be 0"):
        GeneratorConfig(n_items=5, k=4, code_length=2, item_head_samples=1)
    with pytest.raises(ValueError, match="item_head_samples needs item_head"):
        GeneratorConfig(n_items=5, k=4, code_length=2, item_head=False, item_head_samples=8)
