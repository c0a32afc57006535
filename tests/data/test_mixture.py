"""Mixtures (SPEC 5), the sample index, preflight and its quarantine list."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from hicom.data import preflight
from hicom.data.datamodule import read_quarantine
from hicom.data.index import MixtureEntry, SampleIndex, Sampling, Strategy, read_mixture
from hicom.data.synthetic import write_video

QA = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A circle."}]


def records(prefix: str, n: int, video: str = "clip.mp4") -> list[dict]:
    return [{"id": f"{prefix}{i}", "video": video, "conversations": QA} for i in range(n)]


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("all", 10, list(range(10))),
        ("first:3", 10, [0, 1, 2]),
        ("end:3", 10, [7, 8, 9]),
        ("first:50%", 10, [0, 1, 2, 3, 4]),
        ("end:25%", 10, [7, 8, 9]),
        ("first:20", 10, list(range(10))),
        ("first:2.2%", 1500, list(range(33))),  # 33 exactly: no float rounding up to 34
    ],
)
def test_sampling_strategies(text, n, expected):
    sampling = Sampling.parse(text)
    assert sampling.select(n, seed=0).tolist() == expected
    assert sampling.size(n) == len(expected)  # what the early check counts without selecting


def test_random_sampling_is_seeded_and_bad_strategies_are_refused():
    sampling = Sampling.parse("random:30%")
    assert sampling == Sampling(Strategy.RANDOM, percent=30.0)
    picked = sampling.select(100, seed=1)
    assert len(picked) == 30 == sampling.size(100) and len(set(picked.tolist())) == 30
    assert picked.tolist() == sampling.select(100, seed=1).tolist() != sampling.select(100, seed=2).tolist()
    for bad in ("some", "first:", "first:-1", "random:120%", "middle:3", "first:x"):
        with pytest.raises(ValueError, match="sampling_strategy"):
            Sampling.parse(bad)
    for ambiguous in ("end:0", "end:0%", "end:0.0%"):  # the release's `[-0:]` took everything
        with pytest.raises(ValueError, match="ambiguous: the release's reading takes every record"):
            Sampling.parse(ambiguous)
    assert Sampling.parse("first:0").size(10) == 0 == Sampling.parse("random:0%").size(10)


def test_a_mixture_of_json_and_jsonl_with_relative_paths(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "a.json").write_text(json.dumps(records("a", 10)))
    (tmp_path / "ann" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records("b", 4)) + "\n")
    (tmp_path / "mix.yaml").write_text(
        "datasets:\n"
        "  - json_path: ann/a.json\n    data_root: videos_a\n    sampling_strategy: end:20%\n"
        "  - json_path: ann/b.jsonl\n    data_root: videos_b\n"
    )
    entries = read_mixture(tmp_path / "mix.yaml", tmp_path)
    assert [e.json_path for e in entries] == [tmp_path / "ann" / "a.json", tmp_path / "ann" / "b.jsonl"]
    index = SampleIndex.build(entries)
    assert [index.record_of(i)["id"] for i in range(len(index))] == ["a8", "a9", "b0", "b1", "b2", "b3"]
    assert index.root_of(0) == tmp_path / "videos_a" and index.root_of(5) == tmp_path / "videos_b"
    assert index.where(1) == (str(tmp_path / "ann" / "a.json"), 9)
    (tmp_path / "list.yaml").write_text("- json_path: ann/b.jsonl\n  sampling_strategy: first:1\n")
    assert len(SampleIndex.build(read_mixture(tmp_path / "list.yaml"))) == 1  # a bare list; paths from its folder
    (tmp_path / "typo.yaml").write_text("- json_path: ann/b.jsonl\n  sampling: first:1\n")
    with pytest.raises(ValueError, match="unknown fields"):
        read_mixture(tmp_path / "typo.yaml")
    (tmp_path / "empty.yaml").write_text("- json_path: ann/b.jsonl\n  data_root:\n")
    with pytest.raises(ValueError, match=r"empty.yaml: entry 0: data_root must be a path, got None"):
        read_mixture(tmp_path / "empty.yaml")
    # a bad strategy names its file and entry (the release's mixtures have ten)
    (tmp_path / "bad.yaml").write_text(
        "- json_path: ann/a.json\n- json_path: ann/b.jsonl\n  sampling_strategy: end:0\n"
    )
    with pytest.raises(ValueError, match=r"bad.yaml: entry 1 \(ann/b.jsonl\): sampling_strategy 'end:0' is ambiguous"):
        read_mixture(tmp_path / "bad.yaml")


def test_split_turns_index_and_its_memory(tmp_path):
    turns = QA + [{"from": "human", "value": "And?"}, {"from": "gpt", "value": "Nothing."}]
    chat = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}, *turns[2:]]
    data = records("x", 1000) + [{"id": "multi", "video": "v.mp4", "conversations": turns}]
    data.append({"id": "chat", "conversations": chat})  # text only: no clip to guide, kept whole
    (tmp_path / "a.json").write_text(json.dumps(data))
    index = SampleIndex.build([MixtureEntry(tmp_path / "a.json", tmp_path)], split_turns=True)
    assert len(index) == 1003 and [index.turn_of(i) for i in (999, 1000, 1001, 1002)] == [0, 0, 1, None]
    assert index.record_of(1001)["id"] == "multi" and index.record_of(1002)["id"] == "chat"
    # no Python object per sample: a few numpy arrays, about the JSON's size
    arrays = [index.blob, index.offsets, index.source, index.record, index.turn, index.origin]
    assert all(isinstance(a, np.ndarray) for a in arrays)
    assert index.nbytes() < 1.1 * (tmp_path / "a.json").stat().st_size + 64 * len(index)


def test_preflight_writes_a_quarantine_that_training_leaves_out(tmp_path, capsys):
    write_video(tmp_path / "clip.mp4", np.zeros((6, 16, 24, 3), dtype=np.uint8), fps=3)
    data = records("ok", 3) + records("gone", 1, "missing.mp4") + [{"id": "odd", "video": "clip.mp4"}]
    (tmp_path / "a.json").write_text(json.dumps(data))
    out = tmp_path / "preflight"
    code = preflight.main([str(tmp_path / "a.json"), "--data-root", str(tmp_path), "--out", str(out),
                           "--workers", "2", "--no-progress"])  # fmt: skip
    assert code == 0 and not (out / ".index").exists()  # the workers' copy of the index is removed
    lines = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["index"], q["id"], q["reason"]) for q in lines] == [(3, "gone0", "missing"), (4, "odd", "malformed")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 5 and summary["by_reason"] == {"missing": 1, "malformed": 1}
    assert summary["frames"]["max"] == 6 and summary["duration_s"]["max"] == pytest.approx(2.0)
    assert summary["height"]["max"] == 16 and summary["width"]["max"] == 24  # from frames it did not keep
    exclude = read_quarantine(out / "quarantine.jsonl")
    index = SampleIndex.build([MixtureEntry(tmp_path / "a.json", tmp_path)], exclude=exclude)
    assert [index.record_of(i)["id"] for i in range(len(index))] == ["ok0", "ok1", "ok2"]
    assert "5 samples, 2 bad" in capsys.readouterr().out
    # the file edited since its preflight (the missing clip's record deleted): the positions would leave out the
    # next record, which is good, and keep the malformed one, so the quarantine is refused
    (tmp_path / "b.json").write_text(json.dumps(data[:3] + data[4:]))
    moved = [(str(tmp_path / "b.json"), row, named) for _, row, named, _ in exclude]
    with pytest.raises(
        ValueError, match=r"b\.json has the record 'odd' at position 3, where its preflight quarantined 'gone0'"
    ):
        SampleIndex.build([MixtureEntry(tmp_path / "b.json", tmp_path)], exclude=moved)
    # a quarantine cut short, or a line of another kind, names the file and line (training checks it first)
    whole = (out / "quarantine.jsonl").read_text()
    for text, line in [(whole[:-10], 2), ('{"source": "a.json"}\n', 1)]:
        (out / "quarantine.jsonl").write_text(text)
        with pytest.raises(ValueError, match=f"quarantine.jsonl line {line} is not a preflight entry"):
            read_quarantine(out / "quarantine.jsonl")
    # a saved index damaged on disk names its folder and the fix
    saved = index.save(tmp_path / "index")
    for blob in saved.glob("*.npy"):
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    with pytest.raises(ValueError, match="the sample index .* is damaged .*delete that folder"):
        SampleIndex.load(saved)


def test_a_quarantine_written_from_one_folder_is_read_from_any_and_one_of_other_files_is_said(
    tmp_path, monkeypatch, caplog
):
    """Preflight given relative paths writes the files as it resolved them: training launched from another folder
    leaves the samples out all the same (it found nothing to leave out, and said nothing). A quarantine naming
    files the data does not read is said, never passed over in silence."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    write_video(work / "data" / "clip.mp4", np.zeros((6, 16, 16, 3), dtype=np.uint8), fps=3)
    (work / "data" / "a.json").write_text(json.dumps(records("ok", 2) + records("gone", 1, "missing.mp4")))
    monkeypatch.chdir(work)
    preflight.main(["data/a.json", "--data-root", "data", "--out", "pf", "--workers", "1", "--no-progress"])
    (line,) = (work / "pf" / "quarantine.jsonl").read_text().splitlines()
    assert json.loads(line)["source"] == str(work / "data" / "a.json")
    monkeypatch.chdir(tmp_path)
    exclude = read_quarantine(work / "pf" / "quarantine.jsonl")
    entry = MixtureEntry(work / "data" / "a.json", work / "data")
    with caplog.at_level("WARNING", logger="hicom"):
        index = SampleIndex.build([entry], exclude=exclude)
    assert [index.record_of(i)["id"] for i in range(len(index))] == ["ok0", "ok1"] and not caplog.records
    other = tmp_path / "other.json"
    other.write_text(json.dumps(records("ok", 1)))
    with caplog.at_level("WARNING", logger="hicom"):
        SampleIndex.build([MixtureEntry(other, work / "data")], exclude=exclude)
    assert "1 quarantined sample(s) name annotation files this data does not read" in caplog.text
    # the data moved since its preflight (another mount, a copy on the cluster): the file is found by its content;
    # listed twice in a mixture, both times
    shutil.copytree(work / "data", tmp_path / "mount" / "data")
    moved = MixtureEntry(tmp_path / "mount" / "data" / "a.json", tmp_path / "mount" / "data")
    caplog.clear()
    with caplog.at_level("WARNING", logger="hicom"):
        index = SampleIndex.build([moved, moved], exclude=exclude)
    assert [index.record_of(i)["id"] for i in range(len(index))] == ["ok0", "ok1"] * 2 and not caplog.records


def test_a_record_whose_text_holds_a_lone_surrogate_is_one_bad_sample(tmp_path):
    """JSON can write half of an emoji ("\\ud83d", text cut at a length limit); UTF-8 cannot hold it, and the
    index build failed the run on it. It is one malformed sample, in a .json list as in a JSONL file."""
    from hicom.data.index import unreadable_line

    rows = records("ok", 3)
    rows[1] = {**rows[1], "conversations": [{"from": "human", "value": "<video>\nWhat? \ud83d"}, QA[1]]}
    for name, text in (("a.json", json.dumps(rows)), ("a.jsonl", "\n".join(json.dumps(r) for r in rows))):
        (tmp_path / name).write_text(text)
        index = SampleIndex.build([MixtureEntry(tmp_path / name, tmp_path)], split_turns=True)
        assert len(index) == 3 and [index.record_of(i).get("id") for i in (0, 2)] == ["ok0", "ok2"]
        assert unreadable_line(index.record_of(1)) == "a lone surrogate '\\ud83d' in its text"
    # a .json file is read as UTF-8 whatever the locale, a byte-order mark allowed
    (tmp_path / "b.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps(records("\u00e9t\u00e9", 1), ensure_ascii=False).encode()
    )
    assert SampleIndex.build([MixtureEntry(tmp_path / "b.json", tmp_path)]).record_of(0)["id"] == "\u00e9t\u00e90"


def test_a_jsonl_line_that_is_not_json_is_one_bad_sample_in_its_place(tmp_path, caplog):
    """One torn line in a million-line JSONL costs that sample, not the run: it keeps its row, so the lines after it
    keep theirs (a quarantine names rows), and preflight and the dataset report it as malformed."""
    from hicom.data.index import count_records, unreadable_line

    write_video(tmp_path / "clip.mp4", np.zeros((6, 16, 16, 3), dtype=np.uint8), fps=3)
    good = [json.dumps(r).encode() for r in records("ok", 3)]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join([good[0], b'{"id": "torn", "vid', b"\xff\xfe\n", good[1], good[2]]))
    assert count_records(tmp_path / "a.jsonl") == 5  # the blank line is not a sample; the bad bytes are
    index = SampleIndex.build([MixtureEntry(tmp_path / "a.jsonl", tmp_path)])
    assert [index.record_of(i).get("id") for i in (0, 3, 4)] == ["ok0", "ok1", "ok2"]
    assert "line 2 is not JSON" in unreadable_line(index.record_of(1))
    assert "line 3 is not JSON" in unreadable_line(index.record_of(2))
    assert "a.jsonl: 2 record(s) cannot be read" in caplog.text
    out = tmp_path / "preflight"
    preflight.main([str(tmp_path / "a.jsonl"), "--data-root", str(tmp_path), "--out", str(out),
                    "--workers", "1", "--no-progress"])  # fmt: skip
    lines = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["index"], q["reason"]) for q in lines] == [(1, "malformed"), (2, "malformed")]
    assert "line 2 is not JSON" in lines[0]["error"]
    exclude = read_quarantine(out / "quarantine.jsonl")
    kept = SampleIndex.build([MixtureEntry(tmp_path / "a.jsonl", tmp_path)], exclude=exclude)
    assert [kept.record_of(i)["id"] for i in range(len(kept))] == ["ok0", "ok1", "ok2"]
    # a file none of whose lines is a record is another kind of file, refused up front: a JSON list saved as .jsonl
    (tmp_path / "list.jsonl").write_text(json.dumps(records("ok", 3), indent=1))
    with pytest.raises(ValueError, match=r"list\.jsonl: no record is a JSON object \(line 1 is not JSON"):
        count_records(tmp_path / "list.jsonl")
    (tmp_path / "strings.jsonl").write_text('"a"\n"b"\n')
    with pytest.raises(ValueError, match="no record is a JSON object .record 0 is not a JSON object"):
        count_records(tmp_path / "strings.jsonl")


def test_preflight_follows_the_datasets_rules_and_the_runs_seed(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    two = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]
    data = [
        {"id": "two-images", "image": ["a.png", "a.png"], "conversations": two},  # one placeholder per image
        {"id": "number", "video": 7, "conversations": QA},
        {"id": "listed", "image": ["a.png", 3], "conversations": two},
        # the clip in an answer: the training encoder refuses it, and so does preflight
        {
            "id": "answered",
            "image": "a.png",
            "conversations": [two[0] | {"value": "Same?"}, two[1] | {"value": "<image>"}],
        },
        {"id": "unmarked", "image": "a.png", "conversations": [two[0] | {"value": "What?"}, two[1]]},  # gets one
    ]
    (tmp_path / "a.json").write_text(json.dumps(data))
    preflight.main([str(tmp_path / "a.json"), "--data-root", str(tmp_path), "--out", str(tmp_path / "p"),
                    "--workers", "1", "--no-progress"])  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "p" / "quarantine.jsonl").read_text().splitlines()]
    expected = [("number", "malformed"), ("listed", "malformed"), ("answered", "malformed")]
    assert [(q["id"], q["reason"]) for q in lines] == expected
    # random:N picks with the run's data.seed: preflight probes the records training will read
    (tmp_path / "b.json").write_text(json.dumps(records("gone", 10, "missing.mp4")))
    (tmp_path / "mix.yaml").write_text("- {json_path: b.json, sampling_strategy: 'random:3'}\n")
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        preflight.main([str(tmp_path / "mix.yaml"), "--data-root", str(tmp_path), "--out", str(out), "--workers",
                        "1", "--no-progress", "--seed", str(seed)])  # fmt: skip
        probed = [json.loads(line)["id"] for line in (out / "quarantine.jsonl").read_text().splitlines()]
        index = SampleIndex.build(read_mixture(tmp_path / "mix.yaml", tmp_path), seed=seed)
        assert probed == [index.record_of(i)["id"] for i in range(len(index))] and len(probed) == 3
    assert (tmp_path / "seed0" / "quarantine.jsonl").read_text() != (
        tmp_path / "seed1" / "quarantine.jsonl"
    ).read_text()


def test_grouped_batches_hold_one_modality_and_shard_under_ddp():
    from torch.utils.data import DataLoader, DistributedSampler

    from hicom.data.sampler import TrainSampler

    n = 103
    groups = np.arange(n) % 3
    lengths = (np.arange(n) * 7919) % 101
    dataset = list(range(n))

    def batches(epoch=0, **options):
        sampler = TrainSampler(dataset, batch_size=4, lengths=lengths, groups=groups, megabatch=8, **options)
        sampler.set_epoch(epoch)
        return [b.tolist() for b in DataLoader(dataset, batch_size=4, sampler=sampler)]

    one = batches()
    assert len(one) == 26 and sorted(i for b in one for i in b) == list(range(n))
    assert all(len(b) == 4 for b in one[:-1])  # the short batch comes last
    mixed = sum(len({groups[i] for i in b}) > 1 for b in one)
    assert mixed <= 3 * 4  # only where a megabatch's groups meet
    assert batches() == one and batches(epoch=1) != one and batches(seed=1) != one  # a function of seed and epoch
    # DDP: each rank groups its own shard; a DistributedSampler, so Lightning keeps it (and its shuffle and seed)
    assert isinstance(TrainSampler(dataset), DistributedSampler)
    shards = [[i for b in batches(num_replicas=2, rank=rank) for i in b] for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 52  # padded to equal shards, as DistributedSampler does
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    plain = [i for b in DataLoader(dataset, batch_size=4, sampler=TrainSampler(dataset, shuffle=False)) for i in b]
    assert plain == list(range(n))  # shuffle=false: file order


def test_a_resumable_loader_goes_on_with_the_batches_it_would_have_had_next():
    from hicom.data.sampler import ResumableLoader, TrainSampler

    reads = []

    class Samples(list):
        def __getitem__(self, i):
            reads.append(i)
            return super().__getitem__(i)

    def loader(epochs_done=None):
        samples = Samples(range(40))
        return ResumableLoader(samples, batch_size=4, sampler=TrainSampler(samples, seed=3), epochs_done=epochs_done)

    full = loader()
    epochs = []
    for epoch in range(2):
        full.sampler.set_epoch(epoch)
        epochs.append([b.tolist() for b in full])
    first = loader()
    first.sampler.set_epoch(1)
    iterator = iter(first)
    assert [next(iterator).tolist() for _ in range(3)] == epochs[1][:3]
    state = first.state_dict()
    order = {"seed": 3, "shuffle": 1, "megabatch": 0}  # what else decides which samples a count of batches is
    assert state == {"epoch": 1, "batches": 3, "processes": 1, "batch_size": 4, "samples": 40, **order}
    resumed = loader()
    iterator = iter(resumed)  # as the trainer does before it restores the state: iteration starts at next()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # not yet applied
    reads.clear()
    assert [b.tolist() for b in iterator] == epochs[1][3:] and len(reads) == 28  # left-out samples are not read
    assert resumed.state_dict() == {**state, "epoch": 2, "batches": 0}  # all its batches done: the next epoch
    assert [b.tolist() for b in resumed] == epochs[1]  # only the first iteration after a load leaves batches out
    stopped = loader(epochs_done=lambda: 1)  # the trainer counts the epoch as done (max_steps cut it short)
    iterator = iter(stopped)
    next(iterator), next(iterator)
    assert stopped.state_dict() == {**state, "epoch": 1, "batches": 0, "cut_short": 2, "of": 10}  # named
    later = loader()  # the trainer has moved on to epoch 2: a state of epoch 1 is dropped
    later.load_state_dict(state)
    later.sampler.set_epoch(2)
    full.sampler.set_epoch(2)
    assert [b.tolist() for b in later] == [b.tolist() for b in full]
    other = ResumableLoader(list(range(40)), batch_size=8, sampler=TrainSampler(range(40), seed=3))
    other.load_state_dict(state)  # counted in batches of 4: with batches of 8 the epoch starts over
    other.sampler.set_epoch(1)
    assert len([b for b in other]) == 5
    for sampler in (TrainSampler(range(40), seed=4), TrainSampler(range(40), seed=3, shuffle=False)):
        reordered = ResumableLoader(list(range(40)), batch_size=4, sampler=sampler)
        reordered.load_state_dict(state)  # 3 batches of seed 3's order are other samples in this one: over again
        reordered.sampler.set_epoch(1)
        assert len([b for b in reordered]) == 10


def test_a_cached_index_is_built_once_and_memory_mapped(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(records("a", 50)))
    entries = [MixtureEntry(tmp_path / "a.json", tmp_path)]
    first = SampleIndex.cached(tmp_path / "cache", entries, split_turns=True, seed=0, exclude=[])
    assert isinstance(first.blob, np.memmap) and len(list((tmp_path / "cache").iterdir())) == 1
    again = SampleIndex.cached(tmp_path / "cache", entries, split_turns=True, seed=0, exclude=[])
    assert [again.record_of(i) for i in range(50)] == [first.record_of(i) for i in range(50)]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the same content: the same index
    SampleIndex.cached(tmp_path / "cache", entries, split_turns=True, seed=0, exclude=[(str(tmp_path / "a.json"), 3)])
    (tmp_path / "a.json").write_text(json.dumps(records("b", 10)))  # a changed file: a new index
    changed = SampleIndex.cached(tmp_path / "cache", entries, split_turns=True, seed=0, exclude=[])
    assert len(changed) == 10 and len(list((tmp_path / "cache").iterdir())) == 3


def test_a_loaded_index_pickles_as_its_folder_so_spawned_workers_map_it_again(tmp_path, monkeypatch):
    """A forkserver or spawn DataLoader worker receives the dataset pickled; numpy pickles a memory map by value,
    which would give every worker of every rank a private copy of the whole index."""
    (tmp_path / "a.json").write_text(json.dumps(records("a", 400)))
    entries = [MixtureEntry(tmp_path / "a.json", tmp_path)]
    loaded = SampleIndex.cached(tmp_path / "cache", entries, seed=0)
    payload = pickle.dumps(loaded)
    assert len(payload) < 1000 < loaded.nbytes()
    worker = pickle.loads(payload)
    assert isinstance(worker.blob, np.memmap) and Path(worker.blob.filename) == loaded.folder / "blob.npy"
    assert [worker.record_of(i) for i in range(400)] == [loaded.record_of(i) for i in range(400)]
    built = SampleIndex.build(entries)  # never saved: it has no folder to name, and goes by value
    assert pickle.loads(pickle.dumps(built)).record_of(7) == built.record_of(7)
    monkeypatch.chdir(tmp_path)  # loaded by a relative path: the worker may start elsewhere
    relative = SampleIndex.load(loaded.folder.relative_to(tmp_path))
    monkeypatch.chdir(tmp_path / "cache")
    assert pickle.loads(pickle.dumps(relative)).record_of(3) == loaded.record_of(3)
    shutil.rmtree(loaded.folder)  # a cache cleaned since it was loaded: the mapped pages go by value
    assert pickle.loads(pickle.dumps(loaded)).record_of(9) == worker.record_of(9)


def test_preflight_counts_tokens_as_training_encodes_them(tmp_path, tiny_paths, capsys):
    """With the run's LLM folder, preflight counts each sample's tokens through the training encoder (chat template,
    the clip's visual tokens, each image's) and how many exceed max_length: what data.too_long will skip or cut."""
    from PIL import Image

    from hicom.data.dataset import conversation_of
    from hicom.data.template import ChatEncoder
    from hicom.utils.checkpoints import load_tokenizer

    write_video(tmp_path / "clip.mp4", np.zeros((6, 16, 16, 3), dtype=np.uint8), fps=3)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    long = [QA[0] | {"value": "<video>\n" + "What moves there, and why? " * 20}, QA[1]]
    two = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]
    data = [
        *records("short", 2),
        {"id": "long", "video": "clip.mp4", "conversations": long},
        {"id": "images", "image": ["a.png", "a.png"], "conversations": two},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
    ]
    (tmp_path / "a.json").write_text(json.dumps(data))
    encoder = ChatEncoder(load_tokenizer(tiny_paths["qwen2"]), "<|video_pad|>")
    expected = [
        len(encoder.encode(conversation_of(r, modality), visual)["input_ids"])
        for r, modality, visual in zip(data, ["video"] * 3 + ["image", "text"], [50, 50, 50, 2 * 7, 0], strict=True)
    ]
    assert expected[2] > 100 > max(expected[:2] + expected[3:])
    out = tmp_path / "preflight"
    base = [
        str(tmp_path / "a.json"),
        "--data-root",
        str(tmp_path),
        "--out",
        str(out),
        "--workers",
        "2",
        "--no-progress",
    ]
    sizes = ["--llm", str(tiny_paths["qwen2"]), "--video-tokens", "50", "--image-tokens", "7", "--max-length", "100"]
    assert preflight.main([*base, *sizes]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad"] == 0 and summary["over_max_length"] == 1 and summary["max_length"] == 100
    assert summary["tokens"]["max"] == expected[2] and summary["tokens"]["min"] == min(expected)
    assert "1 over max_length 100 tokens" in capsys.readouterr().out
    assert not (out / "quarantine.jsonl").read_text()  # a long sample is not a bad one
    with pytest.raises(SystemExit):
        preflight.main([*base, "--llm", str(tiny_paths["qwen2"]), "--video-tokens", "50"])
    assert "give --image-tokens" in capsys.readouterr().err
    preflight.main(base)  # without --llm: no counts
    assert "tokens" not in json.loads((out / "summary.json").read_text())


def test_an_index_that_cannot_be_written_names_its_folder_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    """numpy reports a full disk as 'Not enough free space to write N bytes', naming no file."""
    (tmp_path / "a.json").write_text(json.dumps(records("a", 3)))
    index = SampleIndex.build([MixtureEntry(tmp_path / "a.json", tmp_path)])

    def full(*args, **kwargs):
        raise OSError("Not enough free space to write 33288130 bytes after offset 128")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(OSError, match=r"writing the sample index into .*indexes failed .*GiB free there.*index_dir"):
        index.save(tmp_path / "indexes" / "one")
    assert list((tmp_path / "indexes").iterdir()) == []


def test_a_jsonl_line_nested_too_deep_is_one_bad_sample_and_the_suffix_is_read_in_any_case(tmp_path):
    """A line nested past Python's recursion limit raised a bare RecursionError that ended the index build; and
    a .JSONL file was read as one JSON document and refused."""
    from hicom.data.index import count_records, unreadable_line

    good = [json.dumps(r) for r in records("ok", 2)]
    (tmp_path / "a.JSONL").write_text("\n".join([good[0], "[" * 100_000 + "]" * 100_000, good[1]]))
    assert count_records(tmp_path / "a.JSONL") == 3
    index = SampleIndex.build([MixtureEntry(tmp_path / "a.JSONL", tmp_path)])
    assert [index.record_of(i).get("id") for i in (0, 2)] == ["ok0", "ok1"]
    assert "line 2 is not JSON (RecursionError" in unreadable_line(index.record_of(1))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: not JSON \(RecursionError"):
        count_records(tmp_path / "deep.json")


def test_processes_that_write_the_same_index_at_once_all_end_with_it(tmp_path):
    """The first rank of every node builds the index into a shared folder (prepare_data_per_node), and containers
    give their processes the same ids: a temporary folder named by the process id was torn up by the other node's
    writer. Each writes its own now, and the first rename wins; the others find it written."""
    import threading

    (tmp_path / "a.json").write_text(json.dumps(records("a", 3)))
    index = SampleIndex.build([MixtureEntry(tmp_path / "a.json", tmp_path)])
    target, errors = tmp_path / "indexes" / "one", []

    def save() -> None:
        try:
            index.save(target)
        except Exception as err:  # noqa: BLE001  collected for the assertion
            errors.append(err)

    writers = [threading.Thread(target=save) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert errors == [] and [p.name for p in (tmp_path / "indexes").iterdir()] == ["one"]
    assert SampleIndex.load(target).record_of(2)["id"] == "a2"
    assert index.save(target) == target  # written already: kept
    import os

    stale, fresh = tmp_path / "indexes" / "one.tmp-old", tmp_path / "indexes" / "one.tmp-live"
    for leftover in (stale, fresh):
        leftover.mkdir()
    os.utime(stale, (0, 0))  # a writer killed long ago; the other may be writing now
    index.save(target)
    assert not stale.exists() and fresh.exists()


def test_preflight_whose_workers_die_stops_with_the_samples_in_hand_rather_than_waiting(tmp_path):
    """Workers start fresh and import the calling script again: one that calls preflight outside a `__main__`
    guard makes each of them fail as it starts, as a decoder crash or a kill would end one. The pool stops with
    the samples it was probing instead of waiting forever for their answers."""
    import subprocess
    import sys

    data = records("ok", 40)
    (tmp_path / "a.json").write_text(json.dumps(data))
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from hicom.data import preflight\n"
        f"preflight.main([{str(tmp_path / 'a.json')!r}, '--data-root', {str(tmp_path)!r}, '--out', "
        f"{str(tmp_path / 'out')!r}, '--workers', '2', '--no-progress'])\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"stopped on {preflight.MAX_CRASHES} sample(s) probed alone (samples 0, 1, " in done.stderr
    assert '"crashed"' not in (tmp_path / "out" / "progress.jsonl").read_text()  # not the samples': run again
    assert "of " + str(tmp_path / "a.json") in done.stderr and "if __name__ == '__main__':" in done.stderr


def _dies_on_37(start: int, stop: int) -> list[dict]:
    """A chunk's probes, as a decoder that crashes its process on sample 37's file would give them."""
    import os

    if start <= 37 < stop:
        os._exit(1)
    return [{"index": i} for i in range(start, stop)]


def test_preflight_reports_the_sample_whose_probe_ends_its_process_and_goes_on(monkeypatch):
    """A decoder that crashes on one file of terabytes (a segfault in a codec, memory) stopped the whole preflight,
    naming the 2 x workers chunks in flight; the sample is now found (its chunk's samples probed again one per task,
    then alone) and reported as `crashed`, and the others are probed as usual."""
    import multiprocessing

    monkeypatch.setattr(preflight, "_probe_range", _dies_on_37)
    monkeypatch.setattr(preflight, "_init", _no_state)
    n = preflight.CHUNK * 6
    results = preflight._probe_all(
        multiprocessing.get_context("fork"),
        2,
        (),
        n,
        Path("a.json"),
        False,
        crashed=lambda i: {"index": i, "reason": "crashed"},
    )
    assert [r["index"] for r in results] == list(range(n))
    assert [r["index"] for r in results if r.get("reason") == "crashed"] == [37]


def _no_state(*args) -> None:  # a worker's start, for `_probe_all` alone
    pass


def _timed_range(start: int, stop: int) -> list[dict]:
    """A chunk's probes that note when they ran; the first chunk is slow, as a chunk with a 4K clip or a timeout."""
    import time

    began = time.monotonic()
    if start == 0:
        time.sleep(1.5)
    return [{"index": i, "began": began, "ended": time.monotonic()} for i in range(start, stop)]


def test_preflight_gives_a_free_worker_the_next_chunk_while_a_slow_one_runs(monkeypatch):
    """A slow chunk holds up its own samples only: the workers done with theirs take the next chunks, where they
    used to wait for the oldest chunk to finish. The results still come in the samples' order."""
    import multiprocessing

    monkeypatch.setattr(preflight, "_probe_range", _timed_range)
    monkeypatch.setattr(preflight, "_init", _no_state)
    n = preflight.CHUNK * 8
    results = preflight._probe_all(multiprocessing.get_context("fork"), 2, (), n, Path("a.json"), progress=False)
    assert [r["index"] for r in results] == list(range(n))
    slow_end = results[0]["ended"]
    fifth_chunk = results[4 * preflight.CHUNK]  # past the 2 x workers chunks submitted at the start
    assert fifth_chunk["began"] < slow_end


def test_preflight_names_every_missing_annotation_file_before_it_starts(tmp_path, capsys):
    """A mixture with several annotation files missing (a data root not yet synced) is a usage error naming all of
    them, not a traceback naming the first; a suffix in capitals is an annotation file too."""
    (tmp_path / "b.JSONL").write_text("".join(json.dumps(r) + "\n" for r in records("b", 2, "b.mp4")))
    (tmp_path / "mix.yaml").write_text("- {json_path: a.json}\n- {json_path: b.JSONL}\n- {json_path: c.jsonl}\n")
    base = ["--data-root", str(tmp_path), "--out", str(tmp_path / "p"), "--workers", "1", "--no-progress"]
    with pytest.raises(SystemExit) as stopped:
        preflight.main([str(tmp_path / "mix.yaml"), *base])
    assert stopped.value.code == 2 and not (tmp_path / "p").exists()
    err = capsys.readouterr().err
    assert "2 annotation file(s)" in err and "a.json" in err and "c.jsonl" in err and "b.JSONL" not in err
    assert preflight.main([str(tmp_path / "b.JSONL"), *base]) == 0
    assert len((tmp_path / "p" / "quarantine.jsonl").read_text().splitlines()) == 2  # b.mp4 does not exist


class SlowJournal:
    """A journal on a slow shared file system: a worker may die while the last chunk's line is written."""

    def __init__(self):
        self.done = {}

    def add(self, start, results):
        import time

        time.sleep(0.2)
        self.done[start] = results


def _dies_on_40_to_51(start: int, stop: int) -> list[dict]:
    """Twelve records in a row on one clip that crashes the decoder (a video's many questions)."""
    import os

    if any(40 <= i < 52 for i in range(start, stop)):
        os._exit(1)
    return [{"index": i} for i in range(start, stop)]


def test_records_sharing_a_crashing_clip_are_each_reported_and_a_slow_journal_loses_nothing(monkeypatch):
    """Eight crashes in a row stopped the preflight as if its workers could not start (and journaled seven good
    samples as crashed where they could not); a worker dying while the main process wrote a journal line made the
    next hand-out raise BrokenProcessPool out of the preflight. A process that probes a sample that came back
    before now tells a bad file from bad workers."""
    import multiprocessing

    monkeypatch.setattr(preflight, "_probe_range", _dies_on_40_to_51)
    monkeypatch.setattr(preflight, "_init", _no_state)
    journal, n = SlowJournal(), preflight.CHUNK * 6
    results = preflight._probe_all(multiprocessing.get_context("fork"), 2, (), n, Path("a.json"), False, journal,
                                   crashed=lambda i: {"index": i, "reason": "crashed"})  # fmt: skip
    assert [r["index"] for r in results] == list(range(n))
    assert [r["index"] for r in results if r.get("reason") == "crashed"] == list(range(40, 52))


def _breaks_at_40(start: int, stop: int) -> list[dict]:
    """Workers that can probe nothing once sample 40 has been reached (memory taken by something else)."""
    import os

    marker = Path(os.environ["BROKEN_MARKER"])
    if any(i >= 40 for i in range(start, stop)):
        marker.touch()
    if marker.exists():
        os._exit(1)
    return [{"index": i} for i in range(start, stop)]


def test_workers_that_stop_probing_anything_stop_the_preflight_with_nothing_recorded_against_the_samples(
    tmp_path, monkeypatch
):
    import multiprocessing

    monkeypatch.setenv("BROKEN_MARKER", str(tmp_path / "broken"))
    monkeypatch.setattr(preflight, "_probe_range", _breaks_at_40)
    monkeypatch.setattr(preflight, "_init", _no_state)
    journal = SlowJournal()
    with pytest.raises(RuntimeError, match=r"probed alone \(samples \d+ of a.json\) and on sample \d+, which they"):
        preflight._probe_all(multiprocessing.get_context("fork"), 2, (), preflight.CHUNK * 6, Path("a.json"), False,
                             journal, crashed=lambda i: {"index": i, "reason": "crashed"})  # fmt: skip
    assert not any(r.get("reason") == "crashed" for results in journal.done.values() for r in results)


def test_a_preflight_run_again_after_a_stop_probes_only_what_it_had_not(tmp_path, monkeypatch, capsys):
    """Preflight of a 248K-sample mix takes hours; a kill (a node's time limit) lost all of it, as it wrote nothing
    until the end. Each chunk's results now go to progress.jsonl as they come; run again with the same files and
    options, it probes the rest; with the file edited since, all of it."""
    write_video(tmp_path / "clip.mp4", np.zeros((6, 16, 24, 3), dtype=np.uint8), fps=3)
    data = records("ok", 2 * preflight.CHUNK) + records("gone", 8, "missing.mp4")
    (tmp_path / "a.json").write_text(json.dumps(data))
    out = tmp_path / "pf"
    args = [str(tmp_path / "a.json"), "--data-root", str(tmp_path), "--out", str(out), "--workers", "1",
            "--no-progress", "--num-frames", "4"]  # fmt: skip
    add = preflight.Journal.add

    def stopped_after_one(self, start, results):
        add(self, start, results)
        raise KeyboardInterrupt

    monkeypatch.setattr(preflight.Journal, "add", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        preflight.main(args)
    assert (out / "progress.jsonl").is_file() and not (out / "quarantine.jsonl").exists()
    monkeypatch.setattr(preflight.Journal, "add", add)
    passes = []
    pool_pass = preflight._pool_pass
    monkeypatch.setattr(
        preflight, "_pool_pass", lambda c, w, i, queue, f: passes.append(list(queue)) or pool_pass(c, w, i, queue, f)
    )
    assert preflight.main(args) == 0
    # not chunk 0 (nor a chunk done when the stop came, which is kept too)
    assert passes and all(start >= preflight.CHUNK for start, _ in passes[0])
    assert f"{preflight.CHUNK} of {len(data)} samples probed before" in capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [q["id"] for q in lines] == [f"gone{i}" for i in range(8)]
    assert json.loads((out / "summary.json").read_text())["samples"] == len(data)
    assert not (out / "progress.jsonl").exists()  # done with

    monkeypatch.setattr(preflight.Journal, "add", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        preflight.main(args)
    monkeypatch.setattr(preflight.Journal, "add", add)
    (tmp_path / "a.json").write_text(json.dumps(data[:-1]))  # edited since: its results are not those
    passes.clear()
    assert preflight.main(args) == 0
    assert passes[0][0] == (0, preflight.CHUNK)
    assert json.loads((out / "summary.json").read_text())["samples"] == len(data) - 1


def test_a_progress_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path, options = tmp_path / "progress.jsonl", {"samples": 3}
    journal = preflight.Journal(path, options)
    journal.add(0, [{"index": 0}])
    journal.close()
    with path.open("a") as f:
        f.write('{"start": 1, "results": [{"ind')  # the kill
    again = preflight.Journal(path, options)
    assert again.done == {0: [{"index": 0}]}
    again.add(1, [{"index": 1}])  # appended after the lines kept, not onto the cut one
    again.close()
    assert preflight.Journal(path, options).done == {0: [{"index": 0}], 1: [{"index": 1}]}
    assert preflight.Journal(path, {"samples": 4}).done == {}  # other options: started again


def test_a_preflight_stopped_in_one_folder_goes_on_from_another(tmp_path, monkeypatch):
    """The results named their file by the relative path given: run again from another folder, the end of the
    preflight looked for it there and failed, after all the probing."""
    work = tmp_path / "proj"
    (work / "data").mkdir(parents=True)
    write_video(work / "data" / "clip.mp4", np.zeros((6, 16, 24, 3), dtype=np.uint8), fps=3)
    data = records("gone", 4, "missing.mp4") + records("ok", preflight.CHUNK)  # the bad ones in the first chunk
    (work / "data" / "a.json").write_text(json.dumps(data))
    add = preflight.Journal.add

    def stopped_after_one(self, start, results):
        add(self, start, results)
        raise KeyboardInterrupt

    monkeypatch.setattr(preflight.Journal, "add", stopped_after_one)
    monkeypatch.chdir(work)
    common = ["--out", str(tmp_path / "pf"), "--workers", "1", "--no-progress", "--num-frames", "4"]
    with pytest.raises(KeyboardInterrupt):
        preflight.main(["data/a.json", "--data-root", "data", *common])
    monkeypatch.setattr(preflight.Journal, "add", add)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert preflight.main(["../proj/data/a.json", "--data-root", "../proj/data", *common]) == 0
    lines = [json.loads(line) for line in (tmp_path / "pf" / "quarantine.jsonl").read_text().splitlines()]
    assert [q["id"] for q in lines] == [f"gone{i}" for i in range(4)]
    assert {q["source"] for q in lines} == {str(work / "data" / "a.json")}


def _slow_after_first(start: int, stop: int) -> list[dict]:
    import time

    if start:
        time.sleep(60)  # a chunk of long clips
    return [{"index": i} for i in range(start, stop)]


def test_a_stopped_preflight_does_not_wait_for_the_chunks_in_flight(monkeypatch):
    """Ctrl-C or a SIGTERM unwound through the pool's shutdown, which waited for every chunk handed out (up to a
    minute a clip) and then threw their results away."""
    import multiprocessing
    import time
    from collections import deque

    monkeypatch.setattr(preflight, "_probe_range", _slow_after_first)
    monkeypatch.setattr(preflight, "_init", _no_state)
    kept = {}

    def finish(start, results):
        kept[start] = results
        raise KeyboardInterrupt  # the stop, as the first chunk comes back

    queue = deque((s, s + preflight.CHUNK) for s in range(0, 4 * preflight.CHUNK, preflight.CHUNK))
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        preflight._pool_pass(multiprocessing.get_context("fork"), 2, (), queue, finish)
    assert time.monotonic() - began < 20 and list(kept) == [0]


def test_grouping_counts_a_list_of_images_as_one_clip_of_them_all(tmp_path):
    """The length proxy of group_by_length gave a sample of 8 images the tokens of one."""
    from hicom.data.datamodule import approximate_lengths

    ask = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
    data = [
        {"id": "one", "image": "a.png", "conversations": ask},
        {"id": "eight", "image": [f"{i}.png" for i in range(8)], "conversations": ask},
        {"id": "video", "video": "v.mp4", "conversations": QA},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
    ]
    (tmp_path / "a.json").write_text(json.dumps(data))
    index = SampleIndex.build([MixtureEntry(tmp_path / "a.json", tmp_path)])
    assert index.image_counts().tolist() == [1, 8, 0, 0]
    visual = {("image", 1): 100, ("image", 8): 800, ("video", 4): 50}
    lengths = approximate_lengths(index, lambda n, modality: visual[modality, n], num_frames=4)
    text = index.text_bytes() // 4
    assert (lengths - text).tolist() == [100, 800, 50, 0]
    index.save(tmp_path / "saved")  # the counts are saved with the index
    assert SampleIndex.load(tmp_path / "saved").image_counts().tolist() == [1, 8, 0, 0]
