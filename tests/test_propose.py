"""Region proposals: the registry, the contours and vlm proposers, box overlap and proposal quality."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace
from typing import List, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from conftest import REPO, compose, family, ground
from regioncap import boxes as bx
from regioncap.engines.base import Engine, Request, Response, Sampling, error_response
from regioncap.propose import (
    Proposal, Proposer, ProposeError, ProposeWhen, build_proposer, check_box_key, plan_regions, proposer_name,
    proposer_type,
    select_proposals, should_propose,
)
from regioncap.propose.contours import ContoursProposer
from regioncap.families.qwen import GROUNDING_PROMPT, QWEN2_GROUNDING_PROMPT
from regioncap.families.grounding import grounding_json_schema, grounding_regex
from regioncap.propose.vlm import VlmProposer

SHAPES_DIR = REPO / "regioncap" / "demo" / "shapes"


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("method", ["contours", "vlm"])
def test_every_shipped_proposer_resolves_from_its_target(method):
    section = compose([f"propose={method}"]).propose
    cls = proposer_type(section)
    assert issubclass(cls, Proposer) and cls.name == method == proposer_name(section)
    assert cls.needs_engine is (method == "vlm")


def test_none_names_no_class_and_a_bad_target_is_named():
    from regioncap.errors import RunError

    section = compose(["propose=none"]).propose
    assert build_proposer(section) is None and proposer_type(section) is None and proposer_name(section) == "none"
    assert proposer_name(None) == "none"
    with pytest.raises(RunError, match="propose._target_.*owlv2"):
        proposer_type({"_target_": "regioncap.propose.owlv2.Owl"})
    with pytest.raises(RunError, match="not a subclass of regioncap.propose.base.Proposer"):
        proposer_type({"_target_": "regioncap.engines.fake.FakeEngine"})


def test_importing_proposers_does_not_import_opencv():
    code = ("import sys, regioncap.propose, regioncap.propose.contours, regioncap.propose.vlm; "
            "from regioncap.propose import build_proposer; "
            "build_proposer({'_target_': 'regioncap.propose.contours.ContoursProposer'}); "
            "print(sorted({'cv2', 'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_proposal_scales_to_the_original_and_rejects_bad_boxes():
    p = Proposal((10, 20, 30, 40), 0.9, "cat", "vlm")
    assert p.bbox == (10.0, 20.0, 30.0, 40.0) and isinstance(p.bbox[0], float)
    assert p.scale(2.0, 0.5).bbox == (20.0, 10.0, 60.0, 20.0)
    assert p.scale(2, 2).label == "cat" and p.box() == bx.Box(10, 20, 30, 40)
    assert p.to_dict() == {"bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9, "label": "cat", "source": "vlm"}
    with pytest.raises(ValueError):
        Proposal((0, 0, math.nan, 1))


# --------------------------------------------------------------------------- when / add / cap


def test_should_propose_follows_the_seed_for_missing():
    assert should_propose(None, "missing") is True
    assert should_propose([], "missing") is False  # an explicit empty list stays no_regions
    assert should_propose([[0, 0, 5, 5]], "missing") is False
    assert should_propose([[0, 0, 5, 5]], "always") and should_propose([], "add")
    with pytest.raises(ValueError, match="propose.when"):
        should_propose(None, "sometimes")


def test_select_proposals_add_drops_overlaps_and_cap_is_counted():
    given = [bx.Box(0, 0, 10, 10)]
    props = [Proposal((0, 0, 10, 9), source="contours"), Proposal((50, 50, 60, 60), source="contours"),
             Proposal((70, 70, 80, 80), source="contours")]
    kept, capped = select_proposals(given, props, "add", add_iou=0.5)
    assert [p.bbox[0] for p in kept] == [50.0, 70.0] and capped == 0
    kept, capped = select_proposals(given, props, "missing", max_regions=2)
    assert len(kept) == 2 and capped == 1 and kept[0] is props[0]
    cfg = compose(["propose.when=add"])
    kept, _ = select_proposals(given, props, cfg.propose.when, add_iou=cfg.propose.add_iou)
    assert len(kept) == 2


# --------------------------------------------------------------------------- iou / nms / quality


@pytest.mark.parametrize("a,b,want", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges
    ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),
    ((0, 0, 10, 10), (2, 2, 4, 4), 4 / 100),  # nested
    ((0, 0, 0, 10), (0, 0, 10, 10), 0.0),  # empty box
])
def test_iou_known_cases(a, b, want):
    assert bx.iou(a, b) == pytest.approx(want)
    assert bx.iou(bx.Box(*b), a) == pytest.approx(want)


def test_nms_known_cases():
    boxes = [(0, 0, 10, 10), (1, 1, 11, 11), (20, 20, 30, 30), (2, 2, 5, 5)]
    assert bx.nms(boxes, [0.5, 0.9, 0.3, 0.1], 0.5) == [1, 2, 3]  # the nested box survives plain IoU
    assert bx.nms(boxes, [0.5, 0.9, 0.3, 0.1], 0.5, metric="iomin") == [1, 2]  # not intersection/smaller
    assert bx.nms(boxes, None, 0.5) == [0, 2, 3]  # given order
    assert bx.nms(boxes, [1, 1, 1, 1], 0.5) == [0, 2, 3]  # ties keep the given order
    assert bx.nms([], [], 0.3) == []
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        bx.nms(boxes[:2], [1.0], 0.5)
    with pytest.raises(ValueError, match="metric"):
        bx.nms(boxes, None, 0.5, metric="giou")


def test_proposal_quality_known_cases():
    truth = [(0, 0, 10, 10), (20, 0, 30, 10), (40, 0, 50, 10)]
    q = bx.proposal_quality(truth, truth)
    assert (q["recall"], q["precision"], q["mean_best_iou"], q["matched"]) == (1.0, 1.0, 1.0, 3)
    # One truth found, one found badly (IoU 1/3), one missed; plus one proposal on nothing.
    props = [(0, 0, 10, 10), (25, 0, 35, 10), (100, 100, 110, 110)]
    q = bx.proposal_quality(props, truth)
    assert q["recall"] == pytest.approx(1 / 3) and q["precision"] == pytest.approx(1 / 3)
    assert q["mean_best_iou"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert (q["n_proposed"], q["n_truth"]) == (3, 3)
    # One-to-one: a big proposal over two truths matches at most one of them.
    q = bx.proposal_quality([(0, 0, 30, 10), (0, 0, 30, 10)], [(0, 0, 16, 10), (14, 0, 30, 10)], thr=0.5)
    assert q["matched"] == 2  # each copy takes one truth (IoU 16/30 and 16/30)
    q = bx.proposal_quality([(0, 0, 30, 10)], [(0, 0, 16, 10), (14, 0, 30, 10)], thr=0.5)
    assert q["matched"] == 1 and q["recall"] == 0.5 and q["precision"] == 1.0
    # Greedy takes the best pair first.
    q = bx.proposal_quality([(0, 0, 10, 10)], [(0, 0, 10, 12), (0, 0, 10, 10)])
    assert q["matched"] == 1 and q["mean_best_iou"] == pytest.approx((10 / 12 + 1) / 2)
    empty = bx.proposal_quality([], truth)
    assert empty["recall"] == 0.0 and empty["precision"] is None and empty["mean_best_iou"] == 0.0
    none = bx.proposal_quality(truth, [])
    assert none["recall"] is None and none["precision"] == 0.0 and none["mean_best_iou"] is None


_coord = st.integers(0, 200)


@st.composite
def _boxes(draw, max_size=8) -> List[tuple]:
    out = []
    for _ in range(draw(st.integers(0, max_size))):
        x1, y1 = draw(_coord), draw(_coord)
        out.append((x1, y1, x1 + draw(st.integers(1, 80)), y1 + draw(st.integers(1, 80))))
    return out


@given(_boxes(), _boxes(), st.floats(0.05, 1.0))
@settings(max_examples=150, deadline=None)
def test_proposal_quality_properties(props, truth, thr):
    q = bx.proposal_quality(props, truth, thr)
    assert 0 <= q["matched"] <= min(len(props), len(truth))
    for k in ("recall", "precision", "mean_best_iou"):
        assert q[k] is None or 0.0 <= q[k] <= 1.0 + 1e-9
    same = bx.proposal_quality(truth, truth, thr)
    if truth:
        assert same["mean_best_iou"] == pytest.approx(1.0)
        assert same["matched"] >= 1


@given(_boxes(12), st.floats(0.0, 1.0), st.sampled_from(["iou", "iomin"]))
@settings(max_examples=150, deadline=None)
def test_nms_properties(boxes, thr, metric):
    scores = [((i * 7919) % 13) / 13 for i in range(len(boxes))]
    kept = bx.nms(boxes, scores, thr, metric=metric)
    assert len(set(kept)) == len(kept) and all(0 <= i < len(boxes) for i in kept)
    over = (lambda a, b: bx._overlap(bx._corners(a), bx._corners(b), metric))
    for n, i in enumerate(kept):
        assert all(over(boxes[i], boxes[j]) <= thr for j in kept[:n])
    for j in set(range(len(boxes))) - set(kept):
        assert any(over(boxes[j], boxes[i]) > thr for i in kept)
    for a in boxes[:3]:
        for b in boxes[:3]:
            assert bx.iou(a, b) == pytest.approx(bx.iou(b, a)) and 0.0 <= bx.iou(a, b) <= 1.0


# --------------------------------------------------------------------------- contours


def _scene(background=(230, 230, 230)):
    """A clean 224x224 scene with four filled shapes and their boxes (x2/y2 exclusive)."""
    im = Image.new("RGB", (224, 224), background)
    d = ImageDraw.Draw(im)
    d.rectangle((20, 20, 79, 69), fill=(200, 30, 30))
    d.ellipse((130, 30, 199, 89), fill=(30, 30, 200))
    d.polygon([(70, 130), (100, 199), (40, 199)], fill=(30, 160, 30))
    d.rectangle((140, 140, 189, 209), fill=(20, 20, 20))
    return im, [(20, 20, 80, 70), (130, 30, 200, 90), (40, 130, 100, 200), (140, 140, 190, 210)]


def test_contours_finds_every_shape_of_a_clean_scene():
    image, truth = _scene()
    props = ContoursProposer().propose(image)
    q = bx.proposal_quality([p.bbox for p in props], truth, 0.5)
    assert q["recall"] == 1.0 and q["precision"] == 1.0 and q["mean_best_iou"] > 0.85
    assert all(p.source == "contours" and p.score is None and p.label is None for p in props)
    areas = [(p.bbox[2] - p.bbox[0]) * (p.bbox[3] - p.bbox[1]) for p in props]
    assert areas == sorted(areas, reverse=True)  # largest first
    for x1, y1, x2, y2 in (p.bbox for p in props):
        assert 0 <= x1 < x2 <= 224 and 0 <= y1 < y2 <= 224


def test_contours_parameters_come_from_the_composed_config():
    cfg = compose(["propose.max_area_ratio=0.07", "propose.nms_metric=iou"]).propose
    proposer = build_proposer(cfg)
    assert isinstance(proposer, ContoursProposer)
    assert proposer.params.max_area_ratio == 0.07 and proposer.params.nms_metric == "iou"
    assert proposer.params.block_size == 11 and proposer.params.close_kernel == 8  # DataFlow-MM's
    image, truth = _scene()
    # The ellipse (~3800 px) and the bigger boxes are now above 7% of the image; the triangle (~2100 px) is not.
    props = proposer.propose(image)
    assert props and all((p.bbox[2] - p.bbox[0]) * (p.bbox[3] - p.bbox[1]) < 0.1 * 224 * 224 for p in props)
    assert set(proposer.describe()) >= {"proposer", "block_size", "nms_threshold"}


def test_contours_blank_image_gives_nothing_and_grey_input_works():
    assert ContoursProposer().propose(Image.new("RGB", (224, 224), (128, 128, 128))) == []
    image, _ = _scene()
    assert len(ContoursProposer().propose(image.convert("L"))) == 4


@pytest.mark.parametrize("key,value", [("block_size", 10), ("block_size", 1), ("blur_kernel", 4),
                                       ("close_kernel", -1), ("min_area_ratio", 0.9), ("nms_metric", "giou"),
                                       ("max_aspect", math.inf)])
def test_contours_bad_parameters_name_the_key(key, value):
    with pytest.raises(ProposeError, match=f"propose.{key}|propose.min_area_ratio"):
        ContoursProposer.settings({key: value})


def test_contours_on_bundled_shapes_finds_objects():
    rows = [json.loads(line) for line in (SHAPES_DIR / "shapes_nobox.jsonl").read_text().splitlines()]
    proposer = ContoursProposer()
    truth, props = [], []
    for row in rows:
        image = Image.open(SHAPES_DIR / row["image"])
        props.append([p.bbox for p in proposer.propose(image)])
        truth.append([bx.to_xyxy(b, "xywh", *image.size) for b in row["gt_bbox"]])
    best = [bx.proposal_quality(p, t)["mean_best_iou"] for p, t in zip(props, truth)]
    # DataFlow-MM's defaults on noisy backgrounds: loose boxes, but every scene gets some near its shapes.
    assert all(p for p in props) and all(b > 0.2 for b in best)


# --------------------------------------------------------------------------- vlm: prompt, schema, parser


def test_grounding_prompt_snapshot():
    assert GROUNDING_PROMPT == "Locate every object in the image and output their bbox coordinates in JSON format."
    assert family("qwen2_5_vl").grounding_prompt() == GROUNDING_PROMPT
    assert family("qwen2_vl").grounding_prompt() == QWEN2_GROUNDING_PROMPT


def test_grounding_schema_accepts_a_qwen25_answer():
    jsonschema = pytest.importorskip("jsonschema")
    answer = [{"bbox_2d": [10, 20, 110, 90], "label": "red circle"}, {"bbox_2d": [0, 0, 5, 5], "label": "dot"}]
    jsonschema.validate(answer, grounding_json_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"bbox_2d": [1, 2, 3], "label": "x"}], grounding_json_schema())


def _boxes_of(props: Sequence[Proposal]):
    return [(tuple(round(v, 3) for v in p.bbox), p.label) for p in props]


@pytest.mark.parametrize("text", [
    '[{"bbox_2d": [10, 20, 110, 90], "label": "red circle"}]',
    '```json\n[\n  {"bbox_2d": [10, 20, 110, 90], "label": "red circle"}\n]\n```',
    'Sure! Here they are:\n```json\n[{"bbox_2d": [10, 20, 110, 90], "label": "red circle"}]\n```\nAnything else?',
    '[{"bbox_2d": [10, 20, 110, 90], "label": "red circle"}] I found one object.',
    '{"bbox_2d": [10, 20, 110, 90], "label": "red circle"}',
    '[{"bbox_2d": [110, 90, 10, 20], "label": "red circle"}]',  # corners swapped
    '[{"bbox_2d": ["10", "20", "110", "90"], "label": "  red\ncircle "}]',
    '[{"bbox_2d": [10, 20, 110, 90], "label": "red circle"}, {"bbox_2d": [30, 40',  # cut off
])
def test_parse_grounding_qwen25_variants(text):
    assert _boxes_of(ground(text, 224, 224)) == [((10.0, 20.0, 110.0, 90.0), "red circle")]


def test_parse_grounding_clips_and_drops_degenerate_boxes():
    text = json.dumps([
        {"bbox_2d": [-5, 10, 300, 50], "label": "wide"},     # clipped to the image
        {"bbox_2d": [50, 50, 50, 80], "label": "flat"},      # zero width
        {"bbox_2d": [230, 10, 260, 50], "label": "outside"},  # nothing left after clipping
        {"bbox_2d": [1, 2, 3], "label": "three"},           # wrong arity
        {"bbox_2d": [1, 2, "x", 4], "label": "text"},
        {"label": "no box"},
        {"bbox_2d": [1e400, 0, 5, 5]},                      # inf in JSON -> not finite
        {"bbox_2d": [0, 0, 10, 10]},                        # no label
    ])
    assert _boxes_of(ground(text, 224, 200)) == [((0.0, 10.0, 224.0, 50.0), "wide"),
                                                           ((0.0, 0.0, 10.0, 10.0), None)]


def test_parse_grounding_qwen2_tokens_are_on_a_1000_grid():
    text = ("<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|> and "
            "<|object_ref_start|>a star<|object_ref_end|><|box_start|>(0, 0),(1000,1000)<|box_end|>")
    props = ground(text, 448, 224, "qwen2_vl")
    assert _boxes_of(props) == [((44.8, 44.8, 224.0, 134.4), "the red circle"), ((0.0, 0.0, 448.0, 224.0), "a star")]
    # Special tokens stripped by the decoder: the bare pairs, labelled by the text before them.
    bare = ground("the red circle(100,200),(500,600)", 448, 224, "qwen2_vl")
    assert _boxes_of(bare) == [((44.8, 44.8, 224.0, 134.4), "the red circle")]
    # A JSON answer from a Qwen2-VL model is on its grid too; for Qwen2.5-VL the same is pixels.
    as_json = '[{"bbox_2d": [100, 200, 500, 600], "label": "x"}]'
    assert ground(as_json, 448, 224, "qwen2_vl")[0].bbox == pytest.approx((44.8, 44.8, 224.0, 134.4))
    assert ground(as_json, 448, 224, "qwen2_5_vl")[0].bbox == (100.0, 200.0, 448.0, 224.0)


@pytest.mark.parametrize("text", [None, "", "   ", "no objects here", "[]", "{}", "[[[[[[", "[" * 5000,
                                  '{"a": ' * 3000, "```json\n", 42])
def test_parse_grounding_garbage_gives_nothing(text):
    assert ground(text, 224, 224) == [] and ground(text, 224, 224, "qwen2_vl") == []


def test_parse_grounding_rejects_a_bad_image_size():
    with pytest.raises(ValueError, match="width"):
        ground("[]", 0, 10)


_fragments = st.sampled_from([
    "[", "]", "{", "}", ",", ":", '"bbox_2d"', '"label"', '"cat"', "```json", "```", "\n", " ", "-3", "12",
    "1e999", "NaN", "null", "true", "<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "(", ")", "0.5", "999999999999999999999", "[10, 20, 30, 40]", '{"bbox_2d": [1, 2, 30, 40]}',
])


@given(st.one_of(st.text(max_size=300), st.lists(_fragments, max_size=60).map("".join)),
       st.integers(1, 2000), st.integers(1, 2000), st.sampled_from(["qwen2_5_vl", "qwen2_vl"]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parse_grounding_never_raises_and_boxes_fit(text, width, height, family_name):
    for p in ground(text, width, height, family_name):
        x1, y1, x2, y2 = p.bbox
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert x2 - x1 >= 1.0 and y2 - y1 >= 1.0
        assert p.source == "vlm" and (p.label is None or 0 < len(p.label) <= 100)


# --------------------------------------------------------------------------- vlm proposer through an engine


class _GroundingEngine(Engine):
    """Answers every request with a fixed text (or an error); records what it was sent."""

    name = "grounding-test"

    def __init__(self, text: str | None = None, error: bool = False) -> None:
        self.text, self.error, self.sent = text, error, []

    def generate(self, requests: Sequence[Request]) -> List[Response]:
        self.sent.extend(requests)
        out = []
        for r in requests:
            assert Image.open(r.image_path).size == r.image_size  # the image it saw, at the model's size
            out.append(error_response(r.key, "engine_error", "boom") if self.error else Response(r.key, self.text))
        return out


def test_vlm_proposer_sends_the_grounding_request_and_parses_the_answer():
    answer = ('```json\n[{"bbox_2d": [10, 20, 110, 90], "label": "red circle"},'
              ' {"bbox_2d": [11, 20, 110, 90], "label": "red circle"},'
              ' {"bbox_2d": [150, 150, 200, 210], "label": "blue square"}]\n```')
    engine = _GroundingEngine(answer)
    cfg = compose(["propose=vlm"]).propose
    proposer = build_proposer(cfg, engine=engine, family=family("qwen2_5_vl"))
    assert isinstance(proposer, VlmProposer) and proposer.needs_engine
    props = proposer.propose(Image.new("RGB", (224, 224), "white"))
    # The near-duplicate is dropped by NMS; answer order is kept.
    assert [(p.label, p.source) for p in props] == [("red circle", "vlm"), ("blue square", "vlm")]
    (req,) = engine.sent
    assert req.prompt == GROUNDING_PROMPT and req.regex == grounding_regex() and req.json_schema is None
    assert req.sampling.max_tokens == cfg.max_tokens


@pytest.mark.parametrize("constraint", ["json", "none"])
def test_vlm_request_constraint_is_configurable(constraint):
    proposer = build_proposer(compose(["propose=vlm", f"propose.constraint={constraint}"]).propose)
    req = proposer.request("k", "x.png", (224, 224))
    assert req.regex is None
    assert req.json_schema == (grounding_json_schema(50) if constraint == "json" else None)


def test_grounding_regex_matches_what_the_parser_reads():
    import re

    good = ('[{"bbox_2d": [10, 20, 110, 90], "label": "red circle"}, '
            '{"bbox_2d": [0, 0, 5, 5], "label": "a \'dot\'"}]')
    assert re.fullmatch(grounding_regex(), good) and re.fullmatch(grounding_regex(), "[]")
    assert len(ground(good, 224, 224)) == 2
    for bad in ('[{"bbox_2d": [10, 20, 110, 90], "label": ""}]', '[\n{"bbox_2d": [1, 2, 3, 4], "label": "x"}]',
                '[{"bbox_2d": [1, 2, 3], "label": "x"}]', '[{"bbox_2d": [01, 2, 3, 4], "label": "x"}]'):
        assert not re.fullmatch(grounding_regex(), bad)


@given(st.lists(st.tuples(st.lists(st.integers(0, 99999), min_size=4, max_size=4),
                          st.text(st.characters(blacklist_characters='"\\\n', blacklist_categories=("Cs",)),
                                  min_size=1, max_size=100)), max_size=5))
@settings(max_examples=100, deadline=None)
def test_every_regex_conforming_answer_parses(items):
    import re

    text = "[" + ", ".join('{"bbox_2d": [%d, %d, %d, %d], "label": "%s"}' % (*b, label) for b, label in items) + "]"
    assert re.fullmatch(grounding_regex(), text)
    props = ground(text, 100000, 100000)
    # Every item with a non-degenerate box comes back, in order.
    want = [b for b, _ in items if abs(b[2] - b[0]) >= 1 and abs(b[3] - b[1]) >= 1]
    assert [tuple(int(v) for v in p.bbox) for p in props] == [
        (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])) for b in want]


def test_vlm_request_for_qwen2_has_no_json_schema_and_the_proposers_budget():
    proposer = VlmProposer(None, family=family("qwen2_vl"))
    req = proposer.request("r1/ground", "x.png", (448, 224), Sampling(max_tokens=4096, seed=3))
    assert req.json_schema is None and req.regex is None and req.prompt == QWEN2_GROUNDING_PROMPT
    # propose.max_tokens is the grounding budget, below or above the captions' (the rest is theirs).
    assert req.sampling.max_tokens == 1024 and req.sampling.seed == 3 and req.image_size == (448, 224)
    small = VlmProposer(SimpleNamespace(max_tokens=160), family=family("qwen2_5_vl"))
    assert small.request("r1/ground", "x.png", (448, 224), Sampling(max_tokens=4096)).sampling.max_tokens == 160


def test_vlm_proposer_without_engine_or_with_a_failed_request_says_so():
    image = Image.new("RGB", (56, 56))
    with pytest.raises(ProposeError, match="needs the caption engine"):
        VlmProposer(None).propose(image)
    with pytest.raises(ProposeError, match="engine_error: boom"):
        VlmProposer(None, engine=_GroundingEngine(error=True)).propose(image)


# --------------------------------------------------------------------------- config and data


def test_default_config_proposes_with_contours_for_missing_boxes():
    cfg = compose([], pin=False)
    assert (proposer_name(cfg.propose), cfg.propose.when) == ("contours", "missing")
    assert cfg.propose.max_regions == 20 and cfg.propose.add_iou == 0.5
    assert (cfg.propose.min_area_ratio, cfg.propose.max_area_ratio, cfg.propose.min_aspect,
            cfg.propose.max_aspect, cfg.propose.max_side_ratio, cfg.propose.nms_threshold) == (
        0.01, 0.8, 0.1, 5.0, 0.9, 0.3)


@pytest.mark.parametrize("override", ["propose.when=sometimes", "propose.block_size=big", "propose.nms_metric=giou",
                                      "propose.threshold=3", "propose.constraint=regex"])
def test_bad_propose_values_fail_while_composing(override):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose([override])


def test_vlm_option_has_its_own_fields_only():
    from hydra.errors import ConfigCompositionException

    cfg = compose(["propose=vlm", "propose.when=always", "propose.max_tokens=2048"])
    assert (proposer_name(cfg.propose), cfg.propose.when, cfg.propose.max_tokens) == ("vlm", "always", 2048)
    with pytest.raises(ConfigCompositionException):
        compose(["propose=vlm", "propose.block_size=11"])
    with pytest.raises(ConfigCompositionException):
        compose(["propose=vlm", "propose.constraint=xml"])


def test_shapes_nobox_is_shapes_without_boxes_but_with_the_truth():
    cfg = compose(["data=shapes_nobox"])
    assert cfg.data.references_key is None and cfg.data.bbox_format == "xywh"
    with_boxes = [json.loads(x) for x in (SHAPES_DIR / "shapes.jsonl").read_text().splitlines()]
    without = [json.loads(x) for x in (SHAPES_DIR / "shapes_nobox.jsonl").read_text().splitlines()]
    assert [r["id"] for r in without] == [r["id"] for r in with_boxes]
    for a, b in zip(with_boxes, without):
        assert "bbox" not in b and "references" not in b
        assert (b["image"], b["gt_bbox"], b["gt_references"]) == (a["image"], a["bbox"], a["references"])
        assert (SHAPES_DIR / b["image"]).is_file()


def test_shapes_nobox_rows_read_with_no_box_field():
    from regioncap.data import iter_rows

    rows = list(iter_rows(compose(["data=shapes_nobox"]).data))
    assert len(rows) == 8 and all(r.bbox is None and "gt_bbox" in r.extra for r in rows)
    assert all(should_propose(r.bbox, "missing") for r in rows)


def test_eval_script_composes_and_measures_one_scene(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_proposals.py"), "--rows", "2", "--repeat", "1",
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["shapes"]["images"] == 2 and result["demo_photos"]["images"] == 5
    assert result["demo_photos"]["n_truth"] == 18 and 0 <= result["shapes"]["recall"] <= 1
    assert "| shapes |" in proc.stdout


# --------------------------------------------------------------------------- plan_regions / check_box_key


def _given():
    return [(0, bx.Box(0, 0, 10, 10)), (2, bx.Box(100, 100, 150, 150))]


def _props():
    return [Proposal((0, 0, 10, 9), 0.9, "a", "vlm"), Proposal((50, 50, 60, 60), 0.8, "b", "vlm"),
            Proposal((70, 70, 80, 80), 0.7, "c", "vlm")]


def test_plan_without_proposals_keeps_the_given_boxes_as_input():
    plan = plan_regions(_given(), None, "missing")
    assert [(r.source, r.source_index) for r in plan.regions] == [("input", 0), ("input", 2)]
    assert plan.proposed == plan.capped == 0 and plan.truth == []


def test_plan_missing_always_add():
    plan = plan_regions([], _props(), "missing", max_regions=2)
    assert [(r.source, r.label, r.score) for r in plan.regions] == [("vlm", "a", 0.9), ("vlm", "b", 0.8)]
    assert (plan.proposed, plan.capped) == (3, 1)
    plan = plan_regions(_given(), _props(), ProposeWhen.always)
    assert [r.label for r in plan.regions] == ["a", "b", "c"] and plan.truth == [b for _, b in _given()]
    assert plan.truth_index == [0, 2]  # where the truth boxes' references are (box 1 was dropped)
    plan = plan_regions(_given(), _props(), "add", add_iou=0.5, max_regions=1)
    assert [(r.source, r.label) for r in plan.regions] == [("input", None), ("input", None), ("vlm", "b")]
    assert (plan.overlapping_given, plan.capped) == (1, 1)


def test_captions_of_proposals_are_scored_against_the_truth_they_match():
    """metrics: each truth box's references against the caption and label of the proposal matched to it."""
    from regioncap.metrics import ProposalStats

    def region(box, caption, label=None):
        return {"id": 1, "source": "vlm", "source_index": None, "bbox": box, "caption": caption,
                **({"label": label} if label is not None else {})}

    rec = {"status": "ok", "references": ["a red circle", "dropped box", ["a blue star", "blue star"]],
           "proposals": {"method": "vlm", "truth_bbox": [[0, 0, 10, 10], [100, 100, 150, 150]],
                         "truth_index": [0, 2]},
           "regions": [region([101, 101, 150, 150], "Blue star.", "a blue star"),  # matches truth 2 (refs index 2)
                       region([0, 0, 10, 9], "a green circle", "a red circle"),     # matches truth 1, wrong caption
                       region([50, 50, 60, 60], "a red circle")]}                    # matches nothing
    unmatched = {"status": "ok", "references": ["a red circle"],
                 "proposals": {"method": "vlm", "truth_bbox": [[0, 0, 10, 10]], "truth_index": [0]},
                 "regions": [region([200, 200, 220, 220], "a red circle")]}
    stats = ProposalStats()
    stats.add(rec)
    stats.add(unmatched)
    q = stats.summary()["quality"]
    assert (q["truth_boxes"], q["matched"], q["precision"]) == (3, 2, 0.5)
    assert q["references"] == {"truth_boxes": 3, "matched": 2, "caption_exact_match": round(1 / 3, 4),
                               "caption_exact_match_of_matched": 0.5, "labels": 2, "label_exact_match": 1.0}
    # No references (or an old record without truth_index): the box figures only.
    stats = ProposalStats()
    stats.add({**rec, "references": None})
    stats.add({**rec, "proposals": {k: v for k, v in rec["proposals"].items() if k != "truth_index"}})
    assert "references" not in stats.summary()["quality"]


def test_check_box_key_names_the_keys_and_the_fix():
    rows = [{"id": "a", "image": "x.jpg", "boxes": [[10, 10, 50, 50]]}, {"id": "b", "boxes": [[1, 2, 3, 4]]}]
    problem = check_box_key(rows, "bbox", "none")
    assert problem.fatal and problem.candidates == ("boxes",)
    assert "'bbox'" in problem.message and "boxes, id, image" in problem.message
    assert "data.bbox_key=boxes" in problem.message and "propose=contours" in problem.message
    warn = check_box_key(rows, "bbox", "contours")
    assert not warn.fatal and "propose=contours regions" in warn.message and "data.bbox_key=boxes" in warn.message
    no_guess = check_box_key([{"id": "a", "caption": "hi"}], "bbox", "none")
    assert no_guess.candidates == () and "data.bbox_key=<the field with the boxes>" in no_guess.message


def test_check_box_key_is_quiet_when_any_row_has_boxes_or_there_are_none():
    assert check_box_key([{"id": "a"}, {"id": "b", "bbox": [[0, 0, 1, 1]]}], "bbox", "none") is None
    assert check_box_key([{"id": "a", "bbox": []}], "bbox", "none") is None  # [] is a given (empty) list
    assert check_box_key([], "bbox", "none") is None and check_box_key([{}], "bbox", "none") is None
    # The bundled shapes_nobox rows: no bbox, and gt_bbox looks like boxes.
    rows = [json.loads(x) for x in (SHAPES_DIR / "shapes_nobox.jsonl").read_text().splitlines()]
    problem = check_box_key(rows[:4], "bbox", "contours")
    assert not problem.fatal and problem.candidates == ("gt_bbox",)
