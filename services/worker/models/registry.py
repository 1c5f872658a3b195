"""Which model ids a worker can serve, and how each is loaded.

Entries are import paths so that a worker imports only the models it is asked to serve.
Each factory takes keyword options (from the worker's config) and returns a ``WorldModel``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from services.worker.models.base import WorldModel
from windflow.errors import NotFound

# model id -> "module:function"
MODEL_FACTORIES: dict[str, str] = {
    # The built-in, trained, CPU-real-time world model (weights committed in the repo).
    "windflow-world": "services.worker.models.world:load_default",
    "windflow-restyle": "services.worker.models.restyle:load_default",
    # The causal Wan2.1 family (docs/wan.md). Tiny ones: random weights, for tests/demos.
    "wan-causal-tiny": "services.worker.models.wan.factory:load_tiny",
    "matrix-game-2-tiny": "services.worker.models.wan.factory:load_tiny_action",
    # Real checkpoints from a local path (option path=...; nothing is downloaded).
    "wan2.1-causal": "services.worker.models.wan.factory:load_checkpoint",
    "matrix-game-2": "services.worker.models.wan.factory:load_matrix_game",
}

DEFAULT_MODEL = "windflow-world"


def known_models() -> list[str]:
    return sorted(MODEL_FACTORIES)


def load_model(model_id: str, **options: Any) -> WorldModel:
    """Load ``model_id``; raises ``NotFound`` for an id no factory serves."""
    target = MODEL_FACTORIES.get(model_id)
    if target is None:
        raise NotFound(f"unknown model {model_id!r}; known models: {', '.join(known_models())}")
    module_name, func_name = target.split(":")
    factory: Callable[..., WorldModel] = getattr(importlib.import_module(module_name), func_name)
    return factory(**options)
