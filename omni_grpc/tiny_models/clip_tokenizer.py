"""A tiny CLIP byte-level BPE tokenizer generated entirely from code.

The embedded default models need a CLIP tokenizer, but the service must never
touch the model hub. Instead of shipping a 1.5 MB vocab we *train* a small one
at build time: the 512-token byte-level base alphabet CLIP uses (every byte
and its end-of-word ``</w>`` variant), plus a few hundred merges learned by a
deterministic BPE trainer from a built-in English corpus. Because every byte is
in the vocab, any unicode prompt tokenises without unknown tokens.

The files written are the classic ``CLIPTokenizer.save_pretrained`` set
(``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``), which both the slow and the tokenizers-backed
CLIP tokenizers of every transformers version can load. Output is
byte-identical on every run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# Upper bound on learned merges; the trainer stops earlier if the corpus runs out of pairs.
NUM_MERGES = 400

# Prompt-flavoured English so common words in image prompts become single tokens.
CORPUS = (
    "A photo of a cat sitting on a red chair in the morning light.",
    "A painting of a squirrel eating a burger, oil on canvas, highly detailed.",
    "An astronaut riding a horse on the moon, digital art, trending on artstation.",
    "A beautiful landscape with mountains, a river and a forest at sunset.",
    "Portrait of a young woman with long hair, studio lighting, sharp focus.",
    "A small house near the lake, watercolor, soft colors, calm and quiet.",
    "A futuristic city at night with neon lights and flying cars in the rain.",
    "Close up photograph of a dog playing in the snow, 4k, cinematic.",
    "The old man reads a book by the window while the sun is setting.",
    "A bowl of fresh fruit on a wooden table, still life, natural light.",
    "Two children are walking along the beach under a bright blue sky.",
    "A dragon flying over the castle, fantasy illustration, dramatic clouds.",
    "Minimalist poster of a bird on a branch, flat design, pastel palette.",
    "The quick brown fox jumps over the lazy dog.",
    "It's a sunny day and we're going to the park; they'll meet us there.",
    "Anime style character with a sword, standing in a field of flowers.",
    "A black and white photograph of the street in the city of Paris.",
    "Macro shot of a green leaf with drops of water, shallow depth of field.",
    "A cozy room with a fireplace, warm light, wooden floor and a sleeping cat.",
    "Abstract art with bright colors, shapes and lines, by a modern artist.",
)

# ASCII-only version of CLIP's pre-tokenizer pattern; the corpus is plain ASCII so
# ``\p{L}``/``\p{N}`` (unsupported by ``re``) are not needed at training time.
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def _word_symbols(word: str) -> tuple[str, ...]:
    """Split a pre-token into byte-level symbols, marking the last with ``</w>``."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] += "</w>"
    return tuple(chars)


def _merge_word(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_bpe(corpus: tuple[str, ...] = CORPUS, num_merges: int = NUM_MERGES) -> list[tuple[str, str]]:
    """Learn BPE merges greedily; ties break on the pair's string order, so no randomness."""
    words: Counter[tuple[str, ...]] = Counter()
    for sentence in corpus:
        for token in _PRETOKENIZE.findall(" ".join(sentence.lower().split())):
            words[_word_symbols(token)] += 1

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in words.items():
            for pair in pairwise(symbols):
                pairs[pair] += freq
        if not pairs:
            break  # every word is a single token already
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, freq in words.items():
            merged[_merge_word(symbols, best)] += freq
        words = merged
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP vocab layout: bytes, bytes + ``</w>``, one entry per merge, then the specials last."""
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base]
    seen = set(tokens)
    for a, b in merges:
        # A merge can re-create an existing token ("a"+"bc" vs "ab"+"c"); keep ids unique.
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def _special(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _dump_json(obj: Any) -> str:
    # sort_keys + fixed indent + trailing newline: stable bytes, same style as transformers.
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@lru_cache(maxsize=1)
def _default_merges() -> tuple[tuple[str, str], ...]:
    # Training takes a few hundred ms; cache it since a pipeline build needs it twice.
    return tuple(train_bpe())


def write_clip_tokenizer(out_dir: Path) -> None:
    """Write a CLIP tokenizer (vocab.json, merges.txt, configs) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = list(_default_merges())
    vocab = default_vocab()

    added_tokens_decoder = {str(vocab[tok]): {**_special(tok), "special": True} for tok in (BOS_TOKEN, EOS_TOKEN)}
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": BOS_TOKEN,
        # False: the cleanup is meant for WordPiece and newer transformers warn about it.
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS_TOKEN,
    }
    special_tokens_map = {
        "bos_token": _special(BOS_TOKEN),
        "eos_token": _special(EOS_TOKEN),
        "pad_token": _special(EOS_TOKEN),
        "unk_token": _special(EOS_TOKEN),
    }

    files = {
        "vocab.json": _dump_json(vocab),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": _dump_json(tokenizer_config),
        "special_tokens_map.json": _dump_json(special_tokens_map),
    }
    for name, text in files.items():
        # newline="\n" so the bytes do not depend on the platform.
        with open(out_dir / name, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)


def default_vocab() -> dict[str, int]:
    """The vocab :func:`write_clip_tokenizer` writes (to size text encoders, find special ids)."""
    return build_vocab(list(_default_merges()))
