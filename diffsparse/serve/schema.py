"""The HTTP contract of `POST /generate`: the JSON body, which response type a client gets
(`Accept`), and the encoded response. Nothing here needs Ray.

Body (every field but the conditioning optional):

    {"class_labels": [3, 1, 4],                 # class-conditional models, or
     "conditioning": {"prompt_embeds": [[[...]]], # name -> nested lists (first axis = sample), or
                      "prompt_attention_mask": {"dtype": "int64", "shape": [1, 120], "base64": "..."}},
     "seed": 0,                                  # sample i starts from the noise of (seed, i)
     "guidance_scale": 4.0,                      # null / absent: the bundle's default
     "scale": 4, "columns": 3}                   # PNG only: pixel upscaling, images per row

Response: `image/png` (a grid of the samples, `GenerationResult.grid`; the default) or
`application/x-npz` (`samples` float32 (n, C, H, W), `images` uint8 (n, H, W, C), `class_labels`,
`seed`, `guidance_scale`), chosen by the request's `Accept` header.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffsparse.runtime.pipeline import GenerationResult

PNG = "image/png"
NPZ = "application/x-npz"
#: media types a client may ask for -> what it gets (NPZ is binary: octet-stream gets it too)
MEDIA_TYPES = {PNG: PNG, "image/*": PNG, "*/*": PNG, NPZ: NPZ, "application/npz": NPZ,
               "application/octet-stream": NPZ, "application/*": NPZ}
FIELDS = ("class_labels", "conditioning", "seed", "guidance_scale", "scale", "columns")
#: dtypes a base64 array may declare
ARRAY_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
MAX_SCALE = 16
MAX_SEED = 2**63 - 1


class RequestError(Exception):
    """A request the server will not run: HTTP `status` (4xx) and a message naming the problem
    and the fix, sent back as {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class GenerateRequest:
    """A parsed body; the model's own checks (label range, shapes) come when a replica admits it."""

    class_labels: list[Any] | None = None
    conditioning: dict[str, np.ndarray] = field(default_factory=dict)
    seed: int = 0
    guidance_scale: float | None = None
    scale: int = 1
    columns: int | None = None


def parse_generate(body: bytes) -> GenerateRequest:
    """The request a JSON body asks for, or RequestError(400) naming what is wrong with it."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"malformed JSON ({e}); send an object such as "
                                '{"class_labels": [1, 2], "seed": 0}') from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object such as {{\"class_labels\": [1, 2]}}, "
                                f"got a {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; a request takes {list(FIELDS)}")
    labels = data.get("class_labels")
    if labels is not None and not isinstance(labels, list):
        raise RequestError(400, f"class_labels must be a list of whole numbers, got {_short(labels)}")
    cond = data.get("conditioning") or {}
    if not isinstance(cond, dict):
        raise RequestError(400, "conditioning must be an object: name -> array (nested lists, or "
                                '{"dtype": ..., "shape": [...], "base64": ...})')
    if labels is None and not cond:
        raise RequestError(400, "nothing to generate: give class_labels (class-conditional models) or conditioning")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RequestError(400, f"seed must be a whole number in [0, 2**63 - 1], got {_short(seed)}")
    scale = data.get("guidance_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise RequestError(400, f"guidance_scale must be a finite number or null (the bundle's default), got {_short(scale)}")
    upscale = data.get("scale", 1)
    if isinstance(upscale, bool) or not isinstance(upscale, int) or not 1 <= upscale <= MAX_SCALE:
        raise RequestError(400, f"scale must be a whole number in [1, {MAX_SCALE}], got {_short(upscale)}")
    columns = data.get("columns")
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise RequestError(400, f"columns must be a whole number of at least 1, got {_short(columns)}")
    return GenerateRequest(class_labels=labels, conditioning={str(k): _array(str(k), v) for k, v in cond.items()},
                           seed=seed, guidance_scale=None if scale is None else float(scale), scale=upscale,
                           columns=columns)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _array(name: str, value: Any) -> np.ndarray:
    """A conditioning array from nested lists or {"dtype", "shape", "base64"} (raw little-endian
    bytes in C order: the compact form for large embeddings)."""
    if isinstance(value, dict):
        keys = {"dtype", "shape", "base64"}
        if set(value) != keys:
            raise RequestError(400, f"conditioning {name!r}: an encoded array has exactly the keys {sorted(keys)}, "
                                    f"got {sorted(value)}")
        dtype, shape = value["dtype"], value["shape"]
        if dtype not in ARRAY_DTYPES:
            raise RequestError(400, f"conditioning {name!r}: dtype must be one of {list(ARRAY_DTYPES)}, got {_short(dtype)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise RequestError(400, f"conditioning {name!r}: shape must be a list of whole numbers, got {_short(shape)}")
        try:
            raw = base64.b64decode(value["base64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise RequestError(400, f"conditioning {name!r}: base64 is not valid base64") from None
        dt = np.dtype(dtype).newbyteorder("<")
        expected = math.prod(shape) * dt.itemsize
        if len(raw) != expected:
            raise RequestError(400, f"conditioning {name!r}: {len(raw)} bytes do not fill shape {shape} of {dtype} "
                                    f"({expected} bytes)")
        return np.frombuffer(raw, dtype=dt).reshape(shape).astype(dtype)
    if not isinstance(value, list):
        raise RequestError(400, f"conditioning {name!r} must be an array (nested lists, first axis = sample), "
                                f"got {_short(value)}")
    try:
        array = np.asarray(value)
    except ValueError:
        raise RequestError(400, f"conditioning {name!r} is not a rectangular array: its nested lists differ in "
                                "length") from None
    if array.dtype.kind not in "biuf":
        raise RequestError(400, f"conditioning {name!r} must hold numbers only")
    return array


# ---- the response ------------------------------------------------------------------------
def negotiate(accept: str | None) -> str:
    """The media type to answer with for an `Accept` header (missing: PNG), or RequestError(406).
    The client's highest q-value wins; among equal ones, the first listed."""
    if accept is None or not accept.strip():
        return PNG
    best, best_q = None, 0.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media in MEDIA_TYPES and q > best_q:
            best, best_q = MEDIA_TYPES[media], q
    if best is None:
        raise RequestError(406, f"cannot answer with Accept: {accept}; ask for {PNG} (a grid of the images) or "
                                f"{NPZ} (the arrays)")
    return best


@dataclass(frozen=True)
class Generated:
    """One request's samples, as `Pipeline.generate` would return them."""

    samples: np.ndarray                 # (n, C, H, W) float32
    class_labels: np.ndarray | None
    seed: int
    guidance_scale: float | None


def encode(generated: Generated, media: str, scale: int = 1, columns: int | None = None) -> bytes:
    """The response body: a PNG grid of the images or an NPZ of the arrays."""
    result = GenerationResult(generated.samples, generated.class_labels, [], 0.0,
                              guidance_scale=generated.guidance_scale)
    buf = io.BytesIO()
    if media == PNG:
        result.grid(columns=min(columns or len(generated.samples), len(generated.samples)), scale=scale).save(buf, "PNG")
        return buf.getvalue()
    arrays = {"samples": generated.samples, "images": result.images(), "seed": np.int64(generated.seed)}
    if generated.class_labels is not None:
        arrays["class_labels"] = generated.class_labels
    if generated.guidance_scale is not None:
        arrays["guidance_scale"] = np.float64(generated.guidance_scale)
    np.savez(buf, **arrays)
    return buf.getvalue()
