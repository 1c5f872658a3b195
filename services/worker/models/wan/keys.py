"""The expected state-dict keys and shapes of the original Wan checkpoints.

Written from Wan's published naming, independently of the modules in this package, so
that comparing the two (``key_parity``) proves the modules load real checkpoints as-is.
"""

from __future__ import annotations

import math

from services.worker.models.wan.config import ActionConfig, DiTConfig, VAEConfig

Shapes = dict[str, tuple[int, ...]]


def _linear(prefix: str, cout: int, cin: int, bias: bool = True) -> Shapes:
    out: Shapes = {f"{prefix}.weight": (cout, cin)}
    if bias:
        out[f"{prefix}.bias"] = (cout,)
    return out


def _action_keys(prefix: str, a: ActionConfig, dim: int) -> Shapes:
    group = a.window * a.vae_time_compression
    c, kd, hid = a.mouse_hidden_dim, a.keyboard_hidden_dim, a.hidden_size
    keys: Shapes = {}
    keys |= _linear(f"{prefix}.keyboard_embed.0", hid, a.keyboard_dim)
    keys |= _linear(f"{prefix}.keyboard_embed.2", hid, hid)
    keys |= _linear(f"{prefix}.mouse_mlp.0", c, a.mouse_dim * group + dim)
    keys |= _linear(f"{prefix}.mouse_mlp.2", c, c)
    keys |= {f"{prefix}.mouse_mlp.3.weight": (c,), f"{prefix}.mouse_mlp.3.bias": (c,)}
    keys |= _linear(f"{prefix}.t_qkv", 3 * c, c, a.qkv_bias)
    keys |= {
        f"{prefix}.img_attn_q_norm.weight": (c // a.heads,),
        f"{prefix}.img_attn_k_norm.weight": (c // a.heads,),
    }
    keys |= _linear(f"{prefix}.proj_mouse", dim, c, a.qkv_bias)
    keys |= {
        f"{prefix}.key_attn_q_norm.weight": (kd // a.heads,),
        f"{prefix}.key_attn_k_norm.weight": (kd // a.heads,),
    }
    keys |= _linear(f"{prefix}.mouse_attn_q", kd, dim, a.qkv_bias)
    keys |= _linear(f"{prefix}.keyboard_attn_kv", 2 * kd, hid * group, a.qkv_bias)
    keys |= _linear(f"{prefix}.proj_keyboard", dim, kd, a.qkv_bias)
    return keys


def dit_keys(cfg: DiTConfig) -> Shapes:
    d = cfg.dim
    keys: Shapes = {
        "patch_embedding.weight": (d, cfg.in_dim, *cfg.patch_size),
        "patch_embedding.bias": (d,),
    }
    keys |= _linear("text_embedding.0", d, cfg.text_dim) | _linear("text_embedding.2", d, d)
    keys |= _linear("time_embedding.0", d, cfg.freq_dim) | _linear("time_embedding.2", d, d)
    keys |= _linear("time_projection.1", 6 * d, d)
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                keys |= _linear(f"{b}.{attn}.{proj}", d, d)
            keys[f"{b}.{attn}.norm_q.weight"] = (d,)
            keys[f"{b}.{attn}.norm_k.weight"] = (d,)
        keys[f"{b}.norm3.weight"] = (d,)
        keys[f"{b}.norm3.bias"] = (d,)
        keys |= _linear(f"{b}.ffn.0", cfg.ffn_dim, d) | _linear(f"{b}.ffn.2", d, cfg.ffn_dim)
        keys[f"{b}.modulation"] = (1, 6, d)
        if cfg.action is not None and i in cfg.action.blocks:
            keys |= _action_keys(f"{b}.action_model", cfg.action, d)
    keys |= _linear("head.head", cfg.out_dim * math.prod(cfg.patch_size), d)
    keys["head.modulation"] = (1, 2, d)
    return keys


def _conv(prefix: str, cout: int, cin: int, kernel: tuple[int, ...]) -> Shapes:
    return {f"{prefix}.weight": (cout, cin, *kernel), f"{prefix}.bias": (cout,)}


def _resblock(prefix: str, cin: int, cout: int) -> Shapes:
    keys: Shapes = {f"{prefix}.residual.0.gamma": (cin, 1, 1, 1)}
    keys |= _conv(f"{prefix}.residual.2", cout, cin, (3, 3, 3))
    keys[f"{prefix}.residual.3.gamma"] = (cout, 1, 1, 1)
    keys |= _conv(f"{prefix}.residual.6", cout, cout, (3, 3, 3))
    if cin != cout:
        keys |= _conv(f"{prefix}.shortcut", cout, cin, (1, 1, 1))
    return keys


def _attnblock(prefix: str, c: int) -> Shapes:
    keys: Shapes = {f"{prefix}.norm.gamma": (c, 1, 1)}
    keys |= _conv(f"{prefix}.to_qkv", 3 * c, c, (1, 1))
    keys |= _conv(f"{prefix}.proj", c, c, (1, 1))
    return keys


def _middle(prefix: str, c: int) -> Shapes:
    return (
        _resblock(f"{prefix}.middle.0", c, c)
        | _attnblock(f"{prefix}.middle.1", c)
        | _resblock(f"{prefix}.middle.2", c, c)
    )


def vae_decoder_keys(cfg: VAEConfig) -> Shapes:
    """``conv2`` and ``decoder.*``: what the streaming decoder holds."""
    mult = cfg.dim_mult
    dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
    up_t = tuple(reversed(cfg.temporal_downsample))
    keys = _conv("conv2", cfg.z_dim, cfg.z_dim, (1, 1, 1))
    keys |= _conv("decoder.conv1", dims[0], cfg.z_dim, (3, 3, 3))
    keys |= _middle("decoder", dims[0])
    n = 0
    for i in range(len(mult)):
        cin, cout = dims[i], dims[i + 1]
        if i > 0:
            cin //= 2
        for _ in range(cfg.num_res_blocks + 1):
            keys |= _resblock(f"decoder.upsamples.{n}", cin, cout)
            cin = cout
            n += 1
        if i != len(mult) - 1:
            keys |= _conv(f"decoder.upsamples.{n}.resample.1", cout // 2, cout, (3, 3))
            if up_t[i]:
                keys |= _conv(f"decoder.upsamples.{n}.time_conv", 2 * cout, cout, (3, 1, 1))
            n += 1
    keys["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    keys |= _conv("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return keys


def vae_encoder_keys(cfg: VAEConfig) -> Shapes:
    """``conv1`` and ``encoder.*``: what ``WanVAEEncoder`` holds (the decoder load drops them)."""
    dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
    z2 = 2 * cfg.z_dim
    keys = _conv("conv1", z2, z2, (1, 1, 1))
    keys |= _conv("encoder.conv1", dims[0], 3, (3, 3, 3))
    n = 0
    for i in range(len(cfg.dim_mult)):
        cin, cout = dims[i], dims[i + 1]
        for _ in range(cfg.num_res_blocks):
            keys |= _resblock(f"encoder.downsamples.{n}", cin, cout)
            cin = cout
            n += 1
        if i != len(cfg.dim_mult) - 1:
            keys |= _conv(f"encoder.downsamples.{n}.resample.1", cout, cout, (3, 3))
            if cfg.temporal_downsample[i]:
                keys |= _conv(f"encoder.downsamples.{n}.time_conv", cout, cout, (3, 1, 1))
            n += 1
    keys |= _middle("encoder", dims[-1])
    keys["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    keys |= _conv("encoder.head.2", z2, dims[-1], (3, 3, 3))
    return keys


def vae_keys(cfg: VAEConfig) -> Shapes:
    return vae_encoder_keys(cfg) | vae_decoder_keys(cfg)
