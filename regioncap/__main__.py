"""``python -m regioncap [overrides]``: the Hydra entry point, and nothing else."""

import hydra

from regioncap.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):  # noqa: ANN001,ANN201 - Hydra passes a DictConfig
    from regioncap.job import run_job

    return run_job(cfg)


if __name__ == "__main__":
    main()
