"""Prompt text for each strategy, the matching answer constraint, and answer parsing.

Pure module: no Hydra, no engine imports. The prompt text is snapshotted in
``tests/test_prompts.py``, so any change to it is a deliberate diff.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

ANSWER_FORMATS = ("lines", "json", "free")

#: Upper bound on one caption in a constrained answer (characters).
MAX_CAPTION_CHARS = 160

FORMAT_INSTRUCTIONS = {
    "lines": (
        "Answer with exactly {n} {lines}, one per {noun}, each in the form "
        "`<number>: <description>`, numbered {nums}, and nothing else."
    ),
    "json": (
        'Answer with only a JSON object {{"regions": [{{"id": <number>, '
        '"caption": "<description>"}}, ...]}} with one entry for each of the '
        "numbers {nums}."
    ),
    "free": "",
}


def join_words(items: Sequence[str]) -> str:
    """``["1"]`` -> ``1``; ``["1", "2", "3"]`` -> ``1, 2 and 3``."""
    items = list(items)
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def format_instruction(answer_format: str, numbers: Sequence[int], noun: str = "box") -> str:
    """The sentence telling the model how to lay out its answer."""
    if answer_format not in FORMAT_INSTRUCTIONS:
        raise ValueError(f"unknown answer_format {answer_format!r}; choose one of {ANSWER_FORMATS}")
    nums = [str(n) for n in numbers]
    nums_text = f"{nums[0]} to {nums[-1]}" if len(nums) > 2 and _consecutive(numbers) else join_words(nums)
    lines = "line" if len(nums) == 1 else "lines"
    return FORMAT_INSTRUCTIONS[answer_format].format(n=len(nums), noun=noun, nums=nums_text, lines=lines)


def _consecutive(numbers: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in zip(numbers, numbers[1:]))


def template_values(
    *,
    numbers: Sequence[int],
    labels: Sequence[str],
    answer_format: str,
    regions_text: str = "",
    noun: str = "box",
) -> Dict[str, Any]:
    """The placeholders of a prompt template and their values for one request.

    ``{n}`` number of regions in this request, ``{boxes}`` ``box`` or ``boxes``,
    ``{regions_word}`` and ``{are}`` agreeing with it, ``{labels}`` the labels
    as drawn (``1, 2 and 3``), ``{first}`` / ``{last}`` the first and last
    label, ``{regions}`` one line per region (the ``coords`` strategy),
    ``{format_instruction}`` how to lay out the answer.
    """
    return {
        "n": len(numbers),
        "boxes": "box" if len(numbers) == 1 else "boxes",
        "regions_word": "region" if len(numbers) == 1 else "regions",
        "are": "is" if len(numbers) == 1 else "are",
        "labels": join_words(list(labels)),
        "first": labels[0] if labels else "",
        "last": labels[-1] if labels else "",
        "regions": regions_text,
        "format_instruction": format_instruction(answer_format, numbers, noun) if numbers else "",
    }


def reask_values(*, labels: Sequence[str], answer_format: str, numbers: Sequence[int]) -> Dict[str, Any]:
    """The placeholders of ``prompt.reask_template`` and their values for the regions ``numbers`` re-asked."""
    return {"labels": join_words(list(labels)), "format_instruction": format_instruction(answer_format, numbers)}


#: A value of each placeholder's type, for the config check of ``prompt.template`` and
#: ``prompt.reask_template`` (:func:`regioncap.components.formats`): a template that formats
#: these formats every request.
TEMPLATE_EXAMPLE = template_values(numbers=[1, 2], labels=["1", "2"], answer_format="lines")
REASK_EXAMPLE = reask_values(labels=["1", "2"], answer_format="lines", numbers=[1, 2])


def build_prompt(
    template: str,
    *,
    numbers: Sequence[int],
    labels: Sequence[str],
    answer_format: str,
    regions_text: str = "",
    noun: str = "box",
) -> str:
    """Fill a prompt template: its placeholders are :func:`template_values`'."""
    values = template_values(numbers=numbers, labels=labels, answer_format=answer_format,
                             regions_text=regions_text, noun=noun)
    try:
        text = template.format(**values)
    except (KeyError, IndexError) as exc:
        raise ValueError(
            f"prompt template has an unknown placeholder {exc}; known: {sorted(values)}"
        ) from None
    # Collapse the blank left by an empty placeholder at the end of a line.
    return re.sub(r"[ \t]+\n", "\n", text).strip()


def regions_text(numbers: Sequence[int], boxes: Sequence[str]) -> str:
    """One line per region, ``<number>: <box>``: each box already written in the model family's own
    grounding format (:meth:`regioncap.families.base.Family.box_text`)."""
    return "\n".join(f"{n}: {box}" for n, box in zip(numbers, boxes))


def answer_regex(numbers: Sequence[int], answer_format: str) -> Optional[str]:
    """A regular expression the whole answer must match (for structured decoding).

    Only ``lines`` has one: exactly one ``<number>: <text>`` line per region,
    in order, so a constrained engine cannot skip, repeat or invent a region.
    """
    if answer_format != "lines" or not numbers:
        return None
    line = "[^\\n]{1,%d}" % MAX_CAPTION_CHARS
    return "\\n".join(f"{n}: {line}" for n in numbers)


def answer_json_schema(numbers: Sequence[int], answer_format: str) -> Optional[Dict[str, Any]]:
    """A JSON schema for the ``json`` answer format (one entry per region id)."""
    if answer_format != "json" or not numbers:
        return None
    return {
        "type": "object",
        "properties": {
            "regions": {
                "type": "array",
                "minItems": len(numbers),
                "maxItems": len(numbers),
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "enum": list(numbers)},
                        "caption": {"type": "string", "maxLength": MAX_CAPTION_CHARS},
                    },
                    "required": ["id", "caption"],
                },
            }
        },
        "required": ["regions"],
    }


@dataclass
class ParsedAnswer:
    """Captions found in one answer, keyed by the number shown to the model."""

    captions: Dict[int, str] = field(default_factory=dict)
    #: The answer followed the requested layout (every line / the JSON parsed).
    format_ok: bool = True
    #: Numbers the model answered that were not asked for (ignored).
    unexpected: List[int] = field(default_factory=list)
    #: Captions that carry answer-format debris: number -> reason (:func:`caption_debris`).
    debris: Dict[int, str] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """The layout was followed and no caption carries debris: what ``parse_success_rate`` counts."""
        return self.format_ok and not self.debris


#: Digits a region number may have: a longer run is not a region number (and
#: ``int()`` refuses over 4300 digits, which once stopped a run).
MAX_NUMBER_DIGITS = 18

_BULLETS = "-*\u2022"
_SEPARATORS = ":.)-\u2013\u2014"
_KEYWORD = re.compile(r"region|box|mark", re.IGNORECASE)
_REGION = re.compile(r"region", re.IGNORECASE)
# \s*(?:#\s*)? rather than \s*#?\s*: two adjacent \s* on a run of N spaces try N^2 splits.
_MENTION = re.compile(r"<\s*region\s*(\d+)\s*>|\b(?:region|box)\s*(?:#\s*)?(\d+)\b", re.IGNORECASE)


def _region_number(digits: str) -> Optional[int]:
    """``int(digits)``, or None for a digit run too long to be a region number."""
    if not digits or len(digits) > MAX_NUMBER_DIGITS:
        return None
    return int(digits)


# ------------------------------------------------------------------ answer-format debris
#: Why a caption is not a clean parse, in the order :func:`caption_debris` tries the rules.
DEBRIS_REASONS = ("backtick", "special_token", "json_fragment", "brace", "region_label", "number_label",
                  "unbalanced_quote", "unbalanced_bracket", "markdown")

# A straight double quote touching JSON structure ('"}', '":', '"]', '{"', '["'), or a JSON escape left in.
_JSON_FRAGMENT = re.compile(r'"\s*[:}\]]|[{\[]\s*"|\\["n]')
_SPECIAL_TOKEN = re.compile(r"<\||\|>")
# A label as an answer line writes it: <region2> anywhere (DataFlow-MM's mark names), or region/box [#] N
# followed by a separator the line parser reads (not "."; "the dog in region 2." is a sentence), or
# opening the caption. A mention such as "the cat in region 2 is asleep" is not a label.
_LABEL = re.compile(r"<\s*region\s*\d+\s*>|\b(?:region|box)\s*(?:#\s*)?\d+\s*(?:\*\*\s*)?[:)\-\u2013\u2014]",
                    re.IGNORECASE)
_LEADING_LABEL = re.compile(r"\s*(?:region|box)\s*(?:#\s*)?\d+\b", re.IGNORECASE)
# "2: " as an answer line starts it: a number not inside another number or a time ("10:30", "2:1"),
# then a colon followed by white space or the end.
_NUMBER_LABEL = re.compile(r"(?<![\w.:/])(\d{1,%d})\s*:(?=\s|$)" % MAX_NUMBER_DIGITS)
_MARKDOWN = re.compile(r"\*\*|^\s*#{1,6}\s", re.MULTILINE)
_PAIRS = {")": "(", "]": "["}


def _brackets_balanced(text: str) -> bool:
    stack: List[str] = []
    for ch in text:
        if ch in "([":
            stack.append(ch)
        elif ch in _PAIRS:
            if not stack or stack.pop() != _PAIRS[ch]:
                return False
    return not stack


def caption_debris(caption: Optional[str], numbers: Sequence[int] = ()) -> Optional[str]:
    """Why ``caption`` is not a clean parse (a reason of :data:`DEBRIS_REASONS`), or None when it is clean.

    A caption parsed out of an answer is clean when nothing of the answer's
    layout was left in it. The rules, tried in this order (the first that fires is the reason):

    - ``backtick``: any backtick (a code fence, or the instruction's `` `<number>: <description>` ``);
    - ``special_token``: ``<|`` or ``|>`` (a chat or box token such as ``<|box_end|>``);
    - ``json_fragment``: a straight double quote touching JSON structure (``"}``, ``":``, ``"]``,
      ``{"``, ``["``) or a JSON escape (``\\"``, ``\\n``);
    - ``brace``: ``{`` or ``}``;
    - ``region_label``: a region label: ``<region2>`` anywhere; ``region 2``, ``box #2`` followed by
      a separator (``: ) - \u2013 \u2014``, maybe after ``**``), or opening the caption. A mention
      inside a sentence (``the cat in region 2 is asleep``) is not one;
    - ``number_label``: ``N:`` followed by white space or the end, N one of ``numbers`` (the
      request's region numbers), not inside a number or a time: another region's answer line
      (``a red car 2: a blue square``), or this region's own label repeated;
    - ``unbalanced_quote``: an odd number of straight double quotes, or unequal counts of
      curly ones;
    - ``unbalanced_bracket``: ``()`` or ``[]`` not nested in pairs;
    - ``markdown``: ``**`` or a heading line (``# ...``).

    Legitimate captions stay clean: ``a sign reading "STOP"``, ``a 2:1 ratio``,
    ``a clock showing 10:30``, ``the number 2``, apostrophes, ``a cat (sleeping)``,
    ``the dog in region 2``.
    The rule is the same for every answer format, because a model asked for one
    layout often mixes in another (``parse_answer`` reads them all). Limits: it
    reads characters, not meaning: a caption quoting a sign that reads ``2: 1``
    (with 2 a region of the request) is flagged, a sentence of another region
    with no label or punctuation left (``a cat a dog``) is not.
    """
    if not caption:
        return None
    if "`" in caption:
        return "backtick"
    if _SPECIAL_TOKEN.search(caption):
        return "special_token"
    if _JSON_FRAGMENT.search(caption):
        return "json_fragment"
    if "{" in caption or "}" in caption:
        return "brace"
    if _LABEL.search(caption) or _LEADING_LABEL.match(caption):
        return "region_label"
    wanted = set(numbers)
    if wanted and any(_region_number(m.group(1)) in wanted for m in _NUMBER_LABEL.finditer(caption)):
        return "number_label"
    if caption.count('"') % 2 or caption.count("\u201c") != caption.count("\u201d"):
        return "unbalanced_quote"
    if not _brackets_balanced(caption):
        return "unbalanced_bracket"
    if _MARKDOWN.search(caption):
        return "markdown"
    return None


def _skip_space(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i].isspace():
        i += 1
    return i


def _skip_digits(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i].isdecimal():
        i += 1
    return i


def _line_after_prefix(s: str, i: int) -> Optional[Tuple[int, str]]:
    """Number and caption of ``s`` read from ``i`` (past any bullet and ``**``), or None.

    Reads ``<region N>`` or ``[region|box|mark] [#] N``, then ``[**] SEP [**] text``.
    Each step has one possible reading, so this is one left-to-right pass.
    """
    if s.startswith("<", i):
        i = _skip_space(s, i + 1)
        m = _REGION.match(s, i)
        if not m:
            return None
        start = _skip_space(s, m.end())
        end = _skip_digits(s, start)
        i = _skip_space(s, end)
        if not s.startswith(">", i):
            return None
        i = _skip_space(s, i + 1)
        if end == start:
            return None
    else:
        m = _KEYWORD.match(s, i)
        if m:
            i = _skip_space(s, m.end())
        if s.startswith("#", i):
            i = _skip_space(s, i + 1)
        start = i
        end = _skip_digits(s, start)
        if end == start:
            return None
        i = _skip_space(s, end)
    if s.startswith("**", i):
        i = _skip_space(s, i + 2)
    if i >= len(s) or s[i] not in _SEPARATORS:
        return None
    i = _skip_space(s, i + 1)
    text = ""
    if s.startswith("**", i):
        text = s[_skip_space(s, i + 2):].rstrip()
    if not text:  # "N: **" alone: the ** is the caption
        text = s[i:].rstrip()
    if not text:
        return None
    number = _region_number(s[start:end])
    if number is None:
        return None
    return number, text


def _match_line(line: str) -> Optional[Tuple[int, str]]:
    """``(number, caption)`` of an answer line such as ``- **Region 2:** a red car``, or None.

    Written by hand, in linear time: the regular expression it replaces backtracked
    over runs of spaces (a line of 300 spaces and one letter took 17 s). It reads
    exactly what that expression matched (tests/test_properties.py compares the two):
    optional white space, an optional bullet (``-``, ``*``, ``\u2022``), optional
    ``**``, the number, optional ``**``, a separator (``: . ) - \u2013 \u2014``),
    optional ``**``, and a caption that is not blank.
    """
    i = _skip_space(line, 0)
    starts = []  # where the number may start, in the order the expression tried them
    if i < len(line) and line[i] in _BULLETS:
        after_bullet = _skip_space(line, i + 1)
        if line.startswith("**", after_bullet):
            starts.append(_skip_space(line, after_bullet + 2))
        starts.append(after_bullet)
    if line.startswith("**", i):
        starts.append(_skip_space(line, i + 2))
    starts.append(i)
    for start in starts:
        found = _line_after_prefix(line, start)
        if found is not None:
            return found
    return None


def _clean(text: str) -> str:
    """A caption without its wrapping (``**``, quotes); "" when no letter or digit is left: an answer of
    zero-width spaces, NUL bytes or ``...`` describes nothing, and counted as a caption and a parse success."""
    text = text.strip().strip("*").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text if any(c.isalnum() for c in text) else ""


def parse_answer(text: Optional[str], numbers: Sequence[int], answer_format: str, *,
                 shown: Optional[Sequence[int]] = None) -> ParsedAnswer:
    """Read captions for ``numbers`` out of a model answer.

    Every format is tried in turn (a model asked for lines sometimes answers
    JSON and the other way round); ``format_ok`` says whether the requested one
    was followed: for ``lines`` and ``json``, every line or item read, each asked
    number captioned once, no other number, no blank caption.
    A number with no caption is simply absent: never invented.
    A single-region request in ``free`` format takes the whole answer.
    ``debris`` names the captions that carry answer-format debris
    (:func:`caption_debris`, with ``shown``: every region number the model
    saw in this exchange, default ``numbers``; a re-ask for region 3 passes
    its siblings too, so ``3: a cat 1: a dog`` is debris); they are still
    returned, the caller decides.
    """
    result = ParsedAnswer(format_ok=False)
    if text:
        # A byte order mark (U+FEFF) some servers leave at the start hid the first line's number: every
        # region of the answer went missing. It is no text anywhere.
        text = text.replace("\ufeff", "")
    if not text or not text.strip():
        return result
    wanted = set(numbers)
    found: Dict[int, str] = {}
    unexpected: List[int] = []
    # An item of the layout that is not one caption for one asked number: a blank caption
    # ("1: **"), a number answered twice. The layout was not followed, whatever else parsed.
    stray: List[int] = []

    def add(n: int, caption: str) -> None:
        caption = _clean(caption)
        if not caption:
            stray.append(n)
            return
        if n not in wanted:
            unexpected.append(n)
        elif n not in found:  # the first answer for a number wins
            found[n] = caption
        else:
            stray.append(n)

    json_ok = _parse_json(text, add)
    lines_ok = False
    if not json_ok:
        # Only "\n" ends a line: str.splitlines() would also split on \x1c, \u2028 and the like.
        lines = [ln.rstrip("\r") for ln in text.split("\n") if ln.strip()]
        matched = 0
        for ln in lines:
            found_line = _match_line(ln)
            if found_line is not None:
                matched += 1
                add(*found_line)
        lines_ok = bool(lines) and matched == len(lines)
    if not found and answer_format == "free":
        if len(numbers) == 1:  # the whole answer describes the one region
            caption = _clean(text)
            if caption:
                found[numbers[0]] = caption
        else:
            found.update(_parse_mentions(text, wanted))
    result.captions = {n: found[n] for n in numbers if n in found}
    result.debris = {n: reason for n, c in result.captions.items()
                     if (reason := caption_debris(c, numbers if shown is None else shown)) is not None}
    result.unexpected = sorted(set(unexpected))
    # The layout asks for each number once and nothing else: an answer that read as lines or
    # JSON but named other numbers ("3: a cat" for 1 and 2), left one out, repeated one or left
    # a caption blank is not a parse success, or parse_success_rate would count answers that
    # gave no caption at all.
    complete = not stray and not unexpected and set(found) == wanted
    result.format_ok = {"json": json_ok and complete, "lines": lines_ok and complete,
                        "free": bool(found)}[answer_format]
    return result


def _parse_json(text: str, add: Any) -> bool:
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return False
    end = max(text.rfind("}"), text.rfind("]"))
    try:
        data = json.loads(text[start : end + 1])
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; so is a 5000-digit int
        return False
    items: Any = data.get("regions", data) if isinstance(data, dict) else data
    if isinstance(items, dict):  # {"1": "a cat", "2": "a dog"}
        items = [{"id": k, "caption": v} for k, v in items.items()]
    if not isinstance(items, list):
        return False
    ok = False
    for item in items:
        if not isinstance(item, dict):
            continue
        ident = item.get("id", item.get("region"))
        caption = item.get("caption", item.get("description"))
        n = _json_region_number(ident)
        if n is None:
            continue
        if isinstance(caption, str):
            add(n, caption)
            ok = True
    return ok


# An integral number as text: "1", "+1", "-2", "1.0", "1.", "1.00" (models write floats for ids).
_INTEGRAL = re.compile(r"[+-]?(\d+)(?:\.0*)?")


def _json_region_number(ident: Any) -> Optional[int]:
    """The region number a JSON ``id`` names, or None: an int, an integral float (``1.0``), or a
    string of one (``"1"``, ``"1.0"``, ``"region1"``, ``"<region1>"``); never a bool, a fraction
    (``1.5``) or a run of more than :data:`MAX_NUMBER_DIGITS` digits."""
    if isinstance(ident, bool):
        return None
    if isinstance(ident, float):
        # Exactly the integral ones; 1e300 is integral but no region number (too many digits below).
        if not math.isfinite(ident) or not ident.is_integer():
            return None
        ident = int(ident)
    if isinstance(ident, int):
        ident = str(ident)  # bounded: json.loads refuses ints over 4300 digits
    if not isinstance(ident, str):  # a list or dict (str() of a deep one recurses), null
        return None
    text = ident.strip().strip("<>").lower().replace("region", "").strip()
    match = _INTEGRAL.fullmatch(text)
    if match is None or len(match.group(1)) > MAX_NUMBER_DIGITS:
        return None
    return int(text.split(".", 1)[0])


def _parse_mentions(text: str, wanted: set) -> Dict[int, str]:
    """Free text naming regions (``In <region1>, ... <region2> shows ...``)."""
    marks = list(_MENTION.finditer(text))
    out: Dict[int, str] = {}
    for i, m in enumerate(marks):
        n = _region_number(m.group(1) or m.group(2))
        if n is None:
            continue
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        segment = text[m.end() : end].strip(" \t\n,:;.-")
        caption = _clean(segment)
        if n in wanted and n not in out and caption:  # '<region2> **' or '<region2> …' describe nothing
            out[n] = caption
    return out
