"""The language model, with visual tokens spliced in at the placeholder positions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hicom.data.template import IGNORE_INDEX
from hicom.utils.checkpoints import load_pretrained, load_tokenizer, require_pretrained
from hicom.utils.choices import flag

log = logging.getLogger(__name__)

# The LM families whose logits are their head's linear map of the last hidden state, and nothing more (no soft-cap,
# no scale): for those the loss runs the head on the labelled positions alone (`CausalLM.loss`). The release's
# folders name theirs hicom_qwen2 / hicom_llama (hicom.compat.release_llm: Qwen2's and Llama's classes).
PLAIN_HEAD_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "hicom_qwen2", "hicom_llama"})


def labelled_head(config) -> bool:
    """Whether the loss runs the LM head on the labelled positions alone for an LLM of this HF config: its logits
    are its head's linear map and nothing more (PLAIN_HEAD_TYPES). The FLOP count and the dry run follow it."""
    return config.model_type in PLAIN_HEAD_TYPES


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

    def loss(self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy (fp32) of every labelled next token: what the HF model computes when given
        `labels`. Where its head is a plain linear map (PLAIN_HEAD_TYPES) the head runs on the labelled positions
        alone: a training sequence is mostly visual and prompt tokens, and at Qwen2.5-7B's 152K vocabulary the
        head's logits over every position, kept in fp32 for the backward, are about 1.3 GiB a sample and 4-5 % of
        its FLOPs. `embeds` (B, L, d), `attention_mask` and `labels` (B, L); labels are shifted here, as HF does."""
        if not labelled_head(self.model.config):
            return self.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss
        decoder = self.model.get_decoder()
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # (B, L - 1): the positions whose next token is labelled
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])  # (labelled, vocab)
        return F.cross_entropy(logits.float(), targets[keep])

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
