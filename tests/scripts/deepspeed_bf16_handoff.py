"""Run by tests/test_zero3.py (DS_ACCELERATOR=cpu): train.py's fit in bf16 under Lightning's DeepSpeedStrategy on
the CPU at each ZeRO stage given, the compressor trained. The engine holds the module in bf16 and steps fp32 masters
in its optimizer; prints one JSON line: per stage, the hand-off's dtypes and how far it lies from the masters and
from the module's bf16 copies; then, for a part the first of two stages trains and the second carries frozen,
how many of its tensors the second hands on as the first handed them; then how many tensors of a ZeRO 0 fit's
hand-off its one-process snapshot reproduces."""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(cache: str, out: str, *zero_stages: str) -> None:
    import torch
    from safetensors.torch import load_file

    from hicom.training import train
    from hicom.utils.checkpoints import full_parameters, optimizer_masters
    from tests.conftest import SMALL, compose_train

    report = {}
    for stage in zero_stages:
        built = []
        overrides = [
            *SMALL,
            f"strategy=deepspeed_zero{stage}",
            "trainer.strategy._target_=tests.scripts.cpu_deepspeed.CPUDeepSpeedStrategy",
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=2",
            "model.trainable=[compressor]",
            "evaluate=false",
        ]
        train(compose_train(Path(cache), Path(out) / stage, overrides), before_fit=built.append)
        model = built[0]
        handoff = load_file(str(Path(out) / stage / "handoff.safetensors"))
        masters = optimizer_masters(model.net.compressor, model.trainer.optimizers[0])
        with full_parameters(model.net.compressor):  # ZeRO-3 shards them
            copies = {k: v.detach().float().clone() for k, v in model.net.compressor.named_parameters()}
        report[stage] = {
            "dtypes": sorted({str(value.dtype) for value in handoff.values()}),
            "masters": len(masters),
            "parameters": len(copies),
            "from_masters": max((handoff[f"compressor.{k}"] - v).abs().max().item() for k, v in masters.items()),
            "from_copies": max((handoff[f"compressor.{k}"] - v).abs().max().item() for k, v in copies.items()),
        }
    print("BF16 " + json.dumps(report), flush=True)
    # a part an earlier stage trained, carried frozen by the next: the engine casts it to bf16 with the rest
    from hicom.stages import run_stages

    staged = [*SMALL, "experiment=tiny_stages", "stages.0.trainable=[compressor,llm]",
              "strategy=deepspeed_zero2", "trainer.strategy._target_=tests.scripts.cpu_deepspeed.CPUDeepSpeedStrategy",
              "trainer.precision=bf16-mixed", "trainer.limit_train_batches=2"]  # fmt: skip
    run_stages(compose_train(Path(cache), Path(out) / "staged", staged))
    first, second = (load_file(str(Path(out) / "staged/stages" / name / "handoff.safetensors"))
                     for name in ("alignment", "conditional"))  # fmt: skip
    carried = [key for key in first if key.startswith("llm.")]
    same = [key for key in carried if second[key].dtype == first[key].dtype and torch.equal(second[key], first[key])]
    print("CARRIED " + json.dumps({"carried": len(carried), "as_handed": len(same)}), flush=True)
    # a ZeRO 0 fit of the trunk, the compressor and the (tied) LLM, snapshotted in this one process from its checkpoint: the
    # fp32 masters its optimizer keeps whole in the model file, matched to the parameters by the optimizer's groups
    import yaml

    from hicom.snapshot import main as snapshot

    run = Path(out) / "zero0"
    fit = [*SMALL, "strategy=deepspeed_zero0", "trainer.strategy._target_=tests.scripts.cpu_deepspeed.CPUDeepSpeedStrategy",
           "trainer.precision=bf16-mixed", "trainer.max_steps=2", "evaluate=false",
           # the trunk trained under a pooling compressor: its layers after select_layer stay frozen, cast to bf16
           "model/compressor=avgpool", "model.trainable=[vision_trunk,compressor,llm]"]  # fmt: skip
    train(compose_train(Path(cache), run, fit))
    (run / ".hydra").mkdir()  # as Hydra records a launch
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"paths.cache_dir={cache}", *fit]))
    written = load_file(str(run / "handoff.safetensors"))
    taken = load_file(str(snapshot([str(run), f"out={Path(out) / 'zero0_snapshot'}"]) / "handoff.safetensors"))
    same = [key for key in written if key in taken and torch.equal(written[key], taken[key])]
    frozen = [key for key in written if key.startswith("vision_trunk.1.layers.1.")]  # the tiny tower's last layer
    dtypes = sorted({str(written[key].dtype) for key in written})
    print("ZERO0 " + json.dumps({"tensors": len(written), "equal": len(same), "keys": sorted(taken) == sorted(written),
                                 "frozen": len(frozen), "dtypes": dtypes}))  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:])
