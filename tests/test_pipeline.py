"""The pipeline job end to end on jobs/configs/tiny.yaml: outputs, resume, partial reruns, a killed
Stage II. (`ray job submit` of the pipeline on a real cluster: tests/test_cluster_local.py.)

Every run goes through the real entry point (`python jobs/pipeline.py`) in a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prorec.stages import NAMES as STAGES
from prorec.stages import output_files

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
METRICS = [f"{m}@{k}" for k in (5, 10, 20) for m in ("recall", "ndcg")]
# jobs/configs/tiny.yaml's metrics, measured on the commit before the stage redesign (issue 16) and
# unchanged by it.
TINY_METRICS = {
    "valid": {"recall@5": 0.046667, "ndcg@5": 0.024313, "recall@10": 0.093333, "ndcg@10": 0.039164,
              "recall@20": 0.206667, "ndcg@20": 0.067181},
    "test": {"recall@5": 0.046667, "ndcg@5": 0.028485, "recall@10": 0.100000, "ndcg@10": 0.044992,
             "recall@20": 0.213333, "ndcg@20": 0.073253},
}


def _env() -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # these runs are configured without Ray and must not find one
    return env


def _cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--config", str(TINY), "--out", str(out), *args]


def _pipeline(out: Path, *args: str, timeout: float = 480) -> str:
    r = subprocess.run(_cmd(out, *args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"pipeline exited with {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n"
                    f"--- stderr\n{r.stderr[-4000:]}")
    return r.stdout


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _mtimes(run: Path, folders: tuple[str, ...] | None = None) -> dict[str, int]:
    """mtime of every artifact (the manifest and config.yaml are rewritten by every invocation)."""
    files = [p for p in run.rglob("*") if p.is_file() and p.name not in ("manifest.json", "config.yaml")]
    if folders is not None:
        files = [p for p in files if p.relative_to(run).parts[0] in folders]
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in files}


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)  # copy2 keeps the mtimes
    return dest


PIPELINE_CONFIGS = [TINY, REPO / "jobs" / "configs" / "default.yaml", REPO / "jobs" / "configs" / "large_catalogue.yaml",
                    *sorted((REPO / "jobs" / "configs" / "beauty").rglob("*.yaml"))]


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "jobs" / "configs")))
def test_every_shipped_config_is_valid(path):
    from prorec.config import load_config

    load_config(path)  # raises ConfigError on any value its validation refuses
    # A config's header tells how to run it (a baseline's: jobs/baseline.py NAME).
    header = path.read_text().split("\n\n")[0].replace("\\\n", "")
    assert re.search(r"python jobs/(pipeline\.py|baseline\.py \w+) --config jobs/configs/", header)


def test_refuses_a_folder_that_is_not_a_run_directory(tmp_path, capsys):
    from prorec.pipeline import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("not ours")
    assert main(["--config", str(TINY), "--out", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert (tmp_path / "data" / "precious.txt").read_text() == "not ours"
    assert not (tmp_path / "manifest.json").exists()


def test_refuses_an_out_that_is_a_file_and_settings_the_data_cannot_support(tmp_path, capsys):
    from prorec.pipeline import main

    (tmp_path / "file").write_text("x")
    assert main(["--config", str(TINY), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # tiny.yaml's synthetic data has 120 items: K=120 cannot group them; refused before any stage runs.
    assert main(["--config", str(TINY), "--out", str(tmp_path / "run"), "codes.k=120"]) == 2
    assert "codes.k=120 is not below the number of items (120)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_second_driver_on_the_same_run_directory_is_refused(tmp_path, capsys):
    from prorec.pipeline import LOCK_FILE, main, run_lock

    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):
        assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        assert main(["--config", str(TINY), "--out", str(run)]) == 2
        assert "another driver (pid" in capsys.readouterr().err
    assert not (run / LOCK_FILE).exists()  # released
    import socket

    (run / LOCK_FILE).write_text(f"999999999 {socket.gethostname()}\n")  # a driver that died without releasing it
    with run_lock(run):
        assert "took over the lock" in capsys.readouterr().out
    (run / LOCK_FILE).write_text("1 another-machine\n")  # a driver on another host: its pid means nothing here
    assert main(["--config", str(TINY), "--out", str(run)]) == 2
    assert "pid 1 on another-machine" in capsys.readouterr().err
    (run / LOCK_FILE).unlink()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("pipeline") / "run"
    return run, _pipeline(run)


@pytest.mark.slow
@pytest.mark.e2e
def test_end_to_end_writes_manifest_metrics_and_predictions(tiny_run):
    run, stdout = tiny_run
    for i, stage in enumerate(STAGES, 1):
        assert f"== [{i}/6] {stage} ==" in stdout
        assert f"stage {stage}: done in" in stdout
    m = _manifest(run)
    assert m["ray"] == "not used"  # tiny.yaml runs every stage in-process, so Ray never starts
    for stage in STAGES:
        rec = m["stages"][stage]
        assert rec["status"] == "done" and rec["wall_seconds"] > 0 and len(rec["key"]) == 16
        assert set(rec["outputs"]) == set(output_files(stage))
    assert m["config"]["codes"]["k"] == 16 and m["packages"]["torch"] and m["packages"]["ray"]
    assert set(m["inputs"]) == {"items.jsonl", "user_sequence.txt"}  # the generated synthetic files

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["metrics"] == metrics
    # Every stage is seeded, so the metrics are the same on every run; a silent change in any stage
    # (data split, embeddings, Stage I, codes, Stage II, beam search) moves them. One user more or
    # less among the 300 test users moves recall by 0.0033, far beyond the tolerance.
    for split, want in TINY_METRICS.items():
        assert metrics[split] == pytest.approx(want, abs=1e-4), split
    # The closing table shows this run's test numbers, and no paper column: the synthetic data is
    # not one of the paper's datasets (test_the_final_table_sets_the_run_beside_the_papers_row...).
    assert re.search(rf"^recall@10\s+{metrics['test']['recall@10']:.4f}\s*$", stdout, re.M)
    assert re.search(rf"^ndcg@20\s+{metrics['test']['ndcg@20']:.4f}\s*$", stdout, re.M)
    assert "0.0939" not in stdout and "the paper reports Amazon Beauty and Sports only" in stdout

    preds = pq.read_table(run / "eval" / "predictions.parquet").to_pylist()
    test_users = pq.read_table(run / "data" / "test.parquet").column("user_id").to_pylist()
    item_ids = set(pq.read_table(run / "data" / "items.parquet").column("item_id").to_pylist())
    assert [p["user_id"] for p in preds] == test_users
    assert all(0 < len(p["items"]) <= 20 and set(p["items"]) <= item_ids for p in preds)
    assert all(len(set(p["items"])) == len(p["items"]) for p in preds)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_rerun_skips_every_finished_stage(tiny_run):
    run, _ = tiny_run
    before = _mtimes(run)
    stdout = _pipeline(run)
    assert "plan: nothing to do" in stdout
    for stage in STAGES:
        assert f"stage {stage}: done, skipped (unchanged)" in stdout
    m = _manifest(run)
    assert all(m["stages"][s]["status"] == "done" and m["stages"][s]["skipped_last_run"] for s in STAGES)
    assert set(m["inputs"]) == {"items.jsonl", "user_sequence.txt"}  # still recorded on a rerun
    assert _mtimes(run) == before  # not one artifact was rewritten


@pytest.mark.slow
@pytest.mark.e2e
def test_a_changed_codes_k_reruns_codes_onward_only(tiny_run, tmp_path):
    run = _copy(tiny_run[0], tmp_path / "run")
    upstream = _mtimes(run, ("data", "embeddings", "stage1"))
    old_codes = _mtimes(run, ("codes",))
    stdout = _pipeline(run, "codes.k=8")
    for stage in ("data", "embed", "stage1"):
        assert f"stage {stage}: done, skipped (unchanged)" in stdout
    assert "stage codes: running (config changed (codes.k: 16 -> 8))" in stdout
    assert "stage stage2: running (upstream stage codes reruns)" in stdout
    assert "stage eval: running (upstream stage codes reruns)" in stdout
    assert _mtimes(run, ("data", "embeddings", "stage1")) == upstream
    assert all(_mtimes(run, ("codes",))[f] != t for f, t in old_codes.items())
    assert json.loads((run / "codes" / "code_report.json").read_text())["k"] == 8
    assert json.loads((run / "stage2" / "model_config.json").read_text())["k"] == 8
    m = _manifest(run)
    assert [s for s in STAGES if not m["stages"][s]["skipped_last_run"]] == ["codes", "stage2", "eval"]


@pytest.mark.slow
@pytest.mark.e2e
def test_reranking_reruns_eval_only_with_the_din_stage1_saved(tiny_run, tmp_path):
    """eval.rerank_weight reads the DIN that Stage I saved, and changes the evaluation alone."""
    run = _copy(tiny_run[0], tmp_path / "run")
    assert (run / "stage1" / "din.safetensors").is_file()
    before = _mtimes(run, ("data", "embeddings", "stage1", "codes", "stage2"))
    plain = json.loads((run / "eval" / "metrics.json").read_text())
    stdout = _pipeline(run, "eval.rerank_weight=1.0", "eval.beam_size=40")
    assert "stage eval: running (config changed" in stdout
    assert _mtimes(run, ("data", "embeddings", "stage1", "codes", "stage2")) == before
    m = _manifest(run)
    assert [s for s in STAGES if not m["stages"][s]["skipped_last_run"]] == ["eval"]
    assert m["config"]["eval"]["rerank_weight"] == 1.0
    reranked = json.loads((run / "eval" / "metrics.json").read_text())
    assert reranked != plain and set(reranked["test"]) == set(plain["test"])
    # The other two signals read the run's semantic embeddings and train split; still eval only.
    stdout = _pipeline(run, "eval.rerank_weight=1.0", "eval.beam_size=40", "eval.rerank_semantic_weight=5.0",
                       "eval.rerank_transition_weight=2.0")
    assert "eval.rerank_semantic_weight: 0.0 -> 5.0" in stdout
    assert _mtimes(run, ("data", "embeddings", "stage1", "codes", "stage2")) == before
    assert json.loads((run / "eval" / "metrics.json").read_text()) != reranked


@pytest.mark.slow
@pytest.mark.e2e
def test_the_evaluation_beam_never_changes_stage2(tiny_run, tmp_path):
    """Stage II validates with its own stage2.valid_beam_size: a fresh run with another eval.beam_size
    trains the same weights (same Stage II key), and changing it in a finished run reruns the evaluation only."""
    run, _ = tiny_run
    other = tmp_path / "beam40"
    _pipeline(other, "eval.beam_size=40")
    assert (other / "stage2" / "model.safetensors").read_bytes() == (run / "stage2" / "model.safetensors").read_bytes()
    keys = {r: {s: _manifest(r)["stages"][s]["key"] for s in STAGES} for r in (run, other)}
    assert [s for s in STAGES if keys[run][s] != keys[other][s]] == ["eval"]
    again = _copy(run, tmp_path / "again")
    before = _mtimes(again, ("data", "embeddings", "stage1", "codes", "stage2"))
    _pipeline(again, "eval.beam_size=40")
    assert _mtimes(again, ("data", "embeddings", "stage1", "codes", "stage2")) == before
    assert [s for s in STAGES if not _manifest(again)["stages"][s]["skipped_last_run"]] == ["eval"]


@pytest.mark.slow
@pytest.mark.e2e
def test_reuse_links_in_the_finished_stages_of_another_run(tiny_run, tmp_path):
    run, _ = tiny_run
    new = tmp_path / "k8"
    stdout = _pipeline(new, "--reuse", str(run), "codes.k=8")
    for stage in ("data", "embed", "stage1"):
        assert f"stage {stage}: reused from {run}" in stdout
    assert "stage codes: running" in stdout and "stage stage2: running" in stdout
    m = _manifest(new)
    assert [s for s in STAGES if "reused_from" in m["stages"][s]] == ["data", "embed", "stage1"]
    assert (new / "stage1" / "din.safetensors").stat().st_ino == (run / "stage1" / "din.safetensors").stat().st_ino
    assert not (new / "stage1" / "checkpoint").exists()  # checkpoints belong to the run that trained
    # A rerun of the new directory skips everything in place.
    assert "plan: nothing to do" in _pipeline(new, "--reuse", str(run), "codes.k=8")


@pytest.mark.slow
@pytest.mark.e2e
def test_corrupt_outputs_are_never_trusted(tiny_run, tmp_path):
    """A truncated artifact is seen by its hash when its stage would be skipped: that stage and the
    ones after it rerun, and the run ends with the same metrics as before."""
    run = _copy(tiny_run[0], tmp_path / "run")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    codes = run / "codes" / "codes.parquet"
    codes.write_bytes(codes.read_bytes()[:100])
    (run / "eval" / "metrics.json").write_text('{"valid": {')
    stdout = _pipeline(run)
    assert "stage codes: running (output(s) changed since the stage wrote them (hash mismatch): codes/codes.parquet)" \
        in stdout
    assert "stage stage2: running (upstream stage codes reruns)" in stdout
    assert json.loads((run / "eval" / "metrics.json").read_text()) == metrics


@pytest.mark.slow
@pytest.mark.e2e
def test_diverged_training_stops_unfinished_and_a_fixed_rerun_finishes(tiny_run, tmp_path):
    run = _copy(tiny_run[0], tmp_path / "run")
    r = subprocess.run(_cmd(run, "stage2.lr=1e30"), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(r"error: stage2 diverged: the loss is not finite at epoch 0, step \d+ \(.*\)\. Fix: lower "
                     r"stage2.lr \(now 1e\+30\)", r.stderr), r.stderr[-2000:]
    assert r.stderr.count("\nerror: ") + r.stderr.startswith("error: ") == 1 and "Traceback" not in r.stderr
    m = _manifest(run)
    assert m["stages"]["stage2"]["status"] == "failed" and not (run / "stage2" / "model.safetensors").exists()
    stdout = _pipeline(run)  # the setting fixed (back to tiny.yaml's): Stage II runs again and the run ends
    assert "stage stage2: running (config changed (stage2.lr: 1e+30 -> 0.001))" in stdout
    assert json.loads((run / "eval" / "metrics.json").read_text()) == _manifest(tiny_run[0])["metrics"]


@pytest.mark.slow
@pytest.mark.e2e
def test_a_killed_stage2_resumes_from_its_checkpoint(tiny_run, tmp_path):
    run = _copy(tiny_run[0], tmp_path / "run")
    # More epochs than tiny.yaml, so that Stage II is still training when it is killed.
    args = ("stage2.max_epochs=5", "stage2.patience=5")
    ckpt = run / "stage2" / "checkpoint" / "state.pt"
    ckpt.unlink()  # the copied run's own; the changed key makes Stage II start over and write a new one
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(_cmd(run, *args), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not ckpt.exists():
            assert proc.poll() is None, "the pipeline ended before Stage II wrote a checkpoint:\n" + \
                (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no Stage II checkpoint within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no cleanup, no manifest update: a real crash
    finally:
        proc.wait(30)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert _manifest(run)["stages"]["stage2"]["status"] == "running"
    assert not (run / "stage2" / "model.safetensors").exists()

    stdout = _pipeline(run, *args)
    assert "stage stage2: running (interrupted last time; resuming with its folder kept)" in stdout
    resumed = re.search(r"resuming from the checkpoint of epoch (\d+)", stdout)
    assert resumed, stdout[-3000:]
    n = int(resumed.group(1))
    assert f"stage2: epoch={n + 1} " in stdout or n == 4
    assert "stage2: epoch=0 " not in stdout  # the finished epochs were not trained again
    history = json.loads((run / "stage2" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(5))  # the history spans the crash
    assert _manifest(run)["stages"]["stage2"]["status"] == "done"
    assert (run / "eval" / "metrics.json").is_file()


def test_until_stops_after_the_named_stage(tmp_path):
    from prorec.pipeline import main

    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--out", str(out), "--until", "data"]) == 0
    assert (out / "data" / "train.parquet").is_file()
    assert not any((out / folder).exists() for folder in ("embeddings", "stage1", "eval"))
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["data"]["status"] == "done"
    assert all(stages[s]["status"] == "pending" for s in STAGES[1:])


def test_the_final_table_sets_the_run_beside_the_papers_row_of_its_own_dataset():
    from prorec.config import load_config
    from prorec.pipeline import metrics_table

    m = {"test": {"recall@10": 0.05, "ndcg@10": 0.03, "recall@20": 0.08, "ndcg@20": 0.04}}
    sports = metrics_table(m, load_config(None, ["data.path=/data/amazon-sports"]))
    assert "paper (Sports)" in sports and "0.0471" in sports and "0.0939" not in sports
    assert "0.0939" in metrics_table(m, load_config(None, ["data.path=/data/amazon-beauty"]))
    assert "paper" not in metrics_table(m, load_config(None, [])).splitlines()[0]


@pytest.mark.ray
def test_the_local_ray_workers_import_the_drivers_checkout(tmp_path):
    """A driver run from another checkout than the installed prorec (as `python jobs/pipeline.py` from a
    second worktree under `pip install -e`): the local Ray instance's workers, where Stage I and II
    train, import the driver's prorec, not the installed one."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "prorec", checkout / "prorec", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import json, ray\n"
            "import prorec\n"
            "from prorec.pipeline import connect_ray\n"
            "connect_ray()\n"
            "where = ray.get(ray.remote(num_cpus=0)(lambda: __import__('prorec').__file__).remote())\n"
            "print(json.dumps([prorec.__file__, where]))\n"
            "ray.shutdown()\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=_env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    driver, worker = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(driver).resolve() == Path(worker).resolve() == (checkout / "prorec" / "__init__.py").resolve()
