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
        model = SiglipModel.from_pretrained(folder, attn_implementation=resolve_attention(attn_implementation))
        self._take(model, select_layer, str(folder))

    @classmethod
    def from_arch(cls, arch: dict, select_layer: int = -2) -> SiglipTower:
        """Random weights (on the current default device, e.g. meta) from a bundled architecture dict."""
        from transformers import SiglipConfig, SiglipModel

        tower = cls.__new__(cls)
        nn.Module.__init__(tower)
        config = SiglipConfig(vision_config=arch["vision_config"], text_config=arch["text_config"])
        tower._take(SiglipModel(config), select_layer, None)
        return tower

    def _take(self, model, select_layer: int, path: str | None) -> None:
        self.path = path
        self.vision_tower = model.vision_model
        # The head's attention pooling (one probe over all tokens) is never used: skip it in the forward pass.
        # Its layernorm and MLP stay, for the joint-space keys.
        self.vision_tower.use_head = False
        self.guide_encoder = model.text_model
        self.logit_scale, self.logit_bias = model.logit_scale, model.logit_bias
        self.select_layer = select_layer
        vision = model.config.vision_config
        self.hidden_size = vision.hidden_size
        self.text_hidden_size = model.config.text_config.hidden_size
        self.grid = vision.image_size // vision.patch_size
        self.image_size = vision.image_size
        log.info("vision tower %s: attention %s", path or "(architecture only)", model.config._attn_implementation)

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

    has_joint_embeds = True

    def parts(self) -> dict[str, nn.Module]:
        """The tower's trainable parts: the trunk, the head's layernorm + MLP that make the joint-space keys (its
        attention pooling is never used), and the text tower that encodes the guide."""
        vision = self.vision_tower
        return {
            "vision_trunk": nn.ModuleList([vision.embeddings, vision.encoder, vision.post_layernorm]),
            "vision_head": nn.ModuleList([vision.head.layernorm, vision.head.mlp]),
            "guide_encoder": self.guide_encoder,
        }

    def encode_guide(self, input_ids: torch.Tensor, tokens: bool = False) -> torch.Tensor:
        """The guide tokens' (padded to the tokenizer's max length) text embedding: pooled C_p (B, D_text), or
        with `tokens` the token-level C_f (B, L, D_text), the text head applied at every position, whose last
        row is C_p (SigLIP pools the last position)."""
        out = self.guide_encoder(input_ids=input_ids)
        return self.guide_encoder.head(out.last_hidden_state) if tokens else out.pooler_output


class ClipTower(nn.Module):
    """Wraps a CLIP checkpoint (e.g. openai/clip-vit-large-patch14-336) with the interface of `SiglipTower`.

    - `features`: the trunk's hidden state at `select_layer` without the class token (N, h, w, D).
    - CLIP has no per-token map into its joint space at the trunk's width (its projection acts on the pooled
      class token and changes the width), so there are no joint-space keys: `has_joint_embeds` is False and a
      compressor that asks for them is refused when the model is built (set the local branch's `keys: features`).
    - `encode_guide`: the text tower's pooled output through the text projection (B, D_joint), or with `tokens`
      every position through it (B, L, D_joint).
    - `logit_scale` is CLIP's; CLIP has no logit bias, so it is a zero.
    """

    has_joint_embeds = False

    def __init__(
        self, *, path: str, select_layer: int = -2, attn_implementation: str = "sdpa", arch: str | None = None
    ) -> None:
        super().__init__()
        from transformers import CLIPModel

        folder = require_pretrained(path, "the CLIP checkpoint", "model.vision.path")
        model = CLIPModel.from_pretrained(folder, attn_implementation=resolve_attention(attn_implementation))
        self._take(model, select_layer, str(folder))

    @classmethod
    def from_arch(cls, arch: dict, select_layer: int = -2) -> ClipTower:
        from transformers import CLIPConfig, CLIPModel

        tower = cls.__new__(cls)
        nn.Module.__init__(tower)
        config = CLIPConfig(
            vision_config=arch["vision_config"], text_config=arch["text_config"], projection_dim=arch["projection_dim"]
        )
        tower._take(CLIPModel(config), select_layer, None)
        return tower

    def _take(self, model, select_layer: int, path: str | None) -> None:
        self.path = path
        self.vision_tower = model.vision_model
        self.guide_encoder = model.text_model
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale
        self.register_buffer("logit_bias", torch.zeros(1, device=model.logit_scale.device), persistent=False)
        self.select_layer = select_layer
        vision = model.config.vision_config
        self.hidden_size = vision.hidden_size
        self.text_hidden_size = model.config.projection_dim
        self.grid = vision.image_size // vision.patch_size
        self.image_size = vision.image_size
        log.info("vision tower %s: attention %s", path or "(architecture only)", model.config._attn_implementation)

    def parts(self) -> dict[str, nn.Module]:
        vision = self.vision_tower
        return {
            "vision_trunk": nn.ModuleList([vision.embeddings, vision.pre_layrnorm, vision.encoder]),
            "vision_head": nn.ModuleList(),  # nothing of CLIP's head feeds the compressor
            "guide_encoder": nn.ModuleList([self.guide_encoder, self.text_projection]),
        }

    def forward(
        self, pixel_values: torch.Tensor, joint_embeds: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if joint_embeds:
            raise ValueError("CLIP has no token-level joint-space embeddings: use the local branch's keys: features")
        trunk_frozen = not any(p.requires_grad for p in self.vision_tower.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not trunk_frozen):
            out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        n = pixel_values.shape[0]
        features = out.hidden_states[self.select_layer][:, 1:]  # the class token dropped
        return features.reshape(n, self.grid, self.grid, -1), None

    def encode_guide(self, input_ids: torch.Tensor, tokens: bool = False) -> torch.Tensor:
        out = self.guide_encoder(input_ids=input_ids)
        return self.text_projection(out.last_hidden_state if tokens else out.pooler_output)
