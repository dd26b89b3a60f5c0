"""Beam-search throughput (users/s) of the default-size generator on Beauty-shaped inputs, and the
item head's cost against the plain search (`--item-head-ab`).

    python benchmarks/beam_throughput.py [--beams 20 50 100] [--users 512] \
        [--batch 256] [--threads 2] [--codes PATH] [--profile] [--no-exclude]
    python benchmarks/beam_throughput.py --item-head-ab [--beams 50 200] [--users 128 64] \
        [--single-users 8] [--threads 1] [--codes PATH] [--repeats 6] [--train-batch 256] [--profile]

Model: Stage2Config defaults (d=128, 1 encoder + 4 decoder layers, ff 512), untrained (the cost
of the search does not depend on the weights). Catalogue: 12,101 items, K=256. Codes: `--codes`,
else /work/cache/beauty/codes/codes.parquet, else hierarchical k-means (K=256) of the cached
Beauty semantic embeddings, else random unique codes (of length 3; of length 2 with
--item-head-ab). Histories: 1..20 items with Beauty's length distribution (mean about 7 items)
when the data is present, else geometric. Runs on CUDA (bf16 autocast) when available, else on the
CPU with --threads torch threads. `--profile` records one batch per beam with torch.profiler.
Writes benchmarks/results/beam_throughput.json and .md (and beam_throughput.profile.txt with
--profile), with the command.

`--item-head-ab` (CPU, one process): per beam width, one batch of `--users` users (one number
per beam), then `--single-users` users searched one at a time, through six paths, `--repeats`
rounds (each in a new random order), best process CPU time: plain (no item
head, no history exclusion), history exclusion only, item head only and the default (item head
+ exclusion), the last two both with the item head as the search runs it now
(`Generator.item_logits`, grouped by prefix) and as it ran it before (each beam's children
gathered, [N, K], and scored by `Generator.item_logits_reference`: an [N, K, d] gather). Before
and after must rank identically. Then a Stage II training step (forward, backward, AdamW; batch
--train-batch) without the item head, with its reference gather (before) and with
`item_logits_compact` (now). Writes benchmarks/results/beam_item_head.{json,md} (--name), and with
--profile beam_item_head.profile_before.txt / .profile_after.txt: one search of the default path
per beam, before and after (the after file also holds the plain path's profile).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.beam import BeamSearch  # noqa: E402
from prorec.codes import CodeTrie, codes_meta, load_codes, quantize  # noqa: E402
from prorec.config import CodesConfig, Stage2Config  # noqa: E402
from prorec.models.generator import Generator, GeneratorConfig  # noqa: E402

CACHE = Path("/work/cache/beauty")
BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-beauty"
N_ITEMS, K = 12_101, 256


def beauty_codes(path: str | None, random_length: int = 3) -> tuple[np.ndarray, str]:
    """codes [N_ITEMS, L] for items 1..N_ITEMS and where they came from (random unique codes of
    length `random_length` when no codes or embeddings are found)."""
    candidates = [Path(path)] if path else [CACHE / "codes" / "codes.parquet"]
    for p in candidates:
        if p.is_file():
            item_idx, _, codes = load_codes(p)
            if int(codes_meta(p)["k"]) == K and len(codes) == N_ITEMS:
                return codes[np.argsort(item_idx)], str(p)
    emb = CACHE / "embeddings" / "semantic.parquet"
    if emb.is_file():
        from prorec.artifacts import read_embeddings

        _, _, x, _ = read_embeddings(emb)
        if len(x) == N_ITEMS:
            codes, _ = quantize(CodesConfig(method="hkmeans", k=K, use_ray=False), x)
            return codes, f"hkmeans K={K} of {emb}"
    rng = np.random.default_rng(0)
    flat = rng.choice(K ** random_length, N_ITEMS, replace=False)
    codes = np.stack([(flat // K ** (random_length - 1 - i)) % K for i in range(random_length)], 1)
    return codes, f"random unique codes, L={random_length} (seed 0)"


def history_lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    seqs = BEAUTY / "user_sequence.txt"
    if seqs.is_file():
        # Test histories: everything but the last item, at most 20.
        lengths = np.array([min(20, len(line.split()) - 2) for line in seqs.open()])
        return rng.choice(lengths, n), f"test-history lengths of {seqs}"
    return np.clip(rng.geometric(1 / 7, n), 1, 20), "geometric, mean 7, clipped to 1..20"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beams", type=int, nargs="+", default=None, help="default 20 50 100 (--item-head-ab: 50 200)")
    ap.add_argument("--users", type=int, nargs="+", default=None,
                    help="users timed per beam size (default 512; --item-head-ab: one number per beam, default 128 64)")
    ap.add_argument("--batch", type=int, nargs="+", default=[256], help="users a batch (one per beam, or one for all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --item-head-ab: 1)")
    ap.add_argument("--codes", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-exclude", action="store_true", help="do not exclude history items")
    ap.add_argument("--item-head-ab", action="store_true",
                    help="the item head's cost before/after against the plain path")
    ap.add_argument("--repeats", type=int, default=6,
                    help="--item-head-ab: rounds over the paths (best CPU time kept)")
    ap.add_argument("--train-batch", type=int, default=256, help="--item-head-ab: users a Stage II training step")
    ap.add_argument("--single-users", type=int, default=8,
                    help="--item-head-ab: also time this many users searched one at a time (0: none)")
    ap.add_argument("--name", default=None,
                    help="result name (default beam_throughput; --item-head-ab: beam_item_head)")
    add_allow_dirty(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
    if args.item_head_ab:
        item_head_ab(args, tree)
        return
    args.beams = args.beams or [20, 50, 100]
    args.users = (args.users or [512])[0]
    args.threads = args.threads or 2
    args.name = args.name or "beam_throughput"
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rng = np.random.default_rng(0)

    codes, codes_from = beauty_codes(args.codes)
    L = codes.shape[1]
    trie = CodeTrie.from_codes(codes, np.arange(1, N_ITEMS + 1), K)
    s2 = Stage2Config()
    torch.manual_seed(0)
    gcfg = GeneratorConfig(n_items=N_ITEMS, k=K, code_length=L, d_model=s2.d_model, n_heads=s2.n_heads,
                           encoder_layers=s2.encoder_layers, decoder_layers=s2.decoder_layers, ff_dim=s2.ff_dim,
                           distill=False, max_history=20, item_head=False, item_id_embedding=False)  # as measured
    item_codes = torch.cat([torch.zeros(1, L, dtype=torch.long), torch.from_numpy(codes).long()])
    model = Generator(gcfg, item_codes).to(device).eval()
    lengths, lengths_from = history_lengths(args.users, rng)
    hist = np.zeros((args.users, 20), dtype=np.int64)
    for u, n in enumerate(lengths):
        hist[u, :n] = rng.choice(np.arange(1, N_ITEMS + 1), n, replace=False)
    hist_t = torch.from_numpy(hist)
    batches = args.batch if len(args.batch) == len(args.beams) else args.batch * len(args.beams)

    rows, profile_text = [], []
    load_before = os.getloadavg()
    for beam, batch in zip(args.beams, batches):
        search = BeamSearch(model, trie, beam, min(beam, 20), exclude_history=not args.no_exclude, autocast=cuda)
        chunks = [hist_t[s:s + batch] for s in range(0, args.users, batch)]
        chunks = [c[:, : int((c > 0).sum(1).max())] for c in chunks]
        search.search(chunks[0][: min(8, batch)])  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for c in chunks:
            search.search(c)
        if cuda:
            torch.cuda.synchronize()
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        # On a shared machine wall time includes waiting for a core; CPU time (all threads) does not.
        row = {"beam": beam, "batch": batch, "users": args.users, "seconds": round(sec, 3),
               "users_per_s": round(args.users / sec, 1), "ms_per_user": round(1000 * sec / args.users, 3),
               "cpu_ms_per_user": round(1000 * cpu / args.users, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                search.search(chunks[0])
            table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                              row_limit=25)
            profile_text.append(f"## beam {beam}, batch {batch}\n\n{table}\n")
    result = {
        "command": "/work/venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {args.threads} torch threads)",
        "torch": torch.__version__, "python": platform.python_version(),
        "model": {k: getattr(gcfg, k) for k in ("d_model", "n_heads", "encoder_layers", "decoder_layers", "ff_dim")},
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_items": N_ITEMS, "k": K, "code_length": L, "codes": codes_from, "history_lengths": lengths_from,
        "mean_history": float(lengths.mean()), "exclude_history": not args.no_exclude,
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "results": rows,
    }
    write_result(RESULTS / args.name, result, markdown(result), tree)
    if profile_text:
        (RESULTS / f"{args.name}.profile.txt").write_text(f"Command: {result['command']}\n\n" + "\n".join(profile_text))
    print(f"wrote {RESULTS / args.name}.json and .md")


def markdown(r: dict) -> str:
    lines = [
        "# Beam-search throughput (trie-constrained, KV-cached)", "",
        f"Command: `{r['command']}`", "",
        f"Device: {r['device']}; torch {r['torch']}; load average before/after "
        f"{r['loadavg_before'][0]} / {r['loadavg_after'][0]} (shared machine).", "",
        f"Model: {r['model']} ({r['n_params'] / 1e6:.2f}M parameters), untrained. Catalogue: {r['n_items']} items, "
        f"K={r['k']}, L={r['code_length']} ({r['codes']}). Histories: {r['history_lengths']} "
        f"(mean {r['mean_history']:.1f}). History exclusion: {r['exclude_history']}.", "",
        "| beam | users a batch | users | seconds | users/s | ms a user (wall) | ms a user (process CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["results"]:
        lines.append(f"| {x['beam']} | {x['batch']} | {x['users']} | {x['seconds']} | {x['users_per_s']} | "
                     f"{x['ms_per_user']} | {x['cpu_ms_per_user']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# --item-head-ab: the item head's cost against the plain search, before and after

def generator(codes: np.ndarray, item_head: bool, distill: bool = False) -> Generator:
    """An untrained Stage2Config-default generator over `codes` (seed 0: two calls that differ only
    in `item_head` share every other weight)."""
    s2, L = Stage2Config(), codes.shape[1]
    torch.manual_seed(0)
    cfg = GeneratorConfig(n_items=N_ITEMS, k=K, code_length=L, d_model=s2.d_model, n_heads=s2.n_heads,
                          encoder_layers=s2.encoder_layers, decoder_layers=s2.decoder_layers, ff_dim=s2.ff_dim,
                          distill=distill, max_history=20, item_head=item_head,
                          item_id_embedding=s2.item_id_embedding)
    item_codes = torch.cat([torch.zeros(1, L, dtype=torch.long), torch.from_numpy(codes).long()])
    return Generator(cfg, item_codes).eval()


def histories(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, str]:
    """n users' histories [n, S] (distinct random items, Beauty's lengths), cut to the longest."""
    lengths, lengths_from = history_lengths(n, rng)
    hist = np.zeros((n, 20), dtype=np.int64)
    for u, m in enumerate(lengths):
        hist[u, :m] = rng.choice(np.arange(1, N_ITEMS + 1), m, replace=False)
    return torch.from_numpy(hist[:, : int(lengths.max())]), lengths, lengths_from


def as_before(model: Generator) -> Generator:
    """A copy of `model` whose search scores the item head as it did before the grouped
    `item_logits`: the children of every beam gathered and scored by `item_logits_reference`, an
    [N, C, d] gather of output embeddings (a dead beam's node -1 reads the sentinel row). Since the
    search's last level became compact (2026-12-02) the search hands it its compact rows, C = the
    most items a prefix holds; the results committed before that gathered all K columns ([N, K, d]).
    Its training step uses the reference too."""
    before = copy.deepcopy(model)

    def item_logits(h: torch.Tensor, prefix: torch.Tensor, siblings: torch.Tensor | None = None) -> torch.Tensor:
        return before.item_logits_reference(h, (before.siblings if siblings is None else siblings)[prefix])

    before.item_logits = item_logits
    before.item_logits_compact = before.item_logits_reference
    return before


def top_ops(prof, n: int = 12) -> list[dict]:
    """The n operators with the most self CPU time in a torch.profiler run, with their share."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:n]]


def item_head_ab(args: argparse.Namespace, tree: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    beams = args.beams or [50, 200]
    users = args.users or [128, 64]
    users = users if len(users) == len(beams) else users[:1] * len(beams)
    threads = args.threads or 1
    name = args.name or "beam_item_head"
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    codes, codes_from = beauty_codes(args.codes, random_length=2)
    L = codes.shape[1]
    trie = CodeTrie.from_codes(codes, np.arange(1, N_ITEMS + 1), K)
    plain, head = generator(codes, False), generator(codes, True)
    before = as_before(head)
    hist_all, lengths, lengths_from = histories(max(users), rng)
    topk = 20
    load_before = os.getloadavg()

    rows, checks, profiles = [], [], {"before": [], "after": []}
    for beam, n in zip(beams, users):
        hist = hist_all[:n, : int((hist_all[:n] > 0).sum(1).max())]
        k = min(beam, topk)
        paths = {
            "plain": BeamSearch(plain, trie, beam, k),
            "history exclusion only": BeamSearch(plain, trie, beam, k, exclude_history=True),
            "item head only, before": BeamSearch(before, trie, beam, k),
            "item head only": BeamSearch(head, trie, beam, k),
            "default, before": BeamSearch(before, trie, beam, k, exclude_history=True),
            "default": BeamSearch(head, trie, beam, k, exclude_history=True),
        }
        results = {p: s.search(hist) for p, s in paths.items()}  # warm-up, and the rankings compared
        for now, then in (("item head only", "item head only, before"), ("default", "default, before")):
            a, b = results[now], results[then]
            checks.append({"beam": beam, "paths": f"{now} vs {then}", "same_items": bool(torch.equal(a.items, b.items)),
                           "max_score_diff": float((a.scores - b.scores).abs().nan_to_num(0.0).max())})
        one = [hist[u:u + 1, : int((hist[u] > 0).sum())] for u in range(min(args.single_users, n))]
        for batch, work in ((n, [hist]), (1, one)):
            if not work:
                continue
            cpu = {p: [] for p in paths}
            wall = {p: [] for p in paths}
            order = np.random.default_rng(1)
            for _ in range(args.repeats):  # rounds over all paths, each in a new random order (no fixed neighbours)
                for p in order.permutation(list(paths)).tolist():
                    search = paths[p]
                    t0, c0 = time.perf_counter(), time.process_time()
                    for h in work:
                        search.search(h)
                    wall[p].append(time.perf_counter() - t0)
                    cpu[p].append(time.process_time() - c0)
            m, base = (n if batch > 1 else len(one)), min(cpu["plain"])
            for p in paths:
                row = {"beam": beam, "path": p, "users": m, "users_a_batch": batch,
                       "cpu_ms_per_user": round(1000 * min(cpu[p]) / m, 3),
                       "wall_ms_per_user_median": round(1000 * float(np.median(wall[p])) / m, 3),
                       "ratio_to_plain_cpu": round(min(cpu[p]) / base, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.profile:
            for key, p in (("before", "default, before"), ("after", "default"), ("after", "plain")):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    paths[p].search(hist)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
                every = {o["op"]: o["share"] for o in top_ops(prof, n=10_000)}
                named = {op: every.get(f"aten::{op}", 0.0) for op in ("index_select", "bmm", "addmm", "index_copy_")}
                profiles[key].append({"beam": beam, "users": n, "path": p, "top": top_ops(prof), "share": named,
                                      "table": table})

    # A Stage II training step (forward, backward, AdamW) with and without the item head.
    train = []
    tb = args.train_batch
    t_hist, _, _ = histories(tb, np.random.default_rng(1))
    target = torch.from_numpy(np.random.default_rng(2).integers(1, N_ITEMS + 1, tb))
    teacher = torch.randn(N_ITEMS + 1, Stage2Config().d_model, generator=torch.Generator().manual_seed(3))
    after = generator(codes, True, distill=True)
    variants = {"no item head": generator(codes, False, distill=True),
                "item head, before (reference gather)": as_before(after), "item head (item_logits_compact)": after}
    steps, losses = {}, {}
    for v, model in variants.items():
        model.set_stage1(teacher)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt) -> float:
            torch.manual_seed(4)  # the same distillation negatives and dropout in every variant
            opt.zero_grad(set_to_none=True)
            out = model(t_hist, target)
            out["loss"].backward()
            opt.step()
            return float(out["gen"].detach())

        losses[v] = step()  # first step: the same weights in both item-head variants
        steps[v] = step
    cpu = {v: [] for v in variants}
    order = np.random.default_rng(1)
    for _ in range(args.repeats):
        for v in order.permutation(list(variants)).tolist():
            c0 = time.process_time()
            steps[v]()
            cpu[v].append(time.process_time() - c0)
    base = min(cpu["no item head"])
    for v in variants:
        train.append({"variant": v, "batch": tb, "cpu_ms_per_step": round(1000 * min(cpu[v]), 1),
                      "ratio_to_no_item_head": round(min(cpu[v]) / base, 3),
                      "first_step_gen_loss": round(losses[v], 6)})
        print(json.dumps(train[-1]), flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    result = {
        "command": command, "name": name,
        "device": f"CPU ({os.cpu_count()} cores, {threads} torch threads)",
        "torch": torch.__version__, "python": platform.python_version(),
        "timing": f"process CPU time, best of {args.repeats} rounds over the paths (each in a new random order), "
                  f"all users of a beam in one batch (and {args.single_users} users one at a time); "
                  "wall time (median) beside it",
        "model": {k: getattr(head.cfg, k) for k in ("d_model", "n_heads", "encoder_layers", "decoder_layers", "ff_dim",
                                                    "item_id_embedding")},
        "n_items": N_ITEMS, "k": K, "code_length": L, "codes": codes_from,
        "n_prefixes": int(head.siblings.shape[0]), "history_lengths": lengths_from,
        "mean_history": float(lengths.mean()), "topk": topk,
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "results": rows, "same_ranking": checks, "train_step": train,
        "profiles": {k: [{x: v for x, v in p.items() if x != "table"} for p in ps] for k, ps in profiles.items()},
    }
    write_result(RESULTS / name, result, ab_markdown(result), tree)
    for key, ps in profiles.items():
        if ps:
            how = ("as an [N, K, d] gather (item_logits_reference)" if key == "before"
                   else "grouped by prefix (item_logits)")
            text = [f"## {p['path']}, beam {p['beam']}, {p['users']} users in one batch\n\n{p['table']}\n" for p in ps]
            (RESULTS / f"{name}.profile_{key}.txt").write_text(
                f"Command: {command}\n\nOne search a beam, torch.profiler (CPU), {threads} torch thread(s); "
                f"sorted by self CPU time. {'Before' if key == 'before' else 'After'}: the item head "
                f"{how}."
                "\n\n" + "\n".join(text))
    print(f"wrote {RESULTS / name}.json and .md")


def ab_markdown(r: dict) -> str:
    lines = [
        "# The item head's cost in the beam search, against the plain search", "",
        f"Command: `{r['command']}`", "",
        f"Device: {r['device']}; torch {r['torch']}; load average before/after {r['loadavg_before'][0]} / "
        f"{r['loadavg_after'][0]} (shared machine: {r['timing']}).", "",
        f"Model: {r['model']}, untrained. Catalogue: {r['n_items']} items, K={r['k']}, L={r['code_length']} "
        f"({r['codes']}; {r['n_prefixes']} last-level prefixes). Histories: {r['history_lengths']} "
        f"(mean {r['mean_history']:.1f}). Top {r['topk']}.", "",
        "\"before\" scores the item head as the search did before: each beam's children gathered ([N, K]) and "
        "`Generator.item_logits_reference`, which reads item_out(children), an [N, K, d] tensor. Without "
        "\"before\" it is `Generator.item_logits`: the beams sorted by prefix, one dense [n_p, d] x [d, items of "
        "p] matmul a prefix against that prefix's real items (read once a call), written into their token columns.", "",
        "| beam | path | users | users a batch | ms a user (process CPU) | ms a user (wall, median) | / plain (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["results"]:
        lines.append(f"| {x['beam']} | {x['path']} | {x['users']} | {x['users_a_batch']} | {x['cpu_ms_per_user']} | "
                     f"{x['wall_ms_per_user_median']} | {x['ratio_to_plain_cpu']}x |")
    lines += ["", "Same ranking before and after: " + "; ".join(
        f"beam {c['beam']} {c['paths']}: items {'identical' if c['same_items'] else 'DIFFERENT'}, "
        f"max score difference {c['max_score_diff']:.1e}" for c in r["same_ranking"]) + ".", ""]
    lines += ["## Stage II training step (forward, backward, AdamW)", "",
              "| variant | users a step | ms a step (process CPU) | / no item head | generation loss, first step |",
              "|---|---|---|---|---|"]
    for x in r["train_step"]:
        lines.append(f"| {x['variant']} | {x['batch']} | {x['cpu_ms_per_step']} | {x['ratio_to_no_item_head']}x | "
                     f"{x['first_step_gen_loss']} |")
    if any(r["profiles"].values()):
        lines += ["", "## Where the time goes (torch.profiler, one search; top operators by self CPU time)", "",
                  f"Full tables: `{r['name']}.profile_before.txt` / `.profile_after.txt`.", ""]
        share = lambda p, op: 100 * p["share"][op]  # noqa: E731
        for b in r["profiles"]["before"]:
            after = [p for p in r["profiles"]["after"] if p["beam"] == b["beam"]]
            d = r["model"]["d_model"]
            gb = b["users"] * min(b["beam"], r["n_prefixes"]) * r["k"] * d * 4 / 1e9
            head_share = share(b, "index_select") + share(b, "bmm")
            text = (f"- Beam {b['beam']}, {b['users']} users, before: `index_select` {share(b, 'index_select'):.0f}% "
                    f"(almost all of it the item head's gather of item_out rows for every beam's K children, "
                    f"[N, K, d] = {gb:.2f} GB of float32 at the last level) and `bmm` {share(b, 'bmm'):.0f}% (the "
                    f"per-beam product over it): the item head was about {head_share:.0f}% "
                    f"of the search, the decoder's own matmuls (`addmm`) {share(b, 'addmm'):.0f}%.")
            for a in after:
                text += (f" After, {a['path']}: `addmm` {share(a, 'addmm'):.0f}%, `index_select` "
                         f"{share(a, 'index_select'):.1f}%, `bmm` {share(a, 'bmm'):.1f}%, `index_copy_` "
                         f"{share(a, 'index_copy_'):.1f}%.")
            lines.append(text)
        lines += ["", "| beam | path | top operators (share of self CPU time) |", "|---|---|---|"]
        for key in ("before", "after"):
            for p in r["profiles"][key]:
                ops = ", ".join(f"{o['op'].replace('aten::', '')} {100 * o['share']:.0f}%" for o in p["top"][:6])
                label = p["path"] if p["path"] != "default" else "default (after)"
                lines.append(f"| {p['beam']} | {label} | {ops} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
