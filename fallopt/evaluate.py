"""Classification metrics from predicted probabilities, for any model that yields them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from fallopt.data import UNIT, InputRule, Split
from fallopt.timing import timed

if TYPE_CHECKING:
    import tf_keras

_EPS = 1e-7  # Keras clips probabilities the same way in its cross-entropy


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one model on one split. `confusion[i][j]`: true class i predicted as j."""

    loss: float
    accuracy: float
    confusion: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    predictions: np.ndarray

    def metrics(
        self, class_names: Sequence[str], prefix: str = "test", positive: int | None = None
    ) -> dict[str, float]:
        """Flat metric names for MLflow, and the event metrics when there is a `positive` class.

        `{prefix}_<class>_recall` (`test_fall_recall` on the fall data sets) is the share of
        the positive class's images found; `{prefix}_false_alarm_rate` the share of all other
        images predicted as it.
        """
        out = {f"{prefix}_accuracy": self.accuracy, f"{prefix}_loss": self.loss}
        for i, name in enumerate(class_names):
            out[f"{prefix}_precision_{name}"] = float(self.precision[i])
            out[f"{prefix}_recall_{name}"] = float(self.recall[i])
            out[f"{prefix}_f1_{name}"] = float(self.f1[i])
        if positive is not None:
            others = np.delete(self.confusion, positive, axis=0)
            alarms, negatives = others[:, positive].sum(), others.sum()
            out[f"{prefix}_{class_names[positive]}_recall"] = float(self.recall[positive])
            out[f"{prefix}_false_alarm_rate"] = float(alarms / negatives) if negatives else 0.0
        return out


def evaluate_probabilities(y_true: np.ndarray, probs: np.ndarray) -> Evaluation:
    """Metrics from class probabilities (n, classes) and true class indices (n,)."""
    num_classes = probs.shape[1]
    labels = np.arange(num_classes)
    predictions = probs.argmax(axis=1)
    p_true = np.clip(probs[np.arange(len(y_true)), y_true], _EPS, 1.0 - _EPS)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, predictions, labels=labels, zero_division=0
    )
    return Evaluation(
        loss=float(-np.mean(np.log(p_true))),
        accuracy=float(np.mean(predictions == y_true)),
        confusion=confusion_matrix(y_true, predictions, labels=labels),
        precision=precision,
        recall=recall,
        f1=f1,
        predictions=predictions,
    )


@timed("inference")
def evaluate_keras(
    model: tf_keras.Model, split: Split, rule: InputRule = UNIT, batch_size: int = 256
) -> Evaluation:
    """Predict a whole split with a Keras model (pixels scaled by `rule`) and score it."""
    from fallopt.train import batches

    probs = model.predict(batches(split, batch_size, rule=rule), verbose=0)
    return evaluate_probabilities(split.y, probs)
