"""Tests of covidxr.metrics: hand-computed values, degenerate classes, calibration and patient-level bootstrap."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from covidxr.evaluation import arrays, bootstrap, calibration
from covidxr.evaluation import metrics as m
from covidxr.evaluation import operating_points as op
from covidxr.utils import softmax

CLASSES = ["A", "B", "C"]

# Hand example, 9 images, 3 classes. Predicted class = argmax of each row.
#   idx true probs            pred
#   0   A    .8 .1 .1         A
#   1   A    .6 .3 .1         A
#   2   A    .3 .6 .1         B
#   3   B    .2 .7 .1         B
#   4   B    .1 .8 .1         B
#   5   B    .5 .4 .1         A
#   6   C    .1 .1 .8         C
#   7   C    .2 .5 .3         B
#   8   C    .1 .2 .7         C
# Confusion matrix (rows true, cols predicted): [[2,1,0],[1,2,0],[0,1,2]]; accuracy 6/9.
#   A: TP 2 FN 1 FP 1 TN 5 -> sens 2/3, spec 5/6, PPV 2/3, NPV 5/6, F1 4/6
#   B: TP 2 FN 1 FP 2 TN 4 -> sens 2/3, spec 4/6, PPV 2/4, NPV 4/5, F1 4/7
#   C: TP 2 FN 1 FP 0 TN 6 -> sens 2/3, spec 6/6, PPV 2/2, NPV 6/7, F1 4/5
# One-vs-rest AUC (pairs positive > negative, ties 1/2, out of 3*6 = 18):
#   A: positives .8 .6 .3 vs negatives .2 .1 .5 .1 .2 .1 -> 6 + 6 + 5 = 17 -> 17/18
#   B: positives .7 .8 .4 vs negatives .3 .6 .1 .1 .5 .2 -> 6 + 6 + 4 = 16 -> 16/18
#   C: positives .8 .3 .7 vs negatives all .1            -> 18/18
Y_HAND = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
P_HAND = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.6, 0.3, 0.1],
        [0.3, 0.6, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.5, 0.4, 0.1],
        [0.1, 0.1, 0.8],
        [0.2, 0.5, 0.3],
        [0.1, 0.2, 0.7],
    ]
)


def _synthetic(n: int = 400, n_classes: int = 3, per_patient: int = 2, seed: int = 0, signal: float = 1.5):
    """Random labels, informative logits and patient ids (per_patient images each)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    z = rng.normal(size=(n, n_classes))
    z[np.arange(n), y] += signal
    groups = np.array([f"p{i // per_patient:04d}" for i in range(n)])
    return y, softmax(z), groups, z


# --------------------------------------------------------------------------------------------------------------------
# classification_metrics
# --------------------------------------------------------------------------------------------------------------------


def test_hand_example_exact_values():
    r = m.classification_metrics(Y_HAND, P_HAND, CLASSES)
    assert r["n"] == 9
    assert r["confusion_matrix"] == [[2, 1, 0], [1, 2, 0], [0, 1, 2]]
    assert r["accuracy"] == 6 / 9
    assert r["balanced_accuracy"] == pytest.approx(2 / 3, abs=1e-15)
    pc = r["per_class"]
    keys = ("recall", "specificity", "precision", "npv")
    assert [pc["A"][k] for k in keys] == [2 / 3, 5 / 6, 2 / 3, 5 / 6]
    assert [pc["B"][k] for k in keys] == [2 / 3, 4 / 6, 2 / 4, 4 / 5]
    assert [pc["C"][k] for k in keys] == [2 / 3, 1.0, 1.0, 6 / 7]
    assert [pc[c]["support"] for c in CLASSES] == [3, 3, 3]
    assert [pc[c]["n_predicted"] for c in CLASSES] == [3, 4, 2]
    assert pc["A"]["f1"] == pytest.approx(4 / 6, abs=1e-15)
    assert pc["B"]["f1"] == pytest.approx(4 / 7, abs=1e-15)
    assert pc["C"]["f1"] == pytest.approx(4 / 5, abs=1e-15)
    assert r["f1_macro"] == pytest.approx((4 / 6 + 4 / 7 + 4 / 5) / 3, abs=1e-15)
    assert pc["A"]["roc_auc"] == pytest.approx(17 / 18, abs=1e-15)
    assert pc["B"]["roc_auc"] == pytest.approx(16 / 18, abs=1e-15)
    assert pc["C"]["roc_auc"] == 1.0
    assert r["roc_auc_macro"] == pytest.approx(17 / 18, abs=1e-15)
    assert r["macro_excluded_classes"] == []
    # Brier: mean over samples of sum_k (p_k - onehot_k)^2, computed directly
    brier = np.mean(np.sum((P_HAND - np.eye(3)[Y_HAND]) ** 2, axis=1))
    assert r["brier"] == pytest.approx(brier, abs=1e-12)
    json.dumps(r, allow_nan=False)


def test_agrees_with_sklearn_on_random_data():
    y, p, _, _ = _synthetic()
    r = m.classification_metrics(y, p, CLASSES)
    pred = p.argmax(1)
    assert r["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert r["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred), abs=1e-12)
    assert r["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred), abs=1e-12)
    assert r["log_loss"] == pytest.approx(skm.log_loss(y, p), abs=1e-12)


def test_class_never_predicted():
    # class C is present (2 samples) but never the argmax
    y = np.array([0, 1, 2, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.2, 0.5, 0.3]])
    r = m.classification_metrics(y, p, CLASSES)
    c = r["per_class"]["C"]
    assert c["precision"] is None  # undefined: nothing predicted as C
    assert c["recall"] == 0.0
    assert c["f1"] == 0.0
    assert c["specificity"] == 1.0
    assert c["npv"] == 2 / 4
    assert c["n_predicted"] == 0
    assert c["roc_auc"] is not None
    json.dumps(r, allow_nan=False)


def test_class_absent_from_y_true():
    # class C never occurs in y_true but is predicted once
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.3, 0.2, 0.5], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    r = m.classification_metrics(y, p, CLASSES)
    c = r["per_class"]["C"]
    assert c["roc_auc"] is None and c["average_precision"] is None
    assert c["recall"] is None
    assert c["support"] == 0
    assert c["precision"] == 0.0  # predicted once, wrongly
    assert r["macro_excluded_classes"] == ["C"]
    auc_a = skm.roc_auc_score(y == 0, p[:, 0])
    auc_b = skm.roc_auc_score(y == 1, p[:, 1])
    assert r["roc_auc_macro"] == pytest.approx((auc_a + auc_b) / 2)
    json.dumps(r, allow_nan=False)


def test_single_class_everywhere_gives_none_not_nan():
    y = np.array([1, 1, 1])
    p = np.array([[0.1, 0.8, 0.1]] * 3)
    r = m.classification_metrics(y, p, CLASSES)
    assert r["roc_auc_macro"] is None
    assert r["macro_excluded_classes"] == CLASSES
    assert r["per_class"]["B"]["specificity"] is None
    json.dumps(r, allow_nan=False)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        m.classification_metrics(np.array([0, 3]), np.full((2, 3), 1 / 3), CLASSES)
    with pytest.raises(ValueError):
        m.classification_metrics(np.array([0, 1]), np.full((2, 2), 0.5), CLASSES)


# --------------------------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------------------------


def test_ece_hand_example():
    # confidences .9 .9 .65 .65 (top class 0 everywhere); correct: no/yes... see below
    #   bin of .9 : y = 0, 1 -> accuracy .5, confidence .9 , gap .4
    #   bin of .65: y = 0, 0 -> accuracy 1., confidence .65, gap .35
    # ECE = 2/4 * .4 + 2/4 * .35 = .375
    y = np.array([0, 1, 0, 0])
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.65, 0.35], [0.65, 0.35]])
    assert calibration.expected_calibration_error(y, p) == pytest.approx(0.375, abs=1e-12)
    bins = calibration.reliability_bins(y, p)
    assert len(bins) == 15
    assert sum(b["count"] for b in bins) == 4
    used = [b for b in bins if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in used] == [(2, 1.0), (2, 0.5)]
    assert used[0]["lo"] < 0.65 <= used[0]["hi"] and used[1]["lo"] < 0.9 <= used[1]["hi"]
    assert all(b["confidence"] is None for b in bins if not b["count"])


def test_ece_perfect_confidence_and_single_bin():
    y = np.array([0, 1])
    p = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration.expected_calibration_error(y, p) == 0.0
    assert calibration.reliability_bins(y, p)[-1]["count"] == 2
    # one bin: ECE = |mean accuracy - mean confidence|
    y2 = np.array([0, 1, 1])
    p2 = np.array([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    assert calibration.expected_calibration_error(y2, p2, n_bins=1) == pytest.approx(abs(2 / 3 - 0.7), abs=1e-12)


def test_softmax():
    z = np.array([[1000.0, 0.0], [0.0, 0.0]])
    s = softmax(z)
    assert np.allclose(s.sum(1), 1.0) and np.isfinite(s).all()
    assert np.allclose(s[1], [0.5, 0.5])
    assert np.allclose(softmax(np.array([[2.0, 0.0]]), temperature=2.0), softmax(np.array([[1.0, 0.0]])))
    with pytest.raises(ValueError):
        softmax(z, temperature=0.0)


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(5000, 4))
    true_p = softmax(z, temperature=2.0)
    y = (rng.random(5000)[:, None] > np.cumsum(true_p, axis=1)).sum(axis=1)
    t = calibration.fit_temperature(z, y)
    assert t == pytest.approx(2.0, rel=0.10)
    # calibrated probabilities have lower NLL than the raw ones
    assert skm.log_loss(y, softmax(z, t), labels=range(4)) < skm.log_loss(y, softmax(z), labels=range(4))


# --------------------------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------------------------


def test_resample_indices_moves_whole_patients():
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4])  # patient sizes 3, 1, 2, 4, 1
    sizes = np.bincount(groups)
    rng = np.random.default_rng(123)
    for _ in range(50):
        idx = bootstrap._resample_indices(groups, rng)
        per_row = np.bincount(idx, minlength=groups.size)
        draws_per_patient = []
        for g in range(sizes.size):
            rows = per_row[groups == g]
            assert np.all(rows == rows[0]), "all images of a patient must be drawn equally often"
            draws_per_patient.append(rows[0])
        assert sum(draws_per_patient) == sizes.size  # G patients drawn with replacement
        assert idx.size == int(np.dot(draws_per_patient, sizes))
        # in draw order, each drawn patient's rows are contiguous
        run_groups = [groups[idx[0]]]
        for a, b in zip(idx[:-1], idx[1:], strict=True):
            if groups[b] != groups[a] or b <= a:
                run_groups.append(groups[b])
        assert len(run_groups) == sizes.size


def test_patient_bootstrap_wider_than_image_bootstrap():
    # 20 patients x 10 images; a patient's images are all right or all wrong (strong clustering)
    n_pat, per = 20, 10
    y = np.zeros(n_pat * per, dtype=int)
    right = np.repeat(np.arange(n_pat) % 2 == 0, per)
    p = np.where(right[:, None], [0.8, 0.2], [0.2, 0.8])
    y[::7] = 1  # a few positives so every metric stays defined-ish
    p[::7] = np.where(right[::7, None], [0.2, 0.8], [0.8, 0.2])
    patients = np.repeat(np.arange(n_pat), per).astype(str)
    images = np.arange(y.size).astype(str)
    ci_pat = bootstrap.bootstrap_ci(y, p, patients, ["neg", "pos"], n_resamples=400, seed=1)["metrics"]["accuracy"]
    ci_img = bootstrap.bootstrap_ci(y, p, images, ["neg", "pos"], n_resamples=400, seed=1)["metrics"]["accuracy"]
    assert ci_pat["estimate"] == ci_img["estimate"] == 0.5
    assert (ci_pat["hi"] - ci_pat["lo"]) > 2 * (ci_img["hi"] - ci_img["lo"])


def test_bootstrap_estimates_match_point_metrics_and_are_reproducible():
    y, p, g, _ = _synthetic(n=300)
    r = bootstrap.bootstrap_ci(y, p, g, CLASSES, n_resamples=200, seed=7)
    point = m.classification_metrics(y, p, CLASSES)
    for name in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro"):
        ci = r["metrics"][name]
        assert ci["estimate"] == pytest.approx(point[name], abs=1e-12)
        assert ci["lo"] <= ci["estimate"] <= ci["hi"]
        assert ci["n_valid"] + ci["n_skipped"] == 200
    for c in CLASSES:
        assert r["per_class"][c]["sensitivity"]["estimate"] == pytest.approx(point["per_class"][c]["recall"])
        assert r["per_class"][c]["specificity"]["estimate"] == pytest.approx(point["per_class"][c]["specificity"])
    assert (r["n_resamples"], r["seed"], r["n_groups"], r["n"]) == (200, 7, 150, 300)
    assert r == bootstrap.bootstrap_ci(y, p, g, CLASSES, n_resamples=200, seed=7)
    assert r != bootstrap.bootstrap_ci(y, p, g, CLASSES, n_resamples=200, seed=8)
    json.dumps(r, allow_nan=False)


def test_bootstrap_cm_formulas_match_sklearn_on_resamples():
    y, p, g, _ = _synthetic(n=120, seed=3)
    rng = np.random.default_rng(0)
    codes = np.unique(g, return_inverse=True)[1]
    for _ in range(5):
        idx = bootstrap._resample_indices(codes, rng)
        yi, predi = y[idx], p[idx].argmax(1)
        cm = skm.confusion_matrix(yi, predi, labels=[0, 1, 2])[None]
        h = bootstrap._cm_headline(cm)
        assert h["accuracy"][0] == pytest.approx(skm.accuracy_score(yi, predi))
        assert h["balanced_accuracy"][0] == pytest.approx(skm.balanced_accuracy_score(yi, predi))
        f1 = skm.f1_score(yi, predi, labels=[0, 1, 2], average="macro", zero_division=np.nan)
        assert h["f1_macro"][0] == pytest.approx(f1)
        assert arrays.binary_auc(yi == 1, p[idx][:, 1]) == pytest.approx(skm.roc_auc_score(yi == 1, p[idx][:, 1]))


def test_bootstrap_skips_undefined_resamples():
    # class C lives in a single patient: many resamples miss it
    y = np.array([0, 0, 1, 1, 0, 1, 2, 2, 0, 1])
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(size=(10, 3)) + 2 * np.eye(3)[y])
    g = np.array(["a", "a", "b", "b", "c", "d", "e", "e", "f", "g"])
    r = bootstrap.bootstrap_ci(y, p, g, CLASSES, n_resamples=300, seed=0)
    sens_c = r["per_class"]["C"]["sensitivity"]
    assert sens_c["n_skipped"] > 0 and sens_c["n_valid"] + sens_c["n_skipped"] == 300
    assert r["metrics"]["roc_auc_macro"]["n_skipped"] >= sens_c["n_skipped"]
    assert r["metrics"]["accuracy"]["n_skipped"] == 0
    json.dumps(r, allow_nan=False)


def test_bootstrap_work_per_resample_stays_small():
    """Counted, not timed: one resample costs a few hundred Python calls (one scikit-learn AUC alone costs ~14000)."""
    y, p, g, _ = _synthetic(n=400)
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        bootstrap.bootstrap_ci(y, p, g, CLASSES, n_resamples=200, seed=0)
    finally:
        sys.setprofile(None)
    assert calls < 200 * 1000


def test_groups_must_not_be_missing():
    y, p, g, _ = _synthetic(n=10)
    g = g.astype(object)
    g[3] = None
    with pytest.raises(ValueError):
        bootstrap.bootstrap_ci(y, p, g, CLASSES, n_resamples=10)


# --------------------------------------------------------------------------------------------------------------------
# paired bootstrap
# --------------------------------------------------------------------------------------------------------------------


def test_paired_bootstrap_identical_models():
    y, p, g, _ = _synthetic(n=200)
    r = bootstrap.paired_bootstrap_auc(y, p, p.copy(), g, n_resamples=200, seed=0)
    assert r["diff"] == 0.0 and r["lo"] == 0.0 and r["hi"] == 0.0
    assert r["significant"] is False
    assert r["p_value"] == 1.0
    json.dumps(r, allow_nan=False)


def test_paired_bootstrap_clearly_better_model():
    y, p_good, g, z = _synthetic(n=300, signal=2.5)
    rng = np.random.default_rng(5)
    p_bad = softmax(rng.normal(size=z.shape))
    r = bootstrap.paired_bootstrap_auc(y, p_good, p_bad, g, n_resamples=200, seed=0)
    assert r["auc_a"] > r["auc_b"]
    assert r["diff"] == pytest.approx(r["auc_a"] - r["auc_b"])
    assert 0 < r["lo"] <= r["diff"] <= r["hi"]
    assert r["significant"] is True and r["p_value"] < 0.01
    r_swapped = bootstrap.paired_bootstrap_auc(y, p_bad, p_good, g, n_resamples=200, seed=0)
    assert r_swapped["hi"] < 0 and r_swapped["significant"] is True


# --------------------------------------------------------------------------------------------------------------------
# operating points
# --------------------------------------------------------------------------------------------------------------------


def test_operating_points_hand_example():
    # validation: 10 positives scored .95 .90 ... .50, 10 negatives
    pos_val = np.round(np.arange(0.95, 0.49, -0.05), 2)
    neg_val = np.array([0.6, 0.52, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1])
    y_val = np.r_[np.ones(10), np.zeros(10)]
    s_val = np.r_[pos_val, neg_val]
    # test: positives .9 .56 .54 .3, negatives .7 .5 .1 .2
    y_test = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s_test = np.array([0.9, 0.56, 0.54, 0.3, 0.7, 0.5, 0.1, 0.2])
    op90, op95 = op.operating_points(y_val, s_val, y_test, s_test, sensitivities=(0.90, 0.95))
    # target .90: need >= 9 of 10 positives -> 9th highest positive score .55; negatives >= .55: {.6} -> spec 9/10
    assert op90["threshold"] == 0.55
    assert (op90["val_sensitivity"], op90["val_specificity"]) == (0.9, 0.9)
    # on test at .55: positives .9 .56 -> 2/4; negatives .7 -> spec 3/4
    assert (op90["test_sensitivity"], op90["test_specificity"]) == (0.5, 0.75)
    assert op90["test_counts"] == {"tp": 2, "fn": 2, "tn": 3, "fp": 1}
    # target .95: need all 10 -> threshold .50; negatives .6 .52 -> spec 8/10; test: tp 3 (.9 .56 .54), fp .7 .5
    assert op95["threshold"] == 0.5
    assert (op95["val_sensitivity"], op95["val_specificity"]) == (1.0, 0.8)
    assert (op95["test_sensitivity"], op95["test_specificity"]) == (0.75, 0.5)
    assert op90["reason"] is None and op95["reason"] is None
    # the chosen threshold is the highest one meeting the target
    above = np.nextafter(op90["threshold"], 1.0)
    assert np.mean(s_val[y_val == 1] >= above) < 0.9
    json.dumps([op90, op95], allow_nan=False)


def test_operating_points_without_positives():
    ops = op.operating_points(np.zeros(5), np.linspace(0, 1, 5), np.array([1, 0]), np.array([0.9, 0.1]))
    assert len(ops) == 2
    assert all(o["threshold"] is None and o["test_sensitivity"] is None for o in ops)
    assert all("no positives" in o["reason"] for o in ops)
    ops = op.operating_points(np.array([1, 0]), np.array([0.9, 0.1]), np.zeros(3), np.array([0.2, 0.95, 0.1]))
    assert ops[0]["threshold"] == 0.9 and ops[0]["test_sensitivity"] is None
    assert ops[0]["test_specificity"] == 2 / 3
    assert "no positives in the test set" in ops[0]["reason"]


# --------------------------------------------------------------------------------------------------------------------
# group metrics
# --------------------------------------------------------------------------------------------------------------------


def test_group_metrics():
    y, p, _, _ = _synthetic(n=60)
    source = np.array(["siteA"] * 50 + ["siteB"] * 8 + [None] * 2, dtype=object)
    r = m.group_metrics(y, p, CLASSES, source, min_n=30)
    assert list(r) == ["(missing)", "siteA", "siteB"]
    assert [r[k]["n"] for k in r] == [2, 50, 8]
    assert r["siteA"]["small"] is False and r["siteB"]["small"] is True
    whole_a = m.classification_metrics(y[:50], p[:50], CLASSES)
    assert r["siteA"]["accuracy"] == whole_a["accuracy"]
    assert r["siteA"]["per_class"]["B"]["sensitivity"] == whole_a["per_class"]["B"]["recall"]
    assert sum(r["siteB"]["class_counts"].values()) == 8
    json.dumps(r, allow_nan=False)
    assert math.isfinite(r["siteA"]["roc_auc_macro"])


def test_average_ranks_are_scipys_rankdata() -> None:
    from scipy.stats import rankdata

    from covidxr.evaluation.arrays import average_ranks

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 229):
        for ties in (True, False):
            x = rng.integers(0, 4, size=n).astype(float) if ties else rng.random(n)
            assert np.array_equal(average_ranks(x), rankdata(x))
    assert np.isnan(average_ranks(np.array([0.2, np.nan]))).all()
