"""``python -m regioncap [overrides]``: the Hydra entry point, and nothing else."""

import os
import sys

import hydra

from regioncap.config import register_configs

register_configs()


#: The configs shipped in the package: regioncap/conf, a link to the repository's top-level
#: conf/ in a checkout or an editable install, a copy of it in a wheel. An absolute path, so
#: Hydra reads it as a folder however regioncap was started (python -m, the regioncap command).
CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg):  # noqa: ANN001,ANN201 - Hydra passes a DictConfig
    from regioncap.job import run_job

    return run_job(cfg)


def main() -> None:
    """``regioncap [overrides]``; a sweep that went on past failed jobs still exits 1."""
    _main()
    from regioncap.callbacks import FAILED_JOBS

    if FAILED_JOBS:
        sys.exit(1)


if __name__ == "__main__":
    main()
