"""T5 prompt embeddings (diffsparse.text) against PixArtAlphaPipeline.encode_prompt."""

import sys

import numpy as np
import pytest
import torch

from diffsparse import text

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "cat", "dog", "on", "skateboard", "in", "the", "rain"]


def test_missing_transformers_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    text._load.cache_clear()
    with pytest.raises(ImportError, match="pip install transformers sentencepiece"):
        text.encode_t5(tmp_path, ["a cat"])


def _tiny_t5(folder):
    """A pipeline-style folder: a word-level tokenizer that ends every text with </s> as T5's
    does, and a 2-layer random T5 encoder."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    encoder = transformers.T5EncoderModel(config).eval()
    encoder.save_pretrained(str(folder / "text_encoder"))
    return tokenizer, encoder


def test_embeddings_match_the_pixart_pipeline(tmp_path):
    tokenizer, encoder = _tiny_t5(tmp_path)
    from diffusers import PixArtAlphaPipeline

    prompts = ["A red Cat ", "a dog on a skateboard in the rain"]  # the second is truncated at 6 tokens
    ours = text.pixart_conditioning(tmp_path, prompts, max_length=6)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
    with torch.no_grad():
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            prompts, negative_prompt="", device=torch.device("cpu"), clean_caption=False, max_sequence_length=6)
    for name, ref in [("prompt_embeds", embeds), ("prompt_attention_mask", mask),
                      ("negative_prompt_embeds", neg_embeds), ("negative_prompt_attention_mask", neg_mask)]:
        assert ours[name].dtype == np.float32
        np.testing.assert_allclose(ours[name], ref.float().numpy(), atol=1e-6, err_msg=name)
    assert ours["prompt_attention_mask"].sum(1).tolist() == [4, 6]
    assert ours["negative_prompt_attention_mask"].sum(1).tolist() == [1, 1]
    assert ours["prompt_embeds"].shape == (2, 6, 16)
    assert set(text.encode_t5(tmp_path, ["a cat"], max_length=6)) == {"prompt_embeds", "prompt_attention_mask"}
