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
        self.reasons: Counter[str] = Counter()  # this process's skips since the fit started
        self.examples: dict[str, list[str]] = {}
        self.seen = 0
        # A resumed run's counts before it stopped: the whole run's (every process's, summed), added once to the
        # sum, and the first process's skips by reason. A checkpoint holds the first process's state alone, so
        # loading its own counts into every process would count them once per process.
        self.before: tuple[int, int] = (0, 0)
        self.before_reasons: Counter[str] = Counter()
        self._run: tuple[int, int] = (0, 0)  # the whole run's counts as last summed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        skipped = batch.get("skipped", [])
        self.seen += len(batch.get("ids", [])) + len(skipped)
        for item in skipped:
            self.reasons[item["skip"]] += 1
            examples = self.examples.setdefault(item["skip"], [])
            if len(examples) < 3:
                examples.append(f"{item['id']} ({item.get('path')}): {item['error']}")
        if skipped:
            for reason, count in (self.before_reasons + self.reasons).items():
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
        self._run = (seen + self.before[0], bad + self.before[1])
        return self._run

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
        for reason, count in (self.before_reasons + self.reasons).most_common():
            lines.append(f"  {reason}: {count}, e.g.")
            lines.extend(f"    {example}" for example in self.examples.get(reason, ["(before the resume)"]))
        lines.append("Check data.source paths and the media folder, or run `python -m hicom.data.preflight`.")
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {
            "reasons": dict(self.before_reasons + self.reasons),
            "run_seen": self._run[0],
            "run_bad": self._run[1],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.before_reasons = Counter(state_dict.get("reasons", {}))
        if "run_seen" in state_dict:
            self.before = (int(state_dict["run_seen"]), int(state_dict["run_bad"]))
        else:  # an older checkpoint: the first process's counts, the best there is
            self.before = (int(state_dict.get("seen", 0)), sum(self.before_reasons.values()))
        self._run = self.before
        self.reasons, self.seen = Counter(), 0
