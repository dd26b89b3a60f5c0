"""The shared epoch loop: early stopping, the epoch count, and resume from a checkpoint."""
from __future__ import annotations

import torch

from prorec.trainer import LocalContext, run_epochs


class ScriptedTrainer:
    """Validation scores from a script; the 'model' is one tensor that counts trained epochs."""

    def __init__(self, scores: list[float]):
        self.scores, self.w = scores, torch.zeros(1)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.w += 1
        return {"loss": 1.0 / (epoch + 1)}

    def validate(self) -> dict[str, float]:
        return {"score": self.scores[int(self.w.item()) - 1]}

    def state_dict(self):
        return {"w": self.w.clone()}

    def load_state_dict(self, state):
        self.w = state["w"].clone()

    def model_state(self):
        return {"w": self.w}


def test_patience_stops_and_counts_only_epochs_that_ran(tmp_path):
    fit = run_epochs(ScriptedTrainer([0.1, 0.3, 0.2, 0.25, 0.1, 0.9]), LocalContext(tmp_path, verbose=False),
                     max_epochs=6, patience=2, score_key="score")
    assert [h["epoch"] for h in fit.history] == [0, 1, 2, 3]  # epochs 2 and 3 did not beat 0.3
    assert fit.epochs_run == 4
    assert fit.best_metrics["epoch"] == 1 and fit.best_model_state["w"].item() == 2.0


def test_resume_continues_after_the_last_checkpointed_epoch(tmp_path):
    scores = [0.1, 0.2, 0.3, 0.4]
    first = run_epochs(ScriptedTrainer(scores), LocalContext(tmp_path, verbose=False), 4, 3, "score",
                       stop_after_epoch=1)
    assert first.epochs_run == 2
    resumed = run_epochs(ScriptedTrainer(scores), LocalContext(tmp_path, verbose=False), 4, 3, "score")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3] and resumed.epochs_run == 4
    assert resumed.best_model_state["w"].item() == 4.0  # the weights continued from the checkpoint
