"""Evaluate: `python evaluate.py ckpt_path=outputs/<run>/checkpoints/best.ckpt` (see configs/evaluate.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from tunelab.errors import one_line_errors
    from tunelab.evaluate import evaluate

    with one_line_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
