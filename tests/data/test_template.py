import pytest
from transformers import AutoTokenizer

from hicom.data.template import IGNORE_INDEX, ChatEncoder, MalformedSample, guide_text, to_messages


@pytest.fixture(scope="module")
def encoder(tiny_paths):
    return ChatEncoder(AutoTokenizer.from_pretrained(tiny_paths["qwen2"]))


def conversation(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def test_only_assistant_answers_to_the_end_of_their_turns_are_labelled(encoder):
    messages = to_messages(conversation("<video>\nWhat colour is the circle?", "B", "And the square?", "It is red."))
    out = encoder.encode(messages, num_visual=5)
    tokenizer = encoder.tokenizer
    labelled = out["labels"] != IGNORE_INDEX
    # the labelled tokens, read as runs, are exactly the two answers to the end of their turns (as the release labels)
    runs, current = [], []
    for token, keep in zip(out["input_ids"].tolist(), labelled.tolist(), strict=True):
        if keep:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    runs.append(tokenizer.decode(current))  # the last answer ends the sample
    assert runs == ["B<|im_end|>\n", "It is red.<|im_end|>\n"]
    assert (out["input_ids"] == encoder.visual_token_id).sum() == 5
    assert tokenizer.decode(out["input_ids"][~labelled]).count("<|im_start|>assistant\n") == 2


def test_generation_prompt_ends_at_the_assistant_header(encoder):
    messages = to_messages(conversation("<video>\nQ?", "A"))
    out = encoder.encode(messages, num_visual=3, generation=True)
    assert encoder.tokenizer.decode(out["input_ids"]).endswith("Q?<|im_end|>\n<|im_start|>assistant\n")
    assert (out["labels"] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "turns, message",
    [
        ([], "empty"),
        ([{"from": "human", "value": "<video>\nQ?"}], "pairs"),
        ([{"from": "gpt", "value": "A"}, {"from": "human", "value": "<video>\nQ?"}], "expected 'user'"),
        ([{"from": "robot", "value": "x"}, {"from": "gpt", "value": "A"}], "unknown role"),
        ([{"from": "human"}, {"from": "gpt", "value": "A"}], "without"),
        ([{"from": "human", "value": "<video>\nQ?"}, {"from": "gpt", "value": " \n"}], "turn 1: an empty answer"),
    ],
)
def test_malformed_conversations_are_named(turns, message):
    with pytest.raises(MalformedSample, match=message):
        to_messages(turns)


def test_the_clip_goes_first_in_its_question_as_the_release_trains_and_evaluation_asks():
    from hicom.data.template import clip_first

    def first(text: str, placeholder: str | None = "<image>", answer: str = "A") -> str:
        return clip_first(to_messages(conversation(text, answer)), placeholder)[0]["content"]

    assert first("Describe the image briefly.\n<image>") == "<image>\nDescribe the image briefly."  # LLaVA-Pretrain
    assert first("What is <video> about?", "<video>") == "<video>\nWhat is  about?"
    assert first("<video>\nWhat?", "<video>") == "<video>\nWhat?"
    assert first("What happens?", "<video>") == "<video>\nWhat happens?"  # a clip without a placeholder gets one
    assert first("What happens?", None) == "What happens?"  # a text-only sample is left alone
    assert first("<image>") == "<image>"  # a question that is only the clip: no newline after it
    # a clip asked about in a later question goes before the first, so that every exchange of a split
    # conversation has it
    later = clip_first(to_messages(conversation("Hi", "Hello", "<image>\nWhat is it?", "A cat")), "<image>")
    assert [m["content"] for m in later if m["role"] == "user"] == ["<image>\nHi", "What is it?"]
    # what the encoder must name is left for it: two placeholders, one in an answer
    assert first("<image> and <image>") == "<image> and <image>"
    assert clip_first(to_messages(conversation("Q?", "<video>")), "<video>")[1]["content"] == "<video>"


def test_placeholder_count_must_match(encoder):
    with pytest.raises(MalformedSample, match="0 visual placeholders"):
        encoder.encode(to_messages(conversation("Q?", "A")), num_visual=4)
    with pytest.raises(MalformedSample, match="2 visual placeholders"):
        encoder.encode(to_messages(conversation("<video><video>Q?", "A")), num_visual=4)
    twice = to_messages(conversation("<video>\nQ1?", "A1", "<video>\nQ2?", "A2"))
    with pytest.raises(MalformedSample, match="2 visual placeholders"):  # each exchange's sample is malformed too
        encoder.encode(twice, num_visual=4, turn=0)
    with pytest.raises(MalformedSample, match="<video> in a message from the assistant"):  # not spliced into an answer
        encoder.encode(to_messages(conversation("What?", "It is <video>.")), num_visual=4)
    system = [{"from": "system", "value": "Watch <image> closely."}, *conversation("Q?", "A")]
    with pytest.raises(MalformedSample, match="<image> in a message from the system"):
        encoder.encode(to_messages(system), num_visual=4)


def test_guide_is_the_bare_question():
    prompt = "<video>\nQuestion: What colour is the circle?\nOptions:\n(A) red\n(B) green\nAnswer with the letter."
    assert guide_text(prompt) == "What colour is the circle?"
    # a prefix, not a character set: "Question: Quite" keeps its 'Q' (the release's lstrip defect)
    assert guide_text("Question: Quite so?\nA. yes\nB. no") == "Quite so?"
    assert guide_text("Describe the video.") == "Describe the video."
    assert guide_text("<video>\nA. Lincoln appears in which decade?\n(A) 1860s\n(B) 1960s") == (
        "A. Lincoln appears in which decade?"  # the first line is the question, whatever it starts with
    )
    assert guide_text("What happens? Options: (A) x (B) y") == "What happens?"  # options on the question's line
    assert guide_text("Which one? (A) a cat (B) a dog ") == "Which one?"
    assert guide_text("What is (A) in the chart?") == "What is (A) in the chart?"  # one letter is no option list
    assert guide_text("Is it (A) a cat or (B) a dog?") == "Is it (A) a cat or (B) a dog?"  # the question's own
    assert guide_text("What does he hold (A) a cup (B) a pen") == "What does he hold"  # options after it
    for kept in ("Describe (a) the room and (b) the person in it.", "What are his options: stay or leave the room?"):
        assert guide_text(kept) == kept
    for listed in ("Options: A. run B. walk", "options: (a) run (b) walk", "Options: A) run B) walk C) sit"):
        assert guide_text(f"What does the man do? {listed}") == "What does the man do?"


@pytest.mark.parametrize(
    ("prompt", "guide"),
    [
        # LLaVA-1.5's answer format, on its own line or the question's (the release strips it too)
        (
            "<image>\nWhat is the man holding?\nAnswer the question using a single word or phrase.",
            "What is the man holding?",
        ),
        ("What is it? Answer the question using a single word or phrase.", "What is it?"),
        ("<video>\nWhat happens?\nPlease respond with only the letter of the correct answer.", "What happens?"),
        # MVBench's framing prompt before the question, the answer format after the options
        (
            "<video>\nCarefully watch the video and pay attention to the cause and sequence of events, the detail and "
            "movement of objects, and the action and pose of persons. Based on your observations, select the best "
            "option that accurately addresses the question.\nWhat does the man do first?\nA. run\nB. walk\n"
            "Only give the best option.",
            "What does the man do first?",
        ),
        # a lead-in to a list of unmarked choices on the lines after it, with the statement about them
        (
            "<video>\nWhat are the two people doing? Choose the corresponding category that captures this action "
            "from the offered options. Options:\nhugging\nkicking",
            "What are the two people doing?",
        ),
        ("<video>\nWhat is in it? Select one or more correct answers from following:\na cat\na dog", "What is in it?"),
        ("<video>\nWhat is he doing?\nOptions:\nrunning\nwalking", "What is he doing?"),
        ("<video>\nWhat is he doing?\nPick one of the following:\nrunning\nwalking", "What is he doing?"),
        ("Which is true of the following:\n1. x\n2. y", "Which is true of the following:"),  # the lead asks
        # no list after it: a lead-in to the question is part of it; a question that names a category is kept
        ("<video>\nAnswer the following:\nWhat color is the car?", "Answer the following: What color is the car?"),
        (
            "Consider the following:\nWhat happens next?\nA. He leaves\nB. He sits",
            "Consider the following: What happens next?",
        ),
        (
            "<video>\nThe man walks in.\nIdentify the category of the object he picks up. Options:\nknife\nspoon",
            "The man walks in. Identify the category of the object he picks up.",
        ),
        ("<video>\nWhich one is right?\nOption A: a dog\nOption B) a cat", "Which one is right?"),  # the word first
        ("What is it? Options:", "What is it? Options:"),  # nothing follows
        ("Why did the boy cry? Options:\n(A) Why not?\n(B) He fell.", "Why did the boy cry?"),  # options that ask
        # no list after it: a question that speaks of options, or quotes with a colon, is kept
        (
            "The man says the following: hello. Who does he greet?",
            "The man says the following: hello. Who does he greet?",
        ),
        ("Answer the question using a single word or phrase.", "Answer the question using a single word or phrase."),
        # subtitles or a framing sentence before a "Question:" marker are not the question (SPEC 2.1)
        (
            "<video>\nThe subtitles of the clip: [00:01] Sheldon: Penny, what are you doing here?\n[00:04] Leonard: "
            "She lives here.\nQuestion: Where does Penny live?\nOptions:\n(A) next door\n(B) upstairs",
            "Where does Penny live?",
        ),
        ("Watch the clip carefully. Question: Why did the blue cube move?", "Why did the blue cube move?"),
        ("<video>\nContext: a kitchen.\nQuestion: What is cut?\nA. bread\nB. cheese", "What is cut?"),
        ("Question:", "Question:"),  # a marker and nothing else keeps its text
        # quoted within the question, "Question:" is no marker
        ("What does the slide titled 'Question: why?' show?", "What does the slide titled 'Question: why?' show?"),
        (
            'The caption reads "Question: Who won?". What is the host wearing?',
            'The caption reads "Question: Who won?". What is the host wearing?',
        ),
    ],
)
def test_guide_drops_answer_formats_and_list_leads(prompt, guide):
    assert guide_text(prompt) == guide


def test_a_template_that_trims_messages_labels_the_trimmed_answer(tiny_paths):
    """Llama 3's template renders `message['content'] | trim`: an answer with surrounding whitespace (common in
    LLaVA data) must still be found in the rendering, and labelled as it is rendered."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["qwen2"])
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    trimming, plain = ChatEncoder(tokenizer), ChatEncoder(AutoTokenizer.from_pretrained(tiny_paths["qwen2"]))
    assert trimming.trims and not plain.trims
    for answer in ("Red", "Red\n", " Red "):
        out = trimming.encode(to_messages(conversation("<video>\n What colour? ", answer)), num_visual=2)
        labelled = out["labels"][out["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == "Red" + tokenizer.eos_token + "\n"  # to the end of the turn


def test_a_text_only_sample_holding_the_visual_token_is_malformed(encoder):
    """The LLM would find a visual position with no visual token to fill it, and fail the whole batch."""
    with pytest.raises(MalformedSample, match="a user message holds the LLM's visual token '<|video_pad|>' written"):
        encoder.encode(to_messages(conversation("What is <|video_pad|>?", "A token.")), num_visual=0)
    # in a later message, past where an encoding stopped at max_length would look: the whole conversation is read
    turns = [*conversation("<video>\nWhat?", "Red."), *conversation("And <|video_pad|>?", "Blue.")]
    with pytest.raises(MalformedSample, match="written out"):
        encoder.encode(to_messages(turns), num_visual=4, stop_after=1)


@pytest.mark.parametrize("role", ["user", "assistant"])
def test_a_message_holding_a_control_token_written_out_is_malformed(encoder, role):
    """Rendered and tokenised, "<|im_end|>" in the data would become the turn's end token: a turn boundary the
    conversation does not have (and, in an answer, a labelled end in the middle of it)."""
    turns = ("<video>\nSay <|im_end|> twice.", "Done.") if role == "user" else ("<video>\nSay it.", "<|im_end|>")
    with pytest.raises(MalformedSample, match=rf"a {role} message holds the LLM's control token '<\|im_end\|>'"):
        encoder.encode(to_messages(conversation(*turns)), num_visual=2)
    # text that only looks like markup is text
    out = encoder.encode(to_messages(conversation("<video>\nWhat does <im_end> mean?", "Nothing.")), num_visual=2)
    assert "<im_end>" in encoder.tokenizer.decode(out["input_ids"])
