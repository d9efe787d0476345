"""T5 prompt embeddings for the text-conditioned families (PixArt-α), computed the way
`PixArtAlphaPipeline.encode_prompt` does: lower-cased, stripped prompt (the pipeline's
`clean_caption=False` path; its full caption cleaning needs bs4 and ftfy), tokenized with
padding="max_length" and truncation to `max_length` tokens, encoded by `T5EncoderModel` with the
attention mask. The unconditional rows for guidance are the encoding of "" (PixArt's negative
prompt), padded to the same length.

The result is a dict of float32 arrays named like the spec's conditioning inputs, ready for
`Pipeline.generate(conditioning=...)`. The encoder is read from a local folder only (nothing is
fetched from a hub): either a pipeline folder with `text_encoder/` and `tokenizer/`, or one folder
holding both. `transformers` is optional and imported only here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install transformers sentencepiece"


def _transformers() -> Any:
    """The `transformers` module, or an ImportError that says how to get it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"encoding prompts needs the T5 text encoder from `transformers`; "
                          f"install it with `{INSTALL_HINT}`") from e
    return transformers


def _folders(folder: Path) -> tuple[Path, Path]:
    """(text encoder folder, tokenizer folder) of a pipeline folder or a single combined folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {folder} does not exist")
    if (folder / "text_encoder").is_dir():
        tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder / "text_encoder"
        return folder / "text_encoder", tokenizer
    return folder, folder


@functools.lru_cache(maxsize=2)
def _load(folder: str) -> tuple[Any, Any]:
    """(tokenizer, encoder) from a local folder; cached so the prompt and the negative prompt
    share one load."""
    tf = _transformers()
    encoder_dir, tokenizer_dir = _folders(Path(folder))
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    encoder = tf.T5EncoderModel.from_pretrained(str(encoder_dir), local_files_only=True).eval()
    log.info("loaded T5 text encoder from %s", encoder_dir)
    return tokenizer, encoder


def _encode(folder: str | Path, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, max_length, D), mask (n, max_length)) as float32, PixArt's way."""
    import torch

    if isinstance(texts, str):
        raise TypeError("pass a list of prompts, not a single string")
    if not texts:
        raise ValueError("no prompts given")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tokenizer, encoder = _load(str(Path(folder).resolve()))
    tokens = tokenizer([t.lower().strip() for t in texts], padding="max_length", max_length=max_length,
                       truncation=True, add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        embeds = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return embeds.float().numpy(), tokens.attention_mask.numpy().astype(np.float32)


def encode_t5(encoder_folder: str | Path, prompts: Sequence[str], max_length: int = 120) -> dict[str, np.ndarray]:
    """`prompt_embeds` (n, max_length, D) and `prompt_attention_mask` (n, max_length) for prompts."""
    embeds, mask = _encode(encoder_folder, prompts, max_length)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def encode_negative_t5(encoder_folder: str | Path, count: int, max_length: int = 120,
                       negative_prompt: str = "") -> dict[str, np.ndarray]:
    """`negative_prompt_embeds` and `negative_prompt_attention_mask` for `count` samples: the
    unconditional rows of classifier-free guidance (PixArt-α's negative prompt is "")."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    embeds, mask = _encode(encoder_folder, [negative_prompt] * count, max_length)
    return {"negative_prompt_embeds": embeds, "negative_prompt_attention_mask": mask}


def pixart_conditioning(encoder_folder: str | Path, prompts: Sequence[str], guidance: bool = True,
                        max_length: int = 120, negative_prompt: str = "") -> dict[str, np.ndarray]:
    """Everything a PixArt bundle's `generate(conditioning=...)` takes for these prompts."""
    out = encode_t5(encoder_folder, prompts, max_length)
    if guidance:
        out.update(encode_negative_t5(encoder_folder, len(prompts), max_length, negative_prompt))
    return out
