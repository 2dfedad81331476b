"""The heat map of one file: its controls, the overlay with its colour scale, the share of it inside the lungs, and the
captioned PNG download. Drawing is ``covidxr.explain.display`` (the same overlay as ``python -m covidxr.predict``).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import streamlit as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app.analysis import Context, Upload
from covidxr.errors import CovidxrError
from covidxr.images.reader import Xray

if TYPE_CHECKING:
    from covidxr.inference.predictor import Prediction, Predictor

DISPLAY_MAX_SIDE = 1024
DOWNLOAD_MAX_SIDE = 2048
DEFAULT_ALPHA = 0.6
DEFAULT_CAM = "gradcam"
SLOW_ON_CPU = frozenset({"scorecam"})
CAM_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM", "xgradcam": "XGrad-CAM",
              "layercam": "LayerCAM", "eigencam": "Eigen-CAM", "scorecam": "Score-CAM (slow)"}
COLOUR_BAR_HTML = (
    '<div role="img" aria-label="Colour scale of the heat map: nothing is drawn up to {threshold}; above it the colour '
    'runs from blue (low) to red (high)" style="font-size:0.8rem;color:#555;margin:-0.4rem 0 0.6rem">'
    '<div style="height:12px;border:1px solid #888;border-radius:2px;background:'
    'repeating-linear-gradient(45deg,#ddd 0 3px,#fff 3px 6px) 0 0/{cut}% 100% no-repeat,'
    'linear-gradient(to right,{stops})"></div>'
    '<div style="display:flex;justify-content:space-between;gap:1rem"><span>0: not drawn up to {threshold}</span>'
    '<span>1: strongest influence</span></div></div>')


def cam_choices(predictor: Predictor) -> list[str | None]:
    """The explanation methods offered: all of them on a GPU; on the CPU all but Score-CAM (then None for "off").

    Score-CAM runs one forward pass per feature map (2048 for ResNet-50): many minutes on a CPU, during which the
    shared model would be busy for every other user.
    """
    from covidxr.model.cam import CAM_METHODS

    on_cpu = getattr(getattr(predictor, "device", None), "type", "cpu") == "cpu"
    return [m for m in CAM_METHODS if not (on_cpu and m in SLOW_ON_CPU)] + [None]


def cam_settings(upload: Upload, predictor: Predictor) -> tuple[str | None, str | None]:
    """The file's current explanation method and class (its widgets' values, or the defaults before they exist)."""
    methods = cam_choices(predictor)
    cam = st.session_state.get(f"{upload.key}:cam", DEFAULT_CAM if DEFAULT_CAM in methods else methods[0])
    cam_class = st.session_state.get(f"{upload.key}:class")
    return (cam if cam in methods else methods[0]), (cam_class if cam_class in predictor.classes else None)


def render_controls(upload: Upload, classes: list[str], predictor: Predictor) -> float:
    """The explanation controls of one file (keyed per upload, so several files work independently).

    Returns:
        The overlay opacity at the highest heat-map values.
    """
    methods = cam_choices(predictor)
    cols = st.columns(2)
    cols[0].selectbox("Explanation method", methods, key=f"{upload.key}:cam",
                      index=methods.index(DEFAULT_CAM) if DEFAULT_CAM in methods else 0,
                      format_func=lambda m: "Off" if m is None else CAM_LABELS.get(m, m),
                      help="How the heat map is computed. Grad-CAM is the usual choice.")
    cols[1].selectbox("Class to explain", [None, *classes], key=f"{upload.key}:class",
                      format_func=lambda c: "the predicted class" if c is None else c,
                      help="Show which regions pushed the model towards this class.")
    return st.slider("Heat-map opacity", 0.0, 1.0, DEFAULT_ALPHA, 0.05, key=f"{upload.key}:alpha",
                     help="Opacity of the colour where the heat map is highest; low values are never drawn.")


def _colour_bar() -> str:
    """The overlay's colour scale as an HTML bar (the part below the drawing threshold hatched)."""
    from covidxr.explain.display import HEAT_THRESHOLD, colour_stops

    cut = round(100 * HEAT_THRESHOLD)
    stops = colour_stops()
    gradient = ",".join(f"{colour} {100 * i / (len(stops) - 1):.0f}%" for i, colour in enumerate(stops))
    return COLOUR_BAR_HTML.format(cut=cut, stops=gradient, threshold=f"{HEAT_THRESHOLD:.1f}")


def display_image(upload: Upload, xray: Xray, ctx: Context) -> np.ndarray:
    """The film at its display size (``covidxr.explain.display.shrink``), made once per upload: the picture of the
    film, the heat-map overlay and the lung mask all start from it instead of the full-size film."""
    key = ("display", upload.key)
    if key not in ctx.store:
        from covidxr.explain.display import shrink

        ctx.store[key] = shrink(xray.pixels, DISPLAY_MAX_SIDE)
    return ctx.store[key]


def display_heatmap(upload: Upload, prediction: Prediction, ctx: Context) -> np.ndarray | None:
    """The prediction's heat map at the film's display size (None without one), made once per upload, model,
    method and class."""
    if prediction.heatmap is None:
        return None
    key = ("display-heat", upload.key, ctx.model_key, prediction.cam_method, prediction.cam_class)
    if key not in ctx.store:
        from covidxr.explain.display import shrink

        ctx.store[key] = shrink(prediction.heatmap, DISPLAY_MAX_SIDE)
    return ctx.store[key]


def lung_share(upload: Upload, xray: Xray, heatmap: np.ndarray, ctx: Context) -> float | None:
    """The share of the heat map's mass inside the lungs, or None when there is no lung model.

    A lung-cropping checkpoint's predictor measures it with its own lung model (``Prediction.lung_share``); otherwise
    the installed lung model (``covidxr.lungs``) masks the film once per upload, at the film's display size
    (``heatmap`` is the heat map at that size, :func:`display_heatmap`): the lung network sees the same input as at
    full size, and a 5,000 px film is masked in a tenth of the time (the share moves by well under a percentage
    point). Without either the page shows nothing about the lungs.
    """
    key = ("lungs", upload.key)
    if key not in ctx.store:
        try:
            from covidxr.lungs import load_lung_model

            ctx.store[key] = load_lung_model().mask(xray.pixels, shape=heatmap.shape)
        except (ImportError, CovidxrError, ValueError):
            ctx.store[key] = None
    mask = ctx.store[key]
    if mask is None or not mask.any():
        return None
    from covidxr.lungs import cam_share_in_lungs

    share = cam_share_in_lungs(np.clip(heatmap, 0.0, None), mask)
    return share if np.isfinite(share) else None


def heatmap_share(upload: Upload, xray: Xray, prediction: Prediction, ctx: Context) -> float | None:
    """The share of the prediction's heat map inside the lungs: the lung-cropping checkpoint's own measure, else the
    installed lung model's (:func:`lung_share`, at the display size); None without a heat map or a lung model."""
    heat = display_heatmap(upload, prediction, ctx)
    if heat is None:
        return None
    share = getattr(prediction, "lung_share", None)
    return share if share is not None else lung_share(upload, xray, heat, ctx)


def render_heatmap(picture: np.ndarray, heat: np.ndarray | None, prediction: Prediction, alpha: float,
                   share: float | None, refused: bool = False) -> None:
    """The heat map over the image with its colour scale and lung share (:func:`heatmap_share`), or the reason there
    is none (``refused``: the image was not assessed, which its alt text says). ``picture`` and ``heat`` are the film
    and the heat map at display size (:func:`display_image`, :func:`display_heatmap`): the same overlay as from the
    full-size arrays. Drawn as JPEG: a PNG of a 1024 px overlay takes a second or more to encode on a busy CPU, and
    the lossless picture is the PNG download."""
    from covidxr.explain.display import overlay

    if heat is None:
        st.info(prediction.note or "Explanation is switched off.")
        return
    method = CAM_LABELS.get(prediction.cam_method or "", prediction.cam_method)
    rgb = overlay(picture, heat, alpha=alpha, max_side=DISPLAY_MAX_SIDE)
    st.image(rgb, caption=f"{method} heat map for '{prediction.cam_class}'", width="stretch", output_format="JPEG",
             alt=f"{method} heat map for the class {prediction.cam_class} over the "
                 + ("refused image (shown on request)" if refused else "uploaded chest X-ray")
                 + f": coloured where the image pushed the model towards {prediction.cam_class}")
    st.markdown(_colour_bar(), unsafe_allow_html=True)
    if share is not None:
        st.markdown(f"**{100 * share:.0f}%** of the heat map lies inside the lungs (as found by the lung "
                    "segmentation model). A low share means the model looked elsewhere: markers, borders, text.")
    st.caption("Colour marks the regions that pushed the model most towards this class. It shows where the model "
               "looked, not where disease is.")


def png_bytes(rgb: np.ndarray, text: dict[str, Any] | None = None) -> bytes:
    """Encode an 8-bit RGB image as PNG in memory, with optional text chunks."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray | None, alpha: float, lines: list[str]) -> bytes:
    """The downloadable heat map: the overlay with its colour bar and caption lines drawn below it.

    The same lines go into the PNG's ``Description`` text chunk, so they survive where the margin is cropped.
    """
    from covidxr.explain.display import captioned, overlay

    picture = overlay(pixels, heatmap, alpha=alpha, max_side=DOWNLOAD_MAX_SIDE)
    return png_bytes(captioned(picture, lines), {"Description": "\n".join(lines), "Software": "covidxr"})
