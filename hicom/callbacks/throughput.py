"""What Lightning's ThroughputMonitor counts in one of our batches (configs/callbacks/default.yaml): its samples,
and its LLM tokens (text and visual, padding left out), so that the dashboards show `train/device/samples_per_sec`
and `train/device/items_per_sec` (tokens) over a window of micro-batches (all processes' under `train/` where there
are several)."""

from __future__ import annotations


def samples(batch: dict) -> int:
    """The batch's samples as read, those skipped as unreadable included: Lightning's count refuses a batch of none
    (a batch whose every sample was skipped would stop the run)."""
    return len(batch["ids"]) + len(batch.get("skipped") or ())


def tokens(batch: dict) -> int:
    """The LLM's tokens in the batch, the visual placeholders included, and one for each skipped sample: Lightning's
    count needs at least a token per sample it counted."""
    mask = batch.get("attention_mask")
    return (0 if mask is None else int(mask.sum())) + len(batch.get("skipped") or ())
