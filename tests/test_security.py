"""Security properties of a run: where it writes, what it writes, what it executes.

- Output paths come from row indexes, never from input strings: hostile image
  paths and ids cannot make regioncap write outside the run dir.
- A secret, in the environment or passed as a command-line override, never
  reaches any file of the run dir (Hydra's own ``.hydra/*.yaml`` are masked
  by the job; W&B gets a masked command line) or the console.
- No model option turns ``trust_remote_code`` on; no ``pickle``/``eval``/``exec``
  in the package; images are decoded by Pillow with its decompression-bomb guard on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest
from PIL import Image

from conftest import CONF_DIR, REPO, compose, run_cli
from regioncap.job import execute
from regioncap.records import read_jsonl

PACKAGE = REPO / "regioncap"


def tree(root: Path) -> Set[str]:
    """Every file and folder under ``root``, as paths relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def make_image(path: Path, size=(96, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 90, 160)).save(path)
    return path


# --------------------------------------------------------------------------- output paths


#: Image fields a hostile or careless data file may hold; ``ok`` says whether the file exists.
def hostile_rows(root: Path) -> List[Dict]:
    outside = str(root / "outside" / "x.png")
    rows = [
        ({"image": "../outside/x.png"}, True),
        ({"image": "../" * 30 + outside.lstrip("/")}, True),      # climbs to / and back down
        ({"image": outside}, True),                               # absolute
        ({"image": "img/../../outside/x.png"}, True),
        ({"image": "图像/画 ü.png"}, True),                        # unicode, a separator, a space
        ({"image": "../../../../tmp/regioncap-sec-x.png"}, False),
        ({"image": "/tmp/regioncap-sec-absent/x.png"}, False),
        ({"image": ".."}, False),
        ({"image": "."}, False),
        ({"image": "img/"}, False),
        ({"image": "a/b\\c.png"}, False),
        ({"image": "x\x00y.png"}, False),
        ({"image": "n" * 300 + ".png"}, False),                   # longer than a file name may be
        ({"image": "d/" * 3000 + "x.png"}, False),                # longer than a path may be
        ({"image": "~/regioncap-sec-absent.png"}, False),
        ({"image": "file:///etc/passwd"}, False),                 # a path as a URI: read, not an image
        ({"image": "http://127.0.0.1:9/x.png"}, False),           # no URL is fetched
        ({"image": "/etc/passwd"}, False),                        # exists, not an image
    ]
    ids = ["../../evil", "/tmp/regioncap-sec-evil", "a/b", "..", "con", "x\x00y", "é" * 300]
    out = []
    for i, (row, ok) in enumerate(rows):
        row = dict(row, bbox=[[2, 2, 30, 20], [40, 10, 20, 20]])
        row["id"] = ids[i % len(ids)] + f"-{i}"
        row["../../extra"] = "a field named like a path"
        out.append((row, ok))
    return out


@pytest.mark.parametrize("strategy", ["marked", "crop", "coords"])
def test_hostile_paths_and_ids_write_nothing_outside_the_run_dir(tmp_path_factory, strategy):
    base = tmp_path_factory.getbasetemp()
    root = tmp_path_factory.mktemp(f"sec_{strategy}")
    make_image(root / "outside" / "x.png")
    make_image(root / "data" / "img" / "a.png")
    make_image(root / "data" / "图像" / "画 ü.png")
    rows = hostile_rows(root)
    data = root / "data" / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r, _ in rows), encoding="utf-8")
    run = root / "run"
    before = tree(base)
    execute(compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", "max_error_rate=1.0",
                     f"prompt={strategy}"], output_dir=run))
    gained = tree(base) - before
    run_rel = str(run.relative_to(base))
    assert gained and all(p == run_rel or p.startswith(run_rel + os.sep) for p in gained), sorted(gained)
    assert not Path("/tmp/regioncap-sec-evil-1").exists() and not Path("/tmp/regioncap-sec-x.png").exists()

    records = list(read_jsonl(run / "captions.jsonl"))
    assert len(records) == len(rows)
    for rec, (row, ok) in zip(records, rows):
        if ok:
            assert rec["status"] == "ok", (row["image"], rec["error"])
        else:
            assert rec["status"] == "error" and rec["error"]["stage"] == "visualize", (row["image"], rec)
        for spec in rec["requests"]:
            # The request image is named by the row's position, whatever the row says.
            assert re.fullmatch(rf"images/{rec['index']:07d}(_c\d\d|_r\d\d\d)?\.(jpg|png)", spec["image"])
            assert (run / spec["image"]).resolve().parent == (run / "images").resolve()
    # Nothing in the run dir is named after input text.
    for name in tree(run):
        assert not re.search(r"evil|outside|passwd|画|\.\.", name), name
    # The file that exists but is not an image was read as bytes, nothing more.
    assert records[-1]["error"]["kind"] == "not_an_image"
    assert {r["error"]["kind"] for r in records[5:7] + records[14:15]} == {"missing_file"}
    # file:///etc/passwd is that path (read as bytes, no image); a URL is refused, never fetched.
    assert [r["error"]["kind"] for r in records[15:17]] == ["not_an_image", "unsupported_url"]


# --------------------------------------------------------------------------- secrets

ENV_SECRET = "sk-planted-ENV-5f1c2d9a7b"
OVERRIDE_SECRET = "sk-planted-OVERRIDE-3e8b1a6c"
TOKEN_SECRET = "hf_planted_TOKEN_9d4c2b7e"
@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """A CLI run with secrets planted in the environment and the overrides, W&B offline."""
    root = tmp_path_factory.mktemp("secret")
    make_image(root / "a.png")
    data = root / "rows.jsonl"
    data.write_text(json.dumps({"image": "a.png", "bbox": [[2, 2, 30, 20]]}) + "\n")
    run = root / "run"
    env = {"OPENAI_API_KEY": ENV_SECRET, "HF_TOKEN": ENV_SECRET, "WANDB_API_KEY": ENV_SECRET,
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = run_cli(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", f"hydra.run.dir={run}",
                    "logger=wandb", "logger.mode=offline", f"+notes.extra_args.api_key={OVERRIDE_SECRET}",
                    f"+notes.hf_token={TOKEN_SECRET}"], env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    files["<stdout>"], files["<stderr>"] = proc.stdout.encode(), proc.stderr.encode()
    return files


def test_secret_run_wrote_every_output(secret_run):
    for name in ("manifest.json", "metrics.json", "report.html", "regioncap.log", "captions.jsonl",
                 "visualize.jsonl", ".hydra/config.yaml"):
        assert name in secret_run, sorted(secret_run)
    assert any(re.fullmatch(r"wandb/offline-run-[^/]+/run-[a-z0-9]+\.wandb", n) for n in secret_run), sorted(secret_run)


def test_env_secret_never_written_anywhere(secret_run):
    leaks = [name for name, content in secret_run.items() if ENV_SECRET.encode() in content]
    assert leaks == []


@pytest.mark.parametrize("secret", [OVERRIDE_SECRET, TOKEN_SECRET], ids=["extra_args.api_key", "hf_token"])
def test_override_secret_never_written_anywhere(secret_run, secret):
    leaks = [name for name, content in secret_run.items() if secret.encode() in content]
    assert leaks == []
    manifest = json.loads(secret_run["manifest.json"])
    assert manifest["config"]["notes"]["extra_args"]["api_key"] == "<redacted>"
    assert manifest["config"]["notes"]["hf_token"] == "<redacted>"
    assert "+notes.extra_args.api_key=<redacted>" in secret_run[".hydra/overrides.yaml"].decode()
    assert "masked in" in secret_run["regioncap.log"].decode()  # the user is told to use the environment


# --------------------------------------------------------------------------- code that runs


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_trust_remote_code_is_off_in_every_model_option(model):
    assert compose([f"model={model}"]).model.trust_remote_code is False


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_no_experiment_turns_trust_remote_code_on(experiment):
    assert compose([f"experiment={experiment}"]).model.trust_remote_code is False


#: Code that can execute or decode untrusted data, and code that weakens Pillow's guards.
FORBIDDEN = {
    "pickle": r"\b(c?[Pp]ickle|marshal|shelve|dill|cloudpickle)\b",
    "eval": r"(?<![\w.])eval\s*\(",
    "exec": r"(?<![\w.])exec\s*\(",
    "compile": r"(?<![\w.])compile\s*\(",
    "__import__": r"__import__\s*\(",
    "unsafe yaml": r"yaml\.(load|unsafe_load|full_load)\s*\(",
    "torch.load": r"torch\.load\s*\(",
    "shell": r"shell\s*=\s*True|os\.system\s*\(|os\.popen\s*\(",
    "bomb guard off": r"MAX_IMAGE_PIXELS\s*=|LOAD_TRUNCATED_IMAGES\s*=",
    "other image decoders": r"\b(cv2|imageio|skimage|torchvision\.io)\b",
    "OpenCV decoding": r"\bcv2\.(imread|imdecode|imreadmulti|VideoCapture)\b",
}
#: (file, pattern name) -> why that use is safe.
ALLOWED: Dict[tuple, str] = {
    ("regioncap/propose/contours.py", "other image decoders"):
        "OpenCV only filters pixels regioncap.images already decoded (never cv2.imread/imdecode: "
        "the 'OpenCV decoding' pattern, allowed nowhere, holds that)",
    ("regioncap/images.py", "bomb guard off"):
        "_allow_pixels raises Pillow's limit to the run's limits.max_image_pixels, never lowers it nor turns "
        "it off: _check_pixels refuses an image over the run's limit from its header, and Pillow's own "
        "refusal stays at twice the run's limit",
    ("regioncap/cpus.py", "other image decoders"):
        "sizes OpenCV's thread pool in a preparation worker where the contour proposer loaded it; decodes nothing",
}


def test_no_code_execution_or_unsafe_decoding_in_the_package():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = text.split("#", 1)[0]
            for name, pattern in FORBIDDEN.items():
                if re.search(pattern, code) and (rel, name) not in ALLOWED:
                    hits.append(f"{rel}:{n}: {name}: {text.strip()}")
    assert hits == []


def test_only_images_py_decodes_input_images():
    """Every other ``Image.open`` reads an image regioncap wrote itself (the run's request images)."""
    opens = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if "Image.open(" in p.read_text()}
    assert opens <= {"regioncap/images.py", "regioncap/report.py", "regioncap/loggers.py",
                     "regioncap/engines/fake.py", "regioncap/engines/transformers_engine.py",
                     "regioncap/engines/vllm_engine.py", "regioncap/trackers.py"}, opens


def test_importing_every_regioncap_module_keeps_pillows_bomb_guard():
    code = (
        "import pkgutil, importlib, PIL.Image as I\n"
        "before = I.MAX_IMAGE_PIXELS\n"
        "import regioncap\n"
        "failed = []\n"
        "for m in pkgutil.walk_packages(regioncap.__path__, 'regioncap.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except ImportError as exc:\n"
        "        failed.append(m.name)\n"
        "print(before, I.MAX_IMAGE_PIXELS, I.LOAD_TRUNCATED_IMAGES if hasattr(I, 'LOAD_TRUNCATED_IMAGES') else '')\n"
        "from PIL import ImageFile\n"
        "print(ImageFile.LOAD_TRUNCATED_IMAGES, failed)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.strip().splitlines()[-2:]
    before, after = first.split()[:2]
    assert before == after and after != "None" and int(after) > 0
    assert second.startswith("False")
    assert Image.MAX_IMAGE_PIXELS is not None  # this process too, after the other tests' runs


def test_bomb_header_is_image_too_large_at_default_limits(tmp_path):
    from test_fuzz_inputs import png_header_only

    (tmp_path / "bomb.png").write_bytes(png_header_only(30000, 30000))
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"image": "bomb.png", "bbox": [[1, 1, 5, 5]]}) + "\n")
    cfg = compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", "max_error_rate=1.0"],
                  output_dir=tmp_path / "run")
    assert cfg.limits.max_image_pixels == 100_000_000  # the defaults, not a test's lowered limit
    execute(cfg)
    (rec,) = read_jsonl(tmp_path / "run" / "captions.jsonl")
    assert rec["error"]["kind"] == "image_too_large"
    assert "30000x30000" in rec["error"]["message"] or "decompression bomb" in rec["error"]["message"].lower()


def test_reproduce_refuses_masked_secret_overrides(tmp_path):
    make_image(tmp_path / "a.png")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"image": "a.png", "bbox": [[2, 2, 30, 20]]}) + "\n")
    run = tmp_path / "run"
    proc = run_cli(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}", f"hydra.run.dir={run}",
                    f"+notes.extra_args.api_key={OVERRIDE_SECRET}"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = subprocess.run([sys.executable, "-m", "regioncap.reproduce", str(run), "--out", str(tmp_path / "again")],
                           capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert again.returncode == 2
    assert "+notes.extra_args.api_key" in again.stderr and "environment" in again.stderr
    assert OVERRIDE_SECRET not in again.stdout + again.stderr
