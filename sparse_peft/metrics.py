"""GLUE metrics with scikit-learn / scipy (the hub's `evaluate` scripts are not reachable offline)."""
from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS_BY_TASK = {
    "cola": ("matthews_correlation",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
}


def glue_metrics(task_name: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """`predictions`: class ids, or scores for STS-B. Names follow the hub's glue metric."""
    out = {}
    for name in METRICS_BY_TASK.get(task_name, ("accuracy",)):
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = float(pearsonr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
        elif name == "spearmanr":
            out[name] = float(spearmanr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
    return out
