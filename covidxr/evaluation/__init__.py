"""Evaluation (``python -m covidxr.evaluate``, ``python -m covidxr.compare``): metrics with patient-bootstrap intervals,
calibration, external and held-out-source results, the report, checklists and model card."""
