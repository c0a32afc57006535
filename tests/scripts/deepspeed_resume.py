"""Run by tests/test_zero3.py (DS_ACCELERATOR=cpu): train.py's fit under Lightning's DeepSpeedStrategy on the CPU
(tests/scripts/cpu_deepspeed.py), saving and resuming. Prints one JSON line: the checkpoint's module names and
size with the frozen weights left out and kept, and how each resume ended."""

import json
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(cache: str, out: str, zero_stage: str) -> None:
    from safetensors.torch import load_file

    from hicom.training import train
    from tests.conftest import SMALL, compose_train

    base = [
        *SMALL,
        f"strategy=deepspeed_zero{zero_stage}",
        "trainer.strategy._target_=tests.scripts.cpu_deepspeed.CPUDeepSpeedStrategy",
        "model.trainable=[compressor]",
        # the real LLMs' setting: under ZeRO-3 a frozen, checkpointed LLM is gathered again for the recompute, which
        # some DeepSpeed and torch versions fail (a CheckpointError on the re-partitioned frozen weights)
        "model.llm.gradient_checkpointing=true",
        "evaluate=false",
    ]

    def fit(name: str, *extra: str) -> dict:
        try:
            return {"steps": train(compose_train(Path(cache), Path(out) / name, [*base, *extra]))["steps"]}
        except Exception as error:  # the refusals under test
            return {"error": f"{type(error).__name__}: {error}"}

    def saved(name: str) -> dict:
        folder = (Path(out) / name / "checkpoints" / "last.ckpt").resolve()
        files = sorted(folder.rglob("*.pt"))
        (states,) = folder.glob("checkpoint/*model_states.pt")  # ZeRO-3 names it by its process too
        model = torch.load(states, map_location="cpu", weights_only=True)
        return {
            "bytes": sum(f.stat().st_size for f in files),
            "module": sorted(model["module"]),
            "frozen_left_out": sorted(model.get("frozen_left_out") or {}),
            "module_keys": sorted(model.get("module_keys") or []),
        }

    # under ZeRO-3 a loader worker started by forkserver too: the dataset it unpickles holds a copy of the
    # compressor, made before ZeRO-3 set its attributes that do not pickle on every module
    served = ["data.num_workers=1", "data.multiprocessing_context=forkserver"] if zero_stage == "3" else []
    report = {
        "first": fit("first", "trainer.max_steps=2", *served),
        "kept": fit("kept", "trainer.max_steps=2", "trainer.strategy.exclude_frozen_parameters=false", *served),
    }
    report["first_saved"], report["kept_saved"] = saved("first"), saved("kept")
    resume = [f"ckpt_path={Path(out) / 'first' / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=3"]
    report["resumed"] = fit("resumed", *resume, "trainer.max_steps=3")
    report["resumed_kept"] = fit(
        "resumed_kept", f"ckpt_path={Path(out) / 'kept' / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=3",
        "trainer.max_steps=3",
    )  # fmt: skip
    # the two runs differ only in what their checkpoints held: after the resumed step their weights agree
    handoffs = [load_file(str(Path(out) / name / "handoff.safetensors")) for name in ("resumed", "resumed_kept")]
    report["resumed_difference"] = max((handoffs[0][k] - handoffs[1][k]).abs().max().item() for k in handoffs[0])
    report["llm_trained"] = fit("llm_trained", *resume, "trainer.max_steps=3", "model.trainable=[compressor,llm]")
    # a checkpoint without a weight this model trains (as one of an older build would be): named, not skipped
    damaged = Path(out) / "damaged.ckpt"
    shutil.copytree((Path(out) / "first" / "checkpoints" / "last.ckpt").resolve(), damaged)
    (states,) = damaged.glob("checkpoint/*model_states.pt")
    model = torch.load(states, map_location="cpu", weights_only=True)
    dropped = "net.compressor.global_compressor.query"
    del model["module"][dropped]
    model["module_keys"].remove(dropped)
    torch.save(model, states)
    report["damaged"] = fit("damaged", f"ckpt_path={damaged}", "trainer.max_epochs=3", "trainer.max_steps=3")
    print("DEEPSPEED " + json.dumps(report), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:4])
