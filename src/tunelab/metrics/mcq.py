"""Multiple-choice accuracy: the letter a generated answer states, and the option the model finds most likely.

For questions with options ``(letter_j, text_j)``, j = 1..K, and the right option ``a``:

- ``mcq_acc`` = #{questions whose generated answer parses (:func:`parse_choice`) to ``letter_a``} / #questions;
  an answer that names no option is wrong and counted in ``mcq_unparsed``.
- ``mcq_acc_ll`` = #{questions with ``argmax_j LL_j = a``} / #questions, where ``LL_j`` is the summed
  log-probability of option j's continuation given the prompt (the lm-evaluation-harness ``acc``), and
- ``mcq_acc_ll_norm`` the same with ``argmax_j LL_j / chars_j``, ``chars_j`` the length in characters of option
  j's response text (harness ``acc_norm``, which divides by the continuation's characters). Ties go to the first
  option (``argmax``).

What the continuation is (the tokens ``LL_j`` sums) is the caller's: the SFT task scores each option's response
as the assistant turn the model is trained to emit (:mod:`tunelab.data.choices`). Counts are kept as sums and
reduced across processes by summing before the division, so DDP ranks holding different numbers of questions
give the accuracy over all questions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from tunelab.data.tokenization import IGNORE_INDEX

# "Answer:", "The answer is", "Correct option:", ... before the letter
ANSWER_PREFIX = re.compile(r"(?:the\s+)?(?:correct\s+|right\s+)?(?:answer|option|choice)\b(?:\s+is)?\s*[:\-]?\s*", re.I)
# a letter that stands alone: "(B)", "[B]", "B)", or "B.", "B:", "B," before a space or the end, or "B" ending its line
BARE_LETTER = re.compile(r"[(\[]([a-z])[)\]]|([a-z])(?:\)|[.:,](?=\s|$)|[ \t]*(?:\n|$))", re.I)
# after an answer prefix, also a letter followed by a space: "Answer: B because ..."
PREFIXED_LETTER = re.compile(r"[(\[]?([a-z])(?=[\s.:,)\]]|$)", re.I)
COUNTS = ("total", "correct", "unparsed", "correct_ll", "correct_ll_norm")


def normalized(text: str) -> str:
    """Casefolded, whitespace collapsed, without a final full stop: the form option texts are compared in."""
    return " ".join(text.split()).casefold().removesuffix(".").strip()


def parse_choice(text: str, options: Sequence[tuple[str, str]]) -> str | None:
    """The option letter ``text`` states, or ``None`` when it names no option.

    Read leniently, at the start of the stripped text: an optional answer prefix (``Answer:``, ``The answer is``,
    ``Correct option:``, any case), then a letter standing alone (``B``, ``B.``, ``B)``, ``(B)``, ``[B]``, ``B:``;
    any case, so ``b) text`` is B; a letter followed by a space and more text counts only after a prefix, so the
    article in "A disease of ..." is not read as A). Without such a letter, the text (after the prefix, if any)
    equal to one option's text (:func:`normalized` forms) is that option. A stated letter decides even when the
    text after it is another option's; a letter that is not one of ``options`` names no option.
    """
    letters = {letter.upper(): letter for letter, _ in options}
    stripped = text.strip()
    prefix = ANSWER_PREFIX.match(stripped)
    rest = stripped[prefix.end() :] if prefix else stripped
    found = (PREFIXED_LETTER if prefix else BARE_LETTER).match(rest)
    if found:
        return letters.get(next(group for group in found.groups() if group).upper())
    by_text = {normalized(option): letter for letter, option in reversed(options)}
    return by_text.get(normalized(rest)) or by_text.get(normalized(stripped))


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_t log softmax(logits[b, t])[labels[b, t + 1]]`` over the positions whose label is not -100, per row
    ``b``, in float32: the log-probability of each row's supervised tokens given the tokens before them."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    token_nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -token_nll.view(targets.shape).sum(dim=1)


class MultipleChoiceMetrics(torch.nn.Module):
    """``{prefix}mcq_acc``, ``mcq_acc_ll``, ``mcq_acc_ll_norm`` and ``mcq_unparsed`` (see the module docstring).

    The state is one integer vector of counts (questions, right by the generated letter, unparsed, right by
    ``LL``, right by ``LL / chars``): a buffer that follows the module's device and stays out of checkpoints.
    """

    def __init__(self, prefix: str = "val/") -> None:
        super().__init__()
        self.prefix = prefix
        # integers: a precision plugin that casts floating buffers (bf16-true) leaves them exact
        self.register_buffer("counts", torch.zeros(len(COUNTS), dtype=torch.long), persistent=False)

    def update(
        self,
        predictions: Sequence[str],
        options: Sequence[Sequence[tuple[str, str]]],
        answers: Sequence[int],
        logprobs: torch.Tensor,
        chars: Sequence[int],
    ) -> None:
        """Count a batch of questions: per question its generated answer, its ``(letter, text)`` options and the
        index of the right one; per option, question after question, its summed log-probability ``LL_j``
        (``logprobs``, one value per option) and the length in characters of its response (``chars``)."""
        sizes = [len(question) for question in options]
        per_option = logprobs.detach().float()
        per_char = per_option / torch.tensor(chars, dtype=per_option.dtype, device=per_option.device)
        for prediction, question, answer, scores, normed in zip(
            predictions, options, answers, per_option.split(sizes), per_char.split(sizes), strict=True
        ):
            stated = parse_choice(prediction, question)
            counted = [
                1,
                stated == question[answer][0],
                stated is None,
                scores.argmax() == answer,
                normed.argmax() == answer,
            ]
            self.counts += torch.tensor([int(flag) for flag in counted], device=self.counts.device)

    def compute(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The metrics over the counts summed by ``reduce`` (across processes: the strategy's sum; ``None``: this
        process's alone); ``{}`` when no question was counted anywhere."""
        counts = reduce(self.counts.clone()) if reduce is not None else self.counts
        total, correct, unparsed, correct_ll, correct_ll_norm = counts.float().unbind()
        if total == 0:
            return {}
        return {
            f"{self.prefix}mcq_acc": correct / total,
            f"{self.prefix}mcq_acc_ll": correct_ll / total,
            f"{self.prefix}mcq_acc_ll_norm": correct_ll_norm / total,
            f"{self.prefix}mcq_unparsed": unparsed,
        }

    def reset(self) -> None:
        """Clear the counts."""
        self.counts.zero_()
