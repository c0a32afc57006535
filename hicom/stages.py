"""The recipe's stages in sequence (SPEC 5), each a Lightning fit that starts from its parent through a checked
hand-off.

A stage is `{name, trainable, num_frames, global_batch_size, zero_stage, guided, guide_added, config,
new_parameters}`: `config` is a delta merged onto the run's config (data source, learning rates); `guided: false`
turns the compressor's guide off, whatever the compressor (its class's `unguided_config`), and `guide_added: true`
says the stage turns on the guide its parent trained without, so that the parameters only a guided compressor has
start from their init (found by building the compressor unguided on the meta device); `zero_stage` is the
least DeepSpeed ZeRO stage the stage runs at where the run's strategy is DeepSpeed (the recipe's stage 3 needs
ZeRO-2's sharded optimizer states; a higher stage, or another strategy, chosen with `strategy=...` is kept);
`new_parameters` are glob patterns
of parameters the stage adds to what its parent trained (e.g. the injection modules when stage 2 turns the guide
on), which start from their init instead of the parent.

Each finished stage writes `<output_dir>/stages/<name>/` with `handoff.safetensors` (the parts trained so far,
frozen parts left out) and `manifest.json` (parent, compressor config, parameter names and shapes). Loading is
strict: any parameter of the handed-off parts that is missing (and not declared new) or unexpected stops the run
with the list; so does, before any stage trains, a parent whose compressor config is not the stage's (but for the
guide that a `guide_added` stage turns on). A stage whose manifest exists is skipped on re-run; `stage=<name>` with
`stage_parent=<folder>` runs one stage alone from a given parent.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError

from hicom.callbacks.checkpoint import refuse_non_finite, resume_checkpoint
from hicom.modules.compressors.base import unguided_config
from hicom.training import check_global_batch, check_trainable, check_values, command_again, train
from hicom.utils.checkpoints import check_safetensors, fill_tied, full_parameters, optimizer_masters, untied_state
from hicom.utils.choices import flag
from hicom.utils.config import dotted_keys, launch_rank, unshared_launch
from hicom.utils.files import RunFolderTaken, as_created_here, weights_identity, write_atomically
from hicom.utils.instantiators import (
    check_data,
    check_model,
    check_pretrained,
    check_tokenizers,
    ensure_dir,
    write_assets,
)

log = logging.getLogger(__name__)

HANDOFF, MANIFEST = "handoff.safetensors", "manifest.json"
# the parent a stage's fit started from, written as it starts: a stage that stopped part-way resumes only from it
STARTED = "started.json"
# a staged run's stage names, in order, in its folder
STAGE_LIST = "stages.json"
METRICS = "metrics.json"  # a fit's figures, written last (after its held-out check)


def stage_done(folder: Path) -> bool:
    """A stage's fit and its held-out check both finished: its hand-off's manifest, and its metrics. A stop during
    the check (a job's time limit) leaves the first alone: launched again, the stage goes on from its last.ckpt,
    trains no step, and asks the questions."""
    return (folder / MANIFEST).is_file() and (folder / METRICS).is_file()


class HandoffError(RuntimeError):
    """A stage's parent does not fit it: missing or unexpected parameters, a wrong shape, or another compressor."""


def uses_deepspeed(cfg: DictConfig) -> bool:
    """Whether the config's trainer strategy is (a subclass of) Lightning's DeepSpeedStrategy, given as a config or
    by one of Lightning's registered names (`trainer.strategy=deepspeed_stage_2`)."""
    from hydra.utils import get_class
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = named_strategy(OmegaConf.select(cfg, "trainer.strategy"))
    if not isinstance(strategy, DictConfig) or "_target_" not in strategy:
        return False
    return issubclass(get_class(strategy._target_), DeepSpeedStrategy)


def named_strategy(strategy):
    """A strategy Lightning knows by name (`deepspeed_stage_2`, `ddp`) as the config that builds the same strategy:
    `{_target_: <its class>, **<the name's arguments>}`, so that a stage can raise its ZeRO stage and the dry run can
    read it; anything else (a config, "auto", a name Lightning does not register) as it is."""
    if not isinstance(strategy, str):
        return strategy
    from lightning.pytorch.strategies import StrategyRegistry

    if strategy not in StrategyRegistry:
        return strategy
    entry = StrategyRegistry[strategy]
    cls = entry["strategy"]
    return OmegaConf.create({"_target_": f"{cls.__module__}.{cls.__qualname__}", **entry["init_params"]})


def expand_strategy_name(cfg: DictConfig) -> None:
    """Replaces a registered strategy name in `cfg.trainer.strategy` with its config (`named_strategy`)."""
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    expanded = named_strategy(strategy)
    if expanded is not strategy:
        with open_dict(cfg):
            cfg.trainer.strategy = expanded


# what a stage's own fields set in the run's config, and the field a per-stage override names
STAGE_FIELDS = {
    "model.trainable": "trainable",
    "data.num_frames": "num_frames",
    "global_batch_size": "global_batch_size",
}


def stage_keys(stage: DictConfig) -> dict[str, str]:
    """The dotted keys of the run's config that `stage` sets (stage_config), each with the override that sets it
    for this stage alone, relative to the stage (`num_frames`, `config.model.lr.compressor`)."""
    keys = {key: field for key, field in STAGE_FIELDS.items() if stage.get(field) is not None}
    delta = OmegaConf.to_container(stage.get("config") or OmegaConf.create({}), resolve=False)
    keys.update({key: f"config.{key}" for key in dotted_keys(delta)})
    return keys


def check_stage_overrides(stages, overrides: list[str]) -> None:
    """Refuse command-line values that every stage would replace with its own (`data.num_frames=16`,
    `global_batch_size=64`, `model.lr.compressor=5e-5` against the recipe's per-stage values): the run would
    otherwise train with the recipe's values and say nothing. The message gives the per-stage overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def leaves(key: str, value) -> list[str]:  # a dict value merges key by key: each of its leaves is set
        return dotted_keys(value, f"{key}.") if isinstance(value, dict) else [key]

    problems = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if "/" in override.key_or_group or override.is_delete():  # a config group, or a key removed
            continue
        per_stage, others = [], []
        for i, stage in enumerate(stages):
            hits = [
                f"stages.{i}.{field}{key[len(stage_key) :]}=... ({stage.name})"
                for key in leaves(override.key_or_group, override.value())
                for stage_key, field in stage_keys(stage).items()
                if key == stage_key or key.startswith(stage_key + ".")
            ]
            if hits:
                per_stage.append(hits[0])
            else:  # the stage takes the run's value: it is set for it alone through its config delta
                others.append(f"+stages.{i}.config.{override.key_or_group}=... ({stage.name})")
        if per_stage:
            where = f"; the other stages take it as {', '.join(others)}" if others else ""
            problems.append(
                f"{override.input_line}: the stages set it themselves; per stage: {', '.join(per_stage)}{where}"
            )
    if problems:
        raise ValueError(
            "values of a staged experiment that its stages replace (stages count from 0):\n  " + "\n  ".join(problems)
        )


# what a stage entry may hold (the module's docstring says what each does)
STAGE_ENTRY_KEYS = (
    "name", "trainable", "num_frames", "global_batch_size", "zero_stage", "guided", "guide_added", "config",
    "new_parameters",
)  # fmt: skip


def stage_config(base: DictConfig, stage: DictConfig, out_dir: Path) -> DictConfig:
    """The config stage `stage` runs with: the run's, its `config` delta merged on, its own fields set. A field it
    does not know (`num_frame: 4`, `+stages.1.zero_stge=3`) is refused: it would change nothing, in silence."""
    unknown = [key for key in stage if key not in STAGE_ENTRY_KEYS]
    if unknown:
        raise ValueError(
            f"stage {stage.get('name')!r}: unknown fields {unknown}; a stage holds {list(STAGE_ENTRY_KEYS)}, and "
            "anything else of the run's config goes under its `config` (e.g. config.model.lr.compressor)"
        )
    try:
        cfg = OmegaConf.merge(base, stage.get("config") or {})
    except ConfigKeyError as err:  # e.g. data=llava_json, whose source has no `train`, under the recipe's mixtures
        raise ValueError(
            f"stage {stage.get('name')!r} sets {err.full_key}, a key this run's config does not have: the "
            "experiment's stages are written for its own config groups (the recipe gives each stage a mixture: "
            "data=mixture). Run one fit with stages=null, or give the stages what the chosen groups take"
        ) from err
    with open_dict(cfg):
        cfg.model.trainable = list(stage.trainable)
        if stage.get("num_frames") is not None:
            cfg.data.num_frames = stage.num_frames
        if stage.get("global_batch_size") is not None:
            cfg.global_batch_size = stage.global_batch_size
        if stage.get("guided") is False:
            cfg.model.compressor = unguided_config(cfg.model.compressor)
        expand_strategy_name(cfg)  # the run's, or its stage's: a name Lightning registers, as its config
        if stage.get("zero_stage") is not None and uses_deepspeed(cfg):
            zero = stage.zero_stage
            if isinstance(zero, bool) or zero not in (0, 1, 2, 3):
                raise ValueError(
                    f"stage {stage.name}: zero_stage must be 0, 1, 2 or 3 (DeepSpeed's ZeRO stages), got {zero!r}"
                )
            cfg.trainer.strategy.stage = max(int(cfg.trainer.strategy.get("stage", 0)), zero)
        cfg.paths.output_dir = str(out_dir)
        cfg.stages = None
        if base.get("stage") != stage.name or not base.get("ckpt_path"):  # given with stage=<name>: that stage's
            last = resume_checkpoint(out_dir / "checkpoints")  # else a stage that stopped part-way goes on from its own
            cfg.ckpt_path = str(last) if last is not None else None
    return cfg


def save_handoff(
    model,
    out_dir: Path,
    parts: list[str],
    parent: str | None,
    cfg: DictConfig,
    write: bool = True,
    masters: dict[str, torch.Tensor] | None = None,
    unchanged: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every process calls it (under ZeRO-3 the parameters are gathered from all of them); `write` on one. Weights
    that hold a NaN or an infinity are refused (`refuse_non_finite`) before anything is written: the stage is not
    done, and the next one would start from them. `masters`, by hand-off name (`compressor.<key>`): the fp32
    weights an optimizer stepped, read from a checkpoint (`hicom.snapshot`) instead of a live one. `unchanged`, by
    hand-off name: tensors the fit left as they were loaded (a part carried from the parent and frozen in this
    stage), as loaded: the module may hold them in 16 bits (DeepSpeed casts it whole, frozen parts too); and so are
    the frozen weights of the parts it trains that the fit recorded before it began (`model.as_loaded`,
    `frozen_in_trained`)."""
    from safetensors.torch import save_file

    modules = model.parts()
    trainer = getattr(model, "_trainer", None)
    optimizer = trainer.optimizers[0] if trainer is not None and trainer.optimizers else None
    unchanged = {**(getattr(model, "as_loaded", None) or {}), **(unchanged or {})}
    state = {}
    for part in parts:
        # what the optimizer stepped: under DeepSpeed's bf16 the module holds 16-bit copies of its fp32 weights
        if masters is None:
            stepped = optimizer_masters(modules[part], optimizer, keep=write)
        else:
            stepped = {key[len(part) + 1 :]: value for key, value in masters.items() if key.startswith(f"{part}.")}
        with full_parameters(modules[part]):
            if not write:  # it only takes part in the gathers
                continue
            for key, value in untied_state(modules[part]).items():  # a tied LM head is its embeddings: once
                name = f"{part}.{key}"
                if key not in stepped and name in unchanged:  # copies of their own already: none to make
                    state[name] = unchanged[name]
                    continue
                state[name] = stepped.get(key, value).detach().to("cpu", copy=True).contiguous()
    # the writer reads them; every process of the run's strategy joins in its decision
    if trainer is not None:
        refuse_non_finite(state, out_dir / HANDOFF, trainer.strategy, trainer.global_step)
    else:
        refuse_non_finite(state, out_dir / HANDOFF)
    if not write:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / f"{HANDOFF}.tmp"))
    as_created_here(out_dir / f"{HANDOFF}.tmp")
    (out_dir / f"{HANDOFF}.tmp").rename(out_dir / HANDOFF)
    manifest = {
        "sha256": file_sha256(out_dir / HANDOFF),
        "stage": out_dir.name,
        "parent": parent,
        # the parent's weights, by which it is known again when its run folder has moved
        "parent_sha256": _handoff_digest(Path(parent)) if parent else None,
        "parts": parts,
        "compressor": OmegaConf.to_container(cfg.model.compressor, resolve=True),
        # the tower's hidden state the compressor was trained on: the same weights would read another's features
        "select_layer": OmegaConf.select(cfg, "model.vision.select_layer", default=None),
        "vision_depth": model.net.vision.depth,  # -2 and depth - 1 are one hidden state
        "parameters": {key: list(value.shape) for key, value in state.items()},
        "init_from": cfg.get("init_from"),  # the release folder its untrained parts are
        "frozen_from": frozen_sources(cfg, parts),
    }
    # written last, whole or not at all: the stage is done
    write_atomically(out_dir / MANIFEST, json.dumps(manifest, indent=1))


def frozen_in_trained(model) -> dict[str, torch.Tensor]:
    """By hand-off name, the frozen parameters of the parts `model` trains (a pooling compressor's unread trunk
    layers, which nothing reads), copied to the CPU as they are before the fit: a DeepSpeed engine in 16 bits casts
    them with the rest of the module, and the hand-off writes them as they were loaded (`save_handoff`)."""
    modules = model.parts()
    return {
        f"{part}.{key}": parameter.detach().to("cpu", copy=True)
        for part in model.trainable
        for key, parameter in modules[part].named_parameters()
        if not parameter.requires_grad
    }


# the model folders a hand-off's frozen parts come from, by the key that names each, and the parts each gives
FROZEN_FOLDERS = {"model.vision.path": ("vision_trunk", "vision_head", "guide_encoder"), "model.llm.path": ("llm",)}


def frozen_sources(cfg: DictConfig, parts: list[str]) -> dict[str, dict]:
    """The folders whose weights a hand-off leaves out (parts it does not hold) and their `weights_identity`: who
    loads the hand-off takes those parts from folders of its own config, which must hold the same weights."""
    if cfg.get("init_from"):  # they are the release folder's, recorded as init_from
        return {}
    out = {}
    for key, given in FROZEN_FOLDERS.items():
        folder = OmegaConf.select(cfg, key, default=None)
        if folder and not set(given) <= set(parts):
            out[key] = {"folder": str(folder), "identity": weights_identity(Path(folder))}
    return out


def check_frozen_sources(manifest: dict, cfg: DictConfig, parent: Path) -> None:
    """Warns where a folder this model takes a frozen part from holds other weights than the one `parent` was
    trained with (its manifest's `frozen_from`): another LLM or tower under the trained compressor, which would
    answer otherwise, in silence. A warning: a folder may have been re-saved on purpose."""
    for key, recorded in (manifest.get("frozen_from") or {}).items():
        folder = OmegaConf.select(cfg, key, default=None)
        if not folder or not recorded.get("identity"):
            continue
        identity = weights_identity(Path(folder))
        if identity is not None and identity != recorded["identity"]:
            log.warning(
                "%s=%s holds other weights than %s, which %s was trained with (their config.json or weight files "
                "differ): its frozen parts are not those of the training",
                key, folder, recorded["folder"], parent,
            )  # fmt: skip


def _handoff_digest(folder: Path) -> str | None:
    """A finished stage's hand-off digest, from its manifest; None where that no longer reads (a parent removed
    while its child trained must not cost the child's save)."""
    try:
        return read_manifest(folder / MANIFEST).get("sha256")
    except HandoffError:
        return None


def file_sha256(path: Path) -> str:
    import hashlib

    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(path: Path) -> dict:
    """A stage's manifest.json, or a HandoffError naming the file (a stage whose manifest is damaged is not done)."""
    again = "copy the stage's folder again; or, where it is a stage of this run, delete its folder to train it again"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HandoffError(f"{path} cannot be read ({err}): {again}") from err
    missing = {"stage", "parent", "parts"} - set(manifest if isinstance(manifest, dict) else ())
    if missing:
        raise HandoffError(f"{path} is not a stage manifest (no {sorted(missing)}): {again}")
    return manifest


def check_handoff(folder: Path) -> None:
    """Before any weights load: a finished stage's manifest reads and its hand-off is there and whole (its
    safetensors header readable and its tensor data filling the file: a copy cut short fails here, in seconds, not
    after the towers load). Damaged bytes within the file are found by the SHA-256 check when it loads."""
    read_manifest(folder / MANIFEST)
    path = folder / HANDOFF
    again = "where it is a stage of this run, its folder can instead be deleted, and the staged run trains it again"
    if not path.is_file():
        raise HandoffError(f"{folder} has its {MANIFEST} but no {HANDOFF}: copy it there; {again}")
    try:
        check_safetensors(path)
    except ValueError as error:
        raise HandoffError(f"{error}; {again}") from error


# Compressor settings a parent may hold otherwise than its child: they set only how parameters start, which the
# hand-off's weights replace (a parameter the child adds starts from the child's own value), or which kernel computes
# the same attention (the Q-Former's sdpa or eager).
UNCHECKED_SETTINGS = frozenset({"init_std", "initializer_range", "attn_implementation"})
# ... and what only a stage's training reads: whether the clip-scale pair trains (the hand-off holds it either way;
# a resume's optimizer state does not, so a resume compares it)
TRAINING_SETTINGS = frozenset({"train_clip_scale"})

_ABSENT = object()


def check_parent_compressor(
    parent: Path, trained: dict | None, compressor: DictConfig, guide_added: bool = False, grows: bool = False
) -> None:
    """Before any weights load, refuse a parent whose compressor config, `trained` (its manifest's), is not
    `compressor`, the one this stage builds, but for what the recipe changes between stages: a `guide_added` stage
    starts from a parent that trained the same compressor without its guide (its class's `unguided_config`, as a
    `guided: false` stage builds it). Weights of the same names and shapes fit compressors that compute other things
    (another kernel, position table or head count), and would load without a word. A manifest written before the
    config was recorded (`trained` None) is let through, and the log says so. A stage that `grows` (it declares
    `new_parameters`: it changes the compressor on purpose, e.g. adds the release's key and value adapters) is let
    through too, with each difference logged."""
    if trained is None:
        log.warning(
            "%s: its %s records no compressor config (written before hand-offs recorded it): not checked against this "
            "stage's",
            parent,
            MANIFEST,
        )
        return
    built = OmegaConf.to_container(compressor, resolve=True)
    wanted = OmegaConf.to_container(unguided_config(OmegaConf.create(built)), resolve=True) if guide_added else built
    differences = [d for d in _differences(trained, wanted) if d[0].rpartition(".")[2] not in TRAINING_SETTINGS]
    if not differences:
        return
    guide_keys = {key for key, _, _ in _differences(wanted, built)}  # what unguided_config turned off
    lines = [f"{key}: the parent's {_value(was)}, this stage's {_value(now)}" for key, was, now in differences]
    if grows:
        log.warning(
            "%s trained a compressor configured otherwise than this stage's, which declares new_parameters and so is "
            "taken to change it on purpose: %s", parent, "; ".join(lines),
        )  # fmt: skip
        return
    overrides = [
        _override(f"model.compressor.{key}", was, now) for key, was, now in differences if key not in guide_keys
    ]
    ways = []
    if overrides:
        ways.append(f"build this stage's compressor as the parent's ({' '.join(overrides)})")
    if len(overrides) < len(differences):
        ways.append(
            "start this stage, which turns the guide on (guide_added: true), from a parent trained without it (a stage "
            "with guided: false)"
        )
    unguided = ", without the guide this stage adds" if guide_added else ""
    raise HandoffError(
        f"{parent} trained a compressor configured otherwise than this stage's ({MANIFEST}'s compressor against "
        f"model.compressor{unguided}): its weights would load into another computation:\n  "
        + "\n  ".join(lines)
        + f"\nTo go on from it, {'; or '.join(ways)}. To train this compressor, start from a parent trained with it: "
        "stage_parent=<such a stage's folder>, or the stages before this one trained again (a new run, or this "
        "run's folders of those stages deleted)"
    )


def _differences(trained: dict, wanted: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, trained value, wanted value) for each setting that differs, where present on either side."""
    found = []
    for key in dict.fromkeys([*trained, *wanted]):
        if key in UNCHECKED_SETTINGS:
            continue
        was, now = trained.get(key, _ABSENT), wanted.get(key, _ABSENT)
        if isinstance(was, dict) and isinstance(now, dict):
            found += _differences(was, now, f"{prefix}{key}.")
        elif was != now:
            found.append((f"{prefix}{key}", was, now))
    return found


def _value(value) -> str:
    """A config value as a Hydra override writes it (`[4,3,3]`, `null`, `kv`)."""
    if value is _ABSENT:
        return "(none)"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _override(key: str, was, now) -> str:
    """The command-line override that sets `key` back to the parent's value `was`."""
    if was is _ABSENT:
        return f"~{key}"
    return f"{'+' if now is _ABSENT else ''}{key}={_value(was)}"


def guide_parameters(model, cfg: DictConfig) -> list[str]:
    """The names (as hand-offs write them) of the compressor's tensors that only its guided form has."""
    from hicom.modules.video_llm import guide_only_names

    only = model.guide_only if model.guide_only is not None else guide_only_names(model.net, cfg.model.compressor)
    return [f"compressor.{key}" for key in model.net.compressor.state_dict() if key in only]


def same_layer(trained, layer, depth: int | None = None) -> bool:
    """Whether two select_layer values read one hidden state of a tower of `depth` layers (-2 and depth - 1 do);
    with the depth unknown, whether they are equal. A value not recorded (None) is taken as the same."""
    if trained is None or layer is None:
        return True
    if depth is None:
        return int(trained) == int(layer)
    return int(trained) % (depth + 1) == int(layer) % (depth + 1)


def check_parent_layer(parent: Path, trained, layer, depth: int | None = None) -> None:
    """Before any weights load, refuse a parent whose compressor was trained on another hidden state of the vision
    tower (its manifest's `select_layer`, of a tower of `depth` layers) than the one this model reads (`layer`):
    the weights fit, and read another layer's features without a word. A manifest from before it was recorded is
    let through."""
    if same_layer(trained, layer, depth):
        return
    raise HandoffError(
        f"{parent} trained its compressor on the vision tower's hidden state {trained} ({MANIFEST}'s select_layer), "
        f"this model reads {layer}: set model.vision.select_layer={trained}, or train the compressor on {layer}"
    )


def load_handoff(
    model,
    parent: Path,
    new_parameters: list[str],
    compressor: DictConfig | None = None,
    guide_added: bool = False,
    cfg: DictConfig | None = None,
) -> list[str]:
    """Load a parent's hand-off into `model`, strictly; returns the parts it held. `compressor`, the config
    `model`'s compressor was built from, is checked against the parent's first (`check_parent_compressor`; the
    stage runner checks it before the model is built, and passes none). `cfg`, the config `model` was built
    from: its frozen parts' folders are checked against those the parent was trained with (`check_frozen_sources`)."""
    from safetensors.torch import load_file

    manifest_path = parent / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{parent} holds no finished stage ({MANIFEST} missing)")
    manifest = read_manifest(manifest_path)
    if compressor is not None:
        check_parent_compressor(parent, manifest.get("compressor"), compressor, guide_added, bool(new_parameters))
    if cfg is not None:
        layer = OmegaConf.select(cfg, "model.vision.select_layer")
        check_parent_layer(parent, manifest.get("select_layer"), layer, manifest.get("vision_depth"))
        check_frozen_sources(manifest, cfg, parent)
    # the digest the stage wrote (manifests from before it was recorded have none): damaged bytes in the tensor data
    # would load as other numbers
    if "sha256" in manifest and (parent / HANDOFF).is_file() and file_sha256(parent / HANDOFF) != manifest["sha256"]:
        raise HandoffError(
            f"{parent / HANDOFF} is not the file its stage wrote (its SHA-256 differs from {MANIFEST}'s): copy it "
            "again; or, where it is a stage of this run, delete its folder to train it again"
        )
    try:
        state = load_file(str(parent / HANDOFF))
    except Exception as error:
        raise HandoffError(f"cannot read {parent / HANDOFF}: {error}") from error
    modules = model.parts()
    stray = [key for key in state if not any(key.startswith(part + ".") for part in manifest["parts"])]
    if stray:  # loading the listed parts alone would put the untrained weights in the place of these
        raise HandoffError(
            f"{parent / HANDOFF} holds {len(stray)} tensors of parts its {MANIFEST} does not list ({manifest['parts']};"
            f" e.g. {stray[:3]}): the manifest is not this file's"
        )
    problems = []
    for part in manifest["parts"]:
        if part not in modules:
            raise HandoffError(f"{parent}: part {part!r} is not a part of this model ({list(modules)})")
        expected = modules[part].state_dict()
        given = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
        fill_tied(modules[part], given)  # a tied weight is written once
        missing = [k for k in expected if k not in given and not _declared(f"{part}.{k}", new_parameters)]
        unexpected = [k for k in given if k not in expected]
        shapes = [f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
                  for k in given if k in expected and given[k].shape != expected[k].shape]  # fmt: skip
        if missing or unexpected or shapes:
            problems.append(f"{part}: missing {missing}, unexpected {unexpected}, wrong shapes {shapes}")
            continue
        with torch.no_grad():
            for key, value in given.items():
                expected[key].copy_(value)
    if problems:
        raise HandoffError(f"the hand-off from {parent} does not fit:\n  " + "\n  ".join(problems))
    log.info("loaded the hand-off of stage %s (%s)", manifest["stage"], ", ".join(manifest["parts"]))
    return list(manifest["parts"])


def _declared(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def parent_folder(cfg: DictConfig, i: int) -> Path | None:
    """The folder stage `i` starts from: `stage_parent` for the stage run alone that names one, else the stage
    before it in this run (none for the first)."""
    stages = list(cfg.stages)
    if cfg.get("stage") == stages[i].name and cfg.get("stage_parent"):
        return Path(cfg.stage_parent)
    return Path(cfg.paths.output_dir) / "stages" / stages[i - 1].name if i > 0 else None


def check_same_run(cfg: DictConfig, stages: list, root: Path) -> None:
    """A launch into a run folder whose stages an earlier launch finished or began (a hand-off, or a checkpoint to
    go on from) is that run again: their config.yaml and this launch's stage configs must agree on the model, the
    data, the seed and the global batch (training.SAME_RUN_KEYS), as a one-fit run's launch into its own folder must
    (own_checkpoint). Else another run (a sweep folder given again for another sweep, a changed recipe) would skip
    the finished stages and report their figures as its own, and go on from the stopped one's checkpoint with other
    settings. A stage given with its own checkpoint (`stage=<name> ckpt_path=...`) is meant: not compared."""
    from hicom.training import SAME_RUN_KEYS, run_differences

    only, differ = cfg.get("stage"), []
    for stage in stages:
        folder = root / stage.name
        if only is not None and stage.name != only or only == stage.name and cfg.get("ckpt_path"):
            continue
        written = folder / "config.yaml"
        begun = (folder / MANIFEST).is_file() or resume_checkpoint(folder / "checkpoints") is not None
        if not begun or not written.is_file():
            continue
        now = stage_config(cfg, stage, folder)
        keys = SAME_RUN_KEYS if now.get("seed") is not None else tuple(k for k in SAME_RUN_KEYS if k != "seed")
        try:
            earlier = OmegaConf.load(written)
        except Exception as err:  # noqa: BLE001  a file that does not read: nothing to compare it with
            log.warning("stage %s: %s does not read (%s), so its settings are not compared", stage.name, written, err)
            continue
        differences = run_differences(earlier, now, keys)
        if differences:
            differ.append(f"stage {stage.name} ({folder}): {differences}")
    if differ:
        raise RunFolderTaken(
            f"{root.parent} holds stages of a run configured otherwise (their config.yaml), which this launch would "
            "skip where finished and go on from where stopped:\n  " + "\n  ".join(differ) + "\nTo start another "
            "run, launch it into a new folder (hydra.run.dir; hydra.sweep.dir for a multirun); to go on from a stopped "
            "stage's checkpoint with these settings, give stage=<name> ckpt_path=<its checkpoints/last.ckpt>"
        )


def chosen_stages(cfg: DictConfig) -> list[DictConfig]:
    """The staged run's stages that this launch runs: all, or `cfg.stage` alone (a name it must have)."""
    stages, only = list(cfg.stages), cfg.get("stage")
    if only is None:
        return stages
    names = [stage.name for stage in stages]
    if only not in names:
        raise ValueError(f"stage={only!r} is not one of {names}")
    return [stage for stage in stages if stage.name == only]


def run_stages(cfg: DictConfig) -> dict[str, dict]:
    """Run the configured stages in order (or only `cfg.stage`), skipping finished ones."""
    stages = list(cfg.stages)
    names = [s.name for s in stages]
    for stage in stages:  # `guided: no` would read as guided
        for key in ("guided", "guide_added"):
            if stage.get(key) is not None:
                flag(f"stages.{stage.name}.{key}", stage.get(key))
    chosen_stages(cfg)  # a stage= it does not have is refused
    only = cfg.get("stage")
    if cfg.get("init_from"):
        raise ValueError(
            "init_from starts one fit from a release folder, and a staged run's stages start from their parents' "
            "hand-offs: set stages=null to fine-tune the release in one fit"
        )
    if cfg.get("ckpt_path") and only is None:  # a checkpoint is one stage's: the others' would be overwritten by it
        raise ValueError(
            "ckpt_path resumes one stage: give stage=<name> with it; or launch the run again under its name "
            "(HICOM_RUN_STAMP), and the stage that stopped part-way resumes from its own checkpoints/last.ckpt"
        )
    if cfg.get("stage_parent") and only is None:  # read only for a stage run alone: it would be ignored
        raise ValueError(
            "stage_parent starts one stage from another run's hand-off: give stage=<name> with it (the stages of a "
            "whole run each start from the one before)"
        )
    if unshared_launch():  # each process would keep its stages in its own folder and miss the others' hand-offs
        raise RuntimeError(
            "a staged run on several processes needs one run folder for all of them: set HICOM_RUN_STAMP to the same "
            "name in every process (scripts/cluster/torchrun.sh asks for it), or give torchrun an --rdzv-id"
        )
    root = Path(cfg.paths.output_dir) / "stages"
    one_fit = [name for name in (MANIFEST, METRICS, "checkpoints") if (root.parent / name).exists()]
    if one_fit:  # its records and these stages' side by side: evaluate.py and a sweep's table would read its own
        raise RunFolderTaken(
            f"{root.parent} holds a run of one fit ({', '.join(one_fit)}), which a staged run's stages would be written "
            "beside: launch it into a new folder (hydra.run.dir; hydra.sweep.dir for a multirun)"
        )
    # what evaluate.py checks the run's finished stages against (`find_handoff`); a stage run alone (stage=) does
    # not make its folder a run of all the stages
    if launch_rank() == 0 and only is None:
        ensure_dir(root.parent)
        write_atomically(root.parent / STAGE_LIST, json.dumps(names))
    check_lineage(cfg, root)
    # every stage still to run finds its weights and data, and has its values checked, now: not after the stages
    # before it have trained
    write_assets(cfg.get("assets"))
    to_run = [
        (stage.name, stage_config(cfg, stage, root / stage.name))
        for stage in stages
        if (only is None or stage.name == only) and not stage_done(root / stage.name)
    ]
    check_same_run(cfg, stages, root)
    try:
        check_pretrained(cfg)
    except FileNotFoundError as err:  # and the data's missing files in the same message: not a launch per kind
        raise FileNotFoundError("\n".join([str(err), *_missing_data(to_run, stages)])) from err
    check_tokenizers(cfg)
    unguided = {stage.name for stage in stages if stage.get("guided") is False}
    for name, stage_cfg in to_run:
        try:
            check_values(stage_cfg)  # its data's values first: check_model takes their frames
            built = check_model(stage_cfg)
            if name in unguided and built is not None and built.uses_guide:
                raise ValueError(
                    f"guided: false, but {type(built).__name__}.unguided_config leaves the compressor reading a guide "
                    "(uses_guide): a compressor of one's own that reads one overrides unguided_config to turn it "
                    "off (see Compressor in hicom/modules/compressors/base.py)"
                )
            check_trainable(stage_cfg)
            try:
                check_global_batch(stage_cfg)
            except ValueError as err:  # where a stage keeps them, as an override names them
                i = names.index(name)
                raise ValueError(
                    f"{err} (this stage's: stages.{i}.global_batch_size, stages.{i}.config.data.batch_size)"
                ) from err
        except ValueError as err:
            raise ValueError(f"stage {name}: {err}") from err
    missing_data = _missing_data(to_run, stages)
    if missing_data:
        raise FileNotFoundError("\n".join(missing_data))
    composed = dict(to_run)
    for name, stage_cfg in to_run:  # the compressor its parent trained, or will train in this run
        i = names.index(name)
        parent = parent_folder(cfg, i)
        if parent is not None and (parent / MANIFEST).is_file():
            manifest = read_manifest(parent / MANIFEST)
            trained, layer, depth = (
                manifest.get("compressor"),
                manifest.get("select_layer"),
                manifest.get("vision_depth"),
            )
        elif i > 0 and parent == root / names[i - 1] and names[i - 1] in composed:
            trained = OmegaConf.to_container(composed[names[i - 1]].model.compressor, resolve=True)
            layer, depth = OmegaConf.select(composed[names[i - 1]], "model.vision.select_layer"), None
        else:  # none: the stage stops with that before it is built
            continue
        try:
            check_parent_layer(parent, layer, OmegaConf.select(stage_cfg, "model.vision.select_layer"), depth)
            check_parent_compressor(
                parent,
                trained,
                stage_cfg.model.compressor,
                bool(stages[i].get("guide_added")),
                grows=bool(stages[i].get("new_parameters")),
            )
        except HandoffError as err:
            raise HandoffError(f"stage {name}: {err}") from err
    results = {}
    for i, stage in enumerate(stages):
        out_dir = root / stage.name
        if only is not None and stage.name != only:
            continue
        parent = parent_folder(cfg, i)
        if (out_dir / MANIFEST).is_file():
            done = read_manifest(out_dir / MANIFEST)
            trained_from = done.get("parent")
            if only == stage.name and cfg.get("stage_parent") and not _same_parent(done, parent, out_dir):
                raise ValueError(
                    f"stage {stage.name} is done in this run ({out_dir}), trained from {trained_from}, and "
                    f"stage_parent names another, {parent}: to train it from that one, launch it into a new run folder "
                    "(hydra.run.dir), or move this run's stage folder away"
                )
            if stage_done(out_dir):
                log.info("stage %s is done (%s): skipped", stage.name, out_dir)
                results[stage.name] = {"skipped": True}
                continue
            if resume_checkpoint(out_dir / "checkpoints") is None:
                log.warning(
                    "stage %s trained (%s), but its held-out check did not finish and it has no last.ckpt to finish it "
                    "from: skipped (evaluate.py ckpt=%s asks a benchmark's questions)", stage.name, out_dir, out_dir,
                )  # fmt: skip
                results[stage.name] = {"skipped": True}
                continue
            log.info(
                "stage %s trained, but its held-out check did not finish: it goes on from its checkpoint", stage.name
            )
        if i > 0 and (parent is None or not (parent / MANIFEST).is_file()):  # before any weights load
            raise FileNotFoundError(
                f"stage {stage.name} starts from its parent's hand-off, and {parent} holds no finished stage "
                f"({MANIFEST} missing): run the earlier stages first, or give stage_parent=<a finished stage's folder>"
            )
        if parent is not None:
            check_handoff(parent)
            started = read_manifest(parent / MANIFEST).get("init_from")
            if started:  # its untrained parts are that folder's, which a stage would rebuild from model's folders
                raise ValueError(
                    f"{parent} was fine-tuned from the release folder {started} (init_from): a stage from it would "
                    "take its untrained parts from model's folders instead; resume it (ckpt_path with init_from), "
                    "or export it (export_official) and fine-tune that folder with init_from"
                )
        stage_cfg = stage_config(cfg, stage, out_dir)
        if stage_cfg.ckpt_path:
            log.info("stage %s: resuming from %s", stage.name, stage_cfg.ckpt_path)
        elif parent is not None and launch_rank() == 0:  # what a fit that stops part-way went on from
            ensure_dir(out_dir)
            write_atomically(
                out_dir / STARTED, json.dumps({"parent": str(parent), "parent_sha256": _handoff_digest(parent)})
            )
        handoff = _Handoff(
            parent, out_dir, stage_cfg, list(stage.get("new_parameters") or []), stage.get("guide_added")
        )
        start = parent or "the model's folders (the first stage)"
        log.info("stage %s: training %s from %s", stage.name, list(stage.trainable), start)
        results[stage.name] = train(
            stage_cfg, before_fit=handoff.load, after_fit=handoff.save, resume=relaunch(cfg, stage.name)
        )
        free_memory()  # the stage's trainer and model sit in reference cycles: a 7B LLM held through the next stage
    return results


def _missing_data(to_run: list[tuple[str, DictConfig]], stages: list[DictConfig]) -> list[str]:
    """Every stage's missing data files, each line naming its stage (and the keys of the data source the stage
    sets itself, which the run's `data.source` cannot change): all at once, not one launch per stage."""
    missing = []
    names = [stage.name for stage in stages]
    for name, stage_cfg in to_run:
        try:
            check_data(stage_cfg)
        except FileNotFoundError as err:
            i = names.index(name)
            source = OmegaConf.select(stages[i], "config.data.source", default=None)
            keys = [f"stages.{i}.config.data.source.{key}" for key in source or {}]
            own = f"\n  (this stage sets its own {', '.join(keys)}: data.source.* of the run does not change it)"
            missing.append(f"stage {name}: {err}" + (own if keys else ""))
    return missing


def check_lineage(cfg: DictConfig, root: Path) -> None:
    """Refuses, before anything trains, the stages of this run whose weights would not follow from their parent's
    as it is now: a finished one whose parent this run trains (again: its folder was deleted), or one trained again
    since (its hand-off is not the one recorded); and one that stopped part-way from another parent's weights
    (`STARTED`), whose checkpoint would override the new parent's hand-off. Skipped, either would hand its stale
    weights on (the next stages trained from them, evaluate.py scoring them as the run's)."""
    stages, only = list(cfg.stages), cfg.get("stage")
    trained_here: set[Path] = set()
    stale = []
    for i, stage in enumerate(stages):
        if only is not None and stage.name != only:
            continue
        out_dir, parent = root / stage.name, parent_folder(cfg, i)
        if not (out_dir / MANIFEST).is_file():
            trained_here.add(out_dir.resolve())
            recorded = _started_from(out_dir)
            own = not (only == stage.name and cfg.get("ckpt_path"))  # an explicit ckpt_path is the user's choice
            if own and recorded and parent is not None and resume_checkpoint(out_dir / "checkpoints") is not None:
                if recorded != _handoff_digest(parent):
                    stale.append(
                        f"stage {stage.name} stopped part-way ({out_dir / 'checkpoints'}) training from other weights "
                        f"than {parent} holds now: resumed, its checkpoint would override them"
                    )
            continue
        if parent is None:
            continue
        if parent.resolve() in trained_here:
            stale.append(
                f"stage {stage.name} is done ({out_dir}), trained from {parent} as it was, which this run trains "
                "again (it has no finished hand-off)"
            )
        elif not (only == stage.name and cfg.get("stage_parent")):  # a parent named on purpose: checked below
            recorded = read_manifest(out_dir / MANIFEST).get("parent_sha256")
            if recorded and (parent / MANIFEST).is_file() and recorded != _handoff_digest(parent):
                stale.append(
                    f"stage {stage.name} is done ({out_dir}), trained from other weights than {parent} holds now "
                    "(trained again since)"
                )
    if stale:
        raise ValueError(
            "\n".join(stale) + "\nTheir weights would not follow from their parents': delete their folders to train "
            "them again from the parents as they are (or put the parents' earlier folders back), or launch into a new "
            "run folder (hydra.run.dir) with stage=<name> stage_parent=<folder>"
        )


def _started_from(out_dir: Path) -> str | None:
    """The parent's hand-off digest a stage's fit started from (`STARTED`), or None (none recorded: older runs)."""
    try:
        return json.loads((out_dir / STARTED).read_text()).get("parent_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _same_parent(done: dict, parent: Path | None, out_dir: Path) -> bool:
    """Whether a finished stage (its manifest, `done`) was trained from `parent`: by the parent's hand-off digest,
    which manifests record (the same weights wherever the run has moved, and not a parent trained again in its
    folder since); for an older manifest, by the folder it records or, where that folder is gone (the run moved),
    as the stage of the same name in this run (as `hicom.eval.runner.find_handoff` reads a moved run)."""
    recorded = done.get("parent")
    if recorded is None or parent is None:
        return recorded is None and parent is None
    if done.get("parent_sha256") is not None:
        return done["parent_sha256"] == _handoff_digest(parent)
    recorded = Path(recorded)
    if recorded.exists():
        return recorded.resolve() == parent.resolve()
    return recorded.parent.name == "stages" and parent.resolve() == (out_dir.parent / recorded.name).resolve()


def relaunch(cfg: DictConfig, stage: str) -> str:
    """How a staged run whose stage stopped part-way goes on: the same command into the run's own folder
    (`hydra.run.dir`, which holds under a custom run folder too, where HICOM_RUN_STAMP names one under
    logs/train/runs/ alone), which skips the finished stages and resumes that one from its own checkpoints/last.ckpt."""
    from hicom.utils.config import shell_override

    return f"{command_again(shell_override('hydra.run.dir', cfg.paths.output_dir))} resumes stage {stage}"


def free_memory() -> None:
    """Collect what a finished fit left in reference cycles, and return its GPU memory to the allocator's pool."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Handoff:
    """Loads a stage's parent before its fit and saves the stage after it: the parts trained so far."""

    def __init__(
        self, parent: Path | None, out_dir: Path, cfg: DictConfig, new_parameters: list[str], guide_added: bool = False
    ) -> None:
        self.parent, self.out_dir, self.cfg, self.new_parameters = parent, out_dir, cfg, new_parameters
        self.guide_added = bool(guide_added)
        self.carried: list[str] = []
        self.handed: str | None = None  # the parent's hand-off digest (its manifest's) when it loaded

    def load(self, model) -> None:
        if self.parent is not None:
            new = [*self.new_parameters, *(guide_parameters(model, self.cfg) if self.guide_added else [])]
            self.carried = load_handoff(model, self.parent, new, cfg=self.cfg)
            self.handed = _handoff_digest(self.parent)  # the file load_handoff checked against it

    def save(self, model, masters: dict[str, torch.Tensor] | None = None) -> None:
        """After the fit, on every process; or in one process with the `masters` read from a checkpoint."""
        parts = list(dict.fromkeys([*self.carried, *model.trainable]))  # less the parts it left frozen
        parent = str(self.parent) if self.parent else None
        write = True if masters is not None else model.trainer.is_global_zero
        frozen = [part for part in self.carried if part not in model.trainable]
        unchanged = self.as_handed(model, frozen) if write and frozen else None
        save_handoff(model, self.out_dir, parts, parent, self.cfg, write=write, masters=masters, unchanged=unchanged)

    def as_handed(self, model, parts: list[str]) -> dict[str, torch.Tensor] | None:
        """The parent's hand-off tensors of `parts`, which this stage carries frozen, as it loaded them, where the
        module holds them in 16 bits (DeepSpeed casts it whole): read again from the parent's file, if that is
        still the file loaded (its digest). None where the module holds them as loaded, and where the file is gone
        or another (the parent moved, or trained again: the stage's save must not fail for it, nor hand on weights
        it did not train with); the module's copies are then handed on, with a warning."""
        from safetensors import safe_open

        modules = model.parts()
        if not any(p.dtype in (torch.bfloat16, torch.float16) for part in parts for p in modules[part].parameters()):
            return None
        path = self.parent / HANDOFF
        try:
            loaded = self.handed is not None and file_sha256(path) == self.handed
        except OSError:
            loaded = False
        if not loaded:
            log.warning(
                "%s is no longer the hand-off this stage loaded (moved, or trained again): the parts it carries "
                "frozen (%s) are handed on as the module holds them, in 16 bits", path, ", ".join(parts),
            )  # fmt: skip
            return None
        with safe_open(str(path), framework="pt") as handed:
            return {key: handed.get_tensor(key) for key in handed.keys() if key.split(".", 1)[0] in parts}
