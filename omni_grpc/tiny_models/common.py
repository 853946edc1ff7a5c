"""What every tiny model builder shares: seeded construction, quiet saving, CLIP text encoders and the
tokenizer files written from code (never fetched from a hub)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers.utils.logging as df_logging
import torch
import transformers.utils.logging as hf_logging
from diffusers import AutoencoderKL

# From its module: `from diffusers import ...` names dummy classes when read by a type checker.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import CLIPTextConfig, CLIPTokenizer

from omni_grpc.tiny_models.clip_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    default_vocab,
    write_clip_tokenizer,
)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    # fork_rng restores the caller's global RNG state afterwards; CPU-only init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def save_quietly(pipe: DiffusionPipeline, out_dir: Path) -> None:
    # A build is an implementation detail: hide transformers' shard progress bars and
    # diffusers' "text_encoder_3=None cannot be saved" warnings from service logs.
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = df_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    df_logging.set_verbosity_error()
    try:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    finally:
        df_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def clip_config(
    hidden_size: int,
    projection_dim: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
) -> CLIPTextConfig:
    vocab = default_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        projection_dim=projection_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        # Must match the tokenizer: pooling picks the hidden state at eos_token_id.
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )


def replace_tokenizer(out_dir: Path, subfolder: str) -> None:
    # save_pretrained's tokenizer format varies across transformers versions (v5 writes
    # tokenizer.json + extra keys); our own files are stable and load everywhere.
    target = out_dir / subfolder
    shutil.rmtree(target, ignore_errors=True)
    write_clip_tokenizer(target)


def tiny_vae(latent_channels: int, **latent_interface: Any) -> AutoencoderKL:
    """A 4-block AutoencoderKL (8x, like the real ones) of 8/8/16/16 channels; `latent_interface` holds the
    family's scaling_factor (and shift_factor, quant convs) as its real VAE has them."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **latent_interface,
    )


def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer written from code, loaded as a pipeline takes it (its files are rewritten after the
    pipeline is saved, see `replace_tokenizer`)."""
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer(Path(tok_dir))
        tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    return tokenizer
