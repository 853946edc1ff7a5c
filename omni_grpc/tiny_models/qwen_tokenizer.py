"""A tiny Qwen2-style byte-level BPE tokenizer built from code (no hub).

GPT-2/Qwen2 byte-level alphabet (256 symbols, "Ġ" = leading space), merges learned by a deterministic
greedy trainer (ties broken on the pair's string order) from the built-in corpus, which contains the
Qwen-Image system prompt: every corpus word ends as ONE token, so the prompt-template prefix that
QwenImagePipeline drops (prompt_template_encode_start_idx = 34) is exactly 34 tokens, as with the real
Qwen2.5-VL tokenizer. Special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, vision tokens) follow
the learned vocab. transformers 5's Qwen2Tokenizer (Qwen2TokenizerFast is an alias) takes
vocab + merges in its constructor.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from typing import Any

import regex  # type: ignore[import-untyped]  # the regex package ships no type stubs
from transformers import Qwen2Tokenizer

from omni_grpc.tiny_models.clip_tokenizer import CORPUS, bytes_to_unicode

# The exact pre-tokenizer regex of Qwen2Tokenizer.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _training_text() -> list[str]:
    return list(CORPUS) + [QWEN_IMAGE_TEMPLATE.format(line) for line in CORPUS[:2]]


def train_merges(max_merges: int = 2000) -> list[tuple[str, str]]:
    table = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for text in _training_text():
        for part in regex.split(r"(<\|[a-z_]+\|>)", text):
            if part.startswith("<|"):
                continue
            for tok in regex.findall(PRETOKENIZE_REGEX, part):
                words[tuple(table[b] for b in tok.encode("utf-8"))] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for sym, freq in words.items():
            for p in pairwise(sym):
                pairs[p] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new: Counter[tuple[str, ...]] = Counter()
        for sym, freq in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new[tuple(out)] += freq
        words = new
    return merges


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = train_merges()
    tokens = list(bytes_to_unicode().values())
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += list(SPECIALS)  # fixed ids: <|endoftext|> first, like Qwen2 (151643, 151644, ...)
    return {t: i for i, t in enumerate(tokens)}, merges


def make_qwen_tokenizer(model_max_length: int = 32768) -> Qwen2Tokenizer:
    vocab, merges = vocab_and_merges()
    # transformers annotates merges as strings and unk_token as required; it takes pairs and None.
    settings: dict[str, Any] = {
        "vocab": vocab,
        "merges": merges,
        "unk_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": model_max_length,
        "errors": "replace",
        "additional_special_tokens": list(SPECIALS[1:]),
    }
    return Qwen2Tokenizer(**settings)


def special_ids(tok: Qwen2Tokenizer) -> dict[str, int]:
    return {s: int(tok.convert_tokens_to_ids(s)) for s in SPECIALS}  # type: ignore[arg-type]  # one token: one id
