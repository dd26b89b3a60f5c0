"""Beam-search throughput (users/s) of the default-size generator on Beauty-shaped inputs.

    /work/venv/bin/python benchmarks/beam_throughput.py [--beams 20 50 100] [--users 512] \
        [--batch 256] [--threads 2] [--codes PATH] [--profile] [--no-exclude]

Model: Stage2Config defaults (d=128, 1 encoder + 4 decoder layers, ff 512), untrained (the cost
of the search does not depend on the weights). Catalogue: 12,101 items, K=256. Codes: `--codes`,
else /work/cache/beauty/codes/codes.parquet, else hierarchical k-means (K=256) of the cached
Beauty semantic embeddings, else random unique codes of length 3. Histories: 1..20 items with
Beauty's length distribution (mean about 7 items) when the data is present, else geometric.
Runs on CUDA (bf16 autocast) when available, else on the CPU with --threads torch threads.
`--profile` records one batch per beam with torch.profiler. Writes benchmarks/results/
beam_throughput.json and .md (and beam_throughput.profile.txt with --profile), with the command.
"""
from __future__ import annotations

import argparse
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


def beauty_codes(path: str | None) -> tuple[np.ndarray, str]:
    """codes [N_ITEMS, L] for items 1..N_ITEMS and where they came from."""
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
    flat = rng.choice(K ** 3, N_ITEMS, replace=False)
    return np.stack([flat // K**2, (flat // K) % K, flat % K], 1), "random unique codes, L=3"


def history_lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    seqs = BEAUTY / "user_sequence.txt"
    if seqs.is_file():
        # Test histories: everything but the last item, at most 20.
        lengths = np.array([min(20, len(line.split()) - 2) for line in seqs.open()])
        return rng.choice(lengths, n), f"test-history lengths of {seqs}"
    return np.clip(rng.geometric(1 / 7, n), 1, 20), "geometric, mean 7, clipped to 1..20"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beams", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--users", type=int, default=512, help="users timed per beam size")
    ap.add_argument("--batch", type=int, nargs="+", default=[256], help="users a batch (one per beam, or one for all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--codes", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-exclude", action="store_true", help="do not exclude history items")
    ap.add_argument("--name", default="beam_throughput")
    add_allow_dirty(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
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


if __name__ == "__main__":
    main()
