"""Train the built-in restyle model on the repo's own synthetic videos; write weights and a
model card.

    .venv/bin/python tools/train_restyle.py               # the committed recipe (CPU: ~6 min)
    .venv/bin/python tools/train_restyle.py --steps 100   # a quick smoke run

Everything follows from --seed: the training clips, the batches, the crops and the
initial weights. Nothing is downloaded: the clips come from ``restyle.data`` (the world
model's arena, moving shapes, panning fractal textures, test patterns, with camera noise)
and the
targets from ``restyle.styles`` (the exact transforms and temporal filter).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from services.worker.models.framing import save_weights
from services.worker.models.restyle import data
from services.worker.models.restyle.evaluation import (
    EVAL_LENGTH,
    EVAL_SEED,
    TEST_SEED,
    evaluate,
    quality,
)
from services.worker.models.restyle.model import MODEL_CARD, WEIGHTS, from_net, load
from services.worker.models.restyle.net import RestyleConfig, RestyleNet
from services.worker.models.restyle.styles import STYLES, blend, stylize
from windflow.common.malloc import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 200  # clips generated per data seed
FAST_LR = 10.0  # the learning rate of the skip and the gate, relative to the weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=3000, help="training clips (generated)")
    p.add_argument("--length", type=int, default=3, help="frames per training clip (unrolled)")
    p.add_argument("--steps", type=int, default=3600, help="optimizer steps")
    p.add_argument("--batch", type=int, default=12, help="clips per step (every style sees each)")
    p.add_argument("--crop", type=int, default=32, help="training crop size (pixels)")
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--hidden", type=int, default=32, help="channels of each hidden layer")
    p.add_argument("--aux", type=float, default=0.5, help="weight of the fresh-frame loss")
    p.add_argument("--cut", type=float, default=0.25, help="clips that start after a cut")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for training")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--card", type=Path, default=None, help="model card (default: next to --out)")
    return p.parse_args(argv)


def shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (the card is committed)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def data_seed(seed: int, chunk: int) -> int:
    """The seed of training chunk ``chunk``: never the evaluation's or the tests'."""
    value = 1_000_003 * (seed + 1) + chunk
    if value in (EVAL_SEED, TEST_SEED):
        raise ValueError(f"--seed {seed} would train on held-out clips")
    return value


def make_pool(seed: int, n: int, length: int) -> np.ndarray:
    chunks = []
    for k in range(-(-n // CHUNK)):
        chunks.append(data.clips(data_seed(seed, k), min(CHUNK, n - k * CHUNK), length))
    return np.concatenate(chunks)


def batch_of(pool: np.ndarray, rng: np.random.Generator, batch: int, crop: int) -> torch.Tensor:
    """Random clips, each cropped, flipped and turned at random -> (N, T, 3, crop, crop)."""
    idx = rng.integers(0, pool.shape[0], size=batch)
    size = pool.shape[2]
    out = np.empty((batch, pool.shape[1], crop, crop, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        y, x = rng.integers(0, size - crop + 1, size=2)
        clip = pool[i, :, y : y + crop, x : x + crop]
        if rng.random() < 0.5:
            clip = clip[:, :, ::-1]
        clip = np.rot90(clip, int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:
            clip = clip[::-1]  # played backwards
        out[j] = clip
    return torch.from_numpy(out).permute(0, 1, 4, 2, 3).float() / 255.0


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Rounded to uint8 levels, gradients straight through (what a session keeps)."""
    return x + ((x * 255.0).round() / 255.0 - x).detach()


def targets(
    x: torch.Tensor, rng: np.random.Generator, cut: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For clips x (N, T, 3, h, w): the styled frames (N, T, S, 3, h, w), the reference
    outputs (likewise) and the previous output each clip starts from (N, S, 3, h, w): the
    styled first frame (a stream under way), another clip's (a cut) or black (a start)."""
    n, t = x.shape[:2]
    flat = x.reshape(n * t, *x.shape[2:])
    fresh = torch.stack([stylize(flat, s) for s in range(len(STYLES))], 1)
    fresh = fresh.view(n, t, len(STYLES), *x.shape[2:])
    prev = (fresh[:, 0] * 255.0).round() / 255.0
    r = rng.random(n)
    others = torch.from_numpy(np.roll(np.arange(n), 1))
    prev = torch.where(torch.from_numpy(r < cut).view(-1, 1, 1, 1, 1), prev[others], prev)
    prev = torch.where(torch.from_numpy(r > 1 - 0.05).view(-1, 1, 1, 1, 1), 0.0, prev)
    start = prev
    outs = []
    for k in range(t):
        prev = (
            blend(fresh[:, k].flatten(0, 1), prev.flatten(0, 1)).view_as(prev) * 255.0
        ).round() / 255.0
        outs.append(prev)
    return fresh, torch.stack(outs, 1), start


def unroll(
    net: RestyleNet, x: torch.Tensor, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The net over clips x (N, T, 3, h, w) from ``start``: its fresh frames and outputs
    (N, T, S, 3, h, w), each output fed back rounded."""
    n, t = x.shape[:2]
    fresh = net.fresh(x.reshape(n * t, *x.shape[2:])).view(n, t, net.cfg.styles, *x.shape[2:])
    prev, outs = start, []
    for k in range(t):
        out = net.blend(fresh[:, k], prev)
        outs.append(out)
        prev = quantize(out)
    return fresh, torch.stack(outs, 1)


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 30)
    if step < warm:
        return lr * (step + 1) / warm
    return 1e-4 + 0.5 * (lr - 1e-4) * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    keep_freed_memory()
    rng = np.random.default_rng([args.seed, 0x7EA1])
    t_start = time.perf_counter()

    pool = make_pool(args.seed, args.clips, args.length)
    print(
        f"data: {pool.shape[0]} clips x {pool.shape[1]} frames ({pool.nbytes / 1e6:.0f} MB) in "
        f"{time.perf_counter() - t_start:.1f}s",
        flush=True,
    )
    check_x = batch_of(pool, np.random.default_rng([args.seed, 0xC4EC]), 32, args.crop)
    check_t = targets(check_x, np.random.default_rng([args.seed, 0xC4ED]), args.cut)

    cfg = RestyleConfig(hidden=args.hidden)
    net = RestyleNet(cfg)
    untrained, _ = quality(from_net(net), data.clips(EVAL_SEED, 16, EVAL_LENGTH))
    print(f"untrained net, held-out PSNR dB: {untrained}", flush=True)
    # the linear skip (0 to a colour matrix) and the gate (two numbers per style) have far
    # to go for Adam's steps of about the learning rate: they take larger ones
    fast = [p for name, p in net.named_parameters() if name in ("skip", "gate")]
    slow = [p for name, p in net.named_parameters() if name not in ("skip", "gate")]
    opt = torch.optim.Adam(
        [{"params": slow, "scale": 1.0}, {"params": fast, "scale": FAST_LR}], lr=args.lr
    )
    t_train = time.perf_counter()
    loss_avg = float("nan")
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr) * group["scale"]
        x = batch_of(pool, rng, args.batch, args.crop)
        with torch.no_grad():
            fresh_t, out_t, start = targets(x, rng, args.cut)
        fresh, out = unroll(net, x, start)
        loss = torch.mean((out - out_t) ** 2) + args.aux * torch.mean((fresh - fresh_t) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        loss_avg = value if step == 0 else 0.98 * loss_avg + 0.02 * value
        if step % 100 == 0 or step == args.steps - 1:
            with torch.no_grad():
                _, out = unroll(net, check_x, check_t[2])
                mse = ((out - check_t[1]) ** 2).mean(dim=(0, 1, 3, 4, 5))
            per_style = " ".join(
                f"{name} {10 * math.log10(1 / max(float(m), 1e-12)):.1f}"
                for name, m in zip(STYLES, mse, strict=True)
            )
            elapsed = time.perf_counter() - t_train
            print(
                f"step {step:5d}  loss {loss_avg:.5f}  lr {lr_at(step, args.steps, args.lr):.2e}"
                f"  check PSNR dB: {per_style}  ({elapsed:.0f}s)",
                flush=True,
            )
    train_s = time.perf_counter() - t_train
    step_ms = 1000.0 * train_s / max(1, args.steps)

    print("evaluating on held-out clips (the serving path, one thread) ...", flush=True)
    result = evaluate(from_net(net))
    meta = {"seed": str(args.seed), "recipe": json.dumps(vars(args), default=str)}
    save_weights(net, args.out, meta)
    model = load(args.out)
    if model.info.version != result["model_version"]:
        raise SystemExit("the saved weights do not load as the evaluated model version")
    total_s = time.perf_counter() - t_start
    card = {
        "model_id": model.info.model_id,
        "version": model.info.version,
        "weights": args.out.name,
        "weights_bytes": args.out.stat().st_size,
        "parameters": sum(p.numel() for p in net.parameters()),
        "config": cfg.to_dict(),
        "styles": list(STYLES),
        "input_frame": {"width": cfg.width, "height": cfg.height, "fps": 24.0, "queue": 2},
        "training": {
            **{k: (shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "data_seeds": [data_seed(args.seed, k) for k in range(-(-args.clips // CHUNK))],
            "final_loss": round(loss_avg, 6),
            "train_step_ms": round(step_ms, 1),
            "train_seconds": round(train_s, 1),
            "total_seconds": round(total_s, 1),
        },
        "machine": (
            f"{platform.machine()}, {args.threads} training threads, python "
            f"{platform.python_version()}, torch {torch.__version__}"
        ),
        "command": ".venv/bin/python tools/train_restyle.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "eval": result,
        # the same evaluation (16 of its clips) of the net before training
        "eval_untrained_psnr_db": untrained,
    }
    card_path = args.card or args.out.parent / MODEL_CARD.name
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    psnr = " ".join(f"{k} {v:.2f}" for k, v in result["psnr_db"].items())
    print(
        f"done: {model.info.model_id} {model.info.version}, {args.steps} steps in {train_s:.0f}s "
        f"({step_ms:.0f} ms/step, {total_s:.0f}s in all), loss {loss_avg:.5f}; held-out PSNR dB: "
        f"{psnr}; serving {result['ms_per_frame_b1']} ms/frame alone, "
        f"{result['ms_per_frame_b8']} ms/frame in a batch of 8; weights {args.out} "
        f"({card['weights_bytes']} bytes), card {card_path}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
