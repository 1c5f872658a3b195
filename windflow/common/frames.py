"""Frame encoding (on the worker) and decoding (in clients): raw RGB or JPEG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from windflow.v1 import windflow_pb2 as pb


def encode_frame(rgb: np.ndarray, fmt: int, width: int, height: int, jpeg_quality: int) -> bytes:
    """Encode one uint8 (H, W, 3) frame, upscaled (bilinear) to width x height if needed."""
    image: Image.Image | None = None
    if rgb.shape[1] != width or rgb.shape[0] != height:
        image = Image.fromarray(rgb, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    if fmt == pb.FRAME_FORMAT_RGB:
        return (np.asarray(image) if image is not None else np.ascontiguousarray(rgb)).tobytes()
    if image is None:
        image = Image.fromarray(rgb, "RGB")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=jpeg_quality)
    return out.getvalue()


def decode_frame(data: bytes, fmt: int, width: int, height: int) -> np.ndarray:
    """Inverse of ``encode_frame`` (lossy for JPEG): uint8 (height, width, 3)."""
    if fmt == pb.FRAME_FORMAT_RGB:
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
