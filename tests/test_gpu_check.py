"""The GPU smoke test's set-up (hicom/gpu_check.py), on CPU: the writers at the bundled architectures' sizes, the
generated data and mixtures, and the run script. Its runs themselves need a GPU (the recipe's trainer=gpu)."""

import inspect
import json
import re
import subprocess

import pytest

from hicom import gpu_check
from hicom.data.index import SampleIndex, read_mixture


def test_the_writers_take_the_bundled_architectures_sizes():
    arch = json.loads((gpu_check.ARCH_DIR / f"{gpu_check.VISION_ARCH}.json").read_text())
    siglip = gpu_check.siglip_spec(arch)
    assert (siglip.hidden_size, siglip.num_layers, siglip.num_heads, siglip.image_size, siglip.patch_size) == (
        1152, 27, 16, 384, 14,
    )  # fmt: skip
    qwen = gpu_check.qwen_spec(json.loads((gpu_check.ARCH_DIR / "qwen2.5_7b_instruct.json").read_text()))
    assert (qwen.hidden_size, qwen.intermediate_size, qwen.num_layers, qwen.num_heads, qwen.num_kv_heads) == (
        3584, 18944, 28, 28, 4,
    )  # fmt: skip
    assert "qwen2.5_0.5b_instruct" in gpu_check.LLM_ARCHS and "qwen2.5_7b_instruct" in gpu_check.LLM_ARCHS
    arch["text_config"]["hidden_size"] = 768
    with pytest.raises(ValueError, match="both towers at one size"):
        gpu_check.siglip_spec(arch)


SPEC_BENCHMARKS = [
    "mvbench",
    "videomme",
    "videomme_subs",
    "egoschema",
    "mlvu",
    "activitynet_qa",
    "msvd_qa",
    "msrvtt_qa",
]


def test_the_data_and_the_run_script(tmp_path):
    data = gpu_check.write_data(tmp_path / "data", clips=4)
    sizes = {}
    for name in ("stage1", "stage2", "stage3", "val"):
        index = SampleIndex.build(read_mixture(data / f"{name}.yaml", data))
        sizes[name] = len(index)
        for i in range(len(index)):
            record = index.record_of(i)
            media = record.get("video") or record.get("image")
            assert (index.root_of(i) / media).is_file()
    assert sizes == {"stage1": 4, "stage2": 4, "stage3": 8, "val": 8}
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = tmp_path / "run's ünï [1]"  # a quote, a space, accents and brackets: each path is quoted for Hydra too
    llms = {"qwen2.5_0.5b_instruct": out / "q05", "qwen2.5_7b_instruct": out / "q7"}
    script = gpu_check.run_script(out, out / "siglip", llms, "python")
    assert script.count(" train.py ") == 3 and " evaluate.py " in script
    recipe, *fits = [shlex.split(line) for line in script.splitlines() if " train.py " in line]
    evaluate = next(shlex.split(line) for line in script.splitlines() if " evaluate.py " in line)
    parse = OverridesParser.create().parse_overrides
    values = [{o.key_or_group: o.value() for o in parse(args[args.index(s) + 1 :])} for args, s in
              [(recipe, "train.py"), (fits[0], "train.py"), (evaluate, "evaluate.py")]]  # fmt: skip
    assert values[0]["model.llm.path"] == str(out / "q05")  # the recipe runs on the first LLM
    assert values[0]["stages.0.config.data.source.train"] == str(out / "data" / "stage1.yaml")
    assert values[1]["model.vision.path"] == str(out / "siglip")
    assert values[2]["ckpt"] == str(out / "logs/train/runs/recipe-$stamp")  # as bash is given it
    assert values[2]["benchmark"] == [*SPEC_BENCHMARKS, "own"]  # every benchmark the demo writes
    assert all(values[i]["trainer.devices"] == 1 for i in (0, 1))  # one GPU, whatever the node has
    # on one GPU each stage's optimizer step fits in the samples write_data gives it by default (48 images, 48
    # clips, both): under DeepSpeed an epoch of fewer stops the run after the models are loaded
    clips = inspect.signature(gpu_check.write_data).parameters["clips"].default
    per_stage = {0: clips, 1: clips, 2: 2 * clips}
    assert all(int(values[0][f"stages.{i}.global_batch_size"]) <= n for i, n in per_stage.items()), values[0]
    (tmp_path / "run.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "run.sh")]).returncode == 0
    # each launch's runs are its own (fixed names resumed the finished runs, and their figures were printed again):
    # run with a stand-in that prints the run name it is given and its arguments
    out.mkdir(parents=True)
    shown = """sh -c 'echo "stamp=$HICOM_RUN_STAMP" "$@"'"""
    (tmp_path / "shown.sh").write_text(gpu_check.run_script(out, out / "siglip", llms, shown))
    printed = subprocess.run(["bash", str(tmp_path / "shown.sh")], capture_output=True, text=True).stdout
    stamps = re.findall(r"^stamp=(\S*)", printed, re.M)  # the recipe, the two fits, then the demo and evaluate.py
    date = stamps[0].removeprefix("recipe-")
    assert stamps[1:] == [f"stage2-{name}-{date}" for name in llms] + ["", ""] and date[:4].isdigit()
    assert f"/logs/train/runs/recipe-{date}'" in printed.splitlines()[-1]  # evaluate.py reads this launch's recipe
