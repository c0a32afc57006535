"""LLaVA-format conversations to token ids and labels under the LLM's own chat template."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
PLACEHOLDERS = ("<video>", "<image>")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_OPTION_LINE = re.compile(
    r"^\s*(options?\s*:|option\s+(?:\([A-Ha-h]\)|[A-Ha-h]\s*[).:])|\(?[A-Ha-h][\).:]\s)", re.IGNORECASE
)


class MalformedSample(ValueError):
    """A sample whose conversation cannot be trained on as written."""


class TooLongSample(MalformedSample):
    """A sample over the length limit before its clip's placeholder is reached (`ChatEncoder.encode`'s `stop_after`)."""


# options written on the question's own line: "... Options: A. x B. y" (the word, then an option marker), or
# "(A) x (B) y" without the word (capitals, both letters: "(a) the room and (b) ..." is a question)
_INLINE_OPTIONS = re.compile(r"\s+(?:(?i:options?)\s*:\s*(?=\(?[A-Ha-h][).:]\s)|\(A\)\s.*\(B\)\s)")
# "Question:" as a marker: a line's start, or after the end of a sentence ("Watch closely. Question: ..."), not
# quoted within the question ("the slide titled 'Question: why?'")
_QUESTION_MARK = re.compile(r"(?:^|(?<=[.!?])\s+)Question:\s*")
# a line that leads into a list on the lines after it ends with a sentence such as "Options:" or "... from
# following:"; the statements before it that tell to choose from the offered set ("Choose the category ... from the
# offered options.") belong to the lead
_LEAD_END = re.compile(r"\b(?:options?|choices?|following)\s*:$", re.IGNORECASE)
_FROM_THE_CHOICES = re.compile(
    r"\bfrom\s+(?:the\s+)?(?:[\w-]+\s+){0,2}(?:options?|choices?|selection|list)\b|\bfrom\s+following\b", re.IGNORECASE
)


def _without_inline_options(line: str) -> str:
    """`line` without the options written on it, except where they are part of the question: "(A) x (B) y" after
    words that end no sentence, on a line that ends with "?" ("Is it (A) a cat or (B) a dog?")."""
    found = _INLINE_OPTIONS.search(line)
    if found is None:
        return line
    before = line[: found.start()]
    listed = found.group().lstrip().startswith("(A)")
    if listed and not before.endswith((".", "?", "!", ":")) and line.endswith("?"):
        return line
    return before.strip()


def _before_list_lead(line: str, after: str | None) -> str | None:
    """The part of `line` before its lead-in to the list that follows it (`after`: the next line with text), or
    None where it leads into none: no line follows, or the next one is a question ("Answer the following:\nWhat
    ...?")."""
    sentences = re.split(r"(?<=[.?!:])\s+", line.strip())
    if not _LEAD_END.search(sentences[-1]) or after is None:
        return None
    if after.rstrip().endswith("?") and not _OPTION_LINE.match(after):  # the question itself ("(A) Why not?" is none)
        return None
    sentences.pop()
    while sentences and sentences[-1].endswith(".") and _FROM_THE_CHOICES.search(sentences[-1]):
        sentences.pop()
    return " ".join(sentences)


# Sentences that tell the model how to answer, or frame every question of a dataset alike, rather than ask
# anything: the guide drops them wherever they stand, so that it is the question (SPEC 2.1) and SigLIP's 64 text
# tokens are not spent on boilerplate. The first three are those the release strips; the others are the
# instruction mixes' answer formats (LLaVA-1.5, MVBench-style multiple choice) and MVBench's framing prompt.
INSTRUCTION_SENTENCES = (
    "Answer the question using a single word or phrase.",
    "Please provide your answer by stating the letter followed by the full option.",
    "Please respond with only the letter of the correct answer.",
    "Answer with the option's letter from the given choices directly.",
    "Only give the best option.",
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement of "
    "objects, and the action and pose of persons. Based on your observations, select the best option that "
    "accurately addresses the question.",
)


def guide_text(question: str) -> str:
    """The text that guides compression: the question without placeholder, options or answer instructions.

    Lines are the question's until the first option line ("(A) ...", "B. ...", "Options:") or a line that leads into
    a list ("Choose the category ... Options:"); the first line is the question whatever it starts with ("A. Lincoln
    appears in which decade?"), and options on its own line are cut off it. `INSTRUCTION_SENTENCES` are dropped
    wherever they stand, and so is all before the last "Question:" that starts a line or follows a sentence
    (subtitles, a lead-in). A question that is nothing else keeps its text rather than guide with nothing."""
    plain = question.replace("<video>", "").replace("<image>", "")
    asked = plain
    for sentence in INSTRUCTION_SENTENCES:
        asked = asked.replace(sentence, "")
    lines = []
    given = asked.splitlines()
    for i, line in enumerate(given):
        if lines and _OPTION_LINE.match(line):
            break
        asked_before = _before_list_lead(line, next((later for later in given[i + 1 :] if later.strip()), None))
        if asked_before is not None:  # the list follows this line
            # a lead that is all the question asks ("Which is true of the following:") is the question
            lines.append(asked_before or ("" if lines else line.strip()))
            break
        if line.strip():
            lines.append(_without_inline_options(line.strip()))
    # what stands before a "Question:" marker (subtitles, a framing sentence) is not the question: the text after
    # the last marker is, as the release's guide takes it where a prompt has such a lead-in
    for k in reversed(range(len(lines))):
        marks = list(_QUESTION_MARK.finditer(lines[k]))
        if marks:
            after = " ".join(part for part in (lines[k][marks[-1].end() :], *lines[k + 1 :]) if part).strip()
            lines = [after] if after else lines  # only options after it: the text as it stands
            break
    text = " ".join(line for line in lines if line).strip()
    return text or " ".join(plain.split())


def clip_first(messages: list[dict], placeholder: str | None) -> list[dict]:
    """The clip before the words, as the release trains and as evaluation asks: a sample's one placeholder moves to
    the start of its first question, followed by a newline ("<image>\nDescribe it.", where LLaVA-Pretrain often
    writes "Describe it.\n<image>"; a placeholder in a later question moves up too, so that every exchange of a
    split conversation sees the clip), and a sample with media but no placeholder gets `placeholder` there.
    `placeholder` is None for a text-only sample. More than one placeholder, or one outside a question, is left for
    the encoder to name."""
    if placeholder is None:
        return messages
    if sum(m["content"].count(p) for m in messages for p in PLACEHOLDERS) > 1:
        return messages
    holder = next((i for i, m in enumerate(messages) if any(p in m["content"] for p in PLACEHOLDERS)), None)
    if holder is not None and messages[holder]["role"] != "user":
        return messages
    messages = [dict(m) for m in messages]
    if holder is not None:
        placeholder = next(p for p in PLACEHOLDERS if p in messages[holder]["content"])
        messages[holder]["content"] = messages[holder]["content"].replace(placeholder, "").strip()
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    rest = messages[first]["content"]
    messages[first]["content"] = f"{placeholder}\n{rest}" if rest else placeholder
    return messages


def check_placeholders(messages: list[dict], clip: bool) -> None:
    """One placeholder, in a question, for a sample with a clip; none for a text-only one."""
    found = 0
    for message in messages:
        for placeholder in PLACEHOLDERS:
            count = message["content"].count(placeholder)
            if count and message["role"] != "user":  # spliced into an answer or the system text otherwise
                raise MalformedSample(
                    f"{placeholder} in a message from the {message['role']}: the clip belongs to a question"
                )
            found += count
    if found != (1 if clip else 0):
        raise MalformedSample(f"{found} visual placeholders for {'one clip' if clip else 'a text-only sample'}")


def user_turns(messages: list[dict]) -> list[str]:
    """The user messages' texts, in order: one question per exchange."""
    return [m["content"] for m in messages if m["role"] == "user"]


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({"from", "value"}) to chat messages, checking roles and alternation."""
    if not isinstance(conversations, list) or not conversations:
        raise MalformedSample("empty or missing 'conversations'")
    messages = []
    for turn in conversations:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise MalformedSample(f"a turn without a text 'from'/'value': {turn!r:.80}")
        role = _ROLES.get(turn["from"])
        if role is None:
            raise MalformedSample(f"unknown role {turn['from']!r}")
        messages.append({"role": role, "content": turn["value"]})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if len(body) < 2 or len(body) % 2:
        raise MalformedSample(f"{len(body)} turns: expected user/assistant pairs")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise MalformedSample(f"turn {i} is {message['role']!r}, expected {expected!r}")
        if expected == "assistant" and not message["content"].strip():  # it would teach the model to say nothing
            raise MalformedSample(f"turn {i}: an empty answer")
    return messages


@dataclass
class ChatEncoder:
    """Encodes messages with the tokenizer's chat template; only assistant answers are labelled, each to the end of
    its turn as the template writes it (its end token, and Qwen's newline after it).

    The placeholder in the user text becomes one visual token, expanded to `num_visual` copies after tokenisation.
    """

    tokenizer: object
    visual_token: str = "<|video_pad|>"

    def __post_init__(self) -> None:
        if self.tokenizer.chat_template is None:
            raise ValueError("the LLM tokenizer has no chat template")
        vid = self.tokenizer.convert_tokens_to_ids(self.visual_token)
        if vid is None or vid == self.tokenizer.unk_token_id:
            raise ValueError(f"the LLM tokenizer has no {self.visual_token!r} token for visual placeholders")
        self.visual_token_id = vid
        self.end_token = self.tokenizer.eos_token
        # the tokenizer's control tokens (turn markers, end of text): written out in a message, one would be read as
        # the control token itself, a turn boundary the data does not have
        added = getattr(self.tokenizer, "added_tokens_decoder", {}).values()
        specials = {t.content for t in added if t.special} | set(self.tokenizer.all_special_tokens)
        specials = sorted(specials - {self.visual_token, ""})
        self.control_tokens = re.compile("|".join(map(re.escape, specials)) if specials else "(?!)")  # or none
        # a template that trims each message (Llama 3's `content | trim`) would render an answer with surrounding
        # whitespace differently from the text labelled: such templates get the messages trimmed first
        probe = self._render([{"role": "user", "content": " probe "}])
        self.trims = " probe " not in probe
        try:  # a template that cannot label an answer fails every sample: said once, here
            self.encode([{"role": "user", "content": "<video>\nprobe"}, {"role": "assistant", "content": "probe"}], 1)
        except ValueError as err:
            raise ValueError(
                f"the LLM tokenizer's chat template cannot be trained on ({err}): each answer must be rendered "
                f"followed by the tokenizer's end token {self.end_token!r}; is the folder's tokenizer_config.json "
                "the chat model's?"
            ) from err

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(
        self,
        messages: list[dict],
        num_visual: int,
        generation: bool = False,
        turn: int | None = None,
        stop_after: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """`generation=True` drops the last answer and ends with the assistant prompt (for decoding).

        `turn=j` makes the sample of the j-th exchange (0-based): the conversation up to and including the j-th
        answer, with only that answer labelled (the earlier turns are unlabelled context).

        `stop_after=n`: the encoding stops after the message that takes it past n tokens (the clip's placeholder
        counted as one), giving that prefix, for a sample that is then too long or cut to a prefix anyway. Each message renders the conversation up to it again, so a record of thousands of exchanges
        (a bad conversion) would otherwise take minutes; a placeholder not reached by then raises TooLongSample."""
        messages = [dict(m) for m in messages]
        # the whole conversation, before a turn's cut: a record malformed in a later question is malformed in each
        # of its samples, as it is for preflight and for training without split turns
        check_placeholders(messages, bool(num_visual))
        written = [m["role"] for m in messages if self.visual_token in m["content"]]
        if written:  # checked on the whole conversation: an encoding stopped at max_length would not see a later one
            raise MalformedSample(
                f"a {written[0]} message holds the LLM's visual token {self.visual_token!r} written out: it would "
                "take the place of visual tokens"
            )
        written = [(m["role"], found[0]) for m in messages if (found := self.control_tokens.search(m["content"]))]
        if written:
            role, token = written[0]
            raise MalformedSample(
                f"a {role} message holds the LLM's control token {token!r} written out: it would be read as the "
                "token itself (a turn boundary the conversation does not have)"
            )
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        supervised_turn = None
        if turn is not None:
            if not 0 <= turn < len(answers):
                raise MalformedSample(f"turn {turn} of a conversation with {len(answers)} answers")
            messages = messages[: answers[turn] + 1]
            supervised_turn = answers[turn]
        for message in messages:
            if self.trims:
                message["content"] = message["content"].strip()
            for placeholder in PLACEHOLDERS:
                message["content"] = message["content"].replace(placeholder, self.visual_token)
        if generation:
            messages = messages[:-1]
        ids: list[int] = []
        labels: list[int] = []
        done, stopped = "", False
        for i, message in enumerate(messages):
            if stop_after is not None and len(ids) > stop_after:
                stopped = True
                break
            if message["role"] == "assistant":
                head = self._render(messages[:i], generation_prompt=True)
                full = self._render(messages[: i + 1])
                answer = message["content"] + self.end_token
                if not (head.startswith(done) and full.startswith(head + answer)):
                    raise ValueError("the chat template does not render turns as a growing prefix")
                labelled = supervised_turn is None or i == supervised_turn
                for text, supervised in (
                    (head[len(done) :], False),
                    (answer, labelled),
                    # what the template writes after the end token closes the turn (Qwen's newline): the release
                    # labels the whole turn, and so the loss is taken over the same tokens
                    (full[len(head + answer) :], labelled),
                ):
                    piece = self._ids(text)
                    ids += piece
                    labels += piece if supervised else [IGNORE_INDEX] * len(piece)
            else:
                full = self._render(messages[: i + 1])
                piece = self._ids(full[len(done) :])
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
            done = full
        if generation and not stopped:
            piece = self._ids(self._render(messages, generation_prompt=True)[len(done) :])
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        input_ids = torch.tensor(ids, dtype=torch.long)
        label_ids = torch.tensor(labels, dtype=torch.long)
        if num_visual:
            where = (input_ids == self.visual_token_id).nonzero().flatten()
            if stopped and not len(where):
                raise TooLongSample(f"over {stop_after} text tokens before the clip's placeholder")
            if len(where) != 1:
                raise MalformedSample(f"the placeholder tokenised to {len(where)} visual tokens")
            at = int(where[0])
            repeat = torch.full((num_visual,), self.visual_token_id, dtype=torch.long)
            input_ids = torch.cat([input_ids[:at], repeat, input_ids[at + 1 :]])
            label_ids = torch.cat([label_ids[:at], torch.full_like(repeat, IGNORE_INDEX), label_ids[at + 1 :]])
        return {"input_ids": input_ids, "labels": label_ids}


def cut_text(encoded: dict[str, torch.Tensor], visual_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """The release's cut of a long sample: its text is cut to `max_length` tokens, counted as the release's
    tokenizer counted them, the run of visual tokens as the one placeholder it was; so a sequence reaches
    `max_length` + visual tokens - 1. A cut that would leave no labelled token or part of the visual tokens
    raises MalformedSample (the release trained the first without a loss and failed on the second)."""
    ids, labels = encoded["input_ids"], encoded["labels"]  # (L,)
    visual = ids == visual_token_id
    run_start = visual.clone()
    run_start[1:] &= ~visual[:-1]
    place = torch.cumsum((~visual | run_start).long(), 0)  # a token's place in the release's text, from 1
    keep = place <= max_length  # a prefix: places never decrease
    if bool(keep.all()):
        return encoded
    if bool(visual[~keep].any()):
        raise MalformedSample(f"cut to max_length {max_length} text tokens, the visual tokens would be cut")
    if not bool((labels[keep] != IGNORE_INDEX).any()):
        raise MalformedSample(f"cut to max_length {max_length} text tokens, no answer token would be left")
    return {"input_ids": ids[keep], "labels": labels[keep]}
