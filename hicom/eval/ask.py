"""ask.py's work: one or more questions about one video (or image), put to a trained model, the replies printed.

`python ask.py ckpt=<run | stage | release folder> video=<clip or folder of frames> question="What happens?"`
loads the model as evaluate.py does (the same folders, frames, precision and decoding), reads the clip once, asks
every question in one batch and prints each reply; with `options`, a multiple-choice question, whose reply is read
for an option letter as the benchmarks' are. The replies go to answers.json in the run folder too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from omegaconf import DictConfig, ListConfig

from hicom.eval.answers import LETTERS, parse_choice
from hicom.eval.benchmarks import Kind, Question
from hicom.eval.runner import (
    answering_model,
    benchmark_prompts,
    check_answering,
    generate_replies,
    question_inputs,
)
from hicom.utils.files import write_atomically

log = logging.getLogger(__name__)


def _texts(name: str, value, *, least: int) -> list[str]:
    """A text or a list of texts, none empty (a whole number, as the command line reads `options=[1,2,3]`, is its
    text); at least `least` of them. Other numbers and true / false are refused: Hydra read them as values, and
    their text is no longer the one typed (1.50 is 1.5)."""
    items = list(value) if isinstance(value, list | tuple | ListConfig) else [] if value is None else [value]
    typed = [item for item in items if not isinstance(item, str | int) or isinstance(item, bool)]
    if typed:
        raise ValueError(
            f"{name}: {typed[0]!r} was read as a {type(typed[0]).__name__}, not as the text typed: quote it for "
            f"Hydra, e.g. \"{name}=['1.50','2.00']\" or \"{name}='True'\""
        )
    texts = [str(item) for item in items]
    if len(texts) < least or not all(text.strip() for text in texts):
        raise ValueError(f"{name}={value!r}: give {'a text or a list of texts' if least else 'a list of texts'}")
    return texts


def questions_of(cfg: DictConfig) -> list[Question]:
    """The questions the config asks, checked before the model loads: a video or an image that is there (one of
    them), a question or a list of them, up to len(LETTERS) options, a window `start` < `end` in seconds of a
    video, an .srt file for `subtitles`."""
    if (cfg.video is None) == (cfg.image is None):
        raise ValueError(
            "set video=<a video file or a folder of frames> or image=<an image file> to ask about (one of them), "
            f"got video={cfg.video!r}, image={cfg.image!r}"
        )
    modality = "video" if cfg.video is not None else "image"
    media = Path(cfg[modality])
    if not (media.exists() if modality == "video" else media.is_file()):
        raise FileNotFoundError(f"{modality}={media}: no such {'file or folder' if modality == 'video' else 'file'}")
    if modality == "image" and (cfg.start is not None or cfg.end is not None or cfg.subtitles is not None):
        raise ValueError("start, end and subtitles are a video's: an image has no time")
    asked = _texts("question", cfg.question, least=1)
    options = tuple(_texts("options", cfg.options, least=0))
    if len(options) == 1 or len(options) > len(LETTERS):
        raise ValueError(f"options: {len(options)} given; a multiple-choice question has 2 to {len(LETTERS)}")
    for bound in ("start", "end"):
        value = cfg.get(bound)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise ValueError(f"{bound}={value!r}: a time in seconds from the clip's start, or null")
    if cfg.start is not None and cfg.end is not None and cfg.start >= cfg.end:
        raise ValueError(f"start={cfg.start} is not before end={cfg.end}")
    if cfg.subtitles is not None and not Path(cfg.subtitles).is_file():
        raise FileNotFoundError(f"subtitles={cfg.subtitles}: no such .srt file")
    return [
        Question(
            question_id=str(i),
            task="ask",
            video=str(media),
            question=text,
            options=options,
            start=cfg.start,
            end=cfg.end,
            subtitles=cfg.subtitles,
            modality=modality,
        )
        for i, text in enumerate(asked)
    ]


def ask_prompts(cfg: DictConfig) -> dict[str, str]:
    """ask's templates (`prompts`), each checked as a benchmark's are: the fields it may use, and the ones the
    question needs (multiple_choice and option where it has options, subtitles where it has an .srt file)."""
    kind = Kind.MULTIPLE_CHOICE if cfg.options else Kind.OPEN_ENDED
    return benchmark_prompts(cfg, SimpleNamespace(kind=kind, prompts=None, subtitles=cfg.subtitles is not None))


def ask(cfg: DictConfig) -> list[dict]:
    """Each question's record (question, options, prompt, reply, and `choice`, the parsed letter or None, where it
    has options), printed and written to <output_dir>/answers.json."""
    check_answering(cfg)
    questions = questions_of(cfg)
    prompts = ask_prompts(cfg)
    module, source, device, dtype = answering_model(cfg)
    net = module.net
    dataset, collate = question_inputs(net, questions, cfg.sampling, prompts)
    batch = collate(dataset.__getitems__(list(range(len(questions)))))
    if batch["skipped"]:  # every question is about the one clip: they fail together
        raise RuntimeError(f"cannot ask about {questions[0].video}: {batch['skipped'][0]['error']}")
    replies = generate_replies(net, batch, device, dtype, cfg.max_new_tokens)
    modality, frames = questions[0].modality, int(batch["num_frames"][0])
    records = []
    for q, prompt, reply in zip(questions, batch["prompts"], replies, strict=True):
        record = {"question": q.question, "prompt": prompt, "reply": reply}
        if q.options:
            record |= {"options": list(q.options), "choice": parse_choice(reply, list(q.options))}
        records.append(record)
    settings = {
        **source,
        modality: questions[0].video,
        "frames": frames,  # as read: fewer than sampling.num_frames from a short clip with repeat_frames=false
        "visual_tokens": net.num_visual_tokens(frames, modality),
        "max_new_tokens": cfg.max_new_tokens,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "answers.json", json.dumps({"answers": records, "settings": settings}, indent=2))
    for record in records:
        print(f"Q: {record['question']}")
        for letter, text in zip(LETTERS, record.get("options", []), strict=False):
            print(f"   ({letter}) {text}")
        print(f"A: {record['reply'].strip()}")
        if "choice" in record:
            print(f"   choice: {record['choice'] or 'none parsed'}")
    log.info("answers written to %s", out / "answers.json")
    return records
