"""The umT5 text encoder: Wan's key naming, strict loading, tokenizers, encoding, cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.worker.models.wan.umt5 import (
    EOS_ID,
    ByteTokenizer,
    FileTokenizer,
    PromptEncoder,
    UMT5Config,
    UMT5Encoder,
    clean_prompt,
    load_umt5,
    prompt_key,
    random_umt5,
    relative_position_bucket,
    umt5_keys,
    umt5_tiny,
    umt5_xxl,
)
from windflow.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = umt5_tiny()


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_model() -> UMT5Encoder:
    return random_umt5(TINY, seed=0)


def test_tiny_module_has_wan_key_names(tiny_model) -> None:
    assert TINY.dim == 48  # the tiny DiT's text_dim
    assert _shapes(tiny_model) == umt5_keys(TINY)


def test_xxl_module_has_wan_key_names() -> None:
    cfg = umt5_xxl()
    with torch.device("meta"):  # 5.7B parameters, never allocated
        model = UMT5Encoder(cfg)
    keys = umt5_keys(cfg)
    assert _shapes(model) == keys
    assert len(keys) == 2 + 24 * 10  # embedding, final norm; 10 per block
    assert 5.6e9 < sum(math.prod(s) for s in keys.values()) < 5.8e9
    assert keys["token_embedding.weight"] == (256384, 4096)
    assert keys["blocks.0.attn.q.weight"] == (4096, 4096)
    assert keys["blocks.23.attn.o.weight"] == (4096, 4096)
    assert keys["blocks.5.ffn.gate.0.weight"] == (10240, 4096)
    assert keys["blocks.5.ffn.fc1.weight"] == (10240, 4096)
    assert keys["blocks.5.ffn.fc2.weight"] == (4096, 10240)
    assert keys["blocks.7.pos_embedding.embedding.weight"] == (32, 64)  # one per block
    assert keys["norm.weight"] == (4096,)
    assert "pos_embedding.embedding.weight" not in keys  # no shared table (unlike T5)
    assert not any(k.endswith(".bias") for k in keys)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_round_trip(tmp_path: Path, tiny_model, suffix: str) -> None:
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    path = tmp_path / f"umt5{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    loaded = load_umt5(path, TINY, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 77, EOS_ID]])
    with torch.inference_mode():
        assert torch.equal(loaded(ids), tiny_model(ids))


def test_strict_loading_names_the_key(tmp_path: Path, tiny_model) -> None:
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cases = {
        r"1 missing: blocks\.1\.ffn\.gate\.0\.weight": {
            k: v for k, v in sd.items() if k != "blocks.1.ffn.gate.0.weight"
        },
        r"1 unexpected: pos_embedding\.embedding\.weight": {
            **sd,
            "pos_embedding.embedding.weight": torch.zeros(32, 4),
        },
        r"blocks\.0\.pos_embedding\.embedding\.weight: \(16, 4\) != \(32, 4\)": {
            **sd,
            "blocks.0.pos_embedding.embedding.weight": torch.zeros(16, 4),
        },
    }
    for pattern, bad in cases.items():
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match=pattern):
            load_umt5(tmp_path / "bad.pth", TINY)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_umt5(tmp_path / "absent.pth", TINY)


def test_relative_position_buckets() -> None:
    rel = torch.arange(-300, 301)
    b = relative_position_bucket(rel, 32, 128)
    zero = 300
    assert b[zero].item() == 0
    assert b[zero + 1 : zero + 8].tolist() == list(range(17, 24))  # exact, keys after
    assert b[zero - 7 : zero].tolist() == list(range(7, 0, -1))  # exact, keys before
    assert b[zero + 128 :].unique().tolist() == [31] and b[: zero - 127].unique().tolist() == [15]
    assert bool((b[zero:].diff() >= 0).all())  # monotone with distance


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer(max_tokens=6)
    assert tok.encode("ab") == [ord("a") + 3, ord("b") + 3, EOS_ID]
    assert tok.encode("") == [EOS_ID]
    assert tok.encode("  a \n\t b  ") == tok.encode("a b")  # Wan's whitespace cleaning
    long = tok.encode("abcdefghij")
    assert len(long) == 6 and long[-1] == EOS_ID  # truncated with the EOS kept
    assert tok.encode("é") == [0xC3 + 3, 0xA9 + 3, EOS_ID]  # UTF-8 bytes
    assert max(ByteTokenizer(600).encode("\xff" * 300)) < TINY.vocab
    assert clean_prompt("a &amp;amp; b") == "a & b"


def _tokenizer_json(path: Path) -> Path:
    """A small tokenizer.json built the way umT5's is used: EOS appended by the file's
    post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i, word in enumerate("a red car on the road at night blue sky".split()):
        vocab[word] = 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def test_file_tokenizer(tmp_path: Path) -> None:
    file = _tokenizer_json(tmp_path / "google" / "umt5-xxl")
    tok = FileTokenizer(file, max_tokens=4)
    assert tok.encode("a red car") == [3, 4, 5, EOS_ID]
    assert tok.encode("a  red\ncar on the road") == [3, 4, 5, EOS_ID]  # cut, EOS kept
    assert tok.encode("zebra") == [2, EOS_ID]
    assert tok.vocab_size == 13
    # a directory: its tokenizer.json, or Wan's google/umt5-xxl layout
    assert FileTokenizer(file.parent, 4).path == file
    assert FileTokenizer(tmp_path, 4).path == file
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        FileTokenizer(tmp_path / "nowhere", 4)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"not a tokenizer\.json"):
        FileTokenizer(tmp_path / "junk.json", 4)


def test_encode_shape_and_determinism(tiny_model) -> None:
    enc = PromptEncoder(tiny_model, ByteTokenizer(16), "tiny")
    out = enc.encode("a red car")
    assert out.shape == (len("a red car") + 1, 48) and out.dtype == torch.float32
    assert out.device.type == "cpu" and torch.isfinite(out).all()
    long = enc.encode("x" * 100)
    assert long.shape == (16, 48)  # truncated to the DiT's text_len
    again = PromptEncoder(random_umt5(TINY, seed=0), ByteTokenizer(16), "tiny")
    assert torch.equal(again.encode("a red car"), out)  # same seed, same weights
    other = PromptEncoder(random_umt5(TINY, seed=1), ByteTokenizer(16), "tiny")
    assert not torch.equal(other.encode("a red car"), out)
    assert not torch.equal(enc.encode("a red cat"), out)


def test_unpadded_encoding_equals_padded_and_masked(tiny_model) -> None:
    ids = ByteTokenizer(16).encode("night road")
    pad = 16 - len(ids)
    padded = torch.tensor([ids + [0] * pad])
    mask = torch.tensor([[1] * len(ids) + [0] * pad])
    with torch.inference_mode():
        alone = tiny_model(torch.tensor([ids]))
        masked = tiny_model(padded, mask)
    torch.testing.assert_close(masked[:, : len(ids)], alone, atol=1e-5, rtol=1e-5)


def test_prompt_cache_hits_and_bound(tiny_model) -> None:
    enc = PromptEncoder(tiny_model, ByteTokenizer(16), "tiny", cache_size=2)
    a = enc.encode("alpha")
    assert (enc.hits, enc.misses) == (0, 1)
    assert enc.encode("alpha") is a  # not encoded again
    assert (enc.hits, enc.misses) == (1, 1)
    enc.encode("beta")
    enc.encode("alpha")  # alpha is now the most recent
    enc.encode("gamma")  # evicts beta, the least recent
    assert len(enc) == 2 and (enc.hits, enc.misses) == (2, 3)
    enc.encode("alpha")
    assert enc.hits == 3
    enc.encode("beta")
    assert enc.misses == 4
    assert prompt_key("alpha") == prompt_key("alpha") != prompt_key("alpha ")
    assert len(prompt_key("")) == 64


def test_tokenizer_larger_than_vocab_is_refused() -> None:
    small = random_umt5(UMT5Config(10, 8, 8, 16, 2, 1, 8), seed=0)
    with pytest.raises(CheckpointError, match="more than the encoder's vocabulary of 10"):
        PromptEncoder(small, ByteTokenizer(16), "small")
