"""Semantic embedding throughput: Ray Data actor pool vs an in-process loop of the same model.

CPU (default): embeds the Beauty items with MiniLM once in-process (use_ray=False), once per Ray
actor count, and in-process again (the machine is shared, so the loop is timed before and after
and averaged). Each run is the real `embed_items` (model load + length sort + encode + write), so
items/s compares like with like; `ray.init` is timed apart because a pipeline job starts Ray once
for all its stages. Writes benchmarks/results/embed_throughput.{json,md}.

    python benchmarks/embed_throughput.py                 # CPU, all 12,101 Beauty items
    python benchmarks/embed_throughput.py --llama7b-shape # GPU: random Llama-2-7B shape, bf16

GPU (--llama7b-shape): a random-weight LlamaModel of Llama-2-7B's shape (hidden 4096, 32 layers,
32 heads, intermediate 11008) in bf16 encodes every Beauty text through `TextEncoder.encode` on
the same length-sorted batches as `embed_items`; reports wall seconds, tokens/s and the fraction
of peak (2 x 6.7 GFLOP a token over --peak-tflops). Texts are tokenised with the MiniLM tokenizer
(vocab 30,522 < Llama's 32,000), so token counts are close to, not equal to, Llama's.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.results_io import add_allow_dirty, check_tree, write_result  # noqa: E402
from prorec.artifacts import read_embeddings  # noqa: E402
from prorec.config import EmbedConfig  # noqa: E402
from prorec.data.canonical import load_canonical  # noqa: E402
from prorec.data.splits import write_splits  # noqa: E402
from prorec.embed import _batches, embed_items, length_order, read_items  # noqa: E402
from prorec.encoders import EncoderSpec, TextEncoder, load_tokenizer, resolve_encoder  # noqa: E402

TEMPLATE = "{title}; {categories}"
BEAUTY = ROOT.parent / "shared" / "data" / "amazon-beauty"
LLAMA2_7B_FLOP_PER_TOKEN = 2 * 6.7e9


def make_items(data: Path, work: Path, n_items: int | None) -> Path:
    items = write_splits(load_canonical(data), work / "data", template=TEMPLATE) / "items.parquet"
    if n_items:
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(items).slice(0, n_items), items)
    return items


class CpuMeter:
    """CPU seconds used by this process and all its descendants (Ray's raylet and workers are).

    Wall time on a shared machine depends on what else runs; CPU seconds a item do not, so the
    report gives both. Reads /proc every `interval` s; a process that exits loses under `interval`.
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self.seen, self.base, self.cpu_s = interval, {}, {}, None
        self._tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> dict[tuple[int, int], int]:
        stats = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        rest = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                # fields after the name: state ppid ... utime(12) stime(13) ... starttime(20)
                stats[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19]))
        tree, frontier = set(), {os.getpid()}
        while frontier:
            tree |= frontier
            frontier = {p for p, (pp, _, _) in stats.items() if pp in frontier and p not in tree}
        return {(p, stats[p][2]): stats[p][1] for p in tree if p in stats}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.seen.update(self._sample())

    def __enter__(self) -> "CpuMeter":
        import threading

        self.base = self._sample()
        self.seen = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seen.update(self._sample())
        self.cpu_s = sum(t - self.base.get(k, 0) for k, t in self.seen.items()) / self._tick


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed_embed(cfg: EmbedConfig, items: Path, out: Path, label: str) -> dict:
    load_before = load_avg()
    with CpuMeter() as meter:
        t0 = time.perf_counter()
        embed_items(cfg, items, out)
        wall = time.perf_counter() - t0
    n = read_items(items).num_rows
    run = {"label": label, "use_ray": cfg.use_ray, "num_actors": cfg.num_actors if cfg.use_ray else 0,
           "batch_size": cfg.batch_size, "items": n, "wall_s": round(wall, 2), "items_per_s": round(n / wall, 1),
           "cpu_s": round(meter.cpu_s, 1), "items_per_cpu_s": round(n / meter.cpu_s, 2),
           "loadavg_before": load_before, "loadavg_after": load_avg()}
    print(f"== {label}: {n} items in {wall:.1f} s = {n / wall:.1f} items/s; {meter.cpu_s:.1f} CPU s "
          f"= {n / meter.cpu_s:.1f} items/CPU-s", flush=True)
    return run


def cpu_benchmark(args: argparse.Namespace, work: Path) -> dict:
    import ray

    import torch  # noqa: F401  (imported up front: the loop rows then time what a warm process does,
    import transformers  # noqa: F401  while each Ray actor pays for its own imports)

    items = make_items(Path(args.data), work, args.n_items)
    runs, vectors, ray_init_s = [], {}, []

    def loop(tag: str) -> dict:
        runs.append(timed_embed(EmbedConfig(use_ray=False, batch_size=args.batch_size), items,
                                work / f"{tag}.parquet", tag))  # own file each: never a cache hit
        return runs[-1]

    # Each Ray run is sandwiched between two loop runs and compared with their mean: other
    # processes share this CPU, and its load drifts over minutes. Ray is down during loop runs.
    loop("loop_0")
    for k, a in enumerate(args.ray_actors, 1):
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                           "PYTHONPATH": str(ROOT)}})
        ray_init_s.append(round(time.perf_counter() - t0, 2))
        label = f"ray_data_{a}_actor{'s' if a > 1 else ''}"
        out = work / f"ray{a}.parquet"
        runs.append(timed_embed(EmbedConfig(use_ray=True, num_actors=a, batch_size=args.batch_size), items, out,
                                label))
        vectors[a] = read_embeddings(out)[2]
        ray.shutdown()
        loop(f"loop_{k}")
    loop_vec = read_embeddings(work / "loop_0.parquet")[2]
    return {"mode": "cpu_minilm", "model": "all-MiniLM-L6-v2", "items": runs[0]["items"],
            "batch_size": args.batch_size, "ray_init_s": ray_init_s, "runs": runs, **summarize(runs),
            "max_abs_diff_ray_vs_loop": float(max(np.abs(v - loop_vec).max() for v in vectors.values()))}


def summarize(runs: list[dict]) -> dict:
    """Ratios of each Ray run to the mean of the loop runs just before and after it.

    items per CPU-second (all of this process tree: driver, raylet, actors) is the headline: it
    does not move with the other load on a shared machine. Wall items/s is reported beside it.
    """
    wall, cpu = {}, {}
    for i, r in enumerate(runs):
        if r["use_ray"]:
            around = [runs[i - 1], runs[i + 1]]
            wall[r["label"]] = round(r["items_per_s"] / float(np.mean([x["items_per_s"] for x in around])), 3)
            cpu[r["label"]] = round(r["items_per_cpu_s"] / float(np.mean([x["items_per_cpu_s"] for x in around])), 3)
    best = max(cpu, key=cpu.get)
    return {"cpu_efficiency_ratio_per_config": cpu, "wall_ratio_per_config": wall, "best_ray": best,
            "ratio_best_ray_over_loop_cpu": cpu[best], "ratio_best_ray_over_loop_wall": wall[best],
            "beauty_wall_s": {r["label"]: r["wall_s"] for r in runs}}


def llama7b_benchmark(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaModel

    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("--llama7b-shape needs a CUDA GPU (add --tiny to check the code path on the CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    items = read_items(make_items(Path(args.data), work, args.n_items))
    minilm = resolve_encoder(EmbedConfig())
    spec = EncoderSpec(name="random-llama-2-7b-shape", path=minilm.path, local=True, pooling="mean",
                       normalize=False, max_length=args.max_length, dtype="bfloat16", fingerprint="random")
    shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    if args.tiny:  # same code path, toy size, to check the script without a GPU
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg = LlamaConfig(vocab_size=32000, num_key_value_heads=shape["num_attention_heads"],
                      max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:  # random init directly on the GPU, in bf16 (13.5 GB)
        model = LlamaModel._from_config(cfg, dtype=torch.bfloat16)
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    enc = TextEncoder.from_model(model, load_tokenizer(spec), spec)

    texts = items.column("text").to_pylist()
    sorted_items = items.take(np.asarray(length_order(spec, texts)))
    batches = [b.column("text").to_pylist() for b in _batches(sorted_items, args.batch_size)]
    mask_tokens = [enc.tokenizer(b, padding=True, truncation=True, max_length=spec.max_length)["attention_mask"]
                   for b in batches]
    real_tokens = int(sum(sum(map(sum, m)) for m in mask_tokens))
    padded_tokens = int(sum(len(m) * len(m[0]) for m in mask_tokens))
    enc.encode(batches[0])  # warm-up: CUDA context, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = [enc.encode(b) for b in batches]
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    vecs = np.concatenate(out)
    tps = real_tokens / wall
    # Llama-2-7B: 2 x 6.7 GFLOP a token (as quoted); the toy size uses 2 x its non-embedding parameters.
    flop = LLAMA2_7B_FLOP_PER_TOKEN if not args.tiny else 2.0 * (n_params - model.embed_tokens.weight.numel())
    return {
        "mode": "llama7b_shape" + ("_tiny" if args.tiny else ""), "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "params": n_params, "dtype": "bfloat16", "items": len(texts), "batch_size": args.batch_size,
        "max_length": args.max_length, "init_s": round(init_s, 2), "wall_s": round(wall, 2),
        "items_per_s": round(len(texts) / wall, 1), "real_tokens": real_tokens, "padded_tokens": padded_tokens,
        "tokens_per_s": round(tps, 1), "padded_tokens_per_s": round(padded_tokens / wall, 1),
        "peak_tflops": args.peak_tflops,
        "flop_per_token": flop,
        "fraction_of_peak": round(tps * flop / (args.peak_tflops * 1e12), 4),
        # Padded positions are computed too: this is the work the GPU actually did.
        "fraction_of_peak_padded": round(padded_tokens / wall * flop / (args.peak_tflops * 1e12), 4),
        "finite": bool(np.isfinite(vecs).all()), "dim": int(vecs.shape[1]),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
    }


def write_report(result: dict, out: Path, tree: dict) -> None:
    lines = [f"# Embedding throughput ({result['mode']})", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}", ""]
    if result["mode"] == "cpu_minilm":
        lines += ["| run | items | wall s | items/s | CPU s | items/CPU-s | load avg before -> after |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["runs"]:
            lines.append(f"| {r['label']} | {r['items']} | {r['wall_s']} | {r['items_per_s']} | {r['cpu_s']} | "
                         f"{r['items_per_cpu_s']} | "
                         f"{r['loadavg_before'][0]} -> {r['loadavg_after'][0]} |")
        lines += ["", "Ray Data / in-process loop, each Ray run against the mean of the loop runs just before and after:",
                  f"- items per CPU-second (this process and its children: driver, raylet, actors; does not move "
                  f"with the other load): {result['cpu_efficiency_ratio_per_config']}; best {result['best_ray']}: "
                  f"**{result['ratio_best_ray_over_loop_cpu']}** (goal >= 0.9)",
                  f"- wall items/s (moves with the other load, see the load averages): "
                  f"{result['wall_ratio_per_config']}",
                  f"- `ray.init` (not in the Ray rows): {result['ray_init_s']} s",
                  f"- Max |Ray - loop| over all vectors: {result['max_abs_diff_ray_vs_loop']:.2e}",
                  "- Every row is a full `embed_items` call: model load, length sort, encode, write.",
                  f"- Note: {result['note']}"]
    else:
        lines += [f"- {k}: {v}" for k, v in result.items() if k not in ("command", "machine", "mode")]
    write_result(out, result, "\n".join(lines) + "\n", tree)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(BEAUTY))
    p.add_argument("--n-items", type=int, default=None, help="first N items only (default all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ray-actors", type=int, nargs="+", default=[2, 1], help="actor counts to time")
    p.add_argument("--llama7b-shape", action="store_true", help="GPU benchmark of a random Llama-2-7B shape")
    p.add_argument("--tiny", action="store_true", help="with --llama7b-shape: toy size, to check on a CPU")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--out", default=None, help="results path without suffix")
    add_allow_dirty(p)
    args = p.parse_args()
    tree = check_tree(args.allow_dirty)
    default_out = "embed_throughput_llama7b" if args.llama7b_shape else "embed_throughput"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = (llama7b_benchmark if args.llama7b_shape else cpu_benchmark)(args, Path(tmp))
    result["command"] = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/embed_throughput.py", *sys.argv[1:]])
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    if not args.llama7b_shape:
        result["note"] = ("CPU shared with other processes (see load averages), so absolute times drift; "
                          "each Ray run is compared with the loop runs just before and after it")
    write_report(result, out, tree)


if __name__ == "__main__":
    main()
