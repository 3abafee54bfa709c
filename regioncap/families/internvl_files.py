"""What an InternVL3.5 model folder holds (tile size, special tokens, chat template, processor
settings), and the offline builds: the tiny random-weight model and the full-size tokenizer.

No model hub: the tokenizer is regioncap's offline byte-level BPE (:mod:`regioncap.tiny`)
with Qwen's special tokens, then InternVL3.5's (Qwen3's four, ``<img>``, ``</img>``,
``<IMG_CONTEXT>``, ``<quad>``, ``</quad>``, ``<ref>``, ``</ref>``, ``<box>``, ``</box>``,
``<video>``) in their real order; the chat template is the ``-HF`` checkpoints'; the image
processor has the published tiling (448 px tiles, 1 to 12, thumbnail, ImageNet mean/std);
the model is a real ``InternVLForConditionalGeneration`` (InternViT + Qwen3) with tiny
dimensions but the real tile size, patch size and pixel shuffle, so a tile costs 256
visual tokens as in the published models. Its captions are noise.

The build is deterministic (same seed and library versions -> the same weights), atomic
(built next to the target, then moved in) and idempotent (a complete folder is reused).
torch, transformers and tokenizers are imported inside the builders only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from regioncap.tiny import IMAGENET_MEAN, IMAGENET_STD, TINY_LAYERS

#: Side of one tile in pixels (the vision tower's ``image_size``) in the published models.
TILE = 448
#: Visual tokens of one 448 px tile: (448 / 14 / 2) ** 2.
TOKENS_PER_TILE = 256

#: The chat template of the ``-HF`` checkpoints (transformers' InternVL conversion), verbatim:
#: ChatML, no default system turn, ``<IMG_CONTEXT>\n`` for an image, ``<video>\n`` for a video.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

#: Tokens InternVL3.5's tokenizer has after Qwen2.5's 22 (Qwen3's four, then InternVL's), in id
#: order from 151665; the bool says whether the token is special. ``<img>`` is 151669 and
#: ``<IMG_CONTEXT>`` 151671 (the config's ``image_token_id``) in the published tokenizer.
INTERNVL_ADDED_TOKENS: List[Tuple[str, bool]] = [
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
    ("<img>", True),
    ("</img>", True),
    ("<IMG_CONTEXT>", True),
    ("<quad>", True),
    ("</quad>", True),
    ("<ref>", True),
    ("</ref>", True),
    ("<box>", True),
    ("</box>", True),
    ("<video>", True),
]

#: The processor reads its image tokens from these tokenizer attributes (``extra_special_tokens``).
EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

#: ImageNet mean/std, as in the published ``preprocessor_config.json``.
IMAGE_MEAN, IMAGE_STD = IMAGENET_MEAN, IMAGENET_STD


#: Bump when the folder's content changes; a folder with another version is rebuilt.
BUILDER_VERSION = 1
#: Written last into a finished folder: its presence means "complete".
MARKER = "regioncap_tiny_internvl.json"

#: Tiny Qwen3 text model (:data:`regioncap.tiny.TINY_LAYERS`).
TEXT_DIMS: Dict[str, Any] = dict(
    TINY_LAYERS,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=8192,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
#: Tiny InternViT with the published tile (448) and patch (14) sizes: 1,024 patches a tile,
#: pixel-shuffled by the downsample ratio 0.5 to 256 visual tokens.
VISION_DIMS: Dict[str, Any] = dict(
    TINY_LAYERS,
    image_size=TILE,
    patch_size=14,
    attention_bias=True,
    use_qk_norm=False,
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    layer_scale_init_value=0.1,
    use_absolute_position_embeddings=True,
    use_mean_pooling=True,
)


def preprocessor_config(min_tiles: int = 1, max_tiles: int = 12) -> Dict[str, Any]:
    """The image processor's settings as the ``-HF`` checkpoints publish them."""
    return {
        "crop_to_patches": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": IMAGE_MEAN,
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "image_std": IMAGE_STD,
        "max_patches": max_tiles,
        "min_patches": min_tiles,
        "processor_class": "InternVLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": TILE, "width": TILE},
    }


def write_tokenizer(folder: Path, *, padded: bool = False) -> Dict[str, int]:
    """Write InternVL3.5's tokenizer (offline BPE, real special tokens and chat template) into ``folder``.

    ``padded``: Qwen's special tokens at their real ids (``<|endoftext|>`` 151643, so
    ``<IMG_CONTEXT>`` is 151671), for the full-size architectures; else right after the
    1,000 trained tokens (the tiny model). Returns the ids of the added tokens.
    """
    from regioncap import random_weights, tiny

    names = {"chat_template": CHAT_TEMPLATE, "processor_class": "InternVLProcessor"}
    if padded:
        random_weights.padded_tokenizer(folder, **names)
    else:
        tiny.write_tokenizer(folder, **names)
    return tiny.append_tokens(folder, INTERNVL_ADDED_TOKENS, extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
                              model_max_length=40960 if padded else 8192)


def write_processor_files(folder: Path, *, preprocessor: bool = True) -> None:
    """``processor_config.json`` and ``chat_template.json`` of the ``-HF`` layout, and (``preprocessor``)
    ``preprocessor_config.json`` with the published settings."""
    from regioncap.tiny import write_json

    if preprocessor:
        write_json(folder / "preprocessor_config.json", preprocessor_config())
    write_json(folder / "processor_config.json",
               {"image_seq_length": TOKENS_PER_TILE, "processor_class": "InternVLProcessor"})
    write_json(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})


def write_arch_files(folder: Path) -> None:
    """What a weightless full-size folder needs beside the published ``config.json`` and
    ``preprocessor_config.json`` (kept in ``regioncap/archs``): the tokenizer with the real ids, the
    processor config and the chat template (``model.weights=random``)."""
    write_tokenizer(folder, padded=True)
    write_processor_files(folder, preprocessor=False)


def build_seeded(tmp: Path, seed: int) -> Dict[str, Any]:
    """Write the tiny model folder into ``tmp`` (the caller keeps the RNGs private)."""
    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration

    from regioncap import tiny

    ids = write_tokenizer(tmp)
    n_tokens = max(ids.values()) + 1
    vocab_size = tiny.embedding_rows(n_tokens)
    im_end, eot = ids["<|im_end|>"], ids["<|endoftext|>"]
    config = InternVLConfig(
        text_config=dict(model_type="qwen3", **TEXT_DIMS, vocab_size=vocab_size, tie_word_embeddings=False,
                         bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot,
                         architectures=["Qwen3ForCausalLM"]),
        vision_config=dict(VISION_DIMS),
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    tiny.save_model(tmp, InternVLForConditionalGeneration, config,
                    GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False),
                    seed)
    write_processor_files(tmp)
    return {"vocab_size": vocab_size, "n_tokens": n_tokens, "image_token_id": ids["<IMG_CONTEXT>"],
            **tiny.versions()}


def tiny_folder() -> Any:
    """What marks a finished tiny InternVL3.5 (:class:`regioncap.tiny.TinyFolder`)."""
    from regioncap.tiny import TinyFolder

    return TinyFolder(MARKER, {"builder_version": BUILDER_VERSION})


def is_complete(out_dir: Path, seed: Optional[int] = None) -> bool:
    """True when ``out_dir`` is a finished tiny InternVL of this builder version (and ``seed``, if given)."""
    return tiny_folder().is_complete(Path(out_dir), seed)


def build_tiny_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny InternVL3.5 into ``out_dir`` (or reuse it) and return its absolute path
    (:func:`regioncap.tiny.build_folder`: atomic, seeded, reused when complete)."""
    from regioncap import tiny

    return tiny.build_folder(out_dir, tiny_folder(), lambda tmp: build_seeded(tmp, seed), seed=seed, name="internvl")
