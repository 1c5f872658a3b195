"""Quality and speed of the restyle model on held-out clips.

Quality: sessions stream held-out clips (``data.clips`` from ``EVAL_SEED``, a seed the
training script never draws from) through the model's own ``step``, a style per run, after
``WARMUP`` frames with no input (the seed's test pattern); the reference pipeline
(``styles.Reference``: the exact transform and temporal filter) gets the same inputs. PSNR
= 10 log10(1 / MSE) over every frame of every clip, pixels in [0, 1]. Speed: wall time of
``step`` on the calling machine with the model's own thread setting (one by default).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from services.worker.models.base import Control, InputFrame
from services.worker.models.restyle import data
from services.worker.models.restyle.model import RestyleModel
from services.worker.models.restyle.styles import STYLES, Reference, seed_pattern

EVAL_SEED = 9_300_001  # the card's figures
TEST_SEED = 9_400_001  # tests/unit/test_restyle.py: fresh clips again
EVAL_CLIPS = 48
EVAL_LENGTH = 12
WARMUP = 2


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    diff = pred.astype(np.float64) / 255.0 - truth.astype(np.float64) / 255.0
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def input_frame(rgb: np.ndarray) -> InputFrame:
    """``rgb`` as a decoded input frame, named by the sha256 of its bytes."""
    return InputFrame(rgb=rgb, digest=hashlib.sha256(rgb.tobytes()).hexdigest())


def stream(
    model: RestyleModel, clips: np.ndarray, style: int, warmup: int = WARMUP
) -> tuple[np.ndarray, np.ndarray]:
    """Sessions 0..N-1 stream ``clips`` (N, T, H, W, 3) in ``style`` after ``warmup``
    frames without input, all N in one batch. Returns the model's frames and the
    reference's, each (N, warmup + T, H, W, 3)."""
    n, length = clips.shape[:2]
    cfg = model.cfg
    states = [model.new_state(i) for i in range(n)]
    ref = Reference(n, cfg.height, cfg.width)
    pattern = np.stack([seed_pattern(i, cfg.height, cfg.width) for i in range(n)])
    styles = [style] * n
    made, truth = [], []
    for _ in range(warmup):
        made.append(model.step(states, [Control(style)] * n, 1))
        truth.append(ref.step(pattern, styles))
    for t in range(length):
        controls = [Control(style, frame=input_frame(clips[i, t])) for i in range(n)]
        made.append(model.step(states, controls, 1))
        truth.append(ref.step(clips[:, t], styles))
    return np.stack(made, 1), np.stack(truth, 1)


def quality(model: RestyleModel, clips: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out PSNR (dB) against the reference, per style: of the model, and of the input
    passed through unchanged (test pattern and clip; what doing nothing scores)."""
    made_db, input_db = {}, {}
    pattern = np.stack([seed_pattern(i, *clips.shape[2:4]) for i in range(clips.shape[0])])
    unchanged = np.concatenate([np.repeat(pattern[:, None], WARMUP, 1), clips], 1)
    for s, name in enumerate(STYLES):
        made, truth = stream(model, clips, s)
        made_db[name] = round(psnr(made, truth), 2)
        input_db[name] = round(psnr(unchanged, truth), 2)
    return made_db, input_db


def speed_ms(model: RestyleModel, batch: int, repeats: int = 30, blocks: int = 3) -> float:
    """Wall ms of one ``step`` of ``batch`` sessions with input frames and mixed styles:
    the lowest of ``blocks`` medians of ``repeats`` steps."""
    cfg = model.cfg
    rng = np.random.default_rng(0)
    states = [model.new_state(i) for i in range(batch)]
    frames = rng.integers(0, 256, size=(batch, cfg.height, cfg.width, 3), dtype=np.uint8)
    controls = [Control(i % len(STYLES), frame=input_frame(frames[i])) for i in range(batch)]
    model.step(states, controls, 1)  # warm up
    medians = []
    for _ in range(blocks):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.step(states, controls, 1)
            times.append((time.perf_counter() - t0) * 1000.0)
        medians.append(float(np.median(times)))
    return round(min(medians), 3)


def evaluate(
    model: RestyleModel, clips: int = EVAL_CLIPS, length: int = EVAL_LENGTH
) -> dict[str, Any]:
    """Every figure of the model card's ``eval`` as a JSON-ready dict."""
    held_out = data.clips(EVAL_SEED, clips, length)
    psnr_db, input_db = quality(model, held_out)
    b1 = speed_ms(model, 1)
    b8 = speed_ms(model, 8)
    return {
        "model_version": model.info.version,
        "eval_seed": EVAL_SEED,
        "eval_clips": clips,
        "frames_per_clip": WARMUP + length,
        "psnr_db": psnr_db,
        "psnr_db_input_unchanged": input_db,
        "ms_per_frame_b1": b1,
        "ms_per_step_b8": b8,
        "ms_per_frame_b8": round(b8 / 8, 3),
    }
