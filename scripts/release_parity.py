"""Compare our compressors with the public HICom release on the same inputs and weights.

    python scripts/release_parity.py --release-src PATH_TO_RELEASE_CHECKOUT [--out DIR]

The release's projector (PATH/hicom/model/projector.py) runs in a separate process, imported by file path, never
copied into our tree. For every projector config in CONFIGS it is built, its weights randomised (seeded), and run on
a few clip shapes; configs or shapes it cannot run (its grouping crashes at some sizes, SPEC 3) are recorded as such.
Each config's weights are written as an official checkpoint folder (config.json + mm_projector.safetensors with
model.mm_projector.* names), which `hicom.compat.official.load_official` then loads; our `compress` runs on the same
inputs and the largest differences, relative to the output's largest magnitude, are printed one line per config:
ours against the release in fp32, our module and the release's each run in float64 against each other, and each
side's fp32 result against its own float64 one. A config matches when the two float64 results agree to 1e-5 (the
same math: the release keeps some float32 values, e.g. its position table, even in float64) and the fp32 results
are within 1e-5, or within twice the two sides' own rounding (clip-scale logits and nearly tied scores amplify
it); a release that cannot run in float64 is judged by the fp32 bound alone.

Ours runs under `gathered_keys()`: the local branch dots each cell's query with each of its gathered keys, as the
release does, rather than reading runs of keys in place (our default; the tests check that both orders give the
same results, at fp64 to 1e-12). With random weights some configs reach local scores in the thousands that are
nearly tied (e.g. 1933.956 and 1933.586, where one fp32 step is 1.2e-4), and there any other summation order
moves the output by up to a few 1e-5 relative; the default order's difference is printed after each line.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import subprocess
import sys
import tempfile
import types
from pathlib import Path

NAMES = [
    "local43_global32",
    "local43_adaptkv_global32",
    "local43_global32_coarse",
    "local43_adaptkv_global32_coarse",
    "local43_adaptqkvg_global32_adaptg",
    "local43_guidecoarse_global32_guidefine",
    "local43_guidefine_global32_guidecoarse",
    "local22_global16_guidecoarse",
    "local44",
    "local412",
    "global32",
    "mlp2x_gelu",
]
USE_GUIDE = ["direct", "coarse", "fine", None]
CLIP_SCALE = ["", "local", "global", "local,global"]
# (T, H, W, modality): divisible, an image, the release's overlapping groups, small and odd grids
SHAPES = [(8, 27, 27, "video"), (1, 27, 27, "image"), (7, 27, 27, "video"), (3, 10, 10, "video"), (2, 1, 1, "video")]
WIDTH, LLM_WIDTH, GUIDE_TOKENS = 1152, 64, 6  # the release fixes the SigLIP so400m width


def configs() -> list[dict]:
    out = []
    for name, guide, scale in itertools.product(NAMES, USE_GUIDE, CLIP_SCALE):
        if name.startswith("mlp") and (guide is not None or scale):
            continue
        out.append(
            dict(
                mm_projector_type=name,
                use_guide=guide,
                use_clip_scale=scale,
                mm_hidden_size=WIDTH,
                hidden_size=LLM_WIDTH,
            )
        )
    return out


# the largest difference, relative to the output's scale, between our float64 result and the release's that counts as
# the same math: the release keeps some values in float32 whatever its module's dtype (its global branch's position
# table), which leaves its float64 run up to 9.9e-7 from ours; a difference of meaning is orders larger
MATH_TOLERANCE = 1e-5
# fp32 results that close count as equal whatever their rounding
FP32_TOLERANCE = 1e-5


def release_side(src: Path, work: Path) -> None:
    """Runs in its own process: the release's projector module, loaded by path, with two small shims for parts
    of its package that the projector imports but we do not load (post-processing is a flatten for its configs)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    if not hasattr(transformers, "TRANSFORMERS_CACHE"):  # removed from newer transformers; only used for downloads
        transformers.TRANSFORMERS_CACHE = str(work / "unused-cache")
    package = types.ModuleType("hicom")
    package.__path__ = []
    mm_utils = types.ModuleType("hicom.mm_utils")
    mm_utils.post_process_visual_feature = lambda config, x, modal, newline, is_anyres: x.reshape(-1, x.shape[-1])
    sys.modules.update({"hicom": package, "hicom.mm_utils": mm_utils})
    spec = importlib.util.spec_from_file_location("release_projector", src / "hicom" / "model" / "projector.py")
    projector = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(projector)

    torch.manual_seed(0)
    inputs = {}
    for i, (t, h, w, _) in enumerate(SHAPES):
        inputs[f"features/{i}"] = torch.randn(t, h, w, WIDTH)
        inputs[f"embeds/{i}"] = torch.randn(t, h, w, WIDTH)
    inputs["guide/pooled"] = torch.randn(WIDTH)
    inputs["guide/tokens"] = torch.randn(GUIDE_TOKENS, WIDTH)
    save_file(inputs, work / "inputs.safetensors")
    tower = work / "siglip-so400m-patch14-384"  # the release reads its widths from this folder name
    results = []
    for index, config in enumerate(configs()):
        ns = types.SimpleNamespace(**config, mm_vision_tower=str(tower))
        record = {"config": config, "outputs": {}, "errors": {}}
        try:
            module = projector.build_vision_projector(ns).eval()
        except Exception as error:  # noqa: BLE001 - recorded: configs the release cannot build
            record["build_error"] = f"{type(error).__name__}: {error}"
            results.append(record)
            continue
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, p in module.named_parameters():
                noise = torch.randn(p.shape, generator=generator)
                if name.endswith("alpha"):
                    p.copy_(torch.rand(p.shape, generator=generator) * 0.6 + 0.2)
                elif name.endswith("logit_scale"):
                    p.copy_(math.log(10.0) + 0.1 * noise)
                elif name.endswith("logit_bias"):
                    p.copy_(-10.0 + noise)
                else:
                    p.add_(0.05 * noise if p.ndim > 1 else 0.1 * noise)
        folder = work / f"config{index:03d}"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        weights = {f"model.mm_projector.{k}": v.contiguous() for k, v in module.state_dict().items()}
        save_file(weights, folder / "mm_projector.safetensors")
        guide = inputs["guide/tokens"] if config["use_guide"] == "fine" else inputs["guide/pooled"]
        guided = config["use_guide"] is not None
        outputs, exact = {}, {}
        wide = copy.deepcopy(module).double()  # the release's own math in float64: what ours must equal
        for i, (_, _, _, modality) in enumerate(SHAPES):
            features = inputs[f"features/{i}"]
            embeds = inputs[f"embeds/{i}"] if guided else None
            try:
                with torch.no_grad():
                    outputs[f"{i}"] = _release_run(module, config, features, embeds, guide, modality)
            except Exception as error:  # noqa: BLE001 - recorded: shapes the release cannot run
                record["errors"][str(i)] = f"{type(error).__name__}: {str(error)[:120]}"
                continue
            try:
                with torch.no_grad():
                    as_double = (x.double() if x is not None else None for x in (features, embeds, guide))
                    exact[f"{i}"] = _release_run(wide, config, *as_double, modality)
            except Exception as error:  # noqa: BLE001 - a part fixed to float32: judged in float32 alone
                record["errors64"] = f"{type(error).__name__}: {str(error)[:120]}"
        if outputs:
            save_file(outputs, folder / "release_outputs.safetensors")
        if exact and len(exact) == len(outputs):  # beside the folder: load_official reads the folder's files
            save_file(exact, work / f"{folder.name}.release64.safetensors")
        record["outputs"] = sorted(outputs)
        results.append(record)
    (work / "release.json").write_text(json.dumps(results, indent=1))


def _release_run(module, config: dict, features, embeds, guide, modality: str):
    """The release projector's output for one clip, as its model calls it (the LLaVA baseline's pooling for `mlp*`
    names, hicom_arch.py)."""
    import torch

    guided = config["use_guide"] is not None
    if config["mm_projector_type"].startswith("mlp"):
        x = module(features)
        if modality == "video":
            size = [x.shape[0], math.ceil(x.shape[1] / 2), math.ceil(x.shape[2] / 2)]
            x = torch.nn.functional.interpolate(x.permute(3, 0, 1, 2)[None], size=size, mode="trilinear")
            x = x[0].permute(1, 2, 3, 0)
        return x.reshape(-1, x.shape[-1]).contiguous()
    return module(features, embeds, guide if guided else None, modality).contiguous()


def our_side(work: Path) -> int:
    import torch
    from safetensors.torch import load_file

    from hicom.compat.official import load_official
    from hicom.modules.compressors.local import gathered_keys

    inputs = load_file(work / "inputs.safetensors")
    worst, failures, compared, skipped = 0.0, 0, 0, 0
    for index, record in enumerate(json.loads((work / "release.json").read_text())):
        config = record["config"]
        label = f"{config['mm_projector_type']:42s} use_guide={config['use_guide']!s:7s} clip={config['use_clip_scale']!r:15s}"
        if "build_error" in record or not record["outputs"]:
            skipped += 1
            why = record.get("build_error") or "; ".join(sorted(set(record["errors"].values())))[:90]
            print(f"{label} release cannot run it: {why}")
            continue
        folder = work / f"config{index:03d}"
        module = load_official(folder).eval()
        expected = load_file(folder / "release_outputs.safetensors")
        wide = work / f"{folder.name}.release64.safetensors"
        expected64 = load_file(wide) if wide.is_file() else None
        guide = inputs["guide/tokens"] if config["use_guide"] == "fine" else inputs["guide/pooled"]
        guided = config["use_guide"] is not None
        exact = copy.deepcopy(module).double()  # our math in float64: how far each fp32 result is from exact
        diffs, ours_err, release_err, default_diffs, math_gap = [], [], [], [], []
        for key, reference in expected.items():
            i = int(key)
            args = (
                inputs[f"features/{i}"],
                inputs[f"embeds/{i}"] if guided else None,
                guide if guided else None,
            )
            with torch.no_grad():
                with gathered_keys():
                    ours = module.compress(*args, SHAPES[i][3])
                default = module.compress(*args, SHAPES[i][3])
                truth = exact.compress(*(a.double() if a is not None else None for a in args), SHAPES[i][3])
            if ours.shape != reference.shape:
                diffs.append(float("inf"))
                continue
            scale = truth.abs().max().clamp_min(1e-30)
            diffs.append(((ours - reference).abs().max() / scale).item())
            ours_err.append(((ours - truth).abs().max() / scale).item())
            default_diffs.append(((default - reference).abs().max() / scale).item())
            if expected64 is not None:  # each side's fp32 against its own float64; the two float64s against each other
                release_err.append(((reference - expected64[key]).abs().max() / scale).item())
                math_gap.append(((truth - expected64[key]).abs().max() / scale).item())
        compared += 1
        rel, ours_off = max(diffs), max(ours_err, default=0.0)
        release_off = max(release_err, default=float("nan"))
        worst = max(worst, rel)
        if expected64 is not None:
            # the same math (the two float64 results agree far below fp32's step), and the fp32 results as close
            # as the two sides' own rounding allows
            gap = max(math_gap, default=0.0)
            ok = gap < MATH_TOLERANCE and rel <= max(FP32_TOLERANCE, 2 * (ours_off + release_off))
            against = (
                f"float64 ours-release {gap:.1e}; fp32 from own float64: ours {ours_off:.1e} release {release_off:.1e}"
            )
        else:  # the release does not run in float64: judged in fp32 alone
            ok = rel < FP32_TOLERANCE
            against = "release not run in float64"
        failures += not ok
        ran = f"{len(expected)}/{len(SHAPES)} shapes"
        print(
            f"{label} {ran}  ours-release {rel:.1e}  ({against})"
            f"  {'ok' if ok else 'MISMATCH'}  (default order: ours-release {max(default_diffs, default=0.0):.1e})"
        )
    print(f"\n{compared} configs compared, {skipped} the release cannot run, {failures} mismatches, worst {worst:.2e}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release-src", type=Path, required=True, help="a checkout of the public HICom repository")
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="keep the release's outputs already in --out")
    parser.add_argument("--side", choices=["release"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "release":
        release_side(args.release_src, args.out)
        return 0
    if not (args.release_src / "hicom" / "model" / "projector.py").is_file():
        parser.error(f"{args.release_src} has no hicom/model/projector.py: pass a checkout of the HICom release")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from hicom.tiny import SIGLIP_FILES, TinySiglip

        TinySiglip(files_version=SIGLIP_FILES)(
            work / "siglip-so400m-patch14-384"
        )  # only its logit scale and bias are read (clip scale)
        cmd = [
            sys.executable,
            __file__,
            "--side",
            "release",
            "--release-src",
            str(args.release_src),
            "--out",
            str(work),
        ]
        if not (args.reuse and (work / "release.json").is_file()):
            subprocess.run(cmd, check=True, cwd=work)
        return our_side(work)


if __name__ == "__main__":
    sys.exit(main())
