"""SigLIP as HICom uses it: trunk features, joint-space token embeddings, and the text tower as guide encoder."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from hicom.data.transforms import FrameTransform, normalise
from hicom.utils.checkpoints import load_pretrained, require_pretrained

log = logging.getLogger(__name__)


class _SiglipDefaultIds(logging.Filter):
    """Drops transformers' warning that SigLIP's text config has its bos / eos ids outside its vocabulary.

    transformers' SigLIP text config defaults to CLIP's ids (49406, 49407) beside its own 32,000-token vocabulary,
    and google's so400m folder sets neither, so every SigLIP config transformers makes warns: loading the folder,
    building the architecture for a dry run, and the default config it compares against when saving one. The text
    tower pools its last position and reads neither id, and neither do we (the guide tokenizer has its own), so the
    warning says nothing about the run. Only these two values at that vocabulary size are dropped."""

    pattern = re.compile(r"Model config: (bos|eos)_token_id must be .* \(between 0 and 31999\), got 4940[67]\.")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


# transformers logs it from this module's logger, and from nowhere else
logging.getLogger("transformers.configuration_utils").addFilter(_SiglipDefaultIds())


class _Tower(nn.Module):
    """What the vision towers share: loading an HF checkpoint folder with `from_pretrained`, or building the same
    architecture with random weights from a bundled architecture dict (dry runs, on the meta device), and the
    sizes read off the loaded config. Subclasses name the HF model (`_model`, `_config`) and take its parts
    (`_take_parts`)."""

    what = "vision"

    def __init__(
        self, *, path: str, select_layer: int = -2, attn_implementation: str = "sdpa", arch: str | None = None
    ) -> None:
        """`arch` names the bundled architecture (hicom/arch/<arch>.json) that describes the checkpoint, for dry
        runs that build the model without its weights; loading ignores it."""
        super().__init__()
        folder = require_pretrained(path, f"the {self.what} checkpoint", "model.vision.path")
        model = load_pretrained(self._model(), folder, f"the {self.what} checkpoint", attn_implementation)
        self._take(model, select_layer, str(folder))

    @classmethod
    def from_arch(cls, arch: dict, select_layer: int = -2):
        """Random weights (on the current default device, e.g. meta) from a bundled architecture dict."""
        tower = cls.__new__(cls)
        nn.Module.__init__(tower)
        tower._take(cls._model()(cls._config(arch)), select_layer, None)
        return tower

    @staticmethod
    def _model():
        raise NotImplementedError

    @staticmethod
    def _config(arch: dict):
        raise NotImplementedError

    def _take_parts(self, model) -> None:
        raise NotImplementedError

    def guide_rows_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Which rows of the token-level guide (`encode_guide(..., tokens=True)`) are real tokens, (B, L), from the
        guide tokenizer's mask (None where it gives none: SigLIP's, whose text tower reads every position,
        padding included, as it was trained); a compressor attends to these rows only."""
        return attention_mask

    def _trunk(self, pixel_values: torch.Tensor, final: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trunk's hidden state at `select_layer` and, with `final`, its final one (after any post-layernorm),
        (N, tokens, D) each; without autograd when the trunk is frozen. The selected state is taken from the layer
        that makes it, so that the others are freed as the trunk goes on: `output_hidden_states` would hold every
        layer's (28 for so400m, about 1.5 GiB for a 32-frame clip in bf16) until the compressor ran. Without
        `final` the layers after the selected one do not run (None is returned for it): nothing reads them where
        no joint-space keys are made (the release's -2 leaves one of so400m's 27 layers, 3.7 % of the trunk)."""
        pixel_values = normalise(pixel_values, *self.pixel_norm)  # bytes from the data loaders, here on the device
        frozen = not any(p.requires_grad for p in self.vision_tower.encoder.parameters())
        layers = self.vision_tower.encoder.layers
        index = self.select_layer % (len(layers) + 1)  # of the hidden states: the trunk's input, each layer's output
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            if index == 0:  # the encoder's input, which the tower makes in its own way (CLIP's pre-layernorm)
                out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
                return out.hidden_states[0], out.last_hidden_state if final else None
            taken = []
            hook = layers[index - 1].register_forward_hook(
                lambda module, args, output: taken.append(output[0] if isinstance(output, tuple) else output)
            )
            encoder = self.vision_tower.encoder
            if not final:  # the tower's own forward over the layers up to the selected one (then its post-layernorm)
                encoder.layers = nn.ModuleList(layers[:index])
            try:
                out = self.vision_tower(pixel_values=pixel_values)
            finally:
                hook.remove()
                encoder.layers = layers
        return taken[0], out.last_hidden_state if final else None

    @property
    def depth(self) -> int:
        """The trunk's layers (its hidden states: the embeddings, then each layer's output; -2 is depth - 1)."""
        return len(self.vision_tower.encoder.layers)

    def unread(self, joint_embeds: bool) -> list[nn.Module]:
        """The trunk's modules whose outputs nothing reads where no joint-space keys are made (`joint_embeds`
        False): the layers after `select_layer` (which `_trunk` then does not run) and the post-layernorm. Trained,
        they would get no gradient, which stops a DDP run at its first step."""
        if joint_embeds:
            return []
        layers = self.vision_tower.encoder.layers
        post = getattr(self.vision_tower, "post_layernorm", None)
        return [*layers[self.select_layer % (len(layers) + 1) :], *([post] if post is not None else [])]

    def _take(self, model, select_layer: int, path: str | None) -> None:
        self.path = path
        self._take_parts(model)
        # (mean, std, rescale) of the folder's image processor, for frames handed over as bytes (an architecture
        # alone, as the dry run builds, is never given any)
        norm = FrameTransform.from_pretrained(path) if path is not None else None
        self.pixel_norm = (norm.mean, norm.std, norm.rescale) if norm else ((0.5,) * 3, (0.5,) * 3, 1 / 255)
        vision = model.config.vision_config
        layers = vision.num_hidden_layers  # hidden states: the embeddings, then each layer's output
        if (
            isinstance(select_layer, bool)
            or not isinstance(select_layer, int)
            or not -layers - 1 <= select_layer <= layers
        ):
            raise ValueError(
                f"model.vision.select_layer={select_layer!r}: this tower has {layers} layers, so a hidden state from "
                f"{-layers - 1} to {layers} (the release takes -2, the last layer's input)"
            )
        self.select_layer = select_layer
        self.hidden_size = vision.hidden_size
        self.grid = vision.image_size // vision.patch_size
        self.image_size = vision.image_size
        log.info("vision tower %s: attention %s", path or "(architecture only)", model.config._attn_implementation)


class SiglipTower(_Tower):
    """Wraps a SigLIP checkpoint (vision + text towers) loaded with `from_pretrained`.

    - `features`: the trunk's hidden state at `select_layer` (N, h, w, D).
    - `embeds`: keys in the joint image-text space, X + head.mlp(head.layernorm(X)) per token, X the final
      (post-layernorm) hidden state (N, h, w, D).
    - `encode_guide`: the text tower's pooled output (B, D_text), or its token-level output (B, L, D_text).
    A trunk whose parameters are all frozen runs without autograd.
    """

    what = "SigLIP"
    model_type = "siglip"  # what a checkpoint folder's config.json names (check_architectures)
    has_joint_embeds = True

    @staticmethod
    def _model():
        from transformers import SiglipModel

        return SiglipModel

    @staticmethod
    def _config(arch: dict):
        from transformers import SiglipConfig

        return SiglipConfig(vision_config=arch["vision_config"], text_config=arch["text_config"])

    def _take_parts(self, model) -> None:
        self.vision_tower = model.vision_model
        # The head's attention pooling (one probe over all tokens) is never used: skip it in the forward pass.
        # Its layernorm and MLP stay, for the joint-space keys.
        self.vision_tower.use_head = False
        self.guide_encoder = model.text_model
        self.logit_scale, self.logit_bias = model.logit_scale, model.logit_bias
        self.text_hidden_size = model.config.text_config.hidden_size

    def forward(
        self, pixel_values: torch.Tensor, joint_embeds: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        selected, final = self._trunk(pixel_values, final=joint_embeds)  # final: after post_layernorm
        n = pixel_values.shape[0]
        features = selected.reshape(n, self.grid, self.grid, -1)  # (N, h, w, D)
        if not joint_embeds:
            return features, None
        head = self.vision_tower.head
        embeds = final + head.mlp(head.layernorm(final))
        return features, embeds.reshape(n, self.grid, self.grid, -1)

    def parts(self) -> dict[str, nn.Module]:
        """The tower's trainable parts: the trunk, the head's layernorm + MLP that make the joint-space keys (its
        attention pooling is never used), and the text tower that encodes the guide."""
        vision = self.vision_tower
        return {
            "vision_trunk": nn.ModuleList([vision.embeddings, vision.encoder, vision.post_layernorm]),
            "vision_head": nn.ModuleList([vision.head.layernorm, vision.head.mlp]),
            "guide_encoder": self.guide_encoder,
        }

    def encode_guide(
        self, input_ids: torch.Tensor, tokens: bool = False, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The guide tokens' (padded to the tokenizer's max length) text embedding: pooled C_p (B, D_text), or
        with `tokens` the token-level C_f (B, L, D_text), the text head applied at every position, whose last
        row is C_p (SigLIP pools the last position). `attention_mask` (B, L): the tokenizer's, where it gives one."""
        out = self.guide_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self.guide_encoder.head(out.last_hidden_state) if tokens else out.pooler_output


class ClipTower(_Tower):
    """Wraps a CLIP checkpoint (e.g. openai/clip-vit-large-patch14-336) with the interface of `SiglipTower`.

    - `features`: the trunk's hidden state at `select_layer` without the class token (N, h, w, D).
    - CLIP has no per-token map into its joint space at the trunk's width (its projection acts on the pooled
      class token and changes the width), so there are no joint-space keys: `has_joint_embeds` is False and a
      compressor that asks for them is refused when the model is built (set the local branch's `keys: features`).
    - `encode_guide`: the text tower's pooled output through the text projection (B, D_joint), or with `tokens`
      every position through it (B, L, D_joint), the pooled (end-of-text) position moved to the last row, where
      SigLIP's token-level guide has its pooled guide.
    - `logit_scale` is CLIP's; CLIP has no logit bias, so it is a zero.
    """

    what = "CLIP"
    model_type = "clip"
    has_joint_embeds = False

    @staticmethod
    def _model():
        from transformers import CLIPModel

        return CLIPModel

    @staticmethod
    def _config(arch: dict):
        from transformers import CLIPConfig

        return CLIPConfig(
            vision_config=arch["vision_config"], text_config=arch["text_config"], projection_dim=arch["projection_dim"]
        )

    def _take_parts(self, model) -> None:
        self.vision_tower = model.vision_model
        self.guide_encoder = model.text_model
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale
        self.register_buffer("logit_bias", torch.zeros(1, device=model.logit_scale.device), persistent=False)
        self.text_hidden_size = model.config.projection_dim

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
        selected, _ = self._trunk(pixel_values, final=False)
        n = pixel_values.shape[0]
        features = selected[:, 1:]  # the class token dropped
        return features.reshape(n, self.grid, self.grid, -1), None

    def encode_guide(
        self, input_ids: torch.Tensor, tokens: bool = False, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.guide_encoder(input_ids=input_ids, attention_mask=attention_mask)
        if not tokens:
            return self.text_projection(out.pooler_output)
        # A pooled-guide branch beside a fine one reads C_p as C_f's last row (`injection.pooled`), where SigLIP
        # pools; CLIP pools at the end-of-text token, which padding leaves before the last position. That row is
        # swapped with the last: the fine injection attends to C_f as a set (no positions, no mask), so the swap
        # changes nothing else. The pooled output is one row of the last hidden state, found by equality.
        states, pooled_at = out.last_hidden_state, out.pooler_output[:, None]
        matches = (states == pooled_at).all(-1)
        if not states.is_meta and not matches.any(-1).all():  # on the meta device (dry run, FLOP count): no values
            raise RuntimeError("CLIP's pooled text output is not a row of its last hidden state; cannot place C_p")
        at = matches.int().argmax(-1)  # (B,)
        rows = torch.arange(states.shape[1], device=states.device).repeat(states.shape[0], 1)
        batch = torch.arange(states.shape[0], device=states.device)
        rows[batch, at], rows[:, -1] = rows.shape[1] - 1, at
        return self.text_projection(states.gather(1, rows[..., None].expand_as(states)))

    def guide_rows_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The tokenizer's mask, its rows swapped as `encode_guide` swaps the guide's: the end-of-text token where CLIP
        pools, the last real one of a right-padded guide, and the last row."""
        if attention_mask is None:
            return None
        at = attention_mask.sum(-1) - 1  # (B,)
        batch = torch.arange(attention_mask.shape[0], device=attention_mask.device)
        mask = attention_mask.clone()
        mask[batch, at], mask[:, -1] = attention_mask[:, -1], attention_mask[batch, at]
        return mask
