"""What Lightning's ThroughputMonitor counts in one of our batches (configs/callbacks/default.yaml): its samples,
and its LLM tokens (text and visual, padding left out), so that the dashboards show `train/device/samples_per_sec`
and `train/device/items_per_sec` (tokens) over a window of micro-batches (all processes' under `train/` where there
are several)."""

from __future__ import annotations


def samples(batch: dict) -> int:
    """The batch's usable samples (those skipped as unreadable are not in `ids`)."""
    return len(batch["ids"])


def tokens(batch: dict) -> int:
    """The LLM's tokens in the batch, the visual placeholders included: 0 where every sample was skipped."""
    mask = batch.get("attention_mask")
    return 0 if mask is None else int(mask.sum())
