"""A tiny T5-style Unigram tokenizer built from code (no spiece.model, no sentencepiece, no hub).

As T5's: <pad>=0, </s>=1, <unk>=2, then pieces; "▁" marks a word start; "</s>" ends every sequence; padding
on the right. The pieces are every printable ASCII character (alone and as "▁x") and every word of the CLIP
tokenizer's corpus as one piece, so those words are one token and other ASCII words split into characters.
transformers' tokenizers-backed T5Tokenizer takes the vocab as [(piece, score)].
"""

from __future__ import annotations

import re
import string
from typing import Any

from transformers import T5Tokenizer

from omni_grpc.tiny_models.clip_tokenizer import CORPUS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def unigram_vocab(corpus: tuple[str, ...] = CORPUS) -> list[tuple[str, float]]:
    chars = [c for c in string.printable if not c.isspace()]
    words = sorted({w for line in corpus for w in re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", line)})
    pieces: list[tuple[str, float]] = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), ("▁", -3.0)]
    seen = {p for p, _ in pieces}
    # Whole words score far above any split into characters, so the Viterbi search keeps them whole.
    for w in words:
        for piece in ("▁" + w, w):
            if piece not in seen and len(w) > 1:
                seen.add(piece)
                pieces.append((piece, -4.0 - 0.001 * len(pieces)))
    for c in chars:
        for piece in ("▁" + c, c):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0))
    return pieces


def make_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    return T5Tokenizer(vocab=unigram_vocab(), extra_ids=0, model_max_length=model_max_length)


def t5_vocab_size() -> int:
    return len(unigram_vocab())


def t5_encoder_settings(d_model: int) -> dict[str, Any]:
    """A tiny T5 v1.1-layout encoder (gated-gelu FFN, no biases, as T5-XXL in Flux and SD3, and UMT5 in Wan),
    sized to this tokenizer: keywords for T5Config or UMT5Config."""
    return {
        "vocab_size": t5_vocab_size(),
        "d_model": d_model,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
