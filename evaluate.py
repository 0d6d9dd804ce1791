"""Evaluate: `python evaluate.py ckpt_path=outputs/<run>/checkpoints/best.ckpt` (see configs/evaluate.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from tunelab.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
