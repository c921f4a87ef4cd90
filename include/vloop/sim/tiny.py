"""Build the tiny Qwen3-VL that tests, demos and benchmarks run on (``vloop tiny-model``).

No weights can be downloaded here, so the project makes its own: a ``Qwen3VLConfig`` scaled down
to about a million parameters with random initialisation, a byte-level BPE tokenizer trained
locally on the synthetic world's text with Qwen's special tokens and chat format, and a
``Qwen2VLImageProcessor`` (PIL backend) that resizes every picture to 128x128. It is saved with
``save_pretrained`` and reloads offline through :func:`vloop.vlm.model.load_model`, the same path as
Qwen3-VL-8B. Deterministic for a seed.

Shape facts that bite: the text ``rope_parameters.mrope_section`` must sum to ``head_dim / 2``;
the vision ``num_position_embeddings`` must be a perfect square; with patch 16 and merge 2 a
128x128 image becomes 8x8 patches and 16 image tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
IMAGE_SIDE = 128
VOCAB_SIZE = 640

# Qwen's chat format: <|im_start|>role\n...<|im_end|>\n, images as vision_start/image_pad/vision_end.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE, seed: int = 0):
    """A byte-level BPE tokenizer (any UTF-8 text encodes) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    random.Random(seed).shuffle(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024)


def tiny_config(tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = 32
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                max_position_embeddings=1024, pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [4, 6, 6],  # sums to head_dim / 2
                                 "mrope_interleaved": True})
    patches = IMAGE_SIDE // 16
    vision = dict(depth=2, hidden_size=96, intermediate_size=192, num_heads=4, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
                  num_position_embeddings=patches * patches,  # a perfect square
                  deepstack_visual_indexes=[1])
    return Qwen3VLConfig(text_config=text, vision_config=vision,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         tie_word_embeddings=False)


def build_tiny_model(out: str | Path, seed: int = 0) -> Path:
    """Build, save and reload-check the tiny Qwen3-VL in ``out``. Returns the directory."""
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vloop.vlm.model import load_model, processor_class
    from vloop.sim.synth import corpus

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = corpus() + ["user", "assistant", "system", "You are a helpful shopping assistant."]
    tokenizer = train_tokenizer(texts * 4, seed=seed)
    side = IMAGE_SIDE * IMAGE_SIDE
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                               min_pixels=side, max_pixels=side,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                  chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_config(tokenizer))
    model.generation_config = GenerationConfig(eos_token_id=model.config.eos_token_id,
                                               pad_token_id=model.config.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "vloop_model.json").write_text(json.dumps({"kind": "tiny-qwen3-vl", "seed": seed,
                                                      "parameters": model.num_parameters()}, indent=2))
    load_model(out)  # fail here, not later, if it does not reload offline
    return out
