"""A tiny Flux.1-architecture pipeline built from code (random weights).

Real Flux geometry in miniature: CLIP-L (its pooled output -> pooled_projection_dim), a T5 v1.1 encoder
(-> joint_attention_dim), FluxTransformer2DModel (1 double-stream and 2 single-stream blocks, patch 1 on
2x2-packed latents: in_channels = 4 x 16), a 4-block AutoencoderKL with 16 latent channels (8x), so sides
are multiples of 16. `variant="dev"`: guidance embedded (distilled guidance) and dev's dynamic-shift
scheduler; `"schnell"`: no guidance input, static shift 1.0. FluxPipeline's default side is fixed at 1024.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from omni_grpc.tiny_models.common import clip_config, clip_tokenizer, replace_tokenizer, save_quietly, seeded, tiny_vae
from omni_grpc.tiny_models.t5_tokenizer import make_t5_tokenizer, t5_encoder_settings

HIDDEN = 32


def build_tiny_flux(out_dir: Path, seed: int = 0, variant: str = "dev") -> Path:
    """Build a random-weight FluxPipeline into `out_dir` (a diffusers folder); returns it."""
    if variant not in ("dev", "schnell"):
        raise ValueError(f"variant must be dev or schnell, got {variant!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x 2x2 packing
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=HIDDEN,
            pooled_projection_dim=HIDDEN,
            guidance_embeds=variant == "dev",
            axes_dims_rope=(4, 6, 6),  # sums to the head dim, as (16, 56, 56) does for 128
        )
    with seeded(seed + 1):
        text_encoder = CLIPTextModel(clip_config(HIDDEN, HIDDEN, 64, 2, 4))
    with seeded(seed + 2):
        text_encoder_2 = T5EncoderModel(T5Config(**t5_encoder_settings(HIDDEN))).eval()
    with seeded(seed + 3):
        # FLUX.1's VAE: 16 latent channels, its latent statistics, no quant convs.
        vae = tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    if variant == "dev":
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    tokenizer = clip_tokenizer()
    # diffusers annotates the optional image-prompt parts as required: the parts go in as keywords.
    parts: dict[str, Any] = {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": make_t5_tokenizer(model_max_length=512),
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }
    save_quietly(FluxPipeline(**parts), out_dir)
    replace_tokenizer(out_dir, "tokenizer")
    return out_dir
