"""Run a baseline in the pipeline's harness: the data stage, then the baseline, in one run directory.

    python jobs/baseline.py sasrec --config jobs/configs/baselines/tiny_sasrec.yaml --out runs/tiny_sasrec
    python jobs/baseline.py sasrec --config jobs/configs/beauty/sasrec.yaml \
        --data ../shared/data/amazon-beauty --out runs/beauty_sasrec --reuse runs/beauty

The baseline writes RUN/<name>/eval/metrics.json and RUN/<name>/eval/predictions.parquet (as the
pipeline's RUN/eval/) and is recorded in RUN/manifest.json; a rerun with the same config skips it,
and `--reuse` links in a finished run's data stage. The logic lives in `prorec.baselines` (also
`prorec baseline sasrec`).
"""
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the uploaded checkout is the current directory but not
# on sys.path (the script's own folder is); put the checkout first so its code is the code that runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prorec.baselines import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
