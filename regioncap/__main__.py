"""``python -m regioncap [overrides]``: the Hydra entry point, and nothing else."""

import os
import sys

from regioncap import quickexit

quickexit.arm()  # first: its exit handler runs after every other one

import hydra  # noqa: E402

from regioncap.config import register_configs  # noqa: E402

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
    """``regioncap [overrides]``; a sweep that went on past failed jobs still exits 1.

    Once the command is done the process ends without the interpreter's teardown
    (:mod:`regioncap.quickexit`).
    """
    from regioncap.config import RegionCapConfig
    from regioncap.suggest import print_suggestions

    # Before Hydra: its error for a misspelt group, option or key follows this line; a line Hydra
    # would only answer with a traceback (engine=null) ends the command here.
    if not print_suggestions(sys.argv[1:], CONF_DIR, RegionCapConfig):
        quickexit.done(1)
        sys.exit(1)
    try:
        _main()
    except SystemExit as exc:
        quickexit.done(quickexit.exit_code(exc.code))
        raise
    from regioncap.callbacks import FAILED_JOBS

    quickexit.done(1 if FAILED_JOBS else 0)
    if FAILED_JOBS:
        sys.exit(1)


if __name__ == "__main__":
    main()
