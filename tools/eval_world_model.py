"""Evaluate the built-in world model on held-out worlds (run it on one CPU thread).

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_world_model.py [--json] [--png PATH]
        [--weights PATH] [--window N] [--split eval|validation|first16] [--update-card]
        [--check]

Reports the teacher-forced one-step PSNR; per-step PSNR of 32-step rollouts from each
world's first frame with the true actions, with shuffled actions (each world gets another
world's action sequence) and for the copy-last-frame baseline (PSNR = 10 log10(1 / MSE)
over the set, pixels in [0, 1]); the rollout mean for each step count K; the speed per
frame at batch 1 and per step at batch 8 for each K (the lowest median of three blocks of
steps, the Ks in turn: a busy stretch of a shared machine only adds time); object
permanence: in 128-step rollouts with the true actions, the share of the things that move
(the agent, the balls) still drawn with at least half their pixels after 32, 64 and 128
steps, and how far the drawn ones are from their true places. Writes a PNG strip (truth
above prediction, every second frame of one world). With --json the last stdout line is
one JSON object; --update-card stores it as the "eval" of the model card next to the
weights; --check exits 1 when an acceptance bar of the issue is missed. The 64 evaluation worlds
give the reported figures; ``--split validation`` evaluates on 64 other held-out worlds,
the ones to choose between training runs by (so the reported figures are not those a run
was picked by); ``--split first16`` on the 16 worlds of the earlier record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from services.worker.models.world.evaluation import (
    EVAL_SEEDS,
    FIRST16_SEEDS,
    LONG_HORIZON,
    VALIDATION_SEEDS,
    check,
    evaluate,
)
from services.worker.models.world.model import WEIGHTS, load
from windflow.common.malloc import keep_freed_memory

SPLITS = {"eval": EVAL_SEEDS, "validation": VALIDATION_SEEDS, "first16": FIRST16_SEEDS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--window", type=int, default=None, help="KV cache frames (default: trained)")
    p.add_argument("--png", type=Path, default=Path("/tmp/windflow_world_eval.png"))
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--update-card", action="store_true", help="write the figures to the card")
    p.add_argument("--check", action="store_true", help="exit 1 if a bar of the issue is missed")
    p.add_argument(
        "--split",
        choices=tuple(SPLITS),
        default="eval",
        help="the 64 evaluation worlds (the reported figures), 64 validation worlds (to "
        "choose between training runs by) or the 16 worlds of the earlier record",
    )
    args = p.parse_args(argv)
    if args.update_card and args.split != "eval":
        p.error("--update-card stores the evaluation split's figures only")

    keep_freed_memory()  # as the worker does
    model = load(args.weights, window=args.window, num_threads=1)
    result = evaluate(model, args.png, seeds=SPLITS[args.split])
    result["split"] = args.split
    result["machine"] = (
        f"{platform.machine()} {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, model threads 1, torch {torch.__version__}"
    )
    misses = check(result)
    result["bars_missed"] = misses
    true, shuf, copy = (
        result["rollout_psnr_true"],
        result["rollout_psnr_shuffled"],
        result["rollout_psnr_copy_last"],
    )
    print(
        f"model {model.info.version}, window {model.window}, {result['eval_worlds']} "
        f"held-out worlds ({args.split} split)"
    )
    print(f"one-step PSNR (K={result['steps']}): {result['one_step_psnr']:.2f} dB")
    print("step    true  shuffled  copy-last   (rollout PSNR, dB)")
    for t in [*range(0, len(true), 4), len(true) - 1]:
        print(f"{t + 1:4d} {true[t]:7.2f} {shuf[t]:9.2f} {copy[t]:10.2f}")
    print(
        f"mean {result['rollout_mean_true']:7.2f} {result['rollout_mean_shuffled']:9.2f} "
        f"{result['rollout_mean_copy_last']:10.2f}"
    )
    print(
        "a perfect simulator with the shuffled actions: mean "
        f"{result['rollout_mean_simulator_shuffled']:.2f} dB"
    )
    print("rollout mean by K:", result["rollout_mean_by_k"])
    print(
        f"{LONG_HORIZON}-step rollouts, by step: things that move still drawn",
        result["objects_kept"],
        "; their distance from the truth (px)",
        result["object_error_px"],
    )
    print("ms per frame, batch 1:", result["ms_per_frame_b1"])
    print("ms per step, batch 8: ", result["ms_per_step_b8"])
    print("bars missed:", misses or "none")
    print(f"strip: {args.png}")
    if args.update_card:
        card_path = args.weights.with_name("model_card.json")
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        card["version"] = model.info.version
        card["eval"] = result
        card["eval_command"] = "OMP_NUM_THREADS=1 .venv/bin/python tools/eval_world_model.py"
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"updated {card_path}")
    if args.json:
        print(json.dumps(result))
    return 1 if args.check and misses else 0


if __name__ == "__main__":
    sys.exit(main())
