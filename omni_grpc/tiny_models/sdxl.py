"""A tiny Stable Diffusion XL-architecture pipeline built from code (random weights, 64x64 images).

Real SDXL geometry in miniature: two CLIP text encoders (CLIPTextModel + CLIPTextModelWithProjection) whose
penultimate hidden states are concatenated (cross_attention_dim = 2 x 32), the second's pooled projection plus
six micro-conditioning ids (add_time_ids), a UNet of DownBlock2D + 2 x CrossAttnDownBlock2D (so Kohya's SGM
block names map as on the real model), an 8x VAE and SDXL's own scheduler config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from omni_grpc.tiny_models.common import clip_config, clip_tokenizer, replace_tokenizer, save_quietly, seeded, tiny_vae
from omni_grpc.tiny_models.sd3 import SEED_TEXT_ENCODER, SEED_TEXT_ENCODER_2, SEED_UNET, SEED_VAE

CLIP_HIDDEN = 32
CLIP_PROJECTION = 32
TIME_EMBED = 8


def build_tiny_sdxl(out_dir: Path, seed: int = 0, text_encoder_2_hidden: int = CLIP_HIDDEN) -> Path:
    """Build a random-weight StableDiffusionXLPipeline into `out_dir` (a diffusers folder); returns it.
    `text_encoder_2_hidden`: the second encoder's width (the real model's are 768 and 1280)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with seeded(seed + SEED_UNET):
        unet = UNet2DConditionModel(
            sample_size=8,  # latent side; x8 VAE -> 64 px default
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            attention_head_dim=(2, 4, 4),  # heads per level (diffusers' naming), like SDXL's (5, 10, 20)
            use_linear_projection=True,
            transformer_layers_per_block=(1, 1, 1),
            cross_attention_dim=CLIP_HIDDEN + text_encoder_2_hidden,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=6 * TIME_EMBED + CLIP_PROJECTION,
            norm_num_groups=8,
        )
    # SDXL reads hidden_states[-2]: at least two layers.
    text_config = clip_config(CLIP_HIDDEN, CLIP_PROJECTION, intermediate_size=64, num_layers=2, num_heads=4)
    text_config_2 = clip_config(text_encoder_2_hidden, CLIP_PROJECTION, intermediate_size=64, num_layers=2, num_heads=4)
    with seeded(seed + SEED_TEXT_ENCODER):
        text_encoder = CLIPTextModel(text_config)
    with seeded(seed + SEED_TEXT_ENCODER_2):
        text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
    with seeded(seed + SEED_VAE):
        vae = tiny_vae(4, scaling_factor=0.13025)  # SDXL's VAE
    # The scheduler config shipped with SDXL base 1.0.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    tokenizer = clip_tokenizer()
    # diffusers annotates `scheduler` as an enum and the optional image-prompt parts as required: the parts go in
    # as keywords it cannot check.
    parts: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }
    pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    save_quietly(pipe, out_dir)
    for subfolder in ("tokenizer", "tokenizer_2"):
        replace_tokenizer(out_dir, subfolder)
    return out_dir
