"""A run's weights at one of its checkpoints, as a folder `evaluate.py` and `ask.py` read: score a run part-way.

    python -m hicom.snapshot <run folder> [ckpt=<checkpoint>] [out=<folder>] [<train.py override> ...]

A run hands off its trained parts when its fit ends; a run of days is worth scoring before that. This composes the
run's own config again (configs/ and the overrides Hydra recorded in <run>/.hydra/overrides.yaml, checked against
the config.yaml the run wrote), and fits it from the checkpoint (default: the run's checkpoints/last.ckpt) with
trainer.max_steps=0: Lightning restores the checkpoint, takes no step, and the fit's end writes the hand-off it
always writes (the parts it trains, in the fp32 their optimizer steps: under DeepSpeed the engine's masters), with
config.yaml and manifest.json, into `out` (default: <run>/snapshots/<checkpoint name>-<time>). No checkpoint, log
or held-out check is written there (evaluate=true asks the held-out questions too). The run's training data and
model folders must be where the run had them, as for a resume; a DeepSpeed checkpoint of several processes is
restored by as many (launched as the run was, with torchrun or srun). A staged run's stages are not taken: each
finished stage's folder is read by evaluate.py as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

# what a snapshot sets itself, whatever the run's launch said
SET_HERE = ("ckpt_path", "trainer.max_steps", "evaluate", "logger", "callbacks.model_checkpoint")


def _key(override: str) -> str:
    """The config key a command-line override sets (`+a.b=1`, `~a.b`: `a.b`)."""
    return override.lstrip("+~").split("=", 1)[0]


def _set_here(key: str) -> bool:
    """Whether a recorded override is of what the snapshot sets itself (a logger's setting goes with the logger)."""
    return any(key == name or key.startswith(f"{name}.") for name in SET_HERE) or key.startswith("hydra.")


def snapshot_config(run: Path, ckpt: Path | None = None, out: Path | None = None, more: list[str] = ()) -> DictConfig:
    """The train config that writes the snapshot: the run's, from its checkpoint, with no step to take."""
    from hydra import compose, initialize_config_dir

    from hicom.callbacks.checkpoint import resume_checkpoint
    from hicom.training import run_differences
    from hicom.utils.config import project_root, run_stamp

    run = run.absolute()
    recorded = run / ".hydra" / "overrides.yaml"
    staged = ValueError(
        f"{run} is a staged run or one of its stages: evaluate.py reads each finished stage's folder "
        "(<run>/stages/<name>) as it is; a stage's checkpoint part-way is not taken here"
    )
    if (run / "stages").is_dir() or run.parent.name == "stages":
        raise staged
    if not (run / "config.yaml").is_file() or not recorded.is_file():
        raise FileNotFoundError(
            f"{run} is not a run folder train.py made (config.yaml and Hydra's record .hydra/overrides.yaml): give "
            "the folder of the run whose checkpoint to read (a multirun's job folder for one of its jobs)"
        )
    # where the run keeps its checkpoints: its own checkpoints/, or the folder it was given
    written = OmegaConf.load(run / "config.yaml")
    own = Path(OmegaConf.select(written, "callbacks.model_checkpoint.dirpath") or run)
    # not resolved: under DeepSpeed last.ckpt is a link to the step's folder, which the run's next save replaces
    ckpt = resume_checkpoint(own) if ckpt is None else ckpt.absolute()
    if ckpt is None or not ckpt.exists():
        raise FileNotFoundError(f"{run}: no checkpoint to read ({ckpt or own / 'last.ckpt'} is missing)")
    if not (ckpt.is_relative_to(run) or ckpt.is_relative_to(own)):  # another run's weights under this one's name
        raise ValueError(f"ckpt={ckpt} is not a checkpoint of {run} (in neither it nor its checkpoint folder {own})")
    launched = [o for o in OmegaConf.load(recorded) if not _set_here(_key(o))]
    set_here = [f"ckpt_path={ckpt}", "trainer.max_steps=0", "evaluate=false", "~logger", "~callbacks.model_checkpoint"]
    given = [o for o in more if _key(o) not in ("ckpt_path", "trainer.max_steps")]
    with initialize_config_dir(config_dir=str(Path(project_root()) / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*launched, *set_here, *given])
    if cfg.get("stages"):  # one stopped before its first stage's folder was made
        raise staged
    # one name in every process of a launch: run_stamp is torchrun's or srun's launch id, or HICOM_RUN_STAMP, which
    # main() sets for the processes Lightning's own launcher starts
    out = (run / "snapshots" / f"{ckpt.name.removesuffix('.ckpt')}-{run_stamp()}") if out is None else out
    if _first_process() and out.exists() and any(out.iterdir()):  # the others find the first one's config.yaml
        raise FileExistsError(f"out={out} holds files already: give an empty or new folder")
    with open_dict(cfg):
        cfg.paths.output_dir = str(out.resolve())
    differences = run_differences(written, cfg)
    if differences:  # other code, or an environment variable that moved a folder since the run was launched
        raise ValueError(
            f"the run's recorded overrides compose another config than the one it trained with ({run / 'config.yaml'}):"
            f" {differences}; take the snapshot where the run's folders are as they were (its HICOM_* environment "
            "variables, its code)"
        )
    return cfg


def _first_process() -> bool:
    """Whether this is the launch's first process (Lightning's own launcher gives the others a LOCAL_RANK only)."""
    from hicom.utils.config import launch_rank

    return launch_rank() == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def main(argv: list[str]) -> Path:
    """The command: `<run folder> [ckpt=<checkpoint>] [out=<folder>] [<train.py override> ...]`; returns the folder."""
    from hicom.training import train
    from hicom.utils.config import run_stamp

    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    named = {key: value for key, _, value in (a.partition("=") for a in argv[1:]) if key in ("ckpt", "out")}
    more = [a for a in argv[1:] if a.partition("=")[0] not in ("ckpt", "out")]
    given_stamp = os.environ.get("HICOM_RUN_STAMP")
    # one stamp for the folder's name here and in the processes Lightning's own launcher starts during the fit
    os.environ["HICOM_RUN_STAMP"] = given_stamp or run_stamp()
    try:
        cfg = snapshot_config(
            Path(argv[0]),
            Path(named["ckpt"]) if "ckpt" in named else None,
            Path(named["out"]) if "out" in named else None,
            more,
        )
        out = Path(cfg.paths.output_dir)
        try:
            metrics = train(cfg)
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
