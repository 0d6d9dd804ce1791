"""Can a scalar head on SmolLM2-135M-Instruct's hidden states tell the right arithmetic answer from a near miss?

Linear probes on the frozen model (the reward model before training: LoRA's B is 0, so its hidden states are the
base model's): for every layer and three positions of each reply, a logistic regression on the difference of the
chosen and the rejected reply's hidden state (Bradley-Terry with a linear head is exactly that, without
intercept), fitted on the 800 training pairs and scored on the 200 test pairs that ``task=reward`` uses. Beside
it, the model's own ranking: ``log p(chosen) > log p(rejected)`` (DPO's starting point).

Positions (``... <|im_start|>assistant\\n 1 7 <|im_end|> \\n``): ``answer`` the last answer token, ``im_end`` the
end-of-turn token, ``last`` the final ``\\n``, which is where transformers' sequence-classification head reads
(the last token that is not the pad token; SmolLM2 pads with ``<|im_end|>``).

    python experiments/alignment/reward_probe.py [--out experiments/alignment/reward_probe.json]

Why our own code: a probe is twenty lines of scikit-learn on hidden states; no library runs it on tunelab's
pair batches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from sklearn.linear_model import LogisticRegression

from tunelab.atomic import write_text
from tunelab.build import build_components
from tunelab.tasks.preference_losses import sequence_logps

ROOT = Path(__file__).resolve().parents[2]
POSITIONS = {"answer": 3, "im_end": 2, "last": 1}  # counted back from the end of the reply's tokens
STRENGTHS = (0.001, 0.01, 0.1)  # inverse L2 strengths tried per probe


def features(model: torch.nn.Module, loader, im_end: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per position: chosen - rejected hidden states [pairs, layers + 1, hidden]; and the log-prob margin [pairs]
    (``im_end``: the end-of-turn token id, checked to sit where :data:`POSITIONS` says)."""
    diffs: dict[str, list[np.ndarray]] = {name: [] for name in POSITIONS}
    margins = []
    for batch in loader:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hidden = torch.stack(out.hidden_states, dim=1)  # [2B, layers + 1, T, H]
        ends = batch["attention_mask"].sum(-1)
        rows = torch.arange(hidden.shape[0])
        if not bool((batch["input_ids"][rows, ends - POSITIONS["im_end"]] == im_end).all()):
            raise RuntimeError("a reply does not end in <|im_end|> \\n: the positions would be wrong")
        for name, back in POSITIONS.items():
            h = hidden[rows, :, ends - back]  # [2B, layers + 1, H]
            half = h.shape[0] // 2
            diffs[name].append((h[:half] - h[half:]).float().numpy())
        sums = sequence_logps(out.logits.float(), batch["labels"])
        half = sums.shape[0] // 2
        margins.append((sums[:half] - sums[half:]).numpy())
    return {name: np.concatenate(parts) for name, parts in diffs.items()}, np.concatenate(margins)


def probe_accuracy(train: np.ndarray, test: np.ndarray) -> float:
    """Test share of pairs with ``w . (h_c - h_r) > 0``, ``w`` an L2 logistic regression on the training pairs and
    their mirror images; its strength from :data:`STRENGTHS` by accuracy on the last fifth of the training pairs."""
    scale = np.concatenate([train, -train]).std(0) + 1e-6  # the mirror makes the mean 0: scaling only
    train, test = train / scale, test / scale

    def fit(pairs: np.ndarray, strength: float) -> LogisticRegression:
        x = np.concatenate([pairs, -pairs])
        y = np.concatenate([np.ones(len(pairs)), np.zeros(len(pairs))])
        return LogisticRegression(C=strength, fit_intercept=False, max_iter=500).fit(x, y)

    cut = len(train) * 4 // 5
    best = max(STRENGTHS, key=lambda c: (fit(train[:cut], c).decision_function(train[cut:]) > 0).mean())
    return float((fit(train, best).decision_function(test) > 0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "experiments/alignment/reward_probe.json"))
    parser.add_argument("--features", default="/tmp/reward_probe_features.npz", help="hidden states, kept for reruns")
    args = parser.parse_args()
    torch.manual_seed(0)
    if not Path(args.features).exists():
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["task=dpo", "paths.output_dir=/tmp/reward_probe"])
        built = build_components(cfg)  # LoRA's B = 0: the base model's hidden states and log-probs
        model, data, eos = built["model"].eval(), built["datamodule"], built["tokenizer"].eos_token_id
        data.setup("fit")
        splits = {split: features(model, data.ordered_loader(split), eos) for split in ("train", "test")}
        arrays = {f"{split}_{name}": value for split, (diffs, _) in splits.items() for name, value in diffs.items()}
        np.savez(args.features, **arrays, **{f"{split}_margin": margin for split, (_, margin) in splits.items()})
    saved = np.load(args.features)
    train = {name: saved[f"train_{name}"] for name in POSITIONS}
    test = {name: saved[f"test_{name}"] for name in POSITIONS}
    train_margin, test_margin = saved["train_margin"], saved["test_margin"]
    results: dict[str, Any] = {
        "pairs": {"train": len(train_margin), "test": len(test_margin)},
        "logprob_ranking": {"train": float((train_margin > 0).mean()), "test": float((test_margin > 0).mean())},
    }
    for position in POSITIONS:
        layers = train[position].shape[1]
        results[position] = [probe_accuracy(train[position][:, i], test[position][:, i]) for i in range(layers)]
        best = int(np.argmax(results[position]))
        print(f"{position}: best test accuracy {results[position][best]:.3f} at layer {best}", flush=True)
    print("log-prob ranking", results["logprob_ranking"], flush=True)
    write_text(Path(args.out), json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
