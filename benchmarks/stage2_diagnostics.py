"""Where a trained generator loses the target: per code level, on validation users.

    python benchmarks/stage2_diagnostics.py RUN_DIR [RUN_DIR ...] [--users 2000] [--beam 20] [--name NAME]

For each pipeline run directory (its data/, codes/ and stage2/ model) and a fixed random set of
validation users (seed 0, the same for every run):
- teacher-forced top-1 accuracy of each code level: given the target's true prefix, is the
  level's arg-max the target's token? (the decoder's accuracy level by level);
- beam prefix hit@k per level: does any of the top-k items of the trie-constrained beam search
  share the target's first l tokens? Level L is Recall@k. The drop from level to level shows
  where the beam loses the target;
- Recall@k of the same beam on these users, and the largest code group (items sharing a first
  token), from the codes.

Validation only: nothing here reads the test split. Writes benchmarks/results/NAME.{json,md}
(NAME defaults to stage2_diagnostics).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import RESULTS, add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.beam import BeamSearch, rank_users  # noqa: E402
from prorec.codes import CodeTrie, item_code_table  # noqa: E402
from prorec.data.history import history_tensor  # noqa: E402
from prorec.data.splits import read_split  # noqa: E402
from prorec.models.generator import load_generator, sibling_tables  # noqa: E402



@torch.no_grad()
def teacher_forced_accuracy(model, history: torch.Tensor, target: torch.Tensor, batch: int = 512) -> list[float]:
    """Per level: how often the argmax token is the target's, given the target's earlier tokens. The
    last level's argmax is taken over the tokens valid after the target's prefix (as the beam does)."""
    L = model.cfg.code_length
    hits = torch.zeros(L)
    siblings, item_prefix = sibling_tables(model.item_codes, model.cfg.k)
    for s in range(0, len(target), batch):
        h = history[s:s + batch]
        h = h[:, : int((h > 0).sum(1).max())]
        t = target[s:s + batch]
        codes = model.item_codes[t]
        hidden = model.decode(model.encode(h), codes)
        logits = model.code_logits(hidden[:, :L], t)
        logits[:, L - 1] = logits[:, L - 1].masked_fill(siblings[item_prefix[t]] <= 0, float("-inf"))
        pred = logits.argmax(-1)
        hits += (pred == codes).float().sum(0)
    return (hits / len(target)).tolist()


def diagnose(run_dir: Path, users: int, beam: int, ks: tuple[int, ...]) -> dict:
    data = run_dir / "data"
    model = load_generator(run_dir / "stage2").eval()
    valid = read_split(data, "valid")
    pick = np.sort(np.random.default_rng(0).choice(valid.num_rows, min(users, valid.num_rows), replace=False))
    valid = valid.take(pick)
    history = history_tensor(valid.column("history"), model.cfg.max_history)
    target = torch.from_numpy(valid.column("target").to_numpy().astype(np.int64))
    codes, k = item_code_table(run_dir / "codes" / "codes.parquet", model.cfg.n_items)
    t0 = time.perf_counter()
    acc = teacher_forced_accuracy(model, history, target)
    trie = CodeTrie.from_codes(codes[1:].numpy(), np.arange(1, len(codes)), k)
    search = BeamSearch(model, trie, max(beam, max(ks)), max(ks), exclude_history=True)
    ranked = rank_users(search, history, 256)  # [U, max k], -1 = empty slot
    tgt_codes = codes[target].numpy()  # (U, L)
    got = codes[np.maximum(ranked, 0)].numpy()  # (U, k, L)
    valid_slot = ranked > 0
    prefix_hit = {}
    for kk in ks:
        per_level = []
        for level in range(1, codes.shape[1] + 1):
            same = (got[:, :kk, :level] == tgt_codes[:, None, :level]).all(-1) & valid_slot[:, :kk]
            per_level.append(float(same.any(1).mean()))
        prefix_hit[kk] = per_level
    first = codes[1:, 0].numpy()
    return {"run": str(run_dir), "users": len(target), "code_length": int(codes.shape[1]), "k": k,
            "largest_first_level_group": int(np.bincount(first).max()),
            "teacher_forced_accuracy": acc, "beam": search.beam_size, "prefix_hit": prefix_hit,
            "recall": {kk: float((ranked[:, :kk] == target.numpy()[:, None]).any(1).mean()) for kk in ks},
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="pipeline run directories with a trained stage2/")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="stage2_diagnostics")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    tree = check_tree(args.allow_dirty)
    torch.set_num_threads(args.threads)
    ks = (1, 10, 20)
    rows = [diagnose(r, args.users, args.beam, ks) for r in args.runs]
    command = " ".join(["python", "benchmarks/stage2_diagnostics.py", *map(shlex.quote, sys.argv[1:])])
    L = max(r["code_length"] for r in rows)
    md = [f"# Stage II diagnostics on {args.users} validation users", "", f"Command: `{command}`", "",
          "Teacher-forced top-1 accuracy by level, and beam prefix hit@20 by level (any of the top 20 "
          "items shares the target's first l tokens; the last level is Recall@20).", "",
          "| run | L | largest group | " + " | ".join(f"acc l{i + 1}" for i in range(L)) + " | " +
          " | ".join(f"hit@20 l{i + 1}" for i in range(L)) + " | R@10 | R@20 |",
          "|" + "---|" * (3 + 2 * L + 2)]
    for r in rows:
        acc = [f"{a:.3f}" for a in r["teacher_forced_accuracy"]] + [""] * (L - r["code_length"])
        hit = [f"{h:.3f}" for h in r["prefix_hit"][20]] + [""] * (L - r["code_length"])
        md.append(f"| {Path(r['run']).name} | {r['code_length']} | {r['largest_first_level_group']} | "
                  + " | ".join(acc) + " | " + " | ".join(hit) + f" | {r['recall'][10]:.4f} | {r['recall'][20]:.4f} |")
    write_result(RESULTS / args.name, {"command": command, "runs": rows}, "\n".join(md) + "\n", tree)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
