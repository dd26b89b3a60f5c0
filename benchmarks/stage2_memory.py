"""Where Stage II's memory goes: its process's resident memory phase by phase, and what holds it.

    python benchmarks/scale.py --sizes 12000 120000 --stages generate data embed stage1 codes --no-encode \\
        --no-side-by-side --work runs/scale_mem --results runs/scale_mem_results --name prep --allow-dirty
    python benchmarks/stage2_memory.py --work runs/scale_mem --sizes 12000 120000 --name stage2_memory

For each size, a fresh process runs the same Stage II as `benchmarks/scale.py`'s stage2 row (in-process,
one epoch of `--steps` steps, `--users` validation users, the default Stage2Config otherwise) on the
catalogue that scale.py left in WORK/n<size>, while a thread samples the process's resident memory
every 5 ms. The stage's own functions are wrapped (not changed) to mark its phases: reading the
inputs, building the trainer, the training steps, the validation, the epoch's checkpoint (the
report) and the saved model. For each phase: the resident memory at its end and its peak inside.
Beside them, an exact account of the large tensors the trainer holds: the per-item tables, the other
weights, the model's buffers, the optimiser's state and the training rows.

Writes benchmarks/results/NAME.json and NAME.md. The memory of a process is what Linux reports
(/proc/self/statm's resident pages); the allocator may keep freed memory, so a phase's end can sit above what is live.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results_io import add_allow_dirty, add_results_dir, check_tree, write_result  # noqa: E402

MB = 2 ** 20


class Sampler:
    """The process's resident memory sampled on a thread; `mark(name)` closes a phase."""

    def __init__(self, every: float = 0.005) -> None:
        import os

        self.page, self.every = os.sysconf("SC_PAGE_SIZE"), every
        self.peak = self.rss()
        self.phases: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> float:
        with open("/proc/self/statm") as f:  # Linux: size, resident, ... in pages
            return int(f.read().split()[1]) * self.page / MB

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.rss()
            with self._lock:
                self.peak = max(self.peak, r)
            time.sleep(self.every)

    def mark(self, name: str) -> None:
        r = self.rss()
        with self._lock:
            peak, self.peak = max(self.peak, r), r
        self.phases.append({"phase": name, "seconds": round(time.perf_counter() - self.t0, 2),
                            "rss_end_mb": round(r, 1), "peak_in_phase_mb": round(peak, 1)})

    def stop(self) -> None:
        self._stop.set()


def tensor_mb(tensors) -> float:
    return round(sum(t.numel() * t.element_size() for t in tensors) / MB, 1)


def account(trainer) -> dict[str, float]:
    """The large things a Stage2Trainer holds, in MB."""
    import torch

    model = getattr(trainer.model, "module", trainer.model)
    items = {id(t.weight) for t in model.item_tables()}
    state = [v for s in trainer.opt.state.values() for v in (s.values() if isinstance(s, dict) else [])
             if isinstance(v, torch.Tensor)]
    out = {"per-item tables (item-ID embedding, item head)": tensor_mb(p for p in model.parameters() if id(p) in items),
           "other weights": tensor_mb(p for p in model.parameters() if id(p) not in items),
           "optimiser state": tensor_mb(state)}
    for name, b in model.named_buffers():
        out[f"buffer {name}"] = tensor_mb([b])
    out["training rows (histories, targets, row index)"] = round(
        (trainer.hist.nbytes + trainer.tgt.numel() * 8 + trainer.rows.nbytes) / MB, 1)
    out["trie"] = tensor_mb(list(trainer.trie.allowed) + list(trainer.trie.child))
    return out


def child(run: Path, steps: int, users: int, epochs: int, folder: str = "stage2_memory") -> dict[str, Any]:
    """Stage II on the catalogue in `run`, phase by phase (this process only)."""
    import shutil

    import torch

    torch.set_num_threads(1)
    import prorec.stage2 as s2
    from prorec.config import Stage2Config
    from prorec.trainer import LocalContext, peak_rss_mb

    sampler = Sampler()
    sampler.mark("imports")
    accounts: dict[str, dict[str, float]] = {}

    def wrap(owner, name: str, phase: str | list[str], after=None):
        """Mark `phase` when owner.name returns (a list: one name a call, the last one repeated)."""
        real, calls = getattr(owner, name), []

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            if after is not None:
                after(args, out)
            names = phase if isinstance(phase, list) else [phase]
            sampler.mark(names[min(len(calls), len(names) - 1)])
            calls.append(1)
            return out

        setattr(owner, name, wrapped)

    wrap(s2, "load_inputs", ["read the inputs", "the model config's shapes (after training)"])
    if hasattr(s2, "build_trainer"):  # the inputs it read are dropped when it returns
        wrap(s2, "build_trainer", "build the trainer (model, optimiser, trie)",
             after=lambda a, trainer: accounts.__setitem__("built", account(trainer)))
    else:  # before build_trainer (up to 723c661): the epoch loop kept the inputs
        wrap(s2.Stage2Trainer, "__init__", "build the trainer (model, optimiser, trie)",
             after=lambda a, _: accounts.__setitem__("built", account(a[0])))
    each = lambda what: [f"epoch {e + 1}: {what}" for e in range(epochs)]  # noqa: E731
    wrap(s2.Stage2Trainer, "train_epoch", each(f"{steps} training steps"),
         after=lambda a, _: accounts.setdefault("trained", account(a[0])))
    wrap(s2.Stage2Trainer, "validate", each(f"validation ({users} users)"))
    wrap(LocalContext, "report", each("checkpoint (the best weights copied when better, the state written)"))
    wrap(s2, "save_generator", "the saved model")
    out_dir = run / folder
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = Stage2Config(num_workers=0, max_epochs=epochs, patience=epochs, steps_per_epoch=steps, valid_users=users)
    s2.run_stage2(cfg, run / "data", run / "codes" / "codes.parquet", run / "stage1" / "item_embeddings.parquet", out_dir)
    sampler.mark("end")
    sampler.stop()
    return {"phases": sampler.phases, "accounts": accounts, "peak_rss_mb": peak_rss_mb()}


def markdown(res: dict[str, Any], command: str) -> str:
    sizes = res["sizes"]
    head = "| " + " | ".join(f"{n:,} items" for n in sizes) + " |"
    md = ["# Stage II's memory, phase by phase", "", f"Command: `{command}`", "",
          f"Stage II as in `scale.py`'s stage2 row: in-process, {res.get('epochs', 1)} epoch(s) of {res['steps']} training "
          f"steps and {res['users']} validation users, the default `Stage2Config` otherwise, on the synthetic catalogues scale.py writes; "
          "one fresh process a size. Resident memory sampled every 5 ms (/proc/self/statm); a phase's peak is the "
          "largest sample inside it.", "",
          "## Resident memory at the end of each phase, and its peak inside it (MB)", "",
          "| phase |" + head.replace("items |", "items, end | peak |")[1:],
          "|---|" + "---|---|" * len(sizes)]
    names = [p["phase"] for p in res["runs"][0]["phases"]]
    for i, name in enumerate(names):
        cells = []
        for r in res["runs"]:
            p = r["phases"][i]
            cells += [f"{p['rss_end_mb']:,.0f}", f"{p['peak_in_phase_mb']:,.0f}"]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md.append("| the process's peak (getrusage) | " + " | ".join(f"{r['peak_rss_mb']:,.0f} | " for r in res["runs"]) + "|")
    for when, title in (("built", "after the trainer is built"), ("trained", "after the training steps")):
        md += ["", f"## What the trainer holds {title} (MB, exact)", "", "| what |" + head[1:],
               "|---|" + "---|" * len(sizes)]
        keys = list(res["runs"][-1]["accounts"][when])
        for k in keys:
            md.append(f"| {k} | " + " | ".join(f"{r['accounts'][when].get(k, 0):,.1f}" for r in res["runs"]) + " |")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "scale", help="scale.py's --work (WORK/n<size>)")
    p.add_argument("--sizes", type=int, nargs="+", default=[12_000, 120_000])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1,
                   help="epochs of --steps steps (scale.py runs 1; from 2 on, an improving epoch replaces the best copy)")
    p.add_argument("--name", default="stage2_memory")
    add_results_dir(p)
    add_allow_dirty(p)
    p.add_argument("--folder", default="stage2_memory", help="the trained model's folder inside WORK/n<size>")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.out.write_text(json.dumps(child(args.child, args.steps, args.users, args.epochs, args.folder)))
        return 0
    tree = check_tree(args.allow_dirty)
    runs = []
    for n in args.sizes:
        run = args.work / f"n{n}"
        if not (run / "codes" / "codes.parquet").is_file():
            sys.exit(f"error: {run} has no codes/codes.parquet. Fix: first run benchmarks/scale.py --sizes {n} "
                     f"--stages generate data embed stage1 codes --work {args.work} (see this script's docstring)")
        print(f"stage2_memory: {n:,} items ...", file=sys.stderr, flush=True)
        out = run / f"{args.folder}.json"
        subprocess.run([sys.executable, __file__, "--child", str(run), "--out", str(out), "--steps", str(args.steps),
                        "--users", str(args.users), "--epochs", str(args.epochs), "--folder", args.folder], check=True)
        runs.append(json.loads(out.read_text()))
        print(f"stage2_memory: {n:,} items: peak {runs[-1]['peak_rss_mb']:,.0f} MB", file=sys.stderr, flush=True)
    res = {"command": " ".join(["python", "benchmarks/stage2_memory.py", *(argv or sys.argv[1:])]),
           "sizes": args.sizes, "steps": args.steps, "users": args.users, "epochs": args.epochs, "runs": runs}
    write_result(args.results / args.name, res, markdown(res, res["command"]), tree)
    print(f"wrote {args.results / args.name}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
