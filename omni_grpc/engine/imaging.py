"""Encode generated images for the wire."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage

from omni_grpc.engine.types import OutputFormat

_PIL_FORMATS = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}


def encode_image(image: PILImage.Image, fmt: OutputFormat) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt is not OutputFormat.PNG else {}
    image.convert("RGB").save(buffer, format=_PIL_FORMATS[fmt], **options)
    return buffer.getvalue()


def encode_mp4(frames: list[PILImage.Image], fps: int) -> bytes:
    """H.264 in an MP4 (yuv420p, CRF 18), with FFmpeg's libx264 as PyAV ships it; the sides are even (every
    video family's sides are multiples of 16), as yuv420p needs."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].width, frames[0].height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.asarray(image.convert("RGB")), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()
