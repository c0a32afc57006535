"""The language model, with visual tokens spliced in at the placeholder positions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from hicom.utils.checkpoints import load_pretrained, load_tokenizer, require_pretrained
from hicom.utils.choices import flag

log = logging.getLogger(__name__)


class CausalLM(nn.Module):
    """An HF causal LM loaded with `from_pretrained`; `visual_token` marks where compressed tokens go."""

    def __init__(
        self,
        *,
        path: str,
        visual_token: str = "<|video_pad|>",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        arch: str | None = None,
    ) -> None:
        """`arch`: the bundled architecture (hicom/arch/<arch>.json) for dry runs; loading ignores it."""
        super().__init__()
        from transformers import AutoModelForCausalLM

        flag("model.llm.gradient_checkpointing", gradient_checkpointing)  # `no` would read as true
        folder = require_pretrained(path, "the LLM checkpoint", "model.llm.path")
        self.path = str(folder)
        tokenizer = load_tokenizer(folder)
        token_id = tokenizer.convert_tokens_to_ids(visual_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            kind = _model_type(folder)
            raise ValueError(
                f"{folder}: the tokenizer has no {visual_token!r} token to mark visual positions (model.llm."
                f"visual_token){f', and the folder holds a {kind} model' if kind else ''}: pick the model/llm config of "
                "its family, which names the token it has (qwen25_* for Qwen2.5, llama31_8b for Llama 3)"
            )
        self.visual_token_id = int(token_id)
        self.tokenizer = tokenizer
        self.model = load_pretrained(AutoModelForCausalLM, folder, "the LLM checkpoint", attn_implementation)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:  # transformers 5 renamed it (the old name warns)
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            (enable or self.model.gradient_checkpointing_enable)()
        self.hidden_size = self.model.config.hidden_size
        log.info("LLM %s: attention %s", self.path, self.model.config._attn_implementation)

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, L, d) with the visual tokens (N, d), in order, at the placeholder positions."""
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = input_ids == self.visual_token_id
        expected = int(mask.sum())
        given = 0 if visual is None else visual.shape[0]
        if visual is not None and (visual.ndim != 2 or visual.shape[1] != embeds.shape[-1]):
            raise ValueError(  # a scatter of other widths would read the rows across token boundaries
                f"the compressor gave visual tokens of shape {tuple(visual.shape)}: the LLM takes (tokens, "
                f"{embeds.shape[-1]}), every clip's tokens packed in clip order at the LLM's width"
            )
        if expected != given:
            raise ValueError(
                f"the batch has {expected} visual placeholder tokens but the compressor gave {given} tokens"
            )
        if given:
            embeds = embeds.masked_scatter(mask[..., None], visual.to(embeds.dtype))
        return embeds


def _model_type(folder: Path) -> str | None:
    """The model_type of an HF folder's config.json (hicom_qwen2 / hicom_llama for the release's), or None."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
