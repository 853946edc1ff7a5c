"""A tiny Stable Diffusion 1.5-architecture pipeline built from code (random weights), for the UNet tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from omni_grpc.tiny_models.clip_tokenizer import write_clip_tokenizer
from omni_grpc.tiny_models.common import clip_config, replace_tokenizer, save_quietly, seeded
from omni_grpc.tiny_models.sd3 import SEED_TEXT_ENCODER, SEED_UNET, SEED_VAE


def build_tiny_sd15(out_dir: Path, seed: int = 0) -> Path:
    """Build a random-weight SD1.5-architecture StableDiffusionPipeline (64x64 images).

    Load it with ``StableDiffusionPipeline.from_pretrained(out_dir)``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_hidden = 32

    with seeded(seed + SEED_UNET):
        # SD1.5 layout in miniature: cross-attention at the high-resolution level,
        # plain ResNet blocks at the bottom, 4-channel latents.
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=4,
            cross_attention_dim=clip_hidden,
            norm_num_groups=8,
        )

    text_config = clip_config(clip_hidden, projection_dim=32, intermediate_size=64, num_layers=2, num_heads=4)
    with seeded(seed + SEED_TEXT_ENCODER):
        text_encoder = CLIPTextModel(text_config)

    with seeded(seed + SEED_VAE):
        # Two blocks -> vae_scale_factor 2 -> 32x32 latents decode to 64x64 images.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        )

    # The scheduler config shipped with SD1.5.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )

    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer(Path(tok_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    save_quietly(pipe, out_dir)
    replace_tokenizer(out_dir, "tokenizer")
    return out_dir
