from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hicom.callbacks.bad_samples import BadSampleGuard, BadSampleRateExceeded

ONE_PROCESS = SimpleNamespace(world_size=1)


class Recorder:
    device = torch.device("cpu")

    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def batch(good: int, bad: list[str]) -> dict:
    skipped = [{"skip": reason, "id": f"s{i}", "path": "v.mp4", "error": "e"} for i, reason in enumerate(bad)]
    return {"ids": [f"g{i}" for i in range(good)], "skipped": skipped}


def processes(*others: list[float]) -> SimpleNamespace:
    """A trainer of 1 + len(others) processes, this one first; each other's counts as `_gather` makes them."""
    rows = torch.tensor(others, dtype=torch.float64).reshape(-1, 4)
    return SimpleNamespace(
        world_size=1 + len(others), strategy=SimpleNamespace(all_gather=lambda t: torch.cat([t, rows])[:, None])
    )


def test_skips_are_logged_per_reason_and_a_mostly_bad_run_stops_with_a_report():
    guard, module = BadSampleGuard(max_fraction=0.25, window=13), Recorder()
    guard.on_train_batch_start(ONE_PROCESS, module, batch(3, ["missing"]), 0)
    guard.on_train_batch_start(
        ONE_PROCESS, module, batch(3, ["missing", "timeout"]), 1
    )  # 3 of 9 seen, but not over 25 % of the 13
    assert module.logged == {"data/skipped/missing": 2.0, "data/skipped/timeout": 1.0}
    with pytest.raises(BadSampleRateExceeded, match=r"4 of the run's last 13 training samples were skipped") as error:
        guard.on_train_batch_start(ONE_PROCESS, module, batch(3, ["undecodable"]), 2)
    assert "missing: 2" in str(error.value) and "preflight" in str(error.value)


def test_a_fit_too_short_to_be_stopped_says_its_rate_at_the_end(caplog):
    guard, module = BadSampleGuard(max_fraction=0.2, window=1000), Recorder()
    guard.on_train_batch_start(ONE_PROCESS, module, batch(17, ["missing"] * 16), 0)  # 48 %, of 33 samples
    guard.on_train_end(ONE_PROCESS, module)
    assert "16 of the fit's 33 training samples were skipped (48.5%)" in caplog.text and "window=1000" in caplog.text


def test_a_few_bad_samples_pass_and_the_count_survives_a_resume():
    guard = BadSampleGuard(max_fraction=0.25, window=8)
    for step in range(10):
        guard.on_train_batch_start(ONE_PROCESS, Recorder(), batch(7, ["missing"] if step % 2 else []), step)
    resumed = BadSampleGuard(max_fraction=0.25, window=8)
    resumed.load_state_dict(guard.state_dict())
    resumed._gather(ONE_PROCESS, Recorder())
    assert resumed._run == (75, 5) and resumed.before_reasons["missing"] == 5
    # On 2 processes the checkpoint holds the first one's guard, loaded by both: the run's sum of both processes'
    # counts, added once (counting what each loaded would count it twice)
    two = processes([10.0, 1.0, 10.0, 1.0])  # the other process since the resume
    guard._run = (150, 10)  # what the last sum over both gave before the save
    first, second = BadSampleGuard(max_fraction=0.25, window=8), BadSampleGuard(max_fraction=0.25, window=8)
    for resumed in (first, second):
        resumed.load_state_dict(guard.state_dict())
    first.on_train_batch_start(two, Recorder(), batch(9, ["missing"]), 0)
    assert first._run == (150 + 10 + 10, 10 + 1 + 1)
    for bad in ({"max_fraction": 1.5}, {"max_process_fraction": -0.1}, {"window": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BadSampleGuard(**bad)


def test_on_several_processes_the_run_stops_on_the_counts_of_all_of_them():
    """Each process sees its own share; deciding on it, one would stop alone and leave the others waiting."""
    trainer = processes([10.0, 8.0, 10.0, 8.0])  # the other process: 8 of its 10 samples skipped
    guard = BadSampleGuard(max_fraction=0.25, window=10, max_process_fraction=1.0)
    with pytest.raises(BadSampleRateExceeded, match=r"9 of the run's last 20 training samples"):  # this one: 1 of 10
        guard.on_train_batch_start(trainer, Recorder(), batch(9, ["missing"]), 0)


def run_steps(guard: BadSampleGuard, bad_at: range, steps: int, trainer=ONE_PROCESS) -> int | None:
    """Feeds `steps` batches of 8 samples, all skipped at the steps in `bad_at`, 1 in 16 skipped elsewhere;
    the step the guard stopped at, or None."""
    for step in range(steps):
        bad = 8 if step in bad_at else step % 2
        try:
            guard.on_train_batch_start(trainer, Recorder(), batch(8 - bad, ["missing"] * bad), step)
        except BadSampleRateExceeded:
            return step
    return None


def test_an_outage_weighs_the_same_early_or_late_in_a_run():
    """The rate is a recent one: counted since the run began, a 15-step outage at step 5 stopped the run and the
    same outage at step 2000 passed unseen (diluted by 2000 good steps), as would a mount dead for good by then."""
    for start in (5, 2000):
        assert run_steps(BadSampleGuard(), range(start, start + 5), start + 400) is None  # 40 samples lost: passes
        stopped = run_steps(BadSampleGuard(), range(start, start + 60), start + 400)  # 480 of them: stops
        assert stopped is not None and start + 15 < stopped < start + 30, (start, stopped)
        assert run_steps(BadSampleGuard(), range(start, 10**9), start + 400) is not None  # dead from then on


def test_one_process_whose_data_died_stops_the_run_that_the_others_dilute():
    """One of 8 machines whose mount died skips all its samples: 12.5 % of the run, under max_fraction (20 %),
    so the run-wide rate never stops it; its own rate does, on every process alike."""
    healthy = [[800.0, 40.0, 800.0, 40.0]] * 6
    dead = [800.0, 800.0, 800.0, 800.0]
    guard = BadSampleGuard()
    with pytest.raises(BadSampleRateExceeded, match=r"process 2 skipped 800 of its last 800 .*on its machine"):
        guard.on_train_batch_start(processes(*healthy[:1], dead, *healthy[1:]), Recorder(), batch(8, []), 0)
    # at the release's rate of bad files everywhere (5 %), on every process: nothing stops
    assert run_steps(BadSampleGuard(), range(0), 500, processes(*healthy, healthy[0])) is None


def test_a_folder_checkpoint_replaces_last_ckpt_whole_or_not_at_all(tmp_path, monkeypatch):
    """DeepSpeed writes a checkpoint folder in place, one file per process; `replace_folder` keeps last.ckpt on a
    whole checkpoint whatever step of a save the job is killed at (here: a writer that fails part-way)."""
    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    from hicom.callbacks.checkpoint import replace_folder, resume_checkpoint, writes_folders

    last = tmp_path / "checkpoints" / "last.ckpt"

    def writer(step: int, files: int = 2):
        def write(folder):
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(files):
                if i == 1 and step < 0:
                    raise KeyboardInterrupt("killed during the save")
                (folder / f"rank{i}.pt").write_text(str(abs(step)))

        return write

    def save(step: int, sign: int = 1):
        replace_folder(last, step, writer(sign * step), True, lambda: None)

    def content():
        return sorted(p.read_text() for p in last.glob("*.pt"))

    save(4)
    assert last.is_symlink() and content() == ["4", "4"]
    with pytest.raises(KeyboardInterrupt):
        save(8, sign=-1)  # killed after the first process's file
    assert content() == ["4", "4"] and (last.parent / "last.step8.ckpt").is_dir()  # the old one, whole
    save(8)
    assert content() == ["8", "8"]
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "last.step8.1.ckpt"]  # the rest cleared
    save(8)  # the same step again is a new folder too: the one last.ckpt links is never written into
    assert content() == ["8", "8"]
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "last.step8.ckpt"]
    # a file system without symlinks: two renames, every save (not written in place from then on)
    real_symlink = Path.symlink_to
    monkeypatch.setattr(Path, "symlink_to", lambda *a: (_ for _ in ()).throw(OSError("not supported")))
    save(12)
    assert last.is_dir() and not last.is_symlink() and content() == ["12", "12"]
    with pytest.raises(KeyboardInterrupt):
        save(16, sign=-1)
    assert content() == ["12", "12"]
    original_rename = Path.rename

    def killed_between_the_renames(self, target):
        original_rename(self, target)
        if Path(target).name == "last.replaced.ckpt":
            raise KeyboardInterrupt("killed between the two renames")

    monkeypatch.setattr(Path, "rename", killed_between_the_renames)
    with pytest.raises(KeyboardInterrupt):
        save(20)
    monkeypatch.setattr(Path, "rename", original_rename)
    assert not last.exists() and resume_checkpoint(last.parent) == last.parent / "last.replaced.ckpt"
    assert sorted(p.read_text() for p in resume_checkpoint(last.parent).glob("*.pt")) == ["12", "12"]
    save(24)
    assert content() == ["24", "24"] and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert resume_checkpoint(last.parent) == last
    monkeypatch.setattr(Path, "symlink_to", real_symlink)
    save(28)  # symlinks again: the folder last.ckpt was is replaced by the link
    assert last.is_symlink() and content() == ["28", "28"]
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "last.step28.ckpt"]
    assert writes_folders(FSDPStrategy(state_dict_type="sharded")) and not writes_folders(FSDPStrategy())
    assert not writes_folders(SingleDeviceStrategy(torch.device("cpu")))


def test_last_checkpoint_goes_through_the_folder_swap_in_a_real_fit_and_resumes_from_the_link(tmp_path, monkeypatch):
    """The wiring of `replace_folder` into Lightning's saving, on CPU: DeepSpeed (which writes folders) needs a GPU,
    so here the single-file checkpoint takes the same route, and a second fit resumes through the link."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    import hicom.callbacks.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "writes_folders", lambda strategy: True)
    dirpath = tmp_path / "checkpoints"

    def fit(max_steps: int, ckpt_path=None) -> L.Trainer:
        trainer = L.Trainer(
            accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[checkpoint.LastCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=3)],
        )  # fmt: skip
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)
        return trainer

    fit(7)  # saves at steps 3 and 6, and at the end (7)
    last = dirpath / "last.ckpt"
    assert last.is_symlink() and last.readlink().name == "last.step7.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 7
    assert fit(9, ckpt_path=last).global_step == 9 and last.readlink().name == "last.step9.ckpt"
    assert not (dirpath / "last-v1.ckpt").exists()  # the same name, saved again


def test_a_checkpoint_that_cannot_be_written_says_where_and_how_much_space_is_left(tmp_path, monkeypatch):
    """A full disk surfaces from torch.save as 'unexpected pos' (seen writing a 15.8 GB DeepSpeed optimizer shard):
    the fit stops naming the checkpoint, the free space and the way on, and the last.ckpt before stays whole."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from hicom.callbacks.checkpoint import CheckpointWriteError, LastCheckpoint

    dirpath = tmp_path / "checkpoints"
    saved = []
    original = ModelCheckpoint._save_checkpoint

    def disk_fills(self, trainer, filepath):
        if saved:  # the first save goes through, the next finds the disk full
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15826249536 vs 15826249368")
        saved.append(filepath)
        original(self, trainer, filepath)

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", disk_fills)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[LastCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=3)],
    )  # fmt: skip
    with pytest.raises(
        CheckpointWriteError, match=r"last\.ckpt failed \(RuntimeError: .*unexpected pos.*GiB free"
    ) as err:
        trainer.fit(BoringModel())
    assert "callbacks.model_checkpoint.dirpath" in str(err.value)
    assert torch.load(dirpath / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_single_file_checkpoint_cut_short_in_its_write_leaves_the_one_before_whole(tmp_path, monkeypatch):
    """Lightning writes a checkpoint to a temporary file in TMPDIR and moves it into place, which where TMPDIR is
    another file system is a copy over last.ckpt; LastCheckpoint has it written beside its place and renamed into
    it. A write stopped part-way (here: half the bytes, then an error) leaves the last.ckpt before whole."""
    import io

    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from hicom.callbacks.checkpoint import CheckpointWriteError, LastCheckpoint

    dirpath = tmp_path / "checkpoints"
    original, written = torch.save, []

    def cut_short(checkpoint, filepath, *args, **kwargs):
        if written:
            buffer = io.BytesIO()
            original(checkpoint, buffer)
            with open(filepath, "wb") as f:  # where the bytes go as the write runs, until the job is killed
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError("killed during the write")
        written.append(filepath)
        original(checkpoint, filepath, *args, **kwargs)

    monkeypatch.setattr(torch, "save", cut_short)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[LastCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=3)],
    )  # fmt: skip
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt failed \(OSError: killed during the write\)") as err:
        trainer.fit(BoringModel())
    assert torch.load(dirpath / "last.ckpt", weights_only=True)["global_step"] == 3
    assert "the checkpoint written before this one" in str(err.value) and str(dirpath / "last.ckpt") in str(err.value)
    assert Path(written[0]).name == ".last.ckpt.partial"  # beside its place
    assert [p.name for p in dirpath.iterdir()] == ["last.ckpt"]  # the failed write's part (a full disk's) is gone


def test_a_checkpoint_goes_straight_to_its_folder_not_through_tmpdir(tmp_path, monkeypatch):
    """A node's small /tmp (or one that is gone) fails nothing: Lightning's path serialised the checkpoint in memory
    and wrote it into TMPDIR first. A folder that cannot be written is named as such, not as a full disk."""
    import errno
    import tempfile

    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from hicom.callbacks.checkpoint import CheckpointWriteError, DirectCheckpointIO, LastCheckpoint

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))  # mkstemp there fails

    def fit(dirpath):
        trainer = L.Trainer(
            accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[LastCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=1)],
        )  # fmt: skip
        trainer.fit(BoringModel())
        return trainer

    trainer = fit(tmp_path / "checkpoints")
    assert isinstance(trainer.strategy.checkpoint_io, DirectCheckpointIO)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (tmp_path / "checkpoints" / ".last.ckpt.partial").exists()

    def read_only(*args, **kwargs):  # what the file system and torch's C++ writer say
        raise OSError(errno.EROFS, "Read-only file system")

    def torch_says(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only")

    import hicom.callbacks.checkpoint

    monkeypatch.setattr(hicom.callbacks.checkpoint, "open", read_only, raising=False)
    monkeypatch.setattr(torch, "save", torch_says)
    with pytest.raises(CheckpointWriteError, match="its folder cannot be written") as err:
        fit(tmp_path / "elsewhere")
    assert "no earlier checkpoint is there to resume from" in str(err.value) and "GiB free" not in str(err.value)


@pytest.mark.parametrize(
    ("ready", "last", "accumulation", "within"),
    [(3, False, 2, 1), (4, False, 2, 0), (5, True, 2, 0), (7, False, 4, 3), (3, False, 1, 0)],
)
def test_a_checkpoint_knows_the_micro_batches_it_was_written_after_within_a_step(ready, last, accumulation, within):
    """Lightning's epoch-loop counts say how far into an optimizer step a checkpoint was written; an epoch's last
    batch steps whatever the count."""
    from hicom.utils.checkpoints import micro_batches_within_step

    progress = {"current": {"ready": ready, "completed": ready}, "is_last_batch": last}
    checkpoint = {"loops": {"fit_loop": {"epoch_loop.batch_progress": progress}}}
    assert micro_batches_within_step(checkpoint, accumulation) == within
    assert micro_batches_within_step({}, accumulation) == 0  # not a fit's checkpoint


def test_a_bad_sample_met_again_each_epoch_is_one_example():
    guard = BadSampleGuard(max_fraction=0.9, window=1000)
    for epoch in range(3):  # the same missing clip, each epoch; then another
        guard.on_train_batch_start(ONE_PROCESS, Recorder(), batch(7, ["missing"]), epoch)
    guard.on_train_batch_start(ONE_PROCESS, Recorder(), batch(7, ["timeout", "missing"]), 3)
    assert guard.examples["missing"] == ["s0 (v.mp4): e", "s1 (v.mp4): e"]
