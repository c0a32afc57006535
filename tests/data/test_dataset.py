import json
import shutil

import pytest

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


def test_validation_is_split_per_exchange_like_training_and_the_test_asks_the_last_question(tiny_paths, tmp_path):
    """A guided model's validation loss is measured as it trains: each answer under its own question's guide."""
    import json

    from hicom.data.datamodule import JsonSource, VideoQADataModule

    turns = [{"from": "human", "value": "<video>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "How many cubes?"}, {"from": "gpt", "value": "Two."}]  # fmt: skip
    (tmp_path / "media").mkdir()
    (tmp_path / "a.json").write_text(json.dumps([{"id": "c", "video": "c.mp4", "conversations": turns}]))
    source = JsonSource(str(tmp_path / "a.json"), str(tmp_path / "media"), val_json=str(tmp_path / "a.json"))
    datamodule = VideoQADataModule(
        source=source, root=str(tmp_path), llm_path=str(tiny_paths["qwen2"]), vision_path=str(tiny_paths["siglip"]),
        visual_tokens=lambda frames, modality: 3 * frames, guided=True, num_workers=0,
    )  # fmt: skip
    datamodule.setup("fit")
    for dataset in (datamodule.train_set, datamodule.val_set):
        index = dataset.index
        assert [(index.record_of(i)["id"], index.turn_of(i)) for i in range(len(index))] == [("c", 0), ("c", 1)]
    test = datamodule.test_set.index
    assert len(test) == 1 and test.turn_of(0) is None  # the whole conversation: its last question is asked


def test_a_held_out_file_reads_its_media_from_its_own_folder(tmp_path):
    """data=llava_json had one media folder for both files: a held-out set stored elsewhere had every clip missing
    (accuracy 0 over n_failed questions). `val_data_root` names its folder; without it, data_root serves both."""
    from hicom.data.datamodule import JsonSource

    for name in ("train", "held_out"):
        (tmp_path / name).mkdir()
    (tmp_path / "a.json").write_text("[]")
    source = JsonSource(str(tmp_path / "a.json"), str(tmp_path / "train"), val_json=str(tmp_path / "a.json"))
    assert source.check().val[0].data_root == tmp_path / "train"
    apart = JsonSource(**{**source.__dict__, "val_data_root": str(tmp_path / "held_out")}).check()
    assert (apart.train[0].data_root, apart.val[0].data_root) == (tmp_path / "train", tmp_path / "held_out")
    with pytest.raises(FileNotFoundError, match=r"media folder '.*nowhere' not found: set `data.source.val_data_root"):
        JsonSource(**{**source.__dict__, "val_data_root": str(tmp_path / "nowhere")}).check()
    # every missing path in one message, not one per launch
    gone = JsonSource(str(tmp_path / "no.json"), str(tmp_path / "no_media"), val_json=str(tmp_path / "no_val.json"),
                      val_data_root=str(tmp_path / "no_val_media"))  # fmt: skip
    with pytest.raises(FileNotFoundError) as missing:
        gone.check()
    keys = ("train_json=<file>", "val_json=<file>", "data_root=<dir>", "val_data_root=<dir>")
    assert all(f"`data.source.{key}`" in str(missing.value) for key in keys), str(missing.value)
    with pytest.raises(FileNotFoundError, match=r"train_json is null(.|\n)*data_root is null"):
        JsonSource(None, None).check()
