"""Ray Tune sweeps (prorec/tune.py, jobs/tune.py): the sweep file, trial resources, and two real
sweeps on the tiny synthetic dataset through the entry point's `main`, on the shared Ray instance.

The first sweep is the 2 x 2 grid of jobs/configs/tune/tiny.yaml (K x decoder depth, one epoch);
the second starts from the first one's final pipeline run (`--run`) and sweeps Stage I's alpha,
which reruns Stage I for the new value only.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from prorec.config import ConfigError, load_config
from prorec.tune import (SCORE_KEY, TrialResources, apply_params, check_sweep_against_base, finite_combinations,
                         load_sweep, main, trial_resources)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
SPACES = REPO / "jobs" / "configs" / "tune"


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "results.csv").open() as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# Without Ray

def test_shipped_sweep_files_parse():
    default = load_sweep(SPACES / "default.yaml")
    assert default.keys == ["codes.k", "stage2.decoder_layers"] and default.n_trials() == 12
    assert load_sweep(SPACES / "beauty_cpu.yaml").n_trials() == 12
    assert {p.key for p in load_sweep(SPACES / "alpha.yaml").space} == {"stage1.alpha", "codes.k", "stage2.decoder_layers"}
    tiny = load_sweep(SPACES / "tiny.yaml")
    assert finite_combinations(tiny) == [{"codes.k": k, "stage2.decoder_layers": d} for k in (4, 8) for d in (1, 2)]


@pytest.mark.parametrize("body, message", [
    ("space: {codes.kk: [4]}", "no field 'kk'"),
    ("space: {data.max_history: [5]}", "section one of"),
    ("space: {codes.k: {uniform: [4, 8]}}", "must be a grid or a choice"),
    ("space: {stage2.num_workers: [0, 1]}", "where a stage runs"),
    ("space: {stage2.lr: {loguniform: [0.01, 0.001]}}", "low < high"),
    ("space: {stage2.lr: {normal: [0, 1]}}", "needs one of"),
    ("space: {codes.k: [4]}\n  resources: {cpus_per_trial: 0}", "cpus_per_trial > 0"),
    ("space: {codes.k: [4]}\n  typo: 1", "unknown key"),
])
def test_bad_sweep_files_are_refused(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_space(tmp_path, "tune:\n  " + body + "\n"))


def test_a_sweep_over_codes_k_is_refused_while_grow_k_is_on(tmp_path):
    sweep = load_sweep(_space(tmp_path, "tune:\n  space:\n    codes.k: {grid: [128, 256]}\n"))
    check_sweep_against_base(load_config(str(TINY), []), sweep)
    with pytest.raises(ConfigError, match="set codes.grow_k=false for a sweep over codes.k"):
        check_sweep_against_base(load_config(str(TINY), ["codes.grow_k=true"]), sweep)


def test_apply_params_coerces_and_validates():
    base = load_config(TINY)
    cfg = apply_params(base, {"codes.k": 8, "stage2.beta": 2, "stage1.alpha": 0.5})
    assert (cfg.codes.k, cfg.stage2.beta, cfg.stage1.alpha) == (8, 2.0, 0.5)
    assert isinstance(cfg.stage2.beta, float)
    assert base.codes.k == 16  # the base is left alone
    with pytest.raises(ConfigError, match="divisible"):
        apply_params(base, {"stage2.n_heads": 3})


@pytest.mark.parametrize("cluster, res, n, per, concurrent", [
    ({"CPU": 2}, TrialResources(1, 1), 4, {"cpu": 1}, 2),  # no GPU: CPU shares only
    ({"CPU": 2}, TrialResources(4, 1), 4, {"cpu": 2}, 1),  # never more than the machine has
    ({"CPU": 2}, TrialResources(0.5, 0), 3, {"cpu": 0.5}, 3),  # no more at once than there are trials
    ({"CPU": 16, "GPU": 1}, TrialResources(2, 1), 9, {"cpu": 2, "gpu": 1}, 1),
    ({"CPU": 16, "GPU": 1}, TrialResources(2, 0.25), 9, {"cpu": 2, "gpu": 0.25}, 4),
    ({"CPU": 2, "GPU": 4}, TrialResources(1, 1), 9, {"cpu": 1, "gpu": 1}, 2),  # CPUs bound it
])
def test_trial_resources_never_oversubscribe(cluster, res, n, per, concurrent):
    got, k = trial_resources(cluster, res, n)
    assert (got, k) == (per, concurrent)  # each expected row fits its cluster


# ----------------------------------------------------------------------------------------------
# Real sweeps on the shared Ray instance

@pytest.fixture(scope="module")
def grid_sweep(ray_session, tiny_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "grid"
    rc = main(["--config", str(TINY), "--data", str(tiny_raw), "--space", str(SPACES / "tiny.yaml"),
               "--out", str(out), "stage1.max_epochs=1", "stage1.valid_users=100", "stage2.max_epochs=1"])
    assert rc == 0
    return out


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_grid_sweep_picks_the_best_validation_trial(grid_sweep):
    rows = _rows(grid_sweep)
    assert sorted((int(r["codes.k"]), int(r["stage2.decoder_layers"])) for r in rows) == [(4, 1), (4, 2), (8, 1), (8, 2)]
    assert all(r["status"] == "ok" and r["epochs"] == "1" for r in rows)
    # The sweep never scores the test split: not in the table, not in anything a trial reported.
    assert not [c for c in rows[0] if "test" in c.lower()]
    results = list((grid_sweep / "trials").glob("trial_*/result.json"))
    assert len(results) == 4
    for path in results:
        for line in path.read_text().splitlines():
            assert not [k for k in json.loads(line) if "test" in k.lower()], path
    assert (grid_sweep / "results.md").read_text().count("\n| ") == 5  # header + 4 trials
    assert (grid_sweep / "valid_ndcg_vs_params.png").stat().st_size > 10_000
    # One run directory per K; the second reused the first one's data, embeddings and Stage I.
    assert sorted(p.name for p in (grid_sweep / "artifacts").iterdir()) == ["k4", "k8"]
    k8 = json.loads((grid_sweep / "artifacts" / "k8" / "manifest.json").read_text())["stages"]
    assert all(k8[s]["reused_from"] == str(grid_sweep / "artifacts" / "k4") for s in ("data", "embed", "stage1"))
    assert "reused_from" not in k8["codes"] and k8["codes"]["depends_on"]["codes.k"] == 8

    best = max(rows, key=lambda r: float(r[SCORE_KEY]))
    final = json.loads((grid_sweep / "final_test_metrics.json").read_text())
    assert final["trial_id"] == best["trial_id"]
    assert final["params"] == {"codes.k": int(best["codes.k"]), "stage2.decoder_layers": int(best["stage2.decoder_layers"])}
    assert set(final["test"]) >= {"recall@10", "ndcg@10"}


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_best_config_runs_in_the_pipeline(grid_sweep):
    from prorec.pipeline import run_pipeline

    best = max(_rows(grid_sweep), key=lambda r: float(r[SCORE_KEY]))
    cfg = load_config(grid_sweep / "best.yaml")
    assert (cfg.codes.k, cfg.stage2.decoder_layers) == (int(best["codes.k"]), int(best["stage2.decoder_layers"]))
    final = grid_sweep / "final"
    manifest = json.loads((final / "manifest.json").read_text())["stages"]
    # The final run reused the sweep's upstream stages and codes: only Stage II and the test ran.
    assert all(manifest[s]["reason"].startswith("reused from") for s in ("data", "embed", "stage1", "codes"))
    model = json.loads((final / "stage2" / "model_config.json").read_text())
    assert (model["k"], model["decoder_layers"]) == (cfg.codes.k, cfg.stage2.decoder_layers)
    # Stage II trained there as in the trial (same seed and data; the thread count may differ).
    retrained = json.loads((final / "stage2" / "metrics.json").read_text())["best"][SCORE_KEY]
    assert math.isclose(retrained, float(best[SCORE_KEY]), abs_tol=0.01)

    # best.yaml, loaded as a user would, is exactly the config the final run used: nothing reruns.
    metrics = run_pipeline(cfg, final)
    assert metrics == {k: v for k, v in json.loads((grid_sweep / "final_test_metrics.json").read_text()).items()
                       if k in ("valid", "test")}
    stages = json.loads((final / "manifest.json").read_text())["stages"]
    assert all(stages[s].get("skipped_last_run") for s in stages)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_alpha_sweep_from_a_finished_run_reruns_only_stage1(grid_sweep, tmp_path):
    run = grid_sweep / "final"  # a finished pipeline run (alpha = 1.0, tiny.yaml's default)
    space = _space(tmp_path, "tune:\n  space:\n    stage1.alpha: {grid: [0.5, 1.0]}\n    codes.k: [8]\n"
                             "    stage2.decoder_layers: [1]\n  resources: {cpus_per_trial: 1}\n")
    out = tmp_path / "alpha"
    assert main(["--run", str(run), "--space", str(space), "--out", str(out), "stage2.max_epochs=1"]) == 0

    # alpha = 1.0 reuses the run's own Stage I; alpha = 0.5 reran Stage I (and its codes) only.
    assert sorted(p.name for p in (out / "artifacts").iterdir()) == ["alpha0.5_k8", "alpha1.0_k8"]
    stages = json.loads((out / "artifacts" / "alpha0.5_k8" / "manifest.json").read_text())["stages"]
    assert stages["data"]["reused_from"] == stages["embed"]["reused_from"] == str(run)
    assert "reused_from" not in stages["stage1"] and stages["stage1"]["depends_on"]["stage1.alpha"] == 0.5
    same = json.loads((out / "artifacts" / "alpha1.0_k8" / "manifest.json").read_text())["stages"]
    assert same["stage1"]["reused_from"] == str(run)

    rows = _rows(out)
    assert sorted(float(r["stage1.alpha"]) for r in rows) == [0.5, 1.0] and all(r["status"] == "ok" for r in rows)
    best = max(rows, key=lambda r: float(r[SCORE_KEY]))
    assert load_config(out / "best.yaml").stage1.alpha == float(best["stage1.alpha"])
    assert "test" in json.loads((out / "final_test_metrics.json").read_text())
