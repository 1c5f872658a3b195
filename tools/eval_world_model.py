"""Evaluate the built-in world model on held-out worlds (one CPU thread).

    python -m tools.eval_world_model [--json] [--png strip.png] [--weights PATH]

Reports one-step PSNR (teacher-forced), per-step PSNR of 32-step rollouts with the true
actions, with shuffled actions and for the copy-last-frame baseline
(PSNR = 10 log10(1 / MSE) over the set, pixels in [0, 1]); the rollout mean for each
step count K; and the speed per frame at batch 1 and per step at batch 8 for each K.
Writes a PNG strip (truth above prediction). With --json the last stdout line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.worker.models.base import Control
from services.worker.models.world import sim
from services.worker.models.world.model import WEIGHTS, BuiltinWorldModel, load

EVAL_SEEDS = tuple(9_000_000 + i for i in range(16))
POLICY_SEED = 424242
HORIZON = 32


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    mse = float(np.mean((pred.astype(np.float64) / 255.0 - truth.astype(np.float64) / 255.0) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def rollout(model: BuiltinWorldModel, actions: np.ndarray, steps: int) -> np.ndarray:
    """Frames 1..T predicted from each world's first frame and the given actions."""
    states = [model.new_state(s) for s in EVAL_SEEDS]
    out = []
    for t in range(actions.shape[1]):
        out.append(model.step(states, [Control(int(a)) for a in actions[:, t]], steps))
    return np.stack(out, axis=1)  # (N, T, H, W, 3)


def one_step(
    model: BuiltinWorldModel, frames: np.ndarray, actions: np.ndarray, steps: int
) -> float:
    """Teacher-forced: each frame predicted from the true frames before it."""
    states = [model.new_state(s) for s in EVAL_SEEDS]
    preds = []
    for t in range(actions.shape[1]):
        preds.append(model.step(states, [Control(int(a)) for a in actions[:, t]], steps))
        for i, s in enumerate(states):
            s.prev = frames[i, t + 1].copy()  # the truth enters the cache, not the guess
    return psnr(np.stack(preds, 1), frames[:, 1:])


def speed(model: BuiltinWorldModel, steps: int, batch: int, repeats: int) -> float:
    states = [model.new_state(s) for s in range(batch)]
    controls = [Control(1)] * batch
    for _ in range(3):
        model.step(states, controls, steps)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.step(states, controls, steps)
    return (time.perf_counter() - t0) / repeats * 1000.0


def strip(truth: np.ndarray, pred: np.ndarray, path: Path, every: int = 2) -> None:
    """Truth (top row) over prediction (bottom row) for one world, every ``every`` frames."""
    top = np.concatenate(list(truth[::every]), axis=1)
    bottom = np.concatenate(list(pred[::every]), axis=1)
    image = Image.fromarray(np.concatenate([top, bottom], axis=0))
    image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST).save(path)


def evaluate(model: BuiltinWorldModel, png: Path | None = None) -> dict[str, object]:
    frames, actions = sim.generate_episodes(list(EVAL_SEEDS), HORIZON, POLICY_SEED)
    shuffled = np.random.default_rng(7).permuted(actions, axis=1)
    truth = frames[:, 1:]
    copy_last = np.repeat(frames[:, :1], HORIZON, axis=1)

    def per_step(pred: np.ndarray) -> list[float]:
        return [round(psnr(pred[:, t], truth[:, t]), 3) for t in range(HORIZON)]

    by_k: dict[str, float] = {}
    rollouts = {}
    for k in model.info.steps:
        rollouts[k] = rollout(model, actions, k)
        by_k[str(k)] = round(float(np.mean(per_step(rollouts[k]))), 3)
    k0 = model.info.default_steps
    true = per_step(rollouts[k0])
    shuf = per_step(rollout(model, shuffled, k0))
    copy = per_step(copy_last)
    if png is not None:
        strip(truth[0], rollouts[k0][0], png)
    return {
        "steps": k0,
        "eval_worlds": len(EVAL_SEEDS),
        "one_step_psnr": round(one_step(model, frames, actions, k0), 3),
        "rollout_psnr_true": true,
        "rollout_psnr_shuffled": shuf,
        "rollout_psnr_copy_last": copy,
        "rollout_mean_true": round(float(np.mean(true)), 3),
        "rollout_mean_shuffled": round(float(np.mean(shuf)), 3),
        "rollout_mean_copy_last": round(float(np.mean(copy)), 3),
        "rollout_mean_by_k": by_k,
        "ms_per_frame_b1": {str(k): round(speed(model, k, 1, 40), 3) for k in model.info.steps},
        "ms_per_step_b8": {str(k): round(speed(model, k, 8, 15), 3) for k in model.info.steps},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--png", type=Path, default=Path("world_model_eval.png"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load(args.weights)
    result = evaluate(model, args.png)
    true, shuf, copy = (
        result["rollout_psnr_true"],
        result["rollout_psnr_shuffled"],
        result["rollout_psnr_copy_last"],
    )
    assert isinstance(true, list) and isinstance(shuf, list) and isinstance(copy, list)
    print(f"model {model.info.version}, {len(EVAL_SEEDS)} held-out worlds, {HORIZON}-step rollouts")
    print(f"one-step PSNR (K={result['steps']}): {result['one_step_psnr']:.2f} dB")
    print("step  true  shuffled  copy-last")
    for t in range(0, HORIZON, 4):
        print(f"{t + 1:4d} {true[t]:6.2f} {shuf[t]:8.2f} {copy[t]:9.2f}")
    print(
        f"mean {result['rollout_mean_true']:6.2f} {result['rollout_mean_shuffled']:8.2f} "
        f"{result['rollout_mean_copy_last']:9.2f}"
    )
    print("rollout mean by K:", result["rollout_mean_by_k"])
    print("ms per frame, batch 1:", result["ms_per_frame_b1"])
    print("ms per step, batch 8: ", result["ms_per_step_b8"])
    print(f"strip: {args.png}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
