"""The network: vision tower -> compressor -> LLM."""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

import torch
from torch import nn

from hicom.modules.compressors.base import Compressor, PackedLayout
from hicom.modules.llm import CausalLM
from hicom.modules.vision import ClipTower, SiglipTower


def compose_compressor(
    compressor: Callable[..., Compressor], vision: SiglipTower | ClipTower, llm_width: int
) -> Compressor:
    """The compressor at the vision tower's and the LLM's widths, refused where it asks for keys the tower lacks."""
    built = compressor(in_dim=vision.hidden_size, out_dim=llm_width, guide_dim=vision.text_hidden_size)
    if not isinstance(built, Compressor):
        raise TypeError(
            f"it built a {type(built).__module__}.{type(built).__qualname__}, which is not a "
            "hicom.modules.compressors.Compressor: subclass that (it gives the token count, the guide and key flags "
            "and the packed forward the network calls), not a plain module"
        )
    if built.uses_embeds and not vision.has_joint_embeds:
        raise ValueError(
            f"the compressor takes joint-space keys, which {type(vision).__name__} does not provide: set "
            "model.compressor.local.keys=features"
        )
    return built


def guide_only_names(net: VideoLLM, compressor_cfg) -> set[str]:
    """The names in `net.compressor`'s state that only its guided form has: its state less that of the same
    compressor built from its class's `unguided_config`, on the meta device (HICom's injection modules; the
    instruction-aware Q-Former's instruction projection and the text half of its layers)."""
    from hydra.utils import instantiate

    from hicom.modules.compressors.base import unguided_config

    with torch.device("meta"):
        plain = compose_compressor(instantiate(unguided_config(compressor_cfg)), net.vision, net.llm.hidden_size)
    return set(net.compressor.state_dict()) - set(plain.state_dict())


def weightless(module: nn.Module) -> nn.Module:
    """A copy of `module` on the meta device, made without copying a weight, and without the hooks on it (a DeepSpeed
    engine's, which hold the engine): what arithmetic on its sizes needs (`VisualTokens`). Its tensors kept as
    attributes (a cached position table) are on the meta device too: a CPU one would be sent to a worker through
    shared memory."""
    memo: dict[int, object] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    for sub in module.modules():
        for name, value in vars(sub).items():
            if name.endswith("hooks") and isinstance(value, dict):  # torch keeps each kind of hook in a dict of its own
                memo[id(value)] = type(value)()
            elif isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = torch.empty_like(value, device="meta")
    return deepcopy(module, memo)


class VisualTokens:
    """A network's visual token count for a clip of `num_frames` frames (its compressor's `num_tokens` on the vision
    tower's grid), as the data loading holds it: a copy of the compressor without weights (`weightless`), made
    before a strategy touches the network (DeepSpeed's ZeRO-3 sets attributes on each module that do not pickle). A
    loader worker started by forkserver or spawn unpickles its dataset: the network's own method would send it the
    whole network, and fail at an LLM under gradient checkpointing (its input hook is a local function)."""

    def __init__(self, compressor: Compressor, grid: int) -> None:
        self.compressor, self.grid = weightless(compressor), grid

    def __call__(self, num_frames: int, modality: str = "video") -> int:
        return self.compressor.num_tokens(num_frames, self.grid, self.grid, modality)


class VideoLLM(nn.Module):
    """Composes the three parts. `compressor` is a partial taking in_dim, out_dim and guide_dim, so its widths
    come from the loaded checkpoints rather than from config.

    Batches (see hicom.data.collate): pixel_values (sum T, 3, S, S) with num_frames (B,) and modalities;
    guide_ids (B, Lg) and the optional guide_mask (B, Lg); input_ids / attention_mask / labels (B, L); and where
    samples share a clip (an evaluation batch of one video's questions), clip_index (B',): for each sample with
    frames the clip of pixel_values it shows, each clip's frames given once.
    """

    def __init__(
        self, *, vision: SiglipTower | ClipTower, llm: CausalLM, compressor: Callable[..., Compressor]
    ) -> None:
        super().__init__()
        self.vision = vision
        self.llm = llm
        self.compressor = compose_compressor(compressor, vision, llm.hidden_size)
        self.zero3 = False  # set by prepare_zero3
        # Branches with clip-scale attention start from the vision checkpoint's logit scale and bias.
        with torch.no_grad():
            for module in self.compressor.modules():
                if getattr(module, "clip_scale", False):
                    module.logit_scale.copy_(vision.logit_scale.reshape(-1)[:1])
                    module.logit_bias.copy_(vision.logit_bias.reshape(-1)[:1])

    def prepare_zero3(self) -> None:
        """Call before DeepSpeed ZeRO-3 partitions the model. ZeRO-3 gathers a module's own weights when the module
        is called; code that reads a child's weights without calling the child would see empty shards:
        - the compressor (its folded attention reads the projections' weights) becomes a ZeRO-3 leaf, gathered
          whole for its call and, since DeepSpeed re-gathers a leaf for its backward pass only through an input
          that requires grad, its input features are made to require grad while training (see encode_visual);
        - the text tower's embedding module reads its position table's shape before calling it: the table is
          registered as an external parameter of that module, gathered with it."""
        import deepspeed

        deepspeed.utils.set_z3_leaf_modules(self, [type(self.compressor)])
        embeddings = self.vision.guide_encoder.embeddings
        deepspeed.zero.register_external_parameter(embeddings, embeddings.position_embedding.weight)
        self.zero3 = True

    def idle_parts(self) -> dict[str, str]:
        """The vision tower's parts that training would not change, each with why (see `idle_parts`)."""
        return idle_parts(self.vision.parts(), self.compressor)

    def num_visual_tokens(self, num_frames: int, modality: str = "video") -> int:
        """Tokens the LLM receives for a clip of `num_frames` frames, known before running anything."""
        return self.compressor.num_tokens(num_frames, self.vision.grid, self.vision.grid, modality)

    def visual_tokens(self) -> VisualTokens:
        """`num_visual_tokens` as the data loading holds it: it pickles without the network (made when the data
        module is given the network, before the strategy sets the network up)."""
        return VisualTokens(self.compressor, self.vision.grid)

    def encode_visual(self, batch: dict) -> torch.Tensor | None:
        """Compressed tokens of every clip in the batch, concatenated in sample order: (sum N_i, d_llm)."""
        pixels = batch.get("pixel_values")
        if pixels is None:
            return None
        features, embeds = self.vision(pixels, joint_embeds=self.compressor.uses_embeds)
        counts = batch["num_frames"].tolist()
        clips = [i for i, n in enumerate(counts) if n]  # samples without a video or image have no rows
        shared = batch.get("clip_index")
        if shared is not None:  # the tower ran once per clip: each sample gets its clip's rows
            rows = clip_rows(shared, [counts[i] for i in clips]).to(features.device)
            features, embeds = (None if x is None else x[rows] for x in (features, embeds))
        if self.zero3 and torch.is_grad_enabled() and not features.requires_grad:
            features = features.detach().requires_grad_()  # a ZeRO-3 leaf is re-gathered for backward through it
        guide = guide_mask = None
        if self.compressor.uses_guide:
            tokens, tokenizer_mask = self.compressor.guide_tokens, batch.get("guide_mask")
            guide = self.vision.encode_guide(batch["guide_ids"], tokens=tokens, attention_mask=tokenizer_mask)
            if tokens:  # which of the token-level guide's rows are real tokens, where the tower masks padding
                guide_mask = self.vision.guide_rows_mask(tokenizer_mask)
        layout = PackedLayout(
            num_frames=tuple(counts[i] for i in clips),
            modalities=tuple(batch["modalities"][i] for i in clips),
            height=self.vision.grid,
            width=self.vision.grid,
        )
        if guide is not None and len(clips) != len(counts):
            guide = guide[clips]
            guide_mask = None if guide_mask is None else guide_mask[clips]
        masked = {} if guide_mask is None else {"guide_mask": guide_mask}
        return self.compressor(features, embeds, guide, layout=layout, **masked)  # (sum N_i, d_llm)

    def forward(self, batch: dict) -> torch.Tensor:
        """The batch's loss: the mean cross-entropy of its labelled tokens (`CausalLM.loss`)."""
        embeds = self.llm.embed(batch["input_ids"], self.encode_visual(batch))
        return self.llm.loss(embeds, batch["attention_mask"], batch["labels"])

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 8) -> torch.Tensor:
        """Greedy continuation (B, <= max_new_tokens) of left-padded prompts.

        Decoding is plain greedy (SPEC 7) whatever the checkpoint's generation_config.json says: transformers fills
        each setting left unset here from the model's generation config (Qwen2.5-Instruct's repetition_penalty 1.05
        applies even without sampling; another LLM's no_repeat_ngram_size or suppress_tokens would too), so during
        the call the model's config is the library's defaults. Only the stop tokens are the checkpoint's.

        Under ZeRO-3 every forward gathers parameters from all processes, so a process whose replies end early
        keeps stepping with the others until all are done (transformers' synced_gpus), instead of leaving them
        waiting on a gather it never joins."""
        import torch.distributed as dist
        from transformers import GenerationConfig

        model = self.llm.model
        checkpoint_config = model.generation_config
        greedy = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=checkpoint_config.eos_token_id,
            pad_token_id=self.llm.tokenizer.pad_token_id,
        )
        synced = self.zero3 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        embeds = self.llm.embed(batch["input_ids"], self.encode_visual(batch))
        model.generation_config = GenerationConfig()
        try:
            return model.generate(
                inputs_embeds=embeds,
                attention_mask=batch["attention_mask"],
                generation_config=greedy,
                synced_gpus=synced,
            )
        finally:
            model.generation_config = checkpoint_config


def clip_rows(clip_index: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The rows of the clips' frames that make each sample's frames, where samples share clips: clip_index (B',)
    the clip of each sample with frames, counts (B',) its frames -> (sum counts,) rows of the clips' frames."""
    index = clip_index.tolist()
    frames = dict(zip(index, counts, strict=True))  # a clip's frames, from any sample that shows it
    if sorted(frames) != list(range(len(frames))) or any(frames[c] != n for c, n in zip(index, counts, strict=True)):
        raise ValueError(f"clip_index {index} with frames {counts}: each clip numbered from 0, with one frame count")
    starts = [0]
    for clip in range(len(frames)):
        starts.append(starts[-1] + frames[clip])
    return torch.cat([torch.arange(starts[c], starts[c] + n) for c, n in zip(index, counts, strict=True)])


def idle_parts(parts: dict[str, nn.Module], compressor) -> dict[str, str]:
    """Of a vision tower's `parts`, those that training would not change, each with why: any part without
    parameters (CLIP's head), the head that makes the joint-space keys where `compressor` takes none, the text tower
    where it takes no guide. Under DDP their missing gradients would stop the run."""
    idle = {name: "it has no parameters" for name, part in parts.items() if next(part.parameters(), None) is None}
    if not compressor.uses_embeds:
        idle.setdefault("vision_head", "this compressor takes no joint-space keys")
    if not compressor.uses_guide:
        idle.setdefault("guide_encoder", "this compressor takes no guide")
    return idle


def idle_message(idle: dict[str, str]) -> str:
    """`idle` parts, for the line that says they stay frozen: "vision_head (it has no parameters), ..."."""
    return ", ".join(f"{name} ({why})" for name, why in idle.items())
