"""The built-in video-to-video model: restyles a live stream, trained, CPU real time.

``styles`` holds what it learned (five deterministic image transforms, the actions, and a
temporal filter; ``Reference`` runs them exactly), ``data`` the synthetic videos it
trained on, ``net`` its network, ``model`` the ``WorldModel`` the worker serves,
``evaluation`` its quality and speed figures. Train with ``tools/train_restyle.py``; see
docs/restyle.md.
"""

from __future__ import annotations

from typing import Any

from services.worker.models.restyle.model import (
    MODEL_CARD,
    MODEL_ID,
    WEIGHTS,
    RestyleModel,
    RestyleState,
    load,
)
from services.worker.models.restyle.styles import STYLES
from windflow.errors import InvalidArgument

_OPTIONS = ("num_threads",)


def load_default(**options: Any) -> RestyleModel:
    """The model with the weights committed in the repo.

    Options: ``num_threads`` (torch threads inside ``step``; default 1, None = leave the
    process setting alone).
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise InvalidArgument(f"{MODEL_ID} takes the options {_OPTIONS}, got {unknown}")
    return load(WEIGHTS, **options)


__all__ = [
    "MODEL_CARD",
    "MODEL_ID",
    "STYLES",
    "WEIGHTS",
    "RestyleModel",
    "RestyleState",
    "load",
    "load_default",
]
