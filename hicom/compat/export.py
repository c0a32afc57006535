"""A trained run (or one of its stages) as a folder in the release's layout, which the release's code and
evaluate.py read:

    python -m hicom.compat.export <run folder> <new folder> [run_overrides=['model.<key>=<value>',...]]

The run is built as evaluate.py builds it (its own config.yaml, its last finished stage's hand-off; the towers'
and LLM's folders as that config names them, or as run_overrides move them on this machine), then written with
`export_official` at the frames it was trained at. What the release's layout cannot carry is refused before
anything is written (see README, Official checkpoints).
"""

from __future__ import annotations

import sys
from pathlib import Path


def export_run(run: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Export the run folder `run` into `out`; `overrides`: evaluate.py's (run_overrides=[...], paths.*)."""
    from hydra import compose, initialize_config_dir

    from hicom.compat.official import export_official
    from hicom.eval.runner import load_model
    from hicom.utils.config import project_root

    with initialize_config_dir(config_dir=str(Path(project_root()) / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt={run}", *(overrides or [])])
    module, source = load_model(run, cfg)
    return export_official(module.net, out, num_frames=source["trained_frames"])


def main(argv: list[str]) -> Path:
    positional = [arg for arg in argv if "=" not in arg]
    if len(positional) != 2 or any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        raise SystemExit(0 if any(arg in ("-h", "--help") for arg in argv) else 2)
    folder = export_run(positional[0], positional[1], [arg for arg in argv if "=" in arg])
    print(f"wrote {folder}: evaluate it with python evaluate.py ckpt={folder}")
    return folder


if __name__ == "__main__":
    main(sys.argv[1:])
