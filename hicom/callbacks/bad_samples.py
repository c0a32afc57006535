"""Counting the samples the data pipeline skipped, per reason, and stopping a run whose data is mostly bad."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from lightning import Callback

log = logging.getLogger(__name__)


class BadSampleRateExceeded(RuntimeError):
    """More of the training data is unusable than the run allows."""


class BadSampleGuard(Callback):
    """Logs `data/skipped/<reason>` (cumulative training samples skipped for each reason) and stops training with
    a report once, after at least `min_samples` samples, more than `max_fraction` of them were skipped.

    A few bad files are expected in real corpora and cost nothing but the sample; most samples failing means a
    wrong data root, a decoder that is missing or a broken mount, which no amount of training fixes.
    """

    def __init__(self, max_fraction: float = 0.2, min_samples: int = 200) -> None:
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        skipped = batch.get("skipped", [])
        self.seen += len(batch.get("ids", [])) + len(skipped)
        for item in skipped:
            self.reasons[item["skip"]] += 1
            examples = self.examples.setdefault(item["skip"], [])
            if len(examples) < 3:
                examples.append(f"{item['id']} ({item.get('path')}): {item['error']}")
        if skipped:
            for reason, count in self.reasons.items():
                pl_module.log(f"data/skipped/{reason}", float(count))
        seen, bad = self._counts(trainer, pl_module)
        if seen >= self.min_samples and bad > self.max_fraction * seen:
            raise BadSampleRateExceeded(self.report(seen, bad))

    def _counts(self, trainer, pl_module) -> tuple[int, int]:
        """Samples seen and skipped: the whole run's, the same on every process (so that all stop together)."""
        seen, bad = self.seen, sum(self.reasons.values())
        if trainer.world_size > 1:
            counts = torch.tensor([seen, bad], dtype=torch.float64, device=pl_module.device)
            seen, bad = (int(x) for x in trainer.strategy.reduce(counts, reduce_op="sum"))
        return seen, bad

    def on_train_end(self, trainer, pl_module) -> None:
        # a fit shorter than min_samples is never stopped: its rate is said at the end instead
        seen, bad = self._counts(trainer, pl_module)
        if 0 < seen < self.min_samples and bad > self.max_fraction * seen:
            log.warning(
                "%s\n(the fit saw fewer than callbacks.bad_samples.min_samples=%d samples, so it was not stopped)",
                self.report(seen, bad),
                self.min_samples,
            )

    def report(self, seen: int | None = None, bad: int | None = None) -> str:
        """The counts (of all processes where given) and, by reason, this process's skips with examples."""
        seen = self.seen if seen is None else seen
        bad = sum(self.reasons.values()) if bad is None else bad
        lines = [
            f"{bad} of {seen} training samples were skipped ({bad / max(seen, 1):.1%}), over the allowed "
            f"{self.max_fraction:.1%} (callbacks.bad_samples.max_fraction). By reason, on this process:"
        ]
        for reason, count in self.reasons.most_common():
            lines.append(f"  {reason}: {count}, e.g.")
            lines.extend(f"    {example}" for example in self.examples[reason])
        lines.append("Check data.source paths and the media folder, or run `python -m hicom.data.preflight`.")
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {"reasons": dict(self.reasons), "seen": self.seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reasons = Counter(state_dict.get("reasons", {}))
        self.seen = int(state_dict.get("seen", 0))
