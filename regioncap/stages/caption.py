"""The caption stage: a batch of visualize records -> the same rows with answers, parsed regions and errors.

:class:`Captioner` owns the engine (started at the first batch with work, or,
when the stages stream, as soon as the first new rows go to the preparation
workers, so that both start side by side; a resume with nothing left never
loads a model), turns request specs into engine
requests, asks once more for regions an answer left out, and finishes each row
(status, tokens, faithfulness flags, reference scores). Where it runs (this
process, a spawned child, Ray replicas) is the executor's business
(:mod:`regioncap.executors`); how its batches are committed and resumed is
:mod:`regioncap.stages.loop`'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional

from regioncap.engines import engine_name
from regioncap.engines.base import Engine, Request, Response, Sampling, retryable_answer
from regioncap.errors import RunError
from regioncap.record_types import Record, RecordError, RequestSpec
from regioncap.rundir import resume_args
from regioncap.stages import CaptionStage
from regioncap.stages.loop import grouped, pending

if TYPE_CHECKING:
    from regioncap.config import RegionCapConfig

log = logging.getLogger("regioncap")


class Captioner(CaptionStage):
    """Batch of records -> records: requests, re-asks, parsing, finish."""

    def __init__(self, cfg: RegionCapConfig, out_dir: Optional[Any] = None, *, model_path: Optional[str] = None,
                 start_hint: str = "", engine: Optional[Engine] = None, threads: Optional[int] = None) -> None:
        """``engine``: one already built (shared by several runs, as the benchmarks do); the stage uses it
        and leaves closing it to whoever built it. Without it the stage builds the configured engine at
        its first batch with work and closes it in :meth:`close`. ``threads``: the CPU threads the
        engine it builds gets (``regioncap.cpus.apply_engine_threads``); None leaves the engine's default."""
        from regioncap.strategies import build_strategy

        self.cfg = cfg
        self.out = Path(out_dir if out_dir is not None else cfg.output_dir)
        self.model_path = model_path
        self.strategy = build_strategy(cfg)
        self.engine: Optional[Engine] = engine
        #: Whether :meth:`close` closes the engine (not one handed in).
        self.owns_engine = engine is None
        #: What the engine was (``describe()``), kept after it is closed (for the manifest).
        self.engine_info: Optional[Dict[str, Any]] = None
        #: Appended to the error when the engine cannot start (how to go on).
        self.start_hint = start_hint
        self.threads = threads
        self.batch_size = max(1, cfg.engine.batch_size)
        #: Rows per batch at most, requests or not (rows that need no engine are committed as they come).
        self.max_rows = max(self.batch_size, cfg.commit_every)
        from regioncap.random_weights import is_random

        self.random_weights = is_random(cfg.model)
        s = cfg.sampling
        self._sampling = Sampling(temperature=s.temperature, top_p=s.top_p,
                                  max_tokens=s.max_tokens, seed=s.seed if s.seed is not None else cfg.seed)
        self.references_key = cfg.data.references_key
        #: This stage's engine start-up: ``engine_load_s`` (building it: imports, weights, a server's
        #: preflight), ``first_batch_s`` (its first batch: the calls and re-asks of the first rows it
        #: answered, which carry lazy warm-up); empty until it starts.
        self.startup: Dict[str, Any] = {}
        #: ``time.perf_counter()`` at the start of the engine's first call.
        self._first_t0: Optional[float] = None

    # ------------------------------------------------------------ lifetime
    def start_engine(self) -> Engine:
        """Build the configured engine (once); :class:`RunError` when it cannot start."""
        if self.engine is not None:
            return self.engine
        from regioncap.engines import EngineError, build_engine, engine_of

        t0 = time.perf_counter()
        try:
            if self.threads is not None:
                from regioncap.cpus import apply_engine_threads

                apply_engine_threads(self.threads, engine_of(self.cfg.engine).chosen(self.cfg.engine),
                                     getattr(self.cfg.engine, "device", None))
            self.engine = build_engine(self.cfg.engine, self.cfg.model, self.model_path)
        except EngineError as exc:
            raise RunError(f"engine {engine_name(self.cfg.engine)!r} could not start: {exc}.{self.start_hint}") from None
        self.startup = {"engine_load_s": time.perf_counter() - t0, "engines": 1}
        self.engine_info = self.describe_engine()
        log.info("engine: %s", self.engine_info)
        return self.engine

    def describe_engine(self) -> Optional[Dict[str, Any]]:
        """The engine's ``describe()`` (an error entry if it fails), or what was kept of it."""
        if self.engine is None:
            return self.engine_info
        try:
            return self.engine.describe()
        except Exception as exc:  # noqa: BLE001 - a manifest detail, never a reason to fail
            return {"error": f"{type(exc).__name__}: {exc}"}

    def close(self) -> None:
        if self.engine is not None:
            self.engine_info = self.describe_engine()
            if self.owns_engine:
                self.engine.close()
            self.engine = None

    # ------------------------------------------------------------- batches
    def batches(self, todo: Iterable[Dict[str, Any]]) -> Iterator[List[Dict[str, Any]]]:
        """Caption the ``todo`` records about ``engine.batch_size`` requests at a time."""
        for batch in grouped(todo, self.batch_size, self.max_rows):
            yield self.caption_batch(batch)

    def sampling(self) -> Sampling:
        """The run's sampling settings (the per-request seed defaults to the run's seed), a copy per call."""
        return replace(self._sampling)

    def request(self, spec: RequestSpec, *, reask: bool = False) -> Request:
        """The engine request of a request spec (its image path resolved against the run dir), with the
        answer constraint of the prompt strategy."""
        strategy = self.strategy
        numbers = spec.numbers
        regex, schema = strategy.constraint(numbers)
        return Request(
            key=spec.key, image_path=str(self.out / spec.image), prompt=spec.prompt,
            system=strategy.prompt.system, sampling=self.sampling(), image_size=tuple(spec.image_size),
            regex=regex, json_schema=schema,
            meta={"numbers": numbers, "answer_format": strategy.answer_format, "reask": reask},
        )

    def caption_batch(self, batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Answers for every pending row of ``batch``; rows that need no engine pass through.

        Rows the visualize stage left ``grounding`` (``propose=vlm``) are grounded
        first: the engine proposes their regions, which are then drawn and asked
        about like given boxes, in the same batch.
        """
        recs = [Record.from_dict(d) for d in batch]
        grounded = any(rec.status == "grounding" for rec in recs)
        if grounded:
            self.ground(recs)
        work = [(rec, spec) for rec in recs if rec.status == "pending" for spec in rec.requests]
        if not work:
            self._end_first_batch()
            return [rec.to_dict() for rec in recs] if grounded else batch
        self.start_engine()
        first = self.first_call
        responses = self.generate([self.request(spec) for _, spec in work])
        #: What each request's answers gave, by ``id(spec)`` (not written: ``finish`` puts it on the regions).
        got: Dict[int, Answer] = {}
        for (rec, spec), resp in zip(work, responses):
            got[id(spec)] = self.attach(spec, resp)
            if first:  # the row's requests carry the engine's warm-up: their latency is left out of latency_s
                if rec.timing is None:
                    rec.timing = {}
                rec.timing[FIRST_BATCH] = True

        # One re-ask for regions a (successful) answer left out or captioned with answer-format
        # debris (prompts.caption_debris); never invented.
        reasks = []
        if self.strategy.prompt.reask_missing and self.strategy.reasks:
            for rec, spec in work:
                answer = got[id(spec)]
                again = [n for n in spec.numbers if n not in answer.captions or n in answer.debris]
                if spec.error is None and again:
                    reasks.append((spec, self.reask_spec(rec, spec, again)))
        if reasks:
            answers = self.generate([self.request(r, reask=True) for _, r in reasks])
            for (spec, rspec), resp in zip(reasks, answers):
                again = self.attach(rspec, resp, shown=spec.numbers)
                spec.reask = RequestSpec(key=rspec.key, prompt=rspec.prompt, numbers=rspec.numbers,
                                         answer=rspec.answer, error=rspec.error, prompt_tokens=rspec.prompt_tokens,
                                         output_tokens=rspec.output_tokens, latency_s=rspec.latency_s,
                                         debris=rspec.debris)
                self.merge_reask(got[id(spec)], again)
        if first:
            self._end_first_batch()
        return [(self.finish(rec, got) if rec.status == "pending" else rec).to_dict() for rec in recs]

    def _end_first_batch(self) -> None:
        if self._first_t0 is not None and self.first_call:
            self.startup["first_batch_s"] = time.perf_counter() - self._first_t0

    def generate(self, requests: List[Request]) -> List[Response]:
        """The engine's answers; an engine that fails as a whole stops the run with how to go on."""
        from regioncap.engines import EngineError

        assert self.engine is not None
        if self._first_t0 is None and self.startup:
            self._first_t0 = time.perf_counter()
        try:
            return self.engine.generate(requests)
        except EngineError as exc:
            raise RunError(f"engine {engine_name(self.cfg.engine)!r} failed: {exc}. The rows committed so far are kept; "
                           f"after fixing this, go on with {resume_args(self.out)}") from None

    @property
    def first_call(self) -> bool:
        """Whether the engine this stage started is still on its first batch of rows (a handed-in
        engine: never timed, it was warm before)."""
        return bool(self.startup) and "first_batch_s" not in self.startup

    def ground(self, batch: List[Record]) -> None:
        """Propose regions with the engine for the ``grounding`` rows of ``batch``, then draw and prompt them."""
        from regioncap.stages.grounding import Grounder
        from regioncap.stages.visualize import transient

        if getattr(self, "_grounder", None) is None:
            self._grounder = Grounder(self.cfg, self.out, self.strategy)
        rows = [rec for rec in batch if rec.status == "grounding"]
        self.start_engine()
        requests = [self._grounder.request(rec, self.sampling()) for rec in rows]
        for rec, resp in zip(rows, self.generate(requests)):
            try:
                self._grounder.finish(rec, resp)
            except RunError:
                raise  # the machine's problem (disk full...), not the row's
            except Exception as exc:  # noqa: BLE001 - no single row or answer may stop a run
                rec.drop("grounding")
                rec.regions, rec.requests = [], []
                rec.status = "error"
                rec.error = RecordError(stage=self.name, kind="internal_error",
                                        message=f"{rec.image}: grounding failed: {type(exc).__name__}: {exc}",
                                        retryable=transient(exc))

    def reask_spec(self, rec: Record, spec: RequestSpec, missing: List[int]) -> RequestSpec:
        """The follow-up request spec for the regions ``missing`` from ``spec``'s answer."""
        return RequestSpec(key=spec.key + "/reask", image=spec.image, image_size=spec.image_size,
                           prompt=self.strategy.reask_prompt(rec, spec, missing), numbers=missing,
                           region_ids=spec.region_ids)

    def attach(self, spec: RequestSpec, resp: Response, *, shown: Optional[List[int]] = None) -> "Answer":
        """Put an engine response on its request spec; return the captions parsed from it.

        ``spec.debris`` gets the captions that carry answer-format debris (``{"<number>": reason}``);
        ``shown``: the region numbers the model saw (a re-ask's siblings, see ``parse_answer``).
        """
        spec.answer, spec.error = resp.text, resp.error
        spec.prompt_tokens, spec.output_tokens = resp.prompt_tokens, resp.output_tokens
        spec.finish_reason = resp.finish_reason
        spec.latency_s = None if resp.latency_s is None else round(resp.latency_s, 4)
        parsed = self.strategy.parse(resp.text, spec.numbers, shown=shown) if resp.ok else None
        spec.format_ok = bool(parsed and parsed.format_ok)
        answer = Answer(dict(parsed.captions), dict(parsed.debris)) if parsed else Answer()
        # The first answer's debris stays on the request (parse_success_rate reads it); the debris of
        # the captions kept goes on their regions (``finish``).
        spec.debris = _by_number(answer.debris)
        return answer

    @staticmethod
    def merge_reask(first: "Answer", again: "Answer") -> None:
        """Take the re-ask's captions into ``first``: for a region the first answer left out, and for one
        it captioned with debris when the re-ask's caption is clean. When both carry debris the first
        caption stays (the model's answer to the question asked with every region in view); the
        region keeps its debris reason either way (``first.kept_debris``)."""
        if first.kept_debris is None:
            first.kept_debris = dict(first.debris)
        kept = first.kept_debris
        for n, caption in again.captions.items():
            if n in first.captions and (n not in kept or n in again.debris):
                continue
            first.captions[n] = caption
            first.reasked.append(n)
            if n in again.debris:
                kept[n] = again.debris[n]
            else:
                kept.pop(n, None)

    def finish(self, rec: Record, got: Dict[int, "Answer"]) -> Record:
        """Regions, status, answer, tokens and scores of a row once all its answers are in (``got``:
        each request's, by ``id(spec)``)."""
        from regioncap.metrics import annotate_record

        by_id = {r.id: r for r in rec.iter_regions()}
        answers, prompt_tokens, output_tokens = [], 0, 0
        first_error = None
        for spec in rec.requests:
            answer = got.get(id(spec)) or Answer()
            captions, reasked = answer.captions, set(answer.reasked)
            kept_debris = answer.debris if answer.kept_debris is None else answer.kept_debris
            number_to_id = dict(zip(spec.numbers, spec.region_ids)) if len(spec.numbers) == len(
                spec.region_ids) else {}
            for n, rid in number_to_id.items():
                reg = by_id[rid]
                reg.caption = captions.get(n)
                reg.missing = reg.caption is None
                reg.attempt = 2 if n in reasked else 1
                reg.debris = kept_debris.get(n) if reg.caption is not None else None
                if reg.missing:
                    reg.reason = RecordError.from_dict(spec.error or {}).kind or "not_in_answer"
            if spec.answer:
                answers.append(spec.answer)
            for s in (spec, spec.reask or None):
                if s is not None:
                    prompt_tokens += s.prompt_tokens or 0
                    output_tokens += s.output_tokens or 0
            if spec.error and first_error is None:
                first_error = spec.error
        rec.answer = "\n".join(answers) if answers else None
        rec.tokens = {"prompt": prompt_tokens, "output": output_tokens}
        captioned = sum(1 for r in rec.iter_regions() if r.caption)
        if captioned == len(rec.regions):
            rec.status = "ok"
        elif captioned:
            rec.status = "partial"
        else:
            rec.status = "error"
        if first_error:
            # The request's error as the engine gave it, after the stage's name.
            rec.error = RecordError(stage=self.name).update(first_error)
            rec.error.retryable = retryable_answer(rec.error.kind)
        elif rec.status == "error":
            rec.error = RecordError(stage=self.name, kind=NO_CAPTION,
                                    message=f"{rec.image}: the model's answer named none of the regions",
                                    retryable=retryable_answer(NO_CAPTION))
        if self.random_weights:
            rec.model_weights = "random"  # every caption of such a run is noise: said on every row
        # Per-region faithfulness flags and exact-match/attribute scores (regioncap/metrics.py).
        return annotate_record(rec, self.references_key)


@dataclass
class Answer:
    """What the stage keeps of a request's answers while its batch is in hand (not written)."""

    #: ``{number: caption}`` parsed from the answer (and the re-ask's, once merged).
    captions: Dict[int, str] = field(default_factory=dict)
    #: ``{number: reason}``: the first answer's captions that carry answer-format debris.
    debris: Dict[int, str] = field(default_factory=dict)
    #: The debris of the captions kept once a re-ask was merged (None: the first answer's).
    kept_debris: Optional[Dict[int, str]] = None
    #: Numbers whose caption came from the re-ask.
    reasked: List[int] = field(default_factory=list)


#: The kind of a row whose answers named none of its regions.
NO_CAPTION = "no_caption_parsed"
#: ``timing`` of a row of an engine's first batch (its requests' latency carries the warm-up).
FIRST_BATCH = "first_batch"


def _by_number(debris: Dict[int, str]) -> Dict[str, str]:
    """``{number: reason}`` as a record holds it: string keys in number order (JSON's keys are strings)."""
    return {str(n): debris[n] for n in sorted(debris)}


__all__ = ["Captioner", "pending"]
