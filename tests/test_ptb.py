"""regioncap.ptb against the COCO caption toolkit's own PTBTokenizer (Java), and the
reference scores of regioncap.metrics against the toolkit's COCOEvalCap-style
evaluation (toolkit tokens + pycocoevalcap scorers) on hard captions.

Unit tier: the recorded toolkit output of tests/data/ptb_cases.json, invariants,
and BLEU's sufficient statistics. Slow tier: everything against Java itself.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regioncap import metrics as mx
from regioncap import ptb
from regioncap.ptb import PUNCTUATIONS, java_tokenize, ptb_tokenize, ptb_tokenize_batch, ptb_tokens

CASES: List[Tuple[str, str]] = [tuple(c) for c in json.loads(
    (Path(__file__).parent / "data" / "ptb_cases.json").read_text(encoding="utf-8"))["cases"]]


def variants(text: str, i: int) -> List[str]:
    """Harder versions of a hand-written caption: case, end punctuation, quotes,
    brackets, a possessive, a clitic, a number, unicode spaces."""
    return [text.upper(), text.capitalize() + ".", f"\u201c{text}\u201d", f"({text})", f"{text}'s", f"'{text}'",
            f"{text} -- {i},000.5 ...", text.replace(" ", "\u00a0"), f"{text} don't!", f"\"{text}\" (U.S.)"][i % 10::4]


def corpus() -> List[Tuple[str, List[str]]]:
    """At least 200 (caption, references) pairs from the hand-written cases and their
    variants; only captions and references with a word (what regioncap scores)."""
    texts = [t for t, _ in CASES if mx._WORD.search(t)]
    pairs = []
    for i, text in enumerate(texts):
        alike = variants(text, i)
        refs = [r for r in [alike[0], texts[(i + 1) % len(texts)], texts[(i * 7) % len(texts)]] if mx._WORD.search(r)]
        caption = alike[-1] if i % 3 == 0 else text
        pairs.append((caption, refs))
    return pairs


def toolkit_java_ok() -> None:
    # Java ships with the machines CI runs on; without it these must fail, not skip.
    assert shutil.which("java"), "the toolkit's PTBTokenizer needs java on PATH (apt-get install default-jre-headless)"


# ------------------------------------------------------------------ unit tier
def test_recorded_toolkit_output_of_every_hard_case():
    assert len(CASES) >= 200
    wrong = [(text, want, ptb_tokenize(text)) for text, want in CASES if ptb_tokenize(text) != want]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("text, tokens", [
    ("A woman's hat.", ["a", "woman", "'s", "hat"]),
    ("The dogs' toys", ["the", "dogs", "toys"]),  # s' loses its apostrophe (a quote, dropped)
    ("I can't, don't, won't", ["i", "ca", "n't", "do", "n't", "wo", "n't"]),
    ("cannot gonna", ["can", "not", "gon", "na"]),
    ("A bus (number 42) [old]", ["a", "bus", "-lrb-", "number", "42", "-rrb-", "-lsb-", "old", "-rsb-"]),
    ("1,000 3.5 1/2 10% $5 \u20ac3 \u00bd", ["1,000", "3.5", "1/2", "10", "%", "$", "5", "$", "3", "1/2"]),
    ("3 1/2 inches", ["3\u00a01/2", "inches"]),
    ("U.S. Mr. Smith etc.", ["u.s.", "mr.", "smith", "etc."]),
    ("a man -- in a hat ... \u2014 ok?!", ["a", "man", "in", "a", "hat", "ok", "?!"]),
    ("\u201cquoted\u201d \u2018x\u2019 \"y\" 'z' \u00abw\u00bb", ["quoted", "x", "y", "z", "w"]),
    ("black-and-white e-mail", ["black-and-white", "e-mail"]),
    ("caf\u00e9 \u5317\u4eac emoji\U0001F436dog", ["caf\u00e9", "\u5317\u4eac", "emoji", "dog"]),
    ("", []), ("...", []), (None, []),
])
def test_tokens_of_the_classes_captions_hold(text, tokens):
    assert ptb_tokens(text) == tokens


def test_in_a_batch_a_caption_ending_in_a_period_sees_the_next_one():
    # The toolkit's output (Java, one batch): "B." before "The" is an acronym ending a
    # sentence; "no." before a digit an abbreviation; the last caption has no newline after it.
    batch = ["plan B.", "The end", "no.", "5 apples", "=D"]
    assert ptb_tokenize_batch(batch) == ["plan b", "the end", "no.", "5 apples", "= d"]
    assert [ptb_tokenize(t) for t in batch] == ["plan b.", "the end", "no", "5 apples", "=d"]
    assert ptb_tokenize_batch([]) == [] and ptb_tokenize_batch([None, ""]) == ["", ""]


def test_a_newline_inside_a_caption_is_a_space():
    # The wrapper replaces "\n" before joining captions with newlines.
    assert ptb_tokenize("a red\ncar") == ptb_tokenize("a red car") == "a red car"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ", max_size=40))
def test_plain_captions_take_the_fast_path_with_the_lexers_result(text):
    assert ptb._tokenize_cached(text) == ptb._tokenize_lexed(text)


#: Caption-like text: characters and pieces the lexer treats specially, in any order.
CAPTION_LIKE = st.lists(st.sampled_from(list(
    "aAbBcCdDeEnNoOsStTlLmMyYiIuUxX0123456789 .,;:?!'\"`-_()[]{}<>/\\*&#@$%+=~^|\t\u00a0\u2019\u2018\u201c\u201d"
    "\u00ab\u00bb\u2026\u2013\u2014\u00bd\u20ac\u00a3\u00e9\u00fc\u00df\u5317\u00ad\u200b\u3000\u00b2")
    + ["n't", "'s", "'ll", "U.S.", "Mr.", "etc.", "no.", "www.", ".com", "http://", "\U0001F600", "gonna",
       "cannot", "1/2", "3.5", " a ", " The ", "B.", "A.", "no.", "5"]), max_size=30).map("".join)


@settings(max_examples=150, deadline=None)
@given(CAPTION_LIKE)
def test_output_is_lowercase_tokens_without_the_toolkits_punctuation(text):
    out = ptb_tokenize(text)
    assert out == out.lower() and "  " not in out and out == out.strip(" ")
    assert not set(out.split(" ")) & PUNCTUATIONS


# ------------------------------------------------------------------ BLEU statistics
def test_bleu_from_summed_stats_is_the_toolkits_corpus_bleu_on_any_resample():
    from pycocoevalcap.bleu.bleu import Bleu

    pairs = corpus()
    stats = mx.bleu_stats(pairs)
    assert len(stats) == len(pairs) and all(len(s) == 10 for s in stats)
    gts, res = mx._ptb_pairs(pairs)
    rnd = random.Random(0)
    for size in (1, 2, 5, 40, len(pairs)):
        for _ in range(3):
            idx = [rnd.randrange(len(pairs)) for _ in range(size)]  # with replacement, as a bootstrap draws
            total = [sum(stats[i][k] for i in idx) for k in range(10)]
            want, _ = Bleu(4).compute_score({j: gts[i] for j, i in enumerate(idx)},
                                            {j: res[i] for j, i in enumerate(idx)}, verbose=0)
            assert mx.bleu_from_stats(total) == pytest.approx(want, abs=1e-9, rel=0)


def test_bleu_stats_count_ngrams_and_the_closest_reference():
    # "a man 's hat": 4 words; references of 3 and 6 words: the closest is 3 (|4-3| < |4-6|).
    (stats,) = mx.bleu_stats([("A man's hat", ["a man hat", "a man in a red hat"])])
    assert stats == (4, 3, 2, 1, 3, 1, 0, 0, 4, 3)
    with pytest.raises(ValueError, match="10 entries"):
        mx.bleu_from_stats([1, 2, 3])


# ------------------------------------------------------------------ against Java (slow)
@pytest.mark.slow
def test_tokens_equal_the_toolkits_java_tokenizer_on_cases_and_variants():
    toolkit_java_ok()
    texts = [t for t, _ in CASES] + [v for i, (t, _) in enumerate(CASES) for v in variants(t, i)]
    java = java_tokenize(texts)
    assert java[:len(CASES)] == [want for _, want in CASES]  # the recorded output is still Java's
    wrong = [(t, j, ptb_tokenize(t)) for t, j in zip(texts, java) if ptb_tokenize(t) != j]
    assert not wrong, wrong[:5]


@pytest.mark.slow
def test_batches_equal_the_toolkits_java_batches():
    toolkit_java_ok()
    texts = ([t for t, _ in CASES] + [v for i, (t, _) in enumerate(CASES) for v in variants(t, i)]
             + ["plan B.", "The end", "no.", "5 apples", "", "vitamin C.", "A dog"])
    for seed in range(2):
        random.Random(seed).shuffle(texts)
        java = java_tokenize(texts, isolate=False)
        wrong = [(t, j, p) for t, j, p in zip(texts, java, ptb_tokenize_batch(texts)) if p != j]
        assert not wrong, wrong[:5]


def _toolkit_scores(pairs: Sequence[Tuple[str, List[str]]]) -> Tuple[Dict[str, float], List[Dict[str, float]]]:
    """COCOEvalCap's way: the toolkit's PTBTokenizer (Java) on references and captions, then the scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in refs] for i, (_, refs) in enumerate(pairs)})
    res = PTBTokenizer().tokenize({i: [{"caption": c}] for i, (c, _) in enumerate(pairs)})
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    corpus_scores = {**{f"bleu{k + 1}": bleu[k] for k in range(4)}, "rouge_l": rouge, "cider": cider}
    per = [{"bleu4": bleu_each[3][i], "rouge_l": rouge_each[i], "cider": cider_each[i]} for i in range(len(pairs))]
    return corpus_scores, per


@pytest.mark.slow
def test_reference_scores_equal_the_toolkits_evaluation():
    toolkit_java_ok()
    pairs = corpus()
    assert len(pairs) >= 200
    want, want_each = _toolkit_scores(pairs)
    got, got_each = mx.score_references(pairs)
    assert got["regions_scored"] == len(pairs)
    # Unrounded: BLEU-1..4 from the statistics, the others per pair (their corpus value is the mean).
    bleu = mx.bleu_from_stats([sum(col) for col in zip(*mx.bleu_stats(pairs))])
    assert bleu == pytest.approx([want[f"bleu{k}"] for k in range(1, 5)], abs=1e-6, rel=0)
    for name in ("bleu4", "rouge_l", "cider"):
        assert [g[name] for g in got_each] == pytest.approx([w[name] for w in want_each], abs=1e-6, rel=0), name
    # metrics.json's figures are the toolkit's, rounded to 4 digits.
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=5e-5 + 1e-9), name


@pytest.mark.slow
def test_meteor_on_ptb_tokens_equals_the_toolkits():
    toolkit_java_ok()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    pairs = corpus()[:60]
    gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in refs] for i, (_, refs) in enumerate(pairs)})
    res = PTBTokenizer().tokenize({i: [{"caption": c}] for i, (c, _) in enumerate(pairs)})
    want, want_each = mx._meteor(gts, res, 600.0)  # the toolkit's Meteor, reaped afterwards
    got, got_each = mx.score_references(pairs, meteor=True)
    assert got_each[0]["meteor"] is not None, got.get("meteor_absent")
    assert [g["meteor"] for g in got_each] == pytest.approx(list(want_each), abs=1e-6, rel=0)
    assert got["meteor"] == pytest.approx(want, abs=5e-5 + 1e-9)


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(CAPTION_LIKE, min_size=400, max_size=400))
def test_random_caption_like_strings_tokenize_as_java_does(texts):
    toolkit_java_ok()
    # One Java call for the whole batch of examples, each alone; then one as the toolkit batches them.
    java = java_tokenize(texts)
    wrong = [(t, j, ptb_tokenize(t)) for t, j in zip(texts, java) if ptb_tokenize(t) != j]
    assert not wrong, wrong[:5]
    java = java_tokenize(texts, isolate=False)
    wrong = [(t, j, p) for t, j, p in zip(texts, java, ptb_tokenize_batch(texts)) if p != j]
    assert not wrong, wrong[:5]


@pytest.mark.slow
def test_every_letter_and_digit_of_the_basic_plane_as_java_reads_it():
    toolkit_java_ok()
    # Letters unknown to CoreNLP 3.4.1's Unicode tables are deleted there (ptb._UNKNOWN);
    # a sample of the plane, every character in a word and in a number.
    rnd = random.Random(1)
    breaks = {0x0A, 0x0B, 0x0C, 0x0D, 0x85, 0x2028, 0x2029}
    cps = [cp for cp in rnd.sample(range(0x20, 0xD800), 6000) + list(range(0xF900, 0xFFFE, 7)) if cp not in breaks]
    texts = [f"a{chr(cp)}b" for cp in cps] + [f"1{chr(cp)}1" for cp in cps]
    java = java_tokenize(texts)
    wrong = [(t, j, ptb_tokenize(t)) for t, j in zip(texts, java) if ptb_tokenize(t) != j]
    assert not wrong, wrong[:5]


def test_java_tokenize_refuses_the_line_breaks_the_toolkit_misaligns():
    with pytest.raises(RuntimeError, match="line break"):
        java_tokenize(["ok", "a\rb"])
