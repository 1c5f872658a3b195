"""The built-in world model: a trained, action-conditioned, CPU-real-time default.

``sim`` is the 2-D arena it learned (the ground truth), ``net`` its network, ``model``
the ``WorldModel`` the worker serves. Train with ``tools/train_world_model.py``; evaluate
with ``tools/eval_world_model.py``; see docs/world_model.md.
"""

from __future__ import annotations

from typing import Any

from services.worker.models.world.model import MODEL_ID, BuiltinWorldModel, load


def load_default(**options: Any) -> BuiltinWorldModel:
    """The model with the weights committed in the repo (no options are taken yet)."""
    if options:
        from windflow.errors import InvalidArgument

        raise InvalidArgument(f"{MODEL_ID} takes no options, got {sorted(options)}")
    return load()


__all__ = ["MODEL_ID", "BuiltinWorldModel", "load", "load_default"]
