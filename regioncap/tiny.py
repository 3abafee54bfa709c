"""Tiny random-weight models, built locally and fully offline: the one build path every model family's
tiny build takes (:func:`build_folder`, with the pieces the builds share), and the tiny Qwen2.5-VL
and Qwen3-VL.

A family's build passes what differs (its tokenizer, config, weights and processor files, written
by its own function into an empty folder; the :class:`TinyFolder` that marks it finished);
:func:`build_folder` seeds the RNGs privately, builds next to the target, moves the folder in
atomically and reuses a complete one.

For the tiny Qwen2.5-VL no model hub is needed: the tokenizer is a byte-level BPE trained here on a
small English corpus generated in code, with Qwen's special tokens in their
real order; the chat template is Qwen2.5-VL's official one; the image
processor has the real patch (14), merge (2) and temporal patch (2) sizes; the
model is a real ``Qwen2_5_VLForConditionalGeneration`` with tiny dimensions.
Its captions are noise, but every code path of a real model runs: the
processor, the chat template, the vision tower, M-RoPE, generation, and the
folder loads in transformers and in vLLM.

The folder has the file layout of the real hub checkpoints (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json,
preprocessor_config.json, chat_template.json), so transformers 4.57 to 5.24
and vLLM 0.32 all read it, whichever of them built it.

The build is deterministic (same seed and same torch/transformers versions ->
bit-identical weights; other transformers versions initialise differently),
atomic (built in a temporary folder next to the target, then moved in with
``os.replace``) and idempotent (a complete folder is reused). It takes well
under a second once torch and transformers are imported (about 5 s).

torch, transformers and tokenizers are imported inside the builder only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

#: Bump when the folder's content changes; a folder with another version is rebuilt.
BUILDER_VERSION = 1
#: Written last into a finished folder: its presence means "complete".
MARKER = "regioncap_tiny.json"

_BUILD_LOCK = threading.Lock()

#: Qwen2.5-VL's added tokens, in their real order (ids follow the BPE vocabulary,
#: as in the real tokenizer where ``<|endoftext|>`` is 151643). The bool says
#: whether the token is special (``<tool_call>`` and friends are not).
QWEN_ADDED_TOKENS: List[tuple] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]

#: The official Qwen2.5-VL-Instruct chat template, verbatim.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen3-VL-Instruct's chat template as it renders regioncap's messages (an optional system turn, user
#: turns of images and text, assistant turns): unlike Qwen2.5-VL's, no default system turn. Written
#: from the published template, whose tool-call branches are left out (regioncap sends no tools).
QWEN3VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}{%- else %}"
    "{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for content_item in message.content %}{%- if 'text' in content_item %}{{- content_item.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

#: Qwen2's pre-tokenizer split (same regex as ``transformers``' Qwen2Tokenizer).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Trained BPE vocabulary size (256 byte tokens + merges), before the added tokens.
BPE_VOCAB_SIZE = 1000

#: Image budget of the tiny model: 56x56 .. 224x224 pixels, i.e. 4 .. 64 visual tokens.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224

# CLIP mean/std, as in Qwen2.5-VL's preprocessor_config.json.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
#: ImageNet mean/std, as in InternVL3.5's and Florence-2's preprocessor_config.json.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: The size of every family's tiny transformers, text and vision: 64 wide, two layers of two
#: heads, so a head is 32 wide (a size vLLM's CPU attention supports).
TINY_LAYERS: Dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)

#: Tiny dimensions (:data:`TINY_LAYERS`). ``mrope_section`` must sum to head_dim / 2;
#: ``fullatt_block_indexes`` must be below the vision depth; the vision output size must
#: equal the text hidden size.
TEXT_DIMS: Dict[str, Any] = dict(
    TINY_LAYERS,
    num_key_value_heads=1,
    max_position_embeddings=4096,
    rope_theta=1000000.0,
    mrope_section=[4, 6, 6],
)
VISION_DIMS: Dict[str, Any] = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=64,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    tokens_per_second=2,
)


def default_corpus() -> List[str]:
    """A small, fixed English corpus in the domain of region captions."""
    colours = ["red", "orange", "yellow", "green", "blue", "purple", "white", "black", "brown", "grey", "pink"]
    sizes = ["small", "large", "tiny", "big", "tall", "short", "round", "long"]
    things = [
        "person", "man", "woman", "child", "dog", "cat", "car", "bus", "tree", "house", "window", "door",
        "table", "chair", "cup", "bottle", "plate", "book", "phone", "bird", "horse", "bicycle", "sign",
        "circle", "square", "triangle", "star", "ellipse", "shape", "building", "road", "sky", "cloud",
        "shirt", "hat", "bag", "flower", "grass", "wall", "floor", "boat", "water", "rocket", "astronaut",
    ]
    places = ["on the left", "on the right", "in the middle", "at the top", "at the bottom", "in the corner",
              "next to the wall", "near the door", "under the table", "behind the car", "in front of the house"]
    verbs = ["standing", "sitting", "walking", "running", "lying", "holding a cup", "looking up", "parked"]
    lines: List[str] = []
    for i, thing in enumerate(things):
        for j, colour in enumerate(colours):
            size = sizes[(i + j) % len(sizes)]
            place = places[(i * 3 + j) % len(places)]
            verb = verbs[(i + 2 * j) % len(verbs)]
            article = "an" if size[0] in "aeiou" else "a"
            lines.append(f"{article.capitalize()} {size} {colour} {thing} {verb} {place}.")
            lines.append(f"{i + 1}: the {colour} {thing} {place}")
            lines.append(f'{{"region": {j + 1}, "caption": "{article} {colour} {thing}"}}')
    lines += [
        "Describe each numbered region in one short phrase.",
        "Answer with one line per region, in the form 'N: caption'.",
        "Region 1 is a person. Region 2 is a dog. Region 3 shows the sky.",
        "The image shows a street with cars, people and trees. It's a sunny day; they're walking.",
        "0123456789 (x1, y1, x2, y2) [10, 20, 300, 400] <box> </box> - _ / \\ : ; ! ? # % & * + =",
    ]
    return lines


def write_tokenizer(folder: Path, corpus: Optional[List[str]] = None, vocab_size: int = BPE_VOCAB_SIZE, *,
                    chat_template: str = QWEN25VL_CHAT_TEMPLATE, processor_class: str = "Qwen2_5_VLProcessor") -> None:
    """Train the byte-level BPE on ``corpus`` (default: :func:`default_corpus`); write a Qwen2 tokenizer to ``folder``.

    Written in the layout of the real Qwen2.5-VL checkpoints (``tokenizer.json``
    with the added tokens after the BPE vocabulary, ``tokenizer_config.json``
    with ``additional_special_tokens`` and the chat template), which every
    transformers version reads; transformers 5's own ``save_pretrained`` writes
    ``extra_special_tokens`` as a list, which 4.x cannot load.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        # The full 256-byte alphabet, so any text (any language, any byte) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus if corpus is not None else default_corpus(), trainer=trainer)
    ids = add_tokens(tok, QWEN_ADDED_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": token_entries(QWEN_ADDED_TOKENS, ids),
        "additional_special_tokens": [t for t, special in QWEN_ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "processor_class": processor_class,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })


# -- pieces every family's tiny build shares -------------------------------------------------


def add_tokens(tok: Any, tokens: Sequence[Tuple[str, bool]]) -> Dict[str, int]:
    """Add ``tokens`` (``(content, special)``) to the ``tokenizers.Tokenizer`` ``tok`` and return their ids.

    One call per token keeps the order: the ids follow each other after the tokens
    ``tok`` has, as in the real tokenizers. A token that is not special is added as
    a plain added token (Qwen's ``<tool_call>`` and friends).
    """
    from tokenizers import AddedToken

    for content, special in tokens:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    return {content: tok.token_to_id(content) for content, _ in tokens}


def token_entries(tokens: Sequence[Tuple[str, bool]], ids: Mapping[str, int]) -> Dict[str, Dict[str, Any]]:
    """``added_tokens_decoder`` entries of ``tokenizer_config.json`` for ``tokens`` at ``ids``."""
    return {str(ids[content]): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": special}
            for content, special in tokens}


def append_tokens(folder: Path, tokens: Sequence[Tuple[str, bool]], **config: Any) -> Dict[str, int]:
    """Append ``tokens`` to the tokenizer written in ``folder`` (:func:`write_tokenizer`, or one padded to
    real ids) and set ``config`` in its ``tokenizer_config.json``; return the ids of every added token.

    The special ones join ``additional_special_tokens``, each gets its ``added_tokens_decoder``
    entry: a family whose tokenizer is Qwen's plus tokens of its own (InternVL3.5).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = add_tokens(tok, tokens)
    tok.save(str(folder / "tokenizer.json"))
    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tcfg["added_tokens_decoder"].update(token_entries(tokens, ids))
    tcfg["additional_special_tokens"] = tcfg["additional_special_tokens"] + [t for t, special in tokens if special]
    tcfg.update(config)
    write_json(cfg_path, tcfg)
    return {t.content: i for i, t in sorted(tok.get_added_tokens_decoder().items())}


def fill_vocab(vocab: Dict[str, int], size: int) -> None:
    """Grow a trained BPE's ``vocab`` (token -> id, ids ``0 .. len - 1``) to ``size`` entries with two- then
    three-character strings of its alphabet that are not tokens: no merge produces them, so encoding is
    unchanged (a vocabulary padded to the published ids of the tokens after it)."""
    alphabet = sorted({c for t in vocab for c in t if len(t) == 1})
    next_id = len(vocab)
    for a in alphabet:
        for b in alphabet:
            for c in [""] + alphabet:
                if next_id >= size:
                    return
                if a + b + c not in vocab:
                    vocab[a + b + c] = next_id
                    next_id += 1


def embedding_rows(n_tokens: int) -> int:
    """The embedding's rows for ``n_tokens`` tokens: rounded up to 64, as the published models do
    (Qwen2.5-VL has 151,936 rows for 151,665 tokens)."""
    return (n_tokens + 63) // 64 * 64


def save_model(folder: Path, model_class: Any, config: Any, generation: Any, seed: int) -> Any:
    """Build ``model_class(config)`` in float32 on the CPU from ``seed``, give it the ``GenerationConfig``
    ``generation`` and save it (safetensors) into ``folder``; return the model."""
    import torch

    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_class(config).to(torch.float32).eval()
    model.generation_config = generation
    model.save_pretrained(folder, safe_serialization=True)
    return model


def versions() -> Dict[str, str]:
    """The library versions a build records in its marker (other versions initialise other weights)."""
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` as the model folders' JSON files are written: indented, keys sorted, a final newline."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


@dataclass(frozen=True)
class TinyFolder:
    """What marks a finished tiny build of one kind: the marker file written last into its folder, and the
    fields of that file (builder version, family) a folder must have to be reused; the build adds ``seed``."""

    #: File name of the marker.
    marker: str
    #: Fields written into the marker and checked on reuse.
    fields: Mapping[str, Any]
    #: A field a marker written by an older builder lacks, read as this value.
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def read(self, folder: Path) -> Optional[Dict[str, Any]]:
        """The marker of ``folder``, or None when it has none (or an unreadable one)."""
        try:
            with open(Path(folder) / self.marker, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def is_complete(self, folder: Path, seed: Optional[int] = None) -> bool:
        """True when ``folder`` is a finished build of this kind (and of ``seed``, if given)."""
        marker = self.read(folder)
        if not marker:
            return False
        want = dict(self.fields) if seed is None else dict(self.fields, seed=seed)
        return all(marker.get(k, self.defaults.get(k)) == v for k, v in want.items())


def qwen_folder(family: str = "qwen2_5_vl") -> TinyFolder:
    """The tiny Qwen build of ``family`` (``qwen2_5_vl``, ``qwen3_vl``); a marker from before Qwen3-VL
    has no family and is a Qwen2.5-VL."""
    return TinyFolder(MARKER, {"builder_version": BUILDER_VERSION, "family": family}, {"family": "qwen2_5_vl"})


def is_complete(out_dir: str | Path, seed: Optional[int] = None, family: str = "qwen2_5_vl") -> bool:
    """True when ``out_dir`` is a finished tiny model of ``family`` by this builder version (and ``seed``, if given)."""
    return qwen_folder(family).is_complete(Path(out_dir), seed)


def build_folder(out_dir: str | Path, kind: TinyFolder, build: Callable[[Path], Dict[str, Any]], *, seed: int = 0,
                 name: str) -> Path:
    """Build a tiny model folder into ``out_dir`` (or reuse a complete one) and return its absolute path: the one
    path of every family's tiny build.

    ``build(folder)`` writes the family's files (tokenizer, config, weights, processor files) into
    an empty folder and returns what the marker records besides ``kind.fields`` and ``seed``.
    It runs with Python's, NumPy's and torch's RNGs seeded with ``seed`` and restored after
    (building inside a run must not move the run's RNGs), in a temporary folder next to
    ``out_dir`` that is moved in with one ``os.replace``, so ``out_dir`` is either absent or
    complete. Threads of one process take turns (the seeding is process-wide); when processes
    race, the loser drops its copy and uses the winner's. ``name`` (``qwen2_5_vl``) is for the log.
    """
    out = Path(out_dir).expanduser().absolute()
    if kind.is_complete(out, seed):
        return out
    with _BUILD_LOCK:
        if kind.is_complete(out, seed):
            return out
        _check_not_foreign(out, kind)  # before the build: a folder in the way is known now
        out.parent.mkdir(parents=True, exist_ok=True)
        log.info("building the tiny offline %s into %s (random weights: its captions are noise)", name, out)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            info = _seeded(build, tmp, seed)
            info.update(kind.fields, seed=seed)
            write_json(tmp / kind.marker, info)
            _fix_modes(tmp)
            placed = _move_into_place(tmp, out, kind, seed)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if placed:
        log.info("built the tiny model (%s, seed %d) into %s in %.1f s", name, seed, out, time.perf_counter() - t0)
    else:
        log.info("another process built %s first; using its folder", out)
    return out


def _seeded(build: Callable[[Path], Dict[str, Any]], folder: Path, seed: int) -> Dict[str, Any]:
    """``build(folder)`` with the RNGs seeded privately."""
    import random

    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            return build(folder)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _fix_modes(folder: Path) -> None:
    """Give the folder and its files the modes of ordinary files (mkdtemp makes 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~umask)


def _check_not_foreign(out_dir: Path, kind: TinyFolder) -> None:
    """A folder with files and no marker is not a tiny build: never replaced, an error naming it."""
    if out_dir.is_dir() and kind.read(out_dir) is None and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} exists and is not a tiny model built by regioncap (no {kind.marker}); "
            f"remove it or choose another model.path for the tiny model"
        )


def _move_into_place(tmp: Path, out_dir: Path, kind: TinyFolder, seed: int) -> bool:
    """Move the finished folder ``tmp`` to ``out_dir`` atomically.

    When ``out_dir`` already holds a complete build (a racing builder won), keep
    it and let the caller drop ``tmp``. An earlier tiny build of another
    version or seed is moved aside and replaced. A folder that is not a tiny
    build at all is never deleted: that is an error naming the folder.
    Returns False when another builder's folder was kept.
    """
    for _ in range(3):
        try:
            os.replace(tmp, out_dir)
            return True
        except OSError:
            if not out_dir.exists():
                raise
        if kind.is_complete(out_dir, seed):
            return False
        _check_not_foreign(out_dir, kind)
        stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stale-", dir=out_dir.parent))
        try:
            os.replace(out_dir, stale / "old")
        except FileNotFoundError:
            pass  # another builder moved it away meanwhile; try again
        finally:
            shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not move the tiny model into {out_dir}: the folder keeps changing")


# -- the tiny Qwen builds ----------------------------------------------------------------------


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """Build the tiny Qwen2.5-VL (``family="qwen3_vl"``: the tiny Qwen3-VL) into ``out_dir`` (or reuse it)
    and return its absolute path (:func:`build_folder`: atomic, seeded, reused when complete)."""
    build = build_seeded_qwen3 if family == "qwen3_vl" else build_seeded
    return build_folder(out_dir, qwen_folder(family), lambda tmp: _with_weights_hash(tmp, build(tmp, seed)),
                        seed=seed, name=family)


def _with_weights_hash(folder: Path, info: Dict[str, Any]) -> Dict[str, Any]:
    info["weights_sha256"] = _sha256(folder / "model.safetensors")
    return info


def _qwen_model(tmp: Path, model_class: Any, config: Any, ids: Mapping[str, int], seed: int) -> None:
    """Save the tiny Qwen model (:func:`save_model`) with Qwen's generation settings."""
    from transformers import GenerationConfig

    save_model(tmp, model_class, config, GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    ), seed)


def _fix_saved_config(tmp: Path, rope_scaling: Dict[str, Any], rope_theta: float, architecture: str,
                      **top: Any) -> None:
    """Make the saved ``config.json`` readable by every version. transformers 5 saves only
    rope_parameters, which 4.x ignores (and then has no mrope_section): keep the
    4.x spelling (the published config's) next to it, with the same values. transformers 4.57 saves
    ``architectures`` inside text_config only, and vLLM then does not see a
    generative model: put it (and ``top``, the token ids) at the top level too."""
    saved = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    text_cfg = saved.setdefault("text_config", {})
    text_cfg.setdefault("rope_scaling", dict(rope_scaling))
    text_cfg.setdefault("rope_theta", rope_theta)
    saved["architectures"] = [architecture]
    saved.update(top)
    write_json(tmp / "config.json", saved)


def _qwen_ids(tmp: Path) -> Tuple[Dict[str, int], int]:
    """The ids of Qwen's added tokens in the tokenizer written in ``tmp``, and its token count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp)
    return {t: tok.convert_tokens_to_ids(t) for t, _ in QWEN_ADDED_TOKENS}, len(tok)


def build_seeded(tmp: Path, seed: int, *, text_dims: Optional[Dict[str, Any]] = None,
                 vision_dims: Optional[Dict[str, Any]] = None, corpus: Optional[List[str]] = None,
                 vocab: int = BPE_VOCAB_SIZE, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> Dict[str, Any]:
    """Write a random-weight model folder into ``tmp`` with the RNGs as they are (the caller seeds them);
    the defaults are the tiny model's (``scripts/train_shapes.py``
    passes its own dimensions, corpus and pixel budget)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    write_tokenizer(tmp, corpus, vocab)
    ids, n_tokens = _qwen_ids(tmp)
    vocab_size = embedding_rows(n_tokens)

    text = dict(text_dims or TEXT_DIMS)
    mrope_section = text.pop("mrope_section")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(mrope_section) * 2 == head_dim, "mrope_section must sum to head_dim / 2"
    # rope_scaling + rope_theta: the spelling both 4.x and 5.x accept (5.x turns it into rope_parameters).
    rope_scaling = {"rope_type": "default", "mrope_section": mrope_section}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            vocab_size=vocab_size,
            rope_scaling=dict(rope_scaling),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(vision_dims or VISION_DIMS, in_channels=3),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]

    _qwen_model(tmp, Qwen2_5_VLForConditionalGeneration, config, ids, seed)
    _fix_saved_config(tmp, rope_scaling, text["rope_theta"], "Qwen2_5_VLForConditionalGeneration",
                      bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      pad_token_id=ids["<|endoftext|>"])

    # The processor files in the hub layout that every version reads: transformers 5
    # would nest the image processor in processor_config.json, which 4.x does not read.
    write_json(tmp / "preprocessor_config.json", {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    })
    write_json(tmp / "chat_template.json", {"chat_template": QWEN25VL_CHAT_TEMPLATE})
    return {"vocab_size": vocab_size, "n_tokens": n_tokens, "token_ids": ids, **versions()}

#: Tiny Qwen3-VL dimensions: text head_dim 32 with ``mrope_section`` summing to 16 (interleaved
#: M-RoPE); the vision tower's deepstack layers are below its depth and feed the first text layers.
QWEN3_TEXT_DIMS: Dict[str, Any] = dict(
    TINY_LAYERS, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096, rope_theta=5000000.0,
)
QWEN3_VISION_DIMS: Dict[str, Any] = dict(
    depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64, patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
    hidden_act="gelu_pytorch_tanh",
)
#: Image budget of the tiny Qwen3-VL: 64x64 .. 256x256 pixels, i.e. 4 .. 64 visual tokens of 32 px.
QWEN3_MIN_PIXELS = 64 * 64
QWEN3_MAX_PIXELS = 256 * 256


def build_seeded_qwen3(tmp: Path, seed: int) -> Dict[str, Any]:
    """Write the tiny random-weight Qwen3-VL folder into ``tmp`` (the caller seeds the RNGs): the offline
    tokenizer with Qwen's special tokens, Qwen3-VL's chat template, its processor (16 px patches merged
    2x2, mean/std 0.5) and a ``Qwen3VLForConditionalGeneration`` with tiny dimensions."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    write_tokenizer(tmp, chat_template=QWEN3VL_CHAT_TEMPLATE, processor_class="Qwen3VLProcessor")
    ids, n_tokens = _qwen_ids(tmp)
    vocab_size = embedding_rows(n_tokens)
    rope_scaling = {"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=dict(**QWEN3_TEXT_DIMS, vocab_size=vocab_size, rope_scaling=dict(rope_scaling),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         tie_word_embeddings=True),
        vision_config=dict(QWEN3_VISION_DIMS, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    _qwen_model(tmp, Qwen3VLForConditionalGeneration, config, ids, seed)
    _fix_saved_config(tmp, rope_scaling, QWEN3_TEXT_DIMS["rope_theta"], "Qwen3VLForConditionalGeneration")
    # Qwen3-VL's published preprocessor_config.json, with the tiny budget.
    write_json(tmp / "preprocessor_config.json", {
        "size": {"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": QWEN3_MAX_PIXELS},
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
    })
    write_json(tmp / "chat_template.json", {"chat_template": QWEN3VL_CHAT_TEMPLATE})
    return {"vocab_size": vocab_size, "n_tokens": n_tokens, "token_ids": ids, **versions()}
