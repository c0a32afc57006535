"""OmegaConf resolvers the configs use; registered on import of hicom.utils.config."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

from omegaconf import OmegaConf


def project_root() -> str:
    """The checkout holding configs/ (so relative paths do not depend on the launch directory), else the cwd."""
    here = Path(__file__).resolve().parents[2]
    return str(here if (here / "configs").is_dir() else Path.cwd())


def run_stamp(pattern: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """The name of a run's folder, the same in every process of one launch.

    Each process of a multi-process launch (torchrun, srun) composes its own config, and the time it starts at
    differs between processes, so a time stamp would give each its own folder. In order: `HICOM_RUN_STAMP` when set
    (scripts/cluster/ sets it once per launch); in a process of a multi-process launch, the launch's own id
    (torchrun's rendezvous id, `torchrun-<id>`; srun's job and step, `slurm-<job>.<step>`); else the local time in
    `pattern` and this process's id (`2026-11-22_07-32-17_48213`): launches that start in the same second (a shell
    loop with `&`, the tasks of a SLURM array) get folders of their own instead of writing into one.
    """
    explicit = _explicit_stamp()
    if explicit:
        return _safe(explicit)
    launch = _launch_id()
    if launch is not None:
        return launch
    if unshared_launch():
        warnings.warn(
            "a multi-process launch without a shared id (torchrun with --rdzv-id left at 'none'): each process names "
            "its run folder by its own start time, and a staged run refuses to start; set HICOM_RUN_STAMP to the "
            "same value in every process",
            stacklevel=2,
        )
    stamp = f"{time.strftime(pattern)}_{os.getpid()}"
    _OWN_STAMPS.add(stamp)
    return stamp


_OWN_STAMPS: set[str] = set()  # the stamps run_stamp named by this process's time and id


def process_own_folder(path: str | Path) -> bool:
    """Whether `path` is a run folder named by this process alone (its start time and id): no other process of
    the launch can know it, so none will share it."""
    return Path(path).name in _OWN_STAMPS


def dotted_keys(node: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested dict's leaves (`{"model": {"lr": {"llm": 1}}}` -> `["model.lr.llm"]`); an empty
    dict is a leaf of its own."""
    keys = []
    for name, item in node.items():
        key = f"{prefix}{name}"
        keys.extend(dotted_keys(item, f"{key}.") if isinstance(item, dict) and item else [key])
    return keys


def _launch_id() -> str | None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if run and run != "none":
            return _safe(f"torchrun-{run}")
    if srun_tasks() > 1:
        return _safe(f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}")
    return None


def srun_tasks() -> int:
    """The tasks of the srun step this process is one of; 1 outside one (the batch script itself has no step:
    each python it starts is its own run)."""
    if not all(name in os.environ for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID")):
        return 1
    return int(os.environ.get("SLURM_NTASKS", "1"))


def unshared_launch() -> bool:
    """A multi-process launch whose processes share no run name (torchrun's static rendezvous with its default id
    'none', without HICOM_RUN_STAMP): each names its run folder by its own start time."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
        and os.environ.get("TORCHELASTIC_RUN_ID") == "none"
        and not _explicit_stamp()
    )


def launch_rank() -> int:
    """This process's rank in a torchrun or srun launch (0 outside one), known before any process group exists;
    the processes Lightning's own launcher starts have their LOCAL_RANK (and NODE_RANK) only."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if "RANK" in os.environ:
            return int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return local + int(os.environ.get("NODE_RANK", "0")) * int(os.environ.get("LOCAL_WORLD_SIZE", "1024"))
    return int(os.environ["SLURM_PROCID"]) if srun_tasks() > 1 else 0


def rank_suffix() -> str:
    """'' for the launch's first process, '.rank<n>' for the others: what their log files are named with, so that
    each process of a launch keeps its own log in the shared run folder, not interleaved lines in one."""
    rank = launch_rank()
    return f".rank{rank}" if rank else ""


def refuse_group_slips(args: list[str]) -> None:
    """Two slips that Hydra reports deep inside itself, stopped before it starts with the form to write:
    `strategy=null` (Hydra cannot set a config group to null: "Config group override must be a string or a list";
    a group is left out with ~strategy), and `model.compressor=avgpool` (the dot sets the key to that text, and the
    run fails where it is read; a config of the group is chosen with a slash)."""
    configs = Path(project_root()) / "configs"
    for arg in args:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+")
        if not sep or not group:
            continue
        if value == "null" and (configs / group).is_dir():
            raise SystemExit(f"{arg}: a config group is left out with ~{group} (Hydra cannot set one to null)")
        slashed = group.replace(".", "/")
        if "." in group and not value.startswith(("{", "[")) and (configs / slashed).is_dir():
            raise SystemExit(
                f"{arg}: sets {group} to the text {value!r}; a config of the group {slashed} is chosen with a slash: "
                f"{slashed}={value}"
            )


def hydra_path(key: str, path: Path | str) -> str:
    """A Hydra override setting `key` to a path, the path quoted for Hydra's grammar, which takes a bare value of
    letters, digits and a few signs only (a path with a space, an accent or a bracket is refused unquoted)."""
    text = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{text}'"


def shell_override(key: str, path: Path | str) -> str:
    """`key=path` as one shell word that Hydra parses: bare where the path is letters, digits and `/._+-` alone,
    else quoted for Hydra (`hydra_path`: an accent, a space, a bracket, a comma) and then for the shell."""
    import shlex

    text = str(path)
    return f"{key}={text}" if re.fullmatch(r"[A-Za-z0-9/._+-]+", text) else shlex.quote(hydra_path(key, text))


def run_label(output_dir: str, log_dir: str) -> str:
    """A run's name in a dashboard (W&B): its folder under the log folder (train/runs/<stamp>, a sweep's job
    train/multiruns/<stamp>/<n>, a stage train/runs/<stamp>/stages/<name>), else the folder's own path."""
    folder, logs = Path(output_dir).resolve(), Path(log_dir).resolve()
    return str(folder.relative_to(logs)) if folder.is_relative_to(logs) else str(folder)


def run_group(output_dir: str, log_dir: str) -> str:
    """The launch a run belongs to in a dashboard: train/<runs or multiruns>/<stamp>, the same for a staged run's
    stages and a sweep's jobs; a folder outside the log folder is its own."""
    label = Path(run_label(output_dir, log_dir))
    return str(label if label.is_absolute() else Path(*label.parts[:3]))


RUN_ID = ".run_id"  # in a run's folder: its dashboard id, written at its first launch


def run_id(output_dir: str) -> str:
    """A dashboard's id for the run in this folder, kept in it (`RUN_ID`): a run launched again into its folder (a
    resume) goes on logging into its run, where a folder deleted and made again (the same `hydra.run.dir` or
    HICOM_RUN_STAMP) gets a new one, rather than log a new run into the old one's (W&B drops the steps it has seen).
    A run folder from before the file was kept (its config.yaml there) keeps the id it had, a hash of its path."""
    import hashlib
    import secrets

    folder = Path(output_dir).resolve()
    path = folder / RUN_ID
    if not path.is_file():
        legacy = (folder / "config.yaml").is_file()
        new = hashlib.sha256(str(folder).encode()).hexdigest()[:16] if legacy else secrets.token_hex(8)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{RUN_ID}.{secrets.token_hex(4)}"
        tmp.write_text(new)
        try:  # whole or not at all, and the first process of a launch to get there decides for all
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a rename, whole too (only rank 0 logs)
            if not path.is_file():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def _explicit_stamp() -> str:
    return os.environ.get("HICOM_RUN_STAMP", "").strip()


def _safe(name: str) -> str:
    """A folder name: characters other than letters, digits, '.', '_' and '-' become '-'."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def env_or(name: str, default: str | None = None) -> str | None:
    """An environment variable's value, or `default` where it is unset or empty: `export HICOM_CACHE=$UNSET` in a job
    script sets it empty, which `oc.env` would take as the path '' (the cache, data or logs at the filesystem's
    root), where the shell's own `${HICOM_CACHE:-default}` takes the default."""
    return os.environ.get(name) or default


if not OmegaConf.has_resolver("hicom_root"):
    OmegaConf.register_new_resolver("hicom_root", project_root)
if not OmegaConf.has_resolver("env_or"):
    OmegaConf.register_new_resolver("env_or", env_or)
if not OmegaConf.has_resolver("run_stamp"):
    # cached like Hydra's own `now`: the run folder is read again later (Lightning's DDP launcher hands it to its
    # child processes, a multirun copies it to every job) and must not move to a later second
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
for _name, _resolver in (("run_label", run_label), ("run_group", run_group), ("run_id", run_id)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
if not OmegaConf.has_resolver("rank_suffix"):
    OmegaConf.register_new_resolver("rank_suffix", rank_suffix)
if not OmegaConf.has_resolver("first_process_only"):  # a value for the launch's first process, null for the others
    OmegaConf.register_new_resolver("first_process_only", lambda value: value if launch_rank() == 0 else None)
if not OmegaConf.has_resolver("hicom_direction"):  # a search config's sweeper direction, from its metric

    def _direction(name: str, _root_) -> str:
        from hicom.sweep import check_search_space, direction_of

        check_search_space(_root_)  # resolved by the sweeper before its first trial: the first moment to check
        return direction_of(name)

    OmegaConf.register_new_resolver("hicom_direction", _direction)
