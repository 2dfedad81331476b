"""One pass over the films of an evaluated set: each film decoded once and run once through the evaluation's one
model, giving the metrics' logits, the input gate's verdicts, and what the lung share and the failure gallery need.

The pass reads the original films, because the gate's file checks look at the file (colour, size, DICOM header) and the
heat maps go back onto the film; the network's input is prepared from the film exactly as the app prepares it, so its
logits are those of the run's loaders to the bit (``tests/test_evaluate.py``). Every film gets its logits (``every``)
and, when the gate report needs it, its verdict; a film the lung share samples gets its Grad-CAM of the predicted
class, its heat map on the film and its lung share (:meth:`covidxr.model.trained.TrainedModel.film_heat`, the one
place that share is computed). The failure gallery's films are known only once the metrics are: :func:`gallery_films`
adds their heat maps (Grad-CAM only for a film the first pass did not explain) and their pixels for the thumbnails.
Before this pass the gate report, the lung share and the gallery each loaded the model again and decoded their films
again, Grad-CAM ran twice for the films the lung share and the gallery share, and the metrics ran the model once more.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm.auto import tqdm

from covidxr.errors import ImageReadError, one_line
from covidxr.images.reader import Xray, load_xray
from covidxr.inference.predictor import Predictor
from covidxr.lungs import LungModel
from covidxr.model.gate import GateVerdict


@dataclass(frozen=True)
class Film:
    """What the pass learned of one readable film.

    Attributes:
        verdict: the input gate's verdict (None when it was not asked for).
        explained: the class Grad-CAM explained (the predicted class of this pass), or None when it did not run.
        heat: ``(H, W)`` heat map of the predicted class on the film, or None (not explained, or no explanation).
        lung_share: share of the heat map's mass inside the lungs, or None.
        pixels: the film's pixels, kept for the gallery's pictures (None otherwise).
        logits: ``(C,)`` the network's raw logits of the film.
    """

    verdict: GateVerdict | None
    explained: str | None
    heat: np.ndarray | None
    lung_share: float | None
    pixels: np.ndarray | None
    logits: np.ndarray


@dataclass
class FilmPass:
    """The films of one set by path (an unreadable film maps to None, its reason in ``unreadable``)."""

    films: dict[str, Film | None]
    unreadable: dict[str, str] = field(default_factory=dict)

    def verdicts(self, paths: Sequence[str]) -> list[GateVerdict | None]:
        """The gate's verdicts of ``paths``, None for an unreadable film."""
        return [None if self.films.get(str(p)) is None else self.films[str(p)].verdict for p in paths]

    def logits(self) -> dict[str, np.ndarray]:
        """The raw logits of every readable film, by path."""
        return {path: film.logits for path, film in self.films.items() if film is not None}


def film_pass(predictor: Predictor, paths: Iterable[str], *, gate: set[str] | frozenset[str] = frozenset(),
              explain: set[str] | frozenset[str] = frozenset(), keep: set[str] | frozenset[str] = frozenset(),
              every: bool = False, lungs: LungModel | None = None, batch_size: int = 8, progress: bool = True,
              desc: str = "films") -> FilmPass:
    """Read each of ``paths`` once and run it once (see the module docstring).

    Args:
        predictor: the evaluation's one trained model, as a torch predictor.
        paths: the films (with ``every`` False, only those in ``gate``, ``explain`` or ``keep`` are read).
        gate: films whose gate verdict is wanted.
        explain: films whose Grad-CAM (predicted class), heat map and lung share are wanted.
        keep: films whose pixels the gallery keeps (explained too).
        every: read every film of ``paths`` (the metrics take their logits from this pass).
        lungs: the lung model of the fall-back mask (the checkpoint's pipeline has none of its own).
        batch_size: films per forward pass.
        progress: show a progress bar.
        desc: its label.
    """
    wanted = [p for p in dict.fromkeys(map(str, paths)) if every or p in gate or p in explain or p in keep]
    films: dict[str, Film | None] = {}
    unreadable: dict[str, str] = {}
    # films to explain and films that only need a verdict go in separate batches (a CAM batch costs a backward pass)
    cams = [p for p in wanted if p in explain or p in keep]
    groups = [cams, [p for p in wanted if p not in set(cams)]]
    bar = tqdm(total=len(wanted), desc=desc, disable=None if progress else True, leave=False)
    for cam, group in zip(("gradcam", None), groups, strict=True):
        for start in range(0, len(group), batch_size):
            xrays: list[tuple[str, Xray]] = []
            for path in group[start:start + batch_size]:
                try:
                    xrays.append((path, load_xray(path)))
                except ImageReadError as exc:
                    films[path], unreadable[path] = None, one_line(exc)
            if xrays:
                preds = predictor.predict_batch([x for _, x in xrays], cam=cam, lungs=lungs)
                for (path, xray), pred in zip(xrays, preds, strict=True):
                    films[path] = Film(verdict=pred.gate if path in gate else None, explained=pred.cam_class,
                                       heat=pred.heatmap, lung_share=pred.lung_share,
                                       pixels=xray.pixels if path in keep else None,
                                       logits=np.asarray(pred.logits, dtype=np.float32))
            bar.update(len(group[start:start + batch_size]))
    bar.close()
    return FilmPass(films, unreadable)


def gallery_films(predictor: Predictor, done: FilmPass, paths: Sequence[str], lungs: LungModel | None = None,
                  progress: bool = True, desc: str = "films") -> FilmPass:
    """``done`` with the gallery's ``paths`` added: their pixels, and their heat maps (Grad-CAM of the predicted class,
    run only for a film ``done`` did not explain)."""
    films = dict(done.films)
    todo = []
    for path in map(str, paths):
        film = films.get(path)
        if film is None or film.explained is None:
            todo.append(path)
            continue
        try:
            films[path] = replace(film, pixels=load_xray(path).pixels)
        except ImageReadError:
            films[path] = None
    if todo:
        more = film_pass(predictor, todo, explain=set(todo), keep=set(todo), lungs=lungs, progress=progress,
                         desc=desc)
        for path, film in more.films.items():
            old = films.get(path)
            films[path] = film if old is None or film is None else replace(film, verdict=old.verdict)
    return FilmPass(films, dict(done.unreadable))
