"""Offline vLLM engine: ``vllm.LLM`` in this process, one ``generate`` call per batch.

How a batch is answered:

1. Each request's image is opened with PIL (it is already at the model's input
   size) and its chat prompt is rendered with the chat template vLLM itself
   would pick for ``LLM.chat`` (the processor's, else the tokenizer's), with
   one image placeholder before the text.
2. Its length is computed before anything reaches vLLM: the rendered text's
   tokens, minus the one ``<|image_pad|>`` placeholder, plus the image's
   visual tokens (one per 28x28 pixels for Qwen2-VL/2.5-VL). A request whose
   prompt leaves no room for a single answer token (``prompt_tokens >=
   max_model_len``) becomes a ``too_long`` error row: vLLM would reject it and,
   offline, fail the whole ``generate`` call with it. A prompt that fits but
   leaves less than ``max_tokens`` is answered with the budget cut to what is
   left (``max_model_len - prompt_tokens``), which is what vLLM itself does
   offline and in its OpenAI server (0.32); a warning names such requests and
   their answers end with ``finish_reason="length"`` when the cut bites. So the
   offline engine and the server path give the same rows for the same inputs
   (one exception: the 0.32 server also refuses ``max_tokens > max_model_len``).
   An image that cannot be opened becomes an ``image_error`` row.
3. All remaining requests go into ONE ``LLM.generate`` call, so vLLM's
   continuous batching sees the whole batch. If that call raises, the requests
   are retried one by one so only the bad one becomes an error row; a dead
   engine raises :class:`EngineError`.

Structured outputs (``engine.structured_outputs``) constrain decoding to the
request's ``regex`` or ``json_schema`` with ``StructuredOutputsParams``
(vLLM >= 0.10; ``GuidedDecodingParams`` on older releases). On vLLM 0.32's CPU
build it works (xgrammar backend).

``vllm`` is imported only inside :class:`VllmEngine`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from regioncap.components import check, real, whole
from regioncap.engines.base import Engine, EngineError, EngineInfo, Request, Response, error_response, make_response

if TYPE_CHECKING:
    from regioncap.families.base import Family

log = logging.getLogger(__name__)

def _rope_overrides(model_path: str) -> Dict[str, Any]:
    """``hf_overrides`` that repair an old-style rope config of a local model folder ({} when none is needed)."""
    from regioncap.qwen import fixed_rope_scaling, read_config_dict

    config = read_config_dict(model_path)  # None for a hub id: vLLM reads that config itself
    fixed = fixed_rope_scaling(config) if config else None
    return {} if fixed is None else {"rope_scaling": fixed}


def _plain(value: Any) -> Dict[str, Any]:
    """A plain dict (nested settings become dicts/lists: vLLM's config classes want those)."""
    from regioncap.components import plain

    return dict(plain(value))


class VllmEngine(Engine):
    """``vllm.LLM`` behind the :class:`Engine` interface."""

    @dataclass
    class Config(Engine.Config):
        batch_size: int = field(default=256, metadata=check(whole(1)))
        gpu_memory_utilization: float = field(default=0.9, metadata=check(real(0, 1, above=True)))
        tensor_parallel_size: int = field(default=1, metadata=check(whole(1)))
        #: Skip CUDA graphs / torch.compile (slower decode, much faster start).
        enforce_eager: bool = False
        #: Constrain the answer to the prompt's format with vLLM structured outputs.
        structured_outputs: bool = True
        #: Extra keyword arguments for ``vllm.LLM`` (anything its signature takes).
        extra_args: Dict[str, Any] = field(default_factory=dict)

    name = "vllm"
    cpu_threads = "vllm"
    isolate_in_sweeps = True
    requires = ("vllm",)
    extra = "vllm"

    def __init__(self, model_cfg: Family.Config, engine_cfg: VllmEngine.Config, model_path: Optional[str] = None) -> None:
        try:
            import vllm
            from vllm import LLM
        except ImportError as e:
            raise EngineError(
                f"engine=vllm needs the vllm package ({e}). On a GPU machine `pip install vllm`; on a "
                "CPU-only machine run scripts/setup_vllm.sh and start regioncap with .venv-vllm/bin/python; "
                "or pick engine=transformers"
            ) from e

        self._vllm = vllm
        from regioncap.families.base import build_family

        self.model_cfg = model_cfg
        #: The model family: its chat turn and visual tokens.
        self.family = build_family(model_cfg)
        self.engine_cfg = engine_cfg
        self.model_path = str(model_path or model_cfg.path)
        self.max_model_len = model_cfg.max_model_len
        self._so_factory = self._structured_outputs_factory() if engine_cfg.structured_outputs else None
        #: Extra ``SamplingParams`` arguments every request gets, over the request's own (empty: none).
        #: A benchmark fixes the output length with ``{"min_tokens": n, "ignore_eos": True}``.
        self.sampling_overrides: Dict[str, Any] = {}

        kwargs: Dict[str, Any] = dict(
            model=self.model_path,
            tokenizer=self.model_path,
            revision=model_cfg.revision,
            tokenizer_revision=model_cfg.revision,
            dtype=model_cfg.dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
            tensor_parallel_size=engine_cfg.tensor_parallel_size,
            enforce_eager=engine_cfg.enforce_eager,
            trust_remote_code=model_cfg.trust_remote_code,
            seed=0,
            limit_mm_per_prompt={"image": 1, "video": 0},
            mm_processor_kwargs=self.family.mm_processor_kwargs(),
        )
        overrides = _rope_overrides(self.model_path)
        if overrides:
            kwargs["hf_overrides"] = overrides
        from regioncap import random_weights

        self.model_weights = random_weights.describe(model_cfg)["model_weights"]
        if self.model_weights == "random":
            # Weights built from the config alone; no weights file is read.
            kwargs["load_format"] = "dummy"
            log.warning(random_weights.WARNING)
        # extra_args win over everything above (a user's explicit choice).
        kwargs.update(_plain(engine_cfg.extra_args or {}))
        self._kwargs = kwargs

        t0 = time.perf_counter()
        try:
            self._llm: Any = LLM(**kwargs)
        except Exception as e:
            hint = f" ({self.family.vllm_hint})" if self.family.vllm_hint else ""
            raise EngineError(f"vLLM could not load the model {self.model_path}: {type(e).__name__}: {e}{hint}") from e
        self.load_s = time.perf_counter() - t0
        self._tokenizer = self._llm.get_tokenizer()
        self._chat_template = self._resolve_chat_template()
        log.info("vllm %s: loaded %s in %.1f s", vllm.__version__, self.model_path, self.load_s)

    # ----------------------------------------------------------------- setup

    def _structured_outputs_factory(self) -> Optional[Callable[..., Dict[str, Any]]]:
        """A function (regex, json_schema) -> SamplingParams kwargs, for the installed vLLM."""
        try:
            from vllm.sampling_params import StructuredOutputsParams  # vLLM >= 0.10

            return lambda regex, schema: {
                "structured_outputs": StructuredOutputsParams(regex=regex) if regex
                else StructuredOutputsParams(json=schema)
            }
        except ImportError:
            pass
        try:
            from vllm.sampling_params import GuidedDecodingParams  # vLLM 0.6 .. 0.9

            return lambda regex, schema: {
                "guided_decoding": GuidedDecodingParams(regex=regex) if regex
                else GuidedDecodingParams(json=schema)
            }
        except ImportError:
            log.warning(
                "vllm %s has neither StructuredOutputsParams nor GuidedDecodingParams: "
                "answers are not constrained (engine.structured_outputs ignored)",
                self._vllm.__version__,
            )
            return None

    def _resolve_chat_template(self) -> Optional[str]:
        """The template ``LLM.chat`` would use (processor's first, then tokenizer's)."""
        try:
            from vllm.renderers.hf import resolve_chat_template

            return resolve_chat_template(self._tokenizer, None, None, model_config=self._llm.model_config)
        except Exception:  # other vLLM versions: the tokenizer's own template
            log.debug("vllm's resolve_chat_template unavailable; using the tokenizer's", exc_info=True)
            return getattr(self._tokenizer, "chat_template", None)

    # --------------------------------------------------------------- prompts

    def render_prompt(self, req: Request) -> str:
        """The chat prompt text of one request, with one image placeholder before the user text."""
        messages: List[Dict[str, Any]] = []
        if req.system:
            messages.append({"role": "system", "content": req.system})
        messages.append({"role": "user", "content": self.family.user_content(req.prompt)})
        kw: Dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if self._chat_template is not None:
            kw["chat_template"] = self._chat_template
        text = self._tokenizer.apply_chat_template(messages, **kw)
        # vLLM tokenizes a text prompt adding the tokenizer's special tokens: where the template writes
        # the <bos> itself (Gemma's), the prompt would start with two.
        bos = getattr(self._tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and self._tokenizer.encode("a")[:1] == [self._tokenizer.bos_token_id]:
            text = text[len(bos):]
        return text

    def count_prompt_tokens(self, text: str, image_size: Tuple[int, int]) -> int:
        """Prompt length as vLLM will see it: the tokens of the text with its image placeholder expanded
        as the family's processor expands it (:meth:`regioncap.families.base.Family.expand_images`)."""
        expanded = self.family.expand_images(text, int(image_size[0]), int(image_size[1]))
        return len(self._tokenizer.encode(expanded))

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` (None once closed), for callers that drive it directly, such as the
        raw ``LLM.generate`` baseline of ``scripts/bench_gpu.py``."""
        return self._llm

    def sampling_params(self, req: Request, **overrides: Any) -> Any:
        """The ``vllm.SamplingParams`` of ``req``: its sampling settings, its structured-output constraint
        (with ``engine.structured_outputs``), then :attr:`sampling_overrides`, then ``overrides``."""
        from vllm import SamplingParams

        s = req.sampling
        kw: Dict[str, Any] = dict(
            temperature=float(s.temperature), top_p=float(s.top_p), max_tokens=int(s.max_tokens), seed=s.seed
        )
        if self._so_factory is not None and (req.regex or req.json_schema):
            kw.update(self._so_factory(req.regex, req.json_schema))
        kw.update(self.sampling_overrides)
        kw.update(overrides)
        return SamplingParams(**kw)

    def prepare(self, req: Request) -> Tuple[Optional[Dict[str, Any]], Optional[Response]]:
        """``(item, None)`` for a request that can go to vLLM, or ``(None, error row)``.

        ``item["prompt"]`` is the prompt dict ``LLM.generate`` takes (text and the opened image),
        ``item["params"]`` its ``SamplingParams`` (:meth:`sampling_params`), ``item["n_prompt"]``
        the prompt's length in tokens and ``item["clamped"]`` whether ``max_tokens`` is more than
        ``max_model_len`` leaves (vLLM then cuts the answer's budget).
        """
        from PIL import Image

        try:
            with Image.open(req.image_path) as im:
                image = im.convert("RGB")  # convert() loads the pixels: a broken file fails here
        except Exception as e:
            return None, error_response(
                req.key, "image_error", f"cannot open image {req.image_path}: {type(e).__name__}: {e}"
            )
        try:
            text = self.render_prompt(req)
            n_prompt = self.count_prompt_tokens(text, image.size)
        except Exception as e:
            return None, error_response(
                req.key, "prompt_error", f"cannot render the chat prompt: {type(e).__name__}: {e}"
            )
        if n_prompt >= self.max_model_len:
            return None, error_response(
                req.key,
                "too_long",
                f"prompt of {n_prompt} tokens (image {image.size[0]}x{image.size[1]}) leaves no room "
                f"for an answer in max_model_len {self.max_model_len}; lower model.max_pixels or "
                "max_boxes, shorten the prompt, or raise model.max_model_len",
                prompt_tokens=n_prompt,
            )
        try:
            params = self.sampling_params(req)
        except Exception as e:
            return None, error_response(req.key, "invalid_request", f"{type(e).__name__}: {e}")
        room = self.max_model_len - n_prompt
        return {"prompt": {"prompt": text, "multi_modal_data": {"image": image}}, "params": params,
                "n_prompt": n_prompt, "clamped": int(req.sampling.max_tokens) > room}, None

    # -------------------------------------------------------------- generate

    def _run(self, items: List[Dict[str, Any]]) -> List[Any]:
        outs = self._llm.generate(
            [it["prompt"] for it in items], [it["params"] for it in items], use_tqdm=False
        )
        # Outputs come sorted by vLLM request id; ours are the newest ones.
        if len(outs) < len(items):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(items)} prompts")
        return list(outs[-len(items):])

    def _is_dead(self, e: BaseException) -> bool:
        try:
            from vllm.v1.engine.exceptions import EngineDeadError
        except ImportError:
            return False
        return isinstance(e, EngineDeadError)

    @staticmethod
    def _kind(e: BaseException) -> str:
        msg = str(e)
        if "maximum context length" in msg or "longer than the maximum model length" in msg:
            return "too_long"
        try:
            from vllm.exceptions import VLLMValidationError

            if isinstance(e, VLLMValidationError):
                return "invalid_request"
        except ImportError:
            pass
        return "engine_error"

    def generate(self, requests: Sequence[Request]) -> List[Response]:
        """Answer ``requests`` with one ``LLM.generate`` call; one response per request, in order."""
        if self._llm is None:
            raise EngineError("the vllm engine was closed")
        responses: List[Optional[Response]] = [None] * len(requests)
        ready: List[Tuple[int, Dict[str, Any]]] = []
        for i, req in enumerate(requests):
            item, err = self.prepare(req)
            if err is not None:
                responses[i] = err
            else:
                ready.append((i, item))

        clamped = [(requests[i].key, it["n_prompt"]) for i, it in ready if it["clamped"]]
        if clamped:
            log.warning(
                "%d request(s) leave less than max_tokens in max_model_len %d; vLLM cuts their answer "
                "budget to what is left (first: %s with a %d-token prompt)",
                len(clamped), self.max_model_len, clamped[0][0], clamped[0][1],
            )
        if ready:
            t0 = time.perf_counter()
            try:
                outs = self._run([it for _, it in ready])
                latency = time.perf_counter() - t0
                for (i, _), out in zip(ready, outs):
                    responses[i] = self._response(requests[i].key, out, latency)
            except Exception as e:
                if self._is_dead(e):
                    raise EngineError(f"the vLLM engine died: {e}") from e
                log.warning("vllm batch of %d failed (%s: %s); retrying one by one",
                            len(ready), type(e).__name__, e)
                for i, item in ready:
                    responses[i] = self._one(requests[i].key, item)
        return [
            r if r is not None else error_response(requests[i].key, "engine_error", "no output from vLLM")
            for i, r in enumerate(responses)
        ]

    def _one(self, key: str, item: Dict[str, Any]) -> Response:
        t0 = time.perf_counter()
        try:
            (out,) = self._run([item])
        except Exception as e:
            if self._is_dead(e):
                raise EngineError(f"the vLLM engine died: {e}") from e
            return error_response(key, self._kind(e), f"{type(e).__name__}: {e}")
        return self._response(key, out, time.perf_counter() - t0)

    @staticmethod
    def _response(key: str, out: Any, latency: float) -> Response:
        comp = out.outputs[0]
        return make_response(
            key=key,
            text=comp.text,
            prompt_tokens=len(out.prompt_token_ids) if out.prompt_token_ids is not None else None,
            output_tokens=len(comp.token_ids),
            finish_reason=comp.finish_reason,
            latency_s=latency,
        )

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Shut the engine core down explicitly (its processes, or its in-process state). Safe twice."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # shutting down is best effort; the process may be exiting anyway
            log.warning("vllm engine shutdown failed", exc_info=True)
        del llm
        gc.collect()

    def describe(self) -> Dict[str, Any]:
        """vLLM version, model and the ``LLM`` arguments, for the run manifest."""
        kwargs = {k: v for k, v in self._kwargs.items() if k not in ("model", "tokenizer")}
        return EngineInfo(
            engine=self.name,
            vllm_version=self._vllm.__version__,
            model_path=self.model_path,
            model_weights=self.model_weights,
            llm_kwargs=json.loads(json.dumps(kwargs, default=str)),
            structured_outputs=self._so_factory is not None,
            too_long_rule="prompt_tokens >= max_model_len (max_tokens is cut to what is left)",
            load_s=round(self.load_s, 2),
            multiprocessing=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0",
        )
