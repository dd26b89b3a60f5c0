"""The full Beauty pipeline on one GPU: prepare the files on this machine, run them on the GPU one.

Here (the machine with the data, the encoder, Ray and faiss), once:

    python benchmarks/gpu_full_run.py prepare .carry/gpu --run runs/beauty_full_run --data ../shared/data/amazon-beauty

There (python3 with torch, pyarrow, pyyaml, safetensors and numpy; no Ray, no faiss, no encoder
weights are needed), from the repository root:

    benchmarks/gpu_full_run.sh .carry/gpu OUT [--run-dir DIR]

`prepare` fills CARRY (a git-ignored folder; name it in the device tool's `carry`), about 30 MiB:
- seed/: the data/ and embeddings/ folders of a finished run with its manifest.json and config.yaml.
  The pipeline links the data and embed stages from there (`--reuse`), so the encoder is never
  loaded on the GPU machine: its input is the semantic embeddings' Parquet file;
- data/: the dataset's two files, which the data stage's key hashes (a copy of ../shared, in a
  git-ignored folder: never committed);
- wheels/: the faiss-cpu wheel for Python 3.12 (the codes stage's k-means). `run` installs it into
  CARRY/site when `import faiss` fails.

`run` runs jobs/pipeline.py with jobs/configs/beauty/gpu.yaml (every stage in-process on the GPU,
Stage I and II to convergence, both in bf16), `--reuse CARRY/seed --data CARRY/data`, into
DIR (default OUT/run), then writes OUT/gpu_full_run.json (test and valid metrics, every stage's wall
time, the device, torch's version) with the run's manifest.json, eval/metrics.json and
eval/predictions.parquet beside it. `--tiny` is the CPU check that tests/test_gpu_full_run.py runs:
jobs/configs/tiny.yaml with the same in-process and GPU settings, on the synthetic data.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "jobs" / "configs" / "beauty" / "gpu.yaml"
TINY_CONFIG = ROOT / "jobs" / "configs" / "tiny.yaml"
# jobs/configs/beauty/gpu.yaml's execution settings, applied to the tiny config for the CPU check.
TINY_OVERRIDES = ["embed.use_ray=false", "codes.use_ray=false", "codes.use_gpu=false", "stage1.num_workers=0",
                  "stage1.use_gpu=true", "stage2.num_workers=0", "stage2.use_gpu=true", "eval.use_ray=false",
                  "eval.num_gpus_per_actor=1"]
DATASET_FILES = ("user_sequence.txt", "items.jsonl")
CARRY_LIMIT_MB = 64
SEED_STAGES = ("data", "embed")


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2 ** 20


def _tree_mb() -> float:
    """The size of the checkout's tracked files, which travel to the device machine with the carry."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 0.0
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file()) / 2 ** 20


def prepare(carry: Path, run: Path, data: Path | None, wheel: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from prorec.stages import output_files

    manifest = run / "manifest.json"
    if not manifest.is_file():
        _fail(f"{run} has no manifest.json: give a run directory whose data and embed stages finished")
    stages = json.loads(manifest.read_text()).get("stages", {})
    for s in SEED_STAGES:
        if stages.get(s, {}).get("status") != "done":
            _fail(f"{run}: stage {s} is not done ({stages.get(s, {}).get('status', 'never run')}); run the pipeline "
                  f"there first (e.g. --until embed)")
    seed = carry / "seed"
    if seed.exists():
        shutil.rmtree(seed)
    for f in [f for s in SEED_STAGES for f in output_files(s)] + ["manifest.json", "config.yaml"]:
        (seed / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / f, seed / f)
    if data is not None:
        missing = [f for f in DATASET_FILES if not (data / f).is_file()]
        if missing:
            _fail(f"{data} lacks {', '.join(missing)}: give the canonical dataset folder the run was made from")
        (carry / "data").mkdir(parents=True, exist_ok=True)
        for f in DATASET_FILES:
            shutil.copy2(data / f, carry / "data" / f)
    if wheel:
        from importlib.metadata import version

        wheels = carry / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64",
                        f"faiss-cpu=={version('faiss-cpu')}", "-d", str(wheels)], check=True)
    size = _size_mb(carry)
    tree = _tree_mb()
    print(f"prepared {carry}: {size:.1f} MiB (seed from {run}{', dataset from ' + str(data) if data else ''}); "
          f"with the checkout's tracked files ({tree:.1f} MiB) {size + tree:.1f} MiB travel")
    if size + tree > CARRY_LIMIT_MB:
        _fail(f"{carry} ({size:.0f} MiB) and the tracked files ({tree:.0f} MiB) come to over the device tool's "
              f"{CARRY_LIMIT_MB} MiB: carry less (e.g. --no-wheel where faiss is installed there)")


def _faiss_env(carry: Path) -> dict[str, str]:
    """The environment for the pipeline: faiss from CARRY/site when this Python has none."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if subprocess.run([sys.executable, "-c", "import faiss"], capture_output=True).returncode != 0:
        wheels = sorted((carry / "wheels").glob("faiss*.whl"))
        if not wheels:
            _fail(f"this Python has no faiss and {carry / 'wheels'} holds no faiss wheel: run `prepare` with the wheel")
        site = carry / "site"
        if not (site / "faiss").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site),
                            str(wheels[-1])], check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run(carry: Path, out: Path, run_dir: Path | None, tiny: bool) -> dict:
    seed = carry / "seed"
    if not (seed / "manifest.json").is_file():
        _fail(f"{seed} is missing: run `python benchmarks/gpu_full_run.py prepare {carry} ...` on the machine "
              "that has the data and the encoder, and carry that folder here")
    out.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir or out / "run"
    env = _faiss_env(carry)
    cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--out", str(run_dir), "--reuse", str(seed)]
    if tiny:
        cmd += ["--config", str(TINY_CONFIG), *TINY_OVERRIDES]
    else:
        if not all((carry / "data" / f).is_file() for f in DATASET_FILES):
            _fail(f"{carry / 'data'} lacks the dataset files ({', '.join(DATASET_FILES)}): run `prepare` with --data")
        cmd += ["--config", str(GPU_CONFIG), "--data", str(carry / "data")]
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    wall = time.perf_counter() - t0
    import torch

    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    stages = manifest.get("stages", {})
    result = {"returncode": rc, "wall_seconds": wall, "tiny": tiny, "command": cmd,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__,
              "stages": {s: {k: r.get(k) for k in ("status", "wall_seconds", "reused_from")} for s, r in stages.items()},
              "git": manifest.get("git")}
    metrics = run_dir / "eval" / "metrics.json"
    if metrics.is_file():
        result["metrics"] = json.loads(metrics.read_text())
    for name in ("stage1", "stage2"):
        m = run_dir / name / "metrics.json"
        if m.is_file():
            result[f"{name}_history"] = json.loads(m.read_text()).get("history")
    (out / "gpu_full_run.json").write_text(json.dumps(result, indent=2) + "\n")
    for f in ("manifest.json", "eval/metrics.json", "eval/predictions.parquet"):
        if (run_dir / f).is_file() and run_dir != out:
            shutil.copy2(run_dir / f, out / Path(f).name)
    print(f"gpu_full_run: exit {rc} in {wall:.0f} s on {result['device']}; test {result.get('metrics', {}).get('test')}",
          flush=True)
    if rc != 0:
        raise SystemExit(rc)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: copy a finished run's data and embeddings, the dataset and the faiss wheel")
    p.add_argument("carry", type=Path)
    p.add_argument("--run", type=Path, required=True, help="a run directory whose data and embed stages are done")
    p.add_argument("--data", type=Path, help="the dataset folder the run was made from (not needed for --tiny)")
    p.add_argument("--no-wheel", action="store_true", help="skip the faiss wheel (the target Python has faiss)")
    r = sub.add_parser("run", help="there: run the pipeline on the GPU from CARRY")
    r.add_argument("carry", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--run-dir", type=Path, help="the run directory (default OUT/run)")
    r.add_argument("--tiny", action="store_true", help="the CPU check: the tiny synthetic config")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.carry, args.run, args.data, not args.no_wheel)
    else:
        run(args.carry, args.out, args.run_dir, args.tiny)


if __name__ == "__main__":
    main()
