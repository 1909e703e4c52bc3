"""One request to the multi-task server: its task and image read from JSON or a multipart form, or a
one-line reason it cannot be answered (HTTP 400)."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from typing import Any, NamedTuple

from PIL import Image, UnidentifiedImageError

USAGE = (
    'POST a task name and an image: JSON {"task": NAME, "image": BASE64} or a multipart form with a '
    "'task' field and an 'image' file"
)


class ImageRequest(NamedTuple):
    task: str
    image: Image.Image


class BadRequest(NamedTuple):
    """Why a request cannot be answered (one line, sent back with HTTP 400)."""

    message: str


def image_bytes(value: Any) -> bytes | None:
    """The bytes of an uploaded file, or of a base64 string (a ``data:`` URL prefix allowed); None if neither."""
    if hasattr(value, "file"):  # starlette's UploadFile
        return bytes(value.file.read())
    if isinstance(value, str):
        try:
            return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def read_request(request: Any, tasks: Mapping[str, Any]) -> ImageRequest | BadRequest:
    """The task and RGB image of ``request`` (JSON object or form), or why it cannot be answered."""
    if not hasattr(request, "get"):
        return BadRequest(f"The request body is not a JSON object or a form; {USAGE}.")
    task, raw = request.get("task"), request.get("image")
    if task is None or raw is None:
        missing = " and ".join(repr(k) for k, v in (("task", task), ("image", raw)) if v is None)
        return BadRequest(f"The request has no {missing}; {USAGE}.")
    if not isinstance(task, str) or task not in tasks:
        return BadRequest(f"Unknown task {task!r}; this server has {', '.join(tasks)}.")
    data = image_bytes(raw)
    if data is None:
        return BadRequest(f"'image' is neither an uploaded file nor base64 text; {USAGE}.")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return ImageRequest(task, img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return BadRequest(
            f"'image' is not an image PIL can read ({type(err).__name__}); send a PNG, JPEG or WebP file."
        )


__all__ = ["USAGE", "BadRequest", "ImageRequest", "image_bytes", "read_request"]
