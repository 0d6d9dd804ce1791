"""Talk to a trained run: `python generate.py adapter_path=outputs/<run>/adapter prompt="..."` (or chat=true, or
input=prompts.jsonl output=answers.jsonl; see configs/generate.yaml and src/tunelab/chat.py).

A config or data error ends it with one line on stderr, `error: <reason>`, and exit status 2
(tunelab.errors.one_line_errors); `HYDRA_FULL_ERROR=1 python generate.py ...` shows its full stack instead.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    from tunelab.chat import generate
    from tunelab.errors import one_line_errors

    with one_line_errors():
        generate(cfg)


if __name__ == "__main__":
    main()
