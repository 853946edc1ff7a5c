"""A tiny Qwen-Image-architecture pipeline built from code (random weights).

Qwen-Image geometry in miniature: a Qwen2.5-VL text encoder (Qwen2_5_VLForConditionalGeneration; the
pipeline uses the last hidden state of the chat-templated prompt and drops the first 34 template
tokens), a Qwen2 byte-level BPE tokenizer built from code whose template prefix is exactly 34 tokens,
QwenImageTransformer2DModel (patch 2 over 16-channel latents: in_channels 64, out_channels 16,
joint_attention_dim = text hidden size), AutoencoderKLQwenImage with 8x spatial downsampling
(vae_scale_factor = 2 ** len(temperal_downsample) = 8), so the spatial multiple is 16 px, and the real
Qwen-Image scheduler config. QwenImagePipeline's default size is hard-coded (default_sample_size 128 x 8
= 1024 px): always pass height/width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from omni_grpc.tiny_models.common import save_quietly, seeded
from omni_grpc.tiny_models.qwen_tokenizer import make_qwen_tokenizer, special_ids

TEXT_HIDDEN = 32
Z_DIM = 16


def build_tiny_qwen_image(out_dir: Path, seed: int = 0) -> Path:
    """Build a random-weight QwenImagePipeline into `out_dir` (a diffusers folder); returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_qwen_tokenizer()
    ids = special_ids(tokenizer)
    with seeded(seed + 0):
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * Z_DIM,
            out_channels=Z_DIM,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_HIDDEN,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),  # sums to attention_head_dim, like (16, 56, 56) for 128
        )
    with seeded(seed + 1):
        # Keywords transformers' annotations leave out but the config takes.
        settings: dict[str, Any] = dict(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": TEXT_HIDDEN,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 2048,
                "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
                "rope_theta": 1000000.0,
                "bos_token_id": ids["<|endoftext|>"],
                "eos_token_id": ids["<|im_end|>"],
                "pad_token_id": ids["<|endoftext|>"],
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": TEXT_HIDDEN,
                "fullatt_block_indexes": [0],
            },
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            vision_token_id=ids["<|vision_pad|>"],
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        )
        config = Qwen2_5_VLConfig(**settings)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    with seeded(seed + 2):
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=Z_DIM,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            # identity latent normalisation (the real VAE ships per-channel statistics)
            latents_mean=[0.0] * Z_DIM,
            latents_std=[1.0] * Z_DIM,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    parts: dict[str, Any] = {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }
    save_quietly(QwenImagePipeline(**parts), out_dir)
    return out_dir
