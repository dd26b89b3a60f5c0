"""This project's beam search against Hugging Face `generate` with a trie, side by side.

    python benchmarks/beam_hf.py [--beams 50 200] [--users 64 32] [--repeats 5] [--threads 1] \
        [--codes PATH] [--topk 20] [--name beam_hf] [--allow-dirty]

One process, one torch thread (--threads), the same codes and the same users for both:
- this project: `prorec.beam.BeamSearch` over an untrained Stage2Config-default generator (d 128,
  4 heads, ff 512, 1 encoder + 4 decoder layers, item-ID embeddings), four paths: plain (no item
  head, no history exclusion), history exclusion only, item head only, and the default (item head
  + history exclusion);
- Hugging Face: `BartForConditionalGeneration.generate(num_beams=W, num_return_sequences=topk,
  max_new_tokens=L, prefix_allowed_tokens_fn=...)` over the same code trie, for a Bart of the same
  shapes (d_model 128, 4 heads, ffn 512, 1 encoder and 4 decoder layers, vocabulary K code tokens +
  pad, decoder start and an end token that the trie never allows), random weights. Its encoder
  reads one vector a history item, the sum of the item's code-token embeddings (as this project's
  encoder does), through `inputs_embeds`. HF has no item head and no history exclusion: every row
  compares with the same HF measurement, its plain generate with the trie.
It is a speed comparison, not a quality one: the weights are random, so neither ranking means
anything; the script checks that both return `topk` distinct valid items a user.

Codes: `--codes` (a codes.parquet of 12,101 items with K=256), else hierarchical k-means codes of
cached Beauty embeddings when present, else random unique codes of length 2 (seed 0); the results
say which. Histories: Beauty's test-history lengths (1..20 items) when the data is present, else
geometric; random distinct items. Each beam width runs all of its `--users` users as one batch,
`--repeats` rounds over the five paths, each round in a new random order (so a change of the
shared machine's load hits them all, and no path always runs after the same one); the tables keep each path's best process CPU time (all threads of this process; unlike wall
time it leaves out waiting for a core) and its median wall time. Writes
benchmarks/results/beam_hf.{json,md} (--name), with the command.
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

from benchmarks.beam_throughput import K, N_ITEMS, beauty_codes, generator, histories  # noqa: E402
from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.beam import BeamSearch  # noqa: E402
from prorec.codes import CodeTrie  # noqa: E402

PATHS = ["plain", "history exclusion only", "item head only", "default"]


def hf_model(L: int):
    """A random-weight Bart of the generator's shapes; vocabulary: K code tokens, then pad, start, end."""
    from transformers import BartConfig, BartForConditionalGeneration

    pad, start, end = K, K + 1, K + 2
    cfg = BartConfig(vocab_size=K + 3, d_model=128, encoder_layers=1, decoder_layers=4, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, max_position_embeddings=64,
                     pad_token_id=pad, bos_token_id=start, eos_token_id=end, decoder_start_token_id=start,
                     forced_bos_token_id=None, forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0)
    torch.manual_seed(0)
    return BartForConditionalGeneration(cfg).eval(), (pad, start, end)


class HFTrieSearch:
    """HF beam search constrained to the code trie by `prefix_allowed_tokens_fn`."""

    def __init__(self, codes: np.ndarray, beam: int, topk: int) -> None:
        from transformers import GenerationConfig

        self.L = codes.shape[1]
        self.model, (pad, start, end) = hf_model(self.L)
        allowed: dict[tuple, set] = {}
        for c in codes.tolist():
            for level in range(self.L):
                allowed.setdefault(tuple(c[:level]), set()).add(c[level])
        self.allowed = {p: sorted(t) for p, t in allowed.items()}
        self.item_of = {tuple(c): i + 1 for i, c in enumerate(codes.tolist())}
        self.codes = torch.cat([torch.zeros(1, self.L, dtype=torch.long), torch.from_numpy(codes).long()])
        self.topk = topk
        self.gen = GenerationConfig(num_beams=beam, num_return_sequences=topk, max_new_tokens=self.L, do_sample=False,
                                    early_stopping=True, decoder_start_token_id=start, pad_token_id=pad,
                                    eos_token_id=end, bos_token_id=start)

    def prefix_allowed_tokens(self, batch_id: int, sent: torch.Tensor) -> list[int]:
        return self.allowed[tuple(sent[1:].tolist())]  # sent = [start, c_1, ..., c_t]

    @torch.inference_mode()
    def search(self, history: torch.Tensor) -> torch.Tensor:
        """history [B, S] item_idx (0 = padding) -> items [B, topk] (-1 = not a valid code)."""
        emb = self.model.get_input_embeddings()
        x = emb(self.codes[history]).sum(2)  # (B, S, d): one vector a history item
        out = self.model.generate(inputs_embeds=x, attention_mask=(history > 0).long(), generation_config=self.gen,
                                  prefix_allowed_tokens_fn=self.prefix_allowed_tokens)
        seqs = out[:, 1:1 + self.L].tolist()
        return torch.tensor([self.item_of.get(tuple(s), -1) for s in seqs]).view(history.shape[0], self.topk)


def check(items: torch.Tensor, topk: int) -> bool:
    """Every user has topk distinct valid items."""
    return bool((items > 0).all()) and all(len(set(row)) == topk for row in items.tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beams", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--users", type=int, nargs="+", default=[64, 32], help="users a beam width (one number per beam)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds over the five paths (best CPU time kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--codes", default=None)
    ap.add_argument("--name", default="beam_hf")
    add_allow_dirty(ap)
    args = ap.parse_args()
    tree = check_tree(args.allow_dirty)
    import transformers

    torch.set_num_threads(args.threads)
    users = args.users if len(args.users) == len(args.beams) else args.users[:1] * len(args.beams)
    codes, codes_from = beauty_codes(args.codes, random_length=2)
    L = codes.shape[1]
    trie = CodeTrie.from_codes(codes, np.arange(1, N_ITEMS + 1), K)
    plain, head = generator(codes, item_head=False), generator(codes, item_head=True)
    hist_all, lengths, lengths_from = histories(max(users), np.random.default_rng(0))
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    rows, valid = [], []
    for beam, n in zip(args.beams, users):
        hist = hist_all[:n, : int((hist_all[:n] > 0).sum(1).max())]
        runners = {
            "plain": BeamSearch(plain, trie, beam, args.topk).search,
            "history exclusion only": BeamSearch(plain, trie, beam, args.topk, exclude_history=True).search,
            "item head only": BeamSearch(head, trie, beam, args.topk).search,
            "default": BeamSearch(head, trie, beam, args.topk, exclude_history=True).search,
            "hf": HFTrieSearch(codes, beam, args.topk).search,
        }
        for p, run in runners.items():  # warm-up, and the lists checked
            got = run(hist)
            ok = check(getattr(got, "items", got), args.topk)
            valid.append({"beam": beam, "path": p, "topk_distinct_valid_items": ok})
        cpu = {p: [] for p in runners}
        wall = {p: [] for p in runners}
        order = np.random.default_rng(1)
        for _ in range(args.repeats):  # each round in a new random order: no path always follows the same one
            for p in order.permutation(list(runners)).tolist():
                t0, c0 = time.perf_counter(), time.process_time()
                runners[p](hist)
                wall[p].append(time.perf_counter() - t0)
                cpu[p].append(time.process_time() - c0)
        ms = {p: 1000 * min(cpu[p]) / n for p in runners}
        ms_wall = {p: 1000 * float(np.median(wall[p])) / n for p in runners}
        for p in PATHS:
            row = {"beam": beam, "path": p, "users": n,
                   "ms_per_user_cpu": round(ms[p], 3), "hf_ms_per_user_cpu": round(ms["hf"], 3),
                   "hf_over_this_cpu": round(ms["hf"] / ms[p], 2), "over_plain_cpu": round(ms[p] / ms["plain"], 3),
                   "ms_per_user_wall": round(ms_wall[p], 3), "hf_ms_per_user_wall": round(ms_wall["hf"], 3),
                   "hf_over_this_wall": round(ms_wall["hf"] / ms_wall[p], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": f"CPU ({os.cpu_count()} cores, {args.threads} torch thread(s))",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "timing": f"all users of a beam width in one batch; {args.repeats} rounds over the five paths, "
                  "each in a new random order; "
                  "best process CPU time and median wall time",
        "model": {k: getattr(head.cfg, k) for k in ("d_model", "n_heads", "encoder_layers", "decoder_layers", "ff_dim",
                                                    "item_id_embedding")},
        "hf_model": "BartForConditionalGeneration: d_model 128, 4 heads, ffn 512, 1 encoder + 4 decoder layers, "
                    f"vocabulary {K} + 3, random weights; generate(num_beams=W, num_return_sequences=topk, "
                    "max_new_tokens=L, prefix_allowed_tokens_fn=the code trie)",
        "n_items": N_ITEMS, "k": K, "code_length": L, "codes": codes_from, "history_lengths": lengths_from,
        "mean_history": float(lengths.mean()), "topk": args.topk,
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.perf_counter() - t_start, 1),
        "results": rows, "lists_checked": valid,
    }
    write_result(RESULTS / args.name, result, markdown(result), tree)
    print(f"wrote {RESULTS / args.name}.json and .md")


def markdown(r: dict) -> str:
    ok = all(v["topk_distinct_valid_items"] for v in r["lists_checked"])
    lines = [
        "# Beam search: this project against Hugging Face `generate` with a trie, side by side", "",
        f"Command: `{r['command']}` ({r['seconds']} s)", "",
        f"Device: {r['device']}; torch {r['torch']}, transformers {r['transformers']}; load average before/after "
        f"{r['loadavg_before'][0]} / {r['loadavg_after'][0]} (shared machine; {r['timing']}).", "",
        f"This project: `BeamSearch` over the generator {r['model']}, untrained. HF: {r['hf_model']}. "
        f"HF has no item head and no history exclusion, so every row of a beam width compares with the same HF "
        f"measurement. Catalogue: {r['n_items']} items, K={r['k']}, L={r['code_length']} ({r['codes']}). Histories: "
        f"{r['history_lengths']} (mean {r['mean_history']:.1f}), the same users for every path. Top {r['topk']}. "
        f"Every path returned {r['topk']} distinct valid items a user: {'yes' if ok else 'NO'}.", "",
        "| path | beam | users | this project, ms a user (CPU) | HF generate + trie, ms a user (CPU) | HF / this | "
        "this / plain | this, ms a user (wall) | HF, ms a user (wall) | HF / this (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["results"]:
        lines.append(f"| {x['path']} | {x['beam']} | {x['users']} | {x['ms_per_user_cpu']} | "
                     f"{x['hf_ms_per_user_cpu']} | "
                     f"{x['hf_over_this_cpu']}x | {x['over_plain_cpu']}x | {x['ms_per_user_wall']} | "
                     f"{x['hf_ms_per_user_wall']} | {x['hf_over_this_wall']}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
