"""Train the built-in world model on the repo's own arena; write weights and a model card.

    .venv/bin/python tools/train_world_model.py                # the committed recipe (CPU: ~20 min)
    .venv/bin/python tools/train_world_model.py --steps 200    # a quick smoke run

Everything follows from --seed: the worlds, the action policy, the batches, the noise and
the initial weights. Uses a GPU when one is present (the same recipe, faster).
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

from services.worker.models.world import sim
from services.worker.models.world.evaluation import evaluate
from services.worker.models.world.model import WEIGHTS, load, save_weights
from services.worker.models.world.net import NetConfig, WorldNet, block_ages, train_forward

# Times the sampler uses (1..4 steps), seen often in training next to uniform ones.
LADDER_TIMES = torch.tensor([1.0, 0.75, 2 / 3, 0.5, 1 / 3, 0.25])
# Gaussian noise (max sigma, in [-1, 1] units) on the context frames: at inference the
# model conditions on its own imperfect frames.
CONTEXT_NOISE = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worlds", type=int, default=256, help="training worlds (episodes)")
    p.add_argument("--length", type=int, default=200, help="frames per episode")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--frames", type=int, default=6, help="predicted frames per sequence")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for training")
    p.add_argument("--init", type=Path, default=None, help="start from these weights")
    p.add_argument(
        "--self-forcing-start", type=float, default=0.3, help="fraction of steps before it"
    )
    p.add_argument(
        "--self-forcing",
        type=float,
        default=0.0,
        help="after 30%% of the steps, the share of batches whose context frames are the "
        "model's own one-step predictions (it learns to correct its own errors)",
    )
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--card", type=Path, default=WEIGHTS.with_name("model_card.json"))
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    seeds = [args.seed * 1_000_003 + i for i in range(args.worlds)]
    frames, actions = sim.generate_episodes(seeds, args.length, policy_seed=args.seed)
    data_s = time.perf_counter() - t0
    n_frames = frames.shape[0] * frames.shape[1]
    print(f"data: {n_frames} frames from {args.worlds} worlds in {data_s:.1f} s", flush=True)
    frames_t = torch.from_numpy(frames)  # uint8 (N, L+1, H, W, 3)
    actions_t = torch.from_numpy(actions)

    cfg = NetConfig(dim=args.dim, depth=args.depth, window=args.window)
    net = WorldNet(cfg)
    if args.init is not None:
        start_from = load(args.init).net
        cfg = start_from.cfg
        net = WorldNet(cfg)
        net.load_state_dict(start_from.state_dict())
        for p in net.parameters():
            p.requires_grad_(True)
    net = net.to(device)
    ages = block_ages(args.frames, cfg.window, cfg.tokens).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, args.steps // 30)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    f = args.frames
    t_train = time.perf_counter()
    losses: list[float] = []
    for step in range(args.steps):
        world = torch.from_numpy(rng.integers(0, frames.shape[0], size=args.batch))
        start = torch.from_numpy(rng.integers(0, args.length - f + 1, size=args.batch))
        idx = start[:, None] + torch.arange(f + 1)[None]
        seq = frames_t[world[:, None], idx].float().div(127.5).sub(1.0)  # (B, F+1, H, W, 3)
        acts = actions_t[world[:, None], idx[:, :-1]]
        context, target = seq[:, :-1], seq[:, 1:]
        base = context
        if (
            args.self_forcing > 0
            and step >= args.self_forcing_start * args.steps
            and rng.random() < args.self_forcing
        ):
            # context frames 1..F-1 := the model's own one-step (K=1) predictions, rounded
            # to uint8 levels as at inference; the targets stay the truth
            with torch.no_grad():
                own = train_forward(
                    net,
                    context.to(device),
                    torch.randn(target.shape, generator=gen).to(device),
                    torch.ones(args.batch, f).to(device),
                    acts.to(device),
                    ages,
                    context.to(device),
                ).cpu()
            own = ((own.clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 127.5 - 1.0
            context = torch.cat([context[:, :1], own[:, :-1]], dim=1)
            base = context
        # the model conditions on its own (imperfect) frames at inference: noisy context
        sigma = torch.rand(args.batch, 1, 1, 1, 1, generator=gen) * CONTEXT_NOISE
        context = context + sigma * torch.randn(context.shape, generator=gen)
        pick = torch.rand(args.batch, f, generator=gen) < 0.5
        ladder = LADDER_TIMES[torch.randint(len(LADDER_TIMES), (args.batch, f), generator=gen)]
        t = torch.where(pick, ladder, torch.rand(args.batch, f, generator=gen))
        noise = torch.randn(target.shape, generator=gen)
        tt = t[..., None, None, None]
        x_t = (1 - tt) * target + tt * noise
        pred = train_forward(
            net,
            context.to(device),
            x_t.to(device),
            t.to(device),
            acts.to(device),
            ages,
            base.to(device),
        )
        # pixels that change (or that the base has wrong) carry the dynamics: weight them up
        moving = ((target - base).abs().amax(-1, keepdim=True) > 0.05).float()
        weight = (1.0 + 7.0 * moving).to(device)
        loss = (weight * (pred - target.to(device)) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == args.steps - 1:
            recent = float(np.mean(losses[-100:]))
            elapsed = time.perf_counter() - t_train
            print(f"step {step:5d}  loss {recent:.5f}  {elapsed:6.0f} s", flush=True)
    train_s = time.perf_counter() - t_train

    net = net.cpu().eval()
    save_weights(net, args.out, {"seed": str(args.seed)})
    card: dict[str, object] = {
        "model_id": "windflow-world",
        "weights": args.out.name,
        "weights_bytes": args.out.stat().st_size,
        "parameters": sum(p.numel() for p in net.parameters()),
        "config": cfg.to_dict(),
        "training": {
            "seed": args.seed,
            "worlds": args.worlds,
            "frames_per_episode": args.length,
            "data_frames": int(n_frames),
            "steps": args.steps,
            "batch": args.batch,
            "frames_per_sequence": f,
            "lr": args.lr,
            "context_noise_max": CONTEXT_NOISE,
            "self_forcing": args.self_forcing,
            "self_forcing_start": args.self_forcing_start,
            "init": None if args.init is None else args.init.name,
            "moving_pixel_weight": 8.0,
            "device": str(device),
            "threads": args.threads,
            "seconds": round(train_s, 1),
            "final_loss": round(float(np.mean(losses[-100:])), 6),
        },
        "machine": f"{platform.machine()}, {args.threads} threads, python "
        f"{platform.python_version()}, torch {torch.__version__}",
    }
    if not args.no_eval:
        model = load(args.out, num_threads=1)
        card["version"] = model.info.version
        card["eval"] = evaluate(model)
    args.card.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and {args.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
