"""Run the whole PRORec pipeline as one job: data, embed, stage1, codes, stage2, eval.

    python jobs/pipeline.py --config jobs/configs/default.yaml                 # synthetic, laptop
    python jobs/pipeline.py --config jobs/configs/beauty/prorec.yaml \
        --data ../shared/data/amazon-beauty --out runs/beauty                   # Amazon Beauty
    ray job submit --working-dir . -- python jobs/pipeline.py --config ...     # on a Ray cluster

A rerun skips the stages whose config and inputs did not change; `--from-stage NAME` forces a
rerun from NAME on. The logic lives in `prorec.pipeline` (also `prorec run`).
"""
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the uploaded checkout is the current directory but not
# on sys.path (the script's own folder is); put the checkout first so its code is the code that runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prorec.pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
