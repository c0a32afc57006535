"""Tiny HF-format checkpoints that the built-in default trains on.

The writers below produce folders that load with the very `from_pretrained` calls used for the real
SigLIP-so400m and Qwen2.5 weights: a SigLIP with its vision tower, text tower, image-processor config and
text tokenizer, and a Qwen2 causal LM whose tokenizer carries the Qwen2.5 chat template. Weights are
random, seeded; each folder holds a `spec.json` and is rewritten only when the spec changes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Qwen2.5's chat template, reduced to what the project relies on: the default system turn and
# `<|im_start|>role\n...<|im_end|>\n` per message.
QWEN_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama 3's chat template, reduced likewise: `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>` per message.
LLAMA_CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Llama 3 has no pad token and no video token: a reserved special token marks the visual positions.
LLAMA_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|reserved_special_token_0|>",
]

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|video_pad|>", "<|image_pad|>"]

# Text the tiny tokenizers learn their pieces from; anything else still encodes through bytes.
_CORPUS = """
You are a helpful assistant. system user assistant
Question: What colour is the circle? What colour is the square? What colour is the triangle? What colour is the cross?
What shape is the red object? What shape is the green object? What shape is the blue object?
What shape is the yellow object? Which direction does the red object move? Which direction does the green object move?
Which direction does the blue object move? Which direction does the yellow object move?
Options: (A) red (B) green (C) blue (D) yellow (A) circle (B) square (C) triangle (D) cross
(A) left (B) right (C) up (D) down A B C D E
Answer with the option's letter from the given choices directly.
Describe the video. What happens in the video? How many objects are there? 0 1 2 3 4 5 6 7 8 9
The the a an is are of in on to and with what which who where when why how this that video image frame
"""


def _train_bpe(vocab_size: int, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    return tok


def _train_sentencepiece(vocab_size: int) -> bytes:
    """A unigram SentencePiece model in SigLIP's id layout (<pad> 0, </s> 1, <unk> 2, no <s>), learnt from the corpus
    as SiglipTokenizer reads text (lowercased, without punctuation); bytes cover anything else."""
    import io
    import string

    import sentencepiece as spm

    canonical = [line.lower().translate(str.maketrans("", "", string.punctuation)) for line in _CORPUS.splitlines()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in canonical if line.strip()] * 4),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the corpus may hold fewer pieces
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


FILES = "files.json"  # in a written folder: its files and their sizes, by which it is known to be whole


class _Writer:
    """Writes a folder once per spec: build into a temporary sibling, then rename into place. The processes of a
    launch on a fresh cache take turns (a file lock beside the folder): the first writes, the others find it
    written; a folder of another spec (an older version's) is renamed aside in one step before the new one takes
    its place, so that a kill at any moment leaves the folder whole or absent, and the leftovers go next time."""

    def __call__(self, out_dir: str | os.PathLike) -> Path:
        from hicom.utils.files import as_created_here, locked

        out = Path(out_dir)
        spec = {"kind": type(self).__name__, **asdict(self)}
        if self._written(out, spec):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with locked(out.with_name(f".{out.name}.lock")) as held:
            if self._written(out, spec):  # another process wrote it while this one waited
                return out
            if held:  # every writer locks, so these are of writers that were killed (unlocked, maybe live ones')
                for leftover in [*out.parent.glob(f"{out.name}.tmp-*"), *out.parent.glob(f"{out.name}.old-*")]:
                    shutil.rmtree(leftover, ignore_errors=True)
            # folders of its own: a process id is not (the same one in two nodes' containers)
            tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
            as_created_here(tmp)
            with torch.random.fork_rng(devices=[]):  # seeded writing must not move the caller's random state
                self.write(tmp)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / FILES).write_text(json.dumps(files, indent=1))
            (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            old.rmdir()  # a free name for the folder it replaces
            if out.exists():
                out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        log.info("wrote %s to %s", spec["kind"], out)
        return out

    @staticmethod
    def _written(out: Path, spec: dict) -> bool:
        """Whether `out` holds this spec's folder, whole: every file it was written with, at its size (a weight
        file deleted or cut short since is written again, the same seeded weights); an error where it holds
        something this writer did not write."""
        if (out / "spec.json").is_file():
            if json.loads((out / "spec.json").read_text()) != spec:
                return False
            try:
                files = json.loads((out / FILES).read_text())
            except (OSError, ValueError):  # an earlier version's folder, which listed none: written again once
                return False
            return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in files.items())
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and was not written by {spec['kind']}: refusing to replace it")
        return False

    def write(self, out: Path) -> None:
        raise NotImplementedError


# TinySiglip's files: 3 since its tokenizer, as the real folders' do, gives input ids alone (no attention mask); 2: a
# SentencePiece tokenizer that gave a mask too; 1: a byte-level BPE
SIGLIP_FILES = 3


@dataclass(frozen=True)
class TinySiglip(_Writer):
    """A random SigLIP (vision + text towers) in the so400m folder layout, at toy size."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    image_size: int = 112
    patch_size: int = 16
    text_max_length: int = 32
    vocab_size: int = 384
    # SIGLIP_FILES: what `write` puts in the folder, set by configs/assets/tiny.yaml. A run's config.yaml from
    # before it existed has none: its towers (with a byte-level BPE guide tokenizer) are no longer written, and
    # writing today's under it would change its frozen weights and guide ids without a word
    files_version: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.files_version != SIGLIP_FILES:
            raise ValueError(
                f"TinySiglip files_version={self.files_version}: this config asks for the tiny SigLIP of an earlier "
                f"version of hicom (now {SIGLIP_FILES}: the real folders' SentencePiece tokenizer, without a mask), which is no "
                "longer written; a run trained on it cannot be evaluated or resumed: train it again"
            )

    def write(self, out: Path) -> None:
        from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

        import hicom.modules.vision  # noqa: F401  (its filter of transformers' SigLIP id warning)

        # the real folder's tokenizer: SiglipTokenizer over a SentencePiece model (spiece.model), which lowercases
        # and drops punctuation before encoding, so its pieces are learnt from text in that form
        (out / "spiece.model").write_bytes(_train_sentencepiece(self.vocab_size))
        # and, as the real folders' tokenizer_config.json declares, input ids alone: no attention mask, so the text
        # tower attends to its padding as it was trained to
        tokenizer = SiglipTokenizer(
            vocab_file=str(out / "spiece.model"), model_max_length=self.text_max_length, model_input_names=["input_ids"]
        )
        tokenizer.save_pretrained(out)
        tower = dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
        )
        eos = tokenizer.convert_tokens_to_ids("</s>")
        config = SiglipConfig(
            text_config=dict(
                tower,
                vocab_size=len(tokenizer),
                max_position_embeddings=self.text_max_length,
                pad_token_id=eos,
                bos_token_id=eos,
                eos_token_id=eos,
            ),
            vision_config=dict(tower, image_size=self.image_size, patch_size=self.patch_size),
        )
        torch.manual_seed(self.seed)
        SiglipModel(config).save_pretrained(out)
        processor = {
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
        (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


@dataclass(frozen=True)
class _TinyCausalLM(_Writer):
    """The sizes a tiny causal LM shares across families, and its save: tokenizer, random model, greedy
    generation config."""

    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 1024
    seed: int = 0

    def _save(self, out: Path, tokenizer, config_class, model_class, *, generation: dict, **config) -> None:
        """`config` holds what differs between families (tokens, tying, init)."""
        from transformers import GenerationConfig

        tokenizer.save_pretrained(out)
        torch.manual_seed(self.seed)
        sizes = dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
        )
        model = model_class(config_class(vocab_size=len(tokenizer), **sizes, **config))
        model.generation_config = GenerationConfig(do_sample=False, **generation)
        model.save_pretrained(out)


@dataclass(frozen=True)
class TinyQwen2(_TinyCausalLM):
    """A random Qwen2 causal LM with a byte-level BPE tokenizer and the Qwen2.5 chat template.

    `initializer_range` is the std of the random init; None scales it to the width (hidden_size ** -0.5).
    Qwen2's own default, 0.02, suits widths near 1000: at width 64 every layer starts with a gain near 0.16,
    attention is uniform, and the from-scratch LM sits on the answer prior for thousands of steps before it
    reads the visual tokens.
    """

    initializer_range: float | None = None

    def write(self, out: Path) -> None:
        from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_train_bpe(self.vocab_size, QWEN_SPECIAL_TOKENS),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
            model_max_length=self.max_position_embeddings,
        )
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        self._save(
            out,
            tokenizer,
            Qwen2Config,
            Qwen2ForCausalLM,
            generation=dict(eos_token_id=eos, pad_token_id=pad),
            tie_word_embeddings=True,
            initializer_range=self.hidden_size**-0.5 if self.initializer_range is None else self.initializer_range,
            bos_token_id=pad,
            eos_token_id=eos,
            pad_token_id=pad,
        )


@dataclass(frozen=True)
class TinyClip(_Writer):
    """A random CLIP (vision + text towers, projections) in the clip-vit-large-patch14-336 folder layout."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    projection_dim: int = 48
    image_size: int = 112
    patch_size: int = 16
    text_max_length: int = 32
    vocab_size: int = 384
    # 2: the tokenizer gives an attention mask, as the real CLIPTokenizer does (1 gave none); a cached folder of
    # version 1 is rewritten (the same weights)
    files_version: int = 2
    seed: int = 0

    def write(self, out: Path) -> None:
        from tokenizers import processors
        from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

        tok = _train_bpe(self.vocab_size, ["<|startoftext|>", "<|endoftext|>"])
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[(t, tok.token_to_id(t)) for t in ("<|startoftext|>", "<|endoftext|>")],
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            model_max_length=self.text_max_length,
            model_input_names=["input_ids", "attention_mask"],
        )
        tokenizer.save_pretrained(out)
        tower = dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
        )
        bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
        config = CLIPConfig(
            text_config=dict(
                tower,
                vocab_size=len(tokenizer),
                max_position_embeddings=self.text_max_length,
                pad_token_id=eos,
                bos_token_id=bos,
                eos_token_id=eos,
            ),
            vision_config=dict(tower, image_size=self.image_size, patch_size=self.patch_size),
            projection_dim=self.projection_dim,
        )
        torch.manual_seed(self.seed)
        CLIPModel(config).save_pretrained(out)
        processor = {  # the older format, as openai/clip-vit-large-patch14-336 ships it: sides as bare numbers
            "feature_extractor_type": "CLIPFeatureExtractor",
            "do_resize": True,
            "size": self.image_size,
            "do_center_crop": True,
            "crop_size": self.image_size,
            "resample": 3,
            "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        }
        (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


@dataclass(frozen=True)
class TinyLlama(_TinyCausalLM):
    """A random Llama causal LM with a Llama-3-style tokenizer (no pad token) and chat template."""

    def write(self, out: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_train_bpe(self.vocab_size, LLAMA_SPECIAL_TOKENS),
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            additional_special_tokens=LLAMA_SPECIAL_TOKENS[1:],
            model_max_length=self.max_position_embeddings,
        )
        tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
        bos, eos = tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>"])
        self._save(
            out,
            tokenizer,
            LlamaConfig,
            LlamaForCausalLM,
            generation=dict(bos_token_id=bos, eos_token_id=eos),
            tie_word_embeddings=False,
            initializer_range=self.hidden_size**-0.5,
            bos_token_id=bos,
            eos_token_id=eos,
        )
