"""Fixed wording of the "Model and evaluation" tab, and the sentences built from the saved evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.format import num, pct
from covidxr.evaluation.results import CalibrationResult, EvaluationRecord, ExternalSet

EXPLANATIONS = """\
**How to read these numbers** (each is measured per class, "this class" against all others):

- **Sensitivity** (recall): of the test images that truly show this class, the share the model found.
- **Specificity**: of the test images that do not show this class, the share the model correctly did not call it.
- **PPV** (positive predictive value): when the model says this class, how often it is right.
  PPV and NPV depend on how common each class is in the test set, which is usually not the same as in your clinic.
- **NPV** (negative predictive value): when the model says *not* this class, how often that is right.
- **ROC-AUC**: the chance that an image with this class gets a higher score than one without it
  (0.5 = coin toss, 1.0 = perfect separation).
- **95% interval** (in brackets): the range the value plausibly lies in, given how few test patients there were
  (bootstrap over patients). Wide intervals mean the estimate is uncertain.
"""

NO_EXTERNAL = (
    "**No external validation.** This model has only been tested on held-out patients from the same hospitals and "
    "collections it learned from. How it does on films from anywhere else is unknown, and with these public "
    "collections it is usually much worse: each class comes from different sources, so a model can score well by "
    "recognising the source instead of the disease.")

PLOT_CAPTIONS = {"confusion_counts": "Confusion matrix (counts)", "roc": "ROC curves, one class against the rest",
                 "confusion_normalized": "Confusion matrix (share of each true class)",
                 "pr": "Precision-recall curves", "reliability": "Calibration (reliability diagram)",
                 "history": "Training curves",
                 "decision_curve": "Decision curve: the net benefit of acting on the model's COVID call at each "
                                   "threshold, against acting on every film or on none"}
"""Plots the tab shows, each with what it is; a saved plot without an entry here is not shown (no unexplained
labels)."""

CANNOT = ("It answers one question on one kind of image: COVID / normal / pneumonia on a frontal chest X-ray. It is "
          "not a diagnosis, it was never tested on patients as they arrive, and its results on other hospitals "
          "(above) are what to expect elsewhere, not the internal ones.")


CROSSVAL_MODES = {"probe": "a quick version: only the network's last layer retrained each time",
                  "full": "full training each time", "finetune": "full training each time"}


def crossval_how(crossval: Mapping[str, Any]) -> str:
    """How the held-out-source runs were trained, in words ("a quick version: ..., efficientnet_lite0")."""
    if crossval.get("method"):
        return str(crossval["method"])
    mode = crossval.get("mode")
    parts = [CROSSVAL_MODES.get(str(mode), str(mode)) if mode else "", str(crossval.get("arch") or "")]
    return ", ".join(p for p in parts if p)


def single_class_sources(test_set: EvaluationRecord | ExternalSet) -> list[str]:
    """The sources of a test set that give a single class (from its per-source breakdown's class counts)."""
    return [str(source) for source, group in (test_set.by_source or {}).items()
            if group.class_counts and sum(bool(n) for n in group.class_counts.values()) == 1]


def not_evaluated(predictor: Any) -> str:
    """How to evaluate the loaded model (named by its run folder, not by a server path)."""
    run = Path(predictor.checkpoint_path)
    return ("This model has not been evaluated yet, so there are no test-set numbers to show. From the "
            f"repository root run:\n\n```bash\npython -m covidxr.evaluate --checkpoint RUNS/{run.parent.name}/"
            f"{run.name}\n```\n\nthen reload this page.")


def temperature_text(temperature: float, data: EvaluationRecord, external: list[ExternalSet]) -> str:
    """What the calibration temperature is, what it was fitted on, and what it did (internal and external)."""
    calibration = data.calibration or CalibrationResult()
    how = str(calibration.how or "")
    if abs(temperature - 1.0) < 1e-9 and not how:
        return ("**Probability calibration:** none (temperature 1.00). The probabilities are the network's raw "
                "softmax output, which is often over-confident.")
    text = f"**Probability calibration:** the model's scores are rescaled with temperature {num(temperature)}"
    text += f", {how}." if how else "."
    if "validation" in how.lower():
        text += (" That split holds patients of the same hospitals and collections as training, so the "
                 "temperature makes probabilities honest there; on films from elsewhere they may still be too sure "
                 "or not sure enough.")
    if calibration.ece_before is not None and calibration.ece_after is not None:
        text += (f" On the internal test the average gap between stated probability and how often the model was "
                 f"right (expected calibration error) went from {pct(calibration.ece_before)} to "
                 f"{pct(calibration.ece_after)}.")
    measured = [(e.name, e.calibration.ece_after if e.calibration else None) for e in external]
    measured = [(name, ece) for name, ece in measured if isinstance(ece, (int, float))]
    if measured:
        text += " On external films it was " + ", ".join(f"{pct(ece)}" for _, ece in measured) + "."
    elif not external:
        text += " It has not been measured on external films."
    return text


def judge(estimate: Any, chance: float, lo: Any = None, hi: Any = None, good: float | None = None) -> str:
    """A result in words against its chance level: "below chance", "at chance", "better than chance" or "good".

    Args:
        estimate: the value (balanced accuracy, AUC).
        chance: its chance level (one over the classes present; 0.5 for an AUC).
        lo, hi: its 95% interval, when known: chance inside it reads "at chance".
        good: the value from which a result above chance reads "good" (None: never).
    """
    if not isinstance(estimate, (int, float)):
        return "not measured"
    bounds = isinstance(lo, (int, float)) and isinstance(hi, (int, float))
    if (bounds and hi < chance) or (not bounds and estimate < chance - 0.02):
        return "below chance"
    if (bounds and lo <= chance) or (not bounds and estimate <= chance + 0.02):
        return "at chance"
    return "good" if good is not None and estimate >= good else "better than chance"
