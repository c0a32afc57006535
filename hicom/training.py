"""One training run from a composed config: build, fit, score the held-out questions, report."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import math
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from hicom.callbacks.checkpoint import resume_checkpoint
from hicom.callbacks.throughput import BatchFlops
from hicom.utils.choices import flag, whole_number
from hicom.utils.config import shell_override
from hicom.utils.files import RunFolderTaken
from hicom.utils.instantiators import (
    check_data,
    check_model,
    check_pretrained,
    check_tokenizers,
    ensure_dir,
    finish_loggers,
    finish_open_wandb_run,
    instantiate_all,
    write_assets,
)

log = logging.getLogger(__name__)
# Lightning (2.6) builds torch's LeafSpec, which torch 2.10 and later deprecate, on every fit's batch-size probe: a
# warning in the first lines of each run about code that is neither ours nor the user's
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

# checkpoint files up to this size are read whole before a resume, to find damaged bytes (a few seconds per GiB)
CRC_CHECKED_BYTES = 4 * 2**30
# The classes DeepSpeed pickles into its checkpoint files besides tensors and plain values (the loss scaler, the
# ZeRO stage, ZeRO-1/2's parameter fragments). Its engine loads those files with torch.load(weights_only=False),
# which runs whatever a pickle names: a resume checks first that they name nothing else.
DEEPSPEED_PICKLED = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)

# the exit status of a fit stopped by SIGTERM, as a shell reports a process the signal ended (128 + 15)
STOPPED_BY_SIGTERM = 143


@contextlib.contextmanager
def _unfinished_on_sigterm(trainer, cfg: DictConfig, what: str, resume: str | None = None) -> Iterator[None]:
    """Lightning ends a fit or test that SIGTERM (or Ctrl-C, see GracefulInterrupt) stopped with a SystemExit of no
    code: the run would exit 0, "finished", and a scheduler's afterok would go on. It exits STOPPED_BY_SIGTERM,
    saying how to go on: `resume`, or `resume_command`."""
    try:
        yield
    except SIGTERMException as stop:
        if resume is None and resume_checkpoint(Path(cfg.paths.output_dir) / "checkpoints") is None:
            # stopped before its first save (in the sanity check, which writes none): ckpt_path=<run> would fail
            again = "the same command (from its ckpt_path again)" if cfg.get("ckpt_path") else None
            log.error(
                "stopped by SIGTERM or Ctrl-C at step %d, before the end of %s and before anything was saved "
                "(no checkpoints/last.ckpt); to start it again: %s",
                trainer.global_step,
                what,
                again or command_again(shell_override("hydra.run.dir", cfg.paths.output_dir)),
            )
        else:
            log.error(
                "stopped by SIGTERM or Ctrl-C at step %d, before the end of %s (checkpoints/last.ckpt holds that "
                "step); to go on from there: %s",
                trainer.global_step,
                what,
                resume or resume_command(cfg),
            )
        raise SystemExit(STOPPED_BY_SIGTERM) from stop


def resume_command(cfg: DictConfig) -> str:
    """How a fit stopped part-way goes on in its own run folder: its command again with that folder as both
    `hydra.run.dir` and `ckpt_path`. `ckpt_path` alone resumes into a new folder (named by the time it starts),
    and every preemption would leave a run folder behind, with a whole last.ckpt."""
    run = cfg.paths.output_dir
    again = f"{shell_override('hydra.run.dir', run)} {shell_override('ckpt_path', run)}"
    return command_again(again, leave_out=("ckpt_path",))


def command_again(settings: str, leave_out: tuple[str, ...] = ()) -> str:
    """This launch's command (its script and command-line overrides, but those of the keys in `leave_out`) with
    `settings` added; where the config was not composed by Hydra's app, a sentence that says to add them."""
    import shlex
    import sys

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return f"the run's command with {settings}"
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweep's job (hparams_search sets it): one run again, not a sweep
        settings = f"{settings} hydra.mode=RUN"
    given = [arg for arg in HydraConfig.get().overrides.task if arg.lstrip("+").split("=", 1)[0] not in leave_out]
    command = " ".join(shlex.quote(arg) for arg in ["python", Path(sys.argv[0]).name, *given])
    return f"{command} {settings} (or your launcher's command, with {settings})"


MATMUL_PRECISIONS = ("highest", "high", "medium")


def matmul_precision(cfg: DictConfig) -> str:
    precision = cfg.get("float32_matmul_precision", "highest")
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"float32_matmul_precision must be one of {list(MATMUL_PRECISIONS)}, got {precision!r}")
    return precision


def set_matmul_precision(cfg: DictConfig) -> None:
    """`float32_matmul_precision` for fp32 matrix products on a GPU (TF32 at "high"); on CPU torch would take it for
    its own reduced-precision kernels, which the default leaves alone."""
    precision = matmul_precision(cfg)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(precision)


def check_trainer(trainer: DictConfig) -> None:
    """The trainer's values that Lightning takes as they are, naming the key: zero counts fail within the fit (a
    division by zero), and `deterministic: yes`, a negative clipping value or a fractional step count are passed
    over without a word."""
    deterministic = trainer.get("deterministic")
    if not (deterministic is None or isinstance(deterministic, bool) or deterministic == "warn"):
        raise ValueError(f"trainer.deterministic must be true, false, warn or null, got {deterministic!r}")
    whole_number("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1))
    # Lightning compares these with its counters: max_steps=1.5 ran 2 steps, log_every_n_steps=0 logged nothing
    whole_number("trainer.max_steps", trainer.get("max_steps", -1), least=-1)  # -1: no limit
    if trainer.get("max_epochs") is not None:
        whole_number("trainer.max_epochs", trainer.max_epochs, least=-1)
    if trainer.get("log_every_n_steps") is not None:
        whole_number("trainer.log_every_n_steps", trainer.log_every_n_steps)
    if trainer.get("check_val_every_n_epoch") is not None:
        whole_number("trainer.check_val_every_n_epoch", trainer.check_val_every_n_epoch)
    interval = trainer.get("val_check_interval")
    batches = isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1
    timed = isinstance(interval, str | DictConfig | dict)  # a time ("DD:HH:MM:SS", {minutes: 30}): Lightning's check
    if not (interval is None or timed or batches or isinstance(interval, float) and 0 < interval <= 1):
        raise ValueError(
            "trainer.val_check_interval must be a whole number of batches >= 1, a fraction of the epoch in (0, 1], "
            f"a time, or null, got {interval!r}"
        )
    try:  # Lightning's own rule, which its Trainer applies only once it is made
        from lightning.fabric.connector import _convert_precision_to_unified_args
    except ImportError:
        pass
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Trainer says its own words on an alias
            try:
                _convert_precision_to_unified_args(trainer.get("precision"))
            except ValueError as err:
                raise ValueError(f"trainer.precision: {err}") from err
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 <= clip < math.inf):
        raise ValueError(
            f"trainer.gradient_clip_val must be a finite number >= 0 (0 or null: no clipping), got {clip!r}"
        )


def check_values(cfg: DictConfig) -> None:
    """The trainer's and the data module's values (the module checks its own as it is made, reading nothing)."""
    check_trainer(cfg.trainer)
    try:
        hydra.utils.instantiate(cfg.data)
    except InstantiationException as err:  # its ValueError, as the other checks raise theirs
        raise ValueError(str(err.__cause__ or err)) from err


def check(cfg: DictConfig):
    """What fails in seconds, before anything is built: the model folders, the model's values and the data (tiny
    assets written first). Returns the compressor built on the meta device (see check_model)."""
    matmul_precision(cfg)
    flag("evaluate", cfg.get("evaluate", False))
    check_values(cfg)
    write_assets(cfg.get("assets"))
    try:
        check_pretrained(cfg)
    except FileNotFoundError as missing:  # and the data's missing files in the same message: not a launch per kind
        try:
            check_data(cfg)
        except FileNotFoundError as missing_data:
            raise FileNotFoundError(f"{missing}\n{missing_data}") from missing
        raise
    check_tokenizers(cfg)
    compressor = check_model(cfg)
    check_trainable(cfg)
    check_data(cfg)
    return compressor


def check_trainable(cfg: DictConfig) -> None:
    """A fit trains at least one part (an evaluation builds the module with none)."""
    from hicom.models.video_llm_module import PARTS

    if not OmegaConf.select(cfg, "model.trainable", default=None):
        raise ValueError(f"model.trainable is empty: a fit needs at least one part to train, of {PARTS}")


def build(cfg: DictConfig, checked: bool = False):
    """The LightningModule and DataModule of a config, `check`ed first unless it was. The data module is made
    first, so that its values fail before the towers and the LLM load (minutes at real sizes)."""
    if not checked:
        check(cfg)
    log.info("data: <%s>", cfg.data._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    log.info("model: <%s>", cfg.model._target_)
    model = hydra.utils.instantiate(cfg.model)
    if (cfg.model.get("lr") or {}).get("injection") is not None:  # what only the guide adds, for its learning rate
        from hicom.modules.video_llm import guide_only_names

        model.guide_only = guide_only_names(model.net, cfg.model.compressor)
    datamodule.use_network(model.net.visual_tokens(), model.net.compressor.uses_guide)
    return model, datamodule


# what a run launched again into its folder must share with the launch before for it to go on from its checkpoint
SAME_RUN_KEYS = ("model", "data", "seed", "global_batch_size")
# settings of the data loading that leave the run what it is
SAME_RUN_UNCHECKED = ("num_workers", "multiprocessing_context", "eval_batch_size", "prefetch_factor", "pin_memory")


def own_checkpoint(cfg: DictConfig) -> Path | None:
    """The last checkpoint an earlier launch left in this run's folder (its checkpoint folder inside the run's),
    which a launch there without ckpt_path goes on from; None where there is none. A launch of another run into
    the folder (its config.yaml's model, data, seed or global batch differ) is refused, naming the differences:
    a requeued job composes the same config, and `ckpt_path=` says a resume with other settings is meant."""

    from hicom.stages import STAGE_LIST

    own = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    run = Path(cfg.paths.output_dir).resolve()
    if (run / STAGE_LIST).is_file() or (run / "stages").is_dir():  # a staged run's: evaluate.py would read this fit
        raise RunFolderTaken(
            f"{run} holds a staged run ({STAGE_LIST}, stages/), beside which this fit would write its own records: "
            "launch it into a new folder (hydra.run.dir; hydra.sweep.dir for a multirun)"
        )
    if not own or not Path(own).resolve().is_relative_to(run):  # a shared checkpoint folder is no run's own
        return None
    found = resume_checkpoint(Path(own))
    written = run / "config.yaml"
    if found is None or not written.is_file():
        return found
    differences = run_differences(OmegaConf.load(written), cfg)
    if differences:
        raise RunFolderTaken(
            f"{found} is the last checkpoint of an earlier launch into this run's folder, which a launch there goes on "
            f"from, and that launch's run was configured otherwise (its config.yaml): {differences}. To start another "
            "run, launch it into a new folder (hydra.run.dir; hydra.sweep.dir for a multirun); to go on from that "
            f"checkpoint with these settings, give it: ckpt_path={found}"
        )
    return found


def run_differences(earlier: DictConfig, cfg: DictConfig, keys: tuple[str, ...] = SAME_RUN_KEYS) -> str:
    """The settings of `keys` (less the loading settings of SAME_RUN_UNCHECKED) in which a run's config.yaml and
    this launch's config differ, as "key: value there, value here; ...", the first 8; empty where none differ."""
    from hicom.stages import _differences, _value

    was, now = ({key: OmegaConf.to_container(c, resolve=True).get(key) for key in keys} for c in (earlier, cfg))
    if isinstance(was.get("model"), dict) and isinstance(was["model"].get("compressor"), dict):
        was["model"]["compressor"] = with_legacy_settings(was["model"]["compressor"])
    for settings in (was, now):
        if isinstance(settings.get("data"), dict):
            settings["data"] = {k: v for k, v in settings["data"].items() if k not in SAME_RUN_UNCHECKED}
    differences = _differences(was, now)
    return "; ".join(f"{key}: {_value(a)} there, {_value(b)} here" for key, a, b in differences[:8])


def warn_resume_differences(cfg: DictConfig) -> None:
    """A resume from the checkpoint ckpt_path gives whose run's config.yaml (in the folder above the checkpoint's
    folder) has other data, seed or global batch: meant, as an explicit ckpt_path says, but logged, naming each,
    since the run then trains on from the checkpoint on something other than what it trained on before. The model's
    settings are checked (and refused) by check_resume."""
    written = Path(cfg.ckpt_path).parent.parent / "config.yaml"
    if not written.is_file():
        return
    try:
        differences = run_differences(OmegaConf.load(written), cfg, tuple(k for k in SAME_RUN_KEYS if k != "model"))
    except Exception as err:  # noqa: BLE001  a file that does not read: nothing to compare, no reason to stop
        log.warning("resuming from %s: its run's %s does not read (%s), so its settings are not compared with these",
                    cfg.ckpt_path, written, err)  # fmt: skip
        return
    if differences:
        log.warning(
            "resuming from %s, whose run was configured otherwise (%s): %s. The fit goes on with this launch's settings",
            cfg.ckpt_path, written, differences,
        )  # fmt: skip


def check_checkpoint(path: Path) -> None:
    """Before anything is built: a checkpoint to resume from exists and is whole. A Lightning checkpoint file is
    a zip archive (torch.save), cut short it has no central directory; DeepSpeed's is a folder."""
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path '{path}' not found: give a run's checkpoints/last.ckpt (or null)")
    if path.is_file():
        _check_archive(f"ckpt_path '{path}'", path, crc=path.stat().st_size <= CRC_CHECKED_BYTES)
    if path.is_dir():
        if (path.parent / "latest").is_file():  # a DeepSpeed checkpoint's tag folder
            raise ValueError(f"ckpt_path '{path}' is inside a DeepSpeed checkpoint: give its parent, '{path.parent}'")
        # DeepSpeed names its tag folder in `latest`, Lightning's sharded FSDP writes `meta.pt`: a folder with
        # neither is a run's folder without checkpoints/last.ckpt, or a save that stopped before naming its parts
        latest = path / "latest"
        named = latest.is_file() and (path / latest.read_text().strip()).is_dir()
        if not (named or (path / "meta.pt").is_file()):
            raise ValueError(
                f"ckpt_path '{path}' is neither a run's folder with checkpoints/last.ckpt nor a checkpoint folder "
                "(DeepSpeed's 'latest' or FSDP's 'meta.pt' missing: a save that stopped part-way?); resume from "
                "another checkpoint (ckpt_path=), or move this one away and the fit starts from its beginning"
            )
        if named:
            check_deepspeed_files(path, path / latest.read_text().strip())


def check_deepspeed_files(path: Path, tag: Path) -> None:
    """A DeepSpeed checkpoint's files, before its engine loads them with torch.load(weights_only=False): each whole
    (a zip archive; every entry's CRC where the checkpoint is at most CRC_CHECKED_BYTES) and pickling nothing but
    tensors, plain values and the classes of DEEPSPEED_PICKLED, so that the load runs no code a file names; under
    ZeRO 1-3, one optimizer partition for each process that saved it (its model file's dp_world_size)."""
    files = sorted(tag.glob("*.pt"))
    if not files:
        raise ValueError(f"ckpt_path '{path}': {tag.name}/ holds no .pt files: resume from another checkpoint")
    crc = sum(file.stat().st_size for file in files) <= CRC_CHECKED_BYTES
    for file in files:
        _check_archive(f"ckpt_path '{path}': {tag.name}/{file.name}", file, crc)
        named = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - DEEPSPEED_PICKLED)
        if named:
            raise ValueError(
                f"ckpt_path '{path}': {tag.name}/{file.name} pickles {named}, which DeepSpeed's load would run (it "
                f"unpickles without weights_only); a DeepSpeed checkpoint holds no classes but "
                f"{sorted(DEEPSPEED_PICKLED)}: refused. If it is yours and a newer DeepSpeed wrote it, add the "
                "class to hicom.training.DEEPSPEED_PICKLED"
            )
    partitions = sorted(tag.glob("*zero_pp_rank_*_optim_states.pt"))  # ZeRO 1-3: one per process that saved
    if partitions:
        model_states = sorted(tag.glob("*model_states.pt"))[0]
        processes = torch.load(model_states, map_location="cpu", weights_only=True, mmap=True).get("dp_world_size")
        if processes is not None and len(partitions) != processes:
            raise ValueError(
                f"ckpt_path '{path}': {tag.name}/ holds the optimizer partitions of {len(partitions)} of the "
                f"{processes} processes that saved it (a save that did not finish on every process, or a copy cut "
                "short): resume from another checkpoint"
            )


def _check_archive(what: str, file: Path, crc: bool) -> None:
    """A torch.save file is a zip archive: cut short it has no central directory; with `crc`, bytes damaged within
    fail an entry's CRC-32 (the whole file is read). `what` names it in the error."""
    again = "resume from another checkpoint (ckpt_path=), or move this one away and the fit starts from its beginning"
    if not zipfile.is_zipfile(file):
        raise ValueError(f"{what} is not a whole checkpoint (truncated or not a torch.save file): {again}")
    if crc:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"{what} is damaged (its entry {bad} fails its CRC check): {again}")


def deepspeed_tag(ckpt: Path) -> Path | None:
    """A DeepSpeed checkpoint folder's tag folder (the one its `latest` names); None for anything else."""
    if not ckpt.is_dir() or not (ckpt / "latest").is_file():
        return None
    return ckpt / (ckpt / "latest").read_text().strip()


def read_checkpoint(path: Path) -> dict | None:
    """A checkpoint's entries without reading its tensors (memory-mapped): a Lightning file (with its state dict),
    or what DeepSpeed's folder keeps beside the engine's state (hyperparameters, init_from, ...; the module's
    tensors are under `module`, a ZeRO-3 shard's empty). None for another folder (FSDP's)."""
    if path.is_dir():
        tag = deepspeed_tag(path)
        files = sorted(tag.glob("*model_states.pt")) if tag is not None else []
        if not files:
            return None
        path = files[0]  # whole: check_checkpoint has read it
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def check_resume(cfg: DictConfig, compressor) -> None:
    """Before the build, as on_load_checkpoint (or the optimizer state's load) will: the checkpoint at ckpt_path
    resumes this run (its start, its trainable parts, and for a Lightning file its compressor's tensors)."""
    from hicom.models.video_llm_module import check_resume_origin

    saved = read_checkpoint(Path(cfg.ckpt_path))
    if saved is None:
        return
    check_resume_origin(saved.get("init_from"), cfg.get("init_from"))
    check_resume_training(saved, cfg.model)
    check_resume_compressor_config(saved.get("compressor_config"), cfg.model.compressor)
    from hicom.stages import same_layer

    layer, trained = OmegaConf.select(cfg, "model.vision.select_layer"), saved.get("select_layer")
    if not same_layer(trained, layer, saved.get("vision_depth")):  # the same weights, other features
        raise ValueError(
            f"this checkpoint's run trained its compressor on the vision tower's hidden state {trained}, this run "
            f"reads {layer}: resume with model.vision.select_layer={trained}, or train on {layer} in a new run"
        )
    if "state_dict" in saved:  # a Lightning file's; DeepSpeed's module names are checked once it has loaded
        check_resume_compressor(saved["state_dict"], compressor)


def check_resume_training(saved: dict, model_cfg: DictConfig) -> None:
    """Before the build: the run trains the parts the checkpoint's run trained, in the same learning-rate groups,
    which its optimizer state is for (otherwise Lightning's load or DeepSpeed's engine fails with a message about
    parameter groups or alignment)."""
    hparams = saved.get("hyper_parameters") or {}
    if "trainable" not in hparams:
        return
    saved_parts, parts = sorted(hparams["trainable"]), sorted(str(p) for p in model_cfg.trainable)
    saved_split = (hparams.get("lr") or {}).get("injection") is not None
    split = (model_cfg.get("lr") or {}).get("injection") is not None
    if saved_parts != parts:
        raise ValueError(
            f"this checkpoint's run trained {saved_parts} and this one trains {parts}: its optimizer state is for "
            f"its own parts. Resume with model.trainable=[{','.join(saved_parts)}]; or, to train other parts from "
            "its weights with a new optimizer, start a stage of a staged experiment from its finished run's folder "
            "(stage=<name> stage_parent=<folder with its handoff.safetensors>)"
        )
    if saved_split != split:
        raise ValueError(
            f"this checkpoint's run {'gave' if saved_split else 'did not give'} the compressor's injection parameters "
            "a learning-rate group of their own (model.lr.injection), and this one "
            f"{'does' if split else 'does not'}: its optimizer state is for its own groups. Resume as it was saved"
        )
    from hicom.stages import _value

    # the optimizer's state restores its groups' rates, decay and betas, and the schedule its base rates: another
    # value here would be written to config.yaml and ignored
    now = {"weight_decay": float(model_cfg.get("weight_decay", 0.0)), "betas": _floats(model_cfg.get("betas"))}
    was = {"weight_decay": float(hparams.get("weight_decay", 0.0)), "betas": _floats(hparams.get("betas"))}
    for group in [*parts, *(["injection"] if split else [])]:
        now[f"lr.{group}"] = _floats((model_cfg.get("lr") or {}).get(group))
        was[f"lr.{group}"] = _floats((hparams.get("lr") or {}).get(group))
    # betas None: the module's default, which the checkpoint records as numbers
    differ = [key for key in now if now[key] != was[key] and not (key == "betas" and None in (now[key], was[key]))]
    if differ:
        raise ValueError(
            "a resume restores the optimizer's state, and with it the learning rates, weight decay and betas it was "
            "saved with: "
            + "; ".join(
                f"model.{key} is {_value(now[key])} here, {_value(was[key])} in the checkpoint" for key in differ
            )
            + ". Resume with the checkpoint's values ("
            + " ".join(f"model.{key}={_value(was[key])}" for key in differ)
            + "); to train on from its weights with other ones, start a stage of a staged experiment from its "
            "finished run's folder (stage=<name> stage_parent=<folder with its handoff.safetensors>)"
        )


def _floats(value):
    """A rate, a decay or betas as plain floats (None stays None), to compare a config's with a checkpoint's."""
    if value is None:
        return None
    if isinstance(value, int | float | str):
        return float(value)
    return [float(v) for v in value]


def with_legacy_settings(saved: dict) -> dict:
    """A checkpoint's compressor config with the settings added since, as its run had them: before
    `train_clip_scale`, a branch with clip scale trained its logit pair (and its optimizer state holds it)."""

    def filled(branch: dict) -> dict:
        if "clip_scale" in branch and "train_clip_scale" not in branch:
            return {**branch, "train_clip_scale": bool(branch["clip_scale"])}
        return branch

    saved = filled(dict(saved))  # a branch configured alone
    for name in ("local", "global_"):
        if isinstance(saved.get(name), dict):
            saved[name] = filled(saved[name])
    return saved


def check_resume_compressor_config(saved: dict | None, compressor: DictConfig) -> None:
    """Before the build: the checkpoint's compressor config (kept since checkpoints record it) is the configured
    one. Another kernel, position table or head count has tensors of the same names and shapes, and would resume
    into another computation without a word."""
    from hicom.stages import _differences, _override, _value

    if saved is None:
        return
    saved = with_legacy_settings(saved)
    now = OmegaConf.to_container(compressor, resolve=True)
    if saved.get("_target_") != now.get("_target_"):
        raise ValueError(
            f"this checkpoint's run trained another compressor ({saved.get('_target_')}; this run's is "
            f"{now.get('_target_')}): resume with the settings of the run it comes from (its config.yaml)"
        )
    differences = _differences(saved, now)
    if differences:
        raise ValueError(
            "this checkpoint's run trained a compressor configured otherwise (model.compressor): "
            + "; ".join(
                f"{key}: the checkpoint's {_value(was)}, this run's {_value(now)}" for key, was, now in differences
            )
            + ". Resume with the checkpoint's ("
            + " ".join(_override(f"model.compressor.{key}", was, now) for key, was, now in differences)
            + "), or train this compressor in a new run"
        )


def check_resume_compressor(state_dict: dict, compressor) -> None:
    """Before the towers load: the checkpoint's compressor tensors are the configured compressor's (names and
    shapes), as the resume will load them strictly; a resume with another compressor config is refused here."""
    if compressor is None:
        return
    prefix = "net.compressor."
    saved = {k[len(prefix) :]: tuple(v.shape) for k, v in state_dict.items() if k.startswith(prefix)}
    wanted = {k: tuple(v.shape) for k, v in compressor.state_dict().items()}
    if saved == wanted:
        return
    missing, unexpected = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    shapes = sorted(f"{k} {saved[k]} != {wanted[k]}" for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    raise ValueError(
        "this checkpoint's compressor is not the configured one (model.compressor): resume with the settings of the "
        f"run it comes from (its config.yaml); missing {missing[:5]}, unexpected {unexpected[:5]}, "
        f"other shapes {shapes[:5]}"
    )


def check_deepspeed_accelerator(trainer) -> None:
    """Lightning's DeepSpeedStrategy refuses any accelerator but CUDA, once the model and data are built."""
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DeepSpeedStrategy) or isinstance(trainer.accelerator, CUDAAccelerator):
        return
    if type(strategy).setup_environment is DeepSpeedStrategy.setup_environment:  # a subclass may run elsewhere
        raise ValueError(
            f"the strategy is DeepSpeed, which Lightning runs on CUDA GPUs only, and the accelerator is "
            f"{type(trainer.accelerator).__name__}: trainer=gpu on a GPU machine, or on this one '~strategy' (one "
            "process) or strategy=ddp"
        )


def check_multirun_launch(trainer) -> None:
    """A multirun's jobs run one after another in one process. Lightning's own launcher starts a job's other
    processes with the command that started this one, the whole sweep (`-m`) included: each of them would run the
    sweep again, into a sweep folder of its own, a job at a time beside this one's. Refused before the model is
    built; torchrun (or srun) starts every process of the sweep, which then run its jobs in step."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN or trainer.world_size == 1:
        return
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is not None and not environment.creates_processes_externally:
        raise ValueError(
            f"a multirun on {trainer.world_size} processes: Lightning's own launcher would start each job's other "
            "processes with the whole sweep's command (-m), and each would run the sweep again. Start every process "
            "of the sweep with torchrun instead (its jobs then run in step, into one sweep folder): python -m "
            "torch.distributed.run --nproc_per_node=<devices> train.py -m ... (or srun, one task per device)"
        )


def check_throughput_window(cfg: DictConfig) -> None:
    """Lightning's ThroughputMonitor asserts its window holds at least 2 batches when the fit starts, naming nothing."""
    from hydra.utils import get_object

    for name, conf in (cfg.get("callbacks") or {}).items():
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            continue
        target = get_object(conf._target_)  # a class, or a function that builds a callback
        if not (isinstance(target, type) and issubclass(target, ThroughputMonitor)):
            continue
        window = conf.get("window_size", 100)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(
                f"callbacks.{name}.window_size must be a whole number >= 2 (the batches a rate is measured over), "
                f"got {window!r}"
            )


def check_writable(folder: Path, what: str, setting: str) -> None:
    """Before the fit: `folder` (made where missing) takes a small file, removed again, so that a read-only or
    forbidden folder stops the run now rather than at its first checkpoint, an hour in. `what` names the folder
    and `setting` what moves it, in the error. Object storage is not tried."""
    import os
    import socket

    from fsspec.utils import get_protocol

    if get_protocol(str(folder)) != "file":
        return
    probe = Path(folder) / f".write_test.{socket.gethostname()}.{os.getpid()}"  # each process of a launch its own
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"hicom")
    except OSError as err:
        raise OSError(
            f"{what} {folder} cannot be written ({type(err).__name__}: {err}): a read-only file system, no "
            f"permission or a full disk; point {setting} at a folder this job can write"
        ) from err
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def gradient_accumulation(global_batch: int | None, micro_batch: int, world_size: int) -> int:
    """Accumulation steps that make `global_batch` samples per optimizer step from `micro_batch` per process on
    `world_size` processes (1 when no global batch is set)."""
    if global_batch is None:
        return 1
    whole_number("global_batch_size", global_batch)
    per_step = micro_batch * world_size
    if global_batch < per_step or global_batch % per_step:
        raise ValueError(
            f"global_batch_size {global_batch} is not a multiple of data.batch_size {micro_batch} x world size "
            f"{world_size} = {per_step}: change one of them"
        )
    return global_batch // per_step


def check_global_batch(cfg: DictConfig) -> None:
    """Before anything is built: `global_batch_size` against the micro batch and the number of processes, as the
    launcher tells it (WORLD_SIZE under torchrun, SLURM_NTASKS under srun) or, launched as one process, as the
    trainer will start them (`trainer.devices` x `trainer.num_nodes`, Lightning's own launcher: it starts the others
    only once this one has built the model). The trainer checks it again once it knows the world size itself."""
    import os

    if cfg.get("global_batch_size") is None:
        return
    from hicom.utils.config import srun_tasks

    world = int(os.environ.get("WORLD_SIZE") or srun_tasks())
    if world == 1 and "WORLD_SIZE" not in os.environ:
        world = planned_processes(cfg.get("trainer") or {})
    micro = whole_number("data.batch_size", cfg.data.batch_size)
    gradient_accumulation(cfg.global_batch_size, micro, world)


def planned_processes(trainer: DictConfig | dict) -> int:
    """The processes a trainer config starts on its own: devices per node (a count, or a list of device ids;
    "auto" or -1: the GPUs there are on a GPU accelerator, else 1) times nodes; 1 where that cannot be told."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:  # Lightning's "0,1"
        count = len([d for d in devices.split(",") if d.strip()])
    elif devices in ("auto", -1, "-1"):
        gpu = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
        count = torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
    else:
        try:
            count = int(devices)
        except (TypeError, ValueError):
            return 1
    try:
        return max(count, 1) * max(int(nodes), 1)
    except (TypeError, ValueError):
        return max(count, 1)


def parameter_report(model) -> Table:
    table = Table(title="parameters")
    for column in ("part", "parameters", "trainable"):
        table.add_column(column, justify="right" if column != "part" else "left")
    for part, total, trainable in model.parameter_table():
        table.add_row(part, f"{total:,}", f"{trainable:,}")
    return table


def batch_flops(cfg: DictConfig, trainable) -> BatchFlops | None:
    """ThroughputMonitor's FLOP count of a batch (hicom.callbacks.throughput.BatchFlops), from the parts built on
    the meta device as the dry run builds them, but from the config.json of the folders the run loaded rather than
    the bundled architecture a model config names (another size of model at `path`, or another vocabulary, would
    count as the bundled one); None, with a log line, where they cannot be built (a release folder's LLM, say,
    whose config transformers does not know)."""
    import copy

    from hicom.dry_run import build_meta

    loaded = copy.deepcopy(cfg)
    with open_dict(loaded):
        for part in (loaded.model.vision, loaded.model.llm):
            if part.get("arch") and part.get("path") and (Path(part.path) / "config.json").is_file():
                part.arch = None
    try:
        return BatchFlops(build_meta(loaded), trainable)
    except Exception as err:  # a figure on the dashboard, never a reason to stop a run
        log.info("no FLOP count for the throughput monitor (flops_per_sec, mfu): %s: %s", type(err).__name__, err)
        return None


def train(cfg: DictConfig, before_fit=None, after_fit=None, resume: str | None = None) -> dict:
    """Fit the configured model and return the run's figures (also written to <output_dir>/metrics.json).

    `before_fit(model)` / `after_fit(model)` run around the fit, on every process (the stage runner loads and
    saves hand-offs there); `resume` is how a fit stopped by SIGTERM goes on (ckpt_path=<output_dir> if None).
    Without `after_fit`, the trained parts are written as a hand-off into the output folder
    (handoff.safetensors + manifest.json), beside config.yaml: what `evaluate.py ckpt=<folder>` reads.
    """
    if cfg.seed is not None:  # Lightning's own error names no key ("invalid literal for int()")
        whole_number("seed", cfg.seed, least=0)
    seed = L.seed_everything(cfg.seed, workers=True)
    if cfg.seed is None:  # Lightning's pick (PL_GLOBAL_SEED, else 0): data.seed=${seed} and config.yaml take it too
        with open_dict(cfg):
            cfg.seed = seed
    set_matmul_precision(cfg)
    if cfg.get("init_from"):  # the release's LLM loads from its folder; the rest is imported once built
        from hicom.compat.official import use_release_llm

        missing = f"init_from={cfg.init_from} is not an HF folder in the release's layout"
        with open_dict(cfg):  # config.yaml names the folder absolutely, wherever evaluate.py reads it
            cfg.init_from = use_release_llm(cfg, cfg.init_from, missing)
    found = None  # the checkpoint of an earlier launch into this run's folder
    if not cfg.get("ckpt_path"):  # a run launched again in its own folder (a requeued job) goes on where it stopped
        found = own_checkpoint(cfg)
        if found is not None:
            log.info("%s is the last checkpoint of an earlier launch into this run's folder: resuming from it", found)
            cfg.ckpt_path = str(found)
    if cfg.get("ckpt_path"):
        last = resume_checkpoint(Path(cfg.ckpt_path) / "checkpoints")
        if last is not None:  # a run's folder (as evaluate.py's ckpt= takes): its last checkpoint
            cfg.ckpt_path = str(last)
        check_checkpoint(Path(cfg.ckpt_path))
        if found is None:  # the folder's own is compared whole by own_checkpoint
            warn_resume_differences(cfg)
    compressor = check(cfg)  # missing weights or data first: the user's first fix
    if cfg.get("init_from"):
        from hicom.compat.official import check_release_start

        check_release_start(cfg)
    if cfg.get("ckpt_path"):
        try:
            check_resume(cfg, compressor)
        except ValueError as err:
            if found is None:
                raise
            raise RunFolderTaken(
                f"{found} is the last checkpoint of an earlier launch into this run's folder, which a launch there "
                f"goes on from, and it is not this launch's run: {err}. To start another run, launch it into a new "
                "folder (hydra.run.dir; hydra.sweep.dir for a multirun), or move that one's checkpoints away"
            ) from err
    check_writable(Path(cfg.paths.output_dir), "the run folder", "hydra.run.dir (or HICOM_LOGS)")
    out_dir = ensure_dir(cfg.paths.output_dir)
    # the trainer (with its loggers and callbacks) and the batch arithmetic next: their values fail in seconds,
    # before the towers and the LLM load
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"trainer.accelerator={accelerator}, and this torch ({torch.__version__}) sees no CUDA GPU: "
                "trainer=default trains on the CPU (with '~strategy' where the experiment picks DeepSpeed)"
            )
    from hicom.stages import uses_deepspeed

    if uses_deepspeed(cfg) and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            "the strategy is DeepSpeed (the recipe's strategy=deepspeed_zero0 / its stages' ZeRO stage), and deepspeed "
            "is not installed: pip install -e .[gpu] on a GPU machine, or train without it: '~strategy' (one process) "
            "or strategy=ddp"
        )
    finish_open_wandb_run()
    loggers = instantiate_all(cfg.get("logger"), "logger")
    callbacks = instantiate_all(cfg.get("callbacks"), "callback")
    check_throughput_window(cfg)
    for callback in callbacks:  # before the towers and the LLM load, and hours before the first save
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            check_writable(Path(callback.dirpath), "the checkpoint folder", "callbacks.model_checkpoint.dirpath")
    if not loggers:  # `~logger`: nothing to write learning rates to (Lightning's monitor would refuse at the fit)
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_deepspeed_accelerator(trainer)
    check_multirun_launch(trainer)
    if cfg.get("global_batch_size") is not None:
        if cfg.trainer.get("accumulate_grad_batches", 1) != 1:
            raise ValueError("set global_batch_size or trainer.accumulate_grad_batches, not both")
        micro = int(cfg.data.batch_size)
        trainer.accumulate_grad_batches = gradient_accumulation(cfg.global_batch_size, micro, trainer.world_size)
        log.info(
            "global batch %d = micro batch %d x %d processes x %d accumulation steps",
            cfg.global_batch_size, micro, trainer.world_size, trainer.accumulate_grad_batches,
        )  # fmt: skip
    model, datamodule = build(cfg, checked=True)
    if cfg.get("init_from"):
        from hicom.compat.official import import_official

        import_official(model.net, cfg.init_from, loaded=("llm",))
        model.init_from = cfg.init_from  # kept in its checkpoints: a resume must name a release folder too
    if any(isinstance(c, ThroughputMonitor) for c in callbacks):
        model.batch_flops = batch_flops(cfg, model.trainable)
    console = Console()
    console.print(parameter_report(model))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    model.compressor_config = OmegaConf.to_container(cfg.model.compressor, resolve=True)
    if before_fit is not None:
        before_fit(model)
    from hicom.stages import frozen_in_trained

    model.as_loaded = frozen_in_trained(model)  # what the hand-off writes of them, whatever the engine casts
    # once the launch has been built and checked: a launch refused before would leave the config of a run it never
    # made beside the hand-off of the one that was (evaluate.py builds the model from this file)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()  # an earlier stage of this process does not count
    start = model.fit_clock = time.perf_counter()
    # a checkpoint holds tensors and plain values only: unpickling anything else is refused whatever torch's default
    # (weights_only=False before torch 2.6); Lightning before 2.5 has no such argument, and torch's default rules
    safe = {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}
    with _unfinished_on_sigterm(trainer, cfg, "the fit", resume):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), **safe)
    fit_seconds = time.perf_counter() - start
    if trainer.global_step == 0:  # e.g. max_steps=0, max_epochs=0 or limit_train_batches=0: allowed, but said
        log.warning(
            "this fit took no optimizer step (trainer.max_steps / max_epochs / limit_train_batches): what it hands "
            "off and scores are the weights it started from"
        )
    # on a GPU: the most memory any process held at once during the fit (torch's allocator; the driver's own and
    # other processes' use come on top), in GiB
    peak = (
        torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    peaks = [row[0] for row in _gathered([peak]) if row[0] is not None]
    # every process's counts, with those of the launches a resume goes on from: the run's, and its seconds of fitting
    run = model.fit_so_far(fit_seconds)
    batches, samples, videos, video_tokens, flops = (
        run[key] for key in ("batches", "samples", "videos", "video_tokens", "flops")
    )  # flops: None where a process turned counting off
    fit_seconds = run["seconds"]
    if batches and not samples:  # every training sample was skipped: the weights are the untrained ones
        reasons = Counter(item["skip"] for item in model.skipped.values())
        fix = "check data.source and the media, or run `python -m hicom.data.preflight`"
        if reasons and reasons.most_common(1)[0][0] == "too_long":
            fix = f"raise data.max_length ({cfg.data.get('max_length')}) or lower data.num_frames"
        raise RuntimeError(
            f"no training sample could be used ({batches} batches, all skipped; on this process by reason: "
            f"{dict(reasons)}): {fix}"
        )
    if after_fit is not None:  # on every process: saving may gather sharded parameters
        after_fit(model)
    else:
        from hicom.stages import save_handoff

        save_handoff(model, out_dir, list(model.trainable), None, cfg, write=trainer.is_global_zero)

    # Every process writes into the folder of process 0 (they agree unless a launch gave them no shared run name).
    shared_dir = Path(trainer.strategy.broadcast(str(out_dir)))
    if shared_dir != out_dir:
        log.warning("this process composed its run folder as %s; writing into process 0's, %s", out_dir, shared_dir)
        out_dir = shared_dir
    frames, grid = datamodule.num_frames, model.net.vision.grid
    tokens = model.net.num_visual_tokens(frames)
    metrics = {
        "compressor": model.net.compressor.label,
        "visual_tokens_per_video": tokens,
        # measured over the fit's videos: lower than the above where clips are shorter than num_frames frames
        "mean_visual_tokens_per_video": round(video_tokens / videos, 2) if videos else None,
        "uncompressed_tokens_per_video": frames * grid * grid,
        "compression_ratio": frames * grid * grid / tokens,
        "steps": trainer.global_step,
        "fit_seconds": round(fit_seconds, 1),
        # training samples this fit used (all processes; skipped ones left out) per second of the fit, set-up,
        # validation and checkpoints included
        "train_samples": samples,
        "samples_per_second": round(samples / fit_seconds, 3) if fit_seconds > 0 else None,
        "gpu_peak_memory_gib": round(max(peaks), 2) if peaks else None,
        # the model's training FLOPs (hicom.callbacks.throughput.BatchFlops) per sample, and per second of the fit
        "train_gflop_per_sample": round(flops / samples / 1e9, 3) if flops and samples else None,
        "train_gflops_per_second": round(flops / fit_seconds / 1e9, 3) if flops and fit_seconds > 0 else None,
        # the last logged; a launch that trained no step (a finished run launched again) keeps the run's
        "train_loss": run["train_loss"],
    }
    if cfg.get("evaluate"):  # under fast_dev_run: one test batch, like every other hook
        held_out = getattr(datamodule, "test_set", None)
        if held_out is not None and len(held_out) == 0:  # e.g. a mixture without `val`: nothing to ask
            log.info("no held-out questions (data.source names none): the held-out check is skipped")
            model.results, model.test_failed = [], []
        else:
            with _unfinished_on_sigterm(trainer, cfg, "the held-out questions", resume):
                trainer.test(model, datamodule=datamodule, verbose=False)
        from hicom.eval.score import normalize_answer

        results = merge_shares(_gathered(model.results))
        failed = len(_unique([row for rows in _gathered(model.test_failed) for row in rows], "key"))
        choices = [r for r in results if r["n_options"]]
        open_ended = [r for r in results if not r["n_options"]]  # no options listed: a reply, not a letter
        # a question whose sample could not be read counts wrong, as evaluate.py counts a failed clip; never read,
        # its kind is unknown: it counts among the multiple-choice ones unless every question read is open-ended
        failed_open = failed if open_ended and not choices else 0
        asked, asked_open = len(choices) + failed - failed_open, len(open_ended) + failed_open
        matched = sum(normalize_answer(r["reply"]) == normalize_answer(r["answer"]) for r in open_ended)
        metrics.update(  # None where the data has no held-out questions (e.g. data=llava_json without val_json)
            accuracy=sum(r["pred"] == r["answer"] for r in choices) / asked if asked else None,
            chance=sum(1 / r["n_options"] for r in choices) / len(choices) if choices else None,
            n_questions=len(results) + failed,
            n_unparsed=sum(r["pred"] is None for r in choices),
            n_failed=failed,
            # open-ended questions, left out of the accuracy and its chance: scored by exact match (the reply and
            # the answer normalised as hicom.eval.score does for the open-ended benchmarks)
            n_open_ended=len(open_ended),
            open_ended_exact_match=matched / asked_open if asked_open else None,
        )
        if failed:
            log.warning("%d of %d held-out questions could not be read: counted wrong", failed, len(results) + failed)
        if open_ended:
            log.info(
                "%d of %d held-out questions list no options: left out of the accuracy, scored by exact match",
                len(open_ended), len(results) + failed,
            )  # fmt: skip
    # the run's: its fitting before this launch (a resume's) and this launch's fit and held-out check
    metrics["wall_seconds"] = round(time.perf_counter() - start + float(model.earlier.get("seconds", 0.0)), 1)
    metrics["skipped_samples"] = [
        {k: item[k] for k in ("id", "skip", "path", "error", "source") if k in item} for item in model.skipped_so_far()
    ]
    summary = {f"summary/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):  # its HPARAMS tab: each run's config beside these figures
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True), summary, trainer.global_step)
        else:
            logger.log_metrics(summary, trainer.global_step)
    finish_loggers(loggers)
    if trainer.is_global_zero:
        if "n_questions" in metrics:
            _write_jsonl(out_dir / "predictions.jsonl", results)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        console.print(summary_table(metrics))
        log.info("metrics written to %s", out_dir / "metrics.json")
    return metrics


def release_process_group(metrics: dict | None = None, more_jobs: bool = False) -> dict | None:
    """Close the process group Lightning opened and leaves open, once every process has come this far. Left to the
    interpreter's exit, gloo's worker threads can outlive its teardown and abort a process whose run succeeded
    (SIGABRT, "terminate called without an active exception"), which fails the whole launch.

    `more_jobs` (a multirun under torchrun: each process runs every job): the group stays open for the next job,
    which Lightning then takes as it is, and closes as the process exits (before the interpreter's teardown). Opened
    again per job, it met the last job's rendezvous keys in torchrun's store under the same names: a process that
    got there first read process 0's old address and failed ("Connection refused"), or, with NCCL, an old id.

    Returns `metrics` as process 0 has them, on every process: under torchrun each process runs its own sweeper,
    and the figures of each one's own clock (fit_seconds, samples_per_second) would lead their seeded samplers to
    suggest different trials to the processes of one job."""
    import atexit

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        dist.barrier()
        if more_jobs:
            atexit.unregister(_close_process_group)  # once, whatever the count of jobs
            atexit.register(_close_process_group)
        else:
            dist.destroy_process_group()
    return metrics


def _close_process_group() -> None:
    """At a multirun's exit: the last job's release_process_group has had every process come that far, so no
    barrier (a process leaving on an error would wait in one for the others, which go on)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _gathered(rows: list) -> list[list]:
    """`rows` of every process, in rank order (this process's alone outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [list(rows)]
    everyone: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, list(rows))
    return everyone


def merge_shares(shares: list[list[dict]]) -> list[dict]:
    """The held-out answers of every process as one list in the held-out set's order, each question once.

    Under DDP the distributed sampler deals each process a share, repeating a few questions to even the shares
    out; each answer carries its question's position in the held-out set (ids need not be unique), which orders
    them and drops the repeats.
    """
    unique = _unique([row for rows in shares for row in rows], "position")
    return [unique[position] for position in sorted(unique)]


def _unique(rows: list[dict], key: str) -> dict:
    """The first row of each `key`, by key."""
    unique: dict = {}
    for row in rows:
        unique.setdefault(row[key], row)
    return unique


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def summary_table(metrics: dict) -> Table:
    table = Table(title="run summary")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key == "skipped_samples":
            value = ", ".join(f"{s['id']} ({s['skip']})" for s in value) or "none"
        elif isinstance(value, float):
            value = f"{value:.3f}"
        elif value is None:
            value = "n/a"
        table.add_row(key, str(value))
    return table
