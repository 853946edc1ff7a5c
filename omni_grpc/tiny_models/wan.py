"""A tiny Wan-architecture text-to-video pipeline built from code (random weights): Wan 2.1 or 2.2 (two experts).

Wan geometry in miniature: UMT5EncoderModel (last hidden state -> text_dim), a T5-style Unigram tokenizer
built from code, AutoencoderKLWan with the real 8x spatial / 4x temporal compression (dim_mult of 4 ->
3 spatial downsamples, temperal_downsample [False, True, True]; scale_factor_spatial/temporal are config
values that must match), 16 latent channels, WanTransformer3DModel with patch (1, 2, 2), so the spatial
multiple is 16 px (the pipeline also hard-checks height % 16 and width % 16) and num_frames must be 4k+1.

version="2.2" adds transformer_2 (a second expert, independent weights) and boundary_ratio=0.875 like
Wan2.2-T2V-A14B: steps with t >= 0.875 * 1000 run `transformer` (high noise), the rest `transformer_2`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from transformers import UMT5Config, UMT5EncoderModel

from omni_grpc.tiny_models.common import save_quietly, seeded
from omni_grpc.tiny_models.t5_tokenizer import make_t5_tokenizer, t5_encoder_settings

TEXT_DIM = 32


def _transformer() -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        # Real value: RoPE tables cover 1024 patches per axis (32 would cap at 512 px / 125 frames).
        rope_max_seq_len=1024,
    )


def build_tiny_wan(out_dir: Path, seed: int = 0, version: str = "2.1") -> Path:
    """Build a random-weight WanPipeline into `out_dir` (a diffusers folder); returns it."""
    if version not in ("2.1", "2.2"):
        raise ValueError(f"version must be 2.1 or 2.2, got {version!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with seeded(seed + 0):
        transformer = _transformer()
    transformer_2 = None
    if version == "2.2":
        with seeded(seed + 4):
            transformer_2 = _transformer()
    with seeded(seed + 1):
        text_encoder = UMT5EncoderModel(UMT5Config(**t5_encoder_settings(TEXT_DIM))).eval()
    with seeded(seed + 2):
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            scale_factor_spatial=8,
            scale_factor_temporal=4,
        )
    # Wan2.1 T2V 480p scheduler (flow_shift 3.0; 5.0 is used for 720p).
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        solver_order=2,
        solver_type="bh2",
        lower_order_final=True,
    )
    # diffusers annotates transformer_2 as required; Wan 2.1 has none.
    parts: dict[str, Any] = {
        "tokenizer": make_t5_tokenizer(model_max_length=512),
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": scheduler,
        "transformer": transformer,
        "transformer_2": transformer_2,
        "boundary_ratio": 0.875 if version == "2.2" else None,
    }
    save_quietly(WanPipeline(**parts), out_dir)
    return out_dir
