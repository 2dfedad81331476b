"""Rating explanations: ``python -m covidxr.explain score`` explains images of a dataset with several CAM methods
and scores every heatmap.

For each method and image, pytorch-grad-cam's own faithfulness metrics with a softmax-probability target for the
explained class:

* ``cam_mult_change``: :class:`~pytorch_grad_cam.metrics.cam_mult_image.CamMultImageConfidenceChange`, the change in
  the class probability when the input is multiplied by the heatmap (only the relevant part kept); higher (closer to
  0 or positive) is better.
* ``road_morf_P`` / ``road_lerf_P``: :class:`~pytorch_grad_cam.metrics.road.ROADMostRelevantFirst` /
  ``ROADLeastRelevantFirst`` at percentile ``P``: the change in probability after the most / least relevant pixels
  are replaced by noisy linear imputation. MoRF: lower (a larger drop) is better; LeRF: higher is better.
  ``road_combined`` is the mean over percentiles of ``(LeRF - MoRF) / 2`` as in ``ROADCombined``; higher is better.
* ``border_share``: the share of heatmap mass in the border band, the outer :data:`BORDER_FRACTION` (12.5%) of the
  original image on each side, where burned-in text, markers and collimation edges sit. The band covers 43.75% of the
  image, so a uniform heatmap scores 0.4375. An image whose heatmap has more than half of its mass there
  (``outside_center``) is listed: its explanation points mostly outside the central chest area.
* ``lung_share``: the share of heatmap mass inside the lung mask (``covidxr.lungs.cam_share_in_lungs``), the primary
  check that the model looks at the lungs; the mask comes from the checkpoint's lung model (a lung-cropping run) or
  the installed one (NaN when none is installed).

The run's model is loaded once as a :class:`~covidxr.model.trained.TrainedModel` (network, preprocessing, calibration),
in torch: scoring needs no :class:`~covidxr.inference.predictor.Predictor`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from torch import nn

from covidxr.data.manifest import load_manifest
from covidxr.data.run_folder import RunFolder
from covidxr.data.split import apply_split
from covidxr.errors import CheckpointError, DatasetError, ImageReadError
from covidxr.files import atomic_write_text
from covidxr.html_page import Section, paragraph_html, render_html, table_html
from covidxr.images.reader import load_xray
from covidxr.lungs import LungModel, load_lung_model
from covidxr.model.cam import compute_cam, preserved_state
from covidxr.model.trained import TrainedModel
from covidxr.utils import softmax

log = logging.getLogger("covidxr.explain")

BORDER_FRACTION: float = 0.125
"""Width of the border band, as a fraction of the image's height (top/bottom) and width (left/right)."""

OUTSIDE_CENTER_SHARE: float = 0.5
"""An explanation with more than this share of its mass in the border band is listed as outside the chest."""

ROAD_PERCENTILES: tuple[int, ...] = (20, 50, 80)
"""Percentiles at which ROAD removes pixels, by default."""


@dataclass(frozen=True)
class ScoredModel:
    """What scoring needs of a run: the trained model and the lung model that gives the masks of ``lung_share``.

    Attributes:
        trained: the run's model (:class:`~covidxr.model.trained.TrainedModel`: network, classes, input pipeline,
            temperature).
        lungs: the lung model of the checkpoint's pipeline, else the installed one, else None.
    """

    trained: TrainedModel
    lungs: LungModel | None


def load_scored_model(checkpoint: str | Path, device: str = "auto") -> ScoredModel:
    """Return the checkpoint's trained model and the lung model ``lung_share`` uses.

    Raises:
        CheckpointError: the weights, preprocessing or temperature are invalid.
        CovidxrError: the device is not available.
    """
    trained = TrainedModel.load(checkpoint, device=device)
    lungs = trained.pipeline.lungs
    if lungs is None:
        try:
            lungs = load_lung_model()
        except CheckpointError as exc:
            log.warning("lung_share not measured: %s", exc)
    return ScoredModel(trained=trained, lungs=lungs)


def border_share(heatmap: np.ndarray, fraction: float = BORDER_FRACTION) -> float:
    """Share of the heatmap's mass in the border band (outer ``fraction`` of the height and width on each side).

    Args:
        heatmap: ``(H, W)`` non-negative heatmap on the original image.
        fraction: band width per side, as a fraction of the side.

    Returns:
        The share in ``[0, 1]``; NaN when the heatmap has no mass.
    """
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, None)
    total = heat.sum()
    if not total > 0:
        return float("nan")
    height, width = heat.shape
    top, left = int(round(height * fraction)), int(round(width * fraction))
    inner = heat[top : height - top, left : width - left].sum()
    return float((total - inner) / total)


def faithfulness(model: nn.Module, inputs: torch.Tensor, maps: np.ndarray, targets: Sequence[int],
                 percentiles: Sequence[int] = ROAD_PERCENTILES, seed: int = 0) -> dict[str, np.ndarray]:
    """Score heatmaps with pytorch-grad-cam's metrics (see the module docstring), one value per image.

    The ROAD imputation adds noise from torch's generator; it runs under a forked RNG seeded with ``seed``, so the
    scores are reproducible and the caller's RNG state is untouched.

    Args:
        model: the classifier (put in eval mode for the call; its state is restored).
        inputs: ``(B, 1, S, S)`` network inputs in ``[0, 1]``.
        maps: ``(B, S, S)`` heatmaps on the network input.
        targets: explained class per image.
        percentiles: ROAD percentiles.
        seed: seed of the ROAD noise.

    Returns:
        ``{"cam_mult_change": (B,), "road_morf_P": (B,), "road_lerf_P": (B,) ..., "road_combined": (B,)}``.
    """
    device = next(model.parameters()).device
    x = inputs.detach().to(device=device, dtype=torch.float32)
    chosen = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    scores: dict[str, np.ndarray] = {}
    with preserved_state(model), torch.random.fork_rng(devices=[]), torch.no_grad():
        model.eval()
        torch.manual_seed(seed)
        # The metrics' return_diff=True would run the unperturbed batch again in every call: run it once here.
        outputs = model(x)
        before = np.float32([target(output).cpu().numpy() for target, output in zip(chosen, outputs, strict=True)])
        metrics = {"cam_mult_change": CamMultImageConfidenceChange()}
        for p in percentiles:
            metrics[f"road_morf_{p}"] = ROADMostRelevantFirst(percentile=p)
            metrics[f"road_lerf_{p}"] = ROADLeastRelevantFirst(percentile=p)
        for key, metric in metrics.items():
            scores[key] = metric(x, maps, chosen, model, return_diff=False) - before
    if percentiles:
        pairs = [(scores[f"road_lerf_{p}"] - scores[f"road_morf_{p}"]) / 2 for p in percentiles]
        scores["road_combined"] = np.mean(pairs, axis=0)
    return {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in scores.items()}


def select_images(table: pd.DataFrame, split: str, split_table: pd.DataFrame | None,
                  limit: int | None) -> pd.DataFrame:
    """Pick the images to score: the run's ``split`` (or all), then up to ``limit`` spread over the classes.

    Args:
        table: the dataset's manifest (:func:`covidxr.data.manifest.load_manifest`).
        split: ``"test"``, ``"val"`` or ``"all"``.
        split_table: the run's saved split (``relpath``, ``split``), or None when the run has none.
        limit: at most this many images (taken round-robin over the classes, in manifest order), or None for all.

    Returns:
        The chosen rows.

    Raises:
        DatasetError: when a split is asked for and the data is not the run's training data, or nothing is left.
    """
    if split != "all":
        if split_table is None:
            raise DatasetError(f"--split {split}: the run has no saved split (split.csv); use --split all")
        try:
            table = apply_split(table, split_table)
        except DatasetError as exc:
            raise DatasetError(f"--split {split}: --data is not this run's training data ({exc}); "
                               "use --split all for other data") from exc
        table = table[table["split"] == split]
    table = table.reset_index(drop=True)
    if limit is not None:
        order = table.groupby("label", sort=False).cumcount()
        table = table.assign(_order=order).sort_values(["_order", "label"], kind="stable").head(limit)
        table = table.drop(columns="_order").reset_index(drop=True)
    if table.empty:
        raise DatasetError(f"no images to score in split {split!r}")
    return table


def _score_batch(run: ScoredModel, rows: pd.DataFrame, methods: Sequence[str],
                 percentiles: Sequence[int]) -> list[dict]:
    """Explain and score one batch of manifest rows (``path``, ``relpath``, ``label``) with every method.

    Returns:
        One result dict per (image, method), plus one per unreadable image (with ``error``).
    """
    results, pixels, kept = [], [], []
    for row in rows.itertuples(index=False):
        try:
            pixels.append(load_xray(row.path).pixels)
            kept.append(row)
        except ImageReadError as exc:
            results.append({"relpath": row.relpath, "label": row.label, "error": str(exc)})
    if not kept:
        return results
    trained = run.trained
    prepared = [trained.pipeline.network_input(p, trained.img_size) for p in pixels]
    inputs = torch.stack([x for x, _ in prepared])
    masks = [trained.lung_mask(image, prep, run.lungs) for image, (_, prep) in zip(pixels, prepared, strict=True)]
    for method in methods:
        start = time.perf_counter()
        out = compute_cam(trained.network, inputs, method)
        seconds = (time.perf_counter() - start) / len(kept)
        scores = faithfulness(trained.network, inputs, out.maps, out.targets, percentiles)
        probs = softmax(out.logits.numpy(), trained.calibration.temperature)
        for i, (row, image) in enumerate(zip(kept, pixels, strict=True)):
            film = trained.film_heat(out.maps[i], image, prepared[i][1], mask=masks[i])
            heat, note = film.heat, film.note
            share = border_share(heat) if heat is not None else float("nan")
            lungs = film.lung_share if film.lung_share is not None else float("nan")
            item = {"relpath": row.relpath, "label": row.label, "method": method,
                    "predicted": trained.classes[int(np.argmax(probs[i]))],
                    "cam_class": trained.classes[out.targets[i]], "confidence": float(probs[i].max()),
                    "lung_share": lungs, "border_share": share, "outside_center": bool(share > OUTSIDE_CENTER_SHARE),
                    "ms_per_image": 1000.0 * seconds, "note": note or "", "error": ""}
            item |= {k: (float(v[i]) if heat is not None else float("nan")) for k, v in scores.items()}
            results.append(item)
    return results


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per method: counts and mean scores.

    Args:
        scores: the per-image table written to ``explain_scores.csv``.

    Returns:
        The summary table.
    """
    rated = scores[scores["error"] == ""]
    metric_columns = [c for c in rated.columns if c.startswith(("cam_mult", "road_"))]
    rows = []
    for method, group in rated.groupby("method", sort=False):
        explained = group[group["note"] == ""]
        row = {"method": method, "images": len(group), "explained": len(explained)}
        row |= {c: float(explained[c].mean()) for c in metric_columns}
        row |= {"lung_share": float(explained["lung_share"].mean()),
                "border_share": float(explained["border_share"].mean()),
                "outside_center": int(explained["outside_center"].sum()),
                "ms_per_image": float(group["ms_per_image"].mean())}
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    """Render a small table as GitHub markdown (numbers with 3 decimals)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if value != value else f"{value:.3f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


_SCORE_LEGEND = (
    "cam_mult_change: change in the class probability when the image is multiplied by the heatmap (higher is "
    "better). road_morf_P / road_lerf_P: change in probability after replacing the P% most / least relevant pixels "
    "by ROAD's noisy linear imputation (MoRF: lower is better; LeRF: higher is better). road_combined: mean of "
    "(LeRF - MoRF) / 2 over the percentiles (higher is better). lung_share: share of heatmap mass inside the lung "
    "mask (higher is better; n/a without a lung model). border_share (secondary): share of heatmap mass in the outer "
    f"{BORDER_FRACTION:.1%} band of each side of the image, where burned-in text and markers sit (a uniform "
    "heatmap gives 0.4375). outside_center: images with more than half of the heatmap mass in that band."
)


def write_reports(out: Path, scores: pd.DataFrame, summary: pd.DataFrame, title: str) -> None:
    """Write ``explain_scores.csv``, ``explain_summary.csv``, ``explain_summary.md`` and ``explain_summary.html``.

    Args:
        out: output folder.
        scores: per-image, per-method table.
        summary: per-method table.
        title: subtitle naming the run and data.
    """
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "explain_scores.csv", scores.to_csv(index=False))
    atomic_write_text(out / "explain_summary.csv", summary.to_csv(index=False))
    flagged = scores[(scores["error"] == "") & scores["outside_center"].astype(bool)]
    flagged = flagged[["method", "relpath", "label", "cam_class", "border_share"]]
    failed = scores[scores["error"] != ""][["relpath", "error"]].drop_duplicates()
    md = [f"# Explanation scores\n\n{title}\n\n", markdown_table(summary), "\n\n", _SCORE_LEGEND, "\n\n",
          "## Heatmaps mostly outside the central chest area\n\n",
          markdown_table(flagged) if len(flagged) else "None.", "\n"]
    if len(failed):
        md += ["\n## Unreadable images\n\n", markdown_table(failed), "\n"]
    atomic_write_text(out / "explain_summary.md", "".join(md))
    sections = [Section("Summary per method", table_html(summary.to_dict("records"), list(summary.columns))
                        + paragraph_html(_SCORE_LEGEND)),
                Section("Heatmaps mostly outside the central chest area",
                        table_html(flagged.to_dict("records"), list(flagged.columns)) if len(flagged)
                        else paragraph_html("None."))]
    if len(failed):
        sections.append(Section("Unreadable images", table_html(failed.to_dict("records"), list(failed.columns))))
    atomic_write_text(out / "explain_summary.html", render_html(sections, title="Explanation scores", subtitle=title))


def score(checkpoint: Path, data: str | None, split: str, methods: Sequence[str], limit: int | None, out: Path,
          device: str = "auto", batch_size: int = 8, percentiles: Sequence[int] = ROAD_PERCENTILES) -> pd.DataFrame:
    """Explain and score images of a dataset with several methods, and write the reports.

    Args:
        checkpoint: the run's checkpoint.
        data: dataset folder or manifest (None: the run's training data, as for ``python -m covidxr.evaluate``).
        split: ``"test"``, ``"val"`` or ``"all"``.
        methods: CAM methods.
        limit: at most this many images.
        out: output folder.
        device: torch device name or ``"auto"``.
        batch_size: images per CAM call.
        percentiles: ROAD percentiles.

    Returns:
        The per-method summary.
    """
    checkpoint = Path(checkpoint)
    folder = RunFolder.read(checkpoint)
    # The images are chosen before the model is loaded, so bad --data/--split fails with its one line and no warning.
    data_path = folder.data_path(data)
    table = select_images(load_manifest(data_path), split, folder.split()[0], limit)
    run = load_scored_model(checkpoint, device)
    log.info("scoring %d image(s) of %s with %s", len(table), data_path, ", ".join(methods))
    results: list[dict] = []
    for start in range(0, len(table), batch_size):
        results += _score_batch(run, table.iloc[start : start + batch_size], methods, percentiles)
    columns = ["relpath", "label", "method", "predicted", "cam_class", "confidence", "cam_mult_change",
               *[f"road_{kind}_{p}" for p in percentiles for kind in ("morf", "lerf")],
               *(["road_combined"] if percentiles else []), "lung_share", "border_share", "outside_center",
               "ms_per_image", "note", "error"]
    scores = pd.DataFrame(results).reindex(columns=columns)
    scores[["note", "error", "method"]] = scores[["note", "error", "method"]].fillna("")
    scores["outside_center"] = scores["outside_center"].fillna(False).astype(bool)
    summary = summarise(scores)
    title = f"checkpoint {checkpoint} ({run.trained.arch}), data {data_path}, split {split}, {len(table)} image(s)"
    write_reports(out, scores, summary, title)
    return summary
