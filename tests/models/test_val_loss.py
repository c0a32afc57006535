"""val/loss: the held-out set's mean loss per labelled token, as a training step's loss is a micro-batch's."""

import pytest
import torch
import torch.nn.functional as F

from hicom.data.template import IGNORE_INDEX


def test_val_loss_is_the_token_mean_of_the_held_out_set_whatever_the_batch_size(cfg_small):
    """Samples of 3, 1, 2 and 3 labelled tokens: val/loss is the sum of every labelled token's cross-entropy over
    their count, computed here sample by sample from the logits, at held-out batches of 1, 2 and 4 alike (each
    batch's mean weighed by its samples gave three values, up to 0.3% apart)."""
    from hicom.training import build

    model, datamodule = build(cfg_small)
    datamodule.setup("fit")
    model.eval()
    items = [datamodule.val_set[i] for i in range(4)]
    for item, keep in zip(items, (3, 1, 2, 3), strict=True):  # the answer's first tokens unsupervised
        labelled = (item["labels"] != IGNORE_INDEX).nonzero().flatten()
        assert len(labelled) >= keep
        item["labels"][labelled[: len(labelled) - keep]] = IGNORE_INDEX
    total, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            batch = datamodule.collate([item])
            embeds = model.net.llm.embed(batch["input_ids"], model.net.encode_visual(batch))
            logits = model.net.llm.model(inputs_embeds=embeds).logits[0, :-1]  # the HF model's, at every position
            labels = batch["labels"][0, 1:]  # each token predicts the next
            total += F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    assert count == 9

    logged = {}
    model.log = lambda name, value, **options: logged.update({name: float(value)})

    def val_loss(batch_size: int) -> float:
        model.on_validation_epoch_start()
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                model.validation_step(datamodule.collate(items[start : start + batch_size]), start // batch_size)
        model.on_validation_epoch_end()
        return logged.pop("val/loss")

    assert [val_loss(size) for size in (1, 2, 4)] == pytest.approx([total / count] * 3, rel=1e-5)
