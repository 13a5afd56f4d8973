"""Conversation templates and training label masks (one home for both).

The chat API renders generation prompts with :meth:`Template.render`, and the training dataset turns a
``conversations`` list into ``input_ids``/``labels`` with :func:`tokenize_conversation`. Keeping both in one module
means a prompt seen in training and a prompt built at inference can never drift apart.

Template strings, default system messages and the per-template tokenization rules are facts taken from the official
InternVL ``conversation.py`` / ``preprocess_*`` functions. The
masking code itself is our own: every prompt is described as a list of text chunks flagged "supervised" or not, and a
token is supervised when it falls inside a supervised chunk, where each chunk boundary sits at the token count of the
text before it (which is also how the official code measures its turns).

Tokenization rules per template (``input_ids`` identical to the official preprocessing wherever it was clean):

- ``Hermes-2``, ``phi3-chat``, ``internvl_zh`` and unknown custom templates: the whole prompt is tokenized at once.
- ``internlm2-chat``: the same, after ``str.strip()`` of every message.
- ``internvl2_5`` and ``internvl3_5_gpt_oss``: the system block and every message are tokenized separately and
  concatenated (no BPE merge crosses a message boundary); a tokenizer that adds a BOS keeps exactly one, at position 0.
- ``internvl3_5_gpt_oss`` (harmony): ``<|start|>system<|message|>...<|end|>``, ``<|start|>user<|message|>...<|end|>``
  and ``<|start|>assistant<|channel|>final<|message|>...`` ended by ``<|return|>`` for the conversation's last
  message and ``<|end|>`` before; only ``<|start|>assistant`` of an assistant message is masked (its channel header,
  reply and end are supervised, as officially).
- Supervised tokens are the assistant reply and its end token (``<|im_end|>``, ``<|end|>``, ``</s>``); the system
  block, user turns (image tokens included), role headers, BOS and the ``"\\n"`` after ``<|im_end|>`` in
  ``internvl2_5`` are masked with -100. ``phi3-chat`` also masks every ``<|endoftext|>`` token.

Differences from the official preprocessing
-------------------------------------------
The official code either raised, or printed ``WARNING: tokenization mismatch ... (ignored)`` and silently trained on
all -100 labels, in the cases below. We never return a sample without a supervised token.

- A leading ``system`` turn sets the system message for every template (official: only ``internvl2_5``; the others
  raised ``KeyError: 'system'``, and ``internvl_zh``'s empty system template dropped any system message).
  ``internlm2-chat`` strips it like every other message.
- Consecutive turns of the same role are rendered in order and every assistant turn is supervised (official: only
  ``internvl2_5`` accepted them; the others raised ``AssertionError``).
- Multi-turn ``Hermes-2`` with a BOS-adding tokenizer (a BOS counted once per round), ``internlm2-chat`` with a
  tokenizer that adds no BOS (Qwen2), multi-turn ``phi3-chat`` (offset corrections), and message text containing a
  separator literally (e.g. ``<|im_end|>``, taken for a turn boundary): the official turn splitter miscounted and
  dropped every label. We never split the rendered text: assistant turns are supervised by our own chunk boundaries,
  whatever the text holds. ``input_ids`` stay the official ones (a separator written in the text becomes that
  special token, exactly as the official tokenizer call made it).
- ``internvl_zh`` is trainable (reply ``" {answer}</s>"`` supervised); the official generic ``preprocess`` never
  matched its format and dropped all labels.
- ``<image>`` placeholders: an ``<image>`` inside an assistant turn that would receive an image raises ``ValueError``
  (official: the image tokens landed inside the supervised answer). For ``internvl2_5`` images left without a
  placeholder raise ``ValueError`` (official: ``AssertionError``). For the whole-prompt templates such images are left
  out, exactly as the official function did: the dataset layer prepends ``"<image>\\n"`` to single-image samples and
  must check the number of ``<img>`` blocks, as the official dataset does.
- ``max_length`` never cuts an image block: a sample whose image tokens do not all fit raises
  :class:`SampleTooLongError` (official: the cut happened and a later ``</img>`` count assertion rejected the sample),
  and so does a sample whose supervised tokens are all cut away (official: a silent all -100 sample).
- No padding here (official: padded to ``model_max_length`` when neither ``group_by_length`` nor packing was on);
  padding belongs to the collator. The tokenizer's ``padding_side`` is never changed (official ``phi3`` forced right).
- An empty message (after ``internlm2-chat``'s strip) is written as the bare role with no separator by the
  whole-prompt templates, as the official ``get_prompt`` does (the official ``internlm2-chat`` labels of such samples
  are clean, and ours equal them); ``internvl2_5`` tokenizes it as ``role + sep``, as its official preprocessing does.
  An empty reply supervises nothing. :meth:`Template.render` (the chat API) keeps ``""`` as a message and only
  ``None`` as the generation slot.
- ``max_length`` cuts of multi-turn samples: the official code skips its mismatch check once a sample reaches the
  maximum length, so for multi-turn ``phi3-chat``, ``Hermes-2`` with a BOS tokenizer and ``internlm2-chat`` with a
  no-BOS tokenizer it returns shifted labels without a warning (e.g. ``<|assistant|>`` headers supervised instead of
  the replies' ends). Ours are the uncut labels cut at ``max_length``: the same ``input_ids``, correct labels.
- As in the official code, a leading assistant turn (after an optional system turn) is dropped for every template
  except ``internvl2_5`` and ``internvl3_5_gpt_oss``, which keep and supervise it.
- ``internvl3_5_gpt_oss``: the official preprocessing raised on every text-only sample (``NameError``: its end token
  was chosen with a loop variable of the image loop), and with images it ended a reply with ``<|return|>`` or
  ``<|end|>`` depending on how many images the last user turn had. Ours always ends the last message with
  ``<|return|>`` and earlier replies with ``<|end|>`` (the harmony rule the official chat template follows).
  In chat, past replies are rendered with their ``<|channel|>final<|message|>`` header, as in training (official
  chat: without it); generation stops at ``<|return|>`` and the header is removed from the answer.
- An exception from the tokenizer itself (e.g. ``TypeError`` or a Rust panic on a lone surrogate) is raised as
  :class:`TokenizerError` (a ``ValueError``) naming the original, so one sample's text never stops a run unnamed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from internvl_chat.constants import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
)
from internvl_chat.data.validation import ASSISTANT_ROLES, GPT, HUMAN, SYSTEM, USER_ROLES, official_role

__all__ = [
    "TEMPLATE_NAMES",
    "THINKING_SYSTEM_PROMPT",
    "SampleTooLongError",
    "Template",
    "TokenizerError",
    "get_template",
    "image_block",
    "split_thinking",
    "thinking_system_message",
    "tokenize_conversation",
]

STYLE_MPT = "mpt"
STYLE_INTERNVL_ZH = "internvl_zh"
STYLE_HARMONY = "harmony"

# GPT-OSS's harmony format: an assistant message opens a channel; "final" holds the answer, "analysis" the reasoning.
HARMONY_FINAL = "<|channel|>final<|message|>"
HARMONY_ANALYSIS = "<|channel|>analysis<|message|>"

# Official default system messages (conversation.py).
_SYSTEM_INTERNVL2 = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
_SYSTEM_INTERNVL2_5 = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
# InternVL3.5-GPT-OSS (internvl_chat_gpt_oss/.../conversation.py): a harmony system message, final channel only.
_SYSTEM_GPT_OSS = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)
# The thinking-mode system prompt of InternVL3/3.5 (the official SFT/MPO code's and VLMEvalKit's R1_SYSTEM_PROMPT):
# the answer starts with its reasoning inside <think>...</think>. It ends with a newline.
THINKING_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason "
    "through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the "
    "answer from the think section with a newline.\n\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section.\n"
)


class SampleTooLongError(ValueError):
    """A sample cannot be cut to ``max_length`` without losing image tokens or every supervised token.

    The dataset layer should count and skip such samples rather than train on a broken one.
    """


class TokenizerError(ValueError):
    """The tokenizer raised on a sample's text (e.g. a Rust tokenizer's ``TypeError`` or panic on a lone
    surrogate, which the dataset's JSON reading already refuses as ``invalid_unicode``).

    Any exception from a tokenizer call becomes this, with the original type and message, so the dataset can
    skip and name the sample (kind ``tokenizer_error``) instead of a bare traceback stopping the run.
    """


Chunk = tuple[str, bool]  # (text, supervised)


@dataclass(frozen=True)
class Template:
    """One chat format, rendered the official ``SeparatorStyle.MPT`` way.

    ``render`` gives ``system_template(system_message) + sep``, then ``role + text + sep`` per message; a ``None``
    text gives just the role (the generation slot). ``internvl_zh`` (InternVL-Chat-V1.1) has its own style:
    ``system + sep2``, then ``role + ": " + text`` followed by ``sep2`` after user turns and ``sep`` after assistant
    turns, and a bare ``role + ":"`` for the generation slot; there ``sep`` (``</s>``) ends an answer and ``sep2``
    (``" "``) separates the rest. ``harmony`` (InternVL3.5-GPT-OSS, the official ``MPT_TWO``) writes an assistant
    message as ``role + reply_header + text`` ended by ``sep2`` (``<|return|>``) when it is the last message and by
    ``sep`` (``<|end|>``) otherwise; generation stops at ``sep2``.
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    sep2: str = ""
    style: str = STYLE_MPT
    reply_header: str = ""  # supervised text between the assistant role and its reply (harmony's final channel)

    @property
    def stop_str(self) -> str:
        """The token that ends an assistant reply: the generation ``eos_token_id`` (official ``sep.strip()``, or
        ``sep2`` where the official template has a last-turn end)."""
        return self.sep2.strip() if self.style == STYLE_HARMONY else self.sep.strip()

    @property
    def skip_special_tokens(self) -> bool:
        """Whether a reply is decoded without special tokens. The harmony header is made of them, so it is kept
        there to be parsed (the official GPT-OSS chat decodes with them too)."""
        return self.style != STYLE_HARMONY

    def reply_text(self, decoded: str, partial: bool = False) -> str:
        """The answer in a decoded generation: the text before the stop string, stripped.

        Harmony replies lose their ``<|channel|>final<|message|>`` header, and reasoning written in the analysis
        channel becomes ``<think>\\n...\\n</think>\\n\\n`` before the final answer (the thinking format of the other
        templates). ``partial=True`` is for a reply still streaming: an incomplete header shows nothing yet and the end
        is not stripped, so the result only grows as text arrives.
        """
        text = decoded.split(self.stop_str)[0] if self.stop_str else decoded
        if self.style == STYLE_HARMONY:
            text = _harmony_reply(text, partial)
        return text.lstrip() if partial else text.strip()

    def render(self, messages: Sequence[tuple[str, str | None]], system_message: str | None = None) -> str:
        """Render ``[(role_string, text_or_None), ...]`` to the prompt text (system block included).

        ``system_message=None`` uses the template default; role strings are ``self.roles[0]`` / ``self.roles[1]``.
        """
        return "".join(text for group in self.chunk_groups(messages, system_message) for text, _ in group)

    def chunk_groups(
        self, messages: Sequence[tuple[str, str | None]], system_message: str | None = None
    ) -> list[list[Chunk]]:
        """The rendered prompt as one chunk list per block (system block, then each message).

        A chunk is ``(text, supervised)``: supervised chunks are an assistant reply plus its end token, the part a
        model must learn to generate after the assistant header.
        """
        if self.style not in (STYLE_MPT, STYLE_INTERNVL_ZH, STYLE_HARMONY):
            raise ValueError(f"template {self.name!r} has unknown style {self.style!r}")
        system = self.system_message if system_message is None else system_message
        system_text = self.system_template.replace("{system_message}", system)
        zh = self.style == STYLE_INTERNVL_ZH
        groups: list[list[Chunk]] = [[(system_text + (self.sep2 if zh else self.sep), False)]]
        # Supervise the end token but not whitespace after it (internvl2_5's "<|im_end|>\n").
        end = self.sep.rstrip()
        tail = self.sep[len(end):]
        for index, (role, text) in enumerate(messages):
            is_assistant = role == self.roles[1]
            if self.style == STYLE_HARMONY and is_assistant and text is not None:
                last = index == len(messages) - 1
                group = [(role, False), (self.reply_header + text + (self.sep2 if last else self.sep), True)]
            elif zh:
                header = role + ":"
                if text is None:
                    group = [(header, False)]
                elif is_assistant:
                    group = [(header, False), (" " + text + end, True), (tail, False)]
                else:
                    group = [(header + " " + text + self.sep2, False)]
            elif text is None:
                group = [(role, False)]
            elif is_assistant:
                group = [(role, False), (text + end, True), (tail, False)]
            else:
                group = [(role + text + self.sep, False)]
            groups.append([chunk for chunk in group if chunk[0]])
        return groups


_TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="Hermes-2",
            system_template="<|im_start|>system\n{system_message}",
            system_message=_SYSTEM_INTERNVL2,
            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            sep="<|im_end|>",
        ),
        # Same prompt as Hermes-2 at inference; differs only in training tokenization (see _RULES).
        Template(
            name="internlm2-chat",
            system_template="<|im_start|>system\n{system_message}",
            system_message=_SYSTEM_INTERNVL2,
            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            sep="<|im_end|>",
        ),
        Template(
            name="phi3-chat",
            system_template="<|system|>\n{system_message}",
            system_message=_SYSTEM_INTERNVL2,
            roles=("<|user|>\n", "<|assistant|>\n"),
            sep="<|end|>",
        ),
        Template(
            name="internvl2_5",
            system_template="<|im_start|>system\n{system_message}",
            system_message=_SYSTEM_INTERNVL2_5,
            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            sep="<|im_end|>\n",
        ),
        # InternVL3.5-GPT-OSS. Official chat renders past replies without the final-channel header that its training
        # data has; ours always writes it, so a prompt seen in chat is one seen in training.
        Template(
            name="internvl3_5_gpt_oss",
            system_template="<|start|>system<|message|>{system_message}",
            system_message=_SYSTEM_GPT_OSS,
            roles=("<|start|>user<|message|>", "<|start|>assistant"),
            sep="<|end|>",
            sep2="<|return|>",
            style=STYLE_HARMONY,
            reply_header=HARMONY_FINAL,
        ),
        # Official system_template is "", which silently drops any system message; with the default empty
        # message "{system_message}" renders the same text and lets a system turn through.
        Template(
            name="internvl_zh",
            system_template="{system_message}",
            system_message="",
            roles=("<human>", "<bot>"),
            sep="</s>",
            sep2=" ",
            style=STYLE_INTERNVL_ZH,
        ),
    )
}

TEMPLATE_NAMES: tuple[str, ...] = tuple(_TEMPLATES)


def _harmony_reply(text: str, partial: bool) -> str:
    """A harmony generation (after ``<|start|>assistant``) as answer text; see :meth:`Template.reply_text`."""
    final_opening = "<|start|>assistant" + HARMONY_FINAL
    if partial and text and any(header.startswith(text) for header in (HARMONY_FINAL, HARMONY_ANALYSIS)):
        return ""
    if text.startswith(HARMONY_FINAL):
        return text[len(HARMONY_FINAL):]
    if not text.startswith(HARMONY_ANALYSIS):
        return text
    thought, ended, rest = text[len(HARMONY_ANALYSIS):].partition("<|end|>")
    if not ended:
        return "<think>\n" + thought
    if rest.startswith(final_opening):
        rest = rest[len(final_opening):]
    elif partial and final_opening.startswith(rest):
        rest = ""
    return "<think>\n" + thought + "\n</think>\n\n" + rest


def thinking_system_message(template: str | Template) -> str:
    """The system message that turns on the thinking mode of InternVL3/3.5 models rendered with ``template``.

    ChatML templates get the R1-style :data:`THINKING_SYSTEM_PROMPT` (the official evaluation's ``R1_SYSTEM_PROMPT``).
    The harmony template gets its own system message with high reasoning and the analysis channel allowed, as the
    official GPT-OSS training code writes it for thinking samples; the reasoning comes back as ``<think>`` text.
    """
    tpl = get_template(template) if isinstance(template, str) else template
    if tpl.style == STYLE_HARMONY:
        return (tpl.system_message.replace("Reasoning: low", "Reasoning: high")
                .replace("Valid channels: final.", "Valid channels: analysis, final."))
    return THINKING_SYSTEM_PROMPT


def split_thinking(answer: str) -> tuple[str | None, str]:
    """(reasoning, final answer) of a thinking-mode answer: the text inside ``<think>...</think>`` and what follows
    the last ``</think>``. An answer without ``</think>`` is all answer (reasoning None), unless it opened a
    ``<think>`` that never closed (cut by the token limit): then it is all reasoning and the answer is empty."""
    head, closed, tail = answer.rpartition("</think>")
    if not closed:
        if answer.lstrip().startswith("<think>"):
            return answer.lstrip().removeprefix("<think>").strip(), ""
        return None, answer.strip()
    return head.replace("<think>", "", 1).strip(), tail.strip()


def get_template(name: str) -> Template:
    """The registered template called ``name`` (the ``--conv_style`` / config ``template`` value)."""
    try:
        return _TEMPLATES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATE_NAMES)}") from None


@dataclass(frozen=True)
class _Rule:
    """How the official training code tokenized one template (its ``preprocess_*`` function)."""

    per_message: bool = False  # tokenize each block separately (internvl2_5)
    strip_messages: bool = False  # str.strip() every message first (internlm2-chat)
    unsupervised_tokens: tuple[str, ...] = ()  # tokens never supervised (phi3-chat)
    keep_leading_assistant: bool = False  # official internvl2_5 keeps it; the others drop it
    images_in_user_turns_only: bool = False  # internvl2_5 expands <image> in user turns only, others anywhere


_RULES: dict[str, _Rule] = {
    "internlm2-chat": _Rule(strip_messages=True),
    "phi3-chat": _Rule(unsupervised_tokens=("<|endoftext|>",)),
    "internvl2_5": _Rule(per_message=True, keep_leading_assistant=True, images_in_user_turns_only=True),
    "internvl3_5_gpt_oss": _Rule(per_message=True, keep_leading_assistant=True, images_in_user_turns_only=True),
}
_DEFAULT_RULE = _Rule()

def image_block(num_tokens: int) -> str:
    """The text that replaces one ``<image>``: ``<img>`` + ``<IMG_CONTEXT>`` * num_tokens + ``</img>``."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * num_tokens + IMG_END_TOKEN


def _parse_conversation(conversations: Any) -> tuple[str | None, list[tuple[bool, str]]]:
    """(system message or None, [(is_assistant, text), ...]) of the turns.

    Records that reach the templates through the dataset passed the gate of :mod:`~internvl_chat.data.validation`;
    these cheap checks stay for direct callers of :func:`tokenize_conversation` (a ``ValueError`` naming the turn).
    """
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise ValueError(f"conversations must be a list of turns, got {type(conversations).__name__}")
    if not conversations:
        raise ValueError("empty conversation: nothing to train on")
    system = None
    turns: list[tuple[bool, str]] = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {index} must be a mapping with 'from' and 'value' keys, got {turn!r}")
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise ValueError(f"turn {index} ({role!r}) has a non-string value {value!r}")
        official = official_role(role)
        if official == SYSTEM:
            if index != 0:
                raise ValueError(f"turn {index} is a 'system' turn; a system turn is only allowed first")
            system = value
        elif official in (HUMAN, GPT):
            turns.append((official == GPT, value))
        else:
            raise ValueError(
                f"turn {index} has unknown role {role!r}; expected one of "
                f"{', '.join(USER_ROLES + ASSISTANT_ROLES)} or a leading {SYSTEM!r}"
            )
    return system, turns


def _image_token_counts(num_image_tokens: int | Sequence[int] | None, text_only: bool) -> list[int]:
    if text_only or num_image_tokens is None:
        return []
    counts = [num_image_tokens] if isinstance(num_image_tokens, int) else list(num_image_tokens)
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"num_image_tokens must be positive ints (256 per tile), got {num_image_tokens!r}")
    return counts


def _affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer adds around any text on its own (e.g. BOS), found by probing.

    Probing beats reading ``add_bos_token``: that attribute is missing or wrong on some tokenizer classes.
    """
    probe = "a"
    bare = _encode(tokenizer, probe)
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError(f"cannot tell which special tokens {type(tokenizer).__name__} adds (probe {probe!r})")


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as exc:  # noqa: BLE001 - named for the dataset; see TokenizerError
        raise TokenizerError(f"the tokenizer failed on this text: {type(exc).__name__}: {_short(exc)}") from exc
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":  # KeyboardInterrupt, SystemExit
            raise
        raise TokenizerError(f"the tokenizer panicked on this text: {_short(exc)}") from exc


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _tokenize_chunks(tokenizer, chunks: list[Chunk]) -> tuple[list[int], list[bool]]:
    """Tokenize the chunks' joined text at once and flag the tokens of supervised chunks.

    A supervised chunk spans from the token count of the text before it to the token count of the text through it:
    when the tokenizer merges characters across a chunk boundary (a reply starting with "\\n"), the boundary follows
    the count, as the official code does.
    """
    text = "".join(chunk for chunk, _ in chunks)
    ids = _encode(tokenizer, text)
    supervised = [False] * len(ids)
    # Counting tokens of every prefix from scratch is quadratic in long multi-turn samples, so count from the
    # last boundary where the whole tokenization is known to split (the anchor): the piece after it is tokenized
    # alone, and when its ids equal the whole's ids there the boundary splits too and becomes the next anchor.
    # Otherwise (a merge across the boundary) the count is still exact when the anchor follows an added token
    # (tokenizers split added tokens out first, so a prefix's count adds up across them); failing that the prefix
    # is counted from scratch, as the official code does.
    anchor_chars, anchor_tokens = 0, 0

    def after_added_token() -> bool:
        if anchor_tokens == 0:
            return True
        token = tokenizer.convert_ids_to_tokens(ids[anchor_tokens - 1])
        return token in tokenizer.get_added_vocab() and text.endswith(token, 0, anchor_chars)

    def count(chars: int) -> int:
        nonlocal anchor_chars, anchor_tokens
        piece = _encode(tokenizer, text[anchor_chars:chars])
        end = anchor_tokens + len(piece)
        if ids[anchor_tokens:end] == piece:
            anchor_chars, anchor_tokens = chars, end
            return end
        return end if after_added_token() else len(_encode(tokenizer, text[:chars]))

    position = 0
    for text_chunk, is_supervised in chunks:
        start_chars, position = position, position + len(text_chunk)
        if is_supervised:
            start = min(count(start_chars), len(ids))
            stop = min(len(ids) if position == len(text) else count(position), len(ids))
            supervised[start:stop] = [True] * max(stop - start, 0)
    return ids, supervised


def _token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` when the tokenizer has it as one token, else None."""
    ids = _encode(tokenizer, token)
    return ids[0] if len(ids) == 1 else None


def tokenize_conversation(
    conversations: Sequence[Mapping[str, str]],
    template: str | Template,
    tokenizer,
    num_image_tokens: int | Sequence[int] | None,
    max_length: int | None = None,
    text_only: bool = False,
) -> dict[str, list[int]]:
    """Turn one sample's ``conversations`` into ``{"input_ids": [...], "labels": [...]}`` (plain lists, no padding).

    ``conversations``: ``[{"from": "human"|"gpt"|"system", "value": str}, ...]`` (``user``/``assistant`` accepted,
    ``system`` only first). ``num_image_tokens``: context tokens per image in order (256 per tile, thumbnail
    included), or an int for one image; the i-th ``<image>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` * n_i +
    ``</img>``. ``text_only=True`` leaves ``<image>`` as plain text (pure-text samples). ``max_length`` cuts ids and
    labels like the official hard cut, but raises :class:`SampleTooLongError` rather than cut into image tokens or
    drop every supervised token. Bad input raises ``ValueError`` naming the problem. See the module docstring for
    the per-template rules and the differences from the official preprocessing.
    """
    tpl = get_template(template) if isinstance(template, str) else template
    if not isinstance(tpl, Template):
        raise ValueError(f"template must be a name or a Template, got {type(template).__name__}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    rule = _RULES.get(tpl.name, _DEFAULT_RULE)
    system, turns = _template_turns(conversations, rule)
    counts = _image_token_counts(num_image_tokens, text_only)
    num_images = len(counts)
    tokens = None
    block_ids = _narrow_block_ids(tokenizer) if counts else None
    if block_ids:
        # Each image block tokenized with one context token and widened after: the same tokens, without
        # tokenizing thousands of context tokens once for the prompt and again for each chunk boundary count.
        pending = list(counts)
        narrow_system, messages = _expand_images(tpl, rule, system, turns, pending, block=lambda n: image_block(1))
        ids, flags = _tokenize_messages(tpl, rule, tokenizer, messages, narrow_system)
        tokens = _widen(ids, flags, counts[: num_images - len(pending)], block_ids)
    if tokens is None:  # a tokenizer that does not split image tokens out, or a context token written in the text
        pending = list(counts)
        system, messages = _expand_images(tpl, rule, system, turns, pending)
        tokens = _tokenize_messages(tpl, rule, tokenizer, messages, system)
    input_ids, supervised = tokens
    labels = [i if flag else IGNORE_INDEX for i, flag in zip(input_ids, supervised)]
    if not any(supervised):
        raise ValueError("no supervised token after tokenization (empty assistant replies?)")
    num_blocks = num_images - len(pending)
    end_id = (block_ids[2] if block_ids else _image_token_ids(tokenizer)) if num_blocks else None
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = _cut(input_ids, labels, max_length, num_blocks, end_id, len(supervised))
    return {"input_ids": input_ids, "labels": labels}


def _template_turns(conversations: Any, rule: _Rule) -> tuple[str | None, list[tuple[bool, str]]]:
    """The turns as the template's official preprocessing sees them: a leading assistant turn dropped (all but
    ``internvl2_5``), messages stripped (``internlm2-chat``)."""
    system, turns = _parse_conversation(conversations)
    if not rule.keep_leading_assistant and turns and turns[0][0]:
        turns = turns[1:]
    if not any(is_assistant for is_assistant, _ in turns):
        raise ValueError("conversation has no assistant ('gpt') turn: nothing to supervise")
    if rule.strip_messages:
        system = None if system is None else system.strip()
        turns = [(is_assistant, text.strip()) for is_assistant, text in turns]
    return system, turns


def _expand_images(
    tpl: Template, rule: _Rule, system: str | None, turns: list[tuple[bool, str]], pending: list[int],
    block: Callable[[int], str] = image_block,
) -> tuple[str | None, list[tuple[str, str | None]]]:
    """Replace ``<image>`` placeholders in prompt order with ``block(size)``, taking the sizes from ``pending``
    (consumed); the messages as ``(role string, text or None)``."""
    num_images = len(pending)

    def expand(text: str, where: str) -> str:
        while pending and IMAGE_PLACEHOLDER in text:
            if where == "assistant":
                raise ValueError(
                    f"an {IMAGE_PLACEHOLDER} placeholder in an assistant turn would receive image "
                    f"{num_images - len(pending) + 1} of {num_images}; put image placeholders in user turns"
                )
            text = text.replace(IMAGE_PLACEHOLDER, block(pending.pop(0)), 1)
        return text

    if system is not None and not rule.images_in_user_turns_only:
        system = expand(system, "system")
    messages: list[tuple[str, str | None]] = []
    for is_assistant, text in turns:
        if is_assistant:
            text = text if rule.images_in_user_turns_only else expand(text, "assistant")
        else:
            text = expand(text, "user")
        if not text and not rule.per_message:
            text = None  # the official whole-prompt rendering writes an empty message as its bare role, no separator
        messages.append((tpl.roles[1] if is_assistant else tpl.roles[0], text))
    if pending and rule.images_in_user_turns_only:
        raise ValueError(
            f"{num_images} image(s) given but only {num_images - len(pending)} {IMAGE_PLACEHOLDER} placeholder(s) "
            "in the user turns"
        )
    return system, messages


def _tokenize_messages(
    tpl: Template, rule: _Rule, tokenizer, messages: list[tuple[str, str | None]], system: str | None
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered prompt (the tokenizer's own affixes included) and which ones are supervised."""
    groups = tpl.chunk_groups(messages, system)
    if not rule.per_message:
        groups = [[chunk for group in groups for chunk in group]]
    prefix_ids, suffix_ids = _affixes(tokenizer)
    input_ids = list(prefix_ids)
    supervised = [False] * len(prefix_ids)
    for group in groups:
        ids, flags = _tokenize_chunks(tokenizer, group)
        input_ids += ids
        supervised += flags
    input_ids += suffix_ids
    supervised += [False] * len(suffix_ids)
    for token in rule.unsupervised_tokens:
        token_id = _token_id(tokenizer, token)
        if token_id is not None:
            supervised = [flag and i != token_id for i, flag in zip(input_ids, supervised)]
    return input_ids, supervised


def _block_ids(tokenizer) -> tuple[int, int, int] | None:
    """The ids of ``<img>``, ``<IMG_CONTEXT>`` and ``</img>`` when the tokenizer has each as one token."""
    ids = tuple(_token_id(tokenizer, token) for token in (IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN))
    return None if None in ids else ids


def _widen(ids: list[int], flags: list[bool], counts: list[int],
           block_ids: tuple[int, int, int] | None) -> tuple[list[int], list[bool]] | None:
    """Tokens of narrow image blocks (``<img><IMG_CONTEXT></img>``) with the i-th context token repeated
    ``counts[i]`` times; None unless the context tokens are exactly the blocks' (one per block, between its tags)."""
    if block_ids is None:
        return None
    start_id, context_id, end_id = block_ids
    where = [k for k, token in enumerate(ids) if token == context_id]
    if len(where) != len(counts) or any(not 0 < k < len(ids) - 1 or ids[k - 1] != start_id or ids[k + 1] != end_id
                                        for k in where):
        return None
    out_ids: list[int] = []
    out_flags: list[bool] = []
    last = 0
    for k, n in zip(where, counts):
        out_ids += ids[last:k] + [context_id] * n
        out_flags += flags[last:k] + [flags[k]] * n
        last = k + 1
    return out_ids + ids[last:], out_flags + flags[last:]


# Tokenizers checked by _narrow_block_ids, with the answer (weak keys: a tokenizer is not kept alive).
_NARROW_BLOCK_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _narrow_block_ids(tokenizer) -> tuple[int, int, int] | None:
    """The image tokens' ids (:func:`_block_ids`) when widening narrow image blocks gives the tokens of the full
    ones, else None. It does when they are added tokens that the tokenizer splits out before anything else
    (InternVL's are), so the text around a block tokenizes the same whatever its length; checked once per tokenizer
    on a probe with text on both sides of two blocks."""
    try:
        return _NARROW_BLOCK_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = "a {} b\n{}\n c"
    try:
        block_ids = _block_ids(tokenizer)
        full = _encode(tokenizer, probe.format(image_block(3), image_block(2)))
        narrow = _encode(tokenizer, probe.format(image_block(1), image_block(1)))
    except TokenizerError:
        block_ids = None
    else:
        if _widen(narrow, [False] * len(narrow), [3, 2], block_ids) != (full, [False] * len(full)):
            block_ids = None
    try:
        _NARROW_BLOCK_IDS[tokenizer] = block_ids
    except TypeError:  # not weakly referenceable: checked on every call
        pass
    return block_ids


def _image_token_ids(tokenizer) -> int:
    """The id of ``</img>``; a tokenizer without the InternVL special tokens cannot tokenize image samples."""
    context_id = _token_id(tokenizer, IMG_CONTEXT_TOKEN)
    end_id = _token_id(tokenizer, IMG_END_TOKEN)
    if context_id is None or end_id is None:
        raise ValueError(
            f"the tokenizer does not know {IMG_CONTEXT_TOKEN} / {IMG_END_TOKEN}: add the InternVL special tokens "
            "to it before tokenizing image samples"
        )
    return end_id


def _cut(input_ids: list[int], labels: list[int], max_length: int, num_blocks: int, end_id: int | None,
         full_length: int) -> tuple[list[int], list[int]]:
    """The official hard cut at ``max_length``, refused (:class:`SampleTooLongError`) when it would go through an
    image block or leave no supervised token."""
    if num_blocks:
        needed = max(i for i, token_id in enumerate(input_ids) if token_id == end_id) + 1
        if needed > max_length:
            raise SampleTooLongError(
                f"sample needs {needed} tokens to keep its {num_blocks} image block(s) whole, "
                f"but max_length is {max_length} (total length {len(input_ids)})"
            )
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleTooLongError(
            f"cutting the sample from {full_length} to max_length={max_length} tokens leaves no supervised token"
        )
    return input_ids, labels
