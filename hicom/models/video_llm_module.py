"""The LightningModule: loss, optimizer groups, schedule, logging and the held-out multiple-choice check."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable

import torch
from lightning import LightningModule
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from hicom.data.template import IGNORE_INDEX
from hicom.eval.answers import parse_choice
from hicom.modules.compressors import Compressor
from hicom.modules.llm import CausalLM
from hicom.modules.video_llm import VideoLLM, idle_message
from hicom.modules.vision import ClipTower, SiglipTower
from hicom.utils.checkpoints import (
    computed_buffers,
    micro_batches_within_step,
    next_epoch_from_its_start,
    restore_computed_buffers,
)

log = logging.getLogger(__name__)

PARTS = ("vision_trunk", "vision_head", "guide_encoder", "compressor", "llm")


class NonFiniteLossError(RuntimeError):
    """A training batch's loss is NaN or infinite: the fit stops before it reaches the weights."""


def check_hparams(
    trainable: Iterable[str],
    lr: dict[str, float],
    warmup_ratio: float,
    weight_decay: float = 0.0,
    max_new_tokens: int = 4,
    betas=(0.9, 0.999),
) -> None:
    """The module's own values (see VideoLLMModule): `build` checks them before the towers load, too."""
    if isinstance(trainable, str) or not isinstance(trainable, Iterable):  # `compressor` would read as letters
        raise ValueError(f"model.trainable is a list of parts (e.g. [compressor]), got {trainable!r}")
    unknown = set(trainable) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {PARTS}")
    missing = [p for p in trainable if lr.get(p) is None]  # a rate of null is none: an experiment clears the defaults
    if missing:
        raise ValueError(f"no learning rate for trainable parts {missing}: set model.lr.<part>")
    misspelt = sorted(set(lr) - {*PARTS, "injection"})  # a learning rate no group reads would change nothing
    if misspelt:
        raise ValueError(f"model.lr: unknown parts {misspelt}; the learning rates are of {[*PARTS, 'injection']}")
    bad = {
        part: rate
        for part, rate in lr.items()
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf)
    }
    if bad:
        raise ValueError(f"learning rates must be > 0, got {bad} (model.lr)")
    for key, value in (("warmup_ratio", warmup_ratio), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"model.{key} is a number, got {value!r}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"model.warmup_ratio is the share of steps spent warming up, in [0, 1): got {warmup_ratio}")
    if not weight_decay >= 0:
        raise ValueError(f"model.weight_decay must be >= 0 (the recipe's is 0), got {weight_decay}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"model.max_new_tokens is how many tokens an answer may take, >= 1: got {max_new_tokens!r}")
    pair = list(betas) if isinstance(betas, Iterable) and not isinstance(betas, str) else None
    if (
        pair is None
        or len(pair) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in pair)
    ):
        raise ValueError(f"model.betas are AdamW's two decay rates, each in [0, 1) (e.g. [0.9, 0.999]), got {betas!r}")


def check_resume_origin(started: str | None, init_from: str | None) -> None:
    """A checkpoint resumes as its run started: from a release folder (`init_from`, its LLM loaded from there) or
    not. `started` is the checkpoint's `init_from`."""
    if (started is None) != (init_from is None):
        raise ValueError(
            f"this checkpoint's run started from {started}: resume it with init_from=<that folder>"
            if started is not None
            else "this checkpoint's run did not start from a release folder: resume it without init_from"
        )


def _leave_out_frozen(module: VideoLLMModule, state: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook of a module whose DeepSpeed checkpoints leave out the frozen weights (see `setup`)."""
    for name in module.frozen_loaded():
        state.pop(prefix + name, None)


def _some(names: list[str]) -> str:
    """The first few of `names`, for an error message."""
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


def _rates(groups: list[dict], rates: list[float]) -> str:
    """Each optimizer group's learning rate, by the group's name, for a message."""
    named = enumerate(zip(groups, rates, strict=True))
    return ", ".join(f"{group.get('name', index)} {rate:.3g}" for index, (group, rate) in named)


def warmup_steps(ratio: float, total: int) -> int:
    """The warmup of `total` optimizer steps, counted as transformers' Trainer counts it for the release: the ratio's
    share rounded up (3% of stage 2's 1,444 steps at 512 a step is 44)."""
    return math.ceil(total * ratio)


class VideoLLMModule(LightningModule):
    """Receives the built vision tower and LLM and the compressor partial, composes them into a VideoLLM, and
    trains the parts listed in `trainable` (a subset of PARTS); everything else is frozen and out of the optimizer.

    `lr` maps each trainable part to its learning rate; the compressor's injection sub-modules (its guide
    injectors) take `lr["injection"]` when given. Skipped samples reported by the collator are counted per reason.
    """

    def __init__(
        self,
        *,
        vision: SiglipTower | ClipTower,
        llm: CausalLM,
        compressor: Callable[..., Compressor],
        trainable: Iterable[str] = ("compressor",),
        lr: dict[str, float] | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        max_new_tokens: int = 4,
    ) -> None:
        super().__init__()
        # plain Python values (Hydra passes ListConfig / DictConfig): checkpoints hold them as hyperparameters, and
        # torch.load(weights_only=True) of a resumed run accepts only plain types
        trainable, lr, betas = (
            [str(p) for p in trainable],
            {str(k): None if v is None else float(v) for k, v in (lr or {}).items()},
            tuple(betas) if isinstance(betas, Iterable) and not isinstance(betas, str) else betas,
        )
        self.save_hyperparameters(ignore=["vision", "llm", "compressor"])
        check_hparams(trainable, lr, warmup_ratio, weight_decay, max_new_tokens, betas)
        self.net = net = VideoLLM(vision=vision, llm=llm, compressor=compressor)
        idle = {name: why for name, why in net.idle_parts().items() if name in trainable}
        if idle:  # a recipe's stage 3 trains the SigLIP head and the text tower, which a pooling compressor never reads
            log.warning("trainable parts stay frozen: %s", idle_message(idle))
            trainable = [name for name in trainable if name not in idle]
        self.trainable, self.lr = tuple(trainable), {part: rate for part, rate in lr.items() if rate is not None}
        self.weight_decay, self.betas, self.warmup_ratio = weight_decay, betas, warmup_ratio
        self.max_new_tokens = max_new_tokens
        net.requires_grad_(False)
        for name in self.trainable:
            self.parts()[name].requires_grad_(True)
        unread = [p for m in net.vision.unread(net.compressor.uses_embeds) for p in m.parameters() if p.requires_grad]
        if unread:  # e.g. a pooling compressor's trunk: the layers after select_layer never run
            log.info(
                "vision_trunk: %d parameters after model.vision.select_layer stay frozen: this compressor takes no "
                "joint-space keys, so nothing reads them", sum(p.numel() for p in unread),
            )  # fmt: skip
            for parameter in unread:
                parameter.requires_grad_(False)
        self.skipped: dict[str, dict] = {}  # this process's, since this launch began
        self.skipped_before: dict[str, dict] = {}  # every process's before a resume (its checkpoint's), on each
        self.init_from: str | None = None  # the release folder the fit started from (training.train sets it)
        # the frozen weights of its trained parts as they loaded, for the hand-off (training.train sets them)
        self.as_loaded: dict[str, torch.Tensor] = {}
        self.results: list[dict] = []
        self.test_failed: list[dict] = []  # held-out questions whose sample could not be read
        # the compressor's parameters that only its guided form has (hicom.training.build sets it from the
        # compressor's unguided_config); None: the compressor's is_guide_parameter says
        self.guide_only: set[str] | None = None
        # this process's fit: training batches, usable samples, and the videos among them with their visual tokens
        # and their training FLOPs, where counted (`batch_flops`)
        self.fit_counts = dict.fromkeys(("batches", "samples", "videos", "video_tokens", "flops"), 0)
        # the run's counts (all processes') and seconds of fitting before this launch, from the checkpoint it resumes
        # (`fit_so_far`), and the clock this launch's fit started at (training.train sets it): a resumed run's
        # metrics are the whole run's
        self.earlier: dict = {}
        self.fit_clock: float | None = None
        # the compressor's config (training.train sets it), kept in checkpoints: a resume with another is refused
        self.compressor_config: dict | None = None
        # ThroughputMonitor's FLOPs of the batch at hand (its flops_per_sec and MFU), set at each training step from
        # `batch_flops` (hicom.callbacks.throughput.BatchFlops; training.train sets it where the monitor is on)
        self.flops_per_batch: int | None = None
        self.batch_flops: Callable[[dict], int] | None = None
        self._stand_ins: dict[str, dict] = {}  # ZeRO-3, per stage: what runs for a batch whose samples were all skipped
        # processes whose samples reached a trainable parameter, over the micro-batches of the optimizer step under way
        self._stepped = 0.0
        # the step's loss over its micro-batches (summed over processes) and their count: logged once it steps
        self._step_loss: tuple[torch.Tensor | float, float] = (0.0, 0.0)
        # distinct samples skipped, every process's: the run's count so far, and this process's part of it counted
        self._skipped_total: float | None = None
        self._skipped_counted = 0
        self._empty_step = False  # the last optimizer step had no such sample on any process (on_before_optimizer_step)
        self._said_untaught = False  # the warning that batches without clips teach a fit with the LLM frozen nothing
        self._val_sum, self._val_count = 0.0, 0.0  # the validation under way (on_validation_epoch_end)
        self._leaves_out_frozen = False  # the state dict drops the frozen weights (DeepSpeed's checkpoints: `setup`)
        self._computed = computed_buffers(net)  # fp32 RoPE frequencies, put back after bf16-true / DeepSpeed casts
        # the learning-rate schedule's warmup and total steps (configure_optimizers), kept in checkpoints; and where
        # this fit resumes, {"was": the checkpoint's run's, None in one written before they were kept}, until
        # `_follow_schedule` has compared them
        self.schedule: dict[str, int] | None = None
        self._resumed_schedule: dict | None = None
        self.train()

    def train(self, mode: bool = True):
        """Trainable parts follow `mode`; frozen parts stay in eval mode (no dropout in what does not learn), but
        for a frozen LLM with gradient checkpointing: transformers checkpoints only layers in training mode, and the
        compressor's gradients pass through the LLM's activations, which are what checkpointing saves (stages 1-2
        of the recipe). Qwen2.5's and Llama 3.1's configs have no dropout, so training mode changes nothing else."""
        super().train(mode)
        if mode:
            llm, checkpointed = self.net.llm.model, self.net.llm.gradient_checkpointing
            for name, part in self.parts().items():
                if name not in self.trainable and not (name == "llm" and checkpointed):
                    part.eval()
            if "llm" not in self.trainable and checkpointed and getattr(llm.config, "attention_dropout", 0.0):
                log.warning(
                    "the frozen LLM runs in training mode for gradient checkpointing, and its attention_dropout "
                    "%s applies: set model.llm.gradient_checkpointing=false to train without it",
                    llm.config.attention_dropout,
                )  # fmt: skip
        return self

    def setup(self, stage: str) -> None:
        strategy = self._deepspeed()
        if strategy is None:
            return
        if strategy.config.get("zero_optimization", {}).get("stage") == 3:
            self.net.prepare_zero3()  # before the strategy partitions the model
        # The engine loads the module state itself, strictly unless told not to; a checkpoint that left out the
        # frozen weights lacks them by design. It loads leniently, and on_load_checkpoint checks the names.
        self.strict_loading = False
        if strategy.exclude_frozen_parameters:
            loaded = set(self.frozen_loaded())
            kept = [name for name in self._frozen() if name not in loaded]
            if kept:  # DeepSpeed leaves out every frozen parameter or none
                log.info(
                    "checkpoints keep the frozen parameters: %s are frozen but not loaded again by a build "
                    "(only the towers' and the LLM's are)",
                    kept[:3] + ["..."] * (len(kept) > 3),
                )
                strategy.exclude_frozen_parameters = False
            elif not self._leaves_out_frozen:
                # DeepSpeed names a tied tensor once and would keep a frozen one under its other name (Qwen2.5-0.5B's
                # and 1.5B's tied LM head: 0.27 and 0.47 GB in bf16 per save); the module's state dict drops them all
                self.register_state_dict_post_hook(_leave_out_frozen)
                self._leaves_out_frozen = True

    def _deepspeed(self):
        """The trainer's strategy where it is Lightning's DeepSpeedStrategy (or a subclass), else None."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = self.trainer.strategy if self._trainer is not None else None
        return strategy if isinstance(strategy, DeepSpeedStrategy) else None

    def _frozen(self) -> dict[str, list[int]]:
        """The frozen parameters under every name (a tied tensor under each of its names), with their whole shapes
        (a ZeRO-3 shard's own shape is empty)."""
        return {
            name: list(getattr(parameter, "ds_shape", parameter.shape))
            for name, parameter in self.named_parameters(remove_duplicate=False)
            if not parameter.requires_grad
        }

    def parts(self) -> dict[str, nn.Module]:
        return {**self.net.vision.parts(), "compressor": self.net.compressor, "llm": self.net.llm.model}

    def parameter_table(self) -> list[tuple[str, int, int]]:
        """(part, parameters, trainable parameters) per part."""
        rows = []
        for name, module in self.parts().items():
            params = list(module.parameters())
            rows.append((name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
        return rows

    def _count_skipped(self, batch: dict) -> list[str]:
        """Notes the batch's skipped samples (each record once a run); returns their keys."""
        keys = []
        for item in batch.get("skipped", []):
            # a record is its annotation file and row: ids repeat across the files of a mixture
            key = "{}:{}".format(*item["source"]) if item.get("source") else str(item["id"])
            keys.append(key)
            if key not in self.skipped and key not in self.skipped_before:
                self.skipped[key] = {**item, "key": key}
                log.warning("skipped sample %s (%s): %s", item["id"], item["skip"], item["error"])
        return keys

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _in_step(self) -> bool:
        """Whether a process must run every step with the others even without samples: several processes
        (DDP's gradient all-reduce, ZeRO-3's parameter gathers), or DeepSpeed, whose engine steps every batch."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return self._trainer is not None and (self._world() > 1 or isinstance(self.trainer.strategy, DeepSpeedStrategy))

    def _stands_in(self, stage: str) -> bool:
        """Whether a process whose batch was all skipped runs a real one again in its place (`_stand_in`): under
        ZeRO-3, whose parameters are gathered only inside a forward; and in training under ZeRO-1/2 on several
        processes, which reduce the gradients in buckets in the order the backward makes them, an order a zero
        over the parameters does not follow (the others' reduction would get other sizes: a hang under NCCL)."""
        if self.net.zero3:
            return True
        strategy = self._deepspeed() if stage == "train" and self._world() > 1 else None
        return strategy is not None and strategy.config.get("zero_optimization", {}).get("stage", 0) in (1, 2)

    def _keep_stand_in(self, batch: dict, stage: str) -> None:
        if self._in_step() and self._stands_in(stage):  # only these need a real batch to stand in (_empty_loss)
            self._stand_ins[stage] = batch

    def _stand_in(self, batch: dict, stage: str) -> dict:
        """Where `_stands_in`, for a batch whose every sample was skipped: the last batch this process ran in this
        stage (else in another), run again so that this process joins the others' parameter gathers and gradient
        reductions in their order, its result discarded (times zero)."""
        last = self._stand_ins.get(stage) or next(iter(self._stand_ins.values()), None)
        if last is None:
            raise RuntimeError(
                f"every sample of this process's {stage} batch was skipped ({batch.get('skipped')}) before it ran any "
                "batch, and under ZeRO-3 (or ZeRO-1/2 in training) a process with no batch to run cannot keep in "
                "step with the others: leave the bad samples out (python -m hicom.data.preflight, then "
                "data.quarantine=...)"
            )
        return last

    def _empty_loss(self, batch: dict) -> torch.Tensor:
        """A zero loss for a training batch whose samples were all skipped: this process adds no gradient but joins
        the others' reductions. Every trainable parameter takes part (DDP reduces them all, in its fixed bucket
        order); under ZeRO-3, and ZeRO-1/2 on several processes (`_stands_in`), through a forward and backward of a
        stand-in batch, in the order a real batch makes its gradients."""
        if self._stands_in("train"):
            return self._loss(self._stand_in(batch, "train")) * 0.0
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def _loss(self, batch: dict) -> torch.Tensor:
        """The training loss of a batch; one without clips, where processes keep in step, first runs a blank image
        through the visual parts at zero weight: before the LLM, in the order a batch with clips runs the parts
        (ZeRO-3 gathers each part's parameters as it runs)."""
        blank = None
        if batch.get("pixel_values") is None and self._in_step():
            blank = self._visual_at_zero_weight(batch["input_ids"].device)
        loss = self.net(batch)
        return loss if blank is None else loss + blank.to(loss.device)

    def _visual_at_zero_weight(self, device: torch.device) -> torch.Tensor:
        """Zero, through a blank image's pass over the visual parts (tower, guide encoder, compressor), for a
        batch with no clip (text-only samples, which batches of one modality put together): without it, under DDP
        those parts' trainable parameters would have no gradient for the all-reduce (an error unless DDP searches
        for unused parameters every step), and under ZeRO-3 the other processes' parameter gathers no partner."""
        vision = self.net.vision
        size = vision.image_size
        blank = {
            "pixel_values": torch.zeros(1, 3, size, size, device=device, dtype=next(vision.parameters()).dtype),
            "num_frames": torch.ones(1, dtype=torch.long),
            "modalities": ["image"],
            "guide_ids": torch.zeros(1, 1, dtype=torch.long, device=device),
        }
        return self.net.encode_visual(blank).float().sum() * 0.0

    def on_fit_start(self) -> None:
        restore_computed_buffers(self.net, self._computed)  # the strategy has cast the module by now
        self.fit_counts = dict.fromkeys(self.fit_counts, 0)
        if self.batch_flops is None:  # not counted in this launch: the run's count is unknown, not its earlier part
            self.fit_counts["flops"] = None
        self._stepped = 0.0
        self._step_loss = (0.0, 0.0)

    def on_train_start(self) -> None:
        self._follow_schedule()

    def _follow_schedule(self) -> None:
        """Where this fit resumed, after Lightning restored the optimizer and the schedule: the optimizer's rates
        are this schedule's at the checkpoint's step. The restored rates are those the checkpoint's run had there,
        which a resume with another schedule (other max_steps or max_epochs, so another total and warmup: a run
        trained on for longer) would have trained its first step at, then jumped to this schedule's (after a run
        that ended, from 0). Such a change is logged with the rates before and after; with the same schedule the
        rates are the ones restored."""
        from torch.optim.lr_scheduler import LambdaLR

        resumed, self._resumed_schedule = self._resumed_schedule, None
        if resumed is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, LambdaLR):  # a schedule of another kind: its restored state is left alone
                continue
            step = scheduler.last_epoch
            rates = [base * rule(step) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
            groups = scheduler.optimizer.param_groups
            restored = [group["lr"] for group in groups]
            for group, rate in zip(groups, rates, strict=True):
                group["lr"] = rate
            scheduler._last_lr = list(rates)
            if restored != rates or resumed["was"] not in (None, self.schedule):
                was = resumed["was"] or {}
                # the schedule counts the steps that moved the weights (`lr_scheduler_step`), the trainer every step
                at = f"step {step}" + (
                    f" (trainer step {self.trainer.global_step})" if step != self.trainer.global_step else ""
                )
                log.warning(
                    "resuming at schedule %s with a learning-rate schedule of %s warmup and %s total steps, where the "
                    "checkpoint's run had %s and %s: the rates go on from this schedule's there (%s), not from the "
                    "checkpoint's (%s)",
                    at, self.schedule["warmup_steps"], self.schedule["total_steps"],
                    was.get("warmup_steps", "an unrecorded warmup"), was.get("total_steps", "total"),
                    _rates(groups, rates), _rates(groups, restored),
                )  # fmt: skip

    def frozen_loaded(self) -> list[str]:
        """The state-dict names of the frozen parameters of the towers and the LLM: what every build loads again
        from the model folders (or init_from), and so what a checkpoint need not hold."""
        towers = [("net.vision.", self.net.vision), ("net.llm.", self.net.llm)]
        return [
            prefix + name
            for prefix, module in towers
            for name, parameter in module.named_parameters(remove_duplicate=False)
            if not parameter.requires_grad
        ]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leaves out the frozen weights every build loads again: a frozen 7B LLM is 15 GB in bf16, written (and
        held in memory) at every save of stages 1-2. Lightning's state dict loses them here; DeepSpeed's engine,
        which writes the module itself, leaves them out where its strategy's exclude_frozen_parameters is on
        (the configs turn it on; `setup` turns it off where a frozen parameter is not reloaded), and the names it
        wrote are recorded for on_load_checkpoint's check."""
        checkpoint["init_from"] = self.init_from
        checkpoint["skipped_samples"] = self.skipped_so_far()
        checkpoint["fit_so_far"] = self.fit_so_far()
        checkpoint["compressor_config"] = self.compressor_config
        checkpoint["select_layer"] = int(self.net.vision.select_layer)  # the hidden state the compressor reads
        checkpoint["vision_depth"] = self.net.vision.depth  # -2 is depth - 1
        checkpoint["lr_schedule"] = self.schedule
        strategy = self._deepspeed()
        if strategy is not None:
            checkpoint.pop("state_dict", None)  # the strategy drops it (after these hooks): the engine's is saved
            checkpoint["frozen_left_out"] = self._frozen() if strategy.exclude_frozen_parameters else {}
            checkpoint["module_keys"] = list(self.state_dict())  # without the frozen names where they are left out
            return
        state = checkpoint["state_dict"]
        left_out = [name for name in self.frozen_loaded() if name in state]
        checkpoint["frozen_left_out"] = {name: list(state.pop(name).shape) for name in left_out}

    def _every_process(self, value) -> list:
        """`value` of every process. Every process saves (Lightning calls the checkpoint hook on all of them), and
        only the first one's checkpoint is written: what it records of the run is gathered from all of them."""
        if self._world() == 1:
            return [value]
        import torch.distributed as dist

        rows = [None] * self._world()
        dist.all_gather_object(rows, value)
        return rows

    def fit_so_far(self, seconds: float | None = None) -> dict:
        """The run's fit so far: every process's `fit_counts` summed, with the earlier launches' (`earlier`), and
        its seconds (this launch's `seconds`, or those since `fit_clock`). FLOPs are None where a process did not
        count them. Called on every process."""
        import time

        if seconds is None:
            seconds = time.perf_counter() - self.fit_clock if self.fit_clock is not None else 0.0
        rows = [*self._every_process(dict(self.fit_counts)), self.earlier]
        total = {key: sum(row.get(key, 0) for row in rows) for key in self.fit_counts if key != "flops"}
        flops = [row.get("flops", 0) for row in rows]
        total["flops"] = None if None in flops else sum(flops)
        total["seconds"] = float(seconds) + float(self.earlier.get("seconds", 0.0))
        loss = self.trainer.callback_metrics.get("train/loss") if self._trainer is not None else None
        total["train_loss"] = round(float(loss), 4) if loss is not None else self.earlier.get("train_loss")  # the last
        return total

    def skipped_so_far(self) -> list[dict]:
        """The samples every process has skipped so far, each once, as plain values (a resume loads checkpoints with
        weights_only). Only this launch's are gathered: those before a resume every process holds already. Called
        on every process."""
        rows = self._every_process(list(self.skipped.values()))
        unique: dict[str, dict] = dict(self.skipped_before)
        for items in rows:
            for item in items:
                unique.setdefault(item["key"], item)
        return json.loads(json.dumps(list(unique.values()), default=str))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_resume_origin(checkpoint.get("init_from"), self.init_from)
        next_epoch_from_its_start(checkpoint)
        self._warn_within_step(checkpoint)
        self.earlier = dict(checkpoint.get("fit_so_far") or {})  # none in a checkpoint from before it was kept
        self._resumed_schedule = {"was": checkpoint.get("lr_schedule")}
        self._check_optimizer_groups(checkpoint.get("optimizer_states") or [])
        for item in checkpoint.get("skipped_samples", []):  # those before the stop, in the run's metrics.json too
            self.skipped_before.setdefault(item["key"], item)
        state, left_out = checkpoint.get("state_dict"), checkpoint.get("frozen_left_out") or {}
        if state is None and "module_keys" in checkpoint:  # DeepSpeed's engine has loaded it, leniently (`setup`)
            self._check_module_keys(checkpoint["module_keys"], left_out)
        if left_out:  # the frozen weights this build loaded, strictly as the rest loads
            current = self.state_dict()
            shapes = {name: list(value.shape) for name, value in current.items()} | self._frozen()  # ZeRO-3: whole
            differ = [n for n, shape in left_out.items() if shapes.get(n) != shape]
            if differ:
                raise ValueError(
                    f"the checkpoint left out frozen weights that this model does not have in their shapes: "
                    f"{_some(differ)} (resume with the model it was saved with)"
                )
            if state is not None:
                state.update({name: current[name] for name in left_out})
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is not None and type(data).__qualname__ not in checkpoint:
            log.warning(
                "the checkpoint holds no place of the data loader (it predates resumable loading): the epoch under "
                "way starts again from its first batch"
            )

    def _warn_within_step(self, checkpoint: dict) -> None:
        """A checkpoint written part-way through an optimizer step (a validation's top-k there, or last.ckpt of a
        SIGTERM during that validation) resumes with a gap, said here: its micro-batches were read and are in no
        weights, and the resumed fit's first step takes the step's other micro-batches alone."""
        if self._trainer is None:
            return
        accumulation = self.trainer.accumulate_grad_batches
        read = micro_batches_within_step(checkpoint, accumulation)
        if read:
            log.warning(
                "this checkpoint was written after %d of an optimizer step's %d micro-batches, before the step (a "
                "validation's top-k there, or a SIGTERM during it): their samples are not in its weights and are not "
                "read again, and the first step of this fit takes the other %d alone. last.ckpt is written at steps",
                read, accumulation, accumulation - read,
            )  # fmt: skip

    def _check_optimizer_groups(self, states: list[dict]) -> None:
        """Before the optimizer is made (and its state loaded, where torch names no group): the checkpoint's
        optimizer groups hold as many parameters as this run's. They differ for a checkpoint saved before the
        vision trunk's unread layers were frozen (`unread`), or with another select_layer."""
        if not states or self._trainer is None:  # DeepSpeed's engine keeps its own
            return
        saved = [(group.get("name"), len(group["params"])) for group in states[0].get("param_groups", [])]
        ours = [(group["name"], len(group["params"])) for group in self.optimizer_groups()]
        if saved != ours:
            raise ValueError(
                f"the checkpoint's optimizer state is for groups of {saved} parameters, and this run optimizes "
                f"{ours}: it was saved by a run with another model.weight_decay (with decay, biases and norm weights have "
                "groups of their own, `<part>/no_decay`), or that trained other parameters (another model.vision.select_layer, "
                "or a version of this code that trained the vision trunk's layers after it where the compressor "
                "takes no joint-space keys). Resume with that run's settings and code, or start from its weights "
                "with a new optimizer (a stage of a staged experiment: stage=<name> stage_parent=<its folder>)"
            )

    def _check_module_keys(self, saved: list[str], left_out: dict[str, list[int]]) -> None:
        """What a strict load would have refused, less the frozen weights the checkpoint left out and this build
        loaded again: a name this model has that is neither saved nor left out and reloaded (it would keep its
        build's value), or a saved name it does not have (dropped)."""
        expected, saved_names, loaded = set(self.state_dict()), set(saved), set(self.frozen_loaded())
        missing = sorted(expected - saved_names - (set(left_out) & loaded))
        unexpected = sorted(saved_names - expected - loaded)  # a frozen name saved all the same was loaded again
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint does not fit this model: missing {_some(missing)} ({len(missing)}), unexpected "
                f"{_some(unexpected)} ({len(unexpected)}). Resume with the model and trainable parts it was saved "
                "with (a weight this run trains that the checkpoint left out as frozen is missing too)"
            )

    def on_validation_start(self) -> None:
        restore_computed_buffers(self.net, self._computed)

    def on_test_start(self) -> None:
        restore_computed_buffers(self.net, self._computed)

    def _count_video_tokens(self, batch: dict) -> None:
        """Clips can have fewer than `num_frames` frames (fps sampling, `repeat_frames=false`): count what ran."""
        for frames, modality in zip(batch["num_frames"].tolist(), batch["modalities"], strict=True):
            if modality == "video":
                self.fit_counts["videos"] += 1
                self.fit_counts["video_tokens"] += self.net.num_visual_tokens(frames)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """The batch's FLOPs for ThroughputMonitor, which reads them when the batch ends; counted here, outside the
        step's precision context (bf16-true makes bf16 the default dtype there). A count that fails is a missing
        figure, not a stopped run: said once, then off."""
        if self.batch_flops is None:
            return
        try:
            self.flops_per_batch = self.batch_flops(batch)
        except Exception as err:
            log.warning("FLOP counting is off for this fit (%s: %s)", type(err).__name__, err)
            self.batch_flops = self.flops_per_batch = self.fit_counts["flops"] = None
            return
        self.fit_counts["flops"] += self.flops_per_batch

    def on_validation_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.flops_per_batch = None  # ThroughputMonitor reads it on held-out batches too: no count, no FLOP/s

    def on_test_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.flops_per_batch = None  # the last training batch's forward + backward is no held-out batch's

    def training_step(self, batch: dict, batch_idx: int):
        self._count_skipped(batch)
        skipped = "input_ids" not in batch  # every sample of this batch was skipped
        self.fit_counts["batches"] += 1
        self.fit_counts["samples"] += len(batch["ids"])
        teaches = not skipped and self._teaches(batch)
        if not skipped and not teaches and not self._said_untaught:
            self._said_untaught = True
            log.warning(
                "a training batch without clips (%s): its text passes through the LLM alone, which is frozen, so it "
                "trains nothing and is passed over (on several processes, at zero weight); leave text-only "
                "samples out of a fit that trains only the visual parts",
                batch["ids"][:3],
            )
        if not teaches and not self._in_step():
            self._log_step_loss(0.0, 0.0, len(batch.get("ids", [])))
            return None  # Lightning skips the step
        if skipped:
            loss = self._empty_loss(batch)
        else:
            if not (batch["labels"] != IGNORE_INDEX).any():
                raise ValueError(
                    f"no supervised token in the training batch {batch['ids']}: every answer was masked out, so "
                    "the loss would be a silent zero (check the chat template and the conversations)"
                )
            self._keep_stand_in(batch, "train")
            self._count_video_tokens(batch)
            loss = self._loss(batch)
        # the mean over the processes that had samples: the global batch's loss under DDP (none: nothing logged,
        # and Lightning's logger rows repeat the last value logged);
        # a skipped batch adds zero, not its stand-in's loss
        value = torch.zeros((), device=loss.device) if skipped else loss.detach().float()
        new_skips = len(self.skipped) - self._skipped_counted  # held-out ones since the last step included
        self._skipped_counted = len(self.skipped)
        total, count, teaching, skips = self._sum_over_processes(
            value, 0.0 if skipped else 1.0, float(teaches), float(new_skips)
        )
        if not torch.isfinite(total):  # a NaN or an infinity on any process makes the sum they all share one
            self._stop_on_non_finite(value, batch)
        self._stepped += teaching
        if self._skipped_total is None:
            self._skipped_total = float(len(self.skipped_before))
        self._skipped_total += skips
        self.log("data/skipped", self._skipped_total, batch_size=max(len(batch["ids"]), 1))
        self._log_step_loss(total, count, len(batch["ids"]))
        if self._deepspeed() is not None:
            # Lightning divides the loss by the accumulation, and DeepSpeed's engine divides it again in its backward
            # (Lightning-AI/pytorch-lightning#6170): undone once, the step's gradient is the global batch's mean, as
            # under DDP, and gradient clipping sees it at that size whatever the world size makes the accumulation
            loss = loss * self.trainer.accumulate_grad_batches
        return loss

    def _log_step_loss(self, total: torch.Tensor | float, count: float, size: int) -> None:
        """Adds a micro-batch's loss (summed over the processes that had samples, and their count) to the step's,
        and logs the step's mean once its last micro-batch is in: Lightning writes a step's metrics at its end, so
        a figure logged at each micro-batch was the last one's alone under gradient accumulation."""
        step_total, step_count = self._step_loss
        self._step_loss = (step_total + total, step_count + count)
        if self._trainer is not None and self.trainer.fit_loop.epoch_loop._should_accumulate():
            return
        step_total, step_count = self._step_loss
        self._step_loss = (0.0, 0.0)
        if step_count > 0:
            self.log("train/loss", step_total / step_count, prog_bar=True, batch_size=max(size, 1))

    def _stop_on_non_finite(self, value: torch.Tensor, batch: dict) -> None:
        """Stops the fit before a non-finite loss is backpropagated: its gradients would make every trained weight
        NaN at the next optimizer step, and every later checkpoint with them. Every process comes here at the same
        micro-batch (they share the loss's sum), so the gather of which batches it was, the only collective, is
        made by all of them; the checkpoints written before stay as they were."""
        own = (float(value), list(batch.get("ids", []))) if not torch.isfinite(value) else None
        rows = [own]
        if self._world() > 1:
            import torch.distributed as dist

            rows = [None] * self._world()
            dist.all_gather_object(rows, own)
        found = [
            f"{row[0]} for the samples {row[1]}" + (f" on process {rank}" if len(rows) > 1 else "")
            for rank, row in enumerate(rows)
            if row is not None
        ]
        raise NonFiniteLossError(
            f"the training loss is not finite at step {self.trainer.global_step}: {'; '.join(found)}. The fit stops "
            "before it reaches the weights, and the checkpoints written before stay: check those samples (their "
            "media and conversations) or lower the learning rates (model.lr), then resume from checkpoints/last.ckpt "
            "where one was written"
        )

    def _teaches(self, batch: dict) -> bool:
        """Whether the batch's loss reaches a trainable parameter: one without clips passes through the LLM alone."""
        return batch.get("pixel_values") is not None or any(p.requires_grad for p in self.net.llm.parameters())

    def on_before_optimizer_step(self, optimizer) -> None:
        """An optimizer step whose every micro-batch on every process was skipped (or, without clips, reached no
        trainable parameter: `_teaches`) is no step: its zero gradients
        are dropped, so that AdamW leaves the weights, its moments and its step count as they were (a zero gradient
        would still move them by the momentum and the weight decay), and the learning-rate schedule does not
        advance (`lr_scheduler_step`). Every process counts the same (the count is all-reduced), so they all decide
        alike. DeepSpeed's engine keeps its gradients apart: there the step runs."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        self._empty_step = self._stepped == 0 and not isinstance(self.trainer.strategy, DeepSpeedStrategy)
        if self._empty_step:
            optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: no sample of any process reached a trainable parameter (all skipped, or text "
                        "through a frozen LLM): the weights are left as they were", self.trainer.global_step)  # fmt: skip
        self._stepped = 0.0

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """The schedule counts the optimizer steps that moved the weights (see `on_before_optimizer_step`)."""
        if self._empty_step:
            return
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def _sum_over_processes(self, value: torch.Tensor, *weights: float) -> tuple:
        """(sum over processes of value, then of each weight): one all-reduce, called by every process; on one
        process no device work (the weights are known here, and reading them back from a GPU would wait on the
        step)."""
        if self._world() == 1:
            return (value, *weights)
        stats = torch.stack([value.float().reshape(()), *(value.new_tensor(w, dtype=torch.float32) for w in weights)])
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        return (stats[0], *stats[1:].tolist())

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_count = 0.0, 0.0  # this process's sum of token losses, and labelled tokens

    def _join_visual_gathers(self, batch: dict) -> None:
        """Under ZeRO-3 on several processes, before a held-out batch without clips runs the LLM: a blank image
        through the visual parts, so that this process joins the parameter gathers of the others' batches with
        clips, in the order they make them (in training `_loss` does this, with a gradient)."""
        if batch.get("pixel_values") is None and self.net.zero3 and self._world() > 1:
            self._visual_at_zero_weight(batch["input_ids"].device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._count_skipped(batch)
        if "input_ids" in batch:
            self._keep_stand_in(batch, "val")
            self._join_visual_gathers(batch)
            batch = self._without_repeats(batch)
            loss = self.net(batch).detach().float()
            # the LLM's loss is the mean over the tokens it is asked to predict (the labels after the shift, as in
            # training): times their count it is their sum, which adds up over batches whatever their sizes; a
            # batch without any (its mean a NaN) adds nothing
            labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            self._val_sum = self._val_sum + torch.where(labelled > 0, loss * labelled, 0.0)
            self._val_count = self._val_count + labelled
        elif self.net.zero3 and self._world() > 1:  # the others' forward gathers parameters from this process too
            stand_in = self._stand_in(batch, "val")
            self._join_visual_gathers(stand_in)  # a text-only stand-in runs the visual parts too
            self.net(stand_in)

    def _without_repeats(self, batch: dict) -> dict:
        """On several processes Lightning shards the held-out set with a DistributedSampler (no shuffle), which
        pads the last shards with repeats of the first samples so that every process has as many batches (ZeRO-3's
        gathers need that). Sample i is first at padded place i, on process i % world; its repeats stand on other
        processes, and the batch comes back with their labels masked, so that val/loss counts each sample once:
        they still run the forward with the others. A batch without `positions` (another DataModule's) comes back
        as it is."""
        world, positions = self._world(), batch.get("positions")
        if world == 1 or positions is None:
            return batch
        repeats = torch.tensor([p % world != self.global_rank for p in positions])
        if not repeats.any():
            return batch
        labels = batch["labels"].masked_fill(repeats.to(batch["labels"].device)[:, None], IGNORE_INDEX)
        return {**batch, "labels": labels}  # the batch kept as a stand-in keeps its labels

    def on_validation_epoch_end(self) -> None:
        """val/loss, the mean loss of every labelled token of every process's held-out samples (each process
        validates its own shard), as training's loss is a micro-batch's: the same whatever the batch size and the
        number of processes. Summed across processes by all of them, so that a process whose batches were all
        skipped joins in with nothing."""
        value = torch.as_tensor(self._val_sum, dtype=torch.float32, device=self.device)
        total, count = self._sum_over_processes(value, float(self._val_count))
        if count > 0:
            self.log("val/loss", total / count, prog_bar=True, sync_dist=True)  # the same on every process

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Greedy answers to the held-out questions, parsed into letters where the question lists options (an
        open-ended one's reply is kept as it is, `pred` None); the questions whose sample could not be read are
        noted (`test_failed`), to be counted wrong."""
        self.test_failed += [{"key": key} for key in self._count_skipped(batch)]
        if "input_ids" not in batch:
            if self.net.zero3 and self._world() > 1:  # as in validation: generate along, discard the replies
                stand_in = self._stand_in(batch, "test")
                self._join_visual_gathers(stand_in)
                self.net.generate(stand_in, max_new_tokens=self.max_new_tokens)
            return
        self._keep_stand_in(batch, "test")
        self._join_visual_gathers(batch)
        tokens = self.net.generate(batch, max_new_tokens=self.max_new_tokens)
        replies = self.net.llm.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for sample_id, position, reply, answer, options in zip(
            batch["ids"], batch["positions"], replies, batch["answers"], batch["options"], strict=True
        ):
            pred = parse_choice(reply, options) if options else None
            self.results.append(
                {"id": sample_id, "position": position, "answer": answer, "pred": pred, "reply": reply,
                 "n_options": len(options)}
            )  # fmt: skip

    def on_fit_end(self) -> None:
        self._stand_ins.clear()

    def on_test_epoch_start(self) -> None:
        self.results = []
        self.test_failed = []

    def on_test_epoch_end(self) -> None:
        # over every process's answers (the distributed sampler's few repeats included; the run's summary has none)
        choices = [r for r in self.results if r["n_options"]]  # multiple-choice ones: open-ended have no letter
        correct = sum(r["pred"] == r["answer"] for r in choices)
        unparsed = sum(r["pred"] is None for r in choices)
        counts = torch.tensor([correct, unparsed, len(choices)], dtype=torch.float32, device=self.device)
        if self._world() > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self._stand_ins.clear()
        if counts[2] > 0:
            self.log("eval/synthetic/acc", float(counts[0] / counts[2]), rank_zero_only=True)
            self.log("eval/synthetic/n_unparsed", float(counts[1]), rank_zero_only=True)

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """The trainable parameters by learning rate: one group per trainable part, and `injection` (when
        model.lr has it) for the compressor's parameters that exist only because it reads a guide."""
        groups: dict[str, dict[str, nn.Parameter]] = {}
        for name, module in self.parts().items():
            if name not in self.trainable:
                continue
            for pname, param in module.named_parameters():
                if not param.requires_grad:  # a part's modules that nothing reads (`unread`): not optimized
                    continue
                guided = name == "compressor" and (
                    pname in self.guide_only if self.guide_only is not None else module.is_guide_parameter(pname)
                )
                groups.setdefault("injection" if guided and "injection" in self.lr else name, {})[pname] = param
        return groups

    def optimizer_groups(self) -> list[dict]:
        """AdamW's groups: one per entry of `parameter_groups`, at its learning rate. With weight decay, a group's
        biases, norm weights and scalars (parameters of fewer than two dimensions) go into a group of their own
        without it (`<name>/no_decay`), as HF's Trainer leaves biases and LayerNorm weights undecayed."""
        out = []
        for key, params in self.parameter_groups().items():
            if not self.weight_decay:
                out.append({"params": list(params.values()), "lr": self.lr[key], "name": key})
                continue
            decayed, plain = [], []
            for param in params.values():  # a ZeRO-3 parameter's own shape is its ds_shape (its data is a shard)
                (plain if len(getattr(param, "ds_shape", param.shape)) < 2 else decayed).append(param)
            if decayed:
                out.append({"params": decayed, "lr": self.lr[key], "name": key, "weight_decay": self.weight_decay})
            if plain:
                out.append({"params": plain, "lr": self.lr[key], "name": f"{key}/no_decay", "weight_decay": 0.0})
        return out

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.optimizer_groups(), weight_decay=self.weight_decay, betas=self.betas)
        total = int(self.trainer.estimated_stepping_batches)
        self._check_whole_steps()
        self.schedule = {"warmup_steps": warmup_steps(self.warmup_ratio, total), "total_steps": total}
        scheduler = get_cosine_schedule_with_warmup(optimizer, self.schedule["warmup_steps"], total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_whole_steps(self) -> None:
        """Where the strategy accumulates gradients inside its engine (DeepSpeed), an epoch of whole optimizer
        steps: the engine then steps where Lightning counts a step, and the schedule's total
        (estimated_stepping_batches) is the steps taken (why it matters: VideoQADataModule._step_samples). The
        training loader cuts its epochs so; a batch limit can still end one inside a step, and is refused.
        fast_dev_run, one batch through every hook, is let through."""
        trainer = self.trainer
        batches, accumulation = trainer.num_training_batches, trainer.accumulate_grad_batches
        if not trainer.strategy.handles_gradient_accumulation or trainer.fast_dev_run or not math.isfinite(batches):
            return
        if batches % accumulation:
            raise ValueError(
                f"an epoch of {batches} training batches ends inside an optimizer step of {accumulation} batches, and "
                f"the strategy ({type(trainer.strategy).__name__}) accumulates gradients inside its engine, which "
                f"never steps part-way: the last {batches % accumulation} batches' gradients would not be applied, or "
                "would join the next epoch's first step, and the engine's steps would drift from the schedule's. Set "
                f"trainer.limit_train_batches to a multiple of {accumulation}"
            )
