"""Export a run's captions as a dataset: ``python -m regioncap.export RUN_DIR --format F --out PATH``.

Formats (docs/formats.md, "Export"):

- ``hf``: a Hugging Face dataset written with ``save_to_disk``: one row per
  image, the image as an ``Image`` feature (bytes embedded, or its path with
  ``--images path``), regions as a nested list of ``{id, source_index, bbox,
  input_bbox, caption, references, flags}``.
- ``parquet``: the same rows as one Parquet file (``Dataset.to_parquet``).
- ``conversations``: region-grounded chat data for VLM training, one JSON line
  per region in Qwen2.5-VL's chat-message layout, the box given in the model
  family's own grounding coordinates.

Only what a training set can use is exported: error rows, rows without a
captioned region and regions without a caption are left out and counted in the
printed summary. ``--push-to-hub REPO`` uploads the ``hf``/``parquet`` dataset
after writing it locally, and only when asked.

Image paths in the records are resolved against the folder the run was
started from (``manifest.json``'s ``cwd``, else Hydra's), then the run dir,
then the current folder, so an export works from any folder. Embedded images
are checked the way ``datasets`` reads them back; one that does not decode as
stored (e.g. a PNG whose trailing text chunk is a decompression bomb) is
re-encoded from its pixels as PNG, and a row whose image cannot be read at all
is left out and counted.

Every output is atomic: it is written beside its final path (``.NAME.tmp-PID``)
and renamed there at the end; the work dir (``datasets``' cache) is also beside
the output (``.NAME.work-PID``), removed when the export ends, and a stale one
left by a killed export is removed by the next export to the same path.

``datasets`` is imported only for the ``hf`` and ``parquet`` formats.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from regioncap.errors import RunError
from regioncap.failpoints import failpoint
from regioncap.metrics import reference_texts
from regioncap.record_types import Record, Region
from regioncap.records import CorruptRecordsError, dumps, read_jsonl
from regioncap.rundir import CAPTIONS_FILE, MANIFEST_FILE, VISUALIZE_FILE, run_file_at


FORMATS = ("hf", "parquet", "conversations")
#: The user turn of a conversation line; ``{box}`` is the box in the model's grounding format.
QUESTION = "Describe the region {box} in one short phrase."


class ExportError(RunError):
    """The run cannot be exported as asked (no captions, bad output path, hub unreachable)."""


class NothingToExport(ExportError):
    """Every row of the run is left out: nothing is written (an empty training set is a mistake)."""

    def __init__(self, counts: Dict[str, Any]) -> None:
        super().__init__("nothing to export: no row has a captioned region and a readable image")
        self.counts = counts


# ------------------------------------------------------------------ reading the run
def run_settings(run_dir: Path) -> Dict[str, Any]:
    """``{references_key, family, model}`` of the run: from ``.hydra/config.yaml``, else the
    ``config`` in ``manifest.json``, else the defaults (``references``, ``qwen2_5_vl``, ``{}``)."""
    config: Dict[str, Any] = {}
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    try:
        if hydra_cfg.is_file():
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(OmegaConf.load(hydra_cfg), resolve=False) or {}
        elif (run_dir / MANIFEST_FILE).is_file():
            config = json.loads((run_dir / MANIFEST_FILE).read_text(encoding="utf-8")).get("config") or {}
    except Exception:  # noqa: BLE001 - an unreadable config falls back to the defaults
        config = {}
    from regioncap.families.base import family_name

    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    return {"references_key": data.get("references_key", "references"),
            "family": family_name(model) or "qwen2_5_vl", "model": model, "image_bases": image_bases(run_dir)}


def image_bases(run_dir: Path) -> List[Path]:
    """Folders a record's relative ``image_path`` may be relative to, most likely first:
    the folder the run was started from (``manifest.json``'s ``cwd``, else
    ``.hydra/hydra.yaml``'s ``hydra.runtime.cwd``), the run dir, the current folder."""
    bases: List[Path] = []
    try:
        cwd = json.loads((run_dir / MANIFEST_FILE).read_text(encoding="utf-8")).get("cwd")
        if isinstance(cwd, str) and cwd:
            bases.append(Path(cwd))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import yaml

        hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text(encoding="utf-8"))
        cwd = ((hydra or {}).get("hydra") or {}).get("runtime", {}).get("cwd")
        if isinstance(cwd, str) and cwd:
            bases.append(Path(cwd))
    except Exception:  # noqa: BLE001 - no or unreadable Hydra file: the other bases remain
        pass
    bases += [Path(run_dir).absolute(), Path.cwd()]
    return list(dict.fromkeys(bases))


def resolve_image(image_path: Any, bases: Sequence[Path]) -> Optional[Path]:
    """The absolute path of a record's ``image_path`` (see :func:`image_bases`), or None when it is gone."""
    if not isinstance(image_path, str) or not image_path:
        return None
    p = Path(os.path.expanduser(image_path))
    for candidate in ([p] if p.is_absolute() else [b / p for b in bases]):
        if candidate.is_file():
            return candidate.absolute()
    return None


def exportable(records: Iterator[Dict[str, Any]], references_key: Optional[str], counts: Counter,
               bases: Optional[Sequence[Path]] = None) -> Iterator[Tuple[Dict[str, Any], List[Dict[str, Any]]]]:
    """``(record, regions)`` of every row that has at least one captioned region, with only
    its captioned regions (each with ``references`` and ``flags``); what is left out is
    counted in ``counts`` (``rows_error``, ``rows_without_captions``, ``regions_missing``,
    ``rows_image_missing``). The record's ``resolved_image`` is its image's absolute
    path (relative paths resolved against ``bases``, see :func:`image_bases`)."""
    bases = list(bases) if bases is not None else [Path.cwd()]
    for raw in records:
        counts["rows_read"] += 1
        rec = Record.from_dict(raw)
        regions = [r for r in rec.regions or [] if isinstance(r, Region)]
        kept = []
        for reg in regions:
            caption = reg.caption
            if isinstance(caption, str) and caption.strip():
                source_index = reg.source_index
                kept.append({"id": int(reg.id or 0),
                             "source_index": int(source_index) if isinstance(source_index, int) else None,
                             "source": str(reg.source or "input"),
                             "score": float(reg.score) if isinstance(reg.score, (int, float)) else None,
                             "label": str(reg.label) if isinstance(reg.label, str) else None,
                             "bbox": [float(v) for v in reg.bbox or []],
                             "input_bbox": [float(v) for v in reg.input_bbox or []],
                             "caption": caption.strip(),
                             "references": reference_texts(raw, {"source_index": source_index}, references_key),
                             "flags": [str(f) for f in reg.flags or []]})
        if rec.status == "error" or rec.error:
            counts["rows_error"] += 1  # its regions are not counted: the row as a whole failed
            continue
        if not kept:
            counts["rows_without_captions"] += 1
            continue
        resolved = resolve_image(rec.image_path, bases)
        if resolved is None:
            counts["rows_image_missing"] += 1
            counts["regions_missing"] += len(regions)
            continue
        counts["regions_missing"] += len(regions) - len(kept)
        counts["rows_exported"] += 1
        counts["regions_exported"] += len(kept)
        yield {**raw, "resolved_image": str(resolved)}, kept


def _records_file(run_dir: Path) -> Path:
    path = run_dir / CAPTIONS_FILE
    if not path.is_file():
        what = "only visualize.jsonl (run the caption stage first)" if (run_dir / VISUALIZE_FILE).is_file() \
            else "no records"
        raise ExportError(f"{run_dir} has no {CAPTIONS_FILE}: {what}")
    return path


# ------------------------------------------------------------------ hf / parquet
def _features(images: str) -> Any:
    import datasets

    region = {"id": datasets.Value("int32"), "source_index": datasets.Value("int32"),
              "source": datasets.Value("string"), "score": datasets.Value("float32"),
              "label": datasets.Value("string"),
              "bbox": datasets.Sequence(datasets.Value("float32")),
              "input_bbox": datasets.Sequence(datasets.Value("float32")),
              "caption": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string")),
              "flags": datasets.Sequence(datasets.Value("string"))}
    return datasets.Features({
        "id": datasets.Value("string"), "index": datasets.Value("int64"),
        "image": datasets.Image() if images == "embed" else datasets.Value("string"),
        "image_path": datasets.Value("string"),
        "image_size": datasets.Sequence(datasets.Value("int32")),
        "input_size": datasets.Sequence(datasets.Value("int32")),
        "status": datasets.Value("string"),
        # A list of structs (not Sequence(dict), which stores a struct of lists): one entry per region.
        "regions": [region],
    })


def _reads_back(data: bytes) -> bool:
    """Whether ``datasets``' ``Image`` feature decodes ``data`` when the row is read (its own decoder)."""
    import datasets

    try:
        datasets.Image().decode_example({"bytes": data, "path": None}).load()
        return True
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - any failure to decode means: not as stored
        return False


def embeddable_image(data: bytes) -> Optional[Tuple[bytes, bool]]:
    """``(bytes, reencoded)`` to embed for an image file's ``data``, or None when it cannot be read.

    The file's own bytes when ``datasets`` decodes them in full; else the pixels
    the pipeline decodes (:func:`regioncap.images.load_image`: RGB, EXIF
    orientation applied) re-encoded as PNG. A file can pass the pipeline and
    still fail a full decode: Pillow reads the chunks after the image data (a PNG
    text chunk that is a decompression bomb) only at the end of ``load()``.
    None when the pipeline cannot decode it either (the row is left out).
    """
    from regioncap.images import ImageLoadError, load_image

    if _reads_back(data):
        return data, False
    try:
        loaded = load_image(data)
    except ImageLoadError:
        return None
    buf = io.BytesIO()
    loaded.image.save(buf, format="PNG")
    out = buf.getvalue()
    return (out, True) if _reads_back(out) else None


def _hf_rows(records_file: str, references_key: Optional[str], images: str, counts_file: str,
             bases: str = "[]") -> Iterator[Dict[str, Any]]:
    """Rows of the ``hf``/``parquet`` export (a generator for ``Dataset.from_generator``;
    the counts go to ``counts_file``, as the generator may run in another process;
    ``bases``: the JSON list of :func:`image_bases`)."""
    counts: Counter = Counter()
    for rec, regions in exportable(read_jsonl(Path(records_file), torn=_torn(counts)), references_key, counts,
                                   [Path(b) for b in json.loads(bases)] or None):
        failpoint("export.row")
        path = rec["image_path"]
        image: Any = rec["resolved_image"]
        if images == "embed":
            try:
                got = embeddable_image(Path(rec["resolved_image"]).read_bytes())
            except OSError:
                got = None
            if got is None:
                counts["rows_image_unreadable"] += 1
                counts["rows_exported"] -= 1
                counts["regions_exported"] -= len(regions)
                counts["regions_missing"] += len(regions)
                continue
            counts["images_reencoded"] += int(got[1])
            # Bytes only, no path: datasets stores a path instead of the bytes whenever
            # that path names a file in the current folder (an export run from the images' folder).
            image = {"bytes": got[0], "path": None}
        yield {"id": str(rec.get("id")), "index": int(rec.get("index") or 0), "image": image, "image_path": path,
               "image_size": list(rec.get("image_size") or []), "input_size": list(rec.get("input_size") or []),
               "status": str(rec.get("status")), "regions": regions}
    # Plain json: datasets hashes this function with dill, which recurses forever into a
    # recursive global such as records.dumps; the counts are ints, read back by export_dataset only.
    Path(counts_file).write_text(json.dumps(counts), encoding="utf-8")


def _check_target(out: Path) -> None:
    """Refuse an ``--out`` that would replace a run's own file (its records, say) with the export."""
    owned = run_file_at(Path(out))
    if owned is not None:
        raise ExportError(f"--out {out} would write over {owned}, which a run wrote; export to a path of its own")


def export_dataset(run_dir: Path, out: Path, fmt: str, *, images: str = "embed",
                   references_key: Optional[str] = None, push_to_hub: Optional[str] = None) -> Dict[str, Any]:
    """Write the ``hf`` (``save_to_disk`` folder) or ``parquet`` (one file) export; returns the counts."""
    import datasets

    _check_target(out)
    records_file = _records_file(run_dir)
    settings = run_settings(run_dir)
    key = references_key if references_key is not None else settings["references_key"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    work, tmp = _beside(out, "work"), _beside(out, "tmp")
    work.mkdir()
    try:
        counts_file = work / "counts.json"
        features = _features(images)
        try:
            ds = datasets.Dataset.from_generator(
                _hf_rows, features=features, cache_dir=str(work / "cache"),
                gen_kwargs={"records_file": str(records_file), "references_key": key, "images": images,
                            "counts_file": str(counts_file),
                            # One string, not a list: datasets splits list arguments into shards.
                            "bases": json.dumps([str(b) for b in settings["image_bases"]])})
        except ValueError:
            counts = Counter(json.loads(counts_file.read_text())) if counts_file.is_file() else Counter()
            if counts["rows_exported"]:
                raise
            raise NothingToExport(dict(counts)) from None
        counts = Counter(json.loads(counts_file.read_text())) if counts_file.is_file() else Counter()
        if not counts["rows_exported"]:
            raise NothingToExport(dict(counts))
        if fmt == "hf":
            ds.save_to_disk(str(tmp))
        else:
            ds.to_parquet(str(tmp))
        failpoint("export.before_rename")
        if fmt == "hf" and out.is_dir():
            out.rmdir()  # an empty folder (main() refuses a non-empty one)
        os.replace(tmp, out)
        if push_to_hub:
            try:
                ds.push_to_hub(push_to_hub)
            except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds; all mean "not pushed"
                raise ExportError(
                    f"could not push to the Hugging Face hub repo {push_to_hub!r} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the export is "
                    f"written to {out}. Check network access to the hub (HF_ENDPOINT, HF_HUB_OFFLINE) and a "
                    f"token with write access (HF_TOKEN or `hf auth login`).") from exc
            counts["pushed_to"] = push_to_hub  # type: ignore[assignment]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _remove(tmp)
    return dict(counts)


def _beside(out: Path, what: str, pid: Optional[int] = None) -> Path:
    """``DIR/.NAME.WHAT-PID``: a work path beside ``out``, on its file system (so the rename is atomic)."""
    return out.with_name(f".{out.name}.{what}-{os.getpid() if pid is None else pid}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove what a killed export to ``out`` left beside it (its process is gone)."""
    for what in ("work", "tmp"):
        for path in out.parent.glob(f".{out.name}.{what}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove(path)


# ------------------------------------------------------------------ conversations
def grounding(region: Dict[str, Any], rec: Dict[str, Any], family: Any) -> Tuple[List[int], str]:
    """``(coords, text)`` of a region's box in the model family's grounding format
    (:meth:`~regioncap.families.base.Family.box_coords` / ``box_text`` of the image the model
    sees: the record's ``input_size``, the region's ``input_bbox``)."""
    size = tuple(int(v) for v in rec["input_size"])
    box = tuple(float(v) for v in region["input_bbox"])
    return family.box_coords(box, size), family.box_text(box, size)


def family_for(name: str, model: Optional[Dict[str, Any]] = None) -> Any:
    """The family object whose ``name`` is ``name``: the class the run's ``model`` section names when it
    is that family, else a shipped family of that name; :class:`ExportError` when there is none."""
    from regioncap.families.base import family_class, shipped_families

    try:
        cls = family_class(model) if model else None
    except Exception:  # noqa: BLE001 - the run's own class does not import here: a shipped one may do
        cls = None
    if cls is None or cls.name != name:
        cls = shipped_families().get(name)
    if cls is None:
        raise ExportError(f"no model family named {name!r} (known: {', '.join(sorted(shipped_families()))})")
    return cls()


def export_conversations(run_dir: Path, out: Path, *, references_key: Optional[str] = None,
                         family: Optional[str] = None) -> Dict[str, Any]:
    """Write one JSON line per captioned region (see the module docstring); returns the counts."""
    _check_target(out)
    records_file = _records_file(run_dir)
    settings = run_settings(run_dir)
    key = references_key if references_key is not None else settings["references_key"]
    family = family or settings["family"]
    family_obj = family_for(family, settings["model"])
    counts: Counter = Counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = _beside(out, "tmp")
    try:
        _write_conversations(tmp, records_file, key, family_obj, settings["image_bases"], counts)
        if not counts["lines"]:
            raise NothingToExport(dict(counts))
        failpoint("export.before_rename")
        os.replace(tmp, out)
    finally:
        _remove(tmp)
    return dict(counts)


def _write_conversations(tmp: Path, records_file: Path, key: Optional[str], family: Any, bases: Sequence[Path],
                         counts: Counter) -> None:
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec, regions in exportable(read_jsonl(records_file, torn=_torn(counts)), key, counts, bases):
            failpoint("export.row")
            for reg in regions:
                if len(reg["input_bbox"]) != 4 or len(rec.get("input_size") or []) != 2:
                    counts["regions_without_input_box"] += 1
                    continue
                coords, box_text = grounding(reg, rec, family)
                # A family with a region task of its own (Florence-2) is asked in it, as it was trained.
                question = family.region_prompt(tuple(float(v) for v in reg["input_bbox"]),
                                                tuple(int(v) for v in rec["input_size"]))
                image = rec["resolved_image"]
                line = {
                    "id": f"{rec.get('id')}/{reg['id']}", "row_id": rec.get("id"), "region_id": reg["id"],
                    "image": image, "image_size": rec.get("image_size"), "input_size": rec.get("input_size"),
                    "bbox": reg["bbox"], "bbox_2d": coords, "coords": family.name, "references": reg["references"],
                    "flags": reg["flags"],
                    "messages": [
                        {"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": question or QUESTION.format(box=box_text)}]},
                        {"role": "assistant", "content": [{"type": "text", "text": reg["caption"]}]},
                    ],
                }
                fh.write(dumps(line) + "\n")
                counts["lines"] += 1


# ------------------------------------------------------------------ CLI
def _torn(counts: Counter) -> Callable[[str], None]:
    """Count the torn tail of a killed run's records file: left out, and said in the summary."""
    def note(message: str) -> None:
        counts["torn_tail"] += 1

    return note


def summary(counts: Dict[str, Any], fmt: str, out: Path) -> str:
    """The printed summary of an export: what went in, what came out, what was left out and why."""
    c = Counter(counts)
    text = (f"export {fmt} -> {out}: {c['rows_exported']} of {c['rows_read']} rows, {c['regions_exported']} regions"
            + (f", {c['lines']} conversation lines" if fmt == "conversations" else "")
            + f"; left out: {c['rows_error']} error rows, {c['rows_without_captions']} rows without a caption, "
              f"{c['rows_image_missing']} rows whose image is gone, {c['regions_missing']} regions without a caption")
    if c["rows_image_unreadable"]:
        text += f", {c['rows_image_unreadable']} rows whose image cannot be decoded"
    if c["images_reencoded"]:
        text += f"; {c['images_reencoded']} images re-encoded as PNG (their file did not decode in full)"
    if c["regions_without_input_box"]:
        text += f", {c['regions_without_input_box']} regions without a model-input box"
    if c["torn_tail"]:
        text += ", the torn last line of a killed run (resume=true finishes that row)"
    if counts.get("pushed_to"):
        text += f"; pushed to the hub as {counts['pushed_to']}"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m regioncap.export``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m regioncap.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run dir (or a merged dir) holding captions.jsonl")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True,
                        help="hf: a folder; parquet: a .parquet file; conversations: a .jsonl file")
    parser.add_argument("--images", choices=("embed", "path"), default="embed",
                        help="hf/parquet: embed image bytes (an Image feature) or keep the path only")
    parser.add_argument("--references-key", default=None, help="row field with references (default: the run's)")
    from regioncap.families.base import shipped_families

    parser.add_argument("--family", choices=sorted(shipped_families()), default=None,
                        help="conversations: grounding coordinates (default: the family of the run's model)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="hf/parquet: also upload the dataset to this hub repo")
    args = parser.parse_args(argv)
    if args.push_to_hub and args.format == "conversations":
        parser.error("--push-to-hub works with --format hf or parquet")
    try:
        if args.out.exists() and args.format == "hf" and any(args.out.iterdir()):
            raise ExportError(f"{args.out} exists and is not empty: give a new folder")
        if args.format == "conversations":
            counts = export_conversations(args.run_dir, args.out, references_key=args.references_key,
                                          family=args.family)
        else:
            counts = export_dataset(args.run_dir, args.out, args.format, images=args.images,
                                    references_key=args.references_key, push_to_hub=args.push_to_hub)
    except NothingToExport as exc:
        print(f"error: {exc}; {summary(exc.counts, args.format, args.out)} (nothing written)", file=sys.stderr)
        return 1
    except (ExportError, CorruptRecordsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(counts, args.format, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
