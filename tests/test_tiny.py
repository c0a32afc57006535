import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from hicom.tiny import TinyQwen2


def test_tiny_checkpoints_load_like_real_ones(tiny_paths):
    siglip = AutoModel.from_pretrained(tiny_paths["siglip"])
    assert type(siglip).__name__ == "SiglipModel"
    assert json.loads((tiny_paths["siglip"] / "preprocessor_config.json").read_text())["size"]["height"] == 112
    llm = AutoModelForCausalLM.from_pretrained(tiny_paths["qwen2"])
    assert type(llm).__name__ == "Qwen2ForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["qwen2"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        text
        == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") != tokenizer.unk_token_id
    assert len(tokenizer) <= llm.config.vocab_size
    # SigLIP's text tokenizer as the real folder has it: SentencePiece, lowercased, punctuation dropped, </s> pads
    guide = AutoTokenizer.from_pretrained(tiny_paths["siglip"])
    assert type(guide).__name__ == "SiglipTokenizer" and (tiny_paths["siglip"] / "spiece.model").is_file()
    ids = guide(["What colour is the mark?", "what colour is the mark"], padding="max_length", truncation=True)
    assert ids["input_ids"][0] == ids["input_ids"][1] and len(ids["input_ids"][0]) == guide.model_max_length
    assert ids["input_ids"][0][-1] == guide.pad_token_id == siglip.config.text_config.pad_token_id
    assert len(guide) <= siglip.config.text_config.vocab_size


def test_a_config_from_before_the_siglip_files_were_versioned_is_refused(cache_dir, tmp_path):
    """A run trained on the byte-level-BPE tiny SigLIP keeps a spec without files_version in its config.yaml: its
    towers are no longer written, and today's must not be written in their place for it."""
    from omegaconf import open_dict

    from hicom.utils.instantiators import write_assets
    from tests.conftest import compose_train

    cfg = compose_train(cache_dir, tmp_path)
    with open_dict(cfg):
        del cfg.assets.siglip.spec.files_version
    with pytest.raises(Exception, match="TinySiglip files_version=None: this config asks for the tiny SigLIP of an"):
        write_assets(cfg.assets)
    assert not (tmp_path / "siglip").exists()


def test_writer_is_seeded_and_keyed_by_spec(tmp_path):
    a = TinyQwen2(hidden_size=32, num_layers=1)(tmp_path / "a")
    b = TinyQwen2(hidden_size=32, num_layers=1)(tmp_path / "b")
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    stamp = (a / "spec.json").stat().st_mtime_ns
    TinyQwen2(hidden_size=32, num_layers=1)(a)
    assert (a / "spec.json").stat().st_mtime_ns == stamp
    TinyQwen2(hidden_size=32, num_layers=1, seed=1)(a)
    assert json.loads((a / "spec.json").read_text())["seed"] == 1
    # a folder whose weights were deleted or cut short since (spec.json still there) is written again, whole
    (b / "model.safetensors").unlink()
    TinyQwen2(hidden_size=32, num_layers=1)(b)
    assert all(torch.equal(wa[k], v) for k, v in AutoModelForCausalLM.from_pretrained(b).state_dict().items())
    (b / "tokenizer.json").write_text((b / "tokenizer.json").read_text()[:100])
    TinyQwen2(hidden_size=32, num_layers=1)(b)
    assert json.loads((b / "tokenizer.json").read_text())  # whole again


def test_processes_writing_one_folder_at_once_take_turns_and_a_killed_writers_leftovers_go(tmp_path, monkeypatch):
    """The processes of a launch on a fresh cache: one writes, the others wait for it and find the folder written
    (the later one used to delete the folder the first was reading). Threads stand for them: each opens the lock
    file, and flock excludes each open of it."""
    import threading

    writes, write = [], TinyQwen2.write
    monkeypatch.setattr(TinyQwen2, "write", lambda self, out: writes.append(out) or write(self, out))
    out = tmp_path / "qwen2"
    threads = [threading.Thread(target=TinyQwen2(hidden_size=32, num_layers=1), args=(out,)) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(writes) == 1 and AutoTokenizer.from_pretrained(out) is not None
    # a writer killed after renaming the older folder aside, before its own took the place: nothing there, its two
    # folders beside it; the next writer writes the folder and clears them
    (tmp_path / "qwen2.tmp-999").mkdir()
    out.rename(tmp_path / "qwen2.old-999")
    TinyQwen2(hidden_size=32, num_layers=1)(out)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["qwen2"]


def test_writer_never_replaces_a_foreign_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="refusing"):
        TinyQwen2(hidden_size=32, num_layers=1)(tmp_path / "real")


@pytest.mark.parametrize(("initializer_range", "expected"), [(None, 64**-0.5), (0.02, 0.02)])
def test_tiny_qwen2_init_scales_with_its_width(tmp_path, initializer_range, expected):
    path = TinyQwen2(hidden_size=64, num_layers=1, initializer_range=initializer_range)(tmp_path / "q")
    llm = AutoModelForCausalLM.from_pretrained(path)
    assert llm.config.initializer_range == pytest.approx(expected)
    # every projection and the (tied) embedding start at that std, not at Qwen2's 0.02 for width ~1000
    weights = [m.weight for m in llm.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
    assert all(w.std().item() == pytest.approx(expected, rel=0.15) for w in weights)


def test_writing_the_tiny_checkpoints_leaves_the_random_state_alone(tmp_path):
    import torch

    from hicom.tiny import TinyQwen2

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    TinyQwen2()(tmp_path / "qwen2")  # a fresh write seeds its own init
    torch.testing.assert_close(torch.rand(3), expected)


def test_a_writer_without_a_lock_leaves_other_writers_folders_alone(tmp_path, monkeypatch, caplog):
    """On a mount without locking (NFS with nolock) a writer cannot tell a killed writer's folder from a live
    one's: it used to delete every `*.tmp-*` beside its folder, a live writer's too."""
    import fcntl

    def no_locks(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    live = tmp_path / "qwen2.tmp-4242"  # another node's writer, the same process id in its container
    live.mkdir()
    out = TinyQwen2(hidden_size=32, num_layers=1)(tmp_path / "qwen2")
    assert live.is_dir() and (out / "spec.json").is_file() and "cannot lock" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["qwen2", "qwen2.tmp-4242"]
