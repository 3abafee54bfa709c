"""Gemma 3 (``model=gemma3_4b``, ``gemma3_12b``, ``gemma3_27b``): a fixed 896x896 input and JSON boxes on 0-1000.

What differs from Qwen2.5-VL, and what regioncap chose where Gemma 3 has no convention:

- Pixels. The processor squashes every image to ``896 x 896`` (bilinear, no aspect
  ratio kept); SigLIP sees 64 x 64 patches of 14 px, average-pooled 4 x 4 into
  256 visual tokens, whatever the image's size. ``model.min_pixels`` and
  ``model.max_pixels`` do not apply (``model.image_size`` is the side).
  Marks are drawn on the squashed ``896 x 896`` image, so the model sees exactly the
  pixels regioncap drew: line widths and label digits keep their drawn size, and
  boxes keep their relative position (a 0-1000 box of the original is the same 0-1000
  box of the squashed image). Padding to a square first would keep the content's
  aspect ratio but spend up to half the 256 tokens on padding (a 16:9 photo loses 44%
  of its rows) and show the model an input it was not trained on; the squash is what
  Gemma 3 itself does. The cost: content (not marks) is stretched on non-square
  images, as it is for every Gemma 3 user.
- Pan and scan (extra 896 px crops of elongated images, 256 tokens each) is off, as
  in the published processor config: regioncap sends the 896 x 896 image, which is
  square, and pan and scan never starts below an aspect ratio of 1.2.
- Normalisation: SigLIP's, mean = std = 0.5 per channel (not CLIP's, as Qwen).
- Coordinates. Gemma 3 has no grounding format: it was not trained for detection, and
  its tokenizer has no PaliGemma-style ``<locNNNN>`` tokens (PaliGemma's 1024 location
  tokens were added on top of Gemma's vocabulary; Gemma 3's 262,144 tokens do not
  include them). regioncap writes and asks for JSON ``{"bbox_2d": [x1, y1, x2, y2]}``
  on a 0-1000 grid relative to the image (x first, top-left then bottom-right), the
  layout Qwen2.5-VL/Qwen3-VL answer in, so one parser and one answer constraint serve
  all of them; the grounding request spells the convention out, as Gemma needs.
- Chat: Gemma's template (``<start_of_turn>user`` ... ``<end_of_turn>``); a system
  prompt is folded into the first user turn (Gemma has no system role); the image is
  the ``<start_of_image>`` placeholder, which the processor expands to
  ``\\n\\n<start_of_image>`` + 256 ``<image_soft_token>`` + ``<end_of_image>\\n\\n``.

Only the standard library and regioncap's light modules at import time; torch,
transformers and tokenizers inside the builders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from regioncap.components import check, whole
from regioncap.families.base import Family, PixelBox
from regioncap.families.grounding import JsonGrounding, grid_coords
from regioncap.tiny import TINY_LAYERS


#: The published input side (``preprocessor_config.json`` ``size``, the vision config's ``image_size``).
IMAGE_SIZE = 896
#: SigLIP's patch and Gemma 3's average pooling (4 x 4 patches per visual token): 56 px per token.
PATCH_SIZE = 14
POOL = 4
#: The relative grid of box coordinates in prompts and grounding answers.
GRID = 1000

BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

#: SigLIP normalisation (``image_mean`` / ``image_std`` of the published processor config).
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

#: Gemma 3's grounding request: it has no native format, so the request names the layout and the grid.
GROUNDING_PROMPT = (
    "Locate every object in the image. Answer with a JSON list with one item per object, "
    '[{"bbox_2d": [x1, y1, x2, y2], "label": "name"}, ...], where (x1, y1) is the top-left and '
    "(x2, y2) the bottom-right corner of the object's bounding box, as integers from 0 to 1000 "
    "relative to the image's width and height."
)

#: The chat template of google/gemma-3-4b-it (also 12b-it and 27b-it), verbatim.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

#: Gemma's first special tokens, at their real ids 0..4.
LEADING_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]

# -- the tiny build ------------------------------------------------------------------

#: Bump when the tiny folder's content changes; a folder of another version is rebuilt.
TINY_VERSION = 3
#: Written last into a finished tiny folder.
TINY_MARKER = "regioncap_tiny_gemma3.json"
#: The tiny model's input side: 224 px = 16 x 16 patches of 14 px, pooled 4 x 4 into 16 visual tokens.
TINY_IMAGE_SIZE = 224
#: Trained BPE size (specials and the 256 byte tokens included) before the added tokens.
TINY_BPE_VOCAB = 800
#: Tiny dimensions. head_dim 32: a size vLLM's CPU attention supports. One sliding and one
#: global layer, as Gemma 3 interleaves them (5:1 in the real models).
TINY_TEXT: Dict[str, Any] = dict(
    TINY_LAYERS, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=4096,
    sliding_window=512, layer_types=["sliding_attention", "full_attention"], rope_theta=1000000.0, rope_local_base_freq=10000.0,
)
TINY_VISION: Dict[str, Any] = dict(
    TINY_LAYERS, image_size=TINY_IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False,
)


class Gemma3(JsonGrounding, Family):
    """Gemma 3 (4B, 12B, 27B instruction-tuned): SigLIP at a fixed square input, 256 visual tokens."""

    @dataclass
    class Config(Family.Config):
        """The ``model`` section for Gemma 3: a fixed square input instead of a pixel budget."""

        #: Side of the square input in pixels (896 for every published Gemma 3); every image is
        #: squashed to it. A multiple of ``patch_size * merge_size``.
        image_size: int = field(default=IMAGE_SIZE, metadata=check(whole(1)))
        #: Not a budget for Gemma 3 (the input is ``image_size`` squared): kept equal to it.
        min_pixels: int = field(default=IMAGE_SIZE * IMAGE_SIZE, metadata=check(whole(1)))
        max_pixels: int = field(default=IMAGE_SIZE * IMAGE_SIZE, metadata=check(whole(1)))
        #: SigLIP's 14 px patches; ``merge_size`` is the 4 x 4 average pooling (56 px per visual token).
        patch_size: int = field(default=PATCH_SIZE, metadata=check(whole(1)))
        merge_size: int = field(default=POOL, metadata=check(whole(1)))

    name: ClassVar[str] = "gemma3"
    model_types: ClassVar[Tuple[str, ...]] = ("gemma3",)
    transformers_class: ClassVar[Optional[str]] = "Gemma3ForConditionalGeneration"
    grid: ClassVar[Optional[int]] = GRID
    image_placeholder: ClassVar[str] = BOI_TOKEN
    archs: ClassVar[Mapping[str, str]] = {
        "google/gemma-3-4b-it": "gemma3_4b",
        "google/gemma-3-12b-it": "gemma3_12b",
        "google/gemma-3-27b-it": "gemma3_27b",
    }

    def __init__(self, cfg: Optional[Gemma3.Config] = None) -> None:
        super().__init__(cfg)
        cfg = self.cfg
        self.side = cfg.image_size
        unit = cfg.patch_size * cfg.merge_size
        if self.side <= 0 or unit <= 0 or self.side % unit:
            raise ValueError(f"model.image_size={self.side} must be a positive multiple of "
                             f"model.patch_size * model.merge_size = {unit} (one visual token)")
        self.unit = unit

    # -- pixels --------------------------------------------------------------

    def input_size(self, width: int, height: int, source: str = "image") -> Tuple[int, int]:
        """``(image_size, image_size)`` for every image: Gemma 3 squashes, whatever the aspect ratio."""
        if width <= 0 or height <= 0:
            raise ValueError(f"{source}: image size must be positive, got {width}x{height}")
        return self.side, self.side

    def visual_tokens(self, width: int, height: int) -> int:
        """256 for the published models (``(image_size / 56)`` squared): one image, pan and scan off."""
        return (self.side // self.unit) ** 2

    def expand_images(self, text: str, width: int, height: int) -> str:
        """Each ``<start_of_image>`` as the Gemma 3 processor (and vLLM's) writes it: ``\\n\\n``, the
        begin token, one ``<image_soft_token>`` per visual token, the end token, ``\\n\\n``."""
        n = self.visual_tokens(width, height)
        return text.replace(BOI_TOKEN, f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * n}{EOI_TOKEN}\n\n")

    def processor_kwargs(self) -> Dict[str, Any]:
        """Pan and scan off (the processor's default, said explicitly): one 896 x 896 image, 256 tokens.
        No pixel budget: the processor's ``size`` is the input."""
        return {"do_pan_and_scan": False}

    # -- coordinates -----------------------------------------------------------

    def box_coords(self, box: PixelBox, size: Tuple[int, int]) -> List[int]:
        """``[x1, y1, x2, y2]`` on the 0-1000 grid of an image of ``size`` (rounded, clamped); written and
        read back as ``bbox_2d`` JSON (:class:`regioncap.families.grounding.JsonGrounding`)."""
        return grid_coords(box, size, GRID)

    def grounding_prompt(self) -> str:
        """:data:`GROUNDING_PROMPT`: the JSON layout and the 0-1000 grid spelled out."""
        return GROUNDING_PROMPT

    def max_crop_aspect(self) -> float:
        """1: ``prompt=crop`` cuts square crops (the short side widened with context), because every
        image is squashed to a square: a square crop is only scaled, never distorted."""
        return 1.0

    # -- building --------------------------------------------------------------

    @classmethod
    def build_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        """Build (or reuse) the tiny random-weight Gemma 3 in ``out_dir`` and return its absolute path.

        A real ``Gemma3ForConditionalGeneration`` (SigLIP 2 x 64, text 2 x 64, one sliding and
        one global layer) at a 224 px input (16 visual tokens), Gemma's chat template and
        special tokens, a BPE tokenizer with byte fallback trained here (no hub), the
        processor files in the hub layout. Deterministic for one seed and library version;
        atomic (built beside ``out_dir``, moved in with one rename); about 1 MB.
        """
        from regioncap import tiny

        return tiny.build_folder(out_dir, tiny_folder(), lambda tmp: build_tiny_into(tmp, seed), seed=seed,
                                 name=cls.name)

    @classmethod
    def chat_template(cls) -> str:
        """Gemma 3's official chat template (verbatim)."""
        return GEMMA3_CHAT_TEMPLATE

    @classmethod
    def write_arch_files(cls, folder: Path) -> None:
        """Write what a weightless folder of a published Gemma 3 needs beside its ``config.json`` and
        ``preprocessor_config.json``: the offline tokenizer with Gemma's special tokens at their
        published ids (the embedding's 262,208 rows), the chat template, ``processor_config.json``."""
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        ids = {START_OF_TURN: 105, END_OF_TURN: 106, BOI_TOKEN: int(config["boi_token_index"]),
               EOI_TOKEN: int(config["eoi_token_index"]), IMAGE_TOKEN: int(config["image_token_index"])}
        write_tokenizer(Path(folder), token_ids=ids)
        processor_files(Path(folder), image_size=None, tokens_per_image=int(config["mm_tokens_per_image"]))

# -- builders (heavy imports inside) ---------------------------------------------------


def tiny_folder() -> Any:
    """What marks a finished tiny Gemma 3 (:class:`regioncap.tiny.TinyFolder`)."""
    from regioncap.tiny import TinyFolder

    return TinyFolder(TINY_MARKER, {"family": Gemma3.name, "version": TINY_VERSION})


def write_tokenizer(folder: Path, *, bpe_vocab: int = TINY_BPE_VOCAB,
                    token_ids: Optional[Mapping[str, int]] = None) -> Any:
    """Train a small Gemma-style tokenizer and save it (with the chat template) into ``folder``; return it.

    Gemma's layout: spaces normalised to ``▁``, BPE with byte fallback (the 256
    ``<0xNN>`` tokens, so any text encodes), ``<pad> <eos> <bos> <unk> <mask>`` at ids
    0-4, one token per run of up to four newlines. The turn and image tokens go at
    ``token_ids`` (the published ids in ``model.weights=random`` folders, the vocabulary
    padded around them with ``<unusedN>`` entries no merge produces), or by default
    right after the trained vocabulary (``<image_soft_token>`` last, as in the real
    one). The trained vocabulary is regioncap's small English corpus
    (:func:`regioncap.tiny.default_corpus`), not Gemma's: text splits into more
    tokens than Gemma's own tokenizer makes.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer

    from regioncap.tiny import default_corpus

    trainer_tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, min_frequency=2, show_progress=False,
                                  special_tokens=LEADING_SPECIALS + [f"<0x{i:02X}>" for i in range(256)])
    trainer_tok.train_from_iterator(default_corpus(), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    trained = sorted(model["vocab"], key=model["vocab"].__getitem__)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Gemma has one token per run of newlines; vLLM's Gemma 3 processor looks up the runs of
    # one to four (it re-joins the "\n\n" around an image with the text's newlines).
    for run, merge in (("\n", None), ("\n\n", ("\n", "\n")), ("\n\n\n", ("\n\n", "\n")),
                       ("\n\n\n\n", ("\n\n", "\n\n"))):
        trained.append(run)
        if merge:
            merges.append(merge)
    named = [START_OF_TURN, END_OF_TURN, BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN]
    if token_ids is None:
        token_ids = {t: len(trained) + i for i, t in enumerate(named)}
    reserved = {i: t for t, i in token_ids.items()}
    vocab: Dict[str, int] = {}
    next_id = 0
    for t in trained:
        while next_id in reserved:
            next_id += 1
        vocab[t] = next_id
        next_id += 1
    vocab.update(token_ids)
    used = set(vocab.values())
    for i in range(max(used)):
        if i not in used:
            vocab[f"<unused{i}>"] = i
    tok = GemmaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, model_max_length=131072,
        # The named image tokens the Gemma 3 processor reads (tokenizer.boi_token ...).
        extra_special_tokens={"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_TOKEN},
    )
    tok.add_special_tokens({"extra_special_tokens": [START_OF_TURN, END_OF_TURN]},
                           replace_extra_special_tokens=False)
    got = {t: tok.convert_tokens_to_ids(t) for t in named}
    if got != dict(token_ids):  # pragma: no cover - a transformers change in how added tokens get ids
        raise RuntimeError(f"the Gemma tokenizer put its special tokens at {got}, not {dict(token_ids)}")
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return tok


def processor_files(folder: Path, *, image_size: Optional[int], tokens_per_image: int) -> None:
    """Write ``preprocessor_config.json``, ``processor_config.json`` and ``chat_template.json`` in the
    layout of the published Gemma 3 checkpoints, at ``image_size`` (896 there) and ``tokens_per_image``;
    ``image_size`` None: no ``preprocessor_config.json`` (a weightless folder has the published one)."""
    from regioncap.tiny import write_json

    if image_size is not None:
        write_json(folder / "preprocessor_config.json", _preprocessor_config(image_size, tokens_per_image))
    write_json(folder / "processor_config.json", {"image_seq_length": tokens_per_image,
                                                  "processor_class": "Gemma3Processor"})
    write_json(folder / "chat_template.json", {"chat_template": GEMMA3_CHAT_TEMPLATE})


def _preprocessor_config(image_size: int, tokens_per_image: int) -> Dict[str, Any]:
    return {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_pan_and_scan": None,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": SIGLIP_MEAN,
        "image_processor_type": "Gemma3ImageProcessor",
        "image_seq_length": tokens_per_image,
        "image_std": SIGLIP_STD,
        "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None,
        "processor_class": "Gemma3Processor",
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }


def _hub_weight_names(path: Path) -> None:
    """Rename the SigLIP weights to the published checkpoints' ``vision_tower.vision_model.*``.

    transformers 5.25 saves them as ``vision_tower.*``, which it reads back but vLLM 0.32
    does not ("no module or parameter named 'vision_tower.embeddings'"); every version
    reads the published names.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    prefix = "vision_tower."
    renamed = {(prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix)
                and not k.startswith(prefix + "vision_model.") else k): v for k, v in tensors.items()}
    if renamed.keys() != tensors.keys():
        save_file(renamed, str(path), metadata={"format": "pt"})


def build_tiny_into(folder: Path, seed: int = 0) -> Dict[str, Any]:
    """Write the tiny Gemma 3 folder into the empty ``folder`` with torch's RNG as it is (the caller seeds)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GenerationConfig

    from regioncap import tiny

    tok = write_tokenizer(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in LEADING_SPECIALS + [START_OF_TURN, END_OF_TURN, BOI_TOKEN,
                                                                       EOI_TOKEN, IMAGE_TOKEN]}
    vocab_size = tiny.embedding_rows(len(tok))
    tokens_per_image = (TINY_IMAGE_SIZE // (PATCH_SIZE * POOL)) ** 2
    config = Gemma3Config(
        text_config=dict(TINY_TEXT, vocab_size=vocab_size, pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
                         eos_token_id=ids["<eos>"]),
        vision_config=dict(TINY_VISION),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids[BOI_TOKEN],
        eoi_token_index=ids[EOI_TOKEN],
        image_token_index=ids[IMAGE_TOKEN],
    )
    config.pad_token_id, config.bos_token_id = ids["<pad>"], ids["<bos>"]
    config.eos_token_id = [ids["<eos>"], ids[END_OF_TURN]]
    tiny.save_model(folder, Gemma3ForConditionalGeneration, config,
                    GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                     eos_token_id=[ids["<eos>"], ids[END_OF_TURN]], do_sample=False), seed)
    _hub_weight_names(folder / "model.safetensors")
    processor_files(folder, image_size=TINY_IMAGE_SIZE, tokens_per_image=tokens_per_image)
    return {"vocab_size": vocab_size, "token_ids": ids, "tokens_per_image": tokens_per_image, **tiny.versions()}
