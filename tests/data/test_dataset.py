import json
import shutil

from hicom.data.collate import Collator
from hicom.data.index import MixtureEntry, SampleIndex
from hicom.training import build


def test_missing_and_corrupt_videos_are_skipped_and_counted(cfg_small, tmp_path):
    model, datamodule = build(cfg_small)
    datamodule.prepare_data()
    splits = datamodule.source.prepare(datamodule.root)
    records = json.loads(splits.train_json.read_text())[:6]
    media = tmp_path / "media"
    shutil.copytree(splits.video_root, media)
    records[1]["video"] = "train/does_not_exist.mp4"
    (media / records[2]["video"]).write_bytes(b"\x00\x01garbage" * 50)
    records[3]["conversations"] = records[3]["conversations"][:1]
    (tmp_path / "train.json").write_text(json.dumps(records))
    datamodule.setup("fit")
    dataset = datamodule.train_set
    dataset.index = SampleIndex.build([MixtureEntry(tmp_path / "train.json", media)])
    items = [dataset[i] for i in range(len(records))]
    assert [item.get("skip") for item in items] == [None, "missing", "undecodable", "malformed", None, None]
    assert items[2]["source"] == [str(tmp_path / "train.json"), 2]
    assert "not found" in items[1]["error"]
    batch = datamodule.collate(items)
    assert [s["id"] for s in batch["skipped"]] == [records[i]["id"] for i in (1, 2, 3)]
    assert batch["input_ids"].shape[0] == 3
    assert batch["pixel_values"].shape[0] == batch["num_frames"].sum() == 3 * 8
    tokens = model.net.num_visual_tokens(8)
    assert ((batch["input_ids"] == model.net.llm.visual_token_id).sum(1) == tokens).all()


def test_generation_batches_pad_on_the_left(cfg_small):
    _, datamodule = build(cfg_small)
    datamodule.prepare_data()
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert batch["answers"][0] in "ABCD" and len(batch["options"][0]) == 4
    assert batch["guide_ids"].shape == (len(batch["ids"]), 32)


def test_an_all_skipped_batch_is_empty_not_an_error():
    batch = Collator(pad_token_id=0, guide_tokenizer=None)(
        [{"skip": "bad_video", "id": "x", "path": "p", "error": "e"}]
    )
    assert batch == {"skipped": [{"skip": "bad_video", "id": "x", "path": "p", "error": "e"}], "ids": []}
