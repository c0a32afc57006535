"""Run by tests/test_zero3.py under torchrun (2 processes, gloo, CPU): the tiny model under DeepSpeed ZeRO-3.

Checks that the loaded weights survive partitioning (the loss of one batch equals the unpartitioned model's) and
that a stage hand-off written from the partitioned model holds the whole tensors. Prints one JSON line on rank 0.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(cache: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    import deepspeed
    from safetensors.torch import load_file

    from hicom.stages import save_handoff
    from hicom.training import build
    from hicom.utils.checkpoints import untied_state
    from hicom.utils.instantiators import write_assets
    from tests.conftest import SMALL, compose_train

    torch.manual_seed(0)
    cfg = compose_train(
        Path(cache), Path(out) / "run", [*SMALL, "model.trainable=[compressor,llm,vision_head,guide_encoder]"]
    )
    if rank == 0:
        write_assets(cfg.assets)  # once, before any process reads them
    dist.barrier()
    model, datamodule = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    parts = ["llm", "vision_head", "guide_encoder", "compressor"]
    reference_loss = model.net(batch)
    reference_loss.backward()
    reference_loss = reference_loss.item()
    # One Adam step from zero state moves each weight by lr * g / (|g| + eps): the expected weights after the step.
    lr = 1e-3
    reference, gradient = {}, {}
    for part in parts:
        named = dict(model.parts()[part].named_parameters())
        for key, value in untied_state(model.parts()[part]).items():  # a tied weight once, as the hand-off writes
            param = named.get(key)
            grad = param.grad.clone() if param is not None and param.grad is not None else torch.zeros_like(value)
            dist.all_reduce(grad)  # each process has its own share of the data: the step takes the mean gradient
            grad /= dist.get_world_size()
            reference[f"{part}.{key}"] = value - lr * grad / (grad.abs() + 1e-8)
            gradient[f"{part}.{key}"] = grad
    model.zero_grad(set_to_none=True)

    model.net.prepare_zero3()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    config = {
        "train_micro_batch_size_per_gpu": len(batch["ids"]),
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    sharded = [p for p in model.parameters() if hasattr(p, "ds_id")]
    loss = engine.module.net(batch)
    engine.backward(loss)
    engine.step()
    # greedy replies of different lengths on the two processes: the shorter one keeps stepping with the other
    with torch.no_grad():
        replies = engine.module.net.generate(batch, max_new_tokens=2 + 6 * rank)
    dist.barrier()
    save_handoff(model, Path(out) / "handoff", parts, None, cfg, write=rank == 0)
    dist.barrier()
    if rank == 0:
        written = load_file(str(Path(out) / "handoff" / "handoff.safetensors"))
        report = {
            "world_size": dist.get_world_size(),
            "sharded_parameters": len(sharded),
            "local_numel": sum(p.numel() for p in sharded),
            "full_numel": sum(p.ds_numel for p in sharded),
            "reference_loss": reference_loss,
            "zero3_loss": loss.item(),
            "handoff_keys_match": sorted(written) == sorted(reference),
            # where the gradient is clearly non-zero (|g| > 1e-4) the step is lr * sign(g): compare there
            "handoff_max_difference": max(
                ((written[k] - reference[k]).abs() * (gradient[k].abs() > 1e-4)).max().item() for k in reference
            ),
            "moved_parameters": sum(int((gradient[k].abs() > 1e-4).sum()) for k in reference),
            "generated_tokens": replies.shape[1],
        }
        print("ZERO3 " + json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1], sys.argv[2])
