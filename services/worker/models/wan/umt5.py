"""The umT5 text encoder (the encoder half of umT5-XXL, as Wan2.1 conditions on it).

Architecture: a token embedding, then ``num_layers`` pre-norm blocks of bidirectional
self-attention and a gated-GELU feed-forward, then a final norm. As in T5 the norms are
RMS norms with a weight and no bias, the linear layers have no bias, attention logits are
not scaled by 1/sqrt(head_dim), and positions enter only as a learned relative-position
bias added to the logits (bucketed distances, ``num_buckets`` buckets, half per
direction). Unlike T5, umT5 gives every block its own relative-position table. No dropout.

Parameter names are those of Wan's released ``models_t5_umt5-xxl-enc-bf16.pth``
(``token_embedding``, ``blocks.N.{norm1,attn.{q,k,v,o},norm2,ffn.{gate.0,fc1,fc2},
pos_embedding.embedding}``, ``norm``), so that file loads as it is; ``umt5_keys`` writes
the expected names and shapes independently of the modules and ``load_umt5`` checks a
file against it strictly.

``PromptEncoder`` is what the pipeline uses: tokenizer + encoder + an LRU cache of encoded
prompts keyed by the sha256 of the text. ``encode`` returns the real tokens' states only
(tokens, dim) float32, no padding, like the precomputed embeddings of ``text.py``. Encoding
one prompt unpadded equals Wan's padded-and-masked encoding on the real tokens (a masked
key gets zero attention weight and the position bias depends on distances only).

Tokenizers: ``FileTokenizer`` reads umT5's ``tokenizer.json`` from a local path with the
``tokenizers`` package (nothing is downloaded); ``ByteTokenizer`` is a deterministic
built-in byte-level one (UTF-8 bytes + 3, then EOS) for the tiny random-weight config.
Both clean the text as Wan does minus ``ftfy``: HTML entities unescaped (twice),
whitespace runs collapsed to one space, ends stripped; both truncate to ``max_tokens``
with the EOS kept last.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.models.wan.keys import Shapes
from services.worker.models.wan.loading import check_state_dict, load_into, read_tensors, unwrap
from windflow.errors import CheckpointError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's special tokens
BYTE_OFFSET = 3  # ByteTokenizer: byte b is token b + 3


@dataclass(frozen=True, slots=True)
class UMT5Config:
    """Sizes of a umT5 encoder."""

    vocab: int
    dim: int
    dim_attn: int  # width of q/k/v (num_heads * head_dim)
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int  # relative-position buckets (half for each direction)
    max_distance: int = 128  # distances from here on share the last bucket
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by {self.num_heads}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be even and >= 4, got {self.num_buckets}")


def umt5_xxl() -> UMT5Config:
    """umT5-XXL's encoder (5.7B parameters), Wan2.1's text encoder."""
    return UMT5Config(
        vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
        num_buckets=32,
    )  # fmt: skip


def umt5_tiny(dim: int = 48) -> UMT5Config:
    """The same architecture at toy size; ``dim`` is the tiny DiT's ``text_dim``. The
    vocabulary is ``ByteTokenizer``'s (3 special tokens + 256 bytes)."""
    return UMT5Config(
        vocab=BYTE_OFFSET + 256, dim=dim, dim_attn=dim, dim_ffn=2 * dim, num_heads=4,
        num_layers=2, num_buckets=32,
    )  # fmt: skip


def umt5_keys(cfg: UMT5Config) -> Shapes:
    """The state-dict names and shapes of Wan's umT5 encoder file, from its naming."""
    d, a, h = cfg.dim, cfg.dim_attn, cfg.dim_ffn
    keys: Shapes = {"token_embedding.weight": (cfg.vocab, d)}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}"
        keys[f"{p}.norm1.weight"] = (d,)
        for proj in ("q", "k", "v"):
            keys[f"{p}.attn.{proj}.weight"] = (a, d)
        keys[f"{p}.attn.o.weight"] = (d, a)
        keys[f"{p}.norm2.weight"] = (d,)
        keys[f"{p}.ffn.gate.0.weight"] = (h, d)
        keys[f"{p}.ffn.fc1.weight"] = (h, d)
        keys[f"{p}.ffn.fc2.weight"] = (d, h)
        keys[f"{p}.pos_embedding.embedding.weight"] = (cfg.num_buckets, cfg.num_heads)
    keys["norm.weight"] = (d,)
    return keys


# -- modules -------------------------------------------------------------------------


def relative_position_bucket(
    rel: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bidirectional T5 buckets of key - query distances: half the buckets per sign; in
    each half, the first quarter of ``num_buckets`` are exact distances and the rest grow
    logarithmically up to ``max_distance``, beyond which all share the last bucket."""
    half = num_buckets // 2
    exact = half // 2
    side = (rel > 0).long() * half
    dist = rel.abs()
    scaled = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (scaled * (half - exact)).long()).clamp(max=half - 1)
    return side + torch.where(dist < exact, dist, far)


class RelativeBias(nn.Module):
    """Per-head additive attention bias from bucketed relative positions."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """(1, heads, length, length)."""
        pos = torch.arange(length, device=self.embedding.weight.device)
        rel = pos.view(1, -1) - pos.view(-1, 1)  # key - query
        buckets = relative_position_bucket(rel, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Norm(nn.Module):
    """RMS norm with a weight, no mean subtraction and no bias, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim); bias (B or 1, heads, L, L) added to the unscaled logits."""
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


class GatedFFN(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        return x.clamp(-limit, limit)
    return x


class EncoderBlock(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5Norm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5Norm(cfg.dim, cfg.eps)
        self.ffn = GatedFFN(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativeBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(x.shape[1]).float()
        if key_mask is not None:  # (B, L): 0 for padding keys
            hidden = key_mask[:, None, None, :] == 0
            bias = bias.masked_fill(hidden, torch.finfo(x.dtype).min)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5's encoder: token ids (B, L) to hidden states (B, L, dim)."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([EncoderBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm = T5Norm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


def init_random(model: UMT5Encoder, seed: int) -> UMT5Encoder:
    """Seeded random weights from a private generator (the global RNG is not touched):
    unit-variance token embeddings, fan-in-scaled linears, ones for the norms, small
    position biases."""
    gen = torch.Generator().manual_seed(seed)
    heads, buckets = model.cfg.num_heads, model.cfg.num_buckets
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (
                name.endswith("norm1.weight")
                or name.endswith("norm2.weight")
                or name == "norm.weight"
            ):
                param.fill_(1.0)
                continue
            if name == "token_embedding.weight":
                std = 1.0
            elif name.endswith("pos_embedding.embedding.weight"):
                std = (2 * buckets * heads) ** -0.5
            else:  # linear (out, in)
                std = param.shape[1] ** -0.5
            value = torch.randn(tuple(param.shape), generator=gen) * std
            param.copy_(value.to(param.dtype))
    return model


def random_umt5(
    cfg: UMT5Config,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UMT5Encoder:
    """An encoder with seeded random weights (built on ``meta``: no default init runs)."""
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    model = model.to_empty(device=device).to(dtype)
    return init_random(model, seed).eval().requires_grad_(False)


def load_umt5(
    path: str | Path,
    cfg: UMT5Config | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> UMT5Encoder:
    """The encoder from a local ``.pth``/``.safetensors`` (default config: umT5-XXL).

    Strict: a missing, unexpected or mis-shaped key raises ``CheckpointError`` naming it.
    Parameters are allocated directly in ``dtype`` on ``device``.
    """
    cfg = cfg or umt5_xxl()
    what = f"umT5 checkpoint {path}"
    expected = umt5_keys(cfg)
    sd = unwrap(read_tensors(path))
    check_state_dict(sd, expected, what)
    with torch.device("meta"):
        model = UMT5Encoder(cfg).to(dtype)
    model = model.to_empty(device=device)
    load_into(model, sd, expected, what)
    return model.eval().requires_grad_(False)


# -- tokenizers ----------------------------------------------------------------------


_WS = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning without ``ftfy``: HTML unescaped twice, whitespace runs to one
    space, ends stripped."""
    return _WS.sub(" ", html.unescape(html.unescape(text))).strip()


class Tokenizer(Protocol):
    max_tokens: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (cleaned), EOS last, at most ``max_tokens``."""
        ...


class ByteTokenizer:
    """UTF-8 bytes + 3 (after T5's pad/eos/unk), truncated so that EOS fits."""

    vocab_size = BYTE_OFFSET + 256

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1 (the EOS)")
        self.max_tokens = max_tokens

    def encode(self, text: str) -> list[int]:
        data = clean_prompt(text).encode("utf-8")[: self.max_tokens - 1]
        return [b + BYTE_OFFSET for b in data] + [EOS_ID]


def find_tokenizer_file(path: str | Path) -> Path:
    """``path`` itself, or the ``tokenizer.json`` in it (or in its ``google/umt5-xxl``,
    the layout of a Wan2.1 model directory)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (p / "tokenizer.json", p / "google" / "umt5-xxl" / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"no tokenizer.json at {p} (nor in {p}/google/umt5-xxl)")


class FileTokenizer:
    """umT5's tokenizer from its ``tokenizer.json`` (``tokenizers`` package, local file).

    The file's post-processor appends EOS; truncation keeps room for it."""

    def __init__(self, path: str | Path, max_tokens: int) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = find_tokenizer_file(path)
        try:
            tok = HFTokenizer.from_file(str(self.path))
        except Exception as exc:
            raise CheckpointError(f"{self.path} is not a tokenizer.json: {exc}") from exc
        tok.no_padding()
        tok.enable_truncation(max_length=max_tokens)
        self._tok = tok
        self.max_tokens = max_tokens
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(clean_prompt(text), add_special_tokens=True).ids)


# -- prompt encoder with a cache -----------------------------------------------------


def prompt_key(text: str) -> str:
    """The cache key of a prompt: sha256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PromptEncoder:
    """Tokenizer + umT5 encoder + an LRU cache of encoded prompts (by ``prompt_key``).

    ``encode`` returns (tokens, dim) float32 on the CPU; a cached prompt is never encoded
    again. ``hits``/``misses`` count cache look-ups. ``name`` identifies the weights (it
    goes into the model's version)."""

    def __init__(
        self, model: UMT5Encoder, tokenizer: Tokenizer, name: str, cache_size: int = 64
    ) -> None:
        if tokenizer.vocab_size > model.cfg.vocab:
            raise CheckpointError(
                f"tokenizer has {tokenizer.vocab_size} tokens, more than the encoder's "
                f"vocabulary of {model.cfg.vocab}"
            )
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.cache_size = cache_size
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def dim(self) -> int:
        return self.model.cfg.dim

    @property
    def max_tokens(self) -> int:
        return self.tokenizer.max_tokens

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode(self, text: str) -> torch.Tensor:
        key = prompt_key(text)
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return cached
        self.misses += 1
        out = self._encode(text)
        self._cache[key] = out
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._cache)

    @torch.inference_mode()
    def _encode(self, text: str) -> torch.Tensor:
        ids = self.tokenize(text)
        dev = self.model.token_embedding.weight.device
        states = self.model(torch.tensor([ids], dtype=torch.long, device=dev))
        return states[0].float().cpu()
