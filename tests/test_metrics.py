import numpy as np
import pytest

from sparse_peft.tasks.glue import glue_metrics


def test_accuracy_and_f1_by_hand():
    preds, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    m = glue_metrics("mrpc", preds, labels)
    # tp=2 fp=1 fn=1 -> precision 2/3, recall 2/3, f1 2/3; 3 of 5 right
    # majority_share: class 1 is 3 of the 5 predictions
    assert m == pytest.approx({"f1": 2 / 3, "accuracy": 0.6, "majority_share": 0.6})
    assert glue_metrics("rte", preds, labels) == pytest.approx({"accuracy": 0.6, "majority_share": 0.6})
    assert glue_metrics("rte", np.ones(5, dtype=int), labels)["majority_share"] == 1.0


def test_mcc_by_hand():
    preds, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    # tp=2 tn=1 fp=1 fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert glue_metrics("cola", preds, labels)["matthews_correlation"] == pytest.approx(1 / 6)


def test_pearson_spearman_by_hand():
    preds, labels = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    m = glue_metrics("stsb", preds, labels)
    assert m["pearson"] == pytest.approx(0.8)  # cov 1.0 / var 1.25
    assert m["spearmanr"] == pytest.approx(0.8)  # ranks equal values here


def test_constant_regression_prediction_is_zero_not_nan():
    m = glue_metrics("stsb", np.ones(4), np.array([1.0, 3.0, 2.0, 4.0]))
    assert m == {"pearson": 0.0, "spearmanr": 0.0}
