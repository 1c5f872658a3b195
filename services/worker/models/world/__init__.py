"""The built-in world model: a trained, action-conditioned, CPU-real-time default.

``sim`` is the 2-D arena it learned (the ground truth; ``WorldSim``, ``generate_episodes``
and ``StickyRandomPolicy`` make true action sequences and frames), ``net`` its network,
``model`` the ``WorldModel`` the worker serves, ``evaluation`` its quality and speed figures.
Train with ``tools/train_world_model.py``; evaluate with ``tools/eval_world_model.py``; see
docs/world_model.md.
"""

from __future__ import annotations

from typing import Any

from services.worker.models.world.model import MODEL_ID, WEIGHTS, BuiltinWorldModel, load
from services.worker.models.world.sim import ACTIONS, StickyRandomPolicy, WorldSim
from windflow.errors import InvalidArgument

_OPTIONS = ("window", "num_threads")


def load_default(**options: Any) -> BuiltinWorldModel:
    """The model with the weights committed in the repo.

    Options: ``window`` (past frames in the KV cache, 1..4; default 4, the trained window)
    and ``num_threads`` (torch threads inside ``step``; default 1, None = leave the
    process setting alone).
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise InvalidArgument(f"{MODEL_ID} takes the options {_OPTIONS}, got {unknown}")
    return load(WEIGHTS, **options)


__all__ = [
    "ACTIONS",
    "MODEL_ID",
    "WEIGHTS",
    "BuiltinWorldModel",
    "StickyRandomPolicy",
    "WorldSim",
    "load",
    "load_default",
]
