"""Typed records: the shape of every record regioncap writes (docs/formats.md), for the code that reads them.

``visualize.jsonl`` and ``captions.jsonl`` hold one :class:`CaptionRecord` per
input row (the visualize stage's lack the answer fields); each has
:class:`RequestSpec` s (one image sent to the model) and :class:`Region` s (one
box). The stages build plain dicts of these shapes; the report, loggers,
export and merge read them through these types, so a key nothing writes is a
type error rather than a silent ``.get`` of nothing.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, TypedDict

class Region(TypedDict, total=False):
    """``regions[]`` of a visualize/caption record."""

    id: int
    source_index: Optional[int]
    bbox: List[float]
    input_bbox: List[int]
    chunk: int
    number: int
    caption: Optional[str]
    missing: bool
    reason: str
    attempt: int
    #: Why the caption kept is not a clean parse (``regioncap.prompts.caption_debris``); None when clean.
    debris: Optional[str]
    flags: List[str]
    scores: Dict[str, Optional[float]]
    #: Where the region came from: ``input`` (a box of the row; the default when absent) or a
    #: proposer (``contours``, ``vlm``, ...), with its ``score``.
    source: str
    score: float
    #: A proposer's name for what the region is (``vlm``: the model's grounding label).
    label: str


class RequestSpec(TypedDict, total=False):
    """``requests[]`` of a record: one image sent to the model."""

    key: str
    image: str
    image_size: List[int]
    prompt: str
    numbers: List[int]
    region_ids: List[int]
    answer: Optional[str]
    error: Optional[str]
    prompt_tokens: int
    output_tokens: int
    latency_s: float
    finish_reason: Optional[str]
    format_ok: bool
    #: Captions of this (first) answer that carry answer-format debris: ``{"<number>": reason}``.
    debris: Dict[str, str]
    reask: Any


class RecordError(TypedDict, total=False):
    stage: str
    kind: str
    message: str


class CaptionRecord(TypedDict, total=False):
    """A line of ``captions.jsonl`` (or ``visualize.jsonl``, which lacks the caption fields)."""

    id: str
    index: int
    line: Optional[int]
    image: str
    image_path: str
    type: str  # with_bbox / without_bbox
    image_size: List[int]
    input_size: List[int]
    regions: List[Region]
    requests: List[RequestSpec]
    dropped_boxes: List[Dict[str, Any]]
    clipped_boxes: List[Dict[str, Any]]
    image_with_bbox: str
    prompt: str
    answer: str
    tokens: Dict[str, int]
    #: ``ok``, ``partial``, ``no_regions``, ``error``; in ``visualize.jsonl`` also ``pending`` (to caption)
    #: and ``grounding`` (``propose=vlm``: the caption engine proposes its regions first).
    status: str
    error: Optional[RecordError]
    #: Short hash of the input row's content: a resume checks that the row at an index is the same.
    digest: str
    #: The row's own boxes as given, and their format.
    bbox: Any
    bbox_format: str
    normalized_bbox: List[List[float]]
    valid_bboxes_num: int
    result_file: str
    timing: Dict[str, float]
    #: Input fields whose names regioncap uses itself, kept aside.
    input: Dict[str, Any]
    #: Rows that got proposals: ``{method, when, proposed, capped, overlapping_given}``, with
    #: ``truth_bbox`` (the given boxes, under ``when=always``) with ``truth_index`` (their input
    #: indices: where their references are) and, for ``vlm``, the ``grounding`` answer.
    proposals: Dict[str, Any]
    #: ``visualize.jsonl`` of ``propose=vlm``: the grounding request still to send (status ``grounding``).
    grounding: Dict[str, Any]
    #: ``"random"`` on every row captioned by a model with random weights (its captions are noise).
    model_weights: str


#: Every top-level key regioncap writes in a record: an input field with one of these
#: names is kept under ``input`` instead of being overwritten. Derived from
#: :class:`CaptionRecord`, so a new record field is reserved by declaring it there.
RECORD_KEYS: frozenset = frozenset(CaptionRecord.__required_keys__ | CaptionRecord.__optional_keys__)
