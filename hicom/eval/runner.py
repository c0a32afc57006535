"""evaluate.py's work: load a trained model, answer each benchmark's questions, score them, write the report.

Per benchmark, under <output_dir>/<benchmark>/:
- predictions.jsonl: one line per question (question_id, task, question, answer, pred, reply, and duration or
  error where they apply), in the benchmark's order;
- results.json: the official scores (hicom.eval.score), with the settings that produced them (and, where the
  benchmark shows subtitles, n_with_subtitles: the scored questions whose .srt file exists).
And under <output_dir>: results.json (every benchmark whose results.json is in the folder, from this launch or an
earlier one), results.md (a table), settings.json, and the scores of this launch as eval/<benchmark>/<metric> in the
configured logger's files (TensorBoard events by default).

Sharding: process `shard` of `num_shards` (taken from torchrun's RANK / WORLD_SIZE unless set) answers the
questions of every num_shards-th clip into predictions.shard-<i>-of-<n>.jsonl; a batch's questions about one clip
share one read of it and one pass of the vision tower. A shard removes its shard-<i>-of-<n>.done when it
starts and writes it when it finishes; a shard that finishes with every .done present merges (under a lock, one at a
time), so the last to finish merges everything, a relaunched shard included. Merging again changes nothing, so the
.done files stay. Resuming: questions already answered (in predictions.jsonl or the shard's file) are skipped;
questions whose clip failed to decode are tried again. A `limit` run answers and scores the first questions only,
and keeps every answer predictions.jsonl already has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
import time
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset

from hicom.data.collate import Collator
from hicom.data.dataset import read_image
from hicom.data.template import ChatEncoder
from hicom.data.transforms import FrameTransform
from hicom.data.video import FrameSampling, VideoDecodeError, load_video, within_time_limit
from hicom.eval.answers import LETTERS, parse_choice
from hicom.eval.benchmarks import BenchmarkFormatError, Kind, Question, read_srt, subtitles_at
from hicom.eval.score import drop_torn_tail, read_predictions, score
from hicom.utils.checkpoints import computed_buffers, load_guide_tokenizer, loading_dtype, restore_computed_buffers
from hicom.utils.choices import loader_start, whole_number
from hicom.utils.config import dotted_keys, process_own_folder, srun_tasks
from hicom.utils.files import held_alone, locked, write_atomically

log = logging.getLogger(__name__)


def find_handoff(ckpt: Path) -> Path:
    """The folder holding a run's trained weights: the run itself (handoff.safetensors + manifest.json +
    config.yaml), or for a staged run the last of its stages."""
    from hicom.stages import STAGE_LIST, read_manifest

    if (ckpt / "manifest.json").is_file() and (ckpt / "config.yaml").is_file():
        return ckpt
    stages = [d for d in sorted((ckpt / "stages").glob("*")) if (d / "manifest.json").is_file()]
    if stages and (ckpt / STAGE_LIST).is_file():  # the run's stages (written since runs record them): all finished
        unfinished = [
            name for name in json.loads((ckpt / STAGE_LIST).read_text()) if name not in {d.name for d in stages}
        ]
        if unfinished:
            raise FileNotFoundError(
                f"ckpt={ckpt}: this staged run's stages {unfinished} have not finished (no manifest.json): launch "
                "the run again into its folder (without stage=) to finish them, or evaluate a finished stage by its "
                f"folder, ckpt={ckpt / 'stages'}/<name> (finished: {[d.name for d in stages]})"
            )
    if stages:
        # A stage's parent is recorded as the path it had when it was trained; the run may since have been moved
        # or be named here by another (relative) path, so a parent names a stage of this run by folder name.
        parents = {read_manifest(d / "manifest.json")["parent"] for d in stages}
        named = {Path(p).name for p in parents if p and Path(p).parent.name == "stages"}
        last = [d for d in stages if d.name not in named]
        if len(last) == 1 and (last[0] / "config.yaml").is_file():
            return last[0]
    raise FileNotFoundError(
        f"ckpt={ckpt}: neither a training run's folder (handoff.safetensors, manifest.json, config.yaml), a staged "
        "run with finished stages, nor an HF folder in the release's layout (config.json)"
    )


def load_model(ckpt: str | Path, cfg: DictConfig):
    """The VideoLLMModule of a run folder (built from its own config.yaml, weights from its hand-off) or of an
    HF folder in the release's layout (towers from this config's `model`, the compressor its config.json
    describes, weights imported strictly), and where it came from, with the frames it was trained at."""
    from hicom.stages import MANIFEST, check_handoff, load_handoff, read_manifest
    from hicom.utils.instantiators import check_model, check_pretrained, check_tokenizers, write_assets

    ckpt = Path(ckpt)
    if (ckpt / "config.json").is_file():
        from hicom.compat.official import (
            RELEASE_FRAMES,
            folder_compressor,
            import_official,
            read_config,
            select_layer_of,
            use_release_llm,
        )

        config = read_config(ckpt)
        frames = config.get("num_frames")
        layer = select_layer_of(config, ckpt)  # the tower's layer its compressor was trained on (the release's: -2)
        if cfg.model.vision.get("select_layer", layer) != layer:
            log.info("model.vision.select_layer=%d, as %s names", layer, ckpt / "config.json")
        with open_dict(cfg):
            cfg.model.vision.select_layer = layer
        use_release_llm(cfg, ckpt, str(ckpt))  # the folder is an HF folder of its LLM too
        write_assets(cfg.get("assets"))
        check_pretrained(cfg)
        check_tokenizers(cfg, training=False)
        compressor = folder_compressor(ckpt, reproduce_defect_1=cfg.official.reproduce_defect_1)
        check_model(cfg, compressor)  # towers of other widths than config.json's, before they load
        module = instantiate(cfg.model, compressor=compressor, trainable=[])
        import_official(module.net, ckpt, loaded=("llm",))  # the LLM came from this folder: checked, not read again
        if frames is None:
            log.info("%s names no num_frames: %d frames, as the release trains", ckpt / "config.json", RELEASE_FRAMES)
        source = {"ckpt": str(ckpt), "format": "official", "weights": files_identity(ckpt)}
        return module, {**source, "trained_frames": int(frames or RELEASE_FRAMES)}
    folder = find_handoff(ckpt)
    ignored = model_overrides()
    if ignored:  # a run folder is built from its own config.yaml: these would change nothing, in silence
        raise ValueError(
            f"{ckpt} is a training run, built from its own config.yaml: {ignored} apply to a release-layout folder "
            "only. Override the run's config with run_overrides=['model.<key>=<value>', ...] (its towers' folders "
            "on this machine, say), or train the model you mean to evaluate"
        )
    check_handoff(folder)
    run_cfg = OmegaConf.load(folder / "config.yaml")
    if cfg.get("run_overrides"):  # e.g. the towers' folders on this machine
        overrides = OmegaConf.from_dotlist(list(cfg.run_overrides))
        absent = [key for key in dotted_keys(OmegaConf.to_container(overrides)) if not _has_key(run_cfg, key)]
        if absent:  # a misspelt key would reach the module as an unknown argument, or be silently ignored
            raise ValueError(f"run_overrides: {absent} are not keys of {folder / 'config.yaml'}")
        run_cfg = OmegaConf.merge(run_cfg, overrides)
    if run_cfg.get("init_from"):  # fine-tuned from a release folder: its LLM and untrained parts are the folder's
        from hicom.compat.official import use_release_llm

        use_release_llm(
            run_cfg,
            run_cfg.init_from,
            f"the run was fine-tuned from the release folder {run_cfg.init_from}, not found here: "
            "run_overrides=['init_from=<that folder>']",
        )
    # the run's tiny checkpoints, those its model still reads: a tower or LLM that run_overrides moved (the run
    # evaluated on another machine) leaves the folder named by the training machine's cache alone
    paths = {str(OmegaConf.select(run_cfg, key, default=None)) for key in ("model.vision.path", "model.llm.path")}
    write_assets({name: asset for name, asset in (run_cfg.get("assets") or {}).items() if str(asset.out_dir) in paths})
    check_pretrained(run_cfg, override="run_overrides=['{key}=<folder>']")  # the run's config names the towers
    check_tokenizers(run_cfg, training=False)
    check_model(run_cfg)  # its compressor's output, the towers' files: before any weights load
    module = instantiate(run_cfg.model, trainable=[])  # nothing trains here: no part is left frozen with a warning
    if run_cfg.get("init_from"):  # the parts it did not train are the release folder's (its LLM loaded from it)
        from hicom.compat.official import import_official

        import_official(module.net, run_cfg.init_from, loaded=("llm",))
    # run_overrides may change the compressor, or the towers' folders (which must hold the weights it trained with)
    parts = load_handoff(module, folder, [], compressor=run_cfg.model.compressor, cfg=run_cfg)
    # the hand-off's digest: a run trained on (or a stage re-run) into the same folder answers otherwise
    weights = read_manifest(folder / MANIFEST).get("sha256") or files_identity(folder)
    source = {"ckpt": str(folder), "format": "run", "parts": parts, "weights": weights}
    source["run_overrides"] = list(cfg.get("run_overrides") or [])  # other towers or LLM, other answers
    return module, {**source, "trained_frames": int(run_cfg.data.num_frames)}


def model_overrides() -> list[str]:
    """This evaluate.py launch's command-line overrides of `model` (Hydra's task overrides; none where the config
    was composed without Hydra's app, as in tests)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [
        override
        for override in HydraConfig.get().overrides.task
        if override.lstrip("+~").split("=")[0].split("@")[0].replace("/", ".").split(".")[0] == "model"
    ]


def files_identity(folder: Path) -> str:
    """What tells the weights in `folder` from others, cheaply: its weight and config files by name, size and
    modification time (hashing a 7B model's files at each evaluation would take minutes)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".json"):
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _has_key(cfg: DictConfig, key: str) -> bool:
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and name in node


class BenchmarkDataset(Dataset):
    """Questions as generation-mode model inputs; a clip that cannot be read comes back as a skip record."""

    def __init__(
        self,
        questions: list[Question],
        *,
        encoder: ChatEncoder,
        transform: FrameTransform,
        sampling: FrameSampling,
        visual_tokens,
        prompts: dict[str, str],
    ) -> None:
        self.questions = questions
        self.encoder, self.transform, self.sampling = encoder, transform, sampling
        self.visual_tokens = visual_tokens
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.questions)

    def prompt(self, q: Question, subtitles: list[str] | None) -> str:
        """`subtitles`: the lines shown at the sampled frames, where the benchmark has subtitles (else None)."""
        if q.options:
            option = self.prompts["option"]
            options = "\n".join(option.format(letter=LETTERS[i], text=text) for i, text in enumerate(q.options))
            text = self.prompts["multiple_choice"].format(question=q.question, options=options)
        else:
            text = self.prompts["open_ended"].format(question=q.question)
        if subtitles is not None:
            text = self.prompts["subtitles"].format(subtitles="\n".join(subtitles)) + text
        return text

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The questions' model inputs, each clip read once for all of its questions among them (the DataLoader
        asks for a batch's questions at once, in one worker)."""
        clips: dict[str, tuple | Exception] = {}
        try:
            return [self._item(self.questions[i], clips) for i in indices]
        finally:  # an error kept here holds its traceback, which holds `clips`: the failed read's decoder state
            clips.clear()  # (containers, frames, threads) would wait for the garbage collector

    def _item(self, q: Question, clips: dict[str, tuple | Exception]) -> dict:
        """The question's model inputs, or a skip record that its answer row reports: a clip that cannot be read,
        or any other error of this one question (a prompt the template cannot encode, a frame too large for
        memory), so that one bad question does not end the benchmark. `clips`: the clips read so far, by
        `clip_key`, or the error reading one gave."""
        key = clip_key(q)
        try:
            if key not in clips:
                try:
                    clips[key] = self._clip(q)
                except Exception as err:  # its other questions get the same error without reading it again
                    clips[key] = err
            if isinstance(clips[key], Exception):
                raise clips[key]
            return self._inputs(q, key, *clips[key])
        except VideoDecodeError as err:
            # a reader that looked for the clip under several names says so: `video` is only the first of them
            error = q.not_found if err.reason == "missing" and q.not_found else str(err)
            return {"skip": err.reason, "id": q.question_id, "path": q.video, "error": error, "source": None}
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            return {"skip": "error", "id": q.question_id, "path": q.video, "error": error, "source": None}

    def _clip(self, q: Question) -> tuple[torch.Tensor, list[str] | None]:
        """The frames of the question's clip, ready for the tower, and the subtitle lines shown at them (None
        where its benchmark shows none)."""
        if q.modality == "image":  # one frame, as training reads an image sample
            image = within_time_limit(lambda: read_image(Path(q.video)), self.sampling.time_limit, q.video)
            return self.transform.squared(image), None
        sampled = load_video(q.video, self.sampling, start=q.start, end=q.end, shrink=self._squared)
        subtitles = None
        if q.subtitles is not None:  # a video without an .srt file has none to show
            found = Path(q.subtitles).is_file()
            subtitles = subtitles_at(read_srt(q.subtitles), sampled.timestamps) if found else []
        return sampled.frames, subtitles

    def _squared(self, frames):
        """Decoded frames as the tower sees them, squared as they decode (the transform is read only then)."""
        return self.transform.squared(frames)

    def _inputs(self, q: Question, clip: str, pixels: torch.Tensor, subtitles: list[str] | None) -> dict:
        messages = [
            {"role": "user", "content": f"<{q.modality}>\n" + self.prompt(q, subtitles)},
            {"role": "assistant", "content": ""},
        ]
        encoded = self.encoder.encode(messages, self.visual_tokens(len(pixels), q.modality), generation=True)
        return {
            "id": q.question_id,
            "prompt": messages[0]["content"],
            **encoded,
            "pixel_values": pixels,
            "clip": clip,  # the batch holds its frames once for all its questions (Collator)
            "num_frames": len(pixels),
            "modality": q.modality,
            "guide": q.question,  # SPEC 7: the guide is the bare question
        }


def question_inputs(
    net: torch.nn.Module, questions: list[Question], sampling: DictConfig, prompts: dict[str, str]
) -> tuple[BenchmarkDataset, Collator]:
    """The questions as the model's generation inputs, read as `sampling` says and asked as `prompts` write them,
    and the collator that batches them (left-padded, each clip's frames once)."""
    dataset = BenchmarkDataset(
        questions,
        encoder=ChatEncoder(net.llm.tokenizer, net.llm.tokenizer.convert_ids_to_tokens(net.llm.visual_token_id)),
        transform=FrameTransform.from_pretrained(net.vision.path),
        sampling=FrameSampling(**OmegaConf.to_container(sampling, resolve=True)),
        visual_tokens=net.visual_tokens(),
        prompts=prompts,
    )
    collate = Collator(
        pad_token_id=net.llm.tokenizer.pad_token_id,
        guide_tokenizer=load_guide_tokenizer(net.vision.path),
        padding_side="left",
    )
    return dataset, collate


def generate_replies(
    net: torch.nn.Module, batch: dict, device: torch.device, dtype: torch.dtype, max_new_tokens: int
) -> list[str]:
    """The model's greedy reply to each question of a collated batch, as text."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if batch["pixel_values"].is_floating_point():  # bytes are normalised by the tower, in float32 first
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    tokens = net.generate(batch, max_new_tokens=max_new_tokens)
    return net.llm.tokenizer.batch_decode(tokens, skip_special_tokens=True)


def clip_key(q: Question) -> str:
    """What makes a question's frames and subtitle lines: its clip's file and bounds, and its subtitle file."""
    return json.dumps([q.video, q.start, q.end, q.subtitles])


def shard_of(questions: list[Question], num_shards: int) -> list[int]:
    """The shard that answers each question: every num_shards-th clip, in the order of their first questions, with
    all of its questions, so that a clip is read and seen by the vision tower once per batch of its questions
    rather than once by each shard. A `limit` run's first questions go where a whole run's would."""
    clips: dict[str, int] = {}
    return [clips.setdefault(clip_key(q), len(clips)) % num_shards for q in questions]


def shard_order(questions: list[Question], shard: int, num_shards: int) -> list[Question]:
    """The questions `shard` answers, each clip's together (in the order of their first questions) so that
    batches hold one clip's questions."""
    owned = [q for q, owner in zip(questions, shard_of(questions, num_shards), strict=True) if owner == shard]
    first: dict[str, int] = {}
    for q in owned:
        first.setdefault(clip_key(q), len(first))
    return sorted(owned, key=lambda q: first[clip_key(q)])  # stable: a clip's questions keep their order


def asked(q: Question) -> str:
    """What decides a question's reply besides the model and settings (its clip's file name, bounds, question,
    options, and its subtitles' file name and content, None where the file is missing), as a short digest: an answer
    row is the question's only where it matches, so that a benchmark file edited between runs into one folder has
    its changed questions asked again rather than scored with the replies to the old ones, and a question asked
    without its subtitles (the folder misplaced) is asked again once they are there. Not the gold answer (a
    corrected one re-scores the reply) nor the folders (the data moved elsewhere keeps its answers)."""
    subtitles = q.subtitles and [Path(q.subtitles).name, content_digest(Path(q.subtitles))]
    fields = [Path(q.video).name, q.start, q.end, q.question, list(q.options), subtitles]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def content_digest(path: Path) -> str | None:
    """A short digest of a file's bytes; None where it is not a file (what a prompt then shows: no lines)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def with_subtitles(questions: list[Question]) -> int | None:
    """How many of `questions` have their .srt file, where their benchmark shows subtitles (else None)."""
    files = [Path(q.subtitles) for q in questions if q.subtitles is not None]
    return sum(path.is_file() for path in files) if files else None


def check_subtitles(name: str, reader, questions: list[Question]) -> None:
    """A benchmark that shows subtitles with none of its questions' .srt files in place would be scored "with
    subtitles" without a line of them: refused, naming the folder looked in. Some missing is Video-MME's own case
    (not every video has subtitles): the count is logged, and results.json records it."""
    found = with_subtitles(questions)
    if found is None:
        return
    first = Path(next(q.subtitles for q in questions if q.subtitles is not None))
    if found == 0:
        raise BenchmarkFormatError(
            f"none of the {len(questions)} questions' subtitle files is in {first.parent} (the first: {first.name}): "
            f"put the benchmark's .srt files there, or set benchmarks.{name}.subtitle_dir=<their folder, under "
            f"{reader.root}>"
        )
    if found < len(questions):
        log.warning(
            "%s: %d of %d questions have no subtitle file in %s: they are asked with the subtitles' header and no "
            "lines", name, len(questions) - found, len(questions), first.parent,
        )  # fmt: skip


def _rows(paths: list[Path], by_id: dict[str, Question]) -> dict[str, dict]:
    """The answer rows of `paths` (a later one for a question wins) for the questions of `by_id` as they are asked
    now (`asked`), each with the question's current gold answer, task and duration, and the digest; a judge's
    verdict only where it was given against that gold answer (one from before verdicts kept theirs is kept)."""
    rows = {}
    for path in paths:
        if path.is_file():
            for row in read_predictions(path):
                q = by_id.get(row["question_id"])
                if q is None:
                    continue
                now = _row(q, row["pred"], row["reply"], row.get("error"))
                # a row of a version before the digest is taken as it is (its question cannot be compared)
                if row.get("asked", now["asked"]) == now["asked"]:
                    rows[q.question_id] = {**row, **now}
                    verdict = row.get("judge")  # one of another gold answer (corrected since): judged again
                    if isinstance(verdict, dict) and verdict.get("answer", str(q.answer)) != str(q.answer):
                        del rows[q.question_id]["judge"]
    return rows


def _answered(paths: list[Path], by_id: dict[str, Question]) -> set[str]:
    return {qid for qid, row in _rows(paths, by_id).items() if "error" not in row}


def _shard() -> tuple[int, int]:
    """This process's shard of the questions, and how many: torchrun's RANK / WORLD_SIZE, else srun's tasks."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    tasks = srun_tasks()
    return (int(os.environ["SLURM_PROCID"]), tasks) if tasks > 1 else (0, 1)


def _local_rank() -> int:
    """This process's place on its node (torchrun's LOCAL_RANK, else srun's SLURM_LOCALID), for its GPU."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return int(os.environ.get("SLURM_LOCALID", 0)) if srun_tasks() > 1 else 0


def _device(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        # a task given its own GPU (srun --gpus-per-task) sees it alone, as cuda:0
        local = _local_rank() % max(torch.cuda.device_count(), 1)
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={cfg.device}, and this torch ({torch.__version__}) sees no CUDA GPU: device=auto or cpu"
            )
    if cfg.precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, PRECISIONS[cfg.precision]


PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# The prompt templates and the fields each may use: a multiple-choice question is asked with its options, each
# written by `option`; `subtitles` goes before the question where a benchmark has them
PROMPT_FIELDS = {
    "multiple_choice": {"question", "options"},
    "option": {"letter", "text"},
    "open_ended": {"question"},
    "subtitles": {"subtitles"},
}


def benchmark_prompts(cfg: DictConfig, reader) -> dict[str, str]:
    """evaluate's `prompts` with the benchmark's own over them; a key or a field no template has is an error."""
    prompts = {**OmegaConf.to_container(cfg.prompts, resolve=True), **dict(reader.prompts or {})}
    for key, template in prompts.items():
        if key not in PROMPT_FIELDS:
            raise ValueError(f"prompts.{key}: no such template; the templates are {sorted(PROMPT_FIELDS)}")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as err:  # an unmatched brace
            raise ValueError(f"prompts.{key}={template!r}: {err} (a literal brace is written twice)") from err
        if fields - PROMPT_FIELDS[key]:
            raise ValueError(
                f"prompts.{key}={template!r} names {sorted(fields - PROMPT_FIELDS[key])}: it may use "
                f"{sorted('{' + f + '}' for f in PROMPT_FIELDS[key])}"
            )
        try:  # a format spec the text cannot take ({question:d})
            template.format(**dict.fromkeys(PROMPT_FIELDS[key], "text"))
        except (ValueError, IndexError) as err:
            raise ValueError(f"prompts.{key}={template!r}: {err}") from err
    needed = {"multiple_choice", "option"} if reader.kind is Kind.MULTIPLE_CHOICE else {"open_ended"}
    if getattr(reader, "subtitles", False):
        needed.add("subtitles")
    missing = sorted(needed - set(prompts))
    if missing:
        raise ValueError(f"no prompt template for {missing}: set benchmarks.<name>.prompts.<key> (or prompts.<key>)")
    return prompts


def run_benchmark(
    name: str, reader, module, cfg: DictConfig, out: Path, shard: int, num_shards: int, device: torch.device,
    dtype: torch.dtype, every: list[Question] | None = None, prompts: dict[str, str] | None = None,
) -> dict | None:  # fmt: skip
    """Answer this shard's unanswered questions (`every`: the benchmark's questions, read by `reader` when not
    given; `prompts`: its templates, from benchmark_prompts when not given); merge and score when every shard is
    done (else None)."""
    out.mkdir(parents=True, exist_ok=True)
    # one process a shard: a second one (a launch started twice into one output_dir) would merge and remove the
    # shard file the first still appends to, and its later answers would be lost
    with held_alone(out / f"shard-{shard}-of-{num_shards}.lock", f"{name}: answering shard {shard} of {num_shards}"):
        return _answer_shard(name, reader, module, cfg, out, shard, num_shards, device, dtype, every, prompts)


def _answer_shard(
    name: str, reader, module, cfg: DictConfig, out: Path, shard: int, num_shards: int, device: torch.device,
    dtype: torch.dtype, every: list[Question] | None, prompts: dict[str, str] | None,
) -> dict | None:  # fmt: skip
    net = module.net
    every = reader.read() if every is None else every
    questions = every if cfg.limit is None else every[: int(cfg.limit)]
    by_id = {q.question_id: q for q in questions}
    merged = out / "predictions.jsonl"
    shard_file = out / f"predictions.shard-{shard}-of-{num_shards}.jsonl"
    done_files = [out / f"shard-{i}-of-{num_shards}.done" for i in range(num_shards)]
    with locked(out / "merge.lock"):
        # until this shard finishes, no other one merges: none can use its earlier answers as its last, nor remove
        # the shard file it appends to
        done_files[shard].unlink(missing_ok=True)
    drop_torn_tail(shard_file)  # a run killed mid-write: that question is answered again
    done = _answered([merged, shard_file], by_id)
    todo = [q for q in shard_order(questions, shard, num_shards) if q.question_id not in done]
    log.info("%s: %d questions, shard %d/%d, %d to answer", name, len(questions), shard, num_shards, len(todo))

    prompts = benchmark_prompts(cfg, reader) if prompts is None else prompts
    asked = prompts["multiple_choice" if reader.kind is Kind.MULTIPLE_CHOICE else "open_ended"]
    log.info("%s asks %r (options as %r)", name, asked, prompts["option"])
    dataset, collate = question_inputs(net, todo, cfg.sampling, prompts)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        **loader_start("multiprocessing_context", cfg.get("multiprocessing_context"), cfg.num_workers),
    )
    start, answered = time.perf_counter(), 0
    with shard_file.open("a") as f:
        for batch in loader:
            for skip in batch["skipped"]:
                q = by_id[skip["id"]]
                row = _row(q, None, None, f"{skip['skip']}: {skip['error']}")
                f.write(json.dumps(row) + "\n")
                log.warning("%s %s: %s", name, q.question_id, row["error"])
            if "input_ids" not in batch:
                continue
            replies = generate_replies(net, batch, device, dtype, cfg.max_new_tokens)
            for qid, reply, prompt in zip(batch["ids"], replies, batch["prompts"], strict=True):
                q = by_id[qid]
                pred = parse_choice(reply, list(q.options)) if reader.kind is Kind.MULTIPLE_CHOICE else reply.strip()
                f.write(json.dumps({**_row(q, pred, reply), "prompt": prompt}) + "\n")
            f.flush()
            answered += len(replies)
    seconds = time.perf_counter() - start
    done_files[shard].write_text(json.dumps({"answered": answered, "seconds": seconds}))
    timing = {"answered_this_run": answered, "seconds_per_question": seconds / answered if answered else None}
    # Shards finishing together merge one after the other; the last sees every shard done, whatever the order.
    with locked(out / "merge.lock"):
        if not all(path.is_file() for path in done_files):
            log.info("%s: shard %d done; the last shard to finish merges", name, shard)
            return None
        return _merge(name, reader, out, every, questions, num_shards, timing)


def _merge(
    name: str, reader, out: Path, every: list[Question], questions: list[Question], num_shards: int, timing: dict
) -> dict | None:
    """predictions.jsonl and every shard's answers (a later line for a question wins) into predictions.jsonl, in the
    order of `every` question of the benchmark, the shard files removed; the scores of `questions` (a `limit` run's
    first ones). The answers already there to questions outside `every` (a run over some of the tasks, EgoSchema's
    subset after its full set) stay after them, as they were. Merging again changes nothing. None, with nothing
    merged, where a question of `questions` has no answer: the shards that owe one have their .done marks
    withdrawn."""
    merged = out / "predictions.jsonl"
    shards = [out / f"predictions.shard-{i}-of-{num_shards}.jsonl" for i in range(num_shards)]
    rows = _rows([merged, *shards], {q.question_id: q for q in every})
    unanswered = [i for i, q in enumerate(questions) if q.question_id not in rows]
    if unanswered:  # a shard's .done left by an earlier launch that asked fewer questions (a `limit`, other files)
        owners = shard_of(questions, num_shards)
        again = sorted({owners[i] for i in unanswered})
        log.warning(
            "%s: %d of %d questions have no answer (%s): not scored; run shards %s of %d again (shard=<i> "
            "num_shards=<n>, or the whole launch): the last to finish merges", name, len(unanswered), len(questions),
            ", ".join(questions[i].question_id for i in unanswered[:5]) + (", ..." if len(unanswered) > 5 else ""),
            again, num_shards,
        )  # fmt: skip
        for shard in again:
            (out / f"shard-{shard}-of-{num_shards}.done").unlink(missing_ok=True)
        return None
    kept = [rows[q.question_id] for q in every if q.question_id in rows]
    known = {q.question_id for q in every}
    outside = {}  # a later line for a question wins, as in `_rows`
    if merged.is_file():
        outside = {r["question_id"]: r for r in read_predictions(merged) if r["question_id"] not in known}
    write_atomically(merged, "".join(json.dumps(r) + "\n" for r in [*kept, *outside.values()]))
    for path in shards:
        path.unlink(missing_ok=True)
    scored = [rows[q.question_id] for q in questions if q.question_id in rows]
    before = out / "results.json"
    if not timing["answered_this_run"] and before.is_file():  # nothing left to answer: the timing that was measured
        timing["seconds_per_question"] = json.loads(before.read_text()).get("seconds_per_question")
    results = {"benchmark": name, **score(reader, scored), **timing}
    results["n_questions"] = len(questions)
    shown = with_subtitles(questions)  # the digest asks a question again once its file changes: these match
    if shown is not None:
        results["n_with_subtitles"] = shown
    if reader.submission:  # EgoSchema's full set: {q_uid: option index}, -1 where no letter parsed
        submission = {r["question_id"]: (LETTERS.index(r["pred"]) if r["pred"] else -1) for r in kept}
        (out / "submission.json").write_text(json.dumps(submission))
        results["submission"] = str(out / "submission.json")
    return results


def _row(q: Question, pred, reply, error: str | None = None) -> dict:
    row = {
        "question_id": q.question_id,
        "task": q.task,
        "question": q.question,
        "answer": q.answer,
        "pred": pred,
        "reply": reply,
        "asked": asked(q),
    }
    if q.duration is not None:
        row["duration"] = q.duration
    if q.options:
        row["n_options"] = len(q.options)
    if error is not None:
        row["error"] = error
    return row


# answer settings that older settings.json files lack, compared only where recorded
SETTINGS_ADDED = frozenset({"weights", "run_overrides", "compressor"})


def answer_settings(settings: dict) -> dict:
    """What decides a reply, of a run's settings: the model and how it was loaded (the compressor as built: a
    release folder's weights read with or without `official.reproduce_defect_1` make other tokens), the frames and
    their sampling, the prompts, the number format and the reply length (not the benchmarks, device, batch size or
    shards)."""
    keys = ("ckpt", "format", "parts", "weights", "run_overrides", "compressor", "frames", "sampling", "prompts")
    keys += ("dtype",)
    keys += ("visual_tokens_per_video",)
    return {**{k: settings.get(k) for k in keys}, "max_new_tokens": settings.get("decoding", {}).get("max_new_tokens")}


def check_same_answers(path: Path, settings: dict) -> None:
    """A folder's answers are kept and scored with new ones only where they were made the same way: an
    output_dir that holds answers of another checkpoint or other settings is refused, with what differs."""
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} cannot be read ({error}): the answers beside it cannot be matched to their settings; delete "
            "the file to keep them (this run's settings are written in its place), or give another output_dir"
        ) from error
    recorded = before  # a folder's settings from before `weights` and `run_overrides` were recorded: not compared
    before, now = answer_settings(before), answer_settings(settings)
    # the same weights named by another path (relative, or the folder moved) are the same checkpoint
    same_weights = before["weights"] is not None and before["weights"] == now["weights"]
    differ = {
        key: (before[key], now[key])
        for key in now
        if before[key] != now[key]
        and (key in recorded or key not in SETTINGS_ADDED)
        and not (key == "ckpt" and same_weights)
    }
    if differ:
        lines = "\n  ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in differ.items())
        raise ValueError(
            f"{path.parent} holds answers made otherwise, which this run would keep and score with its own:\n  "
            f"{lines}\ngive another output_dir (each run has its own by default), or delete that folder"
        )


def check_unmerged_shards(out_dir: Path, names: list[str], num_shards: int) -> None:
    """A launch split another number of ways that has not merged leaves its answers in its own shards' files,
    which this launch would neither count as answered nor merge until that number came back (and then over newer
    answers): refused, with what to do."""
    for name in names:
        other = sorted(
            path.name
            for path in (out_dir / name).glob("predictions.shard-*-of-*.jsonl")
            if not path.name.endswith(f"-of-{num_shards}.jsonl")
        )
        if other:
            raise ValueError(
                f"{out_dir / name} holds the unmerged answers of a launch split another number of ways ({other[:2]}): "
                "finish it with that many shards, or delete those files to answer their questions again"
            )


def check_answering(cfg: DictConfig) -> None:
    """The settings of answering questions (evaluate.py's and ask.py's) that stop a launch before the model loads:
    the checkpoint folder, decoding, precision, frame sampling."""
    if cfg.ckpt is None:
        raise ValueError("set ckpt=<a training run's folder, a stage folder, or an HF folder in the release's layout>")
    if not (Path(cfg.ckpt) / "config.json").is_file():  # a folder that holds no run fails first, in a moment
        find_handoff(Path(cfg.ckpt))
    whole_number("max_new_tokens", cfg.max_new_tokens)
    if cfg.precision != "auto" and cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {['auto', *PRECISIONS]}, got {cfg.precision!r}")
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    frames = 1 if sampling["num_frames"] is None else sampling["num_frames"]  # None: the checkpoint's, known later
    FrameSampling(**{**sampling, "num_frames": frames})  # a bad value stops the run before the model loads


def answering_model(cfg: DictConfig) -> tuple[object, dict, torch.device, torch.dtype]:
    """The checkpoint's VideoLLMModule on this process's device in the answering precision, in eval mode; where it
    came from (load_model's record, less the frames it was trained at); the device and dtype. An unset
    `sampling.num_frames` becomes the frames it was trained at; frames whose visual tokens fill the LLM's positions
    are refused."""
    device, dtype = _device(cfg)
    with loading_dtype(dtype):  # bf16 on GPUs: half the host memory of an fp32 load, the same numbers once cast
        module, source = load_model(cfg.ckpt, cfg)
    trained_frames = source.pop("trained_frames")
    if cfg.sampling.num_frames is None:  # the checkpoint's own frames unless asked for others
        cfg.sampling.num_frames = trained_frames
    visual = module.net.num_visual_tokens(cfg.sampling.num_frames)
    positions = getattr(module.net.llm.model.config, "max_position_embeddings", None)
    if positions is not None and visual >= positions:  # RoPE past what the LLM was made for: no reply to trust
        raise ValueError(
            f"sampling.num_frames={cfg.sampling.num_frames} gives {visual} visual tokens a clip, and the LLM has "
            f"{positions} positions (max_position_embeddings) for them and the question: sample fewer frames"
        )
    computed = computed_buffers(module.net)
    module.net.to(device=device, dtype=dtype).eval()  # bf16 weights on GPUs that have it
    restore_computed_buffers(module.net, computed)  # RoPE's frequencies stay fp32, as from_pretrained keeps them
    return module, source, device, dtype


def evaluate(cfg: DictConfig) -> dict:
    check_answering(cfg)
    names = [cfg.benchmark] if isinstance(cfg.benchmark, str) else list(cfg.benchmark)
    if not names:
        raise ValueError(f"benchmark=[] names nothing to evaluate: one or more of {sorted(cfg.benchmarks)}")
    unknown = [n for n in names if n not in cfg.benchmarks]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; configured: {sorted(cfg.benchmarks)}")
    if cfg.shard is None and cfg.num_shards != 1:  # torchrun's RANK and WORLD_SIZE set both, or neither is set
        raise ValueError(
            f"num_shards={cfg.num_shards!r} needs shard=<i> (this process's share, from 0); under torchrun leave both "
            "unset: RANK and WORLD_SIZE give them"
        )
    shard, num_shards = (cfg.shard, cfg.num_shards) if cfg.shard is not None else _shard()
    if cfg.limit is not None:
        whole_number("limit (questions per benchmark; null: all)", cfg.limit)
    whole_number("batch_size", cfg.batch_size)
    whole_number("num_workers", cfg.num_workers, least=0)
    loader_start("multiprocessing_context", cfg.get("multiprocessing_context"), cfg.num_workers)
    whole_number("num_shards", num_shards)
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard!r} of num_shards={num_shards}: shards count from 0 to {num_shards - 1}")
    if num_shards > 1 and process_own_folder(cfg.output_dir):  # the shards would never meet to merge
        raise ValueError(
            f"{num_shards} shards merge their answers in one folder, and this one is named by this process's own "
            f"start time and id ({cfg.output_dir}): give every shard the same output_dir=<folder> (or "
            "HICOM_RUN_STAMP=<name>, or torchrun --rdzv-id=<id>)"
        )
    check_unmerged_shards(Path(cfg.output_dir), names, num_shards)
    readers, questions, problems = {}, {}, []
    for name in names:  # every benchmark's files, before the model loads: all that is missing, at once
        try:
            readers[name] = instantiate(cfg.benchmarks[name])
            questions[name] = readers[name].read()
            check_subtitles(name, readers[name], questions[name])
        except (OSError, ValueError, InstantiationException) as error:  # the last: a reader's value refused
            problems.append(f"{name}: {error}")
    if problems:
        raise BenchmarkFormatError("cannot read the benchmarks:\n  " + "\n  ".join(problems))
    prompts = {}
    for name in names:  # a bad template, before the model loads
        try:
            prompts[name] = benchmark_prompts(cfg, readers[name])
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
    module, source, device, dtype = answering_model(cfg)
    visual = module.net.num_visual_tokens(cfg.sampling.num_frames)
    out_dir = Path(cfg.output_dir)
    settings = {
        **source,
        "benchmarks": names,
        "frames": cfg.sampling.num_frames,
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
        # evaluate's templates and each configured benchmark's own: the same whichever benchmarks a run answers
        "prompts": {
            "default": OmegaConf.to_container(cfg.prompts, resolve=True),
            "benchmarks": {
                name: OmegaConf.to_container(spec.prompts, resolve=True)
                for name, spec in cfg.benchmarks.items()
                if spec.get("prompts")
            },
        },
        "decoding": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size},
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "visual_tokens_per_video": visual,
        "compressor": module.net.compressor.label,  # what was built: the weights (`weights`) decide the replies
        "shards": num_shards,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir / "results.lock"):  # shards starting together: each reads the file whole
        check_same_answers(out_dir / "settings.json", settings)
        write_atomically(out_dir / "settings.json", json.dumps(settings, indent=2))
    all_results = {}
    for name in names:
        results = run_benchmark(
            name,
            readers[name],
            module,
            cfg,
            out_dir / name,
            shard,
            num_shards,
            device,
            dtype,
            questions[name],
            prompts[name],
        )
        if results is not None:
            results["settings"] = settings
            write_atomically(out_dir / name / "results.json", json.dumps(results, indent=2))  # others may read it
            all_results[name] = results
    if all_results:
        # Under shards, different processes may merge different benchmarks, and earlier launches into this folder
        # others still: the report holds every benchmark whose results are written in it so far, composed under a
        # lock so that the last writer has them all.
        with locked(out_dir / "results.lock"):
            report = folder_report(out_dir, cfg.benchmarks)
            (out_dir / "results.json").write_text(json.dumps(report, indent=2))
            (out_dir / "results.md").write_text(markdown_table(report, settings))
        print(markdown_table(report, settings))
        log_scores(cfg, all_results)
        log.info("results written to %s (results.json, results.md; <benchmark>/predictions.jsonl)", out_dir)
    else:
        log.info("answers written to %s/<benchmark>/; the last shard to finish merges and scores them", out_dir)
    return all_results


def folder_report(out_dir: Path, benchmarks) -> dict:
    """The results of every benchmark of `benchmarks` (the configured ones) with a results.json under `out_dir`, by
    name: this launch's, and those an earlier launch or another shard merged into the folder."""
    return {
        name: json.loads((out_dir / name / "results.json").read_text())
        for name in sorted(benchmarks)
        if (out_dir / name / "results.json").is_file()
    }


def score_metrics(results: dict) -> dict[str, float]:
    """The numbers of each benchmark's results under the STYLE's names: eval/<benchmark>/<metric>, and
    eval/<benchmark>/per_task/<task>/<metric> (per_duration likewise)."""
    flat = {}

    def add(prefix: str, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{prefix}/{key}"] = float(value)

    for name, r in results.items():
        add(f"eval/{name}", r)
        for group in ("per_task", "per_duration"):
            for key, values in r.get(group, {}).items():
                add(f"eval/{name}/{group}/{key}", values)
    return flat


def log_scores(cfg: DictConfig, results: dict) -> None:
    """The scores merged by this process, to the configured loggers (TensorBoard by default)."""
    from hicom.utils.instantiators import finish_loggers, finish_open_wandb_run, instantiate_all

    metrics = score_metrics(results)
    here = OmegaConf.merge(cfg, {"paths": {"output_dir": str(cfg.output_dir)}})  # under output_dir, as the rest
    finish_open_wandb_run()
    loggers = instantiate_all(here.get("logger"), "logger")
    for logger in loggers:
        logger.log_metrics(metrics, step=0)
    finish_loggers(loggers)


# each benchmark's official metric (its reader's `metric`), as results.md names it
METRIC_NAMES = {
    "acc": "accuracy",
    "acc_answered": "accuracy over answered",
    "m_avg": "M-Avg",
    "exact_match": "exact match",
}


def _older_metric(results: dict) -> str:
    """The headline of a results.json written before results named their metric (another benchmark's, from an
    earlier version, may share the report): what those tables showed."""
    return next(key for key in ("exact_match", "m_avg", "acc") if key in results)


def markdown_table(results: dict, settings: dict) -> str:
    lines = [
        f"ckpt `{settings['ckpt']}`, "
        + (f"compressor {settings['compressor']}, " if settings.get("compressor") else "")
        + f"{settings['frames']} frames ({settings['visual_tokens_per_video']} visual tokens), greedy, "
        f"{settings['dtype']}",
        "",
        "| benchmark | score | metric | n | unparsed | failed | s / question |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        metric, per_q = r.get("metric") or _older_metric(r), r.get("seconds_per_question")
        seconds = "-" if per_q is None else f"{per_q:.3f}"
        failed = f"{r['n_failed']}" + (f" (+{r['n_failed_unscored']} unscored)" if r.get("n_failed_unscored") else "")
        lines.append(
            f"| {name} | {100 * r[metric]:.1f} | {METRIC_NAMES[metric]} | {r['n']} | {r.get('n_unparsed', '-')} | "
            f"{failed} | {seconds} |"
        )
    also = [(name, r) for name, r in results.items() if (r.get("metric") or _older_metric(r)) != "acc" and "acc" in r]
    if also:  # M-Avg (MLVU) and accuracy over answered (Video-MME) beside the plain accuracy, which the release prints
        lines.append("")
        lines += [f"{name}: accuracy over all {r['n']} questions {100 * r['acc']:.1f}" for name, r in also]
    shown = [(name, r) for name, r in results.items() if "n_with_subtitles" in r]
    if shown:  # a "w/ subs" score is read with how many questions had subtitles to show
        lines.append("")
        lines += [f"{name}: subtitles for {r['n_with_subtitles']} of {r['n_questions']} questions" for name, r in shown]
    return "\n".join(lines) + "\n"
