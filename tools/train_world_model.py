"""Train the built-in world model on the repo's own arena; write weights and a model card.

    .venv/bin/python tools/train_world_model.py                # the committed recipe (CPU: ~19 min)
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
from typing import cast

import numpy as np
import torch

from services.worker.models.base import Control
from services.worker.models.framing import save_weights
from services.worker.models.world import sim
from services.worker.models.world.evaluation import evaluate
from services.worker.models.world.model import WEIGHTS, BuiltinWorldModel, load
from services.worker.models.world.net import NetConfig, WorldNet, block_ages, train_forward
from windflow.common.malloc import keep_freed_memory

# Times the sampler uses (1..4 steps), seen often in training next to uniform ones.
LADDER_TIMES = torch.tensor([1.0, 0.75, 2 / 3, 0.5, 1 / 3, 0.25])
# Gaussian noise (max sigma, in [-1, 1] units) on the context frames: at inference the
# model conditions on its own imperfect frames.
CONTEXT_NOISE = 0.05
# Loss weight of the pixels where the dynamics are decided (--weighted).
PIXEL_WEIGHT = 8.0


# The pixel decoder's switches (NetConfig fields of the same names): flag, choices,
# default, help.
DECODER_SWITCHES: tuple[tuple[str, tuple[int, ...], int, str], ...] = (
    (
        "--warp",
        (0, 1),
        1,
        "1 (the committed weights): a pixel may also copy the last frame's colour from where "
        "an object moving by one of the arena's motions would bring it (net.WARP_OFFSETS); "
        "0: palette colours only",
    ),
    (
        "--motion",
        (0, 1, 2),
        2,
        "2 (the committed weights): the pixel decoder sees how well each warp offset explains "
        "the last frame's motion around each pixel (block matching), and it biases the "
        "offsets' logits (needs --warp 1); 1: the features only; 0: neither",
    ),
    (
        "--collide",
        (0, 1),
        1,
        "1 (the committed weights): the pixel decoder sees, for each warp offset, whether "
        "the object it would bring (and the one at the pixel) would run into something "
        "moving by it, frame-wide, and it biases the offsets' logits by it (needs --warp 1); "
        "0: not",
    ),
    (
        "--action-local",
        (0, 1),
        0,
        "1: the pixel decoder also sees the action directly (a learned vector per action), "
        "not only through the transformer's tokens; 0: not",
    ),
    (
        "--rigid",
        (0, 1),
        1,
        "1 (the committed weights): frames are decoded object by object, each thing that "
        "moves moved whole by the one warp offset the decoder finds likeliest, in serving "
        "and in the self-forcing contexts (needs --warp 1); 0: each pixel's arg-max colour",
    ),
)


def _switch_names() -> list[str]:
    """The NetConfig fields the decoder switches set (argparse's names for the flags)."""
    return [flag[2:].replace("-", "_") for flag, *_ in DECODER_SWITCHES]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worlds", type=int, default=256, help="training worlds (episodes)")
    p.add_argument("--length", type=int, default=200, help="frames per episode")
    p.add_argument("--steps", type=int, default=2200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--frames", type=int, default=6, help="predicted frames per sequence")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--window", type=int, default=4)
    p.add_argument(
        "--local-frames",
        type=int,
        choices=(2, 3),
        default=2,
        help="frames the pixel decoder sees (3: also the one before the last two, which "
        "shows where a ball goes after a bounce's pause)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads for training (the committed weights: 2; another count gives other "
        "bits, as torch splits its reductions by thread)",
    )
    p.add_argument(
        "--local-dilation",
        type=int,
        default=0,
        help="dilation of a third, residual convolution in the pixel decoder (0: none)",
    )
    for flag, choices, default, text in DECODER_SWITCHES:
        p.add_argument(flag, type=int, choices=choices, default=default, help=text)
    p.add_argument(
        "--collide-gain",
        type=float,
        default=0.0,
        help="with --collide 1: the initial gain of its bias on the offsets' logits (an offset "
        "that would run an object into something starts that much less likely)",
    )
    p.add_argument("--init", type=Path, default=None, help="start from these weights")
    p.add_argument(
        "--self-forcing-start", type=float, default=0.3, help="fraction of steps before it"
    )
    p.add_argument(
        "--self-forcing",
        type=float,
        default=0.7,
        help="after --self-forcing-start of the steps, the share of batches whose context "
        "frames are the model's own one-step predictions (it learns to correct its errors)",
    )
    p.add_argument(
        "--rollout",
        action="store_true",
        help="self-forcing context from the model's free rollout (KV cache, K from the "
        "ladder) rather than its one-step predictions",
    )
    p.add_argument(
        "--smear",
        type=float,
        default=0.0,
        help="share of sequences whose context objects are smeared by 1-2 px",
    )
    p.add_argument(
        "--corrupt",
        type=float,
        default=0.1,
        help="the most of a context frame's pixels that take a neighbour's colour",
    )
    p.add_argument(
        "--denoise-own",
        type=float,
        default=0.5,
        help="in self-forcing batches, the share of frames noised (t < 1) from the model's "
        "own one-step prediction instead of the truth",
    )
    p.add_argument(
        "--weighted",
        choices=("edges", "moving"),
        default="edges",
        help="the pixels whose loss is weighted up: those within 2 px of an edge of the "
        "context or the target (where the dynamics are decided, whether or not anything "
        "moves) or only those that change",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.998,
        help="save an exponential moving average of the weights with this decay per step "
        "(0: the last weights)",
    )
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--card", type=Path, default=WEIGHTS.with_name("model_card.json"))
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    return p.parse_args(argv)


def corrupt_edges(frames: torch.Tensor, max_rate: float, gen: torch.Generator) -> torch.Tensor:
    """Frames (B, F, H, W, 3) where up to ``max_rate`` of the pixels (a rate drawn per
    sequence) take a neighbour's colour: inside a uniform region nothing changes, at an
    object's edge the edge moves by a pixel."""
    b = frames.shape[0]
    rate = torch.rand(b, 1, 1, 1, 1, generator=gen) * max_rate
    mask = torch.rand((*frames.shape[:-1], 1), generator=gen) < rate
    shift = [(1, 2), (-1, 2), (1, 3), (-1, 3)][int(torch.randint(4, (1,), generator=gen))]
    neighbour = torch.roll(frames, shifts=shift[0], dims=shift[1])
    return torch.where(mask, neighbour, frames)


def near_edges(idx: torch.Tensor, reach: int = 2) -> torch.Tensor:
    """Colour indices (..., H, W) -> float mask of the pixels within ``reach`` px of an
    edge (a pixel whose right or lower neighbour has another colour): where an object's
    next position is decided, whether or not it moves (a blocked agent, a bounce)."""
    shape = idx.shape
    flat = idx.reshape(-1, 1, *shape[-2:])
    edge = torch.zeros(flat.shape, dtype=torch.float32, device=idx.device)
    edge[..., :, :-1] += (flat[..., :, 1:] != flat[..., :, :-1]).float()
    edge[..., :-1, :] += (flat[..., 1:, :] != flat[..., :-1, :]).float()
    # an edge between columns c and c+1 marks columns c-reach+1 .. c+reach
    near = torch.nn.functional.max_pool2d(edge.clamp(max=1.0), 2 * reach, 1, padding=reach)
    return near[..., : shape[-2], : shape[-1]].reshape(shape)


def smear(frames: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """In ``share`` of the sequences, every context frame's objects smeared by 1-2 px in
    one direction (the frame united with a shifted copy of its non-background pixels): the
    error a rollout makes when an object's leading edge grows and its trailing edge stays.
    The targets stay the truth, so the model learns to clear trailing edges."""
    b = frames.shape[0]
    pick = torch.rand(b, generator=gen) < share
    if not bool(pick.any()):
        return frames
    step = int(torch.randint(1, 3, (1,), generator=gen))
    sign = 1 if bool(torch.rand(1, generator=gen) < 0.5) else -1
    dim = 2 + int(torch.randint(2, (1,), generator=gen))
    shifted = torch.roll(frames, shifts=sign * step, dims=dim)
    background = torch.from_numpy(sim.PALETTE[0]).float() / 127.5 - 1.0
    filled = (shifted - background).abs().amax(-1, keepdim=True) > 0.01
    smeared = torch.where(filled, shifted, frames)
    return torch.where(pick.view(b, 1, 1, 1, 1), smeared, frames)


def one_step_own(
    net: WorldNet,
    context: torch.Tensor,
    target: torch.Tensor,
    actions: torch.Tensor,
    ages: torch.Tensor,
    first_before: torch.Tensor,
    first_earlier: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """The model's K=1 predictions of every target frame from the true context frames
    (B, F, H, W, 3) in [-1, 1], as palette images."""
    device = ages.device
    b, f = target.shape[:2]
    with torch.no_grad():
        logits = train_forward(
            net,
            context.to(device),
            torch.randn(target.shape, generator=gen).to(device),
            torch.ones(b, f).to(device),
            actions.to(device),
            ages,
            context.to(device),
            first_before.to(device),
            first_earlier.to(device),
        )
    prev_idx = net.color_index(context.to(device).flatten(0, 1))
    idx = net.frame_of(logits.flatten(0, 1), prev_idx).view(b, f, *prev_idx.shape[1:])
    return cast(torch.Tensor, net.palette)[idx].cpu()


def self_rollout(
    roller: BuiltinWorldModel, seq: torch.Tensor, actions: torch.Tensor, steps: int, seed: int
) -> torch.Tensor:
    """Frames 2..F+1 of each sequence (B, F+2, H, W, 3) in [-1, 1] as the model imagines
    them from frames 0 and 1 under ``actions`` (B, F) -> (B, F, H, W, 3) in [-1, 1]."""
    u8 = ((seq + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    states = [roller.state_from(u8[i, 0], u8[i, 1], seed + i) for i in range(len(u8))]
    out = [
        roller.step(states, [Control(int(a)) for a in actions[:, t]], steps)
        for t in range(actions.shape[1])
    ]
    return torch.from_numpy(np.stack(out, axis=1)).float() / 127.5 - 1.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    seeds = [args.seed * 1_000_003 + i for i in range(args.worlds)]
    frames, actions = sim.generate_episodes(seeds, args.length, policy_seed=args.seed)
    data_s = time.perf_counter() - t0
    n_frames = frames.shape[0] * frames.shape[1]
    print(f"data: {n_frames} frames from {args.worlds} worlds in {data_s:.1f} s", flush=True)
    frames_t = torch.from_numpy(frames)  # uint8 (N, L+1, H, W, 3)
    actions_t = torch.from_numpy(actions)

    cfg = NetConfig(
        dim=args.dim,
        depth=args.depth,
        window=args.window,
        local_frames=args.local_frames,
        local_dilation=args.local_dilation,
        **{name: getattr(args, name) for name in _switch_names()},
    )
    net = WorldNet(cfg)
    if net.collide_gain is not None:
        with torch.no_grad():
            net.collide_gain.fill_(args.collide_gain)
    if args.init is not None:
        start_from = load(args.init).net
        cfg = start_from.cfg
        net = WorldNet(cfg)
        net.load_state_dict(start_from.state_dict())
        for p in net.parameters():
            p.requires_grad_(True)
    net = net.to(device)
    ages = block_ages(args.frames, cfg.window, cfg.tokens).to(device)
    # the inference code over the net being trained, for --rollout
    roller = BuiltinWorldModel(net, "training", num_threads=None, frozen=False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, args.steps // 30)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    f = args.frames
    params = [p for p in net.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params] if args.ema > 0 else []
    t_train = time.perf_counter()
    losses: list[float] = []
    for step in range(args.steps):
        world = torch.from_numpy(rng.integers(0, frames.shape[0], size=args.batch))
        # a sequence starts at frame >= 2: its first context frame has two true frames
        # before it
        start = torch.from_numpy(rng.integers(2, args.length - f + 1, size=args.batch))
        idx = start[:, None] + torch.arange(-2, f + 1)[None]
        seq = frames_t[world[:, None], idx].float().div(127.5).sub(1.0)  # (B, F+3, H, W, 3)
        acts = actions_t[world[:, None], idx[:, 2:-1]]
        first_earlier, first_before = seq[:, 0], seq[:, 1]
        context, target = seq[:, 2:-1], seq[:, 3:]
        # in half the sequences the frame before the first two is unknown, as at a
        # session's first step (its state repeats the older of its two frames)
        unknown = torch.rand(args.batch, 1, 1, 1, generator=gen) < 0.5
        first_earlier = torch.where(unknown, first_before, first_earlier)
        base = context
        own: torch.Tensor | None = None
        if (
            args.self_forcing > 0
            and step >= args.self_forcing_start * args.steps
            and rng.random() < args.self_forcing
        ):
            if args.rollout:
                # context frames 1..F-1 := the model's own free rollout from the first two
                # frames (the inference code: KV cache, K from the ladder), so it sees and
                # learns to undo what its errors grow into; the targets stay the truth
                k = int(rng.integers(1, 5))
                own = self_rollout(roller, seq[:, 1:], acts, k, args.seed * 1_000_000 + step)
            else:
                # context frames 1..F-1 := the model's own one-step (K=1) predictions
                # (palette images, as at inference); the targets stay the truth
                own = one_step_own(
                    net, context, target, acts, ages, first_before, first_earlier, gen
                )
            context = torch.cat([context[:, :1], own[:, :-1]], dim=1)
        if args.smear > 0:
            context = smear(context, args.smear, gen)
        if args.corrupt > 0:
            # the context's object edges, a pixel off here and there (as in the model's own
            # frames): the pixel decoder learns to restore shapes rather than grow errors
            context = corrupt_edges(context, args.corrupt, gen)
        base = context
        # the model conditions on its own (imperfect) frames at inference: noisy context
        sigma = torch.rand(args.batch, 1, 1, 1, 1, generator=gen) * CONTEXT_NOISE
        context = context + sigma * torch.randn(context.shape, generator=gen)
        pick = torch.rand(args.batch, f, generator=gen) < 0.5
        ladder = LADDER_TIMES[torch.randint(len(LADDER_TIMES), (args.batch, f), generator=gen)]
        t = torch.where(pick, ladder, torch.rand(args.batch, f, generator=gen))
        noise = torch.randn(target.shape, generator=gen)
        tt = t[..., None, None, None]
        x_0 = target
        if own is not None:
            # some frames are noised from the model's own first guess instead of the truth:
            # a later denoising pass learns to correct the first (more steps, better frames)
            mine = torch.rand(args.batch, f, 1, 1, 1, generator=gen) < args.denoise_own
            x_0 = torch.where(mine & (tt < 1.0), own, target)
        x_t = (1 - tt) * x_0 + tt * noise
        logits = train_forward(
            net,
            context.to(device),
            x_t.to(device),
            t.to(device),
            acts.to(device),
            ages,
            base.to(device),
            first_before.to(device),
            first_earlier.to(device),
        )
        # per-pixel cross-entropy over the palette; the pixels where the dynamics are
        # decided are weighted up. Only those that change (or that the base has wrong), as
        # first done, biases the arg-max: it paints a change wherever one is 1/8 as likely
        # as none, and objects swell in a rollout. Around every edge, a blocked agent or a
        # bounce weighs as much as a move.
        target_idx = net.color_index(target.to(device))
        base_idx = net.color_index(base.to(device))
        decided = (target_idx != base_idx).float()
        if args.weighted == "edges":
            near = torch.maximum(near_edges(base_idx), near_edges(target_idx))
            decided = torch.maximum(decided, near)
        weight = 1.0 + (PIXEL_WEIGHT - 1.0) * decided
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), target_idx.flatten(0, 1), reduction="none"
        )
        loss = (weight.flatten(0, 1) * ce).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if ema:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - args.ema)
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == args.steps - 1:
            recent = float(np.mean(losses[-100:]))
            elapsed = time.perf_counter() - t_train
            print(f"step {step:5d}  loss {recent:.5f}  {elapsed:6.0f} s", flush=True)
    train_s = time.perf_counter() - t_train

    if ema:
        with torch.no_grad():
            for p, average in zip(params, ema, strict=True):
                p.copy_(average)
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
            "denoise_own": args.denoise_own,
            "corrupt": args.corrupt,
            "smear": args.smear,
            "rollout": args.rollout,
            "init": None if args.init is None else args.init.name,
            "weighted_pixels": args.weighted,
            "ema": args.ema,
            "collide_gain": args.collide_gain,
            "pixel_weight": PIXEL_WEIGHT,
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
