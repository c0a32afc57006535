"""Counting the samples the data pipeline skipped, per reason, and stopping a run whose data has gone bad."""

from __future__ import annotations

import logging
from collections import Counter, deque

import torch
from lightning import Callback

log = logging.getLogger(__name__)


class BadSampleRateExceeded(RuntimeError):
    """More of the training data is unusable than the run allows."""


class BadSampleGuard(Callback):
    """Logs `data/skipped/<reason>` (cumulative training samples skipped for each reason) and stops training with
    a report once the recent data is mostly bad: more than `max_fraction` of the run's last samples (each
    process's last `window`, summed), or more than `max_process_fraction` of one process's last `window` (a
    mount or decoder failing on one machine, which the run-wide rate of many machines hides).

    A few bad files are expected in real corpora and cost nothing but the sample; most samples failing means a
    wrong data root, a decoder that is missing or a broken mount, which no amount of training fixes. The rates are
    recent ones so that a mount dying late in a long run is caught as soon as one dying early; until a process has
    seen `window` samples, the ones it has not seen yet count as good, so that an outage early on weighs no more
    than the same outage later, and a fit of fewer samples is never stopped (its rate is said at its end).
    """

    def __init__(
        self,
        max_fraction: float = 0.2,
        window: int = 1000,
        max_process_fraction: float = 0.5,
    ) -> None:
        for name, value in (("max_fraction", max_fraction), ("max_process_fraction", max_process_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.max_fraction, self.max_process_fraction, self.window = max_fraction, max_process_fraction, window
        self.reasons: Counter[str] = Counter()  # this process's skips since the fit started
        self.examples: dict[str, list[str]] = {}
        self.seen = 0
        self.recent: deque[tuple[int, int]] = deque()  # (seen, skipped) of this process's latest batches
        self.recent_seen = self.recent_bad = 0
        # A resumed run's counts before it stopped: the whole run's (every process's, summed), added once to the
        # sum, and the first process's skips by reason. A checkpoint holds the first process's state alone, so
        # loading its own counts into every process would count them once per process.
        self.before: tuple[int, int] = (0, 0)
        self.before_reasons: Counter[str] = Counter()
        self._run: tuple[int, int] = (0, 0)  # the whole run's counts as last summed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        skipped = batch.get("skipped", [])
        seen = len(batch.get("ids", [])) + len(skipped)
        self.seen += seen
        for item in skipped:
            self.reasons[item["skip"]] += 1
            examples = self.examples.setdefault(item["skip"], [])
            example = f"{item['id']} ({item.get('path')}): {item['error']}"
            if len(examples) < 3 and example not in examples:  # a bad sample is met again each epoch: said once
                examples.append(example)
        self._remember(seen, len(skipped))
        if skipped:
            for reason, count in (self.before_reasons + self.reasons).items():
                pl_module.log(f"data/skipped/{reason}", float(count))
        problem = self._problem(self._gather(trainer, pl_module))
        if problem:
            raise BadSampleRateExceeded(self.report(problem))

    def _remember(self, seen: int, bad: int) -> None:
        """Keeps this process's latest batches that hold its last `window` samples."""
        self.recent.append((seen, bad))
        self.recent_seen, self.recent_bad = self.recent_seen + seen, self.recent_bad + bad
        while self.recent_seen - self.recent[0][0] >= self.window:
            old_seen, old_bad = self.recent.popleft()
            self.recent_seen, self.recent_bad = self.recent_seen - old_seen, self.recent_bad - old_bad

    def _gather(self, trainer, pl_module) -> torch.Tensor:
        """(processes, 4): each process's samples seen and skipped in the fit, then in its window; one collective,
        so that every process decides on the same numbers and all stop together."""
        own = torch.tensor(
            [[self.seen, sum(self.reasons.values()), self.recent_seen, self.recent_bad]],
            dtype=torch.float64,
            device=pl_module.device,
        )
        if trainer.world_size > 1:
            own = trainer.strategy.all_gather(own).reshape(-1, 4)
        counts = own.long().cpu()
        self._run = (int(counts[:, 0].sum()) + self.before[0], int(counts[:, 1].sum()) + self.before[1])
        return counts

    def _problem(self, counts: torch.Tensor) -> str:
        """What is over its limit in `counts` (from `_gather`), said in words; empty where nothing is."""
        seen, bad = counts[:, 2], counts[:, 3]
        if int(bad.sum()) > self.max_fraction * int(seen.clamp(min=self.window).sum()):
            return (
                f"{int(bad.sum())} of the run's last {int(seen.sum())} training samples were skipped, over the "
                f"allowed {self.max_fraction:.1%} (callbacks.bad_samples.max_fraction) of each process's last "
                f"{self.window} (callbacks.bad_samples.window)"
            )
        for rank, (own_seen, own_bad) in enumerate(zip(seen.tolist(), bad.tolist(), strict=True)):
            if own_bad > self.max_process_fraction * max(own_seen, self.window):
                return (
                    f"process {rank} skipped {own_bad} of its last {own_seen} training samples, over the allowed "
                    f"{self.max_process_fraction:.1%} of one process's last {self.window} "
                    "(callbacks.bad_samples.max_process_fraction): a data mount or decoder failing on its machine?"
                )
        return ""

    def on_train_end(self, trainer, pl_module) -> None:
        # a fit shorter than the window is never stopped: its rate is said at the end instead
        counts = self._gather(trainer, pl_module)
        seen, bad = (int(x) for x in counts[:, :2].sum(0))
        if 0 < seen and bad > self.max_fraction * seen and not self._problem(counts):
            log.warning(
                "%s\n(the fit saw too few samples to be stopped: callbacks.bad_samples.window=%d per process)",
                self.report(f"{bad} of the fit's {seen} training samples were skipped ({bad / seen:.1%})"),
                self.window,
            )

    def report(self, problem: str) -> str:
        """The problem, the run's counts since it began and, by reason, this process's skips with examples."""
        seen, bad = self._run
        lines = [
            f"{problem}. Since the run began: {bad} of {seen} skipped ({bad / max(seen, 1):.1%}). "
            "By reason, on this process:"
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
        self.recent.clear()
        self.recent_seen = self.recent_bad = 0
