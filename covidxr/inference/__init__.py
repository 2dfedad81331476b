"""Inference: the predictor the command line and the page share, the input gate, ONNX export and DICOM results
(``python -m covidxr.predict``, ``python -m covidxr.gate``, ``python -m covidxr.export``)."""
