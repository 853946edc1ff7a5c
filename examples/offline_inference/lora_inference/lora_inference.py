"""Offline LoRA inference, as in the guide: a pre-loaded adapter (--lora-path) or a per-request one
(--lora-request-path), on the same engine the server uses.

    python -m examples.offline_inference.lora_inference.lora_inference \\
        --prompt "A piece of cheesecake" --lora-path /path/to/lora/ --lora-scale 1.0 \\
        --num-inference-steps 50 --height 1024 --width 1024 --output output_preloaded.png

Without --model it runs the embedded small default model (random weights: the image is noise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omni_grpc import Omni, OmniDiffusionSamplingParams
from omni_grpc.engine.imaging import encode_mp4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers folder or hub id (default: embedded small model)")
    parser.add_argument("--prompt", required=True)
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--lora-path", help="adapter pre-loaded at start, then used for the request")
    adapter.add_argument("--lora-request-path", help="adapter loaded on demand by the request itself")
    parser.add_argument("--lora-request-id", type=int, default=None, help="id for the adapter (default: from path)")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--num-inference-steps", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None, help="video models: frames per video")
    parser.add_argument("--fps", type=int, default=None, help="video models: frames per second of the MP4")
    parser.add_argument("--output", type=Path, default=Path("output.png"), help="PNG, or MP4 on a video model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    omni = Omni(model=args.model, lora_path=args.lora_path)
    path = args.lora_path or args.lora_request_path
    lora_request = None
    if path:
        lora_request = {"path": path, "scale": args.lora_scale}
        if args.lora_request_id is not None:
            lora_request["id"] = args.lora_request_id
    params = OmniDiffusionSamplingParams(
        num_inference_steps=args.num_inference_steps,
        height=args.height,
        width=args.width,
        seed=args.seed,
        lora_request=lora_request,
        num_frames=args.num_frames,
        fps=args.fps,
    )
    try:
        result = omni.generate(args.prompt, params)[0]
    finally:
        omni.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    applied = (
        f"{result.adapter.name} (id {result.adapter.id}, scale {result.adapter.scale:g})" if result.adapter else "none"
    )
    if result.videos:  # a video model: an MP4, whatever suffix --output had
        video = result.videos[0]
        output = args.output.with_suffix(".mp4")
        output.write_bytes(encode_mp4(video.frames, video.fps))
        shape = f"{video.width}x{video.height}, {video.num_frames} frames at {video.fps} fps, seed {video.seed}"
    else:
        image = result.images[0]
        output = args.output
        image.image.save(output)
        shape = f"{image.width}x{image.height}, seed {image.seed}"
    print(
        f"saved {output} ({shape}, adapter {applied}, "
        f"{result.num_inference_steps} steps in {result.timings.inference_ms:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
