"""Validation metrics for generated text (BLEU, ROUGE) and next-token accuracy, built on torchmetrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nltk.stem.porter import PorterStemmer
from sacrebleu.metrics.bleu import BLEU
from torchmetrics import Metric
from torchmetrics.functional.text.rouge import _normalize_and_tokenize_text, _rouge_lsum_score, rouge_score
from torchmetrics.text import SacreBLEUScore

_ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_NON_LSUM = _ROUGE_KEYS[:3]


class _SacreBLEU(SacreBLEUScore):
    """torchmetrics ``SacreBLEUScore`` statistics, scored by sacrebleu's formula with its default smoothing.

    torchmetrics collects the corpus sufficient statistics (13a tokenization, clipped n-gram matches and
    counts, hypothesis and reference lengths; all sum-reduced under DDP). Its own ``compute`` has no 'exp'
    smoothing and returns 0 when any n-gram order has no match, where ``sacrebleu.corpus_bleu`` gives a small
    positive score. So the score is ``sacrebleu.BLEU.compute_bleu(..., smooth_method="exp")`` on the synced
    statistics, which equals ``sacrebleu.corpus_bleu(preds, [refs]).score`` (0-100 scale).
    """

    def compute(self) -> torch.Tensor:
        score = BLEU.compute_bleu(
            correct=[round(c) for c in self.numerator.tolist()],
            total=[round(t) for t in self.denominator.tolist()],
            sys_len=round(self.preds_len.item()),
            ref_len=round(self.target_len.item()),
            smooth_method="exp",
        ).score
        return torch.tensor(score, device=self.numerator.device)


class _RougeFMeasures(Metric):
    """Mean ROUGE-1/2/L/Lsum F-measures with Porter stemming, as ``RougeScorer(keys, use_stemmer=True)``.

    Scores come from torchmetrics' ROUGE functions, but not from its ``ROUGEScore`` module, for two reasons:

    - rougeLsum: ``ROUGEScore`` (torchmetrics 1.9) always splits sentences with ``nltk.sent_tokenize``, which
      needs the punkt_tab data (downloaded on first use, ``OSError`` offline), and takes no other splitter.
      rouge_score splits on newlines instead. Here each text is split on ``"\\n"`` (empty lines dropped, as
      rouge_score does), each line tokenized by torchmetrics' ROUGE tokenizer and scored by its union-LCS
      rougeLsum function; no NLTK data is needed.
    - DDP: ``ROUGEScore`` keeps one list entry per pair with ``dist_reduce_fx=None``, synced with one
      collective per entry, so ranks holding different numbers of pairs issue mismatched collectives (a crash
      on gloo, a hang on NCCL). Here the states are per-key F-measure sums and a pair count, sum-reduced.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.stemmer = PorterStemmer()
        self.add_state("fmeasure_sum", torch.zeros(len(_ROUGE_KEYS)), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def _sentence_tokens(self, text: str) -> list[Sequence[str]]:
        return [_normalize_and_tokenize_text(line, self.stemmer) for line in text.split("\n") if line]

    def update(self, preds: Sequence[str], target: Sequence[str]) -> None:
        """Add the F-measures of each (prediction, single reference) pair."""
        if not preds:
            return
        targets = [[ref] for ref in target]
        ngram_and_lcs = rouge_score(list(preds), targets, use_stemmer=True, rouge_keys=_NON_LSUM)
        lsum = sum(
            _rouge_lsum_score(self._sentence_tokens(pred), self._sentence_tokens(ref))["fmeasure"]
            for pred, ref in zip(preds, target, strict=True)
        )
        batch_sums = [ngram_and_lcs[f"{key}_fmeasure"] * len(preds) for key in _NON_LSUM] + [lsum]
        self.fmeasure_sum += torch.stack(batch_sums).to(self.fmeasure_sum)
        self.total += len(preds)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{key: sum of F-measures / number of pairs}`` over all processes."""
        return dict(zip(_ROUGE_KEYS, self.fmeasure_sum / self.total, strict=True))


class GenerationMetrics(torch.nn.Module):
    """BLEU (SacreBLEU, corpus level) and ROUGE-1/2/L/Lsum F-measures over generated answers.

    - ``bleu`` equals ``sacrebleu.corpus_bleu(preds, [refs]).score`` (tokenizer ``'13a'``, 0-100 scale):
      torchmetrics ``SacreBLEUScore`` statistics, final formula sacrebleu's (see ``_SacreBLEU``).
    - ``rouge1``/``rouge2``/``rougeL``/``rougeLsum`` equal the F-measures of
      ``rouge_score.rouge_scorer.RougeScorer(keys, use_stemmer=True)`` averaged over pairs, with rougeLsum
      sentences separated by newlines (rouge_score's default); torchmetrics' ROUGE functions compute them
      without NLTK data (see ``_RougeFMeasures`` for why not ``ROUGEScore``).

    Each prediction has exactly one reference; an empty prediction scores 0. The submodules are torchmetrics
    ``Metric`` objects whose states are all sum-reduced, so ``compute`` syncs across DDP processes (call it on
    every rank), also when ranks saw different numbers of pairs. Before any update ROUGE values are NaN.
    """

    def __init__(self, prefix: str = "val/") -> None:
        super().__init__()
        self.prefix = prefix
        self.bleu = _SacreBLEU(tokenize="13a")
        self.rouge = _RougeFMeasures()

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        """Accumulate a batch of generated answers, one reference string per prediction."""
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions but {len(references)} references (need one each)")
        self.bleu.update(predictions, [[ref] for ref in references])
        self.rouge.update(predictions, references)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{prefix}bleu`` in [0, 100]; ``{prefix}rouge1/2/L/Lsum``: mean F-measures in [0, 1]."""
        rouge = {f"{self.prefix}{key}": value for key, value in self.rouge.compute().items()}
        return {f"{self.prefix}bleu": self.bleu.compute(), **rouge}

    def reset(self) -> None:
        """Clear all accumulated state."""
        self.bleu.reset()
        self.rouge.reset()


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token accuracy with the causal shift: ``logits[:, t]`` predicts ``labels[:, t + 1]``.

    Returns ``mean(logits[:, :-1].argmax(-1) == labels[:, 1:])`` over positions where
    ``labels[:, 1:] != ignore_index``, as a 0-dim float tensor; 0.0 if no position is supervised.
    ``logits`` is ``(batch, seq, vocab)``, ``labels`` is ``(batch, seq)``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} + (vocab,)")
    predictions = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    supervised = targets != ignore_index
    correct = (predictions == targets) & supervised
    return correct.sum().float() / supervised.sum().clamp(min=1)


class GeneratedLabelMetrics(torch.nn.Module):
    """Accuracy and macro-F1 of the label a generated answer states on its ``"<field>: <label>"`` line.

    The label is read from the first line that starts with ``field + ":"`` (case-insensitive label match) in
    the prediction and in the reference. A prediction stating no label of the set is wrong: it is class C
    (one past the C labels) for torchmetrics, counted in ``{prefix}label_unparsed``, and macro-F1 averages
    the F1 of the C real labels only (as ``sklearn.metrics.f1_score(average="macro", labels=range(C))``).
    """

    def __init__(self, labels: Sequence[str], field: str, prefix: str = "val/") -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.labels, self.field, self.prefix = [label.lower() for label in labels], field.lower(), prefix
        classes = len(self.labels) + 1
        self.accuracy = MulticlassAccuracy(classes, average="micro")
        self.class_f1 = MulticlassF1Score(classes, average="none")

    def label_index(self, text: str) -> int:
        """Index of the stated label, or C when the text states none of the set."""
        for line in text.splitlines():
            name, colon, value = line.partition(":")
            if colon and name.strip().lower() == self.field:
                stated = value.strip().rstrip(".").lower()
                return self.labels.index(stated) if stated in self.labels else len(self.labels)
        return len(self.labels)

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        predicted = torch.tensor([self.label_index(p) for p in predictions], device=self.accuracy.device)
        target = torch.tensor([self.label_index(r) for r in references], device=self.accuracy.device)
        if (target == len(self.labels)).any():
            raise ValueError(f"a reference states no '{self.field}: <label>' line of {self.labels}")
        self.accuracy.update(predicted, target)
        self.class_f1.update(predicted, target)

    def compute(self) -> dict[str, torch.Tensor]:
        predicted_per_class = self.class_f1.tp + self.class_f1.fp
        return {
            f"{self.prefix}label_acc": self.accuracy.compute(),
            f"{self.prefix}label_macro_f1": self.class_f1.compute()[:-1].mean(),
            f"{self.prefix}label_unparsed": predicted_per_class[-1].float(),
        }

    def reset(self) -> None:
        self.accuracy.reset()
        self.class_f1.reset()
