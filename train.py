"""Train: `python train.py [group=option ...] [key=value ...]` (see README and configs/train.yaml).

A config or data error (or a lost rank of a multi-process run) ends the run with one line on stderr,
`error: <reason>`, and exit status 2 (under -m, the job fails and the sweep goes on); `HYDRA_FULL_ERROR=1
python train.py ...` shows its full stack instead (tunelab.errors.one_line_errors, called by
tunelab.multirun.run_job).
"""

import os

# Idle OpenMP threads spin by default, which makes CPU step times swing 2.5-25 s; passive waiting is steady.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from tunelab.multirun import run_job

    return run_job(cfg)


if __name__ == "__main__":
    main()
