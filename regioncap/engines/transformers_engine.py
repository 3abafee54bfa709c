"""In-process engine on Hugging Face transformers (the offline default; CPU or one GPU).

Requests are answered in batches of ``engine.batch_size`` with left padding.
Sampling is done per request with its own seeded ``torch.Generator`` inside a
logits processor (generation itself runs greedy on the sampled one-hot
scores), so a request's answer depends on its seed, not on which requests
share its batch, and greedy and sampled requests can share a batch.

A request whose ``regex`` is the ``lines`` answer layout of
``regioncap.prompts.answer_regex`` is decoded under that constraint
(``regioncap.engines.constrain``: one ``N: caption`` line per region, in
order), so even random weights give answers that parse. Any other regex or
JSON schema (the grounding answer of ``propose=vlm``) is enforced with
xgrammar, the structured-output library vLLM uses, when it is installed (it is
in the ``transformers`` extra); without it such answers are unconstrained, with
one warning. ``engine.structured_outputs=false`` turns every constraint off.

A bad request never fails its neighbours: an image that cannot be read, or a
prompt that cannot fit in ``model.max_model_len``, becomes an error response
before anything runs; a batch that raises is retried one request at a time;
CUDA out-of-memory halves the batch size and retries.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from regioncap.components import check, whole
from regioncap.engines.base import Engine, EngineError, EngineInfo, Request, Response, error_response, make_response
from regioncap.prompts import MAX_CAPTION_CHARS

if TYPE_CHECKING:
    from regioncap.families.base import Family

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


@dataclass
class _Prepared:
    """A request that passed the checks, with what the batch call needs."""

    index: int
    request: Request
    text: str
    image: Any
    prompt_tokens: int
    max_new_tokens: int
    #: The compiled answer constraint (xgrammar), for a regex other than the ``lines`` layout or a JSON schema.
    grammar: Any = None


def _pick_device(name: Optional[str]) -> str:
    import torch

    name = (name or "auto").strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"engine.device={name} but CUDA is not available here; use engine.device=cpu or auto")
    return name


def _pick_dtype(name: Optional[str], device: str) -> Any:
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        # bf16 halves memory on GPUs; CPU kernels are fastest and exact in fp32.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise EngineError(f"model.dtype={name!r} is not one of auto, bfloat16, float16, float32")
    return getattr(torch, _DTYPES[name])


# One line of the ``lines`` answer regex that regioncap.prompts.answer_regex writes: ``3: [^\n]{1,160}``.
_LINE_RE = re.compile(r"(\d+): \[\^\\n\]\{1,(\d+)\}")


def lines_numbers(regex: Optional[str]) -> Optional[List[int]]:
    """Region numbers of a ``lines`` answer regex (``1: [^\\n]{1,160}\\n2: ...``), or None for any other regex.

    The transformers engine enforces exactly that layout (regioncap.engines.constrain);
    it has no general regular-expression decoder.
    """
    if not regex:
        return None
    parts = _LINE_RE.findall(regex)
    # Only when the regex is exactly those lines joined by "\n" (escaped, as in the regex).
    if not parts or "\\n".join(f"{n}: [^\\n]{{1,{m}}}" for n, m in parts) != regex:
        return None
    return [int(n) for n, _ in parts]


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


class _RowSampler:
    """Logits processor that samples each row with its own generator.

    Rows with temperature 0 are left alone (greedy). For the other rows it
    applies temperature and top-p, draws one token with the row's generator and
    turns the scores into a one-hot, which the greedy step of ``generate`` then
    picks: the draw depends on the row's seed only, not on its batch mates.
    """

    def __init__(self, samplings: List[Any], device: str) -> None:
        import torch

        self.rows = []
        for s in samplings:
            if s.temperature and s.temperature > 0:
                seed = s.seed if s.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
                gen = torch.Generator(device=device)
                gen.manual_seed(int(seed))
                self.rows.append((float(s.temperature), float(s.top_p), gen))
            else:
                self.rows.append(None)

    @property
    def active(self) -> bool:
        return any(r is not None for r in self.rows)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.clone()
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            temperature, top_p, gen = row
            logits = scores[i].float() / temperature
            probs = torch.softmax(logits, dim=-1)
            if top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                cum = torch.cumsum(sorted_probs, dim=-1)
                # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                drop = (cum - sorted_probs) >= top_p
                drop[0] = False
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            token = torch.multinomial(probs, 1, generator=gen)
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


def load_processor(model_path: str, trust_remote_code: bool = False) -> Any:
    """The processor of the model folder (or hub id) ``model_path``, with or without torchvision.

    With torchvision this is ``AutoProcessor``'s (the fast image processors). A
    CPU-only torch has no matching torchvision (every torchvision on the package
    index is a CUDA build), and transformers 5 cannot build a Qwen-VL processor
    without one because of its video processor: there the model's processor
    class is built without the video processor, on the PIL image processor.
    For an image already at the processor's size (regioncap prepares every image
    so) its pixel values match the fast processor's to float rounding (2e-7);
    where it has to resize, PIL's resampling differs slightly from torchvision's.
    Videos are not supported (regioncap sends none).
    """
    import importlib.util

    from transformers import AutoProcessor

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    model_type = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).model_type
    class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    base = processor_class_from_name(class_name) if isinstance(class_name, str) else None
    if base is None:
        # Not a processor transformers ships (remote code, another family): let AutoProcessor say what fails.
        return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        """``base`` without its video processor (the one part that needs torchvision)."""

        # transformers 5 reads a processor's parts from get_attributes(), 4.x from ``attributes``.
        attributes = [a for a in getattr(base, "attributes", []) if "video" not in a]

        @classmethod
        def get_attributes(cls) -> List[str]:
            return [a for a in super().get_attributes() if "video" not in a]

    log.info("torchvision is not installed: %s without its video processor, on the PIL image processor",
             base.__name__)
    return ImageOnlyProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)


class TransformersEngine(Engine):
    """Qwen2-VL / Qwen2.5-VL (and other image-text-to-text models) in transformers."""

    @dataclass
    class Config(Engine.Config):
        batch_size: int = field(default=4, metadata=check(whole(1)))
        #: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        device: str = "auto"
        #: Attention implementation passed to ``from_pretrained`` (``sdpa``, ``eager``...).
        attn_implementation: Optional[str] = None
        #: Constrain ``lines`` answers to one ``<number>: <text>`` line per region
        #: (a logits processor; the same layout vLLM enforces with structured outputs).
        structured_outputs: bool = True

    name = "transformers"
    cpu_threads = "torch"
    # No torchvision: without it the processors run on PIL (see load_processor).
    requires = ("torch", "transformers")
    extra = "transformers"

    @classmethod
    def cpu_bound(cls, engine_cfg: TransformersEngine.Config) -> bool:
        # On the CPU, torch's own threads take every core.
        return not str(engine_cfg.device).startswith("cuda")

    def __init__(self, *, model_cfg: Family.Config, engine_cfg: TransformersEngine.Config, model_path: str) -> None:
        import torch
        import transformers

        from regioncap.families.base import build_family

        self.model_cfg = model_cfg
        #: The model family: its transformers class, chat turn and visual tokens.
        self.family = build_family(model_cfg)
        self.engine_cfg = engine_cfg
        self.model_path = str(model_path)
        self.device = _pick_device(engine_cfg.device)
        self.dtype = _pick_dtype(model_cfg.dtype, self.device)
        self.batch_size = max(1, engine_cfg.batch_size)
        self.max_model_len = model_cfg.max_model_len
        self._versions = {"transformers": transformers.__version__, "torch": torch.__version__}
        trust = model_cfg.trust_remote_code
        from regioncap import random_weights

        self.model_weights = random_weights.describe(model_cfg)["model_weights"]
        if self.model_weights == "random":
            log.warning(random_weights.WARNING)
        t0 = time.perf_counter()

        config, self.rope_patched = self._load_config(trust)
        try:
            self.processor = load_processor(self.model_path, trust)
        except Exception as exc:
            raise EngineError(f"cannot load the processor of {self.model_path}: {type(exc).__name__}: {exc}") from exc
        self._set_processor_settings(self.family.processor_kwargs())
        self.min_pixels, self.max_pixels = model_cfg.min_pixels, model_cfg.max_pixels
        self.tokenizer = self.processor.tokenizer
        self.model = self._load_model(config, trust)
        self.model.eval()
        #: An encoder-decoder (Florence-2): the prompt is the encoder's input and the answer the decoder's.
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        # A decoder-only model continues the prompt, so prompts are padded on the left; an encoder's
        # learned positions count from its first token, so there padding goes on the right.
        self.tokenizer.padding_side = "right" if self.encoder_decoder else "left"
        #: A model with no chat template (Florence-2) reads the prompt text as it is, task tokens and all.
        self.chat = getattr(self.processor, "chat_template", None) is not None

        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (getattr(gen_cfg, "pad_token_id", None) or min(self.eos_ids))
        #: The decoder's first tokens, given to every request of an encoder-decoder: its start token, then
        #: the token its generation config forces first (Florence-2 answers ``</s><s>...``).
        self.decoder_prefix = self._decoder_prefix(gen_cfg) if self.encoder_decoder else []
        if self.encoder_decoder and gen_cfg is not None:
            # generate() fills every setting a call leaves unset from the model's own generation config:
            # the prefix above replaces its forced first token, and a forced last token would end an
            # answer cut at max_tokens with a stop token (read as a finished answer, not a truncated one).
            for name in ("forced_bos_token_id", "forced_eos_token_id", "no_repeat_ngram_size"):
                if getattr(gen_cfg, name, None) is not None:
                    setattr(gen_cfg, name, None)
        #: Answers decoded with special tokens kept, but for these (a task model's answers carry
        #: special tokens of their own: Florence-2's ``<loc_N>``).
        self.dropped_ids = set() if self.chat else {
            t for t in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                        getattr(self.tokenizer, "image_token_id", None)) if t is not None} | self.eos_ids
        # Width of the logits (the embedding is often padded beyond the tokenizer).
        self.logits_size = int(self.model.get_output_embeddings().weight.shape[0])
        #: Enforce the ``lines`` answer layout of requests that carry its regex.
        self.structured_outputs = engine_cfg.structured_outputs
        #: xgrammar compiler for the other constraints (None: not built yet; False: xgrammar missing).
        self._grammar_compiler: Any = None
        ip = self.processor.image_processor
        self.unit = int(getattr(ip, "patch_size", model_cfg.patch_size)) * int(
            getattr(ip, "merge_size", model_cfg.merge_size))
        if self.unit != model_cfg.patch_size * model_cfg.merge_size:
            log.warning("the processor of %s uses %d-px visual tokens but model.patch_size x model.merge_size "
                        "is %d: images are resized for the wrong grid; fix model.patch_size/merge_size",
                        self.model_path, self.unit, model_cfg.patch_size * model_cfg.merge_size)
        log.info(
            "transformers engine: %s on %s in %s, batch %d, loaded in %.1f s%s",
            self.model_path, self.device, str(self.dtype).replace("torch.", ""), self.batch_size,
            time.perf_counter() - t0, " (rope_scaling patched)" if self.rope_patched else "",
        )

    # -- loading -------------------------------------------------------------

    def _load_config(self, trust: bool) -> tuple:
        """The model config, with an old-style ``rope_scaling`` fixed in memory (see ``regioncap.models``)."""
        from regioncap.qwen import fixed_rope_scaling, patched_config_dict, read_config_dict

        raw = read_config_dict(self.model_path)
        if raw is None:
            if Path(self.model_path).is_dir():
                raise EngineError(f"cannot read {self.model_path}/config.json; model.path must be a model folder")
            return None, False  # a hub id: from_pretrained resolves it (regioncap.models usually did already)
        patched = patched_config_dict(raw)
        if patched is None:
            return None, False
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = patched.get("model_type")
        if model_type not in CONFIG_MAPPING:
            return None, False  # a remote-code model: leave its config to its own code
        log.warning("%s/config.json has an old rope_scaling %s; using %s in memory (the file is not changed)",
                    self.model_path, raw.get("rope_scaling") or raw.get("text_config", {}).get("rope_scaling"),
                    fixed_rope_scaling(raw))
        config = CONFIG_MAPPING[model_type].from_dict(patched)
        config._name_or_path = self.model_path
        return config, True

    def _set_processor_settings(self, settings: Dict[str, Any]) -> None:
        """Give the image processor the family's settings (:meth:`regioncap.families.base.Family.processor_kwargs`):
        a pixel budget becomes ``size`` in 5.x, also ``min/max_pixels`` in 4.x; a ``size`` the family gives
        (InternVL's tile) is set where it differs; other settings (Gemma 3's ``do_pan_and_scan``, InternVL's
        ``min_patches``/``max_patches``) are set as they are. A family without a budget or a size (a fixed
        input size) keeps the processor's ``size``.

        Set on the loaded processor rather than passed to ``from_pretrained``:
        transformers 5 keeps such kwargs as call defaults and warns on every call.
        """
        ip = self.processor.image_processor
        settings = dict(settings)
        size = getattr(ip, "size", None)
        get = (lambda k: size.get(k) if isinstance(size, dict) else getattr(size, k, None))
        if "size" in settings:
            # The family gives the size itself (InternVL's tile): set only where it differs, as in 5.x the
            # processor holds a ``SizeDict``.
            value = settings.pop("size")
            if size is None or not isinstance(value, dict) or any(get(k) != v for k, v in value.items()):
                ip.size = value
        elif size is not None and get("height") and get("width"):
            # A fixed input size (Florence-2's square, Gemma 3's 896 px): the family's size replaces the pixel
            # budget, and the processor writes the family's count of image tokens for it.
            settings.pop("min_pixels", None), settings.pop("max_pixels", None)
            w, h = self.family.input_size(int(get("width")), int(get("height")))
            if (w, h) != (int(get("width")), int(get("height"))):
                ip.size = {"height": h, "width": w}
            if getattr(self.processor, "num_image_tokens", None) is not None:
                self.processor.num_image_tokens = self.family.visual_tokens(w, h)
            log.info("the processor resizes every image to %dx%d (%s visual tokens): model.min_pixels/max_pixels "
                     "do not apply", w, h, getattr(self.processor, "num_image_tokens", "?"))
        elif "min_pixels" in settings and "max_pixels" in settings:
            min_pixels, max_pixels = int(settings.pop("min_pixels")), int(settings.pop("max_pixels"))
            if size is not None and (get("shortest_edge"), get("longest_edge")) != (min_pixels, max_pixels):
                ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
            if hasattr(ip, "min_pixels"):
                ip.min_pixels, ip.max_pixels = min_pixels, max_pixels
        for key, value in settings.items():
            setattr(ip, key, value)

    def _load_model(self, config: Any, trust: bool) -> Any:
        import transformers
        from transformers import AutoModelForImageTextToText

        kwargs: Dict[str, Any] = {"trust_remote_code": trust}
        # transformers >= 4.56 calls it ``dtype``; older versions ``torch_dtype``.
        major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
        kwargs["dtype" if major_minor >= (4, 56) else "torch_dtype"] = self.dtype
        if config is not None:
            kwargs["config"] = config
        attn = self.engine_cfg.attn_implementation
        if attn:
            kwargs["attn_implementation"] = attn
        if self.model_weights == "random":
            return self._random_model(config, trust)
        if self.device != "cpu":
            kwargs["device_map"] = self.device
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.model_path, **kwargs)
        except ValueError as exc:
            # Older transformers do not map every VLM to the auto class: use the family's class.
            cls_name = self.family.transformers_class
            if cls_name is None or not hasattr(transformers, cls_name) or "Unrecognized configuration" not in str(exc):
                raise EngineError(f"cannot load the model {self.model_path}: {exc}") from exc
            log.info("AutoModelForImageTextToText does not know this model; using %s", cls_name)
            try:
                model = getattr(transformers, cls_name).from_pretrained(self.model_path, **kwargs)
            except Exception as exc2:
                raise EngineError(f"cannot load the model {self.model_path}: {type(exc2).__name__}: {exc2}") from exc2
        except Exception as exc:
            raise EngineError(f"cannot load the model {self.model_path}: {type(exc).__name__}: {exc}") from exc
        if self.device == "cpu":
            model = model.to("cpu")
        return model

    def _random_model(self, config: Any, trust: bool) -> Any:
        """The architecture of the folder's config with random weights (``model.weights=random``); no weights file is read.

        Built directly in the target dtype and seeded (seed 0, private RNG state),
        so two runs get the same random model.
        """
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        try:
            if config is None:
                config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust)
            attn = self.engine_cfg.attn_implementation
            if attn:
                config._attn_implementation = attn
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                with torch.device(self.device if self.device != "auto" else "cpu"):
                    model = AutoModelForImageTextToText.from_config(config, dtype=self.dtype,
                                                                    trust_remote_code=trust)
        except Exception as exc:
            raise EngineError(f"cannot build the random-weight model of {self.model_path}: "
                              f"{type(exc).__name__}: {exc}") from exc
        n = sum(p.numel() for p in model.parameters())
        log.info("built %s with random weights: %.2f B parameters in %s", type(model).__name__, n / 1e9,
                 str(self.dtype).replace("torch.", ""))
        return model

    # -- generation ----------------------------------------------------------

    def _decoder_prefix(self, gen_cfg: Any) -> List[int]:
        """The decoder start token, then the forced first token where the model has one."""
        text_cfg = self.model.config.get_text_config()
        saved = None
        if self.model_weights == "random":  # built from config.json: the folder's generation config is not read
            from transformers import GenerationConfig

            try:
                saved = GenerationConfig.from_pretrained(self.model_path)
            except (OSError, ValueError):
                saved = None

        def first(name: str) -> Optional[int]:
            for holder in (gen_cfg, saved, text_cfg, self.model.config):
                value = getattr(holder, name, None) if holder is not None else None
                if value is not None:
                    return int(value)
            return None

        start = first("decoder_start_token_id")
        if start is None:
            raise EngineError(f"{self.model_path} is an encoder-decoder without a decoder_start_token_id in its config")
        forced = first("forced_bos_token_id")
        return [start] if forced is None else [start, forced]

    def _messages(self, req: Request) -> List[Dict[str, Any]]:
        messages: List[Dict[str, Any]] = []
        if req.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": req.system}]})
        messages.append({"role": "user", "content": self.family.user_content(req.prompt)})
        return messages

    def _prepare(self, index: int, req: Request) -> Any:
        """A :class:`_Prepared` request, or the error response it turns into."""
        from PIL import Image

        grammar = None
        if self.structured_outputs and (req.json_schema or (req.regex and lines_numbers(req.regex) is None)):
            grammars = self._grammars()
            if grammars is not None:
                try:
                    grammar = grammars.grammar(regex=req.regex, json_schema=req.json_schema)
                except ValueError as exc:
                    return error_response(req.key, "engine_error", str(exc))

        try:
            with Image.open(req.image_path) as im:
                image = im.convert("RGB")
        except Exception as exc:
            return error_response(req.key, "image_error",
                                  f"cannot read image {req.image_path}: {type(exc).__name__}: {exc}")
        try:
            if self.chat:
                text = self.processor.apply_chat_template(self._messages(req), tokenize=False,
                                                          add_generation_prompt=True)
                # The text the processor tokenizes: each placeholder expanded as the family's processor
                # expands it (Qwen: one pad token per visual token; Gemma 3: its image block and the newlines
                # around it).
                expanded = self.family.expand_images(text, *image.size)
                prompt_tokens = len(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])
            else:
                # No chat template: the prompt is the model's text as written (a system text goes
                # first, on its own line); the processor adds the image tokens and its own specials,
                # so it counts them too.
                text = f"{req.system}\n{req.prompt}" if req.system else req.prompt
                prompt_tokens = len(self.processor(text=[text], images=[image])["input_ids"][0])
        except Exception as exc:
            return error_response(req.key, "engine_error", f"cannot build the prompt: {type(exc).__name__}: {exc}")
        room = self.max_model_len - prompt_tokens
        if room <= 0:
            return error_response(
                req.key, "too_long",
                f"prompt of {prompt_tokens} tokens (image {image.size[0]}x{image.size[1]}) leaves no room to answer "
                f"within model.max_model_len={self.max_model_len}; use a smaller image or a larger max_model_len",
                prompt_tokens=prompt_tokens,
            )
        return _Prepared(index, req, text, image, prompt_tokens, max(1, min(int(req.sampling.max_tokens), room)),
                         grammar)

    def _grammars(self) -> Any:
        """The xgrammar compiler of this engine's tokenizer (built on first use), or None without xgrammar."""
        if self._grammar_compiler is None:
            from regioncap.engines.constrain import Grammars

            try:
                self._grammar_compiler = Grammars(self.tokenizer, vocab_size=self.logits_size, eos_ids=self.eos_ids)
            except ImportError:
                self._grammar_compiler = False
                log.warning("xgrammar is not installed: answers to a JSON schema or a regex other than the "
                            "'lines' layout are not constrained (pip install 'regioncap[transformers]')")
        return self._grammar_compiler or None

    def generate(self, requests: Sequence[Request]) -> List[Response]:
        """Answer ``requests`` in batches; one response per request, in order."""
        out: List[Optional[Response]] = [None] * len(requests)
        pending: List[_Prepared] = []
        for i, req in enumerate(requests):
            prepared = self._prepare(i, req)
            if isinstance(prepared, Response):
                out[i] = prepared
            else:
                pending.append(prepared)
            if len(pending) >= self.batch_size:
                self._run_resilient(pending, out)
                pending = []
        if pending:
            self._run_resilient(pending, out)
        return [r if r is not None else error_response(requests[i].key, "engine_error", "no answer")
                for i, r in enumerate(out)]

    def _run_resilient(self, items: List[_Prepared], out: List[Optional[Response]]) -> None:
        """Run ``items`` in batches of at most ``self.batch_size``; isolate failures."""
        start = 0
        while start < len(items):
            batch = items[start:start + self.batch_size]
            try:
                for item, resp in zip(batch, self._run_batch(batch)):
                    out[item.index] = resp
                start += len(batch)
            except Exception as exc:
                if _is_oom(exc) and len(batch) > 1:
                    self._free_cuda()
                    self.batch_size = max(1, len(batch) // 2)
                    log.warning("out of memory with a batch of %d; retrying with batches of %d",
                                len(batch), self.batch_size)
                    continue
                if len(batch) == 1:
                    out[batch[0].index] = self._failure(batch[0], exc)
                    start += 1
                    continue
                log.warning("a batch of %d failed (%s: %s); retrying its requests one by one",
                            len(batch), type(exc).__name__, exc)
                for item in batch:
                    try:
                        out[item.index] = self._run_batch([item])[0]
                    except Exception as exc1:
                        out[item.index] = self._failure(item, exc1)
                start += len(batch)

    def _failure(self, item: _Prepared, exc: BaseException) -> Response:
        if _is_oom(exc):
            self._free_cuda()
        log.warning("request %s failed: %s: %s", item.request.key, type(exc).__name__, exc)
        return error_response(item.request.key, "engine_error", f"{type(exc).__name__}: {exc}",
                              prompt_tokens=item.prompt_tokens)

    def _run_batch(self, batch: List[_Prepared]) -> List[Response]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        t0 = time.perf_counter()
        inputs = self.processor(
            text=[b.text for b in batch], images=[b.image for b in batch],
            # The chat template writes every special token (Gemma's <bos> too): none added twice.
            padding=True, return_tensors="pt", add_special_tokens=False,
        ).to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        max_new = max(b.max_new_tokens for b in batch)
        extra: Dict[str, Any] = {}
        if self.encoder_decoder:
            # The answer is the decoder's: it starts from the same prefix in every row.
            extra["decoder_input_ids"] = torch.tensor([self.decoder_prefix] * len(batch), device=self.device)
            n_in = len(self.decoder_prefix)
        else:
            n_in = inputs["input_ids"].shape[1]
        processors = []
        numbers = [lines_numbers(b.request.regex) if self.structured_outputs else None for b in batch]
        if any(numbers):
            from regioncap.engines.constrain import lines_processor

            # The constraint masks first; the sampler then draws among what is allowed.
            processors.append(lines_processor(self.tokenizer, numbers, prompt_len=n_in,
                                              eos_ids=sorted(self.eos_ids), vocab_size=self.logits_size,
                                              max_caption_chars=MAX_CAPTION_CHARS))
        if any(b.grammar is not None for b in batch):
            processors.append(self._grammars().processor([b.grammar for b in batch], prompt_len=n_in))
        sampler = _RowSampler([b.request.sampling for b in batch], self.device)
        if sampler.active:
            processors.append(sampler)
        # An explicit config: the model's own defaults (repetition penalty, top_k...)
        # do not silently change what the run's sampling settings say.
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, num_beams=1,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            decoder_start_token_id=self.decoder_prefix[0] if self.decoder_prefix else None,
        )
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs, **extra, generation_config=gen_cfg,
                logits_processor=LogitsProcessorList(processors) if processors else None,
            )
        latency = time.perf_counter() - t0
        prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
        responses = []
        for row, b in enumerate(batch):
            new = generated[row, n_in:].tolist()[: b.max_new_tokens]
            stop = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
            kept = new if stop is None else new[:stop]
            text = self.answer_text(kept)
            responses.append(make_response(
                key=b.request.key, text=text, prompt_tokens=int(prompt_lens[row]),
                # Counted as vLLM does: the stop token is one of the output tokens.
                output_tokens=len(new) if stop is None else stop + 1,
                latency_s=latency, finish_reason="length" if stop is None else "stop",
            ))
        return responses

    def answer_text(self, ids: Sequence[int]) -> str:
        """The text of answer tokens ``ids``: without special tokens, but for a model without a chat
        template only its ``<s>``, ``</s>``, padding and image tokens are dropped (Florence-2's
        ``<loc_N>`` are special tokens, and they are the boxes of its answers)."""
        if self.chat:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.tokenizer.decode([t for t in ids if t not in self.dropped_ids], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    # -- lifecycle -----------------------------------------------------------

    def describe(self) -> Dict[str, Any]:
        return EngineInfo(
            engine=self.name,
            model_path=self.model_path,
            model_weights=self.model_weights,
            dtype=str(self.dtype).replace("torch.", ""),
            device=self.device,
            batch_size=self.batch_size,
            attn_implementation=self.engine_cfg.attn_implementation,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            max_model_len=self.max_model_len,
            rope_scaling_patched=self.rope_patched,
            structured_outputs="lines" if self.structured_outputs else None,
            **self._versions,
        )

    def _free_cuda(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def close(self) -> None:
        """Free the model and the processor; safe to call twice."""
        if getattr(self, "model", None) is None:
            return
        self.model = None
        self.processor = None
        self.tokenizer = None
        self._free_cuda()
