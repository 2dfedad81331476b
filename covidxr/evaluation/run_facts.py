"""The facts of one evaluated run that a reporting checklist asks for, read from the metrics.json content (which
carries the checkpoint's record and configuration, the data's counts and every result); each is a short text, or
None when the run does not know it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from covidxr.html_page import format_value

Facts = dict[str, str | None]


def _join(items: Any) -> str:
    return ", ".join(str(i) for i in items)


def _counts(split_counts: Mapping[str, Mapping[str, int]]) -> str | None:
    if not split_counts:
        return None
    return "; ".join(f"{s}: {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})"
                     for s, c in split_counts.items())


def _training(cfg: Mapping[str, Any], model: Mapping[str, Any]) -> str | None:
    if not cfg:
        return None
    mode = "linear probe (head only)" if cfg.get("linear_probe") else f"fine-tuning ({cfg.get('freeze_epochs')} " \
        "epoch(s) with the backbone frozen first)"
    return (f"{mode}; {model.get('epochs_trained')} of {cfg.get('epochs')} epochs run; batch {cfg.get('batch_size')}; "
            f"AdamW lr {cfg.get('lr')} (backbone x{cfg.get('backbone_lr_scale')}), weight decay "
            f"{cfg.get('weight_decay')}, warm-up {cfg.get('warmup_epochs')} epoch(s); early stopping patience "
            f"{cfg.get('patience')}; augmentation {cfg.get('augment')}; label smoothing {cfg.get('label_smoothing')}; "
            f"seed {cfg.get('seed')}; one model trained")


def _external(result: Mapping[str, Any]) -> str | None:
    externals = result.get("external") or []
    if not externals:
        return f"the evaluated dataset {result['data']} is external to the run" if result.get("data_is_external") \
            else None
    return "; ".join(f"{e['name']}: {e['n_images']} images, {e['n_patients']} patients, balanced accuracy "
                     f"{format_value((e.get('ci') or {}).get('metrics', {}).get('balanced_accuracy') or e['metrics']['balanced_accuracy'])}"  # noqa: E501
                     for e in externals)


def _thresholds(ops: Mapping[str, Any] | None, covid: Mapping[str, Any] | None = None) -> str | None:
    parts = []
    if covid and covid.get("threshold") is not None:
        parts.append(f"COVID or not: {covid['positive']} when its probability >= {covid['threshold']:.3f} "
                     f"({covid['chosen_on']})")
    if ops:
        points = ", ".join(f"sensitivity {p.get('target_sensitivity')}: {format_value(p.get('threshold'))}"
                           for p in ops.get("points") or [])
        parts.append(f"positive class {ops['positive']}; thresholds chosen on {ops['chosen_on']} ({points})")
    return "; ".join(parts) or None


def _demographics(extras: Mapping[str, Any]) -> str | None:
    parts = []
    for name, groups in (extras.get("subgroups") or {}).items():
        for column in ("sex", "age_band"):
            if column in groups:
                parts.append(f"{name} {column}: " + ", ".join(f"{v} {g['n']}" for v, g in groups[column].items()))
    return "; ".join(parts) or None


def _gallery(extras: Mapping[str, Any]) -> str | None:
    sets = extras.get("gallery") or []
    if not sets:
        return None
    return "; ".join(f"{g['name']}: {g['n_errors']} of {g['n_images']} images wrong, {len(g['items'])} most "
                     "confident shown with Grad-CAM" for g in sets)


def _utility(extras: Mapping[str, Any]) -> str | None:
    curves = [c for c in extras.get("decision_curves") or [] if c.get("curve")]
    if not curves:
        return None
    return "; ".join(f"{c['name']} (prevalence {c['prevalence']:.2f}, {c['prevalence_from']})" for c in curves)


def _explain(result: Mapping[str, Any], extras: Mapping[str, Any]) -> str | None:
    lung = result.get("lung_share") or {}
    parts = []
    if lung.get("mean") is not None:
        parts.append(f"mean share of the Grad-CAM mass inside the lungs {lung['mean']:.3f} over {lung['n']} images")
    if result.get("explain"):
        parts.append(f"{len(result['explain'])} CAM method(s) scored (explain_summary.csv: faithfulness, lung share)")
    if any(g.get("items") for g in extras.get("gallery") or []):
        parts.append("Grad-CAM of the predicted class on each image of the failure gallery")
    return "Grad-CAM; " + "; ".join(parts) if parts else None


def run_facts(result: Mapping[str, Any]) -> Facts:
    """The checklist's facts of a metrics.json content (see the module docstring)."""
    card = result["model_card"]
    model, data = card["model"], card["data"]
    rep = result.get("reproducibility") or {}
    cfg = rep.get("config") or {}
    extras = result.get("publication") or {}
    ci = result.get("ci")
    cal = result["calibration"]
    sources = sorted({s for counts in data["class_by_source"].values() for s in counts})
    excluded = [*(f"source {s}" for s in cfg.get("exclude_source") or []),
                *(f"rows where {w}" for w in cfg.get("exclude_where") or [])]
    unreadable = len(result.get("unreadable") or {})
    pre = model.get("preprocess") or {}
    versions = rep.get("library_versions") or {}
    return {
        "arch": f"{model['arch']} classifier of {model.get('img_size')} px images into {_join(model['classes'])}",
        "classes": _join(model["classes"]),
        "weights": f"{cfg['weights']} weights" if cfg.get("weights") else None,
        "data": (f"{data['training_data']}: {data['images']} images of {data['patients']} patients from "
                 f"{len(sources)} source(s) ({_join(sources)})") if data.get("training_data") else None,
        "manifest": f"{rep.get('manifest_file')} (SHA-256 {str(rep.get('manifest_sha256'))[:12]})"
                    if rep.get("manifest_sha256") else None,
        "exclusions": (f"excluded: {_join(excluded)}" if excluded else "no source or rows excluded")
                      + f"; {unreadable} unreadable image(s) left out" if cfg else None,
        "missing": f"{unreadable} unreadable image(s) left out of the evaluated split; no other field is imputed",
        "preprocess": (f"{pre.get('geometry')} to {pre.get('img_size')} px, normalised with mean {pre.get('mean')} "
                       f"and std {pre.get('std')}; lung crop {format_value(pre.get('lung_crop'))}, lung mask "
                       f"{format_value(pre.get('lung_mask'))}, equalisation {pre.get('equalize')}") if pre else None,
        "split": (f"by patient (patient_id); validation {cfg.get('val_frac')}, test {cfg.get('test_frac')} of the "
                  f"patients; held-out sources: {_join(cfg.get('holdout_source') or []) or 'none'}")
                 if data.get("patients") and cfg else None,
        "split_counts": _counts(data["split_counts"]),
        "evaluated": f"{result['split']} split of {result['data']}: {result['n_images']} images, "
                     f"{result['n_patients']} patients",
        "training": _training(cfg, model),
        "selection": (f"the epoch with the best validation macro ROC-AUC "
                      f"({format_value(model.get('best_val_macro_auc'))}, epoch {model.get('best_epoch')} of "
                      f"{model.get('epochs_trained')})")
                     if model.get("best_epoch") is not None else None,
        "imbalance": f"class balancing: {cfg.get('balance')}; label smoothing {cfg.get('label_smoothing')}"
                     if cfg else None,
        "metrics": "; ".join(f"{k} {format_value(v)}" for k, v in card["headline"].items()),
        "uncertainty": (f"95% percentile intervals from {ci['n_resamples']} patient-level bootstrap resamples"
                        if ci else None),
        "calibration": (f"temperature scaling, T = {cal['temperature']:.3f} ({cal['how']}); ECE {cal['ece_before']:.3f}"
                        f" before, {cal['ece_after']:.3f} after"),
        "thresholds": _thresholds(result.get("operating_points"), result.get("covid_vs_rest")),
        "external": _external(result),
        "crossval": (f"{len(result['crossval']['folds'])} source(s) held out in turn" if result.get("crossval")
                     else None),
        "robustness": "; ".join(p for p in (
            "metrics by source and view, metadata-only baselines" if result.get("by_source") or result.get("by_view")
            else "", f"{len(result['crossval']['folds'])} held-out source(s)" if result.get("crossval") else "",
            "input gate refusal rates" if result.get("gate") else "") if p) or None,
        "explain": _explain(result, extras),
        "ensemble": f"none: a single {model['arch']}",
        "gallery": _gallery(extras),
        "demographics": _demographics(extras),
        "subgroups": "; ".join(f"{n}: {_join(g)}" for n, g in (extras.get("subgroups") or {}).items() if g) or None,
        "utility": _utility(extras),
        "gate": "the input gate refuses images that are not frontal chest radiographs" if result.get("gate") else None,
        "software": _join(f"{k} {v}" for k, v in versions.items()) or None,
        "code": (f"covidxr {rep.get('covidxr_version')} at git commit {rep.get('git_commit')}"
                 f"{' (uncommitted changes)' if rep.get('git_dirty') else ''}; command: {rep.get('command_line')}")
                if rep else None,
        "model_file": f"checkpoint SHA-256 {str(result['checkpoint_sha256'])[:16]}",
        "intended_use": card["intended_use"],
        "limitations": " ".join(card["limitations"]) + (f" This run's warnings: {len(result['warnings'])}."
                                                        if result.get("warnings") else ""),
        "output": f"a probability per class ({_join(model['classes'])}), temperature-calibrated; the label is the "
                  "most probable class" + ("; operating points threshold the positive class"
                                           if result.get("operating_points") else ""),
    }
