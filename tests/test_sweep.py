"""Optuna sweeps (configs/hparams_search/): the configs name real keys, the metric is checked first, trials run."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from hicom.sweep import check_sweep, swept_value
from tests.conftest import CONFIGS, SMALL, compose_train

ROOT = Path(__file__).resolve().parents[1]
SEARCHES = sorted(p.stem for p in (CONFIGS / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("search", SEARCHES)
def test_every_searched_parameter_is_a_key_of_the_config(search, cache_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, "a search with nothing to search"
    for key in params:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None, key
    check_sweep(cfg)  # its metric is one a run reports


def test_a_search_space_naming_keys_the_config_lacks_is_refused_by_name():
    """HICom's search with another compressor: refused when the sweeper resolves its direction, before a trial,
    naming the key, not with Hydra's advice to append it (+key=...), which would search a setting nothing reads."""
    from hydra import compose, initialize_config_dir

    from hicom.sweep import SearchSpaceError

    def direction(*overrides: str, space: dict | None = None, swept: str | None = None):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("train", overrides=["hparams_search=hicom_optuna", *overrides], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.sweeper.params.update(space or {})
            if swept is not None:  # a sweep on the command line (which compose takes no part in)
                cfg.hydra.overrides.task.append(swept)
        return cfg.hydra.sweeper.direction

    assert direction() == "maximize"
    with pytest.raises(SearchSpaceError, match=r"names model\.compressor\.global_\.num_queries, which this config"):
        direction("model/compressor=avgpool")
    with pytest.raises(SearchSpaceError, match="copy configs/hparams_search/hicom_optuna.yaml"):
        direction("model.compressor.global_=null")  # local-only HICom: no global query count
    # a space that swaps the compressor itself, or a config group, or a command line that sweeps one, may name keys
    # that only some of its trials have
    assert direction("model/compressor=avgpool", space={"model/compressor": "choice(hicom, avgpool)"}) == "maximize"
    assert direction("model/compressor=avgpool", space={"experiment": "choice(ablation_conditional)"})
    assert direction(swept="model/compressor=choice(avgpool,bilinear)", space={"model.compressor.init_std": "0.01"})
    with pytest.raises(SearchSpaceError, match=r"names model\.compressor\.global_\.num_queries"):  # no group swept
        direction("model/compressor=avgpool", swept="model.lr.llm=tag(log, interval(1e-6, 1e-4))")
    # a key whose value is unset (???) or an interpolation of an unset variable is there all the same
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=hicom_optuna", "+later=???", "+env=${oc.env:UNSET_X}"],
                      return_hydra_config=True)  # fmt: skip
    with open_dict(cfg):
        cfg.hydra.sweeper.params.update({"later": "choice(1, 2)", "env": "choice(1, 2)"})
    assert cfg.hydra.sweeper.direction == "maximize"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimized_metric=acc"], r"optimized_metric='acc' is not a figure a run reports: one of \['accuracy'"),
        (["optimized_metric=accuracy", "evaluate=false"], "scored on the held-out questions: set evaluate=true"),
        (["optimized_metric=train_loss", "dry_run=true"], "a dry run trains nothing"),
        (["optimized_metric=train_loss", "experiment=tiny_stages"], "set stages=null"),
        (["optimized_metric=accuracy", "experiment=tiny_stages"], "set stages=null"),  # the fix that is needed first
    ],
)
def test_a_metric_no_run_can_report_is_refused_before_anything_runs(overrides, message, cache_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        check_sweep(compose_train(cache_dir, tmp_path, overrides))


@pytest.mark.parametrize("search", SEARCHES)
def test_a_search_keeps_the_best_trial_of_its_metric_not_the_worst(search):
    from hydra import compose, initialize_config_dir

    def composed(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose("train", overrides=[f"hparams_search={search}", *overrides], return_hydra_config=True)

    for metric, direction in [("accuracy", "maximize"), ("train_loss", "minimize"), ("n_unparsed", "minimize"),
                              ("fit_seconds", "minimize")]:  # fmt: skip
        cfg = composed(f"optimized_metric={metric}")
        assert cfg.hydra.sweeper.direction == direction
        check_sweep(cfg)
    with pytest.raises(ValueError, match="train_loss is better lower, and hydra.sweeper.direction=maximize would"):
        check_sweep(composed("optimized_metric=train_loss", "hydra.sweeper.direction=maximize"))
    with pytest.raises(ValueError, match="train_loss is better lower, and hydra.sweeper.direction=maximize would"):
        check_sweep(composed("optimized_metric=train_loss", "hydra.sweeper.direction=[maximize]"))  # Optuna's list
    check_sweep(composed("optimized_metric=train_loss", "hydra.sweeper.direction=[minimize]"))
    with pytest.raises(ValueError, match=r"direction=\['minimize', 'minimize'\]: a run returns one figure"):
        check_sweep(composed("optimized_metric=train_loss", "hydra.sweeper.direction=[minimize,minimize]"))


def test_a_w_and_b_run_an_earlier_job_left_open_is_finished_before_the_next_job_logs(monkeypatch, caplog):
    """Lightning's WandbLogger reuses an open W&B run: a multirun's next job would log into the failed job's run."""
    import types

    from hicom.utils.instantiators import finish_open_wandb_run

    finished = []
    wandb = types.SimpleNamespace(run=types.SimpleNamespace(id="abc123"))
    wandb.finish = lambda exit_code=0: finished.append(exit_code) or setattr(wandb, "run", None)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    finish_open_wandb_run()
    assert finished == [1] and "W&B run abc123 of an earlier job was left open" in caplog.text
    finish_open_wandb_run()  # none open: nothing to finish
    assert finished == [1]


def test_the_swept_value_is_the_named_figure_and_a_missing_one_fails_the_trial(cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path, ["optimized_metric=accuracy"])
    assert swept_value(cfg, {"accuracy": 0.75, "train_loss": 1.0}) == 0.75
    with pytest.raises(RuntimeError, match="optimized_metric=accuracy: this run has no value for it"):
        swept_value(cfg, {"accuracy": None})  # no held-out questions: no made-up figure
    assert swept_value(compose_train(cache_dir, tmp_path, []), {"accuracy": 0.75}) is None


def test_an_optuna_sweep_runs_its_trials_and_records_the_best(cache_dir, tmp_path):
    env = {**os.environ, "HICOM_CACHE": str(cache_dir), "HICOM_LOGS": str(tmp_path)}
    overrides = [o for o in SMALL if not o.startswith("~")] + ["callbacks.progress.refresh_rate=0"]
    cmd = [
        sys.executable, "train.py", "hparams_search=hicom_optuna", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1", *overrides,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = tmp_path.glob("train/multiruns/*")
    trials = sorted(sweep.glob("*/metrics.json"))
    assert len(trials) == 2
    accuracies = [json.loads(f.read_text())["accuracy"] for f in trials]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(accuracies)
    for trial in trials:  # each trial ran with the values Optuna drew
        queries = yaml.safe_load((trial.parent / "config.yaml").read_text())["model"]["compressor"]["global_"]
        assert queries["num_queries"] in (8, 16, 32, 64)


def test_every_process_of_a_launch_hands_its_sweeper_the_figures_of_process_0(tmp_path):
    """Under torchrun each process runs its own sweeper: told each its own clock's fit_seconds, their seeded
    samplers would suggest different trials to the processes of one job."""
    script = tmp_path / "share.py"
    script.write_text(
        "import json\n"
        "import torch.distributed as dist\n"
        "from hicom.training import release_process_group\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "shared = release_process_group({'fit_seconds': 10.0 + rank, 'accuracy': 0.5})\n"
        "row = {'rank': rank, 'shared': shared, 'open': dist.is_initialized()}\n"
        f"open(f'{tmp_path}/rank{{rank}}.json', 'w').write(json.dumps(row))\n"  # not stdout: the two interleave
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(torchrun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [row["rank"] for row in rows] == [0, 1]
    assert all(row["shared"] == {"fit_seconds": 10.0, "accuracy": 0.5} and not row["open"] for row in rows)


def test_the_jobs_of_a_torchrun_multirun_share_one_process_group(tmp_path):
    """Each job opened the process group again on torchrun's store, where the last job's rendezvous keys stood
    under the same names: a process that got there before process 0 read its old address and failed (gloo:
    "Connection refused"; here process 0 comes late every time). The group now stays open across the jobs, as a
    staged run's stages share it, and closes as the process exits."""
    script = tmp_path / "jobs.py"
    script.write_text(
        "import time\n"
        "import torch, torch.distributed as dist\n"
        "from hicom.training import release_process_group\n"
        "for job in range(2):\n"
        "    if not dist.is_initialized():  # as Lightning's DDP strategy opens it: where none is open\n"
        "        if job and int(__import__('os').environ['RANK']) == 0:\n"
        "            time.sleep(2)\n"
        "        dist.init_process_group('gloo')\n"
        "    total = torch.ones(1)\n"
        "    dist.all_reduce(total)\n"
        "    assert total.item() == 2\n"
        "    release_process_group({'job': job}, more_jobs=True)\n"
        "    assert dist.is_initialized()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(torchrun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr  # closed before the interpreter's teardown


def test_w_and_b_names_a_run_by_its_folder_groups_a_launch_and_keeps_its_id_across_a_resume(tmp_path):
    """Every run, sweep job and stage was named `train` in W&B, with no group, and a run launched again into its
    folder (a resume) opened a second W&B run: the folder now names it, its launch groups it, and keys its id."""
    from hydra import compose, initialize_config_dir

    logs = tmp_path / "logs"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["logger=wandb", f"paths.log_dir={logs}"])

    def wandb_of(folder: Path) -> dict:
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        return OmegaConf.to_container(cfg.logger.wandb, resolve=True)

    run = wandb_of(logs / "train" / "runs" / "2026-11-24_05-00-00")
    job = wandb_of(logs / "train" / "multiruns" / "2026-11-24_05-00-00" / "3")
    stage = wandb_of(logs / "train" / "runs" / "2026-11-24_05-00-00" / "stages" / "alignment")
    assert (run["name"], run["group"]) == ("train/runs/2026-11-24_05-00-00",) * 2
    assert (job["name"], job["group"]) == (
        "train/multiruns/2026-11-24_05-00-00/3",
        "train/multiruns/2026-11-24_05-00-00",
    )
    assert stage["group"] == run["group"] and stage["name"].endswith("stages/alignment")
    assert len({run["id"], job["id"], stage["id"]}) == 3 and run["resume"] == "allow"
    assert wandb_of(logs / "train" / "runs" / "2026-11-24_05-00-00")["id"] == run["id"]  # launched again: the same
    elsewhere = wandb_of(tmp_path / "my run")  # hydra.run.dir outside the log folder
    assert elsewhere["name"] == elsewhere["group"] == str(tmp_path / "my run")
    # the folder deleted and made again (the same hydra.run.dir): another run, which W&B must not append to the old
    # one's (it drops the steps it has seen)
    shutil.rmtree(logs / "train" / "runs" / "2026-11-24_05-00-00")
    assert wandb_of(logs / "train" / "runs" / "2026-11-24_05-00-00")["id"] != run["id"]
    # a run folder from before the id was kept in it keeps the one it logged under, its path's hash
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.yaml").write_text("{}")
    assert wandb_of(legacy)["id"] == hashlib.sha256(str(legacy.resolve()).encode()).hexdigest()[:16]
