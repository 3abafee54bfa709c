"""Answer-format debris in captions (regioncap.prompts.caption_debris): the rule on real
debris the offline model wrote and on legitimate captions, its properties, the counts
in metrics.json, and the whole path through the CLI against a local OpenAI-compatible server."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regioncap import prompts
from regioncap.metrics import compute_metrics, format_summary
from regioncap.stages.caption import Captioner

# ------------------------------------------------------------------ the rule

#: Captions the offline model (model=shapes data=shapes) wrote, verbatim from captions.jsonl:
#: prompt=coords first answers, and prompt=dataflow draw=thin re-ask answers (which name no region).
REAL_DEBRIS = [
    ('a blue triangle"}, 7: a blue ellipse', [1]),
    ('a red ellipse"}, 1: a red ellipse', [1]),
    ('a yellow circle"}, 1: a green ellipse', [1, 2, 3, 4, 5, 6]),
    ('a blue star"}_1: a blue star', [1, 2, 3, 4, 5, 6]),
    ('an orange triangle"}_ blue star"}_ yellow ellipse', [1, 2, 3, 4, 5, 6]),
    ('an orange triangle"}_1, 143, 1: a blue star"}_2: a blue star: a blue star"}_2: a yellowl": [6042 blue '
     'star"}, 1', [1, 2, 3, 4, 5, 6]),
    ('a purple ellipse"}, 1: a purple ellipse"}, 41, 1: a purple ellipse: a purple ellipse: a purple ellipse', [1]),
    ('2d": [3, 9: an orange circle', [2, 3, 4, 5, 6]),
    ("2, 2: an orange ellipse", [2, 3, 4, 5, 6]),
    ("2]", [2, 3, 4, 5, 6]),
    ("[a yellow circle", [2, 3]),
]


@pytest.mark.parametrize("caption,numbers", REAL_DEBRIS)
def test_real_debris_is_flagged(caption, numbers):
    assert prompts.caption_debris(caption, numbers) in prompts.DEBRIS_REASONS


def test_a_real_coords_answer_parses_in_format_but_not_clean():
    # prompt=coords, shapes_00002: every line reads as "N: text", so the layout counted as followed.
    answer = ('1: a purple circle\n2: a yellow ellipse\n3: a yellow circle"}, 1: a green ellipse\n'
              '4: a purple circle"}, 9: a purple triangle\n5: an orange circle\n6: an orange circle a yellow circle')
    parsed = prompts.parse_answer(answer, [1, 2, 3, 4, 5, 6], "lines")
    assert parsed.format_ok and not parsed.clean
    assert parsed.debris == {3: "json_fragment", 4: "json_fragment"}
    # The caption is returned as written: the caller decides what to do with it.
    assert parsed.captions[3] == 'a yellow circle"}, 1: a green ellipse'
    # No debris, only a wrong caption: not this rule's business.
    assert 6 not in parsed.debris


@pytest.mark.parametrize("caption,reason", [
    ("a red car 2: a blue square", "number_label"),
    ("a red car 1:", "number_label"),  # its own label repeated at the end
    ("a red car region 2: a tree", "region_label"),
    ("a red car **Box 2** - a tree", "region_label"),
    ("Region 2 a tree", "region_label"),
    ("a red car <region2>", "region_label"),
    ("box #3 a dog", "region_label"),
    ('{"2": a tree', "json_fragment"),
    ('a tree"]', "json_fragment"),
    ('a sign reading \\"STOP\\"', "json_fragment"),
    ("a tree}", "brace"),
    ("```a tree", "backtick"),
    ("`a tree`", "backtick"),
    ("a tree<|im_end|>", "special_token"),
    ('a sign reading "STOP', "unbalanced_quote"),
    ("a sign reading \u201cSTOP", "unbalanced_quote"),
    ("a cat (sleeping", "unbalanced_bracket"),
    ("a cat) sleeping (", "unbalanced_bracket"),
    ("a cat **sleeping", "markdown"),
])
def test_each_rule(caption, reason):
    assert prompts.caption_debris(caption, [1, 2, 3]) == reason


@pytest.mark.parametrize("caption", [
    'a sign reading "STOP"', "a sign reading \u201cSTOP\u201d", "a 2:1 ratio", "a clock showing 10:30",
    "the number 2", "a man's hat", "it's a dog's bone", "rock 'n' roll", "a cat (sleeping) on a mat",
    "a list [of things] in (round) brackets", "a red box", "the box on the left", "a region of blue sky",
    "a jersey with #2 on it", "the cat in region 2 is asleep",
    "the dog in box 2.", "fake caption of region 1 in x/c0 (320x240)", "2 dogs and 1 cat", "a sign: keep out", "a 3-way junction", "a 4.5: 1 scale",
    "page 2/3: the end", "a", "",
])
def test_legitimate_captions_are_clean(caption):
    assert prompts.caption_debris(caption, [1, 2, 3]) is None


def test_number_labels_count_only_the_regions_shown():
    # "Chapter 7: ..." on a book is text, not a label, when no region 7 was shown.
    assert prompts.caption_debris("a book titled Chapter 7: The End", [1, 2]) is None
    assert prompts.caption_debris("a book titled Chapter 7: The End", [7]) == "number_label"
    # A re-ask for region 3 alone still sees its siblings' labels as debris.
    parsed = prompts.parse_answer("3: a cat 1: a dog", [3], "lines", shown=[1, 2, 3])
    assert parsed.debris == {3: "number_label"}
    assert prompts.parse_answer("3: a cat 1: a dog", [3], "lines").debris == {}


# ------------------------------------------------------------------ properties

_WORDS = ["a", "an", "the", "red", "blue", "car", "dog", "tree", "2", "10", "man's", "it's", '"STOP"',
          "(sleeping)", "[left]", "2:1", "10:30", "sign", "reading", "boxes", "on", "of", "with", "#2", "-",
          "\u201cGO\u201d", "3.5", ",", "and"]
#: A clean caption: words of the vocabulary, starting with a plain word (``_clean`` strips a wrapping quote).
_clean_captions = st.lists(st.sampled_from(_WORDS), min_size=1, max_size=10).map(" ".join).filter(
    lambda c: c[0].isalpha())
_DEBRIS = ['"}', '{"2":', "]", "2: a blue square", "region 3:", "<region3>", "```", "<|im_end|>", '"', "}", "(", "**"]


@settings(max_examples=150, deadline=None)
@given(st.lists(_clean_captions, min_size=1, max_size=5), st.sampled_from(["lines", "json"]))
def test_a_clean_caption_stays_clean_through_the_answer_format(captions, fmt):
    numbers = list(range(1, len(captions) + 1))
    if fmt == "lines":
        text = "\n".join(f"{n}: {c}" for n, c in zip(numbers, captions))
    else:
        text = json.dumps({"regions": [{"id": n, "caption": c} for n, c in zip(numbers, captions)]})
    parsed = prompts.parse_answer(text, numbers, fmt)
    assert parsed.captions == dict(zip(numbers, captions))
    assert parsed.clean and parsed.debris == {}


@settings(max_examples=150, deadline=None)
@given(_clean_captions, st.sampled_from(_DEBRIS), st.data())
def test_a_caption_with_injected_debris_is_flagged(caption, debris, data):
    words = caption.split(" ")
    at = data.draw(st.integers(0, len(words)))
    dirty = " ".join(words[:at] + [debris] + words[at:])
    assert prompts.caption_debris(dirty, [1, 2, 3]) is not None
    if debris == "**" and at in (0, len(words)):
        return  # the parser strips bold markers at the ends of a caption itself: nothing left to flag
    # Through the parser too: the line still reads as "N: text", so only the debris rule catches it.
    parsed = prompts.parse_answer(f"1: {dirty}\n2: a tree", [1, 2], "lines", shown=[1, 2, 3])
    assert 1 in parsed.debris and 2 not in parsed.debris and not parsed.clean


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.lists(st.integers(1, 30), min_size=1, max_size=5))
def test_the_rule_never_raises_and_names_a_known_reason(text, numbers):
    assert prompts.caption_debris(text, numbers) in (None, *prompts.DEBRIS_REASONS)


def test_the_rule_is_linear_on_long_runs():
    import time

    t0 = time.perf_counter()
    for text in ("1" + " " * 50_000, '"' + " " * 50_000, "9" * 50_000 + ":", "[" * 50_000, "region " * 10_000):
        prompts.caption_debris(text, [1])
    assert time.perf_counter() - t0 < 1.0


# ------------------------------------------------------------------ re-ask merge and metrics


def test_merge_reask_takes_a_clean_caption_and_keeps_the_first_when_both_carry_debris():
    from regioncap.stages.caption import Answer

    first = Answer({1: 'a cat"}', 2: 'a dog"}', 3: "a tree"}, {1: "json_fragment", 2: "json_fragment"})
    again = Answer({1: "a cat", 2: "a dog 1: a cat", 4: 'a bird"}'}, {2: "number_label", 4: "json_fragment"})
    Captioner.merge_reask(first, again)
    assert first.captions == {1: "a cat", 2: 'a dog"}', 3: "a tree", 4: 'a bird"}'}
    assert sorted(first.reasked) == [1, 4]
    # 1 is fixed by the re-ask; 2 keeps its first caption and reason; 4 was missing and takes the re-ask's.
    assert first.kept_debris == {2: "json_fragment", 4: "json_fragment"}
    assert first.debris == {1: "json_fragment", 2: "json_fragment"}  # the first answer's, unchanged


def _record(regions: List[Dict[str, Any]], requests: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"id": "r", "index": 0, "image": "a.jpg", "image_path": "/d/a.jpg", "status": "ok",
            "regions": regions, "requests": requests, "tokens": {"prompt": 0, "output": 0}}


def test_metrics_count_clean_parses_only():
    records = [
        # Format followed, one caption with debris, re-asked: region 1 fixed, region 2 kept flagged.
        _record([{"id": 1, "caption": "a cat", "attempt": 2, "debris": None},
                 {"id": 2, "caption": 'a dog"}', "attempt": 1, "debris": "json_fragment"},
                 {"id": 3, "caption": "a tree", "attempt": 1, "debris": None}],
                [{"numbers": [1, 2, 3], "region_ids": [1, 2, 3], "answer": "...", "error": None, "format_ok": True,
                  "debris": {"1": "number_label", "2": "json_fragment"},
                  "reask": {"numbers": [1, 2], "debris": {"2": "json_fragment"}}}]),
        _record([{"id": 1, "caption": "a cat", "attempt": 1, "debris": None}],
                [{"numbers": [1], "region_ids": [1], "answer": "1: a cat", "error": None, "format_ok": True,
                  "debris": {}}]),
        # Written before the check: no "debris" keys, counted as before.
        _record([{"id": 1, "caption": "a cat", "attempt": 1}],
                [{"numbers": [1], "region_ids": [1], "answer": "1: a cat", "error": None, "format_ok": True}]),
        _record([{"id": 1, "caption": "a cat", "attempt": 1}],
                [{"numbers": [1], "region_ids": [1], "answer": "a cat", "error": None, "format_ok": False}]),
    ]
    m = compute_metrics(records, {"caption": {"rows": 4, "seconds": 1.0}}, references_key=None)
    assert (m["requests_answered"], m["requests_format_ok"], m["requests_parsed_clean"]) == (4, 3, 2)
    assert m["requests_debris"] == 1 and m["parse_success_rate"] == 0.5
    assert m["regions_reasked_debris"] == 2 and m["regions_from_reask"] == 1
    assert m["captions_debris"] == 1 and m["captions_debris_by_reason"] == {"json_fragment": 1}
    summary = format_summary(m, max_error_rate=0.5, out_dir="out")
    assert ("parse success 50.0% of 4 answered requests (1 with answer-format debris in a caption: "
            "2 region(s) re-asked for it, 1 kept flagged)") in summary


# ------------------------------------------------------------------ through the CLI


class _Server:
    """A local OpenAI-compatible chat server answering the marked prompt in ``lines`` format.

    ``mode``: ``clean`` answers every region cleanly; ``debris`` puts real-style debris in
    region 1 of every first answer for several regions and answers the re-ask cleanly;
    ``debris_twice`` answers the re-ask with debris too.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.prompts: List[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, prompt: str) -> str:
        labels = re.search(r"labelled (.*?)(?:\. |, each)", prompt)
        numbers = [int(x) for x in re.findall(r"\d+", labels.group(1))] if labels else [1]
        reask = "Describe only" in prompt
        lines = [f"{n}: a red circle" for n in numbers]
        dirty = (self.mode == "debris_twice" and reask) or (self.mode != "clean" and not reask and len(numbers) > 1)
        if dirty:
            lines[0] = f'{numbers[0]}: a red circle"}}, {numbers[0] + 1}: a blue square'
        return "\n".join(lines)

    def _handler(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, doc: Dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - the engine's preflight lists the models
                self._send({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = next(p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text")
                server.prompts.append(prompt)
                text = server.answer(prompt)
                self._send({"id": "c", "object": "chat.completion", "created": 0, "model": "tiny",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

        return Handler

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def cli_run(tmp_path) -> Iterator[Any]:
    from conftest import run_cli
    from regioncap.records import read_jsonl

    def run(mode: str) -> Dict[str, Any]:
        out = tmp_path / mode
        with _Server(mode) as server:
            # data=shapes, 3 rows: one region, one region, six regions (three requests).
            proc = run_cli([f"hydra.run.dir={out}", "engine=openai", f"engine.base_url={server.base_url}",
                            "engine.served_model=tiny", "data=shapes", "data.limit=3", "progress=false",
                            "workers=0"], cwd=tmp_path, timeout=240)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return {"metrics": json.loads((out / "metrics.json").read_text()), "log": proc.stdout + proc.stderr,
                "records": list(read_jsonl(out / "captions.jsonl")), "prompts": server.prompts}

    yield run


@pytest.mark.cli
def test_cli_clean_answers_parse_at_one(cli_run):
    run = cli_run("clean")
    m = run["metrics"]
    assert m["requests_answered"] == 3 and m["parse_success_rate"] == 1.0
    assert (m["requests_debris"], m["captions_debris"], m["regions_reasked_debris"], m["reasks"]) == (0, 0, 0, 0)
    assert all(r["debris"] is None for rec in run["records"] for r in rec["regions"])
    assert "answer-format debris" not in run["log"]


@pytest.mark.cli
def test_cli_debris_is_reasked_and_fixed(cli_run):
    run = cli_run("debris")
    m = run["metrics"]
    assert m["requests_answered"] == 3 and m["requests_format_ok"] == 3
    assert m["parse_success_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert (m["requests_debris"], m["regions_reasked_debris"], m["reasks"], m["regions_from_reask"]) == (1, 1, 1, 1)
    assert m["captions_debris"] == 0 and m["regions_captioned"] == 8
    six = next(rec for rec in run["records"] if len(rec["regions"]) == 6)
    spec = six["requests"][0]
    assert spec["debris"] == {"1": "json_fragment"} and spec["reask"]["debris"] == {}
    assert '"}' in spec["answer"]  # the raw answer stays on the request
    first = six["regions"][0]
    assert (first["caption"], first["attempt"], first["debris"]) == ("a red circle", 2, None)
    assert any("Describe only the boxes labelled 1," in p for p in run["prompts"])
    assert "1 with answer-format debris in a caption: 1 region(s) re-asked for it, 0 kept flagged" in run["log"]


@pytest.mark.cli
def test_cli_debris_the_reask_cannot_fix_is_kept_and_flagged(cli_run):
    run = cli_run("debris_twice")
    m = run["metrics"]
    assert m["parse_success_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert (m["requests_debris"], m["regions_reasked_debris"], m["captions_debris"]) == (1, 1, 1)
    assert m["captions_debris_by_reason"] == {"json_fragment": 1} and m["regions_from_reask"] == 0
    six = next(rec for rec in run["records"] if len(rec["regions"]) == 6)
    first = six["regions"][0]
    assert first["caption"] == 'a red circle"}, 2: a blue square' and first["attempt"] == 1
    assert first["debris"] == "json_fragment"
    assert six["requests"][0]["reask"]["debris"] == {"1": "json_fragment"}
    assert "1 kept flagged" in run["log"]
