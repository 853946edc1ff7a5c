"""A tiny, randomly initialised Stable Diffusion 3 pipeline built entirely from code: the embedded
default model of omni-grpc, and the benchmark's small one.

Their weights are random, so the images they produce are noise: they exist so that the API can be tried
out and tested end to end (text encoding, denoising loop, VAE decode, LoRA loading) without downloading
anything. Every build is byte-reproducible: each component is created right after ``torch.manual_seed``
and all files come out identical across runs and processes for the same library versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# From their modules: `from diffusers import ...` names dummy classes when read by a type checker.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextModelWithProjection

from omni_grpc.tiny_models.common import clip_config, clip_tokenizer, replace_tokenizer, save_quietly, seeded

# Per-component seed offsets: distinct weights for the two CLIP encoders, and adding
# a component later does not change the weights of the existing ones.
SEED_TRANSFORMER = 0
SEED_TEXT_ENCODER = 1
SEED_TEXT_ENCODER_2 = 2
SEED_VAE = 3
SEED_UNET = 4


@dataclass(frozen=True)
class TinySD3Spec:
    """Architecture knobs for a random-weight SD3 pipeline.

    Default image side = ``sample_size * 2 ** (len(vae_block_out_channels) - 1)``.
    """

    # MMDiT transformer
    num_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 8
    sample_size: int = 8  # latent height/width
    patch_size: int = 2
    pos_embed_max_size: int = 96  # in patches; bounds the largest supported resolution
    qk_norm: str | None = None  # None like SD3-medium; "rms_norm" like SD3.5
    # Blocks with MMDiT-X's second self-attention (SD3.5-medium: the first 13); none like SD3.
    dual_attention_layers: tuple[int, ...] = ()
    # VAE
    latent_channels: int = 16  # SD3 uses a 16-channel latent space
    # Four blocks: 8x downsampling as in real SD3, so 1024x1024 (the guide's size) costs 4096 tokens.
    vae_block_out_channels: tuple[int, ...] = (8, 8, 16, 16)
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 8
    # Both CLIP text encoders (CLIP-L and CLIP-G in real SD3) share these sizes.
    clip_hidden_size: int = 32
    clip_projection_dim: int = 32
    clip_intermediate_size: int = 64
    clip_num_layers: int = 2
    clip_num_heads: int = 4

    def __post_init__(self) -> None:
        # Fail fast with a clear message instead of a shape error deep inside diffusers.
        if self.sample_size % self.patch_size:
            raise ValueError("sample_size must be divisible by patch_size")
        if self.sample_size // self.patch_size > self.pos_embed_max_size:
            raise ValueError("sample_size / patch_size exceeds pos_embed_max_size")
        if any(c % self.vae_norm_num_groups for c in self.vae_block_out_channels):
            raise ValueError("vae_norm_num_groups must divide every vae_block_out_channels entry")
        if self.clip_hidden_size % self.clip_num_heads:
            raise ValueError("clip_hidden_size must be divisible by clip_num_heads")

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae_block_out_channels) - 1))

    @property
    def image_size(self) -> int:
        """Default (and native) image height/width in pixels."""
        return self.sample_size * self.vae_scale_factor

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def joint_attention_dim(self) -> int:
        # The pipeline concatenates both CLIPs' hidden states along features and pads
        # them to joint_attention_dim (T5's width); without T5 the minimum is 2 x hidden.
        return 2 * self.clip_hidden_size

    @property
    def pooled_projection_dim(self) -> int:
        # Pooled embeds are the concatenation of both CLIP projections.
        return 2 * self.clip_projection_dim


# Benchmark preset: real-SD3-like geometry (512x512 images, 8x VAE downsampling,
# 16-channel latents, 2x2 patches -> 1024 image tokens) at a fraction of the width.
SMALL_SD3 = TinySD3Spec(
    num_layers=8,
    num_attention_heads=8,
    attention_head_dim=32,
    sample_size=64,
    patch_size=2,
    vae_block_out_channels=(32, 64, 128, 128),
    vae_layers_per_block=1,
    vae_norm_num_groups=32,
    clip_hidden_size=64,
    clip_projection_dim=64,
    clip_intermediate_size=256,
    clip_num_layers=4,
    clip_num_heads=4,
)

# The GPU check's model: SD3.5-medium's geometry (24 blocks of 24 heads x 64, the first 13 with a second
# attention, RMS-normed q/k, 1024x1024 images as 4096 tokens, 4096-wide text and 2048-wide pooled embeddings,
# SD3's VAE widths) with random weights; its two CLIPs are one layer deep, their width set by those embeddings.
SD35_MEDIUM_GEOMETRY = TinySD3Spec(
    num_layers=24,
    num_attention_heads=24,
    attention_head_dim=64,
    sample_size=128,
    patch_size=2,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
    vae_block_out_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_norm_num_groups=32,
    clip_hidden_size=2048,
    clip_projection_dim=1024,
    clip_intermediate_size=2048,
    clip_num_layers=1,
    clip_num_heads=16,
)


def build_tiny_sd3(
    out_dir: Path, spec: TinySD3Spec = TinySD3Spec(), seed: int = 0, dtype: torch.dtype | None = None
) -> Path:
    """Build a random-weight StableDiffusion3Pipeline (no T5) and save it to ``out_dir``.

    Load it with ``StableDiffusion3Pipeline.from_pretrained(out_dir, text_encoder_3=None,
    tokenizer_3=None)``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with seeded(seed + SEED_TRANSFORMER):
        transformer = SD3Transformer2DModel(
            sample_size=spec.sample_size,
            patch_size=spec.patch_size,
            in_channels=spec.latent_channels,
            out_channels=spec.latent_channels,
            num_layers=spec.num_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            # The blocks run at inner_dim, so the caption projection must land there.
            caption_projection_dim=spec.inner_dim,
            joint_attention_dim=spec.joint_attention_dim,
            pooled_projection_dim=spec.pooled_projection_dim,
            pos_embed_max_size=spec.pos_embed_max_size,
            qk_norm=spec.qk_norm,
            dual_attention_layers=spec.dual_attention_layers,
        )

    text_config = clip_config(
        spec.clip_hidden_size,
        spec.clip_projection_dim,
        spec.clip_intermediate_size,
        spec.clip_num_layers,
        spec.clip_num_heads,
    )
    with seeded(seed + SEED_TEXT_ENCODER):
        text_encoder = CLIPTextModelWithProjection(text_config)
    with seeded(seed + SEED_TEXT_ENCODER_2):
        text_encoder_2 = CLIPTextModelWithProjection(text_config)

    n_blocks = len(spec.vae_block_out_channels)
    with seeded(seed + SEED_VAE):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n_blocks,
            up_block_types=("UpDecoderBlock2D",) * n_blocks,
            block_out_channels=spec.vae_block_out_channels,
            layers_per_block=spec.vae_layers_per_block,
            latent_channels=spec.latent_channels,
            norm_num_groups=spec.vae_norm_num_groups,
            sample_size=spec.image_size,
            # SD3's VAE latent statistics and its conv-free latent interface.
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    # Same scheduler config as SD3-medium.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    tokenizer = clip_tokenizer()

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        # diffusers annotates the T5 parts as required, yet SD3 runs without them (as documented).
        text_encoder_3=None,  # type: ignore[arg-type]
        tokenizer_3=None,
    )
    if dtype is not None:  # saved as the model runs (a large model's float32 copy is twice the disk and reading)
        pipe.to(dtype)
    save_quietly(pipe, out_dir)
    replace_tokenizer(out_dir, "tokenizer")
    replace_tokenizer(out_dir, "tokenizer_2")
    return out_dir
