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

import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

# what a snapshot sets itself, whatever the run's launch said
SET_HERE = ("ckpt_path", "trainer.max_steps", "evaluate", "logger", "callbacks.model_checkpoint")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def snapshot_config(run: Path, ckpt: Path | None = None, out: Path | None = None, more: list[str] = ()) -> DictConfig:
    """The train config that writes the snapshot: the run's, from its checkpoint, with no step to take."""
    from hydra import compose, initialize_config_dir

    from hicom.callbacks.checkpoint import resume_checkpoint
    from hicom.training import run_differences
    from hicom.utils.config import project_root

    run = run.resolve()
    recorded = run / ".hydra" / "overrides.yaml"
    if not (run / "config.yaml").is_file() or not recorded.is_file():
        raise FileNotFoundError(
            f"{run} is not a run folder train.py made (config.yaml and Hydra's record .hydra/overrides.yaml): give "
            "the folder of the run whose checkpoint to read (a multirun's job folder for one of its jobs)"
        )
    ckpt = resume_checkpoint(run / "checkpoints") if ckpt is None else ckpt.resolve()
    if ckpt is None or not ckpt.exists():
        raise FileNotFoundError(f"{run}: no checkpoint to read ({ckpt or run / 'checkpoints/last.ckpt'} is missing)")
    launched = [o for o in OmegaConf.load(recorded) if not (_key(o) in SET_HERE or _key(o).startswith("hydra."))]
    set_here = [f"ckpt_path={ckpt}", "trainer.max_steps=0", "evaluate=false", "~logger", "~callbacks.model_checkpoint"]
    given = [o for o in more if _key(o) not in ("ckpt_path", "trainer.max_steps")]
    with initialize_config_dir(config_dir=str(Path(project_root()) / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*launched, *set_here, *given])
    if cfg.get("stages"):
        raise ValueError(
            f"{run} is a staged run: evaluate.py reads each finished stage's folder ({run / 'stages'}/<name>) as it "
            "is; a stage's checkpoint part-way is not taken here"
        )
    out = (
        (run / "snapshots" / f"{ckpt.name.removesuffix('.ckpt')}-{time.strftime('%Y%m%d-%H%M%S')}")
        if out is None
        else out
    )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={out} holds files already: give an empty or new folder")
    with open_dict(cfg):
        cfg.paths.output_dir = str(out.resolve())
    differences = run_differences(OmegaConf.load(run / "config.yaml"), cfg)
    if differences:  # other code, or an environment variable that moved a folder since the run was launched
        raise ValueError(
            f"the run's recorded overrides compose another config than the one it trained with ({run / 'config.yaml'}):"
            f" {differences}; launch its checkpoint with the run's own settings (train.py ckpt_path=...)"
        )
    return cfg


def main(argv: list[str]) -> Path:
    from hicom.training import train

    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    named = {key: value for key, _, value in (a.partition("=") for a in argv[1:]) if key in ("ckpt", "out")}
    more = [a for a in argv[1:] if a.partition("=")[0] not in ("ckpt", "out")]
    cfg = snapshot_config(
        Path(argv[0]),
        Path(named["ckpt"]) if "ckpt" in named else None,
        Path(named["out"]) if "out" in named else None,
        more,
    )
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    print(f"the run's weights at step {metrics['steps']} are in {out}; score them: python evaluate.py ckpt={out} ...")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
