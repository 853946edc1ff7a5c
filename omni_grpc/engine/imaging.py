"""Encode generated images for the wire."""

from __future__ import annotations

import io

from PIL import Image as PILImage

from omni_grpc.engine.types import OutputFormat

_PIL_FORMATS = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}


def encode_image(image: PILImage.Image, fmt: OutputFormat) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt is not OutputFormat.PNG else {}
    image.convert("RGB").save(buffer, format=_PIL_FORMATS[fmt], **options)
    return buffer.getvalue()
