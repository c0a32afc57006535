"""SigLIP as HICom uses it: trunk features, joint-space token embeddings, and the text tower as guide encoder."""

from __future__ import annotations

import logging

import torch
from torch import nn

from hicom.utils.checkpoints import require_pretrained, resolve_attention

log = logging.getLogger(__name__)


class SiglipTower(nn.Module):
    """Wraps a SigLIP checkpoint (vision + text towers) loaded with `from_pretrained`.

    - `features`: the trunk's hidden state at `select_layer` (N, h, w, D).
    - `embeds`: keys in the joint image-text space, X + head.mlp(head.layernorm(X)) per token, X the final
      (post-layernorm) hidden state (N, h, w, D).
    - `encode_guide`: the text tower's pooled output (B, D_text), or its token-level output (B, L, D_text).
    A trunk whose parameters are all frozen runs without autograd.
    """

    def __init__(
        self, *, path: str, select_layer: int = -2, attn_implementation: str = "sdpa", arch: str | None = None
    ) -> None:
        """`arch` names the bundled architecture (hicom/arch/<arch>.json) that describes the checkpoint, for dry
        runs that build the model without its weights; loading ignores it."""
        super().__init__()
        from transformers import SiglipModel

        folder = require_pretrained(path, "the SigLIP checkpoint", "model.vision.path")
        self.path = str(folder)
        model = SiglipModel.from_pretrained(folder, attn_implementation=resolve_attention(attn_implementation))
        self.vision_tower = model.vision_model
        self.guide_encoder = model.text_model
        self.logit_scale, self.logit_bias = model.logit_scale, model.logit_bias
        self.select_layer = select_layer
        vision = model.config.vision_config
        self.hidden_size = vision.hidden_size
        self.text_hidden_size = model.config.text_config.hidden_size
        self.grid = vision.image_size // vision.patch_size
        log.info("vision tower %s: attention %s", self.path, model.config._attn_implementation)

    def forward(
        self, pixel_values: torch.Tensor, joint_embeds: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        trunk_frozen = not any(p.requires_grad for p in self.vision_tower.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not trunk_frozen):
            out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        n = pixel_values.shape[0]
        features = out.hidden_states[self.select_layer].reshape(n, self.grid, self.grid, -1)  # (N, h, w, D)
        if not joint_embeds:
            return features, None
        final = out.last_hidden_state  # after post_layernorm
        head = self.vision_tower.head
        embeds = final + head.mlp(head.layernorm(final))
        return features, embeds.reshape(n, self.grid, self.grid, -1)

    def encode_guide(self, input_ids: torch.Tensor, tokens: bool = False) -> torch.Tensor:
        """The guide tokens' (padded to the tokenizer's max length) text embedding: pooled C_p (B, D_text), or
        with `tokens` the token-level C_f (B, L, D_text), the text head applied at every position, whose last
        row is C_p (SigLIP pools the last position)."""
        out = self.guide_encoder(input_ids=input_ids)
        return self.guide_encoder.head(out.last_hidden_state) if tokens else out.pooler_output
