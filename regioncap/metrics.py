"""Run metrics from the records a run wrote, and reference scores for captions.

Pure library module: no Hydra, no W&B, no engine imports. What each number
means (its name, unit, direction, how it combines) is declared once in
:mod:`regioncap.metricspec`. The reference
scorers (``pycocoevalcap``, the ``metrics`` extra) are imported only when some
row carries references.

:func:`compute_metrics` reads the records in one streaming pass. What it keeps
does not grow with the rows beyond a few compact arrays (one word count per
caption, one latency per request, one 8-byte hash per row for the distinct
image count) and, for reference scoring (:class:`ReferenceScorer`), two floats
per scored region and the sums per row that the bootstrap intervals resample:
no caption or reference text is held. The tokenized pairs go to a temporary
file for CIDEr-D's second pass (its weights need the document frequencies of
all references) and METEOR's.

Reference scores are those the COCO caption toolkit reports, computed as its
``COCOEvalCap`` does: captions and references tokenized as its ``PTBTokenizer``
does (:func:`regioncap.ptb.ptb_tokenize`, the same tokens in Python, without
starting Java), then the ``pycocoevalcap`` scorers (BLEU-1..4, ROUGE-L, CIDEr-D;
METEOR where Java is on PATH), so the figures compare with published ones.
``exact_match`` and ``attribute_accuracy`` keep regioncap's own words
(:func:`tokenize`: lowercase, punctuation stripped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import threading
import time
from array import array
from collections import Counter, deque
from functools import partial
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from regioncap import metricspec
from regioncap.densecap import (
    IOU_THRESHOLDS, METEOR_THRESHOLDS, METEOR_TIMEOUT_S, DenseCapEvaluator, DenseCapImage, MeteorFn, MeteorUnavailable,
)
from regioncap.intervals import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
from regioncap.record_types import ERROR, RECORD, REGION, REQUEST, Record, Region, image_key
from regioncap.stages import STAGE_COUNTS, STEADY_COUNTS, CaptionStage

log = logging.getLogger("regioncap")

#: Words for scoring and comparisons: runs of letters and digits (any script).
_WORD = re.compile(r"[^\W_]+")
#: Share of a caption's word 4-grams found in its prompt above which it "repeats the prompt".
PROMPT_REPEAT_SHARE = 0.8

#: A pair to score: the candidate caption and its reference captions.
Pair = Tuple[str, Sequence[str]]


# ------------------------------------------------------------------ text helpers
def tokenize(text: Optional[str]) -> List[str]:
    """Lowercase words of ``text`` with punctuation stripped (the tokenizer every score uses)."""
    return _WORD.findall(text.lower()) if text else []


def normalize(text: Optional[str]) -> str:
    """``text`` as its tokens joined by single spaces (idempotent)."""
    return " ".join(tokenize(text))


def _ngrams(words: Sequence[str], n: int = 4) -> set:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def repeats_prompt(caption: str, prompt: Optional[str]) -> bool:
    """Whether ``caption`` (normalised) is contained in ``prompt``, or shares at least
    :data:`PROMPT_REPEAT_SHARE` of its word 4-grams with it: the model echoed its
    instructions instead of describing the region."""
    if not caption or not prompt:
        return False
    return _repeats(tokenize(caption), _prompt_index(prompt))


def _prompt_index(prompt: str) -> Tuple[str, set]:
    words = tokenize(prompt)
    return f" {' '.join(words)} ", _ngrams(words)


def _repeats(words: List[str], index: Tuple[str, set]) -> bool:
    padded, prompt_grams = index
    if not words:
        return False
    if f" {' '.join(words)} " in padded:  # whole words only
        return True
    grams = _ngrams(words)
    return bool(grams) and len(grams & prompt_grams) / len(grams) >= PROMPT_REPEAT_SHARE


def visual_tokens(image_size: Sequence[int], patch_size: int = 14, merge_size: int = 2) -> int:
    """Visual tokens of one image of ``[w, h]`` pixels for Qwen2-VL/2.5-VL:
    one per ``patch_size * merge_size`` square."""
    side = patch_size * merge_size
    w, h = int(image_size[0]), int(image_size[1])
    return (w // side) * (h // side)


def quantile(sorted_values: Sequence[float], q: float) -> Optional[float]:
    """The ``q`` quantile of already sorted values, interpolated linearly between
    closest ranks (numpy's default); ``None`` for no values."""
    n = len(sorted_values)
    if n == 0:
        return None
    pos = (n - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def describe(values: Iterable[float], digits: int = 4) -> Optional[Dict[str, Any]]:
    """``{n, mean, p50, p95, min, max}`` of ``values``; ``None`` when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    r = lambda v: round(float(v), digits)  # noqa: E731
    return {"n": len(ordered), "mean": r(sum(ordered) / len(ordered)), "p50": r(quantile(ordered, 0.5)),
            "p95": r(quantile(ordered, 0.95)), "min": r(ordered[0]), "max": r(ordered[-1])}


def _rate(num: float, den: float, digits: int = 4) -> Optional[float]:
    """``num / den`` rounded, or ``None`` over a zero ``den``: a rate of nothing has no value
    (metrics.json writes null; a merge recomputes it from the summed counts)."""
    return round(num / den, digits) if den else None


# ------------------------------------------------------------------ references
def _reference_list(entry: Any) -> List[str]:
    """One box's references (a string or a list of strings) as written (stripped), those
    with at least one word: a reference of punctuation alone is no reference."""
    items = [entry] if isinstance(entry, str) else entry if isinstance(entry, (list, tuple)) else []
    return [item.strip() for item in items if isinstance(item, str) and _WORD.search(item)]


def _record_references(record: Dict[str, Any], references_key: Optional[str]) -> Optional[list]:
    """The row's references field as a list (one entry per input box), or ``None`` if it has none."""
    if not references_key:
        return None
    collided = record.get(RECORD.input)
    if isinstance(collided, dict) and references_key in collided:  # a name regioncap uses itself
        value = collided[references_key]
    else:
        value = record.get(references_key)
    return _reference_entries(value)


def _reference_entries(value: Any) -> Optional[list]:
    """A references field's value as a list (one entry per input box), or ``None`` if it is null."""
    if value is None:
        return None
    if isinstance(value, str):
        # A JSON list in a text column, as the bbox field allows; else one reference for box 0.
        if value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):  # not JSON, an int over 4300 digits, or too deep
                pass
        if isinstance(value, str):
            return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return []  # present but unusable: every box counts as missing a reference


def references_problem(record: Dict[str, Any], references_key: Optional[str]) -> Optional[str]:
    """Why the row's references field, present and not null, is not what it should be, or ``None``.

    The field is one entry per box, each a string, a list of strings or null (no reference for
    that box); a string alone is the one box's reference (a one-box row). A number, a dict, a
    bool, or an entry of one of those is malformed: its boxes count as without a reference, and
    the run says so (``references.rows_malformed``, a warning) rather than nothing."""
    if not references_key:
        return None
    collided = record.get(RECORD.input)
    value = collided.get(references_key) if isinstance(collided, dict) and references_key in collided \
        else record.get(references_key)
    if value is None:
        return None
    entries = _reference_entries(value)
    if not entries and not isinstance(value, (str, list, tuple)):
        return f"{_short(value)}, not a list with one reference (or list of references) per box"
    for i, entry in enumerate(entries or ()):
        texts = entry if isinstance(entry, (list, tuple)) else [entry]
        if entry is not None and not all(isinstance(t, str) for t in texts):
            return f"entry {i} is {_short(entry)}, not a string or a list of strings"
    return None


def _short(value: Any) -> str:
    """``a number (5)``, ``a dict ({"a": 1})``: a value's JSON kind and its start."""
    kind = {bool: "a boolean", int: "a number", float: "a number", dict: "a dict", list: "a list",
            tuple: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        text = "..."
    return f"{kind} ({text[:40] + '...' if len(text) > 40 else text})"


def reference_texts(record: Dict[str, Any], region: Dict[str, Any],
                    references_key: Optional[str] = "references") -> List[str]:
    """The reference captions of one region as written (stripped, not normalised):
    the row's ``references_key`` entry at the region's ``source_index``; for
    showing them (report, W&B table) rather than scoring them."""
    refs = _record_references(record, references_key)
    idx = region.get(REGION.source_index)
    if refs is None or not isinstance(idx, int) or not 0 <= idx < len(refs):
        return []
    entry = refs[idx]
    items = [entry] if isinstance(entry, str) else entry if isinstance(entry, (list, tuple)) else []
    return [item.strip() for item in items if isinstance(item, str) and item.strip()]


def region_reference_texts(record: Record, region: Region, references_key: Optional[str] = "references") -> List[str]:
    """:func:`reference_texts` of a record read through the record model."""
    refs = _references_of(record, references_key)
    idx = region.source_index
    if refs is None or not isinstance(idx, int) or not 0 <= idx < len(refs):
        return []
    entry = refs[idx]
    items = [entry] if isinstance(entry, str) else entry if isinstance(entry, (list, tuple)) else []
    return [item.strip() for item in items if isinstance(item, str) and item.strip()]


def _references_of(record: Record, references_key: Optional[str]) -> Optional[list]:
    """:func:`_record_references` of a record read through the record model."""
    if not references_key:
        return None
    collided = record.input
    # An input field named like a record field is kept under ``input`` (record_types.RECORD_KEYS).
    return _reference_entries(collided[references_key] if isinstance(collided, dict) and references_key in collided
                              else record.extras().get(references_key))


def region_references(record: Dict[str, Any], references_key: Optional[str] = "references"
                      ) -> Tuple[bool, List[Tuple[Dict[str, Any], List[str]]], int]:
    """The references of each region of one record.

    Returns ``(has_references, [(region, references)], missing)``: whether the row
    carries the references field at all; every region whose input box
    (``source_index``) has at least one reference with a word, with those
    references as written (stripped; each scorer tokenizes them its own way); and
    how many regions have none (the list is shorter than ``bbox``, or its entry
    is empty or not text).
    """
    refs = _record_references(record, references_key)
    if refs is None:
        return False, [], 0
    found, missing = [], 0
    for region in record.get(RECORD.regions) or []:
        idx = region.get(REGION.source_index)
        entry = refs[idx] if isinstance(idx, int) and 0 <= idx < len(refs) else None
        texts = _reference_list(entry)
        if texts:
            found.append((region, texts))
        else:
            missing += 1
    return True, found, missing


def scorers_absent() -> Optional[str]:
    """Why BLEU/ROUGE-L/CIDEr cannot be computed here, or ``None`` when they can."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install 'regioncap[metrics]')"
    return None


def meteor_absent() -> Optional[str]:
    """Why METEOR cannot be computed here, or ``None`` when it can (Java on PATH, jar shipped)."""
    reason = scorers_absent()
    if reason:
        return reason
    if shutil.which("java") is None:
        return "java is not on PATH (METEOR runs pycocoevalcap's meteor-1.5.jar)"
    import pycocoevalcap.meteor.meteor as meteor_mod

    folder = Path(meteor_mod.__file__).parent
    jar = folder / meteor_mod.METEOR_JAR
    if not jar.is_file():
        return f"{jar} is not shipped with this pycocoevalcap"
    if not (folder / "data" / "paraphrase-en.gz").is_file():
        return f"{folder / 'data' / 'paraphrase-en.gz'} is not shipped with this pycocoevalcap"
    return None


def _meteor(gts: Dict[int, List[str]], res: Dict[int, List[str]], timeout_s: float) -> Tuple[float, List[float]]:
    """pycocoevalcap's METEOR, with a watchdog: its Java process is killed after
    ``timeout_s`` (the wrapper reads pipes without a timeout) and always reaped."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    result: Dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = scorer.compute_score(gts, res)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            result["error"] = exc

    thread = threading.Thread(target=work, name="meteor", daemon=True)
    thread.start()
    thread.join(timeout_s)
    proc = scorer.meteor_p
    timed_out = thread.is_alive()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            stream.close()
        except OSError:
            pass
    proc.kill()
    proc.wait()
    thread.join(5)
    # The wrapper's lock stays held when compute_score fails; its __del__ would block on it.
    scorer.lock = threading.Lock()
    if timed_out:
        raise TimeoutError(f"METEOR took longer than {timeout_s:.0f} s")
    if "error" in result:
        raise result["error"]
    score, scores = result["value"]
    return float(score), [float(s) for s in scores]


#: What reference scores tokenize with (metrics.json ``references.tokenizer``).
TOKENIZER = "PTB (the COCO caption toolkit's PTBTokenizer, CoreNLP 3.4.1), in Python (regioncap.ptb)"
#: BLEU's n-gram orders (pycocoevalcap's ``Bleu(4)``).
BLEU_N = 4


def _ptb_pairs(pairs: Sequence[Pair]) -> Tuple[Dict[int, List[str]], Dict[int, List[str]]]:
    """``(gts, res)`` of pycocoevalcap's scorers for ``pairs``: every caption and
    reference tokenized as the COCO caption toolkit's PTBTokenizer does."""
    from regioncap.ptb import ptb_tokenize_batch

    refs = [_reference_list(r) for _, r in pairs]
    if any(not r for r in refs):
        raise ValueError("every pair needs at least one reference with a word")
    # One batch of references and one of captions, in this order, as COCOEvalCap runs
    # the tokenizer (a caption's last token can depend on the next caption).
    res = {i: [text] for i, text in enumerate(ptb_tokenize_batch([c for c, _ in pairs]))}
    flat = iter(ptb_tokenize_batch([text for r in refs for text in r]))
    gts = {i: [next(flat) for _ in r] for i, r in enumerate(refs)}
    return gts, res


def bleu_stats(pairs: Sequence[Pair]) -> List[Tuple[int, ...]]:
    """Per ``(caption, references)`` pair, the counts pycocoevalcap's ``BleuScorer``
    adds up for corpus BLEU, on PTB tokens: ``(guess_1..guess_4, correct_1..correct_4,
    test_len, ref_len)``, where ``guess_n`` is the caption's n-gram count,
    ``correct_n`` those found in a reference (clipped by the most any one reference
    has), ``test_len`` the caption's length and ``ref_len`` the length of the
    reference closest to it (the shorter on a tie: ``option="closest"``).

    Corpus BLEU over any multiset of pairs is :func:`bleu_from_stats` of the sum of
    their vectors, so a bootstrap resamples pairs and sums. Each pair needs a
    reference with a word (``ValueError`` otherwise).
    """
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    gts, res = _ptb_pairs(pairs)
    out = []
    for i in range(len(pairs)):
        comps = cook_test(res[i][0], cook_refs(gts[i], n=BLEU_N), eff="closest", n=BLEU_N)
        out.append((*comps["guess"], *comps["correct"], comps["testlen"], comps["reflen"]))
    return out


def bleu_from_stats(total: Sequence[float]) -> List[float]:
    """Corpus BLEU-1..4 from summed :func:`bleu_stats` vectors, exactly as pycocoevalcap's
    ``BleuScorer.compute_score(option="closest")`` computes it, with its smoothing
    constants (``1e-15`` added to the matches and the caption length, ``1e-9`` to the
    n-gram counts and the reference length) and its brevity penalty."""
    n = BLEU_N
    if len(total) != 2 * n + 2:
        raise ValueError(f"a BLEU statistics vector has {2 * n + 2} entries, got {len(total)}")
    small, tiny = 1e-9, 1e-15
    guess, correct, test_len, ref_len = total[:n], total[n:2 * n], total[2 * n], total[2 * n + 1]
    scores, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


#: The n-gram orders of CIDEr-D and the width of its length penalty (pycocoevalcap's ``Cider()``).
CIDER_N, CIDER_SIGMA = 4, 6.0


def _cider_vector(counts: Dict[tuple, int], df: Dict[tuple, float], ref_len: Any
                  ) -> Tuple[List[Dict[tuple, Any]], List[Any], int]:
    """One sentence's tf-idf vectors per n-gram order, their norms and its length, as
    pycocoevalcap's ``CiderScorer.compute_cider`` computes them (the same operations
    in the same order, so the same bits), from the corpus document frequencies ``df``
    and ``ref_len`` (the log of the number of pairs)."""
    import numpy as np

    vec: List[Dict[tuple, Any]] = [{} for _ in range(CIDER_N)]
    length = 0
    norm = [0.0 for _ in range(CIDER_N)]
    for ngram, term_freq in counts.items():
        n = len(ngram) - 1
        vec[n][ngram] = float(term_freq) * (ref_len - np.log(max(1.0, df.get(ngram, 0.0))))
        norm[n] += pow(vec[n][ngram], 2)
        if n == 1:  # the toolkit's length counts bigrams (kept: the scores must be the toolkit's)
            length += term_freq
    return vec, [np.sqrt(x) for x in norm], length


def _cider(caption: str, references: Sequence[str], df: Dict[tuple, float], ref_len: Any) -> float:
    """CIDEr-D of one tokenized pair against the corpus statistics ``df`` and ``ref_len``:
    pycocoevalcap's per-pair score, bit for bit (tests/test_metrics_stream.py)."""
    import numpy as np
    from pycocoevalcap.cider.cider_scorer import precook

    vec, norm, length = _cider_vector(precook(caption, CIDER_N), df, ref_len)
    score = np.array([0.0 for _ in range(CIDER_N)])
    for ref in references:
        vec_ref, norm_ref, length_ref = _cider_vector(precook(ref, CIDER_N), df, ref_len)
        delta = float(length - length_ref)
        val = np.array([0.0 for _ in range(CIDER_N)])
        for n in range(CIDER_N):
            for ngram in vec[n]:
                theirs = vec_ref[n].get(ngram, 0.0)
                val[n] += min(vec[n][ngram], theirs) * theirs
            if norm[n] != 0 and norm_ref[n] != 0:
                val[n] /= (norm[n] * norm_ref[n])
            val[n] *= np.e ** (-(delta ** 2) / (2 * CIDER_SIGMA ** 2))
        score += val
    avg = np.mean(score)
    avg /= len(references)
    avg *= 10.0
    return float(avg)


class _RowSums:
    """Per-row sums of per-region values and per-row region counts, the rows given in
    order: what the cluster bootstrap of an interval needs
    (:func:`regioncap.intervals.totals_interval`), a few numbers per row instead of a
    value per region. Summed in the order given, as ``cluster_totals`` sums, so the
    interval is the same bit for bit."""

    def __init__(self, width: int = 1) -> None:
        self.width = width
        self.sums = array("d")
        self.counts = array("d")
        self._last: Any = None

    def add(self, row: int, values: Sequence[float]) -> None:
        if row != self._last or not self.counts:
            self.sums.extend([0.0] * self.width)
            self.counts.append(0.0)
            self._last = row
        base = len(self.sums) - self.width
        for j, value in enumerate(values):
            self.sums[base + j] += value
        self.counts[-1] += 1.0

    def interval(self, statistic: Any, *, n_boot: int, seed: int, confidence: float) -> Optional[Dict[str, Any]]:
        """``{low, high, n_clusters, n_boot}`` (bounds rounded to 4 digits), or ``None``
        without a value or a defined interval."""
        import numpy as np

        from regioncap.intervals import totals_interval

        if not self.counts:
            return None
        iv = totals_interval(np.frombuffer(self.sums).reshape(-1, self.width), np.frombuffer(self.counts),
                             statistic=statistic, n_boot=n_boot, confidence=confidence, seed=seed)
        if iv["low"] is None:
            return None
        return {"low": round(iv["low"], 4), "high": round(iv["high"], 4), "n_clusters": iv["n_clusters"],
                "n_boot": n_boot}


class _MeteorStream:
    """pycocoevalcap's METEOR over pairs given one at a time: each pair's statistics
    from the JVM as it comes (its ``SCORE`` line), kept in a temporary file rather
    than in memory, then one ``EVAL`` line written from that file, as
    ``Meteor.compute_score`` writes it, for the corpus score and each pair's. A
    watchdog kills the JVM ``timeout_s`` after it starts (the wrapper reads its pipes
    without a timeout); :meth:`close` always reaps it."""

    def __init__(self, timeout_s: float, keep_each: bool) -> None:
        import tempfile

        from pycocoevalcap.meteor.meteor import Meteor

        self.timeout_s = timeout_s
        self.started = time.perf_counter()
        self.scorer = Meteor()
        self.timed_out = threading.Event()
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        self._stats = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.n = 0
        self.each: Optional[array] = array("d") if keep_each else None

    def _expire(self) -> None:
        self.timed_out.set()
        self.scorer.meteor_p.kill()

    def _answer(self, text: str) -> str:
        if not text:
            raise RuntimeError("METEOR's Java process ended without an answer")
        return text

    def add(self, caption: str, references: Sequence[str]) -> None:
        """Send one tokenized pair; its statistics go to the temporary file."""
        with self._watched():
            stat = self._answer(self.scorer._stat(caption, list(references)))
        self._stats.write(stat + "\n")
        self.n += 1

    def finish(self) -> float:
        """The corpus METEOR of every pair sent (their scores in :attr:`each` when kept)."""
        proc = self.scorer.meteor_p
        self._stats.seek(0)
        with self._watched():
            proc.stdin.write(b"EVAL")
            for line in self._stats:
                proc.stdin.write(f" ||| {line.rstrip(chr(10))}".encode())
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            for _ in range(self.n):
                value = float(self._answer(proc.stdout.readline().decode().strip()))
                if self.each is not None:
                    self.each.append(value)
            return float(self._answer(proc.stdout.readline().decode().strip()))

    @contextlib.contextmanager
    def _watched(self) -> Iterator[None]:
        """Whatever a JVM killed by the watchdog makes fail (a broken pipe, no answer) is its timeout."""
        try:
            yield
        except Exception as exc:
            if self.timed_out.is_set():
                raise TimeoutError(f"METEOR took longer than {self.timeout_s:.0f} s") from exc
            raise

    def close(self) -> None:
        self._timer.cancel()
        self._stats.close()
        proc = self.scorer.meteor_p
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        proc.kill()
        proc.wait()


def _meteor_failed(exc: BaseException) -> str:
    """``meteor_absent`` of a METEOR run that failed, logged as a warning."""
    reason = f"METEOR failed: {type(exc).__name__}: {exc}"
    log.warning("%s", reason)
    return reason


class ReferenceScorer:
    """Reference scores of ``(caption, references)`` pairs given one at a time, in memory
    that does not grow with the pairs' texts: what :func:`score_references` and
    :func:`compute_metrics` compute, to the same bits.

    Per pair, :meth:`add` scores exact match and attribute accuracy at once, and
    feeds the caption and its references to the PTB tokenizer's two batches
    (:class:`regioncap.ptb.PTBBatch`, as the toolkit tokenizes all candidates in one
    batch and all references in another). Each tokenized pair then gets its BLEU
    statistics and ROUGE-L, its reference n-grams go into CIDEr-D's document
    frequencies, and its tokens into a temporary file. :meth:`finish` reads that
    file back for the second pass CIDEr-D needs (every pair's score depends on the
    document frequencies of the whole corpus) and for METEOR. What stays in memory
    per pair is two floats (ROUGE-L and CIDEr-D, whose corpus value is numpy's mean
    of them); per row, the sums the bootstrap intervals resample (:class:`_RowSums`).
    ``per_pair`` also keeps each pair's scores (:attr:`per`), for a caller that
    wants them.
    """

    def __init__(self, *, meteor: bool = False, meteor_timeout_s: float = METEOR_TIMEOUT_S,
                 per_pair: bool = False) -> None:
        self.meteor, self.meteor_timeout_s = meteor, meteor_timeout_s
        #: Why the toolkit's scores (BLEU, ROUGE-L, CIDEr-D, METEOR) cannot be computed, or None.
        self.absent = scorers_absent()
        self.n = 0
        self._exact_sum = self._attr_sum = 0.0
        self._attr_n = 0
        #: Per-row sums of each score with an interval (INTERVAL_SCORES and BLEU-4's statistics).
        self.rows = {"bleu4": _RowSums(2 * BLEU_N + 2), **{name: _RowSums() for name in INTERVAL_SCORES}}
        self.per: Optional[List[Dict[str, Optional[float]]]] = [] if per_pair else None
        self._seconds = 0.0
        if self.absent:
            return
        from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test
        from pycocoevalcap.cider.cider_scorer import precook
        from pycocoevalcap.rouge.rouge import Rouge

        from regioncap.ptb import PTBBatch

        self._cook_refs, self._cook_test, self._precook, self._rouge_l = cook_refs, cook_test, precook, Rouge()
        self._captions, self._references = PTBBatch(), PTBBatch()
        #: Pairs given and not yet tokenized: (row, references); their tokens as they come.
        self._waiting: Deque[Tuple[int, int]] = deque()
        self._caption_tokens: Deque[str] = deque()
        self._reference_tokens: Deque[str] = deque()
        self._bleu_total = [0] * (2 * BLEU_N + 2)
        self._caption_lens = self._reference_lens = self._references_n = self._short = 0
        self._rouge = array("d")
        self._cider = array("d")
        self._df: Dict[tuple, float] = {}
        self._tokenized = 0
        self._spill: Any = None

    def add(self, caption: str, references: Sequence[str], row: int = 0) -> None:
        """Score one pair: ``caption`` (with a word) and its ``references`` (at least one
        with a word, as :func:`region_references` gives them); ``row``: its row, the
        cluster of the intervals (rows given in order)."""
        t0 = time.perf_counter()
        scores = match_scores(caption, references)
        self.n += 1
        self._exact_sum += scores["exact_match"]
        self.rows["exact_match"].add(row, (scores["exact_match"],))
        if scores["attribute_accuracy"] is not None:
            self._attr_sum += scores["attribute_accuracy"]
            self._attr_n += 1
            self.rows["attribute_accuracy"].add(row, (scores["attribute_accuracy"],))
        if self.per is not None:
            self.per.append({"bleu4": None, "rouge_l": None, "cider": None, "meteor": None, **scores})
        if not self.absent:
            self._waiting.append((row, len(references)))
            self._caption_tokens.extend(self._captions.push(caption))
            for text in references:
                self._reference_tokens.extend(self._references.push(text))
            self._tokens_ready()
        self._seconds += time.perf_counter() - t0

    def _tokens_ready(self) -> None:
        """Score the pairs whose tokens have all come out of the tokenizer."""
        while self._waiting and self._caption_tokens and len(self._reference_tokens) >= self._waiting[0][1]:
            row, n_refs = self._waiting.popleft()
            caption = self._caption_tokens.popleft()
            references = [self._reference_tokens.popleft() for _ in range(n_refs)]
            self._first_pass(row, caption, references)

    def _first_pass(self, row: int, caption: str, references: List[str]) -> None:
        """One tokenized pair: everything but CIDEr-D (which needs the whole corpus) and METEOR."""
        comps = self._cook_test(caption, self._cook_refs(references, n=BLEU_N), eff="closest", n=BLEU_N)
        stats = (*comps["guess"], *comps["correct"], comps["testlen"], comps["reflen"])
        for k, value in enumerate(stats):
            self._bleu_total[k] += value
        self.rows["bleu4"].add(row, stats)
        rouge = self._rouge_l.calc_score([caption], references)
        self._rouge.append(rouge)
        self.rows["rouge_l"].add(row, (rouge,))
        # Lengths as BLEU counts them (words of the tokenized text): with captions of three
        # words, BLEU-4 has no 4-gram to count and says little.
        words = len(caption.split())
        self._caption_lens += words
        self._short += words < BLEU_N
        self._reference_lens += sum(len(r.split()) for r in references)
        self._references_n += len(references)
        for ngram in {ngram for ref in references for ngram in self._precook(ref, CIDER_N)}:
            self._df[ngram] = self._df.get(ngram, 0.0) + 1.0
        if self.per is not None:
            self.per[self._tokenized].update(bleu4=bleu_from_stats(stats)[BLEU_N - 1], rouge_l=float(rouge))
        if self._spill is None:
            import tempfile

            self._spill = tempfile.TemporaryFile("w+", encoding="utf-8")
        self._spill.write(json.dumps([row, caption, *references]) + "\n")
        self._tokenized += 1

    def finish(self) -> Dict[str, Any]:
        """The corpus scores (:func:`score_references`'s first value) of every pair given."""
        corpus: Dict[str, Any] = {"regions_scored": self.n, "bleu1": None, "bleu2": None, "bleu3": None,
                                  "bleu4": None, "rouge_l": None, "cider": None, "meteor": None,
                                  "exact_match": round(self._exact_sum / self.n, 4) if self.n else None,
                                  "attribute_accuracy": round(self._attr_sum / self._attr_n, 4) if self._attr_n
                                  else None}
        if self.absent:
            corpus.update(scores_absent=self.absent, meteor_absent=self.absent)
            return corpus
        if not self.n:
            corpus["meteor_absent"] = "no region has both a caption and references"
            return corpus
        log.info("reference scoring: %d regions (PTB tokens; BLEU-1..4, ROUGE-L, CIDEr%s)", self.n,
                 ", METEOR: starting Java" if self.meteor else "; METEOR off, metrics.meteor=true turns it on")
        t0 = time.perf_counter()
        try:
            self._caption_tokens.extend(self._captions.finish())
            self._reference_tokens.extend(self._references.finish())
            self._tokens_ready()
            corpus.update(self._second_pass())
        finally:
            if self._spill is not None:
                self._spill.close()
                self._spill = None
        corpus["scoring_s"] = round(self._seconds + time.perf_counter() - t0, 3)
        log.info("reference scoring took %.2f s%s", corpus["scoring_s"],
                 f" (METEOR {corpus['scoring_meteor_s']:.2f} s)" if "scoring_meteor_s" in corpus else "")
        return corpus

    def _second_pass(self) -> Dict[str, Any]:
        """CIDEr-D (and METEOR) of every pair, read back from the temporary file."""
        import numpy as np

        ref_len = np.log(float(self._tokenized))
        meteor, reason = None, None
        if self.meteor:
            reason = meteor_absent()
            if reason is None:
                try:
                    meteor = _MeteorStream(self.meteor_timeout_s, keep_each=self.per is not None)
                except Exception as exc:  # noqa: BLE001 - METEOR is optional; say why it is missing
                    reason = _meteor_failed(exc)
        else:
            reason = "not requested"
        out: Dict[str, Any] = {}
        try:
            self._spill.seek(0)
            for i, line in enumerate(self._spill):
                row, caption, *references = json.loads(line)
                cider = _cider(caption, references, self._df, ref_len)
                self._cider.append(cider)
                self.rows["cider"].add(row, (cider,))
                if self.per is not None:
                    self.per[i]["cider"] = cider
                if meteor is not None and reason is None:
                    try:
                        meteor.add(caption, references)
                    except Exception as exc:  # noqa: BLE001 - as above
                        reason = _meteor_failed(exc)
            bleu = bleu_from_stats(self._bleu_total)
            out = {f"bleu{k + 1}": round(float(bleu[k]), 4) for k in range(BLEU_N)}
            out.update({"rouge_l": round(float(np.mean(np.frombuffer(self._rouge))), 4),
                        "cider": round(float(np.mean(np.frombuffer(self._cider))), 4), "meteor": None,
                        "caption_tokens_mean": round(self._caption_lens / self._tokenized, 3),
                        "reference_tokens_mean": round(self._reference_lens / self._references_n, 3),
                        "captions_without_4gram": round(self._short / self._tokenized, 4)})
            if meteor is not None and reason is None:
                try:
                    out["meteor"] = round(meteor.finish(), 4)
                    out["scoring_meteor_s"] = round(time.perf_counter() - meteor.started, 3)
                    if self.per is not None:
                        for per, value in zip(self.per, meteor.each or ()):
                            per["meteor"] = value
                except Exception as exc:  # noqa: BLE001 - as above
                    reason = _meteor_failed(exc)
        finally:
            if meteor is not None:
                meteor.close()
        if reason is not None:
            out["meteor_absent"] = reason
        return out

    def intervals(self, *, n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                  confidence: float = DEFAULT_CONFIDENCE) -> Dict[str, Any]:
        """``references.intervals`` of metrics.json (see :func:`reference_intervals`), from the
        per-row sums; call after :meth:`finish`."""
        out: Dict[str, Any] = {}
        for name, sums in self.rows.items():
            statistic = _bleu4_of_totals if name == "bleu4" else "mean"
            iv = sums.interval(statistic, n_boot=n_boot, seed=seed, confidence=confidence)
            if iv is not None:
                out[name] = iv
        return out


def score_references(pairs: Sequence[Pair], *, meteor: bool = False, meteor_timeout_s: float = METEOR_TIMEOUT_S
                     ) -> Tuple[Dict[str, Any], List[Dict[str, Optional[float]]]]:
    """Corpus scores and per-region scores of ``(caption, references)`` pairs in one go
    (one METEOR process for both; :class:`ReferenceScorer` does the work).

    Corpus scores are those the COCO caption toolkit reports, on its PTB tokens
    (:mod:`regioncap.ptb`): BLEU-1..4 and METEOR from statistics pooled over the
    whole corpus (not means of per-region scores); ROUGE-L and CIDEr-D as means
    over pairs; with them the mean length in tokens of the captions and of the
    references and the share of captions too short for a 4-gram; each ``None``
    with a ``scores_absent`` / ``meteor_absent`` reason when its scorer is
    unavailable or nothing can be scored. ``exact_match`` and
    ``attribute_accuracy`` (:func:`match_scores`, means over pairs) need no
    scorer and are always there. Per region: one dict
    ``{bleu4, rouge_l, cider, meteor, exact_match, attribute_accuracy}`` per pair, in order, on the
    same tokens as the corpus scores; BLEU-4 there is
    pycocoevalcap's smoothed sentence BLEU, and CIDEr weighs n-grams by their
    rarity across the references of *all* pairs given, so a region's CIDEr
    depends on the corpus it is scored in (a single pair scores 0). A pair
    without any non-empty reference gets ``None`` everywhere and is not counted.
    """
    scorer = ReferenceScorer(meteor=meteor, meteor_timeout_s=meteor_timeout_s, per_pair=True)
    usable = []
    for i, (caption, refs) in enumerate(pairs):
        texts = _reference_list(refs)
        if texts:
            usable.append(i)
            scorer.add(caption, texts, i)
    corpus = scorer.finish()
    empty = {"bleu4": None, "rouge_l": None, "cider": None, "meteor": None,
             "exact_match": None, "attribute_accuracy": None}
    per: List[Dict[str, Optional[float]]] = [dict(empty) for _ in pairs]
    for i, scores in zip(usable, scorer.per or ()):
        per[i] = scores
    return corpus, per


def score_regions(pairs: Sequence[Pair], *, meteor: bool = False,
                  meteor_timeout_s: float = METEOR_TIMEOUT_S) -> List[Dict[str, Optional[float]]]:
    """Per-region scores ``{bleu4, rouge_l, cider, meteor}`` of ``(caption, references)``
    pairs, one dict per pair in order (see :func:`score_references`); ``meteor``
    is ``None`` unless asked for and available. For a report or W&B table."""
    return score_references(pairs, meteor=meteor, meteor_timeout_s=meteor_timeout_s)[1]


def score_corpus(pairs: Sequence[Pair], *, meteor: bool = False,
                 meteor_timeout_s: float = METEOR_TIMEOUT_S) -> Dict[str, Any]:
    """Corpus-level BLEU-1..4, ROUGE-L, CIDEr and METEOR of ``(caption, references)``
    pairs, with ``regions_scored`` (see :func:`score_references`)."""
    return score_references(pairs, meteor=meteor, meteor_timeout_s=meteor_timeout_s)[0]


def meteor_sentence_scores(pairs: Sequence[Pair], *, timeout_s: float = METEOR_TIMEOUT_S) -> List[float]:
    """Sentence-level METEOR 1.5 of each ``(caption, references)`` pair, in order, all in
    one Java process (the watchdog of :func:`score_references`'s METEOR), on text
    normalised as every score here is (:func:`normalize`). A pair whose caption or
    references have no word scores 0 without being sent (nothing to match). Raises
    when METEOR cannot run (see :func:`meteor_absent`) or takes over ``timeout_s``."""
    texts = [(normalize(c), _reference_list(refs if isinstance(refs, str) else list(refs))) for c, refs in pairs]
    usable = [i for i, (c, refs) in enumerate(texts) if c and refs]
    scores = [0.0] * len(pairs)
    if usable:
        _, each = _meteor({k: texts[i][1] for k, i in enumerate(usable)},
                          {k: [texts[i][0]] for k, i in enumerate(usable)}, timeout_s)
        for i, value in zip(usable, each):
            scores[i] = value
    return scores


def densecap_meteor(pairs: Sequence[Pair], *, timeout_s: float = METEOR_TIMEOUT_S) -> List[float]:
    """DenseCap mAP's ``meteor_fn``: :func:`meteor_sentence_scores` of each pair, one Java
    process; raises :class:`regioncap.densecap.MeteorUnavailable` (``densecap.absent``)
    when Java or pycocoevalcap is missing."""
    reason = meteor_absent()
    if reason:
        raise MeteorUnavailable(reason)
    log.info("DenseCap mAP: METEOR of %d prediction(s), starting Java", len(pairs))
    return meteor_sentence_scores(pairs, timeout_s=timeout_s)


# ------------------------------------------------------------------ exact match, attributes
#: Words left out of a reference's content words (attribute accuracy).
ARTICLES = frozenset({"a", "an", "the"})


def exact_match(caption: Optional[str], references: Sequence[str]) -> float:
    """1.0 when ``caption`` equals one of ``references`` after :func:`normalize`
    (lowercase, punctuation and extra whitespace stripped), else 0.0."""
    text = normalize(caption)
    return float(bool(text) and any(text == normalize(r) for r in references if isinstance(r, str)))


def attribute_accuracy(caption: Optional[str], references: Sequence[str]) -> Optional[float]:
    """Share of a reference's content words (every word but the articles a/an/the) found
    among the caption's words, best over ``references``; ``None`` when no reference has a
    content word. For ``"a red circle"`` it scores the colour and the shape: ``"a red
    square"`` gets 0.5, ``"red circle"`` 1.0."""
    words = set(tokenize(caption))
    best: Optional[float] = None
    for ref in references:
        content = [w for w in tokenize(ref if isinstance(ref, str) else None) if w not in ARTICLES]
        if content:
            share = sum(w in words for w in content) / len(content)
            best = share if best is None else max(best, share)
    return best


def match_scores(caption: Optional[str], references: Sequence[str]) -> Dict[str, Optional[float]]:
    """``{exact_match, attribute_accuracy}`` of one caption against its references
    (no scorer package needed)."""
    return {"exact_match": exact_match(caption, references),
            "attribute_accuracy": attribute_accuracy(caption, references)}


# ------------------------------------------------------------------ faithfulness
#: Why a caption may describe the whole scene rather than its region (see docs/formats.md).
FLAG_REASONS = ("same_as_other_regions", "lists_objects", "many_objects", "describes_image")
#: Count words of three or more things: flagged when a plural follows within two words ("three red cars").
_COUNT_WORDS = frozenset({"three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                          "dozen", "dozens"})
#: Irregular plurals (a plural is otherwise a word of 4+ letters ending in "s", not "ss"/"us"/"is").
_PLURALS = frozenset({"people", "men", "women", "children", "mice", "geese", "feet", "teeth", "sheep", "fish"})
#: Quantifiers and collective words that mean many things on their own.
_MANY_WORDS = frozenset({"several", "many", "multiple", "numerous", "various", "lots", "crowd", "crowds",
                         "group", "groups", "people", "everyone", "objects", "things", "items"})
#: Words that start a noun phrase in a list ("a cat, a dog and a bird").
_DETERMINERS = frozenset({"a", "an", "the", "some", "two", "one", "another", "his", "her", "their", "its"})
#: Phrases that talk about the picture as a whole.
_IMAGE_PHRASES = ("the image", "this image", "the picture", "this picture", "the photo", "this photo",
                  "the scene", "this scene", "the whole", "the entire")
_SPLIT_LIST = re.compile(r",|;|\band\b|\bwith\b|&")
#: Noun phrases in one caption from which it "lists objects".
LIST_MIN_OBJECTS = 3


def _numeral(word: str) -> Optional[int]:
    """The value of a word written in decimal digits (any script: "12", "\u0661\u0662"), else None.

    ``str.isdigit()`` is not the test: it is true for "\u2460" and "\u00b2", which
    ``int()`` refuses. Past 9 digits the value is not needed (only 3..999 count)
    and ``int()`` would refuse more than 4300.
    """
    if not word.isdecimal():
        return None
    return int(word) if len(word) <= 9 else 10**9


def _plural(word: str) -> bool:
    return word in _PLURALS or (len(word) >= 4 and word.endswith("s") and not word.endswith(("ss", "us", "is")))


def caption_flags(caption: Optional[str]) -> List[str]:
    """Reasons (from :data:`FLAG_REASONS`, except ``same_as_other_regions``) why one caption
    reads like a description of a whole scene rather than one region.

    - ``lists_objects``: at least :data:`LIST_MIN_OBJECTS` noun phrases joined by
      commas/"and"/"with", each starting with an article, a possessive or a count
      ("a man, a dog and a red car"); "a red and white bus" is one phrase.
    - ``many_objects``: a count of three or more (a number word or a numeral >= 3)
      followed within two words by a plural ("three red cars", "12 apples"), a
      quantifier (several, many, multiple, a group/crowd of) or a collective
      plural (people, objects, things).
    - ``describes_image``: it talks about the picture itself ("the image shows...").
    """
    words = tokenize(caption)
    if not words:
        return []
    flags = []
    phrases = [tokenize(part) for part in _SPLIT_LIST.split(caption.lower())]
    if sum(1 for p in phrases if p and p[0] in _DETERMINERS) >= LIST_MIN_OBJECTS:
        flags.append("lists_objects")
    counted = any((w in _COUNT_WORDS or 3 <= (_numeral(w) or 0) < 1000)
                  and any(_plural(v) for v in words[i + 1:i + 3]) for i, w in enumerate(words))
    if counted or any(w in _MANY_WORDS for w in words):
        flags.append("many_objects")
    padded = f" {' '.join(words)} "
    if any(f" {phrase} " in padded for phrase in _IMAGE_PHRASES):
        flags.append("describes_image")
    return flags


def region_flags(regions: Sequence[Dict[str, Any]]) -> List[List[str]]:
    """Faithfulness flags of each region of one row, in order (``[]`` when none or uncaptioned):
    :func:`caption_set_flags` of the regions' captions."""
    return caption_set_flags([Region.from_dict(r).caption if isinstance(r, dict) else None for r in regions])


def caption_set_flags(captions: Sequence[Optional[str]]) -> List[List[str]]:
    """Faithfulness flags of the captions of one row's regions, in order (``[]`` when none or uncaptioned).

    On top of :func:`caption_flags`, every captioned region of a row gets
    ``same_as_other_regions`` when the row has two or more captioned regions and
    they all carry the same caption (normalised): one description for every box
    describes the image, not the regions.
    """
    texts = [normalize(c) for c in captions]
    captioned = [t for t in texts if t]
    same = len(captioned) >= 2 and len(set(captioned)) == 1
    out = []
    for caption, text in zip(captions, texts):
        if not text:
            out.append([])
            continue
        flags = ["same_as_other_regions"] if same else []
        out.append(flags + caption_flags(caption))
    return out


def annotate_record(record: Record, references_key: Optional[str] = "references") -> Record:
    """Add per-region checks to one caption record, in place, and return it: ``flags``
    (:func:`caption_set_flags`) on every region, and ``scores`` with ``exact_match`` and
    ``attribute_accuracy`` (:func:`match_scores`) on every captioned region that has
    references. Cheap and corpus-free, so the caption stage runs it on every row."""
    regions = [r for r in record.iter_regions() if isinstance(r, Region)]
    for reg, flags in zip(regions, caption_set_flags([r.caption for r in regions])):
        reg.flags = flags
    refs = _references_of(record, references_key)
    if refs is None:
        return record
    for reg in regions:
        idx = reg.source_index
        texts = _reference_list(refs[idx] if isinstance(idx, int) and 0 <= idx < len(refs) else None)
        if texts and reg.caption and normalize(reg.caption):
            scores = reg.scores if isinstance(reg.scores, dict) else {}
            scores.update(match_scores(reg.caption, texts))
            reg.scores = scores
    return record


# ------------------------------------------------------------------ intervals
#: Reference scores whose corpus value is a mean over regions, so a cluster bootstrap of the per-region
#: values gives their interval. BLEU-4 and METEOR pool statistics over the corpus (the mean of per-region
#: METEOR can be far from it: 0.94 against 0.66 on the shapes demo), so theirs needs per-region statistics
#: and a statistic of their sums (bleu_stats and bleu_from_stats for BLEU-4: reference_intervals(pairs=...)).
INTERVAL_SCORES = ("exact_match", "attribute_accuracy", "rouge_l", "cider")


def _bleu4_of_totals(totals: Any) -> List[float]:
    """Corpus BLEU-4 of each row of summed :func:`bleu_stats` vectors (a bootstrap statistic)."""
    return [bleu_from_stats(row)[BLEU_N - 1] for row in totals]


def reference_intervals(per: Sequence[Dict[str, Optional[float]]], rows: Sequence[int], *,
                        n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                        confidence: float = DEFAULT_CONFIDENCE, pairs: Optional[Sequence[Pair]] = None
                        ) -> Dict[str, Any]:
    """``references.intervals`` of metrics.json: a ``confidence`` interval for each of
    :data:`INTERVAL_SCORES` that has per-region values, by a cluster bootstrap over
    rows (``rows[i]``: the row of ``per[i]``; see :mod:`regioncap.intervals`).

    Returns ``{<score>: {low, high, n_clusters, n_boot}}`` (bounds rounded to 4
    digits; ``n_clusters``: the rows with a value of that score), the shape
    :mod:`regioncap.metricspec` reads as the interval of ``references.<score>``. With
    ``pairs`` (the scored ``(caption, references)`` pairs, in ``per``'s order) corpus
    BLEU-4 gets one too, from the pairs' pooled :func:`bleu_stats`.
    The method (:data:`regioncap.intervals.METHOD`), the 95% level and the seed
    (the run's) are documented in docs/formats.md rather than repeated per run.
    """
    # The per-row sums a run's pass keeps (ReferenceScorer.intervals): the rows in order, each
    # row's regions in theirs (a stable sort), so the sums are those cluster_totals would make.
    order = sorted(range(len(per)), key=lambda i: rows[i])
    sums = {"bleu4": _RowSums(2 * BLEU_N + 2), **{name: _RowSums() for name in INTERVAL_SCORES}}
    if pairs is not None:
        # Corpus BLEU pools n-gram counts: resample the pairs' sufficient statistics and pool those.
        usable = [i for i in order if per[i].get("bleu4") is not None]
        for i, stats in zip(usable, bleu_stats([pairs[i] for i in usable]) if usable else ()):
            sums["bleu4"].add(rows[i], stats)
    for i in order:
        for name in INTERVAL_SCORES:
            value = per[i].get(name)
            if value is not None:
                sums[name].add(rows[i], (value,))
    out: Dict[str, Any] = {}
    for name, row_sums in sums.items():
        iv = row_sums.interval(_bleu4_of_totals if name == "bleu4" else "mean", n_boot=n_boot, seed=seed,
                               confidence=confidence)
        if iv is not None:
            out[name] = iv
    return out


# ------------------------------------------------------------------ metrics
class _Accumulator:
    """The running state of one pass over the records."""

    def __init__(self, patch_size: int, merge_size: int, references_key: Optional[str], *, meteor: bool = False,
                 meteor_timeout_s: float = METEOR_TIMEOUT_S,
                 visual: Optional[Callable[[int, int], int]] = None) -> None:
        self.patch_size, self.merge_size, self.references_key = patch_size, merge_size, references_key
        self.visual = visual
        self.c: Counter = Counter()
        self.errors: Counter = Counter()
        self.error_stages: Counter = Counter()
        self.dropped: Counter = Counter()
        self.missing: Counter = Counter()
        self.image_hashes = array("Q")
        self.words = array("I")
        self.latency = array("d")
        self.reask_latency = array("d")
        self.meteor, self.meteor_timeout_s = meteor, meteor_timeout_s
        #: Scores each (caption, references) pair as it is read, made at the first (the scorers
        #: are imported only then); the row (0-based, in read order) of a pair is the cluster
        #: its bootstrap intervals resample.
        self._scorer: Optional[ReferenceScorer] = None
        self.has_references = False
        #: The first row whose references field is malformed, and why (:func:`references_problem`).
        self.references_malformed_first: Optional[str] = None
        self.flags: Counter = Counter()
        self.debris: Counter = Counter()

    def add(self, rec: Dict[str, Any]) -> None:
        c = self.c
        c["rows"] += 1
        c[f"status_{rec.get(RECORD.status)}"] += 1
        key = self._image_hash(rec)
        if key is not None:  # a row that gave no image (an invalid line...) is no image
            self.image_hashes.append(key)
        regions = rec.get(RECORD.regions) or []
        requests = rec.get(RECORD.requests) or []
        c["regions"] += len(regions)
        c["boxes_dropped"] += len(rec.get(RECORD.dropped_boxes) or [])
        c["boxes_clipped"] += len(rec.get(RECORD.clipped_boxes) or [])
        for issue in rec.get(RECORD.dropped_boxes) or []:
            self.dropped[issue.get("reason") or "unknown"] += 1
        tokens = rec.get(RECORD.tokens) or {}
        c["prompt_tokens"] += tokens.get("prompt") or 0
        c["output_tokens"] += tokens.get("output") or 0
        error = rec.get(RECORD.error)
        if error:
            self.errors[f"{error.get(ERROR.stage)}/{error.get(ERROR.kind)}"] += 1
            self.error_stages[error.get(ERROR.stage) or "unknown"] += 1
        c["chunks"] += len({r.get(REGION.chunk) for r in regions})
        # A row of an engine's first call: its latency carries the warm-up (in the stage's ``startup``).
        self._requests(requests, warmup=bool((rec.get(RECORD.timing) or {}).get("first_batch")))
        self._regions(rec, regions, requests)

    def _image_hash(self, rec: Dict[str, Any]) -> Optional[int]:
        # 8-byte hashes keep the distinct-image count small in memory.
        return image_key(rec)

    def _requests(self, requests: List[Dict[str, Any]], warmup: bool = False) -> None:
        c = self.c
        c["requests"] += len(requests)
        for spec in requests:
            size = spec.get(REQUEST.image_size)
            vis = ((self.visual(int(size[0]), int(size[1])) if self.visual else
                    visual_tokens(size, self.patch_size, self.merge_size)) if size else 0)
            c["visual_tokens"] += vis
            if spec.get(REQUEST.latency_s) is not None and not warmup:
                self.latency.append(float(spec[REQUEST.latency_s]))
            # The first answer's captions with answer-format debris; a record written before the
            # check has none and reads as clean, as it was counted then.
            debris = spec.get(REQUEST.debris) if isinstance(spec.get(REQUEST.debris), dict) else {}
            if spec.get(REQUEST.error):
                c["requests_failed"] += 1
            elif spec.get(REQUEST.answer) is not None:
                c["requests_answered"] += 1
                c["requests_format_ok"] += bool(spec.get(REQUEST.format_ok))
                c["requests_debris"] += bool(debris)
                c["requests_parsed_clean"] += bool(spec.get(REQUEST.format_ok)) and not debris
            reask = spec.get(REQUEST.reask)
            if reask:
                c["reasks"] += 1
                c["regions_reasked_debris"] += len({str(n) for n in reask.get(REQUEST.numbers) or []} & set(debris))
                c["visual_tokens"] += vis  # the re-ask sends the same image again
                if reask.get(REQUEST.latency_s) is not None:
                    self.reask_latency.append(float(reask[REQUEST.latency_s]))

    def _regions(self, rec: Dict[str, Any], regions: List[Dict[str, Any]], requests: List[Dict[str, Any]]) -> None:
        c = self.c
        prompts: Dict[Any, Tuple[Optional[str], Optional[str]]] = {}
        for spec in requests:
            reask_prompt = (spec.get(REQUEST.reask) or {}).get("prompt")
            for rid in spec.get(REQUEST.region_ids) or []:
                prompts[rid] = (spec.get(REQUEST.prompt), reask_prompt)
        seen: Counter = Counter()
        indexes: Dict[str, Tuple[str, set]] = {}
        for reg in regions:
            caption = reg.get(REGION.caption)
            if reg.get(REGION.missing):
                c["regions_missing"] += 1
                self.missing[reg.get(REGION.reason) or "not_in_answer"] += 1
            if caption:  # as the run counts a region captioned (and a row ok)
                c["regions_captioned"] += 1
            if caption is None:
                continue
            words = len(caption.split())
            if not words:
                c["captions_empty"] += 1
                continue
            self.words.append(min(words, 2**32 - 1))
            if reg.get(REGION.attempt) == 2:
                c["regions_from_reask"] += 1
            if reg.get(REGION.debris):  # kept with answer-format debris (prompts.caption_debris)
                c["captions_debris"] += 1
                self.debris[str(reg[REGION.debris])] += 1
            words_list = tokenize(caption)
            seen[" ".join(words_list)] += 1
            first, again = prompts.get(reg.get(REGION.id), (None, None))
            prompt = again if reg.get(REGION.attempt) == 2 and again else first
            if prompt:
                if prompt not in indexes:  # a chunk's prompt is shared by its regions: tokenize it once
                    indexes[prompt] = _prompt_index(prompt)
                if _repeats(words_list, indexes[prompt]):
                    c["captions_repeat_prompt"] += 1
        c["captions_duplicated"] += sum(n for text, n in seen.items() if n > 1 and text)
        # Recomputed from the captions (records written before the checks existed carry no flags).
        for reg, flags in zip(regions, region_flags(regions)):
            if not normalize(reg.get(REGION.caption)):
                continue
            c["faithfulness_checked"] += 1
            if flags:
                c["faithfulness_flagged"] += 1
                self.flags.update(flags)
        has_refs, found, missing = region_references(rec, self.references_key)
        if has_refs:
            self.has_references = True
            c["rows_with_references"] += 1
            problem = references_problem(rec, self.references_key)
            if problem is not None:
                c["references_malformed"] += 1
                if self.references_malformed_first is None:
                    self.references_malformed_first = f"row {rec.get(RECORD.id)!r}: {problem}"
            c["references_missing"] += missing
            c["regions_with_references"] += len(found)
            for reg, refs in found:
                if reg.get(REGION.caption) and normalize(reg[REGION.caption]):
                    self.scorer.add(reg[REGION.caption], refs, c["rows"] - 1)
                else:
                    c["references_uncaptioned"] += 1

    @property
    def scorer(self) -> ReferenceScorer:
        if self._scorer is None:
            self._scorer = ReferenceScorer(meteor=self.meteor, meteor_timeout_s=self.meteor_timeout_s)
        return self._scorer

    def distinct_images(self) -> int:
        try:
            import numpy as np

            return int(np.unique(np.frombuffer(self.image_hashes, dtype=np.uint64)).size) if self.image_hashes else 0
        except ImportError:
            return len(set(self.image_hashes))


class ProposalStats:
    """Region proposals over a run: how many, and, where the given boxes are the truth
    (``propose.when=always``), recall and precision at IoU 0.5 and the mean best IoU.

    Recall and precision are over all images together (matched boxes over truth
    boxes, over proposals); the mean best IoU is over the truth boxes.
    """

    THRESHOLD = 0.5

    def __init__(self, references_key: Optional[str] = "references") -> None:
        self.references_key = references_key
        #: Truth boxes with references; of them matched, captioned right, and labelled (and right).
        self.ref_truth = self.ref_matched = self.ref_exact = self.label_n = self.label_exact = 0
        self.images = 0
        self.proposed = 0
        self.capped = 0
        self.by_method: Counter = Counter()
        self.scored_images = 0
        self.matched = self.n_truth = self.n_proposed = 0
        self.best_iou_sum = 0.0

    def add(self, rec: Dict[str, Any]) -> None:
        info = rec.get(RECORD.proposals)
        if not isinstance(info, dict) or (rec.get(RECORD.status) in ("grounding", "pending")
                                          and not rec.get(RECORD.regions)):
            return
        from regioncap.boxes import match_boxes

        regions = [r for r in rec.get(RECORD.regions) or ()
                   if isinstance(r, dict) and r.get(REGION.source, "input") != "input"]
        self.images += 1
        self.proposed += len(regions)
        self.capped += int(info.get("capped") or 0)
        self.by_method[str(info.get("method"))] += len(regions)
        truth = info.get("truth_bbox")
        if isinstance(truth, list) and rec.get(RECORD.status) != "error":
            # One matching serves the box figures (boxes.proposal_quality's) and the captions.
            matches, best = match_boxes([r[REGION.bbox] for r in regions], truth, self.THRESHOLD)
            self.scored_images += 1
            self.matched += len(matches)
            self.n_truth += len(truth)
            self.n_proposed += len(regions)
            self.best_iou_sum += sum(best)
            self._score_captions(rec, regions, matches, info.get("truth_index"), len(truth))

    def _score_captions(self, rec: Dict[str, Any], regions: List[Dict[str, Any]], matches: Dict[int, int],
                        truth_index: Any, n_truth: int) -> None:
        """Captions (and labels) of the proposals matched to a truth box, against that box's references."""
        refs = _record_references(rec, self.references_key)
        if refs is None or not isinstance(truth_index, list) or len(truth_index) != n_truth:
            return
        for t, idx in enumerate(truth_index):
            texts = _reference_list(refs[idx]) if isinstance(idx, int) and 0 <= idx < len(refs) else []
            if not texts:
                continue
            self.ref_truth += 1
            if t not in matches:
                continue
            region = regions[matches[t]]
            self.ref_matched += 1
            self.ref_exact += int(exact_match(region.get(REGION.caption), texts))
            if isinstance(region.get(REGION.label), str):
                self.label_n += 1
                self.label_exact += int(exact_match(region[REGION.label], texts))

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "images": self.images, "regions": self.proposed,
            "per_image": _rate(self.proposed, self.images, 3), "capped": self.capped,
            "by_method": dict(self.by_method),
        }
        if self.scored_images:
            out["quality"] = {
                "images": self.scored_images, "iou_threshold": self.THRESHOLD,
                "recall": _rate(self.matched, self.n_truth), "precision": _rate(self.matched, self.n_proposed),
                "mean_best_iou": _rate(self.best_iou_sum, self.n_truth), "truth_boxes": self.n_truth,
                "matched": self.matched,
            }
            if self.ref_truth:
                # Each truth box's references scored on the proposal matched to it (IoU >= 0.5): a
                # truth box nothing matched counts as wrong in caption_exact_match.
                out["quality"]["references"] = {
                    "truth_boxes": self.ref_truth, "matched": self.ref_matched,
                    "caption_exact_match": _rate(self.ref_exact, self.ref_truth),
                    "caption_exact_match_of_matched": _rate(self.ref_exact, self.ref_matched),
                    "labels": self.label_n, "label_exact_match": _rate(self.label_exact, self.label_n),
                }
        return out


def _whole(value: Any, default: int) -> int:
    """``value`` when it is a count (an int >= 0, not a bool), else ``default``."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


#: The least share of the work after engine load that the steady part must hold for its rates to stand
#: alone (``steady.basis``, docs/formats.md "Throughput: start-up apart").
MIN_STEADY_SHARE = 0.1


def _thin_steady(steady: Dict[str, Any], first: Dict[str, Any]) -> bool:
    """Whether the steady part holds under :data:`MIN_STEADY_SHARE` of what it and the first batch
    captioned (regions; rows where neither captioned any)."""
    for key in ("regions", "rows"):
        after, before = _whole(steady.get(key), 0), _whole(first.get(key), 0)
        if after + before:
            return after < MIN_STEADY_SHARE * (after + before)
    return False


def _stage_rates(name: str, st: Dict[str, Any], seconds: float, images: int, regions: int,
                 captioned: int) -> Dict[str, Any]:
    """A stage's ``*_per_s`` (and ``steady``, ``startup``): over its steady part where it has one, so they do
    not depend on how many rows share the engine's start-up; else (the visualize stage) over its seconds.

    ``images``, ``regions``, ``captioned``: the whole records file's, used only where ``st`` does not say
    what the stage itself committed (its ``images``, ``regions``, ``regions_captioned``: after a resume,
    the resumed part, which is what its seconds timed)."""
    steady = st.get("steady")
    out: Dict[str, Any]
    images, regions, captioned = (_whole(st.get(k), v) for k, v in (("images", images), ("regions", regions),
                                                                     ("regions_captioned", captioned)))
    if steady is None:
        done = captioned if name == CaptionStage.name else regions
        out = {"rows_per_s": _rate(st.get("rows", 0), seconds, 3), "images_per_s": _rate(images, seconds, 3),
               "regions_per_s": _rate(done, seconds, 3)}
    else:
        s, basis = float(steady.get("seconds") or 0.0), "after_first_batch"
        first_s = (st.get("startup") or {}).get("first_batch_s")
        first = st.get("first_batch")
        if not s and first and first_s:
            # Nothing came after the engine's first batch (one vLLM call of the whole run...): its rows
            # over its own seconds, warm-up included but engine load not; ``basis`` says so.
            steady, s, basis = first, float(first_s), "first_batch"
        elif first and first_s and _thin_steady(steady, first):
            # One huge row filled the first batch and the rest is a sliver (70 regions/s on 1 region
            # beside 2,500/s overall): a rate over it says nothing. Both parts together instead.
            steady = {k: (steady.get(k) or 0) + (first.get(k) or 0) for k in STEADY_COUNTS}
            s, basis = s + float(first_s), "with_first_batch"
        out = {f"{k}_per_s": _rate(steady.get(k, 0), s, 3) for k in ("rows", "images", "regions")}
        out.update({f"{k}_per_s": _rate(steady.get(k, 0), s, 1) for k in ("prompt_tokens", "output_tokens")})
        out["steady"] = {"basis": basis, **{k: v for k, v in steady.items() if k != "seconds"},
                         "seconds": round(s, 3)}
    if st.get("startup"):
        out["startup"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in st["startup"].items()}
    return out


def compute_metrics(records: Iterable[Dict[str, Any]], stages: Dict[str, Dict[str, Any]], *,
                    patch_size: int = 14, merge_size: int = 2, references_key: Optional[str] = "references",
                    meteor: bool = False, meteor_timeout_s: float = METEOR_TIMEOUT_S,
                    wall_s: Optional[float] = None, bootstrap_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = DEFAULT_SEED, densecap: bool = False,
                    visual: Optional[Callable[[int, int], int]] = None) -> Dict[str, Any]:
    """Everything ``metrics.json`` holds, from one pass over a run's final records.

    ``records``: the caption records (or the visualize records when only that
    stage ran), consumed once, in a streaming way. ``stages``: per stage that
    ran, ``{rows, seconds, errors}`` as the run counted them, and where known what it committed
    (:data:`STAGE_COUNTS`: ``regions``, ``regions_captioned``, ``images``; a resumed stage's rates are
    over these, not over the whole records); other keys, such as ``pid``, are carried through. ``patch_size`` and
    ``merge_size`` give the visual-token estimate per request image; ``visual`` (the model family's
    ``visual_tokens(width, height)``), where given, counts them instead (Florence-2's pooled token).
    A stage's ``steady`` (``{seconds, rows, images, regions, prompt_tokens,
    output_tokens}``: what it committed after its first engine answer) makes its
    rates steady-state ones, start-up left out; its ``startup`` is carried
    through (seconds rounded). ``references_key``: the row field holding reference captions, one entry per
    input box (``None`` turns scoring off). ``meteor``: also run METEOR
    (Java; about 10 s to start) when references are present; off unless asked
    (``metrics.meteor=true``). ``wall_s``: the
    run's wall time when the stages overlapped (default: the stages' sum).
    ``bootstrap_resamples`` and ``seed``: the resamples and seed of the 95%
    intervals of the reference scores (:func:`reference_intervals`; 0 resamples
    turns them off); a run passes ``metrics.bootstrap_resamples`` and its ``seed``.
    ``densecap``: also DenseCap mAP (``regioncap.densecap``; METEOR per
    prediction, Java) where truth boxes and references are known; off unless
    asked (``metrics.densecap=true``).
    """
    acc = _Accumulator(patch_size, merge_size, references_key, meteor=meteor, meteor_timeout_s=meteor_timeout_s,
                       visual=visual)
    proposals = ProposalStats(references_key)
    dense = None
    if densecap and references_key:
        dense = DenseCapStats(references_key)
    for rec in records:
        acc.add(rec)
        proposals.add(rec)
        if dense is not None:
            dense.add(rec)
    c = acc.c
    rows, regions = c["rows"], c["regions"]
    images = acc.distinct_images()

    out: Dict[str, Any] = {"stages": {}}
    wall = 0.0
    for name, st in stages.items():
        seconds = float(st.get("seconds") or 0.0)
        wall += seconds
        out["stages"][name] = {"rows": st.get("rows", 0), "seconds": round(seconds, 3),
                               **{k: st[k] for k in STAGE_COUNTS if k in st},
                               **_stage_rates(name, st, seconds, images, regions, c["regions_captioned"]),
                               "errors": dict(st.get("errors") or {}),
                               # Anything else the run recorded per stage (the pid of the process that ran it...).
                               **{k: v for k, v in st.items() if k not in ("rows", "seconds", "errors", "steady",
                                                                           "startup", "first_batch",
                                                                           *STAGE_COUNTS)}}
    out.update({k: c[k] for k in (
        "rows", "regions", "regions_captioned", "regions_missing", "boxes_dropped", "boxes_clipped",
        "requests", "reasks", "prompt_tokens", "output_tokens")})
    out["captioned_share"] = _rate(c["regions_captioned"], regions)
    out["rows_ok"] = c["status_ok"]
    out["rows_partial"] = c["status_partial"]
    out["rows_no_regions"] = c["status_no_regions"]
    out["rows_pending"] = c["status_pending"]
    out["error_rows"] = c["status_error"]
    # A share of no rows has no value (an empty shard's share of the input): null, as every rate of
    # metrics.json over an empty denominator, not 100% errors.
    out["error_rate"] = _rate(c["status_error"], rows)
    out["errors"] = dict(acc.errors)
    out["error_rows_by_stage"] = dict(acc.error_stages)

    # Counts.
    out["images"] = images
    out["chunks"] = c["chunks"]
    out["boxes_dropped_by_reason"] = dict(acc.dropped)
    out["regions_missing_by_reason"] = dict(acc.missing)
    out["regions_from_reask"] = c["regions_from_reask"]

    # Cost and speed: the caption stage's rates (steady when it has a steady part).
    caption = out["stages"].get(CaptionStage.name) or {}
    out["wall_s"] = round(wall if wall_s is None else wall_s, 3)
    out["regions_per_s"] = caption.get("regions_per_s")
    out["images_per_s"] = caption.get("images_per_s")
    out["visual_tokens"] = c["visual_tokens"]
    out["visual_tokens_per_request"] = _rate(c["visual_tokens"], c["requests"] + c["reasks"], 1)
    out["prompt_tokens_per_region"] = _rate(c["prompt_tokens"], regions, 2)
    out["visual_tokens_per_region"] = _rate(c["visual_tokens"], regions, 2)
    out["output_tokens_per_region"] = _rate(c["output_tokens"], regions, 2)
    out["latency_s"] = describe(acc.latency)
    out["reask_latency_s"] = describe(acc.reask_latency)

    # Answer shape.
    out["requests_answered"] = c["requests_answered"]
    out["requests_failed"] = c["requests_failed"]
    out["requests_format_ok"] = c["requests_format_ok"]
    out["requests_debris"] = c["requests_debris"]
    out["requests_parsed_clean"] = c["requests_parsed_clean"]
    # Clean parses only: the layout followed and no caption carrying answer-format debris.
    out["parse_success_rate"] = _rate(c["requests_parsed_clean"], c["requests_answered"])
    out["regions_reasked_debris"] = c["regions_reasked_debris"]
    out["captions_debris"] = c["captions_debris"]
    out["captions_debris_by_reason"] = dict(acc.debris)
    out["caption_words"] = describe(acc.words, 2)
    out["captions_empty"] = c["captions_empty"]
    out["captions_duplicated"] = c["captions_duplicated"]
    out["captions_repeat_prompt"] = c["captions_repeat_prompt"]

    if proposals.images:
        out["proposals"] = proposals.summary()

    checked = c["faithfulness_checked"]
    out["faithfulness"] = {
        "regions_checked": checked, "scene_captions": c["faithfulness_flagged"],
        "scene_caption_rate": _rate(c["faithfulness_flagged"], checked),
        "by_reason": {reason: acc.flags[reason] for reason in FLAG_REASONS},
    }

    if acc.has_references:
        refs = {"rows_with_references": c["rows_with_references"],
                "regions_with_references": c["regions_with_references"],
                "references_missing": c["references_missing"],
                "references_uncaptioned": c["references_uncaptioned"],
                "rows_malformed": c["references_malformed"]}
        if c["references_malformed"]:
            log.warning(f"{c['references_malformed']} row(s) carry a malformed {references_key!r} field "
                        f"(data.references_key): their boxes count as without a reference; first, "
                        f"{acc.references_malformed_first}")
        refs.update(acc.scorer.finish())
        if bootstrap_resamples > 0 and acc.scorer.n:
            refs["intervals"] = acc.scorer.intervals(n_boot=bootstrap_resamples, seed=seed)
        refs["tokenizer"] = TOKENIZER
        out["references"] = refs
    if dense is not None and dense.evaluator.images:
        out["densecap"] = dense.summary(meteor_timeout_s=meteor_timeout_s)
    return out


# ------------------------------------------------------------------ DenseCap mAP from run records
def record_image(record: Dict[str, Any], references_key: Optional[str]) -> Optional[Tuple[str, DenseCapImage]]:
    """``(mode, image)`` of one run record, or ``None`` when it has no truth to score against.

    ``mode`` ``proposals``: the record's regions were proposed and the given
    boxes are the truth (``proposals.truth_bbox`` with ``truth_index``, under
    ``propose.when=always``). ``given``: the truth is the record's regions on
    given boxes (``source: input``) whose box has references, and the
    predictions are those regions with their captions (plus proposals added
    under ``propose.when=add``): every given box has a prediction exactly on it,
    so the mAP measures the captions only (an upper bound for a detector).
    Truth boxes without references and regions without a caption are left
    out; error and pending rows give ``None``.
    """
    if not references_key or record.get(RECORD.status) in ("error", "pending"):
        return None
    has_refs, found, _ = region_references(record, references_key)
    if not has_refs:
        return None
    regions = [r for r in record.get(RECORD.regions) or () if isinstance(r, dict) and _is_box(r.get(REGION.bbox))]
    info = record.get(RECORD.proposals) if isinstance(record.get(RECORD.proposals), dict) else {}
    truth_bbox, truth_index = info.get("truth_bbox"), info.get("truth_index")
    truth: List[List[float]] = []
    truth_refs: List[List[str]] = []
    if isinstance(truth_bbox, list) and isinstance(truth_index, list) and len(truth_bbox) == len(truth_index):
        mode = "proposals"
        for box, idx in zip(truth_bbox, truth_index):
            texts = [t for t in (normalize(x) for x in reference_texts(record, {"source_index": idx}, references_key))
                     if t]
            if texts and _is_box(box):
                truth.append([float(v) for v in box])
                truth_refs.append(texts)
        preds = regions
    else:
        mode = "given"
        with_refs = {id(reg): refs for reg, refs in found}
        preds = []
        for reg in regions:
            if reg.get(REGION.source, "input") != "input":
                preds.append(reg)  # a proposal added beside the given boxes (propose.when=add)
            elif id(reg) in with_refs:
                truth.append([float(v) for v in reg[REGION.bbox]])
                truth_refs.append(with_refs[id(reg)])
                preds.append(reg)
        if not truth:
            return None
    preds = [r for r in preds if normalize(r.get(REGION.caption))]
    scores = [float(r[REGION.score]) if isinstance(r.get(REGION.score), (int, float))
              and math.isfinite(r[REGION.score]) else None
              for r in preds]
    return mode, DenseCapImage(boxes=[[float(v) for v in r[REGION.bbox]] for r in preds],
                               captions=[r[REGION.caption] for r in preds], truth_boxes=truth,
                               references=truth_refs, scores=scores)


def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


class DenseCapStats:
    """The ``densecap`` block of metrics.json, gathered one record at a time
    (:func:`record_image`) and evaluated once (:meth:`summary`)."""

    def __init__(self, references_key: Optional[str]) -> None:
        self.references_key = references_key
        self.evaluator = DenseCapEvaluator()
        self.modes: Dict[str, int] = {}

    def add(self, record: Dict[str, Any]) -> None:
        """Gather one record's predictions and truth (nothing when it has no truth)."""
        found = record_image(record, self.references_key)
        if found is None:
            return
        mode, image = found
        self.modes[mode] = self.modes.get(mode, 0) + 1
        self.evaluator.add(image)

    def summary(self, meteor_fn: Optional[MeteorFn] = None, *, meteor_timeout_s: float = METEOR_TIMEOUT_S
                ) -> Dict[str, Any]:
        """``{map, det_map, ap, ap_by_iou, ap_by_meteor, det_ap_by_iou, iou_thresholds,
        meteor_thresholds, mode, n_images, n_predictions, n_unscored, n_truth,
        n_truth_given, n_meteor_pairs, meteor_s, absent}`` (docs/formats.md); the AP
        lists run parallel to the threshold lists (``ap``: one row per IoU threshold).
        ``meteor_fn`` scores the pairs (default :func:`densecap_meteor`, one Java process)."""
        r = self.evaluator.evaluate(meteor_fn or partial(densecap_meteor, timeout_s=meteor_timeout_s))
        modes = sorted(self.modes)
        out: Dict[str, Any] = {
            "map": _round4(r["map"]), "det_map": _round4(r["det_map"]),
            "mode": modes[0] if len(modes) == 1 else "mixed" if modes else None,
            "n_images": r["images"], "n_predictions": r["predictions"], "n_unscored": r["predictions_unscored"],
            "n_truth": r["truth_boxes"], "n_truth_given": r["truth_boxes_given"],
            "n_meteor_pairs": r["meteor_pairs"], "meteor_s": r["meteor_s"], "absent": r["absent"],
            "iou_thresholds": list(IOU_THRESHOLDS), "meteor_thresholds": list(METEOR_THRESHOLDS),
            "ap": None, "ap_by_iou": None, "ap_by_meteor": None,
            "det_ap_by_iou": [_round4(r["det_ap"][t]) for t in IOU_THRESHOLDS] if r["det_ap"] else None,
        }
        if r["ap"]:
            grid = [[r["ap"][t][m] for m in METEOR_THRESHOLDS] for t in IOU_THRESHOLDS]
            out["ap"] = [[_round4(v) for v in row] for row in grid]
            out["ap_by_iou"] = [_round4(sum(row) / len(row)) for row in grid]
            out["ap_by_meteor"] = [_round4(sum(col) / len(col)) for col in zip(*grid)]
        return out


def _round4(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


# ------------------------------------------------------------------ summary
def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value: Optional[float], fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _stage_line(name: str, st: Dict[str, Any]) -> str:
    """One stage's summary line: rows and seconds; for a stage with an engine its start-up and steady rates."""
    head = f"{name}: {st['rows']} rows in {st['seconds']:.2f} s"
    rates = "".join(f", {st[k]:.2f} {k[:-6]}/s" for k in ("images_per_s", "regions_per_s") if st.get(k) is not None)
    if "steady" not in st:
        return f"{head} ({st['rows_per_s'] or 0:.2f} rows/s{rates})"
    up = st.get("startup") or {}
    parts = [f"{label} {up[k]:.2f} s" for k, label in (("cluster_start_s", "Ray cluster start"),
                                                       ("replicas_start_s", "Ray replicas start"),
                                                       ("process_start_s", "process start"),
                                                       ("engine_load_s", "engine load"),
                                                       ("first_batch_s", "first batch")) if up.get(k) is not None]
    if up.get("engines", 1) > 1:
        parts.append(f"slowest of {up['engines']} engines")
    first = up.get("time_to_first_caption_s")
    startup = (f"start-up: first caption at {first:.2f} s" if first is not None else "start-up") + \
        (f" ({', '.join(parts)})" if parts else "")
    if st.get("rows_per_s") is None:
        return f"{head}; {startup}; steady rates n/a (no engine answer timed)"
    tokens = "".join(f", {st[k]:.0f} {k[:-13]} tokens/s" for k in ("prompt_tokens_per_s", "output_tokens_per_s")
                     if st.get(k) is not None)
    window = {"first_batch": "nothing after the engine's first batch: rates over it (warm-up included),",
              "with_first_batch": f"under {MIN_STEADY_SHARE:.0%} of the work after the engine's first batch: "
                                  "rates over both (warm-up included),"}.get(st["steady"].get("basis"), "steady over")
    return (f"{head}; {startup}; {window} {st['steady']['seconds']:.2f} s: {st['rows_per_s']:.2f} rows/s"
            f"{rates}{tokens}")


def format_summary(metrics: Dict[str, Any], *, max_error_rate: float, out_dir: str) -> str:
    """The one-screen summary printed at the end of a run."""
    m = metrics
    lines = [
        f"rows {m['rows']}: ok {m['rows_ok']}, partial {m['rows_partial']}, "
        f"no regions {m['rows_no_regions']}, errors {m['error_rows']} "
        f"(error rate {_pct(m['error_rate'])}, max {max_error_rate:.1%})",
        f"regions {m['regions']}: captioned {m['regions_captioned']}, "
        f"missing {m['regions_missing']}; boxes dropped {m['boxes_dropped']}, "
        f"clipped {m['boxes_clipped']}; requests {m['requests']} (+{m['reasks']} re-asks)",
    ]
    if m.get("model_weights") == "random":
        lines.insert(0, "RANDOM WEIGHTS: the model was built from its architecture's config with random weights "
                        "(model.weights=random); the captions are noise, only speed and memory mean something")
    if m.get("images") is not None:
        lines.append(f"images {m['images']}, chunks {m.get('chunks', 0)}")
    prop = m.get("proposals")
    if prop:
        methods = ", ".join(sorted(prop.get("by_method") or {}))
        text = f"proposals ({methods}): {prop['regions']} region(s) on {prop['images']} image(s)"
        q = prop.get("quality")
        if q:
            text += (f"; against the given boxes at IoU {q['iou_threshold']}: recall {_num(q['recall'], '.3f')}, "
                     f"precision {_num(q['precision'], '.3f')}, mean best IoU {_num(q['mean_best_iou'], '.3f')}")
            qr = q.get("references")
            if qr:
                text += (f"; captions of the matched proposals against the truth's references: exact match "
                         f"{_num(qr['caption_exact_match'], '.3f')} of the truth boxes")
                if qr.get("labels"):
                    text += f", labels {_num(qr['label_exact_match'], '.3f')}"
        lines.append(text)
    for name, st in m["stages"].items():
        lines.append(_stage_line(name, st))
    pipe = m.get("pipeline")
    if pipe:
        mode = "stages overlapped" if pipe.get("overlap") else "stages one after the other"
        lines.append(f"end to end: {m.get('wall_s', 0):.2f} s, {_num(pipe.get('images_per_s'))} images/s, "
                     f"{_num(pipe.get('regions_per_s'))} regions/s, start-up included ({mode}, "
                     f"{pipe.get('workers', 0)} preparation worker(s))")
    if m.get("regions_per_s") is not None:
        images = f", {m['images_per_s']:.2f} images/s" if m.get("images_per_s") is not None else ""
        basis = ((m["stages"].get(CaptionStage.name) or {}).get("steady") or {}).get("basis")
        steady = {None: "", "with_first_batch": " (steady, first batch included)"}.get(basis, " (steady)")
        lines.append(f"caption throughput{steady}: {m['regions_per_s']:.2f} regions/s{images}; tokens: "
                     f"{m['prompt_tokens']} prompt, {m['output_tokens']} output")
    if m.get("regions") and "visual_tokens_per_region" in m:
        lines.append(f"tokens per region: {_num(m.get('prompt_tokens_per_region'), '.1f')} prompt "
                     f"(~{_num(m.get('visual_tokens_per_region'), '.1f')} visual), "
                     f"{_num(m.get('output_tokens_per_region'), '.1f')} output")
    lat = m.get("latency_s")
    if lat:
        text = f"latency per request: p50 {lat['p50']:.3f} s, p95 {lat['p95']:.3f} s"
        rlat = m.get("reask_latency_s")
        if rlat:
            text += f"; re-asks p50 {rlat['p50']:.3f} s, p95 {rlat['p95']:.3f} s"
        lines.append(text)
    if m.get("requests_answered"):
        words = m.get("caption_words") or {}
        lines.append(
            f"answers: parse success {_pct(m.get('parse_success_rate'))} of {m['requests_answered']} answered "
            f"requests"
            + (f" ({m.get('requests_debris', 0)} with answer-format debris in a caption: "
               f"{m.get('regions_reasked_debris', 0)} region(s) re-asked for it, "
               f"{m.get('captions_debris', 0)} kept flagged)" if m.get("requests_debris") or m.get("captions_debris")
               else "")
            + f"; caption words mean {_num(words.get('mean'), '.1f')}, p50 {_num(words.get('p50'), '.0f')}, "
            f"p95 {_num(words.get('p95'), '.0f')}; empty {m.get('captions_empty', 0)}, "
            f"duplicated {m.get('captions_duplicated', 0)}, repeating the prompt {m.get('captions_repeat_prompt', 0)}")
    refs = m.get("references")
    if refs:
        text = (f"references: {refs['regions_scored']} regions scored "
                f"({refs.get('references_missing', 0)} without a reference)")
        ivs = refs.get("intervals") or {}
        # Every score the metric specification declares, with its label, unit and interval.
        scores = [f"{spec.label} {metricspec.format_interval(refs.get(spec.key), ivs.get(spec.key), spec)}"
                  for spec in metricspec.in_group("references")
                  if spec.kind == "value" and spec.unit in ("share", "score") and spec.better
                  and refs.get(spec.key) is not None]
        if scores:
            text += ": " + ", ".join(scores)
        if refs.get("meteor") is None and refs.get("meteor_absent") and not refs.get("scores_absent"):
            text += f"; METEOR n/a ({refs['meteor_absent']})"
        elif refs.get("scores_absent"):
            text += f"; toolkit scores n/a ({refs['scores_absent']})"
        if refs.get("caption_tokens_mean") is not None:
            short = refs.get("captions_without_4gram")
            text += (f"; captions {_num(refs.get('caption_tokens_mean'), '.1f')} PTB tokens, references "
                     f"{_num(refs.get('reference_tokens_mean'), '.1f')}"
                     + (f" ({short:.0%} of captions too short for BLEU-4)" if short else ""))
        shown = ivs.get("exact_match") or next(iter(ivs.values()), None)
        if shown:
            text += f" ([low, high]: 95% intervals over {shown['n_clusters']} rows)"
        lines.append(text)
    dc = m.get("densecap")
    if dc:
        text = (f"DenseCap mAP {_num(dc.get('map'), '.3f')} (localization only {_num(dc.get('det_map'), '.3f')}) "
                f"on {dc['n_images']} image(s), {dc['n_predictions']} prediction(s), {dc['n_truth']} truth box(es)")
        if dc.get("mode") == "given":
            text += "; predictions on the given boxes: an upper bound that measures the captions"
        if dc.get("absent"):
            text += f"; mAP n/a ({dc['absent']})"
        lines.append(text)
    faith = m.get("faithfulness")
    if faith and faith.get("regions_checked"):
        reasons = ", ".join(f"{k} {v}" for k, v in (faith.get("by_reason") or {}).items() if v)
        lines.append(f"faithfulness: {faith['scene_captions']} of {faith['regions_checked']} captions read like "
                     f"scene captions ({_pct(faith.get('scene_caption_rate'))})" + (f": {reasons}" if reasons else ""))
    for kind, n in sorted(m["errors"].items()):
        lines.append(f"  error {kind}: {n}")
    lines.append(f"outputs: {out_dir}")
    return "\n".join(lines)
