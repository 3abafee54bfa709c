"""The real published architectures with random weights (``model.weights=random``).

No weights file and no model hub are needed: ``regioncap/archs/<name>/`` keeps
the published ``config.json`` and ``preprocessor_config.json`` of each
supported checkpoint (each model family lists its own: ``Family.archs``), and
:func:`build_arch_folder` turns one into a model folder that transformers and
vLLM load (with the family's offline tokenizer and chat template,
``Family.write_arch_files``; see ``regioncap/archs/README.md`` for what differs). The
engines then build the weights themselves: vLLM with ``load_format="dummy"``,
transformers from the config.

Everything a random-weight run writes must say so: :data:`WARNING` is the log
line, :func:`describe` the manifest/metrics fields.

Only the standard library (and :mod:`regioncap.qwen`, itself standard library
only) at import time; the families and ``regioncap.tiny`` (tokenizers) are imported when needed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from regioncap.qwen import patched_config_dict

if TYPE_CHECKING:
    from regioncap.families.base import Family

log = logging.getLogger(__name__)

#: Values of ``model.weights``.
WEIGHTS = ("real", "random")

ARCHS_DIR = Path(__file__).resolve().parent / "archs"

#: Bump when a built folder's content changes; a folder with another version is rebuilt.
BUILDER_VERSION = 1
MARKER = "regioncap_random_arch.json"

#: The log line every random-weight run prints (as a WARNING).
WARNING = ("model.weights=random: the model has RANDOM WEIGHTS (real architecture, no trained weights); "
           "its captions are noise and its scores mean nothing. Use it for throughput, memory and "
           "token-budget checks only")

#: Qwen's special tokens start here in the real tokenizer (``<|endoftext|>``).
QWEN_FIRST_SPECIAL_ID = 151643


def check_weights(value: Any) -> str:
    """``model.weights`` validated (``real`` or ``random``); a clear error otherwise."""
    v = str(value).strip().lower()
    if v not in WEIGHTS:
        raise ValueError(f"model.weights={value!r} is not one of {', '.join(WEIGHTS)}")
    return v


def is_random(model_cfg: Family.Config) -> bool:
    """True when ``model_cfg`` asks for random weights (``model.weights=random``)."""
    return check_weights(getattr(model_cfg, "weights", "real") or "real") == "random"


def describe(model_cfg: Any) -> Dict[str, Any]:
    """Fields for the run manifest and metrics.json: ``{"model_weights": "random"|"real"}``."""
    return {"model_weights": "random" if is_random(model_cfg) else "real"}


def archs() -> Dict[str, Tuple[str, type]]:
    """``{hub id: (folder under regioncap/archs, family class)}`` of every shipped family's published
    architectures (``Family.archs``)."""
    from regioncap.families.base import shipped_families

    return {hub: (folder, cls) for cls in shipped_families().values() for hub, folder in cls.archs.items()}


def arch_name(path: str) -> Optional[str]:
    """The ``regioncap/archs`` folder name for a hub id or an arch name, or None."""
    known = archs()
    if path in known:
        return known[path][0]
    if (ARCHS_DIR / path / "config.json").is_file():
        return path
    return None


def arch_family(arch: str) -> Optional[type]:
    """The family class whose published architectures include the folder ``arch``, or None."""
    return next((cls for folder, cls in archs().values() if folder == arch), None)


def padded_tokenizer(folder: Path, **tokenizer: Any) -> None:
    """Write regioncap's offline tokenizer into ``folder`` with Qwen's special tokens at their real ids
    (``tokenizer``: the chat template and processor class it names, see :func:`regioncap.tiny.write_tokenizer`).

    The trained byte-level BPE (``regioncap.tiny``) is padded with filler
    vocabulary entries that no merge produces (so encoding is unchanged) up to
    151643, then Qwen's added tokens follow in their real order.
    """
    from regioncap import tiny

    tiny.write_tokenizer(folder, **tokenizer)
    tok_path = folder / "tokenizer.json"
    data = json.loads(tok_path.read_text(encoding="utf-8"))
    first_added = min(t["id"] for t in data["added_tokens"])
    tiny.fill_vocab(data["model"]["vocab"], QWEN_FIRST_SPECIAL_ID)
    if len(data["model"]["vocab"]) != QWEN_FIRST_SPECIAL_ID:  # pragma: no cover - the alphabet is 256 characters
        raise RuntimeError(f"could not pad the tokenizer to {QWEN_FIRST_SPECIAL_ID} tokens")
    shift = QWEN_FIRST_SPECIAL_ID - first_added
    for t in data["added_tokens"]:
        t["id"] += shift
    tok_path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tcfg["added_tokens_decoder"] = {str(int(k) + shift): v for k, v in tcfg["added_tokens_decoder"].items()}
    tcfg["model_max_length"] = 131072
    cfg_path.write_text(json.dumps(tcfg, indent=2), encoding="utf-8")


def is_complete(out_dir: Path, name: str) -> bool:
    """True when ``out_dir`` is a finished build of arch ``name`` by this builder version."""
    try:
        marker = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("arch") == name and marker.get("builder_version") == BUILDER_VERSION


def build_arch_folder(name: str, out_dir: str | Path) -> Path:
    """Build (once) a weightless model folder of the published architecture ``name`` into ``out_dir``.

    ``name`` is a folder of ``regioncap/archs`` or a hub id a family lists (:func:`archs`).
    The folder holds config.json (published values, rope spelling fixed),
    preprocessor_config.json, the family's offline tokenizer and chat
    template (``Family.write_arch_files``), and no weights. Atomic (built next to ``out_dir``, then moved in)
    and idempotent (a complete folder is reused).
    """
    arch = arch_name(name)
    if arch is None:
        raise ValueError(f"no published architecture {name!r} in regioncap/archs; known: {sorted(archs())}")
    family = arch_family(arch)
    if family is None:
        raise ValueError(f"regioncap/archs/{arch} belongs to no model family (no family lists it in its archs)")
    out = Path(out_dir).expanduser().absolute()
    if is_complete(out, arch):
        return out
    src = ARCHS_DIR / arch
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        config = patched_config_dict(config) or config
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        shutil.copyfile(src / "preprocessor_config.json", tmp / "preprocessor_config.json")
        family.write_arch_files(tmp)
        source = next((k for k, (v, _cls) in archs().items() if v == arch), arch)
        (tmp / MARKER).write_text(json.dumps({"arch": arch, "source": source, "builder_version": BUILDER_VERSION,
                                              "weights": "none (random: build them in the engine)"}, indent=2),
                                  encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is shared like any cache entry
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built the weightless %s folder (published config of %s) in %s", arch, source, out)
    return out


def cache_dir() -> Path:
    """Where built architecture folders live: ``$REGIONCAP_CACHE`` or ``~/.cache/regioncap``."""
    return Path(os.environ.get("REGIONCAP_CACHE") or Path.home() / ".cache" / "regioncap")


def resolve_random(model_cfg: Family.Config) -> str:
    """The model folder for a ``model.weights=random`` run.

    A local folder in ``model.path`` is used as it is (its config, tokenizer and
    processor; its weights file, if any, is not read). A hub id that is in the
    local Hugging Face cache uses that snapshot's files. Otherwise a hub id or
    arch name kept in ``regioncap/archs`` is built into the regioncap cache
    without asking the hub (random weights need nothing from it).
    """
    from regioncap.engines.base import EngineError

    path_str = str(model_cfg.path)
    local = Path(path_str).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        return str(local.absolute())
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(path_str, revision=getattr(model_cfg, "revision", None), local_files_only=True)
        if (Path(folder) / "config.json").is_file():
            log.info("model.weights=random: using the config and tokenizer of %s from the local cache", path_str)
            return str(folder)
    except Exception:  # not cached, or not a hub id: fall through to the kept architectures
        pass
    arch = arch_name(path_str)
    if arch is None:
        raise EngineError(
            f"model.weights=random: {path_str} is neither a local model folder, nor in the local Hugging Face "
            f"cache, nor one of the architectures kept in regioncap/archs ({', '.join(sorted(archs()))})"
        )
    return str(build_arch_folder(arch, cache_dir() / f"arch-{arch}-v{BUILDER_VERSION}"))
