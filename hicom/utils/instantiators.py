"""The one place where configs become objects; each built thing is logged."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hicom.utils.checkpoints import require_pretrained

log = logging.getLogger(__name__)


def write_assets(cfg: DictConfig | None) -> None:
    """Write the tiny checkpoints the config asks for (a no-op when they are there with the same spec)."""
    for name, asset in (cfg or {}).items():
        path = hydra.utils.instantiate(asset.spec)(asset.out_dir)
        log.info("asset %s: %s", name, path)


def check_pretrained(cfg: DictConfig, override: str | None = None) -> None:
    """Fail before building anything when a model folder named in the config is missing; the message says to set
    `override` (formatted with the config key) where given, else the key or the environment."""
    missing = []
    for key, what in (("model.vision.path", "the vision tower's checkpoint"), ("model.llm.path", "the LLM checkpoint")):
        part = OmegaConf.select(cfg, key.rpartition(".")[0])
        if isinstance(part, DictConfig) and "path" in part:  # a part built from a folder (null: none given)
            path = part.path
            try:
                require_pretrained(path, what, key, None if override is None else override.format(key=key))
            except FileNotFoundError as error:
                missing.append(str(error))
    if missing:  # both at once, not one per launch
        raise FileNotFoundError("\n".join(missing))
    check_architectures(cfg)


# what tells one size of a family from another, in an HF config.json (a tower's in its vision and text configs);
# a tower's input size and patch too: so400m at 224 px has 16 x 16 patches, not 27 x 27, and other token counts
SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "image_size",
    "patch_size",
)


def check_architectures(cfg: DictConfig) -> None:
    """Before any weights load, each model folder against what its config says it is: a vision tower's family
    (SigLIP, CLIP) against the folder's model_type, and a part's bundled `arch` (the size the dry run reports, and
    the one an experiment was written for: Table 4's 0.5B) against the folder's sizes. A folder of another family
    fails deep in loading (a size mismatch, a KeyError); one of another size trains that other model in silence."""
    import json

    from hydra.utils import get_class

    from hicom.dry_run import load_arch

    problems = []
    for key in ("model.vision", "model.llm"):
        part = OmegaConf.select(cfg, key)
        folder = None if part is None or part.get("path") is None else Path(part.path)
        if folder is None or not (folder / "config.json").is_file():
            continue
        try:
            found = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue  # loading says what is wrong with it
        try:
            wanted = getattr(get_class(part._target_), "model_type", None) if part.get("_target_") else None
        except (ImportError, ValueError):  # a class of the user's own that does not import: building says so
            wanted = None
        if wanted is not None and found.get("model_type") != wanted:
            problems.append(
                f"{key}.path={folder} holds a {found.get('model_type')!r} model, and {key} builds a {wanted!r} one: "
                f"pick the {key.replace('.', '/')} config of the folder's family (or point the path at a {wanted} "
                "folder)"
            )
            continue
        if not part.get("arch"):
            continue
        name, arch = load_arch(part, key)
        differ = []
        for section in ("", "vision_config", "text_config"):  # the LLM's sizes are top-level, a tower's in sections
            ours, theirs = (arch, found) if not section else (arch.get(section), found.get(section))
            if not isinstance(ours, dict) or not isinstance(theirs, dict):
                continue
            differ += [
                f"{section + '.' if section else ''}{field} {theirs[field]} there, {ours[field]} in {name}"
                for field in SIZE_FIELDS
                if field in ours and field in theirs and ours[field] != theirs[field]
            ]
        if differ:
            problems.append(
                f"{key}.path={folder} is not the model {key}.arch={name} describes ({'; '.join(differ)}): point the "
                f"path at a {name} folder, pick the {key.replace('.', '/')} config of the folder's size, or set "
                f"{key}.arch=null (the dry run then reads the folder's config.json)"
            )
    if problems:
        raise ValueError("\n".join(problems))


def check_tokenizers(cfg: DictConfig, training: bool = True) -> None:
    """Before any weights load: the LLM's tokenizer reads (and, for training, encodes a conversation with its chat
    template), and the vision tower's text tokenizer (the guide's) reads; each a second or so."""
    from hicom.data.template import ChatEncoder
    from hicom.utils.checkpoints import load_guide_tokenizer, load_tokenizer

    llm, vision = OmegaConf.select(cfg, "model.llm.path"), OmegaConf.select(cfg, "model.vision.path")
    if llm is not None:
        tokenizer = load_tokenizer(llm)
        if training:
            token = OmegaConf.select(cfg, "model.llm.visual_token", default=None)
            placed = OmegaConf.select(cfg, "data.visual_token", default=None)
            if placed is not None and placed != token:  # the batches would hold no placeholder the LLM fills
                raise ValueError(
                    f"data.visual_token={placed!r} is not the LLM's placeholder model.llm.visual_token={token!r}: "
                    "the data module writes the one the LLM fills (data configs set it to ${model.llm.visual_token})"
                )
            try:
                ChatEncoder(tokenizer, *([token] if token else []))
            except ValueError as err:
                raise ValueError(f"{llm}: {err}") from err
    if vision is not None:
        load_guide_tokenizer(vision)


def check_data(cfg: DictConfig) -> None:
    """Fail before building anything when the data the config names is missing, when an annotation file is not
    JSON / JSONL or not a list of records, or when the training split selects no record (generated data is not
    checked: it is written on first use). Each annotation file is parsed once here (about 10 s per GB); with
    `data.index_dir` set, only once per file version across runs."""
    import time

    from hicom.data.index import check_annotations

    quarantine = OmegaConf.select(cfg, "data.quarantine")
    if quarantine is not None:
        from hicom.data.datamodule import read_quarantine

        read_quarantine(quarantine)  # a file cut short or of another kind: named here, not after the weights load
    source = OmegaConf.select(cfg, "data.source")
    if source is None:
        return
    built = hydra.utils.instantiate(source)
    if not hasattr(built, "check"):
        return
    splits = built.check()
    index_dir = OmegaConf.select(cfg, "data.index_dir")
    seen_dir = None if index_dir is None else Path(index_dir) / "annotations"
    start = time.perf_counter()
    train = check_annotations(splits.train, seen_dir)
    held_out = check_annotations(splits.val, seen_dir)
    if train == 0:
        files = ", ".join(str(entry.json_path) for entry in splits.train)
        raise ValueError(f"the training data selects no record from {files}: check data.source (and its sampling)")
    log.info(
        "annotations: %d training and %d held-out records selected (%.1f s)",
        train, held_out, time.perf_counter() - start,
    )  # fmt: skip


def check_model_hparams(model: DictConfig) -> None:
    """The module's own values of `model` (trainable parts, a learning rate for each, warm-up, weight decay), as
    training checks them; the dry run too, so that it does not report a run training refuses."""
    from hicom.models.video_llm_module import check_hparams

    if "trainable" in model:
        lr = model.get("lr") or {}
        if not isinstance(lr, DictConfig):
            raise ValueError(f"model.lr is a learning rate per trainable part, got {lr!r}: set model.lr.<part>=1e-4")
        lr = OmegaConf.to_container(lr, resolve=True)
        bad = {  # null: no rate, as though the key were absent
            part: rate
            for part, rate in lr.items()
            if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float))
        }
        if bad:
            raise ValueError(f"learning rates are numbers, got {bad} (model.lr)")
        trainable, betas = model.trainable, model.get("betas", (0.9, 0.999))
        check_hparams(
            [str(p) for p in trainable] if OmegaConf.is_list(trainable) else trainable,
            lr,
            model.get("warmup_ratio", 0.0),
            model.get("weight_decay", 0.0),
            model.get("max_new_tokens", 4),
            OmegaConf.to_container(betas, resolve=True) if OmegaConf.is_list(betas) else betas,
        )


def check_model(cfg: DictConfig, compressor=None):
    """Fail in seconds, before any weights load, on a bad model value: the module's own (trainable parts, learning
    rates, warm-up) and the compressor's, which is built on the meta device at the widths the checkpoints'
    config.json give (check_pretrained first: the folders are there). `compressor`: the callable that builds it, in
    place of `model.compressor`'s. Returns that meta-device compressor (None where the config names no model
    folders)."""
    import json

    import torch
    from hydra.utils import get_class
    from transformers import AutoConfig

    from hicom.data.transforms import FrameTransform
    from hicom.modules.compressors.base import check_output
    from hicom.modules.video_llm import compose_compressor
    from hicom.utils.checkpoints import check_attention
    from hicom.utils.choices import flag

    model = cfg.model
    check_model_hparams(model)
    for part in ("vision", "llm"):  # else said as the part loads: for the LLM, after the vision tower has
        conf = model.get(part)
        if isinstance(conf, DictConfig) and conf.get("attn_implementation") is not None:
            check_attention(f"model.{part}.attn_implementation", conf.attn_implementation)
    if isinstance(model.get("llm"), DictConfig) and "gradient_checkpointing" in model.llm:
        flag("model.llm.gradient_checkpointing", model.llm.gradient_checkpointing)
    if not all(OmegaConf.select(cfg, key) for key in ("model.vision.path", "model.llm.path", "model.compressor")):
        return None
    vision_json = Path(model.vision.path) / "config.json"
    try:
        vision_arch = json.loads(vision_json.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"the vision tower's config '{vision_json}' cannot be read ({e}): is the folder whole?") from e
    from hicom.compat.release_llm import register

    register()  # an LLM folder in the release's layout
    llm_width = AutoConfig.from_pretrained(model.llm.path).hidden_size
    with torch.device("meta"):
        tower = get_class(model.vision._target_).from_arch(
            vision_arch, select_layer=model.vision.get("select_layer", -2)
        )
        try:
            built = compose_compressor(compressor or hydra.utils.instantiate(model.compressor), tower, llm_width)
        except (ValueError, TypeError) as err:
            raise (TypeError if isinstance(err, TypeError) else ValueError)(f"model.compressor: {err}") from err
        except hydra.errors.InstantiationException as err:
            if not isinstance(err.__cause__, ImportError):
                raise
            raise ImportError(
                f"model.compressor: its _target_ {model.compressor.get('_target_')} cannot be imported here "
                f"({err.__cause__.__cause__ or err.__cause__}): a compressor of one's own must import where the run "
                "is read as where it trained; put the folder of its module on PYTHONPATH"
            ) from err
    side = FrameTransform.from_pretrained(model.vision.path).size  # its image processor's file, read as the data will
    if side != tower.image_size:
        raise ValueError(
            f"{Path(model.vision.path) / 'preprocessor_config.json'} resizes frames to {side} px, but the vision tower "
            f"({vision_json}) takes {tower.image_size} px images: the two files come from different checkpoints"
        )
    frames = OmegaConf.select(cfg, "data.num_frames")
    try:  # its output's rows and width, in a moment on the meta device
        check_output(
            built,
            in_dim=tower.hidden_size,
            guide_dim=tower.text_hidden_size,
            out_dim=llm_width,
            grid=tower.grid,
            frames=frames if isinstance(frames, int) and frames >= 1 else 4,
        )
    except ValueError as err:
        raise ValueError(f"model.compressor: {err}") from err
    check_room(cfg, built, tower.grid)
    return built


def check_room(cfg: DictConfig, compressor, grid: int) -> None:
    """A ValueError where `data.max_length` leaves no room for text after a `data.num_frames` clip's visual tokens
    (every video sample would be skipped as too_long); not where fps sampling makes num_frames a cap, nor where
    too_long cuts (max_length then counts the text alone)."""
    from hicom.data.dataset import TooLong

    frames, max_length = OmegaConf.select(cfg, "data.num_frames"), OmegaConf.select(cfg, "data.max_length")
    by_fps = OmegaConf.select(cfg, "data.sampling.fps") is not None  # then num_frames is only a cap
    too_long = OmegaConf.select(cfg, "data.too_long", default=TooLong.SKIP.value)
    cut = TooLong.of(too_long, "data.too_long") is TooLong.TRUNCATE  # then max_length counts the text alone
    sized = isinstance(frames, int) and frames >= 1 and isinstance(max_length, int) and max_length >= 1
    if sized and not by_fps and not cut:
        visual = compressor.num_tokens(frames, grid, grid, "video")
        if visual >= max_length:
            raise ValueError(
                f"data.max_length={max_length} leaves no room for text after the {visual} visual tokens of a "
                f"{frames}-frame clip: raise data.max_length (the recipe's is 4096) or lower data.num_frames"
            )


def instantiate_all(cfg: DictConfig | None, kind: str) -> list:
    """Every `_target_` entry of a dict of configs (callbacks, loggers)."""
    built = []
    for name, conf in (cfg or {}).items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("%s %s: <%s>", kind, name, conf._target_)
            built.append(hydra.utils.instantiate(conf))
    return built


def finish_loggers(loggers: list) -> None:
    """Each logger's run ended as a success. Lightning's WandbLogger leaves its W&B run open at `finalize`, and the
    next job of a multirun in this process would log into it: it is finished here."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def finish_open_wandb_run() -> None:
    """A W&B run an earlier job of this process left open (it failed before `finish_loggers`) is finished as failed,
    so that this job's WandbLogger starts a run of its own instead of reusing that one."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        log.warning("W&B run %s of an earlier job was left open: finished as failed", wandb.run.id)
        wandb.finish(exit_code=1)


def ensure_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out
