"""Florence-2 (``model=florence2_base``, ``florence2_large``): an encoder-decoder with location tokens.

What differs from the Qwen-VL families, as transformers 5.25's native ``florence2``
model and processor have it (checked against that code and the published
``preprocessor_config.json``; ``regioncap/archs/README.md`` says where each value
comes from):

- pixels: the processor (``CLIPImageProcessor``) resizes every image to a fixed
  square, 768 x 768, without keeping the aspect ratio; the model sees that
  square. ``model.min_pixels``/``max_pixels`` do not apply (:attr:`Florence2.Config.image_size`
  is the size). The DaViT vision tower strides 32 px per visual token and the
  projector adds one pooled token: ``(768 / 32)^2 + 1 = 577`` visual tokens, the
  processor's ``image_seq_length``.
- coordinates: location tokens ``<loc_0>`` .. ``<loc_999>``, relative to the image
  (x on its width, y on its height). A pixel ``x`` is in bin ``floor(x / (W / 1000))``
  clamped to 0..999 (the processor's ``quantize``); a bin reads back as its centre,
  ``(bin + 0.5) * W / 1000`` (``dequantize``). A box is four tokens, x1 y1 x2 y2.
- tasks instead of chat: there is no chat template. A prompt is the text the
  encoder reads: a task token (``<OD>``, ``<REGION_TO_DESCRIPTION>`` + a box's four
  location tokens), which the processor expands to its task sentence, or any free
  text (a DataFlow-MM prompt is passed as it is written). The processor puts the
  image tokens, ``<s>`` and ``</s>`` around it.
- grounding: ``<OD>`` answers ``label<loc_x1><loc_y1><loc_x2><loc_y2>label...``
  (:meth:`Florence2.parse_grounding`); the location tokens are special tokens, so an
  answer must be decoded with them kept.
- region captioning without marks: ``<REGION_TO_DESCRIPTION>`` with the region's
  location tokens (:meth:`Florence2.region_prompt`, the ``prompt=region`` strategy).

Standard library at import time; transformers, torch and tokenizers inside
:meth:`Florence2.build_tiny` only.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from regioncap.components import check, whole
from regioncap.families.base import Family, PixelBox

#: Location bins per side: ``<loc_0>`` .. ``<loc_999>``.
BINS = 1000
#: Pixels per visual token of the DaViT tower (its four stages stride 4 x 2 x 2 x 2).
STRIDE = 32
#: The task token of object detection, the family's grounding request.
OD_TASK = "<OD>"
#: The task token of region captioning; the region's four location tokens follow it.
REGION_TASK = "<REGION_TO_DESCRIPTION>"

#: Florence-2's added tokens after the BART vocabulary (and its ``<mask>``), in their real
#: order (the original processor's ``tokens_to_add``; the spelling ``desciption`` is theirs).
ADDED_TOKENS: Tuple[str, ...] = (
    ("<od>", "</od>", "<ocr>", "</ocr>")
    + tuple(f"<loc_{i}>" for i in range(BINS))
    + ("<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
       "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
       "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>")
)
#: The image placeholder the transformers conversion added after them (id 51289 in the real vocabulary).
IMAGE_TOKEN = "<image>"
#: BART's first four tokens; ``<mask>`` is the last token of its byte-level BPE vocabulary.
BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

_LOC = re.compile(r"<loc_(\d+)>")
# One object of an <OD> answer: its label (no '<'), then one or more boxes of four location tokens.
_OBJECT = re.compile(r"([^<]*)((?:<loc_\d+>){4,})")
# Tokens an answer may carry around the objects (kept by a decode that keeps special tokens).
_NOISE = re.compile(r"</?s>|<pad>|</?od>")

#: Dimensions of the tiny random-weight build (vision strides stay the real 4 x 2 x 2 x 2).
TINY_TEXT: Dict[str, Any] = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 max_position_embeddings=1024)
TINY_VISION: Dict[str, Any] = dict(depths=[1, 1, 1, 1], embed_dim=[8, 16, 32, 64], num_heads=[1, 1, 2, 2],
                                   num_groups=[1, 1, 2, 2], window_size=2, projection_dim=32,
                                   max_position_embeddings=50, max_temporal_embeddings=100)
#: The tiny build's input square: 2 x 2 visual tokens + 1.
TINY_IMAGE_SIZE = 64
#: Bump when the tiny folder's content changes; a folder with another version is rebuilt.
TINY_VERSION = 1
TINY_MARKER = "regioncap_tiny.json"


def to_bin(value: float, side: float) -> int:
    """The location bin of pixel coordinate ``value`` on a side of ``side`` pixels (the processor's ``quantize``)."""
    return min(BINS - 1, max(0, math.floor(value / (side / BINS))))


def from_bin(index: int, side: float) -> float:
    """The pixel coordinate a location bin reads back as: its centre (the processor's ``dequantize``)."""
    return (index + 0.5) * side / BINS


def loc_text(bins: Sequence[int]) -> str:
    """``<loc_a><loc_b>...`` of location bins."""
    return "".join(f"<loc_{int(b)}>" for b in bins)


class Florence2(Family):
    """Florence-2: a fixed 768 px square, 577 visual tokens, ``<loc_N>`` boxes, task prompts, no chat template."""

    @dataclass
    class Config(Family.Config):
        """The ``model`` section of a Florence-2 model: its input square instead of a pixel budget."""

        #: Side of the square every image is resized to (the processor's ``size``); the
        #: pixel budget (``min_pixels``/``max_pixels``) does not apply to this family.
        image_size: int = field(default=768, metadata=check(
            (lambda v: whole(STRIDE)[0](v) and v % STRIDE == 0, f"a whole multiple of {STRIDE}")))
        #: Pixels per visual token: the vision tower's total stride (``patch_size x merge_size``).
        patch_size: int = field(default=STRIDE, metadata=check(whole(1)))
        merge_size: int = field(default=1, metadata=check(whole(1)))
        #: BART's learned positions: 1024 for Florence-2-base (577 of them are the image).
        max_model_len: int = field(default=1024, metadata=check(whole(1)))

    name = "florence2"
    model_types = ("florence2",)
    transformers_class = "Florence2ForConditionalGeneration"
    grid = BINS
    archs = {
        "florence-community/Florence-2-base": "florence2_base",
        "florence-community/Florence-2-large": "florence2_large",
        # The original remote-code checkpoints: the same architectures (their random-weight build is the native one).
        "microsoft/Florence-2-base": "florence2_base",
        "microsoft/Florence-2-large": "florence2_large",
    }
    vllm_hint = ("vLLM 0.32 runs Florence-2 only with its out-of-tree plugin, vllm-project/bart-plugin; "
                 "without it use engine=transformers")

    # -- pixels --------------------------------------------------------------

    def _side(self) -> int:
        return self.cfg.image_size

    def input_size(self, width: int, height: int, source: str = "image") -> Tuple[int, int]:
        """Every image becomes the ``model.image_size`` square (aspect ratio not kept, as the processor does)."""
        side = self._side()
        return side, side

    def visual_tokens(self, width: int, height: int) -> int:
        """``(image_size / stride)^2`` spatial tokens plus one pooled token: 577 at 768 px."""
        unit = self.cfg.patch_size * self.cfg.merge_size
        per_side = self._side() // unit
        return per_side * per_side + 1

    # -- coordinates -----------------------------------------------------------

    def box_coords(self, box: PixelBox, size: Tuple[int, int]) -> List[int]:
        """The four location bins of ``box`` (pixels of an image of ``size``), x on the width, y on the height."""
        w, h = float(size[0]), float(size[1])
        x1, y1, x2, y2 = (float(v) for v in box)
        return [to_bin(x1, w), to_bin(y1, h), to_bin(x2, w), to_bin(y2, h)]

    def box_text(self, box: PixelBox, size: Tuple[int, int]) -> str:
        """``<loc_x1><loc_y1><loc_x2><loc_y2>``."""
        return loc_text(self.box_coords(box, size))

    def grounding_prompt(self) -> str:
        """``<OD>``: the processor turns it into "Locate the objects with category name in the image."."""
        return OD_TASK

    def region_prompt(self, box: PixelBox, size: Tuple[int, int]) -> str:
        """``<REGION_TO_DESCRIPTION><loc_x1><loc_y1><loc_x2><loc_y2>``: the caption of one region, no marks."""
        return REGION_TASK + self.box_text(box, size)

    def parse_grounding(self, text: Any, width: float, height: float, *, min_size: float = 1.0,
                        source: str = "vlm") -> List[Any]:
        """The boxes of an ``<OD>`` answer (``car<loc_53><loc_334><loc_933><loc_775>door<loc_...>...``).

        Each label is the text before its location tokens; every complete group of four
        tokens after it is one box with that label (Florence-2 repeats a label's boxes).
        Bins read back as their centres, corners in the wrong order are swapped, boxes are
        clipped to the image and those with a side under ``min_size`` pixels dropped; a
        bin outside 0..999 is not a Florence-2 answer and drops its box. Never raises on
        any ``text``.
        """
        from regioncap.families import grounding

        grounding.check_size(width, height)
        if not isinstance(text, str) or "<loc_" not in text:
            return []
        w, h = float(width), float(height)
        candidates: List[Tuple[List[float], Optional[str]]] = []
        for m in _OBJECT.finditer(_NOISE.sub("", text)):
            label = m.group(1).strip() or None
            bins = [int(b) for b in _LOC.findall(m.group(2))]
            for i in range(0, len(bins) - 3, 4):
                b = bins[i:i + 4]
                if any(v >= BINS for v in b):
                    continue
                # Each bin reads back as its centre in pixels (the numbers are pixels, no grid).
                candidates.append(([from_bin(b[0], w), from_bin(b[1], h), from_bin(b[2], w), from_bin(b[3], h)],
                                   label[:grounding.MAX_LABEL_CHARS] if label else None))
        return grounding.to_proposals(candidates, w, h, min_size=min_size, source=source)

    # -- chat ------------------------------------------------------------------

    def user_content(self, prompt: str) -> List[Dict[str, Any]]:
        """Florence-2 has no chat template: the engine passes ``prompt`` as the encoder's text (the
        processor adds the image tokens, ``<s>`` and ``</s>``). Kept for a caller that builds messages."""
        return [{"type": "image"}, {"type": "text", "text": prompt}]

    # -- building --------------------------------------------------------------

    @classmethod
    def build_tiny(cls, out_dir: Path) -> Path:
        """Build a tiny random-weight Florence-2 in ``out_dir`` (or reuse a complete one) and return it.

        The real layout and conventions at tiny sizes: a byte-level BPE trained here with
        BART's specials first and Florence-2's 1,024 added tokens and ``<image>`` after it,
        the native ``Florence2Processor`` (a 64 px square, 5 visual tokens), and a
        ``Florence2ForConditionalGeneration`` with the real vision strides. About 0.3M
        parameters. Atomic (built next to ``out_dir``, then moved in) and seeded.
        """
        from regioncap import tiny

        return tiny.build_folder(out_dir, tiny_folder(), _build_tiny_into, name=cls.name)

    @classmethod
    def write_arch_files(cls, folder: Path) -> None:
        """The tokenizer, processor and generation config of a weightless Florence-2 folder that holds the
        published ``config.json`` and ``preprocessor_config.json`` (``model.weights=random``).

        The tokenizer is :func:`write_tokenizer` padded to BART's 50,265 tokens, so ``<mask>`` is
        50264, ``<loc_0>`` 50269 and ``<image>`` 51289 as in the real one; the processor has the
        published preprocessor values (saved in transformers' own layout).
        """
        folder = Path(folder)
        pre = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        text = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("text_config", {})
        tokenizer = write_tokenizer(folder, bpe_size=50265)
        processor_files(folder, tokenizer, image_size=int(pre["size"]["height"]),
                        image_seq_length=int(pre["image_seq_length"]))
        generation_config(text).save_pretrained(folder)

    def max_crop_aspect(self) -> float:
        """Any crop becomes the square (the processor has no aspect limit): the project's crop limit."""
        from regioncap.images import MAX_CROP_ASPECT_RATIO

        return float(MAX_CROP_ASPECT_RATIO)


def generation_config(text_config: Mapping[str, Any]) -> Any:
    """The generation config of a Florence-2 text config: the decoder starts with ``</s>`` and its first
    token is ``<s>`` (BART's ``forced_bos_token_id``, which transformers 5 no longer keeps in the
    config), as the real checkpoints answer ``</s><s>...</s>``."""
    from transformers import GenerationConfig

    ids = {k: int(text_config.get(k, d)) for k, d in
           (("bos_token_id", 0), ("pad_token_id", 1), ("eos_token_id", 2), ("decoder_start_token_id", 2))}
    return GenerationConfig(forced_bos_token_id=ids["bos_token_id"], **ids)


def tiny_folder() -> Any:
    """What marks a finished tiny Florence-2 (:class:`regioncap.tiny.TinyFolder`)."""
    from regioncap.tiny import TinyFolder

    return TinyFolder(TINY_MARKER, {"family": Florence2.name, "builder_version": TINY_VERSION})


def write_tokenizer(folder: Path, bpe_size: Optional[int] = None) -> Any:
    """Write Florence-2's tokenizer layout into ``folder`` and return it (a transformers tokenizer).

    A byte-level BPE trained on :func:`regioncap.tiny.default_corpus` with ``<s> <pad> </s> <unk>``
    as ids 0-3 (BART's); with ``bpe_size`` the vocabulary is padded with never-produced
    fillers to that size, as the real BART vocabulary is 50,265 with ``<mask>`` last. Then
    ``<mask>``, Florence-2's :data:`ADDED_TOKENS` (special) and ``<image>``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import BartTokenizer

    from regioncap.tiny import default_corpus

    tok = Tokenizer(BPE(unk_token="<unk>", continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(BART_SPECIALS))
    tok.train_from_iterator(default_corpus(), trainer=trainer)
    if bpe_size is not None:
        _pad_vocab(tok, bpe_size - 1)  # <mask> is the last BPE id
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS + (IMAGE_TOKEN,)])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    tokenizer = BartTokenizer(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                              cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                              extra_special_tokens={"image_token": IMAGE_TOKEN})
    tokenizer.save_pretrained(folder)
    return tokenizer


def _pad_vocab(tok: Any, size: int) -> None:
    """Grow a trained BPE's vocabulary to ``size`` with strings no merge produces (encoding is unchanged)."""
    from tokenizers import Tokenizer

    from regioncap.tiny import fill_vocab

    data = json.loads(tok.to_str())
    fill_vocab(data["model"]["vocab"], size)
    new = Tokenizer.from_str(json.dumps(data))
    tok.model = new.model


def processor_files(folder: Path, tokenizer: Any, *, image_size: int, image_seq_length: int) -> Any:
    """Save the native ``Florence2Processor`` (CLIP image processor at ``image_size``, the tokenizer) into ``folder``."""
    from transformers import CLIPImageProcessor, Florence2Processor

    from regioncap.tiny import IMAGENET_MEAN, IMAGENET_STD

    ip = CLIPImageProcessor(size={"height": image_size, "width": image_size},
                            crop_size={"height": image_size, "width": image_size}, do_center_crop=False,
                            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3,
                            image_seq_length=image_seq_length)
    processor = Florence2Processor(image_processor=ip, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return processor


def _build_tiny_into(tmp: Path) -> Dict[str, Any]:
    """Write the tiny Florence-2 folder into the empty ``tmp`` (seed 0, :func:`regioncap.tiny.build_folder`)."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    from regioncap import tiny

    t0 = time.perf_counter()
    tokenizer = write_tokenizer(tmp)
    side = TINY_IMAGE_SIZE
    processor_files(tmp, tokenizer, image_size=side, image_seq_length=(side // STRIDE) ** 2 + 1)
    # Rounded up to 64 rows, as the transformers conversion did (51,290 tokens -> 51,328 rows).
    vocab_size = tiny.embedding_rows(len(tokenizer))
    ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2)
    config = Florence2Config(
        text_config=dict(TINY_TEXT, model_type="bart", vocab_size=vocab_size, decoder_start_token_id=2,
                         forced_bos_token_id=0, forced_eos_token_id=2, **ids),
        vision_config=dict(TINY_VISION), image_token_id=tokenizer.image_token_id)
    model = tiny.save_model(tmp, Florence2ForConditionalGeneration, config,
                            generation_config(config.text_config.to_dict()), seed=0)
    return {"vocab_size": vocab_size, "n_tokens": len(tokenizer), "image_token_id": tokenizer.image_token_id,
            "parameters": sum(p.numel() for p in model.parameters()), **tiny.versions(),
            "build_s": round(time.perf_counter() - t0, 2)}
