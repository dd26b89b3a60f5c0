"""Sweep Stage II settings (K, decoder depth, beta, lr, ...) with Ray Tune on a finished pipeline run.

    python jobs/tune.py --run runs/beauty --space jobs/configs/tune/default.yaml --out sweeps/beauty
    python jobs/tune.py --config jobs/configs/tiny.yaml --space jobs/configs/tune/tiny.yaml --out sweeps/tiny
    python jobs/tune.py --data ../shared/data/amazon-beauty --config jobs/configs/beauty/prorec.yaml \
        --space jobs/configs/tune/alpha.yaml --out sweeps/beauty_alpha

Without --run, the upstream stages (data, embed, Stage I) run first, into SWEEP/upstream/. The
sweep directory ends with results.csv / results.md, valid_ndcg_vs_params.png, best.yaml (a full
config for jobs/pipeline.py --config) and final_test_metrics.json (the best config's pipeline run
in SWEEP/final/). The logic lives in `prorec.tune`.
"""
import sys
from pathlib import Path

# As in jobs/pipeline.py: under `ray job submit --working-dir .` put the checkout first on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prorec.tune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
