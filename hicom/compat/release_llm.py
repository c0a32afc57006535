"""The release's LLM types. Its config.json names its LLM "hicom_qwen2" (or "hicom_llama"), classes its own code
registers with transformers; here they are the plain Qwen2 / Llama causal LMs under those names, with no remote
code, so that an HF folder in the release's layout loads as an LLM. The folder's other tensors (the vision tower's
and the projector's) are not the LLM's: they are left out without a report. Module-level classes, so that models and
configs built from them pickle (DataLoader workers started by spawn, torch.save)."""

from __future__ import annotations

import logging

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

log = logging.getLogger(__name__)

_NOT_THE_LLMS = [r"^model\.vision_tower\.", r"^model\.mm_projector\."]


class HIComQwen2Config(Qwen2Config):
    model_type = "hicom_qwen2"


class HIComQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = HIComQwen2Config
    _keys_to_ignore_on_load_unexpected = _NOT_THE_LLMS


class HIComLlamaConfig(LlamaConfig):
    model_type = "hicom_llama"


class HIComLlamaForCausalLM(LlamaForCausalLM):
    config_class = HIComLlamaConfig
    _keys_to_ignore_on_load_unexpected = _NOT_THE_LLMS


# the release's model type of each base LLM config, and its causal-LM class
RELEASE_TYPES = {Qwen2Config: HIComQwen2ForCausalLM, LlamaConfig: HIComLlamaForCausalLM}


def register() -> None:
    """Register the release's types with transformers' Auto classes (a no-op once done). A type registered by other
    code (the release's own, if both are imported) is left as it is, with a warning."""
    for model_class in RELEASE_TYPES.values():
        config_class = model_class.config_class
        known = CONFIG_MAPPING[config_class.model_type] if config_class.model_type in CONFIG_MAPPING else None
        if known is config_class:
            continue
        if known is not None:
            log.warning(
                "%s is registered with transformers as %s.%s, not ours: folders of that type load with it",
                config_class.model_type,
                known.__module__,
                known.__qualname__,
            )
            continue
        AutoConfig.register(config_class.model_type, config_class)
        AutoModelForCausalLM.register(config_class, model_class)


def release_type(config) -> type | None:
    """The release's causal-LM class for an LLM config (Qwen2 or Llama, or already the release's), else None."""
    return next((model for base, model in RELEASE_TYPES.items() if isinstance(config, base)), None)
