"""Where a model's files come from.

``resolve_model_path`` turns ``model.path`` into a local folder: it builds the
offline tiny model when asked, accepts a local folder, or finds a hub id in
the local Hugging Face cache, downloading it only when the hub answers quickly.
It never hangs on an unreachable hub: it fails in seconds with a message that
says how to fix it.

No heavy imports at module import time (``huggingface_hub`` and
``regioncap.tiny`` are imported inside the functions that need them). Config
fixes of Qwen-VL model folders are in :mod:`regioncap.qwen`; what differs between model
families in :mod:`regioncap.families`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from regioncap.engines.base import EngineError

if TYPE_CHECKING:
    from regioncap.families.base import Family

log = logging.getLogger(__name__)

#: Seconds allowed for the hub to answer a metadata request before giving up.
HUB_TIMEOUT_S = 10.0

_TRUE = {"1", "on", "yes", "true"}
# owner/name as the hub spells them (letters, digits, '-', '_', '.'), one slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _hub_offline() -> bool:
    # Read the environment at call time: huggingface_hub reads HF_HUB_OFFLINE once
    # at import, so a change made later in the process would go unnoticed.
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _fix_hint(repo_id: str) -> str:
    return (
        f"To fix it: download the model where the hub is reachable "
        f"(`hf download {repo_id}`; older huggingface_hub: `huggingface-cli download {repo_id}`) so it is in the local "
        f"Hugging Face cache (HF_HOME); or point model.path at a local model folder "
        f"(`model.path=/local/dir`); or run offline with the tiny model (`model=tiny`)."
    )


def _check_local_dir(path: Path) -> str:
    if not (path / "config.json").is_file():
        raise EngineError(
            f"model folder {path} has no config.json, so it is not a model folder; "
            f"set model.path to a folder holding config.json and the weights"
        )
    return str(path)


def resolve_model_path(model_cfg: Family.Config) -> str:
    """Return the absolute local folder of the model ``model_cfg`` names.

    - ``builder: tiny``: build the model family's offline tiny model (``Family.build_tiny``)
      into ``model_cfg.path`` when that folder is missing or incomplete, then return it.
    - ``path`` is an existing folder: return it (it must hold ``config.json``).
    - otherwise ``path`` is a hub id: return its snapshot in the local Hugging
      Face cache (at ``model_cfg.revision``), or download it when the hub
      answers within a few seconds. Raise :class:`EngineError` with a fix-it
      message when neither works.
    - ``weights: random`` (and no builder): the folder's weights are never
      read, so nothing is downloaded: a local folder or a cached snapshot is
      used for its config and tokenizer, else the published architecture kept
      in ``regioncap/archs`` is built into the regioncap cache
      (``regioncap.random_weights.resolve_random``).
    """
    path_str = str(model_cfg.path)
    builder = getattr(model_cfg, "builder", None)
    from regioncap import random_weights

    try:
        want_random = random_weights.is_random(model_cfg)
    except ValueError as exc:
        raise EngineError(str(exc)) from exc
    if want_random and not builder:
        log.warning(random_weights.WARNING)
        return random_weights.resolve_random(model_cfg)
    if builder:
        if builder != "tiny":
            raise EngineError(f"unknown model.builder {builder!r}; the only builder is 'tiny' (or null)")
        from regioncap.families.base import family_class

        family = family_class(model_cfg)
        out = Path(path_str).expanduser().absolute()
        try:
            return str(family.build_tiny(out))
        except NotImplementedError as exc:
            raise EngineError(f"model.builder=tiny: {exc}") from None

    if path_str.startswith("pkg://"):  # a model folder shipped inside an installed package
        from regioncap.data import resolve_path

        local = resolve_path(path_str)
        if not local.is_dir():
            raise EngineError(f"model.path {path_str} points to {local}, which is not a folder: the package "
                              f"was installed without its model files; reinstall it from the repository")
        return _check_local_dir(local.absolute())
    local = Path(path_str).expanduser()
    if local.is_dir():
        return _check_local_dir(local.absolute())
    if local.exists():
        raise EngineError(f"model.path {path_str} is a file; it must be a model folder or a hub id")
    if not _HUB_ID.match(path_str):
        raise EngineError(
            f"model folder {path_str} does not exist (and it is not a hub id like 'Qwen/Qwen2.5-VL-3B-Instruct'); "
            f"set model.path to an existing model folder, or use model=tiny for the offline model"
        )
    return _resolve_hub_id(path_str, getattr(model_cfg, "revision", None))


def _resolve_hub_id(repo_id: str, revision: Optional[str]) -> str:
    from huggingface_hub import snapshot_download

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
        log.info("using %s%s from the local Hugging Face cache: %s", repo_id, at, folder)
        return _check_local_dir(Path(folder))
    except EngineError:
        raise
    except Exception as exc:  # not cached (LocalEntryNotFoundError) or a broken cache entry
        log.debug("%s%s is not in the local cache: %s", repo_id, at, exc)

    if _hub_offline():
        raise EngineError(
            f"model {repo_id}{at} is not in the local Hugging Face cache and the hub is off "
            f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set). " + _fix_hint(repo_id)
        )

    from huggingface_hub import model_info

    # Ask the hub for the model's metadata with a short timeout first: an
    # unreachable hub fails here in seconds, where a download could retry for long.
    try:
        model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as exc:
        if type(exc).__name__ in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise EngineError(
                f"the hub has no model {repo_id}{at} that this machine may read ({type(exc).__name__}); "
                f"check the id and revision, or log in (`hf auth login`) for a private or gated model. "
                + _fix_hint(repo_id)
            ) from exc
        raise EngineError(
            f"model {repo_id}{at} is not in the local Hugging Face cache and the hub could not be asked "
            f"for it ({type(exc).__name__}: {exc}). " + _fix_hint(repo_id)
        ) from exc
    log.info("downloading %s%s from the Hugging Face hub", repo_id, at)
    try:
        folder = snapshot_download(repo_id, revision=revision, etag_timeout=HUB_TIMEOUT_S)
    except Exception as exc:
        raise EngineError(
            f"downloading model {repo_id}{at} failed ({type(exc).__name__}: {exc}). " + _fix_hint(repo_id)
        ) from exc
    return _check_local_dir(Path(folder))
