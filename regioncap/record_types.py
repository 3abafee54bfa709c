"""The record model: the shape of every record regioncap writes (docs/formats.md), one dataclass per object.

``visualize.jsonl`` and ``captions.jsonl`` hold one :class:`Record` per input
row (the visualize stage's lack the answer fields); each has
:class:`RequestSpec` s (one image sent to the model, its re-ask one too),
:class:`Region` s (one box) and, on an error row, a :class:`RecordError`.

A record is a JSON object whose keys are written in the order the stage set
them, where a key left out (``caption`` before the caption stage) differs from
a key set to ``null`` (a region the answer left out). The model keeps both:
every field defaults to :data:`ABSENT` (read back as ``None``), a part
remembers which keys it holds and in which order, setting a field adds it,
:meth:`RecordPart.drop` removes it, and keys the model does not declare (the
input fields a record carries through) are kept in place as
:meth:`RecordPart.extras`. So ``Record.from_dict(d).to_dict() == d``, key order
included: a reader that rewrites records (merge) writes the same bytes.

:data:`RECORD_KEYS`, the names an input field may not take at the top level of
a record (it is kept under ``input`` instead), is derived from :class:`Record`:
a new record field is reserved by declaring it here. docs/formats.md's record
tables are checked against these classes (``tests/test_record_types.py``).

The stages build their records with these classes and write :meth:`RecordPart.to_dict`;
every reader (report, loggers, export, merge, reproduce, metrics) reads them back
through :meth:`RecordPart.from_dict`, or, where decoded JSON is read as it is on a
per-row path, by the key names :class:`KeyNames` derives from the classes. Standard
library only.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, FrozenSet, Iterator, List, Mapping, Optional, Tuple, Type, TypeVar


class _Absent:
    """The default of every field: the key is not in the record (read back as ``None``)."""

    _instance: Optional["_Absent"] = None

    def __new__(cls) -> "_Absent":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


#: A field's default: the key is left out of the record.
ABSENT: Any = _Absent()

P = TypeVar("P", bound="RecordPart")


def _part(cls: Type[P]) -> Type[P]:
    """``@dataclass`` for a :class:`RecordPart`, with an ``__init__`` that records which keys were given.

    The ``__init__`` takes the dataclass's arguments (every field, in order, defaulting to
    :data:`ABSENT`; its signature is the dataclass's) and sets the given fields straight in the instance's ``__dict__``, in declared
    order: a record is built per row and per region, and the dataclass's own ``__init__`` would go
    through :meth:`RecordPart.__setattr__` once per field. A field left out reads ``None`` (the
    class attribute :func:`_read_none` sets).
    """
    cls = dataclass(cls)
    names = tuple(f.name for f in fields(cls))
    cls._NAMES = frozenset(names)
    allowed = cls._NAMES
    qualname = cls.__qualname__

    def init(self: RecordPart, *args: Any, **kwargs: Any) -> None:
        # A plain function, not code generated with exec (tests/test_security.py refuses exec in the package).
        if len(args) > len(names):
            raise TypeError(f"{qualname}() takes {len(names)} positional arguments but {len(args)} were given")
        given = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in allowed:
                raise TypeError(f"{qualname}() got an unexpected keyword argument {key!r}")
            if key in given:
                raise TypeError(f"{qualname}() got multiple values for argument {key!r}")
            given[key] = value
        state = self.__dict__
        keys = []
        for name in names:  # declared order, whatever order the arguments came in
            value = given.get(name, ABSENT)
            if value is not ABSENT:
                state[name] = value
                keys.append(name)
        state["_keys"] = keys
        state["_extras"] = {}

    init.__signature__ = inspect.signature(cls.__init__)  # type: ignore[attr-defined]
    init.__qualname__ = f"{qualname}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init
    return cls


@dataclass
class RecordPart:
    """A JSON object of a record file: declared fields, in key order, with what it carries beside them."""

    #: Fields holding another part: ``{field: part class}``; and those holding a list of them.
    PARTS: ClassVar[Dict[str, Type["RecordPart"]]] = {}
    PART_LISTS: ClassVar[Dict[str, Type["RecordPart"]]] = {}

    #: The declared keys (set on each part by :func:`_part`).
    _NAMES: ClassVar[FrozenSet[str]] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        state = self.__dict__
        keys = state.get("_keys")
        if keys is not None and name not in keys and name in self._NAMES:
            keys.append(name)  # as a dict does: a key set later is written after the others
        state[name] = value

    @classmethod
    def names(cls) -> FrozenSet[str]:
        """The keys this part declares."""
        return cls._NAMES

    @classmethod
    def from_dict(cls: Type[P], data: Mapping[str, Any]) -> P:
        """The part of a decoded JSON object: declared keys as fields (nested parts converted), the
        others kept as :meth:`extras`, the key order as it was."""
        names = cls.names()
        # Filled in directly, not through __init__: readers take every record of a file this way.
        obj = object.__new__(cls)
        state = obj.__dict__  # a field left out reads the class's None (see _read_none)
        extras = {}
        for key, value in data.items():
            if key not in names:
                extras[key] = value
                continue
            # A value of another shape (a hand-edited file) is kept as it is, for the reader to refuse.
            if key in cls.PART_LISTS and isinstance(value, list):
                part = cls.PART_LISTS[key]
                # ``type(v) is dict`` first: the ABC check of Mapping is slow, and decoded JSON is dicts.
                value = [part.from_dict(v) if type(v) is dict or isinstance(v, Mapping) else v for v in value]
            elif key in cls.PARTS and (type(value) is dict or isinstance(value, Mapping)):
                value = cls.PARTS[key].from_dict(value)
            state[key] = value
        state["_keys"] = list(data)
        state["_extras"] = extras
        return obj

    def to_dict(self) -> Dict[str, Any]:
        """The part as the JSON object written: its keys in order, nested parts as objects."""
        # Read from the instance's __dict__ (every key held is set there; a missing one reads None, as
        # the class attribute does): this runs for every record and region a stage writes.
        state = self.__dict__
        extras, lists = state["_extras"], self.PART_LISTS
        out: Dict[str, Any] = {}
        for key in state["_keys"]:
            if key in extras:
                out[key] = extras[key]
                continue
            value = state.get(key)
            if isinstance(value, RecordPart):
                value = value.to_dict()
            elif key in lists and isinstance(value, list):
                value = [v.to_dict() if isinstance(v, RecordPart) else v for v in value]
            out[key] = value
        return out

    def __bool__(self) -> bool:
        # As a dict: an object with no keys (``"error": {}``) is false.
        return bool(self._keys)  # type: ignore[attr-defined]

    def has(self, key: str) -> bool:
        """Whether the record holds ``key`` (a field set, ``None`` included, or a carried key)."""
        return key in self._keys  # type: ignore[attr-defined]

    def keys(self) -> Tuple[str, ...]:
        """The keys the record holds, in the order they are written."""
        return tuple(self._keys)  # type: ignore[attr-defined]

    def drop(self, key: str) -> None:
        """Take ``key`` out of the record (its field reads ``None`` again)."""
        if key in self._keys:  # type: ignore[attr-defined]
            self._keys.remove(key)  # type: ignore[attr-defined]
        self._extras.pop(key, None)  # type: ignore[attr-defined]
        if key in self.names():
            object.__setattr__(self, key, None)

    def update(self: P, data: Mapping[str, Any]) -> P:
        """Set each key of ``data``, in its order, as a dict's ``update`` does (a key the part does not
        declare is carried as an extra); returns the part."""
        names = self.names()
        keys, extras = self._keys, self._extras  # type: ignore[attr-defined]
        for key, value in data.items():
            if key in names:
                setattr(self, key, value)
            else:
                if key not in keys:
                    keys.append(key)
                extras[key] = value
        return self

    def carrying(self: P, extras: Mapping[str, Any]) -> P:
        """This part with ``extras`` (keys it does not declare: a row's input fields) carried before
        its own keys, in their order; returns it. A declared name among them is refused: such an
        input field goes under ``Record.input`` (:data:`RECORD_KEYS`)."""
        names = self.names()
        clash = [k for k in extras if k in names]
        if clash:
            raise ValueError(f"{type(self).__name__} declares {clash}: not carried as extra keys")
        keys = self._keys  # type: ignore[attr-defined]
        self._extras.update(extras)  # type: ignore[attr-defined]
        keys[:0] = [k for k in extras if k not in keys]
        return self

    def extras(self) -> Dict[str, Any]:
        """The keys the model does not declare (a record's carried input fields), in order."""
        return dict(self._extras)  # type: ignore[attr-defined]


@_part
class RecordError(RecordPart):
    """``error`` of an error row: the stage that failed it, a kind to count it by, a message naming the input."""

    #: A stage's name (:data:`regioncap.stages.STAGE_NAMES`).
    stage: str = ABSENT
    kind: str = ABSENT
    message: str = ABSENT
    #: Whether the failure may pass another time (an engine error, a timeout, a failed read; not bad
    #: input): ``retry_errors=true`` redoes the row. Written on every error row.
    retryable: bool = ABSENT


@_part
class Region(RecordPart):
    """``regions[]`` of a record: one box, and (caption stage) its caption."""

    #: 1-based, in the row's order.
    id: int = ABSENT
    #: Position in the row's ``bbox``; ``None`` for a proposal.
    source_index: Optional[int] = ABSENT
    #: xyxy in the original image's pixels; in the model's input pixels.
    bbox: List[float] = ABSENT
    input_bbox: List[int] = ABSENT
    #: The request the region is in, and the mark drawn for it there.
    chunk: int = ABSENT
    number: int = ABSENT
    #: ``input`` (a box of the row) or a proposer (``contours``, ``vlm``, ...), with its ``score``
    #: and its name for what the region is (``label``).
    source: str = ABSENT
    score: float = ABSENT
    label: str = ABSENT
    #: The caption, or ``None`` when the answer left the region out (``missing``, with a ``reason``).
    caption: Optional[str] = ABSENT
    missing: bool = ABSENT
    reason: str = ABSENT
    #: 2 when the caption came from the re-ask.
    attempt: int = ABSENT
    #: Why the caption kept is not a clean parse (``regioncap.prompts.caption_debris``); None when clean.
    debris: Optional[str] = ABSENT
    #: Faithfulness flags (``regioncap.metrics.region_flags``) and reference scores.
    flags: List[str] = ABSENT
    scores: Dict[str, Optional[float]] = ABSENT


@_part
class RequestSpec(RecordPart):
    """``requests[]`` of a record: one image sent to the model, and (caption stage) what came back."""

    key: str = ABSENT
    #: Relative to the run dir.
    image: str = ABSENT
    image_size: List[int] = ABSENT
    prompt: str = ABSENT
    #: The marks asked about, and the ids of their regions.
    numbers: List[int] = ABSENT
    region_ids: List[int] = ABSENT
    answer: Optional[str] = ABSENT
    error: Optional[Dict[str, Any]] = ABSENT
    prompt_tokens: int = ABSENT
    output_tokens: int = ABSENT
    finish_reason: Optional[str] = ABSENT
    latency_s: float = ABSENT
    #: The answer followed the requested layout.
    format_ok: bool = ABSENT
    #: Captions of this answer that carry answer-format debris: ``{"<number>": reason}``.
    debris: Dict[str, str] = ABSENT
    #: The follow-up request for the regions the answer left out.
    reask: Optional["RequestSpec"] = ABSENT


RequestSpec.PARTS = {"reask": RequestSpec}


@_part
class Record(RecordPart):
    """A line of ``captions.jsonl`` (or ``visualize.jsonl``, which lacks the answer fields)."""

    #: Input fields whose names are fields of this class, kept aside.
    input: Dict[str, Any] = ABSENT
    id: str = ABSENT
    index: int = ABSENT
    #: The image field as given; the resolved path.
    image: str = ABSENT
    image_path: str = ABSENT
    #: ``with_bbox`` / ``without_bbox`` (DataFlow-MM).
    type: str = ABSENT
    #: The row's own boxes as given, and their format.
    bbox: Any = ABSENT
    bbox_format: str = ABSENT
    result_file: str = ABSENT
    image_with_bbox: str = ABSENT
    prompt: str = ABSENT
    valid_bboxes_num: int = ABSENT
    normalized_bbox: List[List[float]] = ABSENT
    regions: List[Region] = ABSENT
    requests: List[RequestSpec] = ABSENT
    dropped_boxes: List[Dict[str, Any]] = ABSENT
    clipped_boxes: List[Dict[str, Any]] = ABSENT
    #: ``ok``, ``partial``, ``no_regions``, ``error``; in ``visualize.jsonl`` also ``pending`` (to caption)
    #: and ``grounding`` (``propose=vlm``: the caption engine proposes its regions first).
    status: str = ABSENT
    error: Optional[RecordError] = ABSENT
    #: Short hash of the input row's content: a resume checks that the row at an index is the same.
    digest: str = ABSENT
    line: Optional[int] = ABSENT
    image_size: List[int] = ABSENT
    input_size: List[int] = ABSENT
    #: Rows that got proposals: ``{method, when, proposed, capped, overlapping_given}``, with
    #: ``truth_bbox``/``truth_index`` under ``when=always`` and, for ``vlm``, the ``grounding`` answer.
    proposals: Dict[str, Any] = ABSENT
    #: ``visualize.jsonl`` of ``propose=vlm``: the grounding request still to send (status ``grounding``).
    grounding: Dict[str, Any] = ABSENT
    timing: Dict[str, Any] = ABSENT
    answer: Optional[str] = ABSENT
    tokens: Dict[str, int] = ABSENT
    #: ``"random"`` on every row captioned by a model with random weights (its captions are noise).
    model_weights: str = ABSENT

    def iter_regions(self) -> Iterator[Region]:
        """The record's regions (none on an error row)."""
        return iter(self.regions or ())

    def inputs(self) -> Dict[str, Any]:
        """The input fields the record carries: those at its top level and those kept under ``input``."""
        return {**self.extras(), **(self.input or {})}


Record.PARTS = {"error": RecordError}
Record.PART_LISTS = {"regions": Region, "requests": RequestSpec}


def _read_none(*parts: Type[RecordPart]) -> None:
    """A field a record leaves out reads ``None``: the class attribute behind it. (The generated
    ``__init__`` keeps :data:`ABSENT` as its default, so a part built in code still knows what was set.)"""
    for part in parts:
        for f in fields(part):
            setattr(part, f.name, None)


_read_none(RecordError, Region, RequestSpec, Record)

class KeyNames:
    """A part's keys as attributes (``RECORD.status == "status"``) for code that reads records as
    decoded JSON rather than through :meth:`RecordPart.from_dict` (a per-row hot path, a file of any
    shape): the name is still declared once, in the part; a name it does not declare is an
    ``AttributeError``."""

    def __init__(self, part: Type[RecordPart]) -> None:
        object.__setattr__(self, "_part", part.__name__)
        for f in fields(part):
            object.__setattr__(self, f.name, f.name)

    def __getattr__(self, name: str) -> str:
        raise AttributeError(f"{name!r} is not a key of {self.__dict__.get('_part')}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("key names are read-only")


#: The keys of each part, for reading decoded records by key (:class:`KeyNames`).
RECORD = KeyNames(Record)
REGION = KeyNames(Region)
REQUEST = KeyNames(RequestSpec)
ERROR = KeyNames(RecordError)

#: Every top-level key regioncap writes in a record: an input field with one of these
#: names is kept under ``input`` instead of being overwritten. Derived from :class:`Record`,
#: so a new record field is reserved by declaring it there.
RECORD_KEYS: FrozenSet[str] = Record.names()


#: A record's ``image`` when its row gave an image object (bytes, a decoded image) rather than a path.
IN_MEMORY_IMAGE = "<in-memory image>"
#: A record's ``image`` when its row gave no image at all: a line that is not a JSON object, a row
#: without the image field, a null or a number in it.
NO_IMAGE = "<no image>"


def image_key(rec: Dict[str, Any]) -> Optional[int]:
    """An 8-byte hash naming the image of a record: its path, or the row itself for an in-memory
    image; None for a row without an image (:data:`NO_IMAGE`). Distinct keys count distinct images
    (``images`` in metrics.json; collisions: ~n^2 / 2^65)."""
    path = rec.get("image_path") or rec.get("image")
    if path == NO_IMAGE or path is None:
        return None
    key = f"path:{path}" if isinstance(path, str) and path != IN_MEMORY_IMAGE else \
        f"row:{rec.get('index', rec.get('id'))}"
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest(), "little")
