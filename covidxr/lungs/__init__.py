"""Lung segmentation for covidxr: a small U-Net trained on the shared lung masks, and what to do with its masks.

Public API (everything else in this package is internal)::

    from covidxr.images.reader import load_xray
    from covidxr.lungs import load_lung_model, lung_box, crop_to_lungs, cam_share_in_lungs

    image = load_xray("film.png").pixels          # (H, W) float32 in [0, 1]
    model = load_lung_model()                     # $COVIDXR_HOME/lungs/lung-seg.pt (~/.cache/covidxr/...)
    mask = model.mask(image)                      # (H, W) bool, True = lung; model.masks([...]) for a batch
    box = lung_box(mask, margin=0.05)             # LungBox(top, left, bottom, right, fell_back)
    crop, box = crop_to_lungs(image, model)       # image[box.slices]; the whole image when box.fell_back
    share = cam_share_in_lungs(cam, mask)         # share of the Grad-CAM mass on the lungs, in [0, 1]

Make the model once with ``python -m covidxr.lungs train`` (a few minutes on a CPU); without it,
:func:`load_lung_model` raises :class:`covidxr.errors.CheckpointError` saying so.
"""

from covidxr.lungs.geometry import LungBox, cam_share_in_lungs, crop_to_lungs, lung_box
from covidxr.lungs.model import LungModel, default_lung_model_path, load_lung_model

__all__ = ["LungBox", "LungModel", "cam_share_in_lungs", "crop_to_lungs", "default_lung_model_path",
           "load_lung_model", "lung_box"]
