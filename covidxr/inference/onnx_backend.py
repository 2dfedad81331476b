"""ONNX export of an :class:`~covidxr.networks.architectures.XrayClassifier` and prediction with ONNX Runtime on the
CPU.

The exported graph has one input ``image``, ``(B, 1, S, S)`` float32 in ``[0, 1]`` with a dynamic batch size, and one
output ``logits``, ``(B, C)`` (no softmax); the grey-to-RGB repeat and the normalisation are inside, as in the torch
model. The ONNX file's ``metadata_props`` record where it came from:

* ``covidxr.checkpoint_sha256``: SHA-256 of the checkpoint file's bytes. A file whose value differs from the
  checkpoint's current hash is stale and is never used for predictions.
* ``covidxr.arch``, ``covidxr.classes`` (JSON list), ``covidxr.img_size``, ``covidxr.version``.

onnx, onnxscript and onnxruntime are optional (``pip install covidxr[onnx]``); they are imported only when used.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidxr.errors import CovidxrError, one_line
from covidxr.files import atomic_write_bytes

log = logging.getLogger(__name__)

SHA_KEY = "covidxr.checkpoint_sha256"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
EXPORTERS = ("dynamo", "legacy")
OPSET = 18


def default_onnx_path(checkpoint: str | os.PathLike) -> Path:
    """Return where the export of ``checkpoint`` goes by default: beside it, ``.onnx`` instead of ``.pt``.

    Args:
        checkpoint: the checkpoint file (``RUN/best.pt``).

    Returns:
        ``RUN/best.onnx``.
    """
    return Path(checkpoint).with_suffix(".onnx")


def onnxruntime_available() -> bool:
    """Whether onnxruntime can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def export_bytes(model: torch.nn.Module, img_size: int, metadata: dict[str, str], exporter: str = "dynamo") -> bytes:
    """Export ``model`` to an ONNX model (see the module docstring) and return the serialised file.

    Args:
        model: the classifier; a CPU copy in eval mode is exported, the model itself is not changed.
        img_size: side ``S`` of the square input.
        metadata: ``metadata_props`` to record (keys and values are strings).
        exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, the default exporter of current torch) or
            ``"legacy"`` (the TorchScript-based exporter, faster but deprecated).

    Returns:
        The ONNX file's bytes.

    Raises:
        CovidxrError: when onnx/onnxscript are missing or the export fails.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    try:
        import onnx
    except ImportError as exc:
        raise CovidxrError("ONNX export needs the onnx and onnxscript packages (pip install covidxr[onnx])") from exc
    cpu_model = copy.deepcopy(model).cpu().eval()
    example = torch.rand(2, 1, img_size, img_size)
    try:
        if exporter == "dynamo":
            program = torch.onnx.export(cpu_model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        opset_version=OPSET, verbose=False)
            proto = program.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(cpu_model, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=OPSET,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            proto = onnx.load_from_string(buffer.getvalue())
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types; report one line
        raise CovidxrError(f"ONNX export ({exporter}) failed: {one_line(exc)}") from exc
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=str(value))
    return proto.SerializeToString()


def export_metadata(sha256: str, arch: str, classes: list[str], img_size: int,
                    site: dict | None = None) -> dict[str, str]:
    """Return the ``metadata_props`` recorded in an export.

    Args:
        sha256: SHA-256 of the checkpoint file.
        arch: architecture name.
        classes: class names, in output order.
        img_size: input side.
        site: the site profile adapted into the weights (:meth:`~covidxr.model.site_profile.SiteProfile.summary`,
            recorded as ``covidxr.site``), or None.

    Returns:
        The key/value strings.
    """
    from covidxr import __version__

    meta = {SHA_KEY: sha256, "covidxr.arch": arch, "covidxr.classes": json.dumps(list(classes)),
            "covidxr.img_size": str(img_size), "covidxr.version": str(__version__)}
    return meta if site is None else {**meta, "covidxr.site": json.dumps(site, sort_keys=True)}


def write_onnx(path: str | os.PathLike, data: bytes) -> Path:
    """Write an ONNX file atomically (readers see the old file or the complete new one).

    Args:
        path: destination.
        data: the serialised model.

    Returns:
        The path written.
    """
    atomic_write_bytes(path, data)
    return Path(path)


class OnnxRunner:
    """An ONNX Runtime CPU session over an exported classifier.

    Args:
        source: an ONNX file or its bytes.

    Raises:
        CovidxrError: when onnxruntime is missing or the model cannot be loaded.
    """

    def __init__(self, source: str | os.PathLike | bytes) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise CovidxrError("the onnx backend needs onnxruntime (pip install covidxr[onnx])") from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no warnings on stderr
        options.intra_op_num_threads = torch.get_num_threads()
        model = source if isinstance(source, bytes) else os.fspath(source)
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CovidxrError(f"cannot load the ONNX model: {one_line(exc)}") from exc
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name: str = self.session.get_inputs()[0].name

    @property
    def checkpoint_sha256(self) -> str | None:
        """SHA-256 of the checkpoint this model was exported from, as recorded in its metadata."""
        return self.metadata.get(SHA_KEY)

    def logits(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Run the model.

        Args:
            images: ``(B, 1, S, S)`` float images in ``[0, 1]``.

        Returns:
            ``(B, C)`` float32 logits.
        """
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        outputs: list[Any] = self.session.run(None, {self.input_name: np.ascontiguousarray(array, dtype=np.float32)})
        return np.asarray(outputs[0], dtype=np.float32)


def fresh_runner(path: str | os.PathLike, sha256: str) -> OnnxRunner | None:
    """Open the export at ``path`` if it exists, loads, and was made from the checkpoint with hash ``sha256``.

    Args:
        path: the ONNX file.
        sha256: SHA-256 of the checkpoint file.

    Returns:
        The runner, or None for a missing, unreadable or stale file (logged).
    """
    if not Path(path).is_file():
        return None
    try:
        runner = OnnxRunner(path)
    except CovidxrError as exc:
        log.warning("%s: not used (%s)", path, exc)
        return None
    if runner.checkpoint_sha256 != sha256:
        log.info("%s: stale export (made from another checkpoint); not used", path)
        return None
    return runner
