"""Dry run: what a configured model costs before any weight is read or GPU hour spent.

The vision tower and the LLM are built on the meta device from the bundled architecture configs (hicom/arch/*.json,
named by `model.vision.arch` / `model.llm.arch`), or, where a part names none, from its model folder's config.json
(`model.vision.path` / `model.llm.path`: any model on disk, the tiny ones included), and the compressor from its
Hydra config. Per stage it prints
parameters per part, trainable parameters, visual tokens per sample, forward FLOPs per sample for each part
(torch's FlopCounterMode on meta tensors: exact matrix-product counts), a training estimate, and an estimate of the
memory per GPU for the chosen ZeRO stage and micro batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from hicom.modules.compressors.base import PackedLayout
from hicom.utils.choices import flag

ARCH_DIR = Path(__file__).parent / "arch"
PARTS = ("vision_trunk", "vision_head", "guide_encoder", "compressor", "llm")


def load_arch(part: DictConfig, key: str) -> tuple[str, dict]:
    """A part's architecture and a name for it: the bundled one `<key>.arch` names, else its folder's config.json
    (no weights read)."""
    known = sorted(p.stem for p in ARCH_DIR.glob("*.json"))
    name = part.get("arch")
    if name:
        path = ARCH_DIR / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{key}.arch={name!r}: no {path.name} in {ARCH_DIR} (bundled: {known})")
        return name, json.loads(path.read_text())
    folder = part.get("path")
    config = Path(folder) / "config.json" if folder else None
    if config is None or not config.is_file():
        raise ValueError(
            f"the dry run needs `{key}.arch` (a bundled architecture: {known}) or the model folder's config.json "
            f"at `{key}.path` ({folder}: {'none set' if config is None else 'no config.json there'})"
        )
    try:
        arch = json.loads(config.read_text())
    except ValueError as err:
        raise ValueError(f"{config}: not a JSON model config ({err})") from err
    return Path(folder).name, arch


@dataclass
class MetaModel:
    vision: torch.nn.Module  # a vision tower (SiglipTower, ClipTower) built from its bundled architecture
    llm: torch.nn.Module
    compressor: torch.nn.Module
    names: tuple[str, str] = ("", "")  # the tower's and the LLM's architecture, as the report names them

    @property
    def grid(self) -> int:
        return self.vision.grid

    def parts(self) -> dict[str, torch.nn.Module]:
        return {**self.vision.parts(), "compressor": self.compressor, "llm": self.llm}


def build_meta(cfg: DictConfig) -> MetaModel:
    import transformers
    from hydra.utils import get_class, instantiate
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from hicom.modules.video_llm import compose_compressor
    from hicom.utils.instantiators import write_assets

    if not (cfg.model.vision.get("arch") and cfg.model.llm.get("arch")):
        write_assets(cfg.get("assets"))  # the tiny checkpoints' folders, where the config's parts are those
    from hicom.compat.release_llm import register

    register()  # a release folder's LLM (model_type hicom_qwen2), as training reads it
    vision_name, vision_arch = load_arch(cfg.model.vision, "model.vision")
    llm_name, llm_arch = load_arch(cfg.model.llm, "model.llm")
    if llm_arch.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(
            f"model.llm ({llm_name}): model_type {llm_arch.get('model_type')!r} is not one transformers "
            f"{transformers.__version__} knows"
        )
    llm_config = CONFIG_MAPPING[llm_arch["model_type"]](**{k: v for k, v in llm_arch.items() if k != "model_type"})
    tower_class = get_class(cfg.model.vision._target_)
    with torch.device("meta"):
        vision = tower_class.from_arch(vision_arch, select_layer=cfg.model.vision.get("select_layer", -2))
        llm = AutoModelForCausalLM.from_config(llm_config)
        compressor = compose_compressor(instantiate(cfg.model.compressor), vision, llm_config.hidden_size)
    for module in (vision.vision_tower, vision.guide_encoder, llm):
        module.config._attn_implementation = "sdpa"
    return MetaModel(vision=vision, llm=llm, compressor=compressor, names=(vision_name, llm_name))


def flops(fn) -> int:
    """The matrix-product FLOPs of calling `fn` (torch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(model: MetaModel, frames: int, modality: str, guided: bool, text: int, guide: int) -> dict:
    """Forward FLOPs of one sample through each part, measured on the meta device through the towers' own
    forward passes: the joint-space keys' share is the difference between the tower with and without them."""
    meta = {"device": "meta"}
    tower, grid = model.vision, model.grid
    pixels = torch.empty(frames, 3, tower.image_size, tower.image_size, **meta)
    uses_embeds = getattr(model.compressor, "uses_embeds", False) and guided
    out = {"vision_trunk": flops(lambda: tower(pixels, joint_embeds=False))}
    out["vision_head"] = flops(lambda: tower(pixels, joint_embeds=True)) - out["vision_trunk"] if uses_embeds else 0
    ids = torch.zeros(1, guide, dtype=torch.long, device="meta")
    tokens = getattr(model.compressor, "guide_tokens", False)
    out["guide_encoder"] = flops(lambda: tower.encode_guide(ids, tokens=tokens)) if guided else 0
    layout = PackedLayout((frames,), (modality,), grid, grid)
    features = torch.empty(frames, grid, grid, tower.hidden_size, **meta)
    guide_shape = (1, guide, tower.text_hidden_size) if tokens else (1, tower.text_hidden_size)
    out["compressor"] = flops(
        lambda: model.compressor.forward_packed(features, features, torch.empty(guide_shape, **meta), layout)
    )
    visual = model.compressor.num_tokens(frames, grid, grid, modality)
    hidden = model.llm.config.hidden_size
    out["llm"] = flops(lambda: model.llm(inputs_embeds=torch.empty(1, visual + text, hidden, **meta)))
    return out


def saved_bytes(model: MetaModel, frames: int, modality: str, guided: bool, guide: int, element: int = 2) -> int:
    """Bytes the vision tower, the guide encoder and the compressor keep for backward for one sample, measured on
    the meta device under the parts' requires_grad flags as the stage trains them (autograd keeps nothing where no
    gradient passes), `element` bytes a floating value (2 in bf16); the weights (and views of them) aside."""
    weights = {id(p) for part in (model.vision, model.compressor) for p in part.parameters()}
    seen: dict[int, torch.Tensor] = {}  # held, so that no other tensor takes a counted one's id once it is freed
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t
        if id(t) not in seen and id(base) not in weights:
            seen[id(t)] = t
            total += t.numel() * (element if t.is_floating_point() else t.element_size())
        return t

    meta = {"device": "meta"}
    tower, grid = model.vision, model.grid
    uses_embeds = getattr(model.compressor, "uses_embeds", False) and guided
    tokens = getattr(model.compressor, "guide_tokens", False)
    trained = any(p.requires_grad for p in tower.parameters())  # else the towers keep nothing: not run (minutes)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        text = None
        if trained:
            features, embeds = tower(torch.empty(frames, 3, tower.image_size, tower.image_size, **meta), uses_embeds)
            if guided:
                text = tower.encode_guide(torch.zeros(1, guide, dtype=torch.long, **meta), tokens=tokens)
        else:
            features = embeds = torch.empty(frames, grid, grid, tower.hidden_size, **meta)
            if guided:
                text = torch.empty(
                    (1, guide, tower.text_hidden_size) if tokens else (1, tower.text_hidden_size), **meta
                )
        layout = PackedLayout((frames,), (modality,), grid, grid)
        model.compressor.forward_packed(features, features if embeds is None else embeds, text, layout)
    return total


def memory_per_gpu(
    params: dict[str, int],
    trainable: set[str],
    zero: int,
    gpus: int,
    activations: int,
    offload: tuple[bool, bool] = (False, False),
    sizes: tuple[int, int, int] = (2, 2, 12),
    untrained: int = 0,
) -> dict[str, float]:
    """GiB per GPU: weights, gradients and Adam states of the trainable parameters at `sizes` bytes a parameter
    (`parameter_bytes`; DeepSpeed's bf16: 16-bit weights and gradients, fp32 master, m and v), sharded as
    ZeRO-`zero` shards them over `gpus`, plus an activation estimate. `offload`: DeepSpeed's (offload_optimizer,
    offload_parameters): the Adam states in CPU memory, and under ZeRO-3 the weights too (the layer at hand is
    gathered onto the GPU, counted as nothing here). `untrained`: parameters of the trainable parts left frozen (the
    trunk's layers nothing reads)."""
    total = sum(params.values())
    train = sum(params[p] for p in trainable) - untrained
    offload_optimizer, offload_parameters = offload
    weight, gradient, states = sizes
    weights = 0 if offload_parameters and zero >= 3 else weight * total / (gpus if zero >= 3 else 1)
    grads = gradient * train / (gpus if zero >= 2 else 1)
    optimizer = 0 if offload_optimizer else states * train / (gpus if zero >= 1 else 1)
    gib = 2**30
    return {
        "weights": weights / gib,
        "gradients": grads / gib,
        "optimizer": optimizer / gib,
        "activations": activations / gib,
        "total": (weights + grads + optimizer + activations) / gib,
    }


def activation_bytes(
    model: MetaModel,
    frames: int,
    visual: int,
    text: int,
    answer: int,
    micro: int,
    train_llm_path: bool,
    checkpointing: bool = True,
    element: int = 2,
    upstream: int | None = None,
) -> int:
    """A rough activation estimate, `element` bytes a value (2 in bf16): with gradient checkpointing in the LLM,
    every layer's input and one layer's internals; without, every layer's internals; and the fp32 logits (of the
    `answer` tokens the loss is taken on, where the LM head runs on those alone: `CausalLM.loss`); plus what the
    towers and the compressor keep for backward (`upstream`, per sample: `saved_bytes`), or where not measured
    the vision features and joint-space keys handed to the compressor."""
    from hicom.modules.llm import labelled_head

    c = model.llm.config
    seq = visual + text
    layer = seq * (10 * c.hidden_size + 3 * c.intermediate_size) * element
    stored = (
        c.num_hidden_layers * seq * c.hidden_size * element + layer if checkpointing else c.num_hidden_layers * layer
    )
    logits = (answer if labelled_head(c) else seq) * c.vocab_size * 4
    width = model.vision.hidden_size
    vision = 2 * frames * model.grid * model.grid * width * element if upstream is None else upstream
    llm = stored + logits if train_llm_path else seq * c.hidden_size * element
    return micro * (llm + vision)


def parameter_bytes(cfg: DictConfig, deepspeed: bool) -> tuple[int, int, int, int]:
    """Bytes as `cfg` trains: a weight, a trainable parameter's gradient and its Adam states, an activation.
    DeepSpeed in 16 bits casts the model down and keeps an fp32 master copy beside m and v; a 16-bit module
    (`*-true`) elsewhere keeps its Adam states in its own dtype; mixed precision elsewhere (DDP) keeps the fp32
    weights, gradients and states, and only the activations are made in 16 bits."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if not precision.startswith(("bf16", "16")):
        return 4, 4, 8, 4
    if deepspeed:
        return 2, 2, 12, 2
    if precision.endswith("-true"):
        return 2, 2, 4, 2
    return 4, 4, 8, 2


def zero_stage_of(cfg: DictConfig, default: int) -> int:
    """The ZeRO stage a config trains at: its DeepSpeed strategy's; 0 (nothing sharded) under another strategy it
    names, such as DDP; `default` (dry_run_settings.zero_stage) where it leaves the strategy to Lightning."""
    from hicom.stages import named_strategy, uses_deepspeed

    strategy = named_strategy(cfg.trainer.get("strategy"))
    if uses_deepspeed(cfg):
        return int(strategy.get("stage", 0))
    return 0 if isinstance(strategy, DictConfig) else default


def offload_of(cfg: DictConfig) -> tuple[bool, bool]:
    """What a config's DeepSpeed strategy keeps in CPU memory: (optimizer states, parameters)."""
    from hicom.stages import named_strategy, uses_deepspeed

    if not uses_deepspeed(cfg):
        return False, False
    strategy = named_strategy(cfg.trainer.get("strategy"))
    return bool(strategy.get("offload_optimizer", False)), bool(strategy.get("offload_parameters", False))


def _names_strategy(cfg: DictConfig) -> bool:
    from hicom.stages import named_strategy

    return isinstance(named_strategy(cfg.trainer.get("strategy")), DictConfig)


def stages_of(cfg: DictConfig) -> list[dict]:
    """Each stage's name (only `cfg.stage`'s where it names one), trainable parts, frames, modality, its config (as
    the stage runner composes it: its own compressor) and its ZeRO stage (`zero_stage_of`)."""
    from hicom.stages import chosen_stages, stage_config, uses_deepspeed
    from hicom.training import check_values

    default_zero = (cfg.get("dry_run_settings") or {}).get("zero_stage", 2)
    if isinstance(default_zero, bool) or default_zero not in (0, 1, 2, 3):
        raise ValueError(
            f"dry_run_settings.zero_stage must be 0, 1, 2 or 3 (DeepSpeed's ZeRO stages), got {default_zero!r}"
        )
    stages = chosen_stages(cfg) if cfg.get("stages") else None  # stage=<name>: that stage alone, as training runs it
    out = []
    for stage in stages or [None]:
        merged = cfg if stage is None else stage_config(cfg, stage, Path(cfg.paths.output_dir) / "stages" / stage.name)
        try:  # as training refuses them
            check_values(merged)
        except ValueError as err:
            raise ValueError(f"stage {stage.name}: {err}" if stage is not None else str(err)) from err
        entry = {
            "name": "train" if stage is None else stage.name,
            "trainable": list(merged.model.trainable),
            "num_frames": int(merged.data.num_frames),
            "config": merged,
            "zero": zero_stage_of(merged, default_zero),
            "offload": offload_of(merged),
            # a strategy left to Lightning is taken as DeepSpeed at dry_run_settings.zero_stage, as zero_stage_of does
            "bytes": parameter_bytes(merged, uses_deepspeed(merged) or not _names_strategy(merged)),
            # a string such as `yes` is no flag: refused, as training refuses it
            "checkpointing": flag(
                "model.llm.gradient_checkpointing", merged.model.llm.get("gradient_checkpointing", False)
            ),
        }
        entry["modality"] = (stage or {}).get("modality") or ("image" if entry["num_frames"] == 1 else "video")
        out.append(entry)
    return out


def report(cfg: DictConfig) -> list[dict]:
    from hydra.utils import instantiate

    from hicom.callbacks.throughput import BatchFlops
    from hicom.modules.compressors.base import check_output
    from hicom.modules.video_llm import compose_compressor, idle_message, idle_parts
    from hicom.training import gradient_accumulation
    from hicom.utils.choices import whole_number
    from hicom.utils.instantiators import check_model_hparams, check_room

    settings = cfg.get("dry_run_settings") or {}
    gpus = whole_number("dry_run_settings.gpus", settings.get("gpus", 8))
    micro = settings.get("micro_batch")  # None: each stage's own data.batch_size
    if micro is not None:
        micro = whole_number("dry_run_settings.micro_batch", micro)
    text = whole_number("dry_run_settings.text_tokens", settings.get("text_tokens", 256), least=0)
    answer = whole_number("dry_run_settings.answer_tokens", settings.get("answer_tokens", 32), least=0)
    if answer > text:
        raise ValueError(f"dry_run_settings.answer_tokens={answer}: more than the {text} text tokens it is part of")
    base = build_meta(cfg)
    longest = base.vision.guide_encoder.config.max_position_embeddings  # what the guide tokenizer pads to
    guide = settings.get("guide_tokens")
    guide = longest if guide is None else whole_number("dry_run_settings.guide_tokens", guide)
    if guide > longest:
        raise ValueError(f"dry_run_settings.guide_tokens={guide}: this guide encoder takes at most {longest} tokens")
    rows = []
    print(f"dry run: {base.names[0]} + {type(base.compressor).__name__} + {base.names[1]}, "
          f"{gpus} GPUs, {text} text tokens per sample ({answer} of them answer)")  # fmt: skip
    for stage in stages_of(cfg):
        try:  # a run that training refuses (a trainable part without its learning rate) is not reported
            check_model_hparams(stage["config"].model)
        except ValueError as err:
            raise ValueError(f"stage {stage['name']}: {err}") from err
        with torch.device("meta"):  # the stage's own compressor (stage 1 of the recipe has no injection modules)
            compressor = instantiate(stage["config"].model.compressor)
            compressor = compose_compressor(compressor, base.vision, base.llm.config.hidden_size)
        try:  # what it gives, as training checks it
            check_output(
                compressor,
                in_dim=base.vision.hidden_size,
                guide_dim=base.vision.text_hidden_size,
                out_dim=base.llm.config.hidden_size,
                grid=base.grid,
                frames=stage["num_frames"],
            )
        except ValueError as err:
            raise ValueError(f"stage {stage['name']}: model.compressor: {err}") from err
        try:  # as training refuses it
            check_room(stage["config"], compressor, base.grid)
        except ValueError as err:
            raise ValueError(f"stage {stage['name']}: {err}") from err
        model = MetaModel(vision=base.vision, llm=base.llm, compressor=compressor, names=base.names)
        params = {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}
        zero = stage["zero"]
        batch = micro or whole_number("data.batch_size", stage["config"].data.batch_size)
        if micro is None:  # as the real run on that many GPUs refuses it, before anything is built
            try:
                gradient_accumulation(stage["config"].get("global_batch_size"), batch, gpus)
            except ValueError as err:
                raise ValueError(f"stage {stage['name']} on dry_run_settings.gpus={gpus}: {err}") from err
        if settings.get("print_config"):
            print(f"\n[{stage['name']}] config:\n{OmegaConf.to_yaml(stage['config'], resolve=True)}")
        print(
            f"\n[{stage['name']}] ZeRO-{zero}{_offloaded(stage['offload'])}, micro batch {batch}; parameters: "
            + ", ".join(f"{k} {_count(v)}" for k, v in params.items())
            + f", total {_count(sum(params.values()), billions=True)}"
        )
        trainable = set(stage["trainable"])
        unknown = trainable - set(PARTS)
        if unknown:
            raise ValueError(f"stage {stage['name']}: unknown parts {sorted(unknown)} (parts: {list(PARTS)})")
        idle = {k: v for k, v in idle_parts(base.vision.parts(), compressor).items() if k in trainable}
        if idle:  # as the training module leaves them
            print(f"  trainable parts stay frozen: {idle_message(idle)}")
            trainable -= set(idle)
        frames, modality, guided = stage["num_frames"], stage.get("modality", "video"), compressor.uses_guide
        visual = model.compressor.num_tokens(frames, model.grid, model.grid, modality)
        try:
            fwd = forward_flops(model, frames, modality, guided, text, guide)
        except (RuntimeError, NotImplementedError) as err:  # a value read (`.item()`), an op without a meta kernel
            raise ValueError(
                f"stage {stage['name']}: model.compressor ({type(model.compressor).__name__}) or a part does not run "
                f"on the meta device, where the dry run counts without weights ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}); training takes it (and counts no FLOPs for it)"
            ) from err
        # forward and backward as the throughput monitor counts a training sample (after the forward counts: it
        # sets the parts' requires_grad as the stage trains them)
        train = BatchFlops(model, trainable, exact=True).sample(frames, modality, visual + text, guide, answer)
        # the trunk's layers after select_layer where no joint-space keys are made: never run, left frozen (as the
        # training module leaves them)
        unread = [p for m in base.vision.unread(compressor.uses_embeds) for p in m.parameters()]
        unread = unread if "vision_trunk" in trainable else []
        for parameter in unread:
            parameter.requires_grad_(False)
        weight, gradient, states, element = stage["bytes"]
        upstream = saved_bytes(model, frames, modality, guided, guide, element)
        acts = activation_bytes(
            model, frames, visual, text, answer, batch, bool(trainable), stage["checkpointing"], element, upstream
        )
        untrained = sum(p.numel() for p in unread)
        sizes = (weight, gradient, states)
        memory = memory_per_gpu(params, trainable, zero, gpus, acts, stage["offload"], sizes, untrained)
        row = {
            "stage": stage["name"],
            "trainable_params": sum(params[p] for p in trainable) - untrained,
            "visual_tokens": visual,
            "forward_tflops": {k: v / 1e12 for k, v in fwd.items()},
            "train_tflops": train / 1e12,
            "memory_gib": memory,
            "zero_stage": zero,
            "micro_batch": batch,
        }
        rows.append(row)
        print(f"  trainable {sorted(trainable)}: {_count(row['trainable_params'])} parameters; "
              f"{frames} x {modality} -> {visual} visual tokens")  # fmt: skip
        tflops = row["forward_tflops"].items()
        print("  forward TFLOP per sample: " + ", ".join(f"{k} {_figure(v, 3)}" for k, v in tflops))
        print(f"  training TFLOP per sample (forward + backward): {_figure(row['train_tflops'], 2)}")
        print("  GiB per GPU: " + ", ".join(f"{k} {_figure(v, 1)}" for k, v in memory.items()))
    return rows


def _count(n: float, billions: bool = False) -> str:
    """A parameter count as the report prints it: 494.0M, 7.615B (`billions`), and the tiny models' 119.4K."""
    if billions and n >= 1e8:
        return f"{n / 1e9:.3f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _figure(value: float, digits: int) -> str:
    """`value` to `digits` decimals, or in two significant figures where those would show only zeros (a tiny
    model's TFLOP and GiB)."""
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10**-digits else f"{value:.1e}"


def _offloaded(offload: tuple[bool, bool]) -> str:
    kept = [name for name, on in zip(("optimizer states", "parameters"), offload, strict=True) if on]
    return f" ({' and '.join(kept)} in CPU memory)" if kept else ""
