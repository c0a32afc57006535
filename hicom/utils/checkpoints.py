"""Checks on model folders given in config, so a missing path fails at once with what to set; and what a
Lightning checkpoint needs to resume as the run would have gone on."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


def require_pretrained(path: str | Path | None, what: str, key: str, override: str | None = None) -> Path:
    """The folder `path` if it holds a config.json, else (a null `path` too) a FileNotFoundError that names what to
    set: `override` (default `<key>=<folder>`) on the command line, or the environment."""
    folder = None if path is None else Path(path)
    if folder is None or not (folder / "config.json").is_file():
        message = (
            f"{what}: {key} is null. Set "
            if folder is None
            else f"{what} not found at '{folder}' (no config.json there). Put the HF-format folder there, or set "
        )
        if override is not None:  # e.g. a trained run's config, whose paths are resolved: only the override works
            raise FileNotFoundError(message + f"`{override}` on the command line.")
        raise FileNotFoundError(
            message + f"`{key}=<folder>` on the command line; or HICOM_WEIGHTS, the folder holding the checkpoints "
            "under their usual names (HICOM_SIGLIP, HICOM_CLIP, HICOM_QWEN and HICOM_LLAMA name one folder each, "
            "for the configs of that family)."
        )
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
    return folder


def check_safetensors(path: Path) -> None:
    """A ValueError naming `path` where safetensors cannot open it: its header unreadable, or the tensor data the
    header lists not filling the file exactly (a copy cut short). Opening reads the header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (OSError, SafetensorError) as error:
        raise ValueError(
            f"'{path}' ({path.stat().st_size} bytes) is not a whole safetensors file ({error}): copy it again"
        ) from error


# Weights load in fp32 whatever the checkpoint stores (Qwen2.5's are bf16, and transformers keeps a checkpoint's
# dtype): AdamW must step fp32 weights, since a 1e-5 step on a bf16 weight mostly rounds away. bf16 compute comes
# from the precision plugin (bf16-mixed autocast) or DeepSpeed (bf16 copies of the fp32 masters). The price is 4
# bytes per parameter of host memory while loading. Evaluation, which steps nothing, loads in its own dtype
# (`loading_dtype`): the same numbers as an fp32 load cast afterwards, at half the memory and reading.
MASTER_DTYPE = torch.float32
_LOAD_DTYPE: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("load_dtype", default=MASTER_DTYPE)


@contextlib.contextmanager
def loading_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Pretrained towers and LLMs built within load in `dtype` instead of fp32 (MASTER_DTYPE)."""
    token = _LOAD_DTYPE.set(dtype)
    try:
        yield
    finally:
        _LOAD_DTYPE.reset(token)


def computed_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of the floating-point buffers a module computes at build time instead of loading them
    (non-persistent: the LLM's RoPE frequencies inv_freq), by qualified name. A cast of the whole module to bf16
    (evaluation's `.to(bf16)`, Lightning's bf16-true, DeepSpeed's bf16 engine) rounds them too, which moves the
    rotary angles of a 128-wide head by up to a radian within 1,000 positions; `from_pretrained(dtype=bf16)`, as the
    release evaluates, keeps them fp32, and `restore_computed_buffers` puts them back."""
    saved = {}
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            buffer = sub._buffers.get(name)
            if buffer is not None and buffer.is_floating_point():
                saved[f"{prefix}.{name}" if prefix else name] = buffer.detach().to(torch.float32, copy=True)
    return saved


def restore_computed_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the fp32 values `computed_buffers` took where a cast has changed a buffer's dtype, on its device."""
    for key, value in saved.items():
        prefix, _, name = key.rpartition(".")
        sub = module.get_submodule(prefix)
        current = sub._buffers.get(name)
        if current is not None and current.dtype != value.dtype:
            sub._buffers[name] = value.to(current.device)


# the kernels transformers takes by name, and `auto` (resolve_attention)
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_attention(key: str, requested) -> None:
    """A ValueError naming `key` for an attention kernel transformers does not know, or flash_attention_2 where
    the flash-attn package is not installed: said before any weights load, not as the part loads (for the LLM,
    after the vision tower has)."""
    import importlib.util

    if requested not in ATTENTION:
        raise ValueError(f"{key} must be one of {list(ATTENTION)}, got {requested!r}")
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            f"{key}=flash_attention_2 needs the flash-attn package (GPU only: pip install flash-attn "
            "--no-build-isolation); `auto` takes it where it is installed and a GPU is present, else sdpa"
        )


def resolve_attention(requested: str) -> str:
    """`auto`: flash_attention_2 where the flash-attn package is installed and a GPU is present, else torch SDPA.
    Anything else is passed to transformers as is."""
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"


def load_pretrained(model_class, folder: Path, what: str, attn_implementation: str):
    """`model_class.from_pretrained(folder)` in fp32 (MASTER_DTYPE, or `loading_dtype`'s) with the attention kernel
    asked for; a folder whose weights lack tensors of the architecture is an error naming them (transformers would
    fill them with a random init and go on)."""
    from hicom.compat.release_llm import register

    register()  # an LLM folder in the release's layout
    model, info = model_class.from_pretrained(
        folder,
        attn_implementation=resolve_attention(attn_implementation),
        dtype=_LOAD_DTYPE.get(),
        output_loading_info=True,
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"{what} at '{folder}' lacks {len(missing)} weight tensors of its architecture (e.g. {missing[:3]}): the "
            "folder is incomplete; copy its weight files again"
        )
    return model


def _read_tokenizer(folder, what: str):
    """The folder's tokenizer, refused where it cannot be read or has no vocabulary beyond its special tokens
    (transformers builds one from tokenizer_config.json alone where the vocabulary file is missing, and every
    text then tokenizes to nothing)."""
    from transformers import AutoTokenizer

    fix = "copy the checkpoint's tokenizer files there (tokenizer.json or its vocabulary file, tokenizer_config.json)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:  # e.g. SentencePiece without its spiece.model
        raise FileNotFoundError(f"cannot read the {what} in '{folder}' ({err}): {fix}") from err
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer where the folder holds no tokenizer files
        raise FileNotFoundError(f"'{folder}' holds no {what}: {fix}")
    probe = tokenizer("a red cube", add_special_tokens=False)["input_ids"]
    if not set(probe) - set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}:
        raise FileNotFoundError(
            f"the {what} in '{folder}' has no vocabulary beyond its {len(tokenizer)} special tokens (text "
            f"tokenizes to {probe}): its vocabulary file is missing; {fix}"
        )
    return tokenizer


def load_tokenizer(folder):
    """The LLM's tokenizer; one without a pad token (Llama 3) pads with its end-of-sequence token, which the
    attention mask and the labels hide."""
    tokenizer = _read_tokenizer(folder, "tokenizer")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{folder}: the tokenizer has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_guide_tokenizer(folder):
    """The vision tower's text tokenizer, for the guide. The guide is padded to its `model_max_length`, which must
    be the text tower's position count (SigLIP's text tower is trained on exactly 64 tokens, padding included): a
    tokenizer folder that does not set it (transformers then reads 10^30) takes it from config.json."""
    import json

    tokenizer = _read_tokenizer(folder, "text tokenizer for the guide")
    positions = json.loads((Path(folder) / "config.json").read_text()).get("text_config", {})
    positions = positions.get("max_position_embeddings")
    if positions is not None and tokenizer.model_max_length > positions:
        tokenizer.model_max_length = int(positions)
    return tokenizer


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """The names of `module`'s parameters that are another's, each with the first name of its tensor (a Qwen2 LM
    with tied embeddings: lm_head.weight -> model.embed_tokens.weight)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def untied_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with each tied tensor under its first name only, as save_pretrained writes it (and
    safetensors, which refuses shared storage, needs it)."""
    tied = tied_aliases(module)
    return {key: value for key, value in module.state_dict().items() if key not in tied}


def fill_tied(module: nn.Module, state: dict) -> None:
    """Give each tied alias of `module` that `state` lacks the tensor of its first name (written once)."""
    for alias, source in tied_aliases(module).items():
        if alias not in state and source in state:
            state[alias] = state[source]


def _zero0_masters(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(16-bit parameter, its fp32 master) pairs of DeepSpeed's ZeRO 0 optimizer for bf16 or fp16, which every
    process holds whole: FP16_UnfusedOptimizer (around torch's optimizers) one master per parameter, FP16_Optimizer
    (around DeepSpeed's FusedAdam) one flat master per group. None for any other optimizer."""
    if optimizer is None or "deepspeed" not in sys.modules:  # a DeepSpeed optimizer has imported it
        return None
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from torch._utils import _unflatten_dense_tensors

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return [pair for params, fp32 in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
                for pair in zip(params, fp32, strict=True)]  # fmt: skip
    if isinstance(optimizer, FP16_Optimizer):
        return [pair for params, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat, strict=True)
                for pair in zip(params, _unflatten_dense_tensors(flat, params), strict=True)]  # fmt: skip
    return None


def optimizer_masters(module: nn.Module, optimizer=None, keep: bool = True) -> dict[str, torch.Tensor]:
    """The fp32 weights DeepSpeed's optimizer steps for `module`'s trainable parameters that the module holds in 16
    bits, by parameter name, on the CPU; none elsewhere (DDP's bf16-mixed trains the fp32 weights themselves).

    Under bf16 / fp16 the engine casts the module and keeps fp32 masters apart: under ZeRO 0 in its optimizer
    (`optimizer`: the engine's), whole on every process; under ZeRO 1-3 sharded over the processes, gathered one
    parameter at a time (a 7B LLM's masters are 30 GB) in a collective call that every process enters
    (`keep=False` only takes part)."""
    low = {
        id(p): n for n, p in module.named_parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
    }
    if not low:
        return {}
    masters = {}
    pairs = _zero0_masters(optimizer)
    if pairs is not None:  # whole on this process: nothing to take part in
        for parameter, master in pairs if keep else ():
            if id(parameter) in low:
                masters[low[id(parameter)]] = master.detach().to("cpu", copy=True)
        return masters
    named = [(n, p) for n, p in module.named_parameters() if id(p) in low]
    if not any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for _, p in named):
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    for name, parameter in named:
        master = safe_get_full_fp32_param(parameter)
        if master is not None and keep:
            masters[name] = master.to("cpu")
    return masters


@contextlib.contextmanager
def full_parameters(module) -> Iterator[None]:
    """Makes `module`'s parameters whole for reading. Under DeepSpeed ZeRO-3 each process holds only a shard of
    every parameter (its state dict shows empty tensors): they are gathered for the duration. It is a collective
    call, so every process must enter it; without ZeRO-3 it does nothing."""
    sharded = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        yield


def next_epoch_from_its_start(checkpoint: dict) -> None:
    """Sets a Lightning checkpoint's per-epoch batch counts to 0 where its epoch is over, so that a resumed fit's
    next epoch has all its batches. Lightning (2.6) counts an epoch over when the fit stopped (max_epochs, or
    max_steps or should_stop part-way), and keeps the epoch loop's counts of it; a fit resumed with max_steps set
    (iteration-based, to Lightning) takes them as its place in the next epoch: it trained 1 batch of the next
    epoch where the checkpoint's epoch was whole (4 of 4 batches), 2 of 4 where it had been stopped after 2. A
    checkpoint taken part-way through an epoch (the loop's counts are its place there) is left as it is. One
    taken at an epoch's end (on_train_epoch_end: every_n_epochs) has the epoch counted completed too, which
    Lightning does itself only without max_steps (with it, the resumed fit's epoch number stayed one behind)."""
    loops = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs = (loops.get("epoch_progress") or {}).get("current")
    if not epochs or epochs.get("processed", 0) < epochs.get("ready", 0):
        return
    for count in loops["epoch_progress"].values():  # saved within on_train_epoch_end: its end was not counted yet
        if isinstance(count, dict) and count.get("completed", 0) < count.get("processed", 0):
            count["completed"] = count["processed"]  # as Lightning sets it where max_steps is not set

    def zeroed(progress: dict) -> None:
        for key, value in progress.items():
            if key == "current" and isinstance(value, dict):
                progress[key] = dict.fromkeys(value, 0)
            elif key == "is_last_batch":
                progress[key] = False
            elif isinstance(value, dict):
                zeroed(value)

    for key, progress in loops.items():
        if key.startswith("epoch_loop.") and key.endswith("progress") and isinstance(progress, dict):
            zeroed(progress)
    validation = loops.get("epoch_loop.val_loop.batch_progress")
    if isinstance(validation, dict) and isinstance(validation.get("total"), dict):
        validation["total"] = dict.fromkeys(validation["total"], 0)  # counts an epoch's validation batches


def micro_batches_within_step(checkpoint: dict, accumulation: int) -> int:
    """How many micro-batches of an optimizer step a Lightning checkpoint was written after, that step not yet
    taken (0 where it was written at a step): a top-k checkpoint of a validation inside a gradient accumulation,
    or last.ckpt of a SIGTERM there. Their gradients are in no file, and the data loader's place counts them.
    An epoch's last batch steps whatever the count (Lightning's rule), so a checkpoint there is at a step."""
    loops = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    progress = loops.get("epoch_loop.batch_progress") or {}
    if progress.get("is_last_batch"):
        return 0
    return (progress.get("current") or {}).get("ready", 0) % max(accumulation, 1)
