"""The trained model: :class:`~covidxr.model.trained.TrainedModel` is the one place a checkpoint (and the sidecars
pinned to it) becomes a network, with its classes, preprocessing, calibration (:mod:`covidxr.model.calibration`),
input gate (:mod:`covidxr.model.gate`), site profile (:mod:`covidxr.model.site_profile`) and Grad-CAM
(:mod:`covidxr.model.cam`). It sits below every stage: it imports no stage, and every stage may import it."""
