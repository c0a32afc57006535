"""A GPU machine's smoke test before the real weights and data: random weights at the real sizes, generated clips.

    python -m hicom.gpu_check --out DIR [--llm qwen2.5_0.5b_instruct ...]   # then: bash DIR/run.sh

Writes into DIR:
- `weights/<arch>/`: HF folders with random weights at the sizes of the bundled architectures (hicom/arch/): the
  SigLIP-so400m towers at 384 px and each `--llm` (Qwen2.5 widths; a 512-token vocabulary, so the embeddings are
  smaller than the real ones), written by the tiny writers (hicom/tiny.py) at those sizes, on the GPU where there
  is one;
- `data/`: generated clips (hicom.data.synthetic) and their first frames as images, with three LLaVA-format
  mixtures (images for stage 1, clips for stage 2, both for stage 3) and a held-out one;
- `run.sh`: the recipe's three stages (`experiment=directg_local43_global32`, global batches lowered to fit the
  clips) on the first LLM, a stage-2 fit at 32 frames on each LLM, and evaluate.py over the demo benchmarks.

What it shows is that the machine runs the code paths (DeepSpeed, bf16, attention kernels, decoding, generation)
and what a step costs in time and memory (each run's summary: `samples_per_second`, `gpu_peak_memory_gib`). The
weights are random: accuracies mean nothing. README "Checked on one GPU" gives one H100's figures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from hicom.dry_run import ARCH_DIR
from hicom.tiny import SIGLIP_FILES, TinyQwen2, TinySiglip
from hicom.utils.config import hydra_path

VISION_ARCH = "siglip_so400m_patch14_384"
LLM_ARCHS = sorted(p.stem for p in ARCH_DIR.glob("qwen2.5_*.json"))


def siglip_spec(arch: dict) -> TinySiglip:
    """The tiny SigLIP writer at an architecture's sizes (its text tower the vision tower's width and depth, as in
    so400m; the vocabulary is the writer's own)."""
    vision, text = arch["vision_config"], arch["text_config"]
    shared = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if any(vision[key] != text[key] for key in shared):
        raise ValueError(f"{VISION_ARCH}: the writer builds both towers at one size; these differ")
    return TinySiglip(
        hidden_size=vision["hidden_size"],
        intermediate_size=vision["intermediate_size"],
        num_layers=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        text_max_length=text["max_position_embeddings"],
        files_version=SIGLIP_FILES,
    )


def qwen_spec(arch: dict) -> TinyQwen2:
    """The tiny Qwen2 writer at an architecture's sizes (Qwen2.5's init scale; the writer's 512-token vocabulary)."""
    return TinyQwen2(
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_layers=arch["num_hidden_layers"],
        num_heads=arch["num_attention_heads"],
        num_kv_heads=arch["num_key_value_heads"],
        max_position_embeddings=arch["max_position_embeddings"],
        initializer_range=arch.get("initializer_range", 0.02),
    )


def write_weights(out: Path, llms: list[str]) -> dict[str, Path]:
    """Random HF folders for the vision tower and each LLM: built on the GPU where there is one (minutes on a CPU
    at 7B), the LLMs in bf16 (a 7B folder is 13 GB), the tower in fp32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = {}
    for name in (VISION_ARCH, *llms):
        arch = json.loads((ARCH_DIR / f"{name}.json").read_text())
        spec = siglip_spec(arch) if name == VISION_ARCH else qwen_spec(arch)
        start = time.perf_counter()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32 if name == VISION_ARCH else torch.bfloat16)
        try:
            with torch.device(device):
                folders[name] = spec(out / name)
        finally:
            torch.set_default_dtype(previous)
        print(f"{name}: {folders[name]} ({time.perf_counter() - start:.1f} s)", flush=True)
    return folders


def write_data(out: Path, clips: int = 48) -> Path:
    """Generated clips and images in three stage mixtures and a held-out one, paths relative to `out`."""
    from PIL import Image

    from hicom.data.synthetic import SyntheticVideoQA, build_sample

    spec = SyntheticVideoQA(num_train=clips, num_val=8, num_frames=16, size=128, question_types=["mark_of_colour"])
    splits = spec.prepare(out / "clips")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    image_records = []
    for i, record in enumerate(json.loads(splits.train_json.read_text())):
        name = record["video"].replace("/", "_").replace(".mp4", ".jpg")
        frames, _ = build_sample(spec, "train", i)  # the clip's frames as generated: its first is the image
        Image.fromarray(frames[0]).save(images / name)
        human, answer = record["conversations"]
        human = human | {"value": human["value"].replace("<video>", "<image>")}
        image_records.append({"id": f"image-{record['id']}", "image": name, "conversations": [human, answer]})
    (out / "images.json").write_text(json.dumps(image_records))
    clips_dir = splits.root.relative_to(out)
    video = (f"{clips_dir}/train.json", f"{clips_dir}/videos")
    mixtures = {
        "stage1.yaml": [("images.json", "images")],
        "stage2.yaml": [video],
        "stage3.yaml": [video, ("images.json", "images")],
        "val.yaml": [(f"{clips_dir}/val.json", f"{clips_dir}/videos")],
    }
    for name, entries in mixtures.items():
        lines = ["datasets:"]
        for annotation_file, root in entries:
            lines += [f"  - json_path: {annotation_file}", f"    data_root: {root}", "    sampling_strategy: all"]
        (out / name).write_text("\n".join(lines) + "\n")
    return out


def run_script(out: Path, vision: Path, llms: dict[str, Path], python: str) -> str:
    """The runs, one command each, every one started whatever the one before did; logs under `out`/logs, in run
    folders named by the launch's time (a second launch measures again, where fixed names resumed the finished
    runs and printed their figures), on one GPU (`devices: auto` would take every GPU of the node, for which the
    global batches here are too small)."""
    data = out / "data"
    q = shlex.quote
    common = [
        "experiment=directg_local43_global32",
        hydra_path("model.vision.path", vision),
        "model.vision.arch=null",
        "model.llm.arch=null",
        hydra_path("paths.data_dir", data),
        "logger=csv",
        "trainer.devices=1",
    ]
    first = next(iter(llms.values()))
    recipe = [
        *common,
        hydra_path("model.llm.path", first),
        *(hydra_path(f"stages.{i}.config.data.source.train", data / f"stage{i + 1}.yaml") for i in range(3)),
        hydra_path("+stages.2.config.data.source.val", data / "val.yaml"),
        # one GPU's optimizer steps, within write_data's samples a stage (under DeepSpeed an epoch of fewer than
        # one step's samples stops the run): 48 images, 48 clips, 96 of both
        "stages.0.global_batch_size=32",
        "stages.1.global_batch_size=16",
        "stages.2.global_batch_size=4",
        "trainer.limit_train_batches=6",
    ]
    lines = [
        "#!/usr/bin/env bash",
        "# Written by python -m hicom.gpu_check: each run's summary table ends its log (random weights: time and",
        "# memory are the figures, accuracies mean nothing).",
        "set -u",
        f"cd {q(str(Path(__file__).resolve().parents[1]))}",
        "stamp=$(date +%Y-%m-%d_%H-%M-%S)  # this launch: its runs are logs/train/runs/<name>-$stamp",
        f"export HICOM_LOGS={q(str(out / 'logs'))}",
        "status=0",
        'run() { echo "== $1"; shift; "$@"; local rc=$?; [ "$rc" -eq 0 ] || { status=1; echo "== failed: exit $rc"; }; }',
        f"run 'recipe, three stages, {first.name}' env HICOM_RUN_STAMP=\"recipe-$stamp\" {python} train.py "
        + " ".join(q(arg) for arg in recipe),
    ]
    for name, folder in llms.items():
        fit = [
            *common,
            "stages=null",
            hydra_path("model.llm.path", folder),
            hydra_path("data.source.train", data / "stage2.yaml"),
            "model.trainable=[compressor]",
            "data.num_frames=32",
            "data.batch_size=8",
            "global_batch_size=16",
            "trainer.limit_train_batches=6",
            "evaluate=false",
        ]
        lines.append(
            f"run 'stage 2 at 32 frames, micro batch 8, {name}' env HICOM_RUN_STAMP=\"stage2-{name}-$stamp\" "
            f"{python} train.py " + " ".join(q(arg) for arg in fit)
        )
    benchmarks = f"[{','.join(configured_benchmarks())}]"  # every one the demo writes a stand-in for
    ckpt = hydra_path("ckpt", out / "logs/train/runs/recipe-STAMP").split("STAMP")  # the stamp from bash, unquoted
    lines += [
        f"run 'demo benchmarks' {python} -m hicom.eval.demo {q(hydra_path('paths.data_dir', out / 'demo'))}",
        f"run 'evaluate.py on the recipe run' {python} evaluate.py "
        f'{q(ckpt[0])}"$stamp"{q(ckpt[1])} {q(hydra_path("paths.data_dir", out / "demo"))} '
        f"{q('benchmark=' + benchmarks)} max_new_tokens=8",
        "exit $status",
    ]
    return "\n".join(lines) + "\n"


def configured_benchmarks() -> list[str]:
    """The benchmarks configs/evaluate.yaml configures (the SPEC's eight and a question file of one's own)."""
    from omegaconf import OmegaConf

    from hicom.utils.config import project_root

    return list(OmegaConf.load(Path(project_root()) / "configs" / "evaluate.yaml").benchmarks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the folder for weights, data, run.sh and logs")
    parser.add_argument(
        "--llm",
        nargs="+",
        choices=LLM_ARCHS,
        default=["qwen2.5_0.5b_instruct"],
        help="LLM widths (the first also runs the three stages; at 7B width stage 3 needs more than one GPU)",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    folders = write_weights(out / "weights", args.llm)
    write_data(out / "data")
    script = out / "run.sh"
    llms = {name: folders[name] for name in args.llm}
    script.write_text(run_script(out, folders[VISION_ARCH], llms, shlex.quote(sys.executable)))
    script.chmod(0o755)
    print(f"wrote {out}; run: bash {script}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
