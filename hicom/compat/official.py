"""The released HICom checkpoints in our modules: read an official config.json, build the same compressor, map its
projector weights, and compare outputs one sample at a time (`compressor.compress`).

The release describes its projector with a legacy string, `mm_projector_type`, plus a few config fields (SPEC 4).
Widths come from mm_hidden_size (the vision and guide width: SigLIP so400m's towers are both 1152 wide) and
hidden_size (the LLM's); the release's CLIP-based variants, for which no weights were published, are not built:
a config whose mm_vision_tower is not siglip-so400m-patch14-384 is refused (one that names no tower is taken at
its widths, as tests and parity runs write them).
This is the one place that parses such strings; everything else in the project takes structured configs.

    local<k_t><k_s>[_adapt<q|k|v|g>...][_guide<mode>|_<mode>]   a local branch, kernel (k_t, k_s, k_s)
    global<N>[_adaptg][_guide<mode>|_<mode>]                    a global branch with N queries
    mlp<depth>x_gelu | linear                                   the LLaVA-style baseline (2x bilinear for videos)

Each branch injects `use_guide` ("off" / "direct" / "coarse" / "fine") unless its own part names a mode; a branch
takes at most one mode part and one adapt part. The release parses only the `guide<mode>` form: its
"local43_global32_coarse" runs the global branch with direct injection, 32 identical tokens (SPEC 3, defect 1).
We follow the name (and the paper): coarse. Checkpoints trained with the defect load with
`reproduce_defect_1=True`, which `load_official` sets when the weights call for it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from omegaconf import open_dict
from torch import nn

from hicom.modules.compressors import (
    Adapt,
    BilinearPoolCompressor,
    ClipNorm,
    Compressor,
    GlobalCompressor,
    Guide,
    HICom,
    Keys,
    LocalCompressor,
    Position,
)
from hicom.modules.compressors.base import RELEASE_INIT_STD
from hicom.utils.checkpoints import fill_tied, untied_state
from hicom.utils.files import as_created_here

log = logging.getLogger(__name__)

PREFIX = "model.mm_projector."
SIGLIP, SIGLIP_WIDTH = "siglip-so400m-patch14-384", 1152  # the one tower the published checkpoints use
RELEASE_SELECT_LAYER = -2  # the vision tower's hidden state the release's compressor reads: the last layer's input
# the frames the release trains and the paper evaluates at: what a folder whose config.json names none was run at
RELEASE_FRAMES = 32
# how the release's own inference (its model_init) treats a clip: padded to square, tokens flattened without a
# newline token, as ours are; it reads these fields and num_frames from config.json
RELEASE_VISUAL_FIELDS = {"image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", "mm_newline_position": "no_token"}
_MODES = {mode.value for mode in Guide}
_MLP = re.compile(r"mlp(\d+)x_gelu")


@dataclass(frozen=True)
class Branch:
    """One parsed branch of a legacy projector name."""

    size: tuple[int, ...]  # (k_t, k_s) for local, (N,) for global
    adapt: frozenset[str] = frozenset()
    named_guide: Guide | None = None  # the mode the name gives this branch, if any
    release_parses_mode: bool = False  # the name used the guide<mode> form, which the release reads too


@dataclass(frozen=True)
class ProjectorSpec:
    """What a legacy `mm_projector_type` (+ use_guide, use_clip_scale) asks for."""

    local: Branch | None = None
    global_: Branch | None = None
    mlp_depth: int | None = None  # the LLaVA baseline instead of HICom
    use_guide: Guide = Guide.OFF
    clip_scale: frozenset[str] = field(default_factory=frozenset)

    def guide_of(self, branch: Branch, *, reproduce_defect_1: bool = False) -> Guide:
        """The branch's mode: the one its part of the name gives, else use_guide. The release reads only the
        guide<mode> form, so with `reproduce_defect_1` a bare mode (as in global32_coarse) is ignored."""
        if branch.named_guide is None or (reproduce_defect_1 and not branch.release_parses_mode):
            return self.use_guide
        return branch.named_guide


def parse_projector_type(name: str, use_guide: str | None = None, use_clip_scale: str | None = "") -> ProjectorSpec:
    """Parse a legacy projector name; unknown parts are an error rather than ignored."""
    guide = Guide.OFF if use_guide in (None, "", "off") else _mode(use_guide, "use_guide")
    scales = frozenset(part.strip() for part in (use_clip_scale or "").split(",") if part.strip())
    if scales - {"local", "global"}:
        raise ValueError(f"use_clip_scale must name local and/or global, got {use_clip_scale!r}")
    if name == "linear" or _MLP.fullmatch(name):
        depth = 1 if name == "linear" else int(_MLP.fullmatch(name).group(1))
        return ProjectorSpec(mlp_depth=depth, use_guide=guide)
    branches: dict[str, Branch] = {}
    current: str | None = None
    for part in name.split("_"):
        if match := re.fullmatch(r"local(\d)(\d{1,2})", part):
            current, size = "local", (int(match.group(1)), int(match.group(2)))
        elif match := re.fullmatch(r"global(\d+)", part):
            current, size = "global", (int(match.group(1)),)
        elif current is None:
            raise ValueError(f"projector type {name!r}: {part!r} before any local<kt><ks> or global<N> part")
        else:
            branch = branches[current]
            if match := re.fullmatch(r"adapt([qkvg]+)", part):
                if current == "global" and match.group(1) != "g":
                    raise ValueError(f"projector type {name!r}: the global branch only has adaptg, got {part!r}")
                if branch.adapt:  # the release reads only the last adapt part of a branch
                    raise ValueError(f"projector type {name!r}: a second adapt part {part!r} in its {current} branch")
                branches[current] = replace(branch, adapt=frozenset(match.group(1)))
            elif (match := re.fullmatch(r"guide(\w+)", part)) or part in _MODES:
                if branch.named_guide is not None:  # the release keeps the last guide<mode>, ignores bare modes
                    raise ValueError(
                        f"projector type {name!r}: its {current} branch names a second guide mode, {part!r} after "
                        f"{branch.named_guide.value!r}: name one"
                    )
                mode = _mode(match.group(1), name) if match else Guide(part)
                branches[current] = replace(branch, named_guide=mode, release_parses_mode=match is not None)
            else:
                raise ValueError(
                    f"projector type {name!r}: unknown part {part!r} (expected adapt<qkvg>, guide<mode> or a mode)"
                )
            continue
        if current in branches:
            raise ValueError(f"projector type {name!r} names its {current} branch twice")
        branches[current] = Branch(size=size)
    if not branches:
        raise ValueError(f"projector type {name!r} names no local<kt><ks> or global<N> branch")
    return ProjectorSpec(
        local=branches.get("local"), global_=branches.get("global"), use_guide=guide, clip_scale=scales
    )


def _check_tower(config: Mapping) -> None:
    """ValueError unless the config's mm_vision_tower is SigLIP so400m at its width, the release's widths then
    being ours. A config that names no tower is taken at its widths (tests and parity runs write such configs)."""
    tower = config.get("mm_vision_tower")
    if not tower:
        return
    if SIGLIP not in str(tower):
        kind = "not a tower the release builds"
        if re.search(r"(?<!sig)clip", str(tower), re.IGNORECASE):
            kind = "a CLIP tower: the release's CLIP variants are not built here"
        raise ValueError(f"official config: mm_vision_tower {tower!r} is {kind}; only {SIGLIP} checkpoints load")
    if int(config["mm_hidden_size"]) != SIGLIP_WIDTH:
        raise ValueError(
            f"official config: mm_hidden_size {config['mm_hidden_size']} with mm_vision_tower {tower!r}, whose "
            f"features are {SIGLIP_WIDTH} wide"
        )


def _mode(value: str, where: str) -> Guide:
    if value not in _MODES:
        raise ValueError(f"{where}: unknown guide mode {value!r}, expected one of {sorted(_MODES)}")
    return Guide(value)


def build_compressor(config: Mapping, *, reproduce_defect_1: bool = False) -> Compressor:
    """Our compressor for an official config.json dict (fields: mm_projector_type, use_guide, use_clip_scale,
    mm_hidden_size, hidden_size, mm_vision_tower). `reproduce_defect_1` reproduces release defect 1: a branch
    takes `use_guide` even where the name gives it another mode (a bare mode: see `ProjectorSpec.guide_of`)."""
    missing = [key for key in ("mm_projector_type", "mm_hidden_size", "hidden_size") if key not in config]
    if missing:
        raise ValueError(f"official config lacks {missing}: is this a HICom config.json?")
    _check_tower(config)
    spec = parse_projector_type(config["mm_projector_type"], config.get("use_guide"), config.get("use_clip_scale"))
    in_dim, out_dim = int(config["mm_hidden_size"]), int(config["hidden_size"])
    dims = dict(in_dim=in_dim, out_dim=out_dim, guide_dim=in_dim)
    if spec.mlp_depth is not None:
        return BilinearPoolCompressor(**dims, factor=2, readout_depth=spec.mlp_depth, init_std=RELEASE_INIT_STD)
    local = global_ = None
    if spec.local is not None:
        guide = spec.guide_of(spec.local, reproduce_defect_1=reproduce_defect_1)
        adapt = {Adapt(a) for a in spec.local.adapt}
        if guide is Guide.DIRECT:
            adapt.discard(Adapt.Q)  # the release drops it: with direct injection the queries are the guide
        if guide is Guide.OFF:
            adapt.discard(Adapt.G)  # no injector, nothing to adapt
        kt, ks = spec.local.size
        local = partial(
            LocalCompressor,
            kernel=(kt, ks, ks),
            guide=guide,
            # the release's vision tower computes the embeds whenever use_guide is on, and then they are the keys
            keys="embeds" if spec.use_guide is not Guide.OFF else "features",
            adapt=sorted(a.value for a in adapt),
            clip_scale="local" in spec.clip_scale,
            clip_norm=ClipNorm.RELEASE,
            init_std=RELEASE_INIT_STD,
        )
    if spec.global_ is not None:
        guide = spec.guide_of(spec.global_, reproduce_defect_1=reproduce_defect_1)
        global_ = partial(
            GlobalCompressor,
            num_queries=spec.global_.size[0],
            guide=guide,
            position=Position.KV,
            adapt_guide="g" in spec.global_.adapt and guide is not Guide.OFF,
            clip_scale="global" in spec.clip_scale,
            init_std=RELEASE_INIT_STD,
        )
    return HICom(**dims, local=local, global_=global_)


_RENAMES = {
    "local_logit_scale": "local_compressor.logit_scale",
    "local_logit_bias": "local_compressor.logit_bias",
    "global_logit_scale": "global_compressor.logit_scale",
    "global_logit_bias": "global_compressor.logit_bias",
}


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], compressor: nn.Module | None = None) -> dict:
    """Official projector weights (bare mm_projector.bin names or model.mm_projector.* names) in our names.

    With `compressor`, the keys must match its state dict exactly; otherwise a KeyError lists the missing and
    the unexpected ones. The release keeps the clip-scale pair of every branch use_clip_scale names, even of one
    its projector name leaves out: a pair whose branch has no other weights is dropped. Two names of one tensor
    (model.mm_projector.X and X) are a ValueError.
    """
    out, source = {}, {}
    for key, value in state_dict.items():
        name = key.split("mm_projector.", 1)[1] if "mm_projector." in key else key
        if re.match(r"\d+\.", name):  # the LLaVA baseline's bare nn.Sequential
            name = f"readout.{name}"
        elif name in ("weight", "bias"):  # its "linear" form, a bare nn.Linear
            name = f"readout.0.{name}"
        name = _RENAMES.get(name, name)
        if name in out:
            raise ValueError(f"projector weights hold {name!r} twice, as {source[name]!r} and as {key!r}: keep one")
        out[name], source[name] = value, key
    for branch in ("local_compressor", "global_compressor"):
        pair = (f"{branch}.logit_scale", f"{branch}.logit_bias")
        if not any(name.startswith(f"{branch}.") and name not in pair for name in out):
            for name in pair:
                if out.pop(name, None) is not None:
                    log.info("dropped %s: the release keeps it for a branch this projector does not have", source[name])
    if compressor is not None:
        check_keys(out, compressor)
    return out


def to_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = PREFIX, *, linear: bool = False
) -> dict:
    """Our compressor's weights in the release's layout (the inverse of `convert_state_dict`). The LLaVA
    baseline's readout is the release's nn.Sequential (mlp<depth>x_gelu: 0.weight, 0.bias, 2.weight, ...), or
    with `linear` its bare nn.Linear (projector type "linear": weight, bias)."""
    if linear and set(state_dict) != {"readout.0.weight", "readout.0.bias"}:
        raise ValueError("linear: the release's 'linear' projector is one nn.Linear; this state dict is not")
    inverse = {ours: theirs for theirs, ours in _RENAMES.items()}
    out = {}
    for name, value in state_dict.items():
        name = inverse.get(name, name)
        if re.match(r"readout\.\d+\.", name):  # the LLaVA baseline
            name = name.split(".", 2)[2] if linear else name[len("readout.") :]
        out[prefix + name] = value
    return out


def check_keys(
    state_dict: Mapping[str, torch.Tensor],
    compressor: nn.Module,
    what: str = "projector weights do not fit the compressor",
) -> None:
    """KeyError unless the names and shapes of `state_dict` are exactly those of the module's (`what` begins it)."""
    missing, unexpected, shapes = _mismatches(state_dict, compressor)
    if missing or unexpected or shapes:
        raise KeyError(f"{what}: {_listed(missing, unexpected, shapes)}")


def _mismatches(state_dict: Mapping[str, torch.Tensor], module: nn.Module) -> tuple[list, list, list]:
    """The names `module` has and `state_dict` lacks, the names only `state_dict` has, and the shared names of
    other shapes (each with both shapes), sorted."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    return missing, unexpected, shapes


def _listed(missing: list, unexpected: list, shapes: list) -> str:
    return f"missing {missing}, unexpected {unexpected}" + (f", wrong shapes {shapes}" if shapes else "")


def read_projector_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The mm_projector tensors of an official folder: those of the model's weight files (the ones from_pretrained
    reads, `stored_tensors`), or, where they hold none (a stage's output), mm_projector.bin / .safetensors; the
    rule `import_official` follows, so that a stage's file left beside a whole model is never what loads."""
    folder = Path(folder)
    path = projector_file(folder)
    try:
        check_pickled_shards(folder)
        stored = stored_tensors(folder)
    except (ValueError, FileNotFoundError) as error:  # the compressor alone needs only the projector's own file
        if path is None or model_files(folder):  # the model's safetensors there, but one missing or cut short: named,
            raise  # never made up for by a stage's projector file beside them (an earlier stage's, maybe)
        log.warning("%s: reading the projector from %s, as the model's weight files cannot be read: %s", folder,
                    path.name, error)  # fmt: skip
        return _read_projector_file(path)
    projector = {key: value for key, value in stored.items() if "mm_projector." in key}
    if projector:
        if path is not None:
            log.info("%s: reading the projector from the model's weight files; %s beside them is not read", folder,
                     path.name)  # fmt: skip
        return _read(projector)
    if path is not None:
        return _read_projector_file(path)
    if not stored:
        raise FileNotFoundError(
            f"no projector weights in {folder}: expected mm_projector.bin, mm_projector.safetensors or "
            "model*.safetensors holding model.mm_projector.* tensors"
        )
    raise KeyError(f"the safetensors files in {folder} hold no model.mm_projector.* tensors")


PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")  # the projector alone, as a release stage saves it


def model_files(folder: Path) -> list[Path]:
    """The folder's .safetensors files other than a stage's projector (`PROJECTOR_FILES`), sorted."""
    return sorted(p for p in folder.glob("*.safetensors") if p.name not in PROJECTOR_FILES)


def projector_file(folder: Path) -> Path | None:
    """The folder's file of projector weights alone (`PROJECTOR_FILES`, in that order), if it has one."""
    return next((folder / name for name in PROJECTOR_FILES if (folder / name).is_file()), None)


def _read_projector_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        if path.suffix == ".bin":
            return dict(torch.load(path, map_location="cpu", weights_only=True))
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # truncated or foreign files: say which file
        raise ValueError(f"cannot read projector weights from {path}: {error}") from error


def load_official(folder: str | Path, *, reproduce_defect_1: bool | None = None) -> Compressor:
    """Build and load the compressor of an official checkpoint folder (config.json + projector weights).

    A bare mode in the projector name (as in "local43_global32_coarse") sets its branch's mode in our reading;
    the release ignores it and runs `use_guide` there (defect 1 of SPEC 3). Where the two readings differ, the
    weights decide: the release's when they fit it, with a warning, also when they fit both (direct and off
    injection have the same weights: only the release's trainer writes a bare mode, so they were trained in its
    reading); else ours. `reproduce_defect_1` True or False takes the release's or our reading whatever the weights.
    """
    if reproduce_defect_1 not in (None, True, False):  # e.g. the string 'false' from a quoted override
        raise ValueError(f"reproduce_defect_1 is true, false or null (the weights decide), got {reproduce_defect_1!r}")
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: pass an official HICom checkpoint folder")
    config = read_config(folder)
    state = convert_state_dict(read_projector_weights(folder))
    compressor = _fitted_reading(
        folder,
        config,
        state,
        reproduce_defect_1=reproduce_defect_1,
        then="load_official(folder, reproduce_defect_1=False) loads the name's reading "
        "(official.reproduce_defect_1=false in evaluate.py)",
    )
    compressor.load_state_dict(state, strict=True)
    return compressor


def _fitted_reading(
    folder: Path,
    config: Mapping,
    state: Mapping[str, torch.Tensor],
    *,
    reproduce_defect_1: bool | None = None,
    then: str,
) -> Compressor:
    """The compressor (unloaded) of a folder's config.json in the reading `reproduce_defect_1` names (True: the
    release's, False: the name's), or, where it is None, in the one the projector weights `state` fit (see
    `load_official`), with a warning where that is the release's and it differs from the name's; `then` ends the
    warning of weights that fit both readings (how to take the other one). A KeyError where the weights fit no
    reading tried (`_misfit`)."""
    compressor = build_compressor(config, reproduce_defect_1=bool(reproduce_defect_1))
    differences = _differing_readings(config) if reproduce_defect_1 is None else ""
    if not differences:
        if not _fits(state, compressor):
            raise _misfit(folder, config, state, {"its reading": compressor})
        return compressor
    release = build_compressor(config, reproduce_defect_1=True)
    fit_ours, fit_release = _fits(state, compressor), _fits(state, release)
    if not fit_release:
        if not fit_ours:
            raise _misfit(folder, config, state, {"the name's": compressor, "the release's": release})
        return compressor
    equal = release.global_compressor is not None and release.global_compressor.guide is Guide.DIRECT
    if fit_ours:
        log.warning(
            "%s: the weights fit both readings of mm_projector_type %r (use_guide %r): %s. Loading the release's: "
            "only its trainer writes a bare mode (our export writes guide<mode>), so they were trained in its "
            "reading (defect 1 of SPEC 3)%s. %s",
            folder,
            config["mm_projector_type"],
            config.get("use_guide"),
            differences,
            ": its global tokens are all equal" if equal else "",
            then,
        )
    else:
        log.warning(
            "%s: the weights were trained with the release's reading of mm_projector_type %r (use_guide %r, "
            "defect 1 of SPEC 3): %s. Loading them that way%s",
            folder,
            config["mm_projector_type"],
            config.get("use_guide"),
            differences,
            ": its global tokens are all equal" if equal else "",
        )
    return release


def _misfit(folder: Path, config: Mapping, state: Mapping[str, torch.Tensor], readings: Mapping) -> KeyError:
    """The KeyError of projector weights that fit none of `readings` (compressors by the name of their reading):
    what the closest one (the fewest missing, unexpected and mis-shaped tensors) misses, or each of those that tie;
    and where every readout of the closest is of other widths, config.json's widths, the likely cause."""
    counts = {name: _mismatches(state, compressor) for name, compressor in readings.items()}
    size = {name: sum(map(len, mismatches)) for name, mismatches in counts.items()}
    closest = [name for name in readings if size[name] == min(size.values())]
    message = "projector weights do not fit the compressor config.json describes"
    if len(readings) > 1:
        message += (
            f", in either reading of mm_projector_type {config['mm_projector_type']!r} (use_guide "
            f"{config.get('use_guide')!r}, defect 1 of SPEC 3)"
        )
    if len(closest) < len(readings):
        others = "; ".join(f"{name}: {_mismatch_count(size[name])}" for name in readings if name not in closest)
        message += f"; the closest is {closest[0]} ({_mismatch_count(size[closest[0]])}; {others})"
    listed = {name: _listed(*counts[name]) for name in closest}
    if len(set(listed.values())) == 1:  # one reading, or readings that miss the same tensors
        message += f": {listed[closest[0]]}"
    else:
        message += ": " + "; ".join(f"{name}: {listing}" for name, listing in listed.items())
    return KeyError(message + _widths_hint(folder, config, state, readings[closest[0]]))


def _mismatch_count(n: int) -> str:
    return f"{n} mismatch{'es' * (n != 1)}"


def _widths_hint(folder: Path, config: Mapping, state: Mapping[str, torch.Tensor], compressor: nn.Module) -> str:
    """Where every readout of `compressor` (its first Linear, d_out x d_in) is of another shape in `state`: the
    widths the weights have and config.json's, naming those that differ ("" otherwise). A config.json copied from
    another model size, or edited, misreads every branch at once."""
    expected = compressor.state_dict()
    readouts = [key for key in expected if key == "readout.0.weight" or key.endswith(".readout.0.weight")]
    if not readouts or any(
        key not in state or state[key].dim() != 2 or state[key].shape == expected[key].shape for key in readouts
    ):
        return ""
    fields = [
        f"{field} {config[field]}"
        for field, axis in (("mm_hidden_size", 1), ("hidden_size", 0))
        if all(state[key].shape[axis] != expected[key].shape[axis] for key in readouts)
    ]
    stored = " and ".join(sorted({f"{state[key].shape[1]} -> {state[key].shape[0]}" for key in readouts}))
    likely = f"{' and '.join(fields)} {'are' if len(fields) > 1 else 'is'}" if fields else "widths are"
    return (
        f". Every readout is of other widths than {folder / 'config.json'} gives: the weights map {stored} (the "
        f"vision width -> the LLM's), config.json mm_hidden_size {config['mm_hidden_size']} -> hidden_size "
        f"{config['hidden_size']}. Its {likely} likely not these weights': is it the config.json written with them?"
    )


def folder_compressor(folder: str | Path, *, reproduce_defect_1: bool | None = None) -> Callable[..., Compressor]:
    """The compressor of a release-layout folder as `VideoLLM` takes one (a callable of the towers' widths): the
    one its config.json describes, in the reading its weights fit (`load_official`), so that evaluating a
    checkpoint needs no compressor settings. Towers of other widths than config.json's are a ValueError."""
    folder = Path(folder)
    return _composer(folder, load_official(folder, reproduce_defect_1=reproduce_defect_1))


def _composer(folder: Path, compressor: Compressor) -> Callable[..., Compressor]:
    """`compressor`, returned for towers of the widths the folder's config.json gives, else a ValueError."""
    config = read_config(folder)
    widths = {"in_dim": int(config["mm_hidden_size"]), "out_dim": int(config["hidden_size"])}

    def compose(*, in_dim: int, out_dim: int, guide_dim: int | None = None) -> Compressor:
        towers = {"in_dim": in_dim, "out_dim": out_dim}
        if towers != widths or guide_dim not in (None, in_dim):
            raise ValueError(
                f"{folder / 'config.json'} gives the vision width (mm_hidden_size) {widths['in_dim']} and the LLM "
                f"width (hidden_size) {widths['out_dim']}, but the towers have {in_dim} and {out_dim} (text tower "
                f"{guide_dim}): pick the vision tower the checkpoint was trained on (model/vision=siglip_so400m for "
                "the released HICom-7B; the LLM comes from the folder)"
            )
        return compressor

    return compose


def _differing_readings(config: Mapping) -> str:
    """Where the release's reading of the config's projector name differs from ours, in words ("" if nowhere)."""
    spec = parse_projector_type(config["mm_projector_type"], config.get("use_guide"), config.get("use_clip_scale"))
    differences = []
    for where, branch in (("local", spec.local), ("global", spec.global_)):
        if branch is not None and spec.guide_of(branch) is not spec.guide_of(branch, reproduce_defect_1=True):
            differences.append(
                f"the name gives the {where} branch {spec.guide_of(branch).value} injection, the release (which "
                f"reads only guide<mode> parts) {spec.guide_of(branch, reproduce_defect_1=True).value}"
            )
    return "; ".join(differences)


def _fits(state: Mapping[str, torch.Tensor], compressor: nn.Module) -> bool:
    return not any(_mismatches(state, compressor))


# The whole model in the release's layout (SPEC 4): vision tower and guide encoder under model.vision_tower.*,
# the projector under model.mm_projector.*, the LLM as Qwen2 (model.*, lm_head.*).
_VISION = "model.vision_tower.vision_tower.vision_model."
_GUIDE = "model.vision_tower.guide_encoder.text_model."


def release_gaps(compressor: Compressor) -> list[str]:
    """What of `compressor` the release's config fields and projector name cannot carry, each with what to change
    (empty: `projector_type` describes it, and `build_compressor` rebuilds it from that description)."""
    if not isinstance(compressor, HICom):
        return [f"the compressor is a {type(compressor).__name__}: only HICom compressors have a release name"]
    gaps = []
    local, global_ = compressor.local_compressor, compressor.global_compressor
    branches = {"model.compressor.local": local, "model.compressor.global_": global_}
    modes = {branch.guide for branch in branches.values() if branch is not None and branch.uses_guide}
    if Guide.FINE in modes and len(modes) > 1:
        gaps.append(
            f"guides {' and '.join(sorted(mode.value for mode in modes))}: the release hands every branch the guide "
            "in the one form use_guide asks for (token-level for fine, pooled otherwise): make both fine or neither"
        )
    for where, branch in branches.items():
        if branch is None:
            continue
        if len(branch.readout) != 3:
            depth = (len(branch.readout) + 1) // 2
            gaps.append(f"{where}.readout_depth={depth}: the release's readouts have 2 layers: set 2")
        if branch.guide_injector is not None and not isinstance(branch.guide_injector.text2qk_proj, nn.Identity):
            gaps.append(
                f"{where}: a guide of another width than the vision features: the release's guide encoder is the "
                "SigLIP tower's text half, as wide as its vision features"
            )
    if local is not None:
        kt, ks, _ = local.kernel
        if kt > 9 or ks > 99:
            gaps.append(
                f"model.compressor.local.kernel={list(local.kernel)}: the release's name holds k_t in one digit and "
                "k_s in one or two"
            )
        if local.unit_qk and not (
            local.guide is Guide.DIRECT
            and local.uses_embeds
            and Adapt.K not in local.adapt
            and not local.guide_injector.adapt
            and isinstance(local.guide_injector.text2qk_proj, nn.Identity)
        ):
            gaps.append(
                "model.compressor.local.clip_norm=qk: the release's clip scale makes the embeds and the guide unit "
                "length, not the queries and keys the attention uses (the same only for direct injection of the "
                "guide itself against unadapted embeds): set release"
            )
        keys = Keys.EMBEDS if modes else Keys.FEATURES
        if local.keys is not keys:
            gaps.append(
                f"model.compressor.local.keys={local.keys.value}: the release matches the local queries against the "
                "joint-space embeddings whenever a branch is guided (use_guide on), else against the features: "
                f"set {keys.value}"
            )
    if global_ is not None:
        if global_.position is not Position.KV:
            gaps.append(
                f"model.compressor.global_.position={global_.position.value}: the release adds the position table "
                "to the keys and the values: set kv"
            )
        heads = max(1, global_.query.shape[1] // 128)
        if global_.num_heads != heads:
            gaps.append(
                f"model.compressor.global_.num_heads={global_.num_heads}: the release uses width / 128 heads "
                f"({heads} here): set null"
            )
    return gaps


def projector_type(compressor: Compressor) -> dict:
    """The legacy config fields that describe one of our HICom compressors, in the guide<mode> form that the
    release parses too (so no bare mode is ever left to defect 1). A ValueError lists what the release's
    fields cannot carry (`release_gaps`): written anyway, they would load as another model."""
    gaps = release_gaps(compressor)
    if gaps:
        raise ValueError("the release's config cannot describe this compressor:\n  " + "\n  ".join(gaps))
    return _legacy_fields(compressor)


def _legacy_fields(compressor: HICom) -> dict:
    """mm_projector_type, use_guide and use_clip_scale as `projector_type` writes them, unchecked."""
    parts, scales, modes = [], [], []
    local, global_ = compressor.local_compressor, compressor.global_compressor
    if local is not None:
        kt, ks, _ = local.kernel
        name = f"local{kt}{ks}"
        if local.adapt:
            name += "_adapt" + "".join(a.value for a in Adapt if a in local.adapt)
        parts.append(f"{name}_guide{local.guide.value}")
        modes.append(local.guide)
        if local.clip_scale:
            scales.append("local")
    if global_ is not None:
        name = f"global{global_.num_queries}"
        if global_.guide_injector is not None and global_.guide_injector.adapt:
            name += "_adaptg"
        parts.append(f"{name}_guide{global_.guide.value}")
        modes.append(global_.guide)
        if global_.clip_scale:
            scales.append("global")
    guided = [m for m in modes if m is not Guide.OFF]
    # use_guide: on whenever a branch is guided (the release then computes the embeds), fine when one is fine
    # (the release then hands the guide over token-level); each branch's own mode is in the name
    return {
        "mm_projector_type": "_".join(parts),
        "use_guide": (Guide.FINE if Guide.FINE in guided else next(iter(guided), Guide.OFF)).value,
        "use_clip_scale": ",".join(scales),
    }


SHARD_BYTES = 5 * 2**30  # save_pretrained's default shard size


def export_official(net, folder: str | Path, *, num_frames: int | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write our VideoLLM as a release-layout folder: config.json (the LLM's, under the release's model type, with
    the projector's fields, `num_frames`, the frames it was trained at (None: the release's 32), which evaluate.py
    then defaults to, and the fields the release's own inference reads, `RELEASE_VISUAL_FIELDS`), the weights
    (model.safetensors, or shards of at most `shard_bytes` with their index, as save_pretrained writes them), and
    the LLM's tokenizer and generation config. A ValueError, before anything is written, lists what the release's
    layout cannot carry (a CLIP tower, an LLM other than Qwen2 or Llama, `release_gaps`), or weight files of another
    export in the folder, or a `num_frames` that is no whole number >= 1."""
    from hicom.compat.release_llm import RELEASE_TYPES, release_type
    from hicom.modules.vision import SiglipTower

    num_frames = RELEASE_FRAMES if num_frames is None else num_frames
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a whole number >= 1, got {num_frames!r}")
    gaps = release_gaps(net.compressor)
    if not isinstance(net.vision, SiglipTower):
        # joint-space keys come with the SigLIP tower only (CLIP refuses them): its gap first, then theirs
        keys = "model.compressor.local.keys="
        gaps = [gap + " (with the SigLIP tower: only it has them)" if gap.startswith(keys) else gap for gap in gaps]
        gaps.insert(0, f"model.vision: a {type(net.vision).__name__}: the release's layout holds a SigLIP tower")
    llm_type = release_type(net.llm.model.config)  # the release's class for a Qwen2 / Llama LLM
    if llm_type is None:
        gaps.append(
            f"model.llm: a {net.llm.model.config.model_type} LLM: the release's layout holds a Qwen2 or a Llama"
        )
    if gaps:
        raise ValueError(f"cannot export to {folder}, the release's layout cannot carry:\n  " + "\n  ".join(gaps))
    folder = Path(folder)
    state = {}
    for key, value in net.vision.vision_tower.state_dict().items():
        state[_VISION + key] = value
    for key, value in net.vision.guide_encoder.state_dict().items():
        state[_GUIDE + key] = value
    state.update(to_official_state_dict(net.compressor.state_dict()))
    state.update(untied_state(net.llm.model))  # Qwen2ForCausalLM's names, Qwen2.5-0.5B's lm_head written once
    write_shards(state, folder, shard_bytes)
    # the LLM's own fields (an LLM loaded from a release folder carries that folder's projector fields too), less
    # the folder it was loaded from (a path on this machine)
    base = next(config_class for config_class, model in RELEASE_TYPES.items() if model is llm_type)
    plain = set(base().to_dict()) - {"_name_or_path"}
    config = {
        **{key: value for key, value in net.llm.model.config.to_dict().items() if key in plain},
        "model_type": llm_type.config_class.model_type,
        "architectures": [llm_type.__name__],
        **projector_type(net.compressor),
        "mm_hidden_size": net.vision.hidden_size,
        "hidden_size": net.llm.hidden_size,
        "mm_vision_select_layer": net.vision.select_layer,
    }
    if net.vision.hidden_size == SIGLIP_WIDTH:  # the release builds its tower from this name (hub id or a local copy)
        config["mm_vision_tower"] = f"google/{SIGLIP}"
    config.update(RELEASE_VISUAL_FIELDS, num_frames=num_frames)
    config.update(_transformers_4_fields(config, net.llm.model.dtype))
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))
    net.llm.tokenizer.save_pretrained(folder)  # as released: the folder is an HF folder of its LLM too
    template = net.llm.tokenizer.chat_template
    settings = folder / "tokenizer_config.json"
    if isinstance(template, str) and settings.is_file():  # transformers 4 reads it there, not in chat_template.jinja
        tokenizer_config = json.loads(settings.read_text())
        settings.write_text(json.dumps({**tokenizer_config, "chat_template": template}, indent=2, ensure_ascii=False))
    net.llm.model.generation_config.save_pretrained(folder)
    return folder


def _transformers_4_fields(config: dict, dtype: torch.dtype) -> dict:
    """The config fields transformers 4 reads, which the release's code runs on, where transformers 5 writes others:
    `rope_theta` and `rope_scaling` (5 keeps both in `rope_parameters`, and a 4.x Qwen2Config without them runs at
    rope_theta 10000 where Qwen2.5's is 1e6), and `torch_dtype` (5's `dtype`). transformers 5 reads
    `rope_parameters` first, so the two agree."""
    fields = {"torch_dtype": str(dtype).removeprefix("torch.")}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        fields["rope_theta"] = rope["rope_theta"]
        fields["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    return fields


def write_shards(state: Mapping[str, torch.Tensor], folder: Path, shard_bytes: int) -> None:
    """`state` as model.safetensors, or, past `shard_bytes`, as model-0000i-of-0000n.safetensors and
    model.safetensors.index.json (the layout from_pretrained reads), copying one shard's tensors at a time. Weight
    files already in the folder that this would not overwrite are refused first: they would stay as stale copies."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for key, value in state.items():
        n = value.numel() * value.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    others = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in names)
    if others:
        raise ValueError(f"{folder} holds the weight files of another export, {others}: give an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "model.safetensors.index.json"
    index.unlink(missing_ok=True)
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        tensors = {key: state[key].detach().contiguous().clone() for key in keys}
        # the metadata save_pretrained writes, which transformers 4's from_pretrained reads (and fails without)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        as_created_here(folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        total = sum(value.numel() * value.element_size() for value in state.values())
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict, or an error naming the file."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def _description(compressor: Compressor) -> dict:
    """What decides a compressor's outputs beyond its weights' names and shapes: its release name and guides,
    the local keys and the global position table's use."""
    if not isinstance(compressor, HICom):
        return {"type": type(compressor).__name__}
    local, global_ = compressor.local_compressor, compressor.global_compressor
    return {
        **_legacy_fields(compressor),
        "local_keys": None if local is None else local.keys.value,
        "global_position": None if global_ is None else global_.position.value,
    }


def check_compressor(compressor: Compressor, config: Mapping, folder: Path) -> None:
    """Weights of the same names and shapes fit compressors that compute different things (another guide mode,
    another position table): the compressor a release-layout folder is imported into must be the one its
    config.json describes, in our reading or in the release's (defect 1)."""
    readings = [_description(build_compressor(config, reproduce_defect_1=r)) for r in (False, True)]
    ours = _description(compressor)
    if ours not in readings:
        raise ValueError(
            f"{folder / 'config.json'} describes the compressor {readings[0]}, but model.compressor builds {ours}: "
            "set model.compressor to match (hicom.compat.official.build_compressor(config) builds it)"
        )
    gaps = release_gaps(compressor) if isinstance(compressor, HICom) else []
    if gaps:  # what the release's fields cannot say computes otherwise than the release did (its head count, ...)
        raise ValueError(
            f"{folder} holds a release compressor, which model.compressor builds otherwise:\n  " + "\n  ".join(gaps)
        )


@dataclass(frozen=True)
class _Stored:
    """A tensor of a safetensors shard, by name and shape, read when it is loaded."""

    shard: Path
    key: str
    shape: torch.Size


INDEX = "model.safetensors.index.json"  # a sharded model's index, as save_pretrained writes it


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files of a release-layout folder that from_pretrained reads, and the index's weight map
    (tensor name -> file name, empty without an index): the files model.safetensors.index.json names where there is
    one (others beside them are ignored, as from_pretrained ignores them), else model.safetensors (from_pretrained's
    one file; others beside it are ignored too) or the folder's one .safetensors file other than a stage's
    projector (`model_files`; none: an empty list). A FileNotFoundError names the files an index names that are
    missing; a ValueError, several files without an index, where which of them hold the model is a guess."""
    index = folder / INDEX
    if not index.is_file():
        files = model_files(folder)
        if len(files) > 1 and (folder / "model.safetensors").is_file():  # the one from_pretrained reads by name
            others = [f.name for f in files if f.name != "model.safetensors"]
            log.warning("%s: reading model.safetensors and ignoring %s, as from_pretrained does", folder, others)
            return [folder / "model.safetensors"], {}
        if len(files) > 1:
            raise ValueError(
                f"{folder} holds {len(files)} .safetensors files, {[f.name for f in files]}, and no {INDEX} to say "
                "which of them hold the model: keep the model's one file (model.safetensors), or write the index "
                "of its shards"
            )
        return files, {}
    try:
        weight_map = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {index}: {error}") from error
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ValueError(f"{index}: expected a weight_map object from tensor names to file names")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index} maps tensors to {missing}, which {folder} does not hold: copy them in (the folder is a partial "
            "copy), or write the index again from the shards there"
        )
    if (folder / "model.safetensors").is_file() and "model.safetensors" not in weight_map.values():
        raise ValueError(
            f"{folder} holds both model.safetensors and {INDEX} with its shards: from_pretrained loads the LLM from "
            "model.safetensors, and the index names the shards, so the parts would come from two checkpoints; "
            "keep the one that is the model and delete the other"
        )
    ignored = sorted(f.name for f in set(model_files(folder)) - set(files))
    if ignored:
        log.warning(
            "%s: ignoring %s, which %s does not name (from_pretrained ignores them too)", folder, ignored, INDEX
        )
    return files, weight_map


def stored_tensors(folder: Path) -> dict[str, _Stored]:
    """Every tensor of a folder's weight files (`weight_files`) by name, with its file and shape, none read yet (empty
    where there are no files). A ValueError where a name is in two of the files (which one loads would depend on the
    reading order) or in another file than the one the index maps it to."""
    from safetensors import safe_open

    files, weight_map = weight_files(folder)
    stored: dict[str, _Stored] = {}
    twice: dict[str, list[str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in stored:
                        twice.setdefault(key, [stored[key].shard.name]).append(path.name)
                    stored[key] = _Stored(path, key, torch.Size(f.get_slice(key).get_shape()))
        except Exception as error:  # truncated or foreign files: say which file
            raise ValueError(f"cannot read {path}: {error}") from error
    if twice:
        holding = sorted({name for names in twice.values() for name in names})
        raise ValueError(
            f"{folder}: the weight files {holding} hold the same tensors, so which copy loads would depend on the "
            f"reading order ({_few({key: f'in {names}' for key, names in twice.items()})}): remove the stale copies"
        )
    elsewhere = {
        key: f"mapped to {weight_map[key]!r}, in {value.shard.name!r}"
        for key, value in stored.items()
        if key in weight_map and folder / weight_map[key] != value.shard
    }
    if elsewhere:
        raise ValueError(
            f"{folder / INDEX} maps tensors to other files than those holding them ({_few(elsewhere)}): write the "
            "index again from the shards there"
        )
    return stored


def _few(where: Mapping[str, str], shown: int = 3) -> str:
    """How many tensors, and the first few names, each with what is said of it."""
    names = sorted(where)
    few = ", ".join(f"{name!r} {where[name]}" for name in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} tensor{'s' * (len(names) != 1)}: {few}{more}"


def use_release_llm(cfg, folder: str | Path, missing: str) -> str:
    """Point cfg.model.llm.path at a release folder (an HF folder of its LLM too) and return the folder, resolved;
    a FileNotFoundError saying `missing` where it holds no config.json."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{missing}: no config.json in {path}")
    read_config(path)  # named where it is not JSON: the tokenizer's load, which reads it next, would blame itself
    check_whole_model(path)  # the tokenizer's load, next, would blame the missing tokenizer
    resolved = str(path.resolve())
    with open_dict(cfg):
        cfg.model.llm.path = resolved
        cfg.model.llm.arch = None  # the folder's own config.json says its size (a 1.5B release, a 7B config)
    return resolved


def check_pickled_shards(folder: Path) -> None:
    """A ValueError for a folder whose model weights are pickled pytorch_model*.bin files alone: only safetensors
    are read (a pickle can run code when loaded), and saying so before the LLM loads saves minutes at 7B."""
    pickled = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if pickled and not model_files(folder):
        raise ValueError(
            f"{folder} holds its model weights as pickled files ({pickled[:3]}{' ...' * (len(pickled) > 3)}), "
            "and only safetensors are read: convert them once (for each file, safetensors.torch.save_file of "
            "torch.load(file, weights_only=True), its tensors made contiguous and tied ones stored once, and the "
            f"index as {INDEX}), or save the model again with save_pretrained(folder, safe_serialization=True)"
        )


def check_whole_model(folder: Path) -> None:
    """A ValueError for a release stage's output: config.json and the projector's weights alone (`PROJECTOR_FILES`;
    the release's stages that train only the projector save nothing else, their LLM being the base model), where a
    whole model is needed (its LLM, tokenizer, towers and projector, as the release's last stage saves them)."""
    check_pickled_shards(folder)
    projector = projector_file(folder)
    if projector is None or model_files(folder):
        return
    raise ValueError(
        f"{folder} holds config.json and {projector.name} but no model weights: the output of a release stage that "
        "trains the projector alone (its LLM is the base model it started from, its towers the pretrained ones), "
        f"not a whole model. Load its projector with hicom.compat.official.load_official('{folder}'), or give "
        "the folder of the release's last stage (config.json, the model's .safetensors files and its tokenizer)"
    )


def reading_of(folder: Path) -> Compressor:
    """The compressor of a release folder (unloaded) in the reading its weights fit, as load_official picks it:
    where they fit both (direct and off injection have the same weights), the release's, in which they were
    trained, so a fine-tuning starts from what the release ran. A KeyError where they fit neither."""
    config = read_config(folder)
    state = convert_state_dict(read_projector_weights(folder))
    then = "A fine-tuning from them starts in that reading: model.compressor must build it"
    return _fitted_reading(folder, config, state, then=then)


def check_release_start(cfg) -> None:
    """Before the towers load, for a fit from a release folder (`cfg.init_from`; check_pretrained and check_model
    first): model.compressor builds, at the folder's widths, exactly the compressor the folder's weights fit
    (`reading_of`: the released HICom-7B's global branch is direct, defect 1), names, shapes and settings the
    release's layout carries; and model.vision is of the folder's width and takes the layer its compressor was
    trained on (mm_vision_select_layer). Else a ValueError saying what differs."""
    from hydra.utils import get_class, instantiate

    from hicom.utils.instantiators import check_model

    folder = Path(cfg.init_from)
    config = read_config(folder)
    width = int(config["mm_hidden_size"])
    with torch.device("meta"):
        ours = instantiate(cfg.model.compressor)(in_dim=width, out_dim=int(config["hidden_size"]), guide_dim=width)
    fitted = reading_of(folder)
    problems = release_gaps(ours)
    if _description(ours) != _description(fitted):
        problems.insert(0, f"the weights fit {_description(fitted)}, model.compressor builds {_description(ours)}")
    else:
        try:
            check_keys(fitted.state_dict(), ours)
        except KeyError as error:
            problems.append(error.args[0])
    if problems:
        raise ValueError(
            f"model.compressor is not the compressor of {folder}; set it to match "
            "(hicom.compat.official.load_official(folder) builds it):\n  " + "\n  ".join(problems)
        )
    check_model(cfg, _composer(folder, fitted))  # the vision tower's width
    vision = cfg.model.vision  # its folder is there: check_pretrained has run; its depth is in its config.json
    arch = json.loads((Path(vision.path) / "config.json").read_text())
    depth = get_class(vision._target_)._config(arch).vision_config.num_hidden_layers
    check_select_layer(depth, vision.get("select_layer", -2), config, folder)


def select_layer_of(config: Mapping, folder: Path) -> int:
    """The vision layer a release-layout folder's compressor was trained on: config.json's mm_vision_select_layer,
    -2 (the release's) where it names none."""
    layer = config.get("mm_vision_select_layer", RELEASE_SELECT_LAYER)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{folder / 'config.json'}: mm_vision_select_layer must be a whole number, got {layer!r}")
    return layer


def check_select_layer(depth: int, select_layer: int, config: Mapping, folder: Path) -> None:
    """The tower a folder is imported into (of `depth` layers, taking `select_layer`) takes its features from the
    layer the folder's compressor was trained on: the same weights read another layer's features otherwise,
    without an error."""
    layers = depth + 1  # hidden states: the embeddings, then each layer's output
    layer = select_layer_of(config, folder)
    if layer % layers != select_layer % layers:
        raise ValueError(
            f"{folder / 'config.json'} was trained on the vision tower's hidden state {layer} "
            f"(mm_vision_select_layer), model.vision.select_layer is {select_layer}: set "
            f"model.vision.select_layer={layer}"
        )


def import_official(net, folder: str | Path, *, loaded: tuple[str, ...] = ()) -> None:
    """Load a release-layout folder (the weight files from_pretrained reads, `stored_tensors`) into our VideoLLM,
    strictly: a KeyError lists, per part ("vision", "guide", "projector", "llm"), the missing, unexpected and
    mis-shaped tensors, before any value is read. The parts in `loaded` are checked but not read again
    (evaluate.py's LLM, loaded from this folder by from_pretrained), and one part is read at a time. The projector
    comes from mm_projector.bin / .safetensors where the weight files hold none; a stage's output, with no model
    weights, is a ValueError (`check_whole_model`). SigLIP's logit scale and bias are not in the release's layout
    and keep the vision checkpoint's values; so does the text tower of a model whose config.json has use_guide
    off or null, for which the release saves no guide encoder."""
    folder = Path(folder)
    config = read_config(folder)
    check_whole_model(folder)
    check_compressor(net.compressor, config, folder)
    check_select_layer(net.vision.depth, net.vision.select_layer, config, folder)
    stored = stored_tensors(folder)
    if not stored:
        raise FileNotFoundError(f"no .safetensors in {folder}")
    groups: dict[str, dict] = {"vision": {}, "guide": {}, "projector": {}, "llm": {}}
    for key, value in stored.items():
        if key.startswith(_VISION):
            groups["vision"][key[len(_VISION) :]] = value
        elif key.startswith(_GUIDE):
            groups["guide"][key[len(_GUIDE) :]] = value
        elif "mm_projector." in key:
            groups["projector"][key] = value
        else:
            groups["llm"][key] = value
    targets = {
        "vision": net.vision.vision_tower,
        "guide": net.vision.guide_encoder,
        "projector": net.compressor,
        "llm": net.llm.model,
    }
    projector = projector_file(folder)
    if not groups["projector"] and projector is not None:  # a projector saved beside the model, as stages save it
        log.info("%s: reading the projector from %s: the model's weight files hold none", folder, projector.name)
        groups["projector"] = _read_projector_file(projector)
    groups["projector"] = convert_state_dict(groups["projector"])
    unguided = parse_projector_type(config["mm_projector_type"], config.get("use_guide")).use_guide is Guide.OFF
    if unguided and not groups["guide"]:  # the release builds (and saves) its guide encoder only with use_guide on
        log.info(
            "%s: use_guide %r and no guide encoder saved, as the release saves an unguided model: the text tower "
            "keeps the weights of model.vision's folder",
            folder,
            config.get("use_guide"),
        )
        if net.compressor.uses_guide:  # the name's reading of a bare mode, which the release ran unguided
            log.warning("%s: the compressor reads a guide, from that text tower, which the release never ran", folder)
        del targets["guide"]
    problems = []
    for name, module in targets.items():
        fill_tied(module, groups[name])  # save_pretrained writes a tied weight once
        try:
            check_keys(groups[name], module, what="missing or unexpected tensors")
        except KeyError as error:
            problems.append(f"{name}: {error.args[0]}")
    if problems:
        raise KeyError("the checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    for name, module in targets.items():
        if name not in loaded:
            module.load_state_dict(_read(groups[name]), strict=True)


def _read(group: Mapping[str, _Stored | torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of one part, shard by shard (those read already, from a projector file, as they are)."""
    from safetensors import safe_open

    out = {name: value for name, value in group.items() if isinstance(value, torch.Tensor)}
    group = {name: value for name, value in group.items() if isinstance(value, _Stored)}
    for shard in sorted({s.shard for s in group.values()}):
        try:
            with safe_open(str(shard), framework="pt") as f:
                out.update({name: f.get_tensor(s.key) for name, s in group.items() if s.shard == shard})
        except Exception as error:  # a file changed or cut short since its header was read
            raise ValueError(f"cannot read {shard}: {error}") from error
    return out
