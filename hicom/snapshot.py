"""A run's weights at one of its checkpoints, as a folder `evaluate.py` and `ask.py` read: score a run part-way.

    python -m hicom.snapshot <run folder> [ckpt=<checkpoint>] [out=<folder>] [<train.py override> ...]
    python -m hicom.snapshot <staged run>[/stages/<name>] [ckpt=<checkpoint of a stage>] [out=<folder>] [...]

A run hands off its trained parts when its fit ends; a run of days is worth scoring before that. This composes the
run's own config again (configs/ and the overrides Hydra recorded in <run>/.hydra/overrides.yaml, checked against
the config.yaml the run wrote), and fits it from the checkpoint (default: the run's checkpoints/last.ckpt) with
trainer.max_steps=0: Lightning restores the checkpoint, takes no step, and the fit's end writes the hand-off it
always writes (the parts it trains, in the fp32 their optimizer steps: under DeepSpeed the engine's masters), with
config.yaml and manifest.json, into `out` (default: <run>/snapshots/<checkpoint name>-<time>). No checkpoint, log
or held-out check is written there (evaluate=true asks the held-out questions too). The run's training data and
model folders must be where the run had them, as for a resume. A DeepSpeed checkpoint is read in one plain
process, on the CPU, however many wrote it (`gathered`); launched with several (torchrun, srun), it is restored by
Lightning as above.

A staged run's stage is taken as the stage runner resumes it: its config is the stage's (stage_config), its
parent's hand-off loads before the checkpoint restores (the parts trained by earlier stages and frozen in this one
come from there), and the stage's hand-off (the parts carried and trained so far) is written into `out` (default:
<run>/snapshots/<stage>-<checkpoint name>-<time>). Given the run's folder, the stage is the one that stopped or is
running part-way; a stage's folder, or a checkpoint in it, names one. A finished stage's folder is read by
evaluate.py as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from hicom.utils.config import run_stamp

# what a snapshot sets itself, whatever the run's launch said (the logger and the checkpoint callback, which it
# leaves out, are taken away once the config is composed: a stage's own settings of theirs merge first)
SET_HERE = ("ckpt_path", "trainer.max_steps", "evaluate")


def _key(override: str) -> str:
    """The config key a command-line override sets (`+a.b=1`, `~a.b`: `a.b`)."""
    return override.lstrip("+~").split("=", 1)[0]


def _set_here(key: str) -> bool:
    """Whether a recorded override is of what the snapshot sets itself, or Hydra's own."""
    return any(key == name or key.startswith(f"{name}.") for name in SET_HERE) or key.startswith("hydra.")


def snapshot_config(run: Path, ckpt: Path | None = None, out: Path | None = None, more: list[str] = ()):
    """The train config that writes the snapshot (the run's, or its stage's, from the checkpoint, with no step to
    take), and for a stage the `_Handoff` that loads its parent before the fit and writes its hand-off after it
    (None for a run of one fit)."""
    from hydra import compose, initialize_config_dir

    from hicom.stages import STAGE_LIST
    from hicom.utils.config import project_root

    run = run.absolute()
    stage_dir = None
    if run.parent.name == "stages" and (run.parent.parent / ".hydra" / "overrides.yaml").is_file():
        run, stage_dir = run.parent.parent, run  # a stage's folder: its run's launch is recorded above it
    recorded = run / ".hydra" / "overrides.yaml"
    staged = (run / "stages").is_dir() or (run / STAGE_LIST).is_file()
    if not recorded.is_file() or not (staged or (run / "config.yaml").is_file()):
        raise FileNotFoundError(
            f"{run} is not a run folder train.py made (config.yaml, or a staged run's stages/, and Hydra's record "
            ".hydra/overrides.yaml): give the folder of the run whose checkpoint to read (a multirun's job folder "
            "for one of its jobs; a staged run's folder or one of its stages/<name>)"
        )
    overrides = list(OmegaConf.load(recorded))  # the run's last launch's
    launched = [o for o in overrides if not _set_here(_key(o))]
    set_here = ["trainer.max_steps=0", "evaluate=false"]
    given = [o for o in more if _key(o) not in ("ckpt_path", "trainer.max_steps")]
    with initialize_config_dir(config_dir=str(Path(project_root()) / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*launched, *set_here, *given])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)  # where the stages' folders are found (parent_folder)
    if cfg.get("stages"):
        # a stage resumed on purpose from its checkpoint (stage=<name> ckpt_path=...), as the runner takes it
        resumed = cfg.get("stage") if any(_key(o) == "ckpt_path" for o in overrides) else None
        return _stage_config(cfg, run, stage_dir, ckpt, out, resumed)
    if staged:  # a run's stages/ under a config that names none: other code, or another folder
        raise ValueError(f"{run} holds stages, and its recorded overrides compose a config with no `stages`")
    return _one_fit_config(cfg, run, ckpt, out), None


def checkpoint_folder(run: Path, written: DictConfig) -> Path:
    """Where a run (or stage) folder keeps its checkpoints: the folder its config.yaml names, where the run is now
    (a run copied or moved keeps them in its own checkpoints/, as a resume there takes them), or `run`."""
    recorded = OmegaConf.select(written, "callbacks.model_checkpoint.dirpath")
    if recorded is None:
        return run
    was = OmegaConf.select(written, "paths.output_dir")
    if was and Path(recorded).is_relative_to(was):
        return run / Path(recorded).relative_to(was)
    return Path(recorded)


def _quiet(cfg: DictConfig) -> DictConfig:
    """`cfg` without its loggers and checkpoint callback: a snapshot writes no log and no checkpoint."""
    with open_dict(cfg):
        cfg.pop("logger", None)
        if cfg.get("callbacks"):
            cfg.callbacks.pop("model_checkpoint", None)
    return cfg


def _checkpoint(run: Path, written: DictConfig, ckpt: Path | None) -> Path:
    """The checkpoint to read: `ckpt`, which must be in `run` or its checkpoint folder (named in its config.yaml,
    `written`), or the one a resume takes there."""
    from hicom.callbacks.checkpoint import resume_checkpoint

    own = checkpoint_folder(run, written)
    # not resolved: under DeepSpeed last.ckpt is a link to the step's folder, which the run's next save replaces
    ckpt = resume_checkpoint(own) if ckpt is None else ckpt.absolute()
    if ckpt is None or not ckpt.exists():
        raise FileNotFoundError(f"{run}: no checkpoint to read ({ckpt or own / 'last.ckpt'} is missing)")
    if not (ckpt.is_relative_to(run) or ckpt.is_relative_to(own)):  # another run's weights under this one's name
        raise ValueError(f"ckpt={ckpt} is not a checkpoint of {run} (in neither it nor its checkpoint folder {own})")
    return ckpt


def _one_fit_config(cfg: DictConfig, run: Path, ckpt: Path | None, out: Path | None) -> DictConfig:
    written = OmegaConf.load(run / "config.yaml")
    ckpt = _checkpoint(run, written, ckpt)
    out = (run / "snapshots" / f"{ckpt.name.removesuffix('.ckpt')}-{run_stamp()}") if out is None else out
    with open_dict(cfg):
        cfg.ckpt_path = str(ckpt)
    return _checked(_quiet(cfg), written, run / "config.yaml", out)


def _stage_config(
    cfg: DictConfig, run: Path, stage_dir: Path | None, ckpt: Path | None, out: Path | None, resumed: str | None
):
    """The config of the stage to snapshot (`stage_dir`'s; the one of `ckpt`; else the one part-way), and the
    hand-off that loads its parent before the fit and writes the stage's after it, as the stage runner resumes it.
    `resumed`: the stage the run's last launch resumed on purpose from a checkpoint, whatever its parent holds."""
    from hicom.callbacks.checkpoint import resume_checkpoint
    from hicom.stages import (
        MANIFEST,
        _Handoff,
        _handoff_digest,
        _started_from,
        check_handoff,
        parent_folder,
        stage_config,
    )

    stages = list(cfg.stages)  # all of them: a launch of one alone (stage=<name>) leaves the others' folders
    names = [stage.name for stage in stages]
    root = run / "stages"
    if stage_dir is None and ckpt is not None:  # the stage whose folder (or checkpoint folder) holds it
        stage_dir = next((root / n for n in names if _holds(root / n, ckpt)), None)
        if stage_dir is None:
            raise ValueError(
                f"ckpt={ckpt} is not a checkpoint of {run}: in none of its stages' folders ({root}/<name>, {names})"
            )
    if stage_dir is not None:
        if stage_dir.name not in names:
            raise ValueError(f"{stage_dir} is not a stage of {run} (its stages: {names})")
        if (stage_dir / MANIFEST).is_file() and ckpt is None:
            raise ValueError(
                f"stage {stage_dir.name} is finished: evaluate.py ckpt={stage_dir} reads its hand-off as it is (give "
                "ckpt=<one of its checkpoints> for the weights at an earlier one)"
            )
    else:
        part_way = [
            n for n in names if not (root / n / MANIFEST).is_file() and resume_checkpoint(root / n / "checkpoints")
        ]
        if len(part_way) != 1:
            finished = [n for n in names if (root / n / MANIFEST).is_file()]
            raise ValueError(
                f"{run}: {'no stage' if not part_way else f'stages {part_way}'} part-way (with a checkpoint and no "
                f"hand-off yet; finished: {finished}): give a stage's folder, {root}/<name>, or ckpt=<one of its "
                f"checkpoints>; a finished stage is read by evaluate.py as it is (ckpt={root}/<name>)"
            )
        stage_dir = root / part_way[0]
    i = names.index(stage_dir.name)
    stage = stages[i]
    if not (stage_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{stage_dir} has no config.yaml: stage {stage.name} has not begun its fit")
    written = OmegaConf.load(stage_dir / "config.yaml")
    ckpt = _checkpoint(stage_dir, written, ckpt)
    parent = parent_folder(cfg, i)
    if parent is not None:  # the parts earlier stages trained, which the checkpoint may not hold, come from it
        check_handoff(parent)
        started = _started_from(stage_dir)
        if started is not None and started != _handoff_digest(parent) and resumed != stage.name:
            raise ValueError(
                f"stage {stage.name} began its fit from other weights than {parent} holds now (its hand-off is not "
                f"the one {stage_dir / 'started.json'} records: trained again since): its snapshot would carry that "
                "hand-off's weights, not those the stage trained on, and the stage runner refuses to resume it for "
                f"the same reason. Resumed on purpose (stage={stage.name} ckpt_path=<its checkpoint>), the run's "
                "last launch is taken as it said"
            )
    name = f"{stage.name}-{ckpt.name.removesuffix('.ckpt')}-{run_stamp()}"
    out = run / "snapshots" / name if out is None else out
    stage_cfg = _quiet(stage_config(cfg, stage, out))
    with open_dict(stage_cfg):  # the stage's own config delta may set these: the snapshot's values stand
        stage_cfg.ckpt_path = str(ckpt)
        stage_cfg.trainer.max_steps = 0
        stage_cfg.evaluate = cfg.get("evaluate", False)  # false, unless given to the snapshot
    checked = _checked(stage_cfg, written, stage_dir / "config.yaml", out)
    handoff = _Handoff(parent, out, checked, list(stage.get("new_parameters") or []), stage.get("guide_added"))
    return checked, handoff


def _holds(stage_dir: Path, ckpt: Path) -> bool:
    """Whether `ckpt` is in a stage's folder or the checkpoint folder its config.yaml names."""
    if ckpt.absolute().is_relative_to(stage_dir):
        return True
    try:
        own = checkpoint_folder(stage_dir, OmegaConf.load(stage_dir / "config.yaml"))
    except OSError:  # a stage not begun
        return False
    return ckpt.absolute().is_relative_to(own)


def _checked(cfg: DictConfig, written: DictConfig, where: Path, out: Path) -> DictConfig:
    """`cfg` writing into `out`, once `out` is free and `cfg` is the run's config as `where` wrote it."""
    from hicom.training import run_differences

    if _first_process() and out.exists() and any(out.iterdir()):  # the others find the first one's config.yaml
        raise FileExistsError(f"out={out} holds files already: give an empty or new folder")
    with open_dict(cfg):
        cfg.paths.output_dir = str(out.resolve())
    if cfg.get("init_from"):  # the fit pointed its LLM at the release folder (and config.yaml says so): here too
        from hicom.compat.official import use_release_llm

        missing = f"init_from={cfg.init_from} (the run's) is not an HF folder in the release's layout"
        with open_dict(cfg):
            cfg.init_from = use_release_llm(cfg, cfg.init_from, missing)
    differences = run_differences(written, cfg)
    if differences:  # other code, or an environment variable that moved a folder since the run was launched
        raise ValueError(
            f"the run's recorded overrides compose another config than the one it trained with ({where}): "
            f"{differences}; take the snapshot where the run's folders are as they were (its HICOM_* environment "
            "variables, its code)"
        )
    return cfg


def zero0_state(ckpt: Path, model) -> dict | None:
    """A DeepSpeed ZeRO 0 checkpoint's tensors, by the module's names, whatever the processes that wrote it (ZeRO 0
    writes one model file, whole): the module's (its buffers, and its weights in the precision it trained), the
    trained parameters as the fp32 masters its 16-bit optimizer kept (`fp32_groups`, matched to `model`'s
    optimizer groups by name, count and shapes). None for a checkpoint of ZeRO 1-3 (DeepSpeed's zero_to_fp32 reads
    those)."""
    import torch

    from hicom.training import deepspeed_tag

    tag = deepspeed_tag(ckpt)
    if tag is None or any(tag.glob("*zero_pp_rank_*_optim_states.pt")):
        return None
    saved = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True, mmap=True)
    state = dict(saved["module"])
    optimizer = saved.get("optimizer")
    masters = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if masters is None:  # trained in fp32: the module's weights are those its optimizer stepped
        return state
    names: dict[int, list[str]] = {}  # a tied parameter under each of its names: the module file holds both
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    ours = {group["name"]: group["params"] for group in model.optimizer_groups()}
    theirs = [group.get("name") for group in optimizer["optimizer_state_dict"]["param_groups"]]
    if sorted(theirs, key=str) != sorted(ours, key=str):
        raise ValueError(f"{ckpt}: its optimizer's groups are {theirs}, this model's {list(ours)}: not the run's model")
    for name, kept in zip(theirs, masters, strict=True):
        params = ours[name]
        if [tuple(p.shape) for p in params] != [tuple(m.shape) for m in kept]:
            raise ValueError(
                f"{ckpt}: its optimizer's group {name!r} holds {len(kept)} fp32 masters, this model's "
                f"{len(params)} parameters, or of other shapes: not the run's model"
            )
        for parameter, master in zip(params, kept, strict=True):
            copy = state.get(names[id(parameter)][0])  # the module's 16-bit copy of it, made from the master
            if copy is not None and copy.dtype != master.dtype and not torch.equal(master.to(copy.dtype), copy):
                raise ValueError(
                    f"{ckpt}: the fp32 master matched to {names[id(parameter)][0]} (group {name!r}) does not round to "
                    "the module's copy of it: the optimizer's parameters are in another order than this model's"
                )
            state.update(dict.fromkeys(names[id(parameter)], master))
    return state


def _one_process() -> bool:
    """Whether this launch is one process (not torchrun's or srun's several)."""
    from hicom.utils.config import srun_tasks

    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 and srun_tasks() <= 1


def gathered(cfg: DictConfig, handoff=None) -> dict:
    """The snapshot of a DeepSpeed checkpoint in this one process, on the CPU, however many processes wrote it (a
    run of 32 GPUs, still running, scored from a login node): under ZeRO 1-3 DeepSpeed's zero_to_fp32 gathers the
    fp32 masters of the trained parameters from every process's partition; ZeRO 0 keeps them whole in its one model
    file (`zero0_state`). The model is built from the run's
    config and checked against the checkpoint as a resume is (`check_resume`), a stage's parent loaded first; the
    checkpoint's other tensors (buffers, the frozen weights it kept) load into it; and the hand-off is written
    with the masters, as the fit's end writes it. Returns the figures printed: the checkpoint's step."""
    import lightning as L
    from hydra.utils import instantiate

    from hicom.stages import save_handoff
    from hicom.training import check_checkpoint, check_resume, read_checkpoint
    from hicom.utils.instantiators import check_model, check_pretrained, check_tokenizers, ensure_dir, write_assets

    # the step's folder last.ckpt links to now: all its files are read from it, should the run save again meanwhile
    ckpt = Path(cfg.ckpt_path).resolve()
    check_checkpoint(ckpt)  # whole, and pickling nothing but DeepSpeed's own classes: zero_to_fp32 unpickles it all
    steps = int((read_checkpoint(ckpt) or {}).get("global_step", 0))
    L.seed_everything(cfg.seed, workers=True)  # what the build draws (new modules' init) as the fit's build
    write_assets(cfg.get("assets"))
    check_pretrained(cfg)
    check_tokenizers(cfg)
    compressor = check_model(cfg)
    if cfg.get("init_from"):  # as the fit (its LLM points at the release folder already: _checked), the rest imported
        from hicom.compat.official import check_release_start, import_official

        check_release_start(cfg)
    check_resume(cfg, compressor)
    model = instantiate(cfg.model)
    if cfg.get("init_from"):
        import_official(model.net, cfg.init_from, loaded=("llm",))
        model.init_from = cfg.init_from
    model.compressor_config = OmegaConf.to_container(cfg.model.compressor, resolve=True)
    if handoff is not None:  # the parts earlier stages trained
        handoff.load(model)
    masters = _load_gathered(model, ckpt, lambda: zero0_state(ckpt, model) or _zero_to_fp32(ckpt))
    out = ensure_dir(cfg.paths.output_dir)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if handoff is not None:
        handoff.save(model, masters)
    else:
        save_handoff(model, out, list(model.trainable), None, cfg, masters=masters)
    return {"steps": steps}


def _zero_to_fp32(ckpt: Path) -> dict:
    """DeepSpeed's zero_to_fp32 state of a ZeRO 1-3 checkpoint: its module's tensors, the trained parameters as the
    fp32 masters gathered from every process's partition, lazily (each tensor made whole when taken: ZeRO-3's are
    gathered one at a time)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise ImportError(
            f"{ckpt} is a DeepSpeed checkpoint of ZeRO 1-3, and reading it takes deepspeed, which this environment "
            "lacks (pip install -e .[gpu]; its zero_to_fp32 runs on the CPU)"
        ) from err
    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), lazy_mode=True)
    except (ValueError, KeyError) as err:  # e.g. an older DeepSpeed's bf16 ZeRO 0 partitions (0.19 writes none)
        raise ValueError(
            f"{ckpt}: DeepSpeed's zero_to_fp32 cannot gather this checkpoint's masters ({err}): launch the snapshot "
            "with as many processes as the run had (torchrun, srun), which restore it as a resume does"
        ) from err


def _load_gathered(model, ckpt: Path, read) -> dict:
    """Loads the tensors `read()` gives (`zero0_state`'s or `_zero_to_fp32`'s) into `model` where it holds them in
    their dtype: the fp32 masters of the trained parameters, the checkpoint's buffers and frozen weights; returns,
    by hand-off name, the masters it holds in another dtype. What was read (whole flat groups under ZeRO 1-2) is let
    go when it returns, before the hand-off's copy is made."""
    import torch

    state = read()
    current = model.state_dict(keep_vars=True)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    unexpected, missing = sorted(set(state) - set(current)), sorted(trained - set(state))
    if unexpected or missing:
        raise ValueError(
            f"{ckpt} does not fit the model the run's config builds: trained parameters it lacks {missing[:5]} "
            f"({len(missing)}), tensors the model lacks {unexpected[:5]} ({len(unexpected)})"
        )
    # by hand-off name, <part>.<key within the part> (a part may be a list of modules made for the purpose): each
    # name a trained parameter has there, a tied one's aliases too
    keys: dict[int, list[str]] = {}
    for part, module in model.parts().items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            keys.setdefault(id(tensor), []).append(f"{part}.{key}")
    # into the model where it holds them in their dtype (its fp32 build: the masters bit for bit), else kept apart
    # as the masters the hand-off takes (a 16-bit build); the checkpoint's buffers and frozen weights into it
    masters = {}
    with torch.no_grad():
        for name, lazy in state.items():
            value, target = lazy.contiguous(), current[name]
            if name in trained and target.dtype != value.dtype:
                masters.update(dict.fromkeys(keys.get(id(target), []), value.clone()))
            else:
                target.copy_(value)
    return masters


def _first_process() -> bool:
    """Whether this is the launch's first process (Lightning's own launcher gives the others a LOCAL_RANK only)."""
    from hicom.utils.config import launch_rank

    return launch_rank() == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def main(argv: list[str]) -> Path:
    """The command: `<run or stage folder> [ckpt=<checkpoint>] [out=<folder>] [<train.py override> ...]`; returns
    the folder."""
    from hicom.training import deepspeed_tag, train

    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    named = {key: value for key, _, value in (a.partition("=") for a in argv[1:]) if key in ("ckpt", "out")}
    more = [a for a in argv[1:] if a.partition("=")[0] not in ("ckpt", "out")]
    given_stamp = os.environ.get("HICOM_RUN_STAMP")
    # one stamp for the folder's name here and in the processes Lightning's own launcher starts during the fit
    os.environ["HICOM_RUN_STAMP"] = given_stamp or run_stamp()
    try:
        cfg, handoff = snapshot_config(
            Path(argv[0]),
            Path(named["ckpt"]) if "ckpt" in named else None,
            Path(named["out"]) if "out" in named else None,
            more,
        )
        out = Path(cfg.paths.output_dir)
        try:
            if (
                deepspeed_tag(Path(cfg.ckpt_path)) is not None and _one_process()
            ):  # whatever the processes that wrote it
                if cfg.get("evaluate"):  # the held-out check is a Lightning test loop, which needs the restore
                    raise ValueError(
                        "evaluate=true asks the held-out questions in Lightning's test loop, and this DeepSpeed "
                        "checkpoint is read in one process without one: take the snapshot, then score its folder "
                        "with evaluate.py ckpt=<it> (or launch the snapshot with the run's processes: torchrun, srun)"
                    )
                metrics = gathered(cfg, handoff)
            elif handoff is None:
                metrics = train(cfg)
            else:  # as the stage runner resumes the stage
                metrics = train(cfg, before_fit=handoff.load, after_fit=handoff.save)
        except BaseException:
            if _first_process() and not (out / "manifest.json").is_file():  # refused while loading: no snapshot
                (out / "config.yaml").unlink(missing_ok=True)
                if out.is_dir() and not any(out.iterdir()):
                    out.rmdir()
            raise
    finally:
        if given_stamp is None:
            os.environ.pop("HICOM_RUN_STAMP", None)
        else:
            os.environ["HICOM_RUN_STAMP"] = given_stamp
    if _first_process():
        print(
            f"the run's weights at step {metrics['steps']} are in {out}; score them: python evaluate.py ckpt={out} ..."
        )
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
