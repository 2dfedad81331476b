"""The trained model: one checkpoint becomes one :class:`~covidxr.model.trained.TrainedModel` (placeholder)."""
