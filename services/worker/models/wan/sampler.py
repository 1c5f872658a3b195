"""Few-step flow-matching schedule of the causal Wan models.

Timesteps are given on the 0..1000 training scale (e.g. 1000/750/500/250) and warped by
the flow-matching shift: sigma = shift * s / (1 + (shift - 1) * s) with s = t / 1000. A
model prediction is the flow v = noise - x0, so x0 = x_t - sigma * v, and the next step
re-noises x0 to the next sigma with fresh noise (``kernels.reference.sampler_update``).
"""

from __future__ import annotations

from dataclasses import dataclass


def shifted_sigma(t: float, shift: float) -> float:
    s = t / 1000.0
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclass(frozen=True, slots=True)
class Schedule:
    """The sigmas (and model timesteps = 1000 * sigma) of one chunk's denoising steps."""

    sigmas: tuple[float, ...]

    @classmethod
    def from_timesteps(cls, timesteps: tuple[int, ...], shift: float) -> Schedule:
        if not timesteps or any(not 0 < t <= 1000 for t in timesteps):
            raise ValueError(f"timesteps must be in (0, 1000], got {timesteps}")
        if list(timesteps) != sorted(timesteps, reverse=True):
            raise ValueError(f"timesteps must decrease, got {timesteps}")
        return cls(tuple(shifted_sigma(t, shift) for t in timesteps))

    def truncated(self, steps: int) -> Schedule:
        """The first ``steps`` steps (fewer steps: the last one predicts x0 earlier)."""
        if not 1 <= steps <= len(self.sigmas):
            raise ValueError(f"steps must be in 1..{len(self.sigmas)}, got {steps}")
        return Schedule(self.sigmas[:steps])

    @property
    def model_timesteps(self) -> tuple[float, ...]:
        return tuple(1000.0 * s for s in self.sigmas)

    def next_sigma(self, i: int) -> float:
        return self.sigmas[i + 1] if i + 1 < len(self.sigmas) else 0.0
