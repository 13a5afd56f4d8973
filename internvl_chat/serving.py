"""What a checkpoint needs to be served with the prompt it was trained on (vLLM, lmdeploy, transformers).

Serving engines do not run :mod:`internvl_chat.inference`: they render the tokenizer's Jinja ``chat_template`` and
stop at ``generation_config.json``'s ``eos_token_id``. A fine-tuned checkpoint whose tokenizer keeps its LLM's generic
template (Qwen's "You are Qwen..." system prompt, no InternVL system message) is prompted unlike its training data,
and one whose eos is not the template's end token never stops. :func:`write_serving_files` writes both, and every
writer of checkpoints (the Trainer's saves, ``tools/merge_lora.py``, the tiny models) calls it.

The Jinja template is derived from the :class:`~internvl_chat.data.templates.Template` object, not written by hand:
the template renders one message of each role around a sentinel, and the text on either side becomes the literals
of the Jinja source. Rendered through ``apply_chat_template(..., add_generation_prompt=True)`` it gives exactly the
token ids of :func:`internvl_chat.inference.build_prompt` (the tokenizer's BOS included, written as a literal because
``apply_chat_template`` and vLLM tokenize the rendered text without special tokens).

Messages: ``system`` (first only; its absence means the model's default system message), ``user`` and ``assistant``.
Images are the text placeholder ``<image>``, which vLLM's and lmdeploy's InternVL paths replace with the image
tokens: in string content it is written by the user where the image goes; in OpenAI-style list content each
``{"type": "image"}`` / ``{"type": "image_url"}`` part becomes ``<image>\\n`` before the text, or
``Image-1: <image>\\n`` ... for several images, as :func:`internvl_chat.inference.chat` and the official multi-image
convention write them.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import weakref
from pathlib import Path
from typing import Any

from .constants import IMAGE_PLACEHOLDER
from .data.templates import Template, _affixes, get_template
from .inference import stop_token_id

__all__ = ["build_chat_template", "end_token_ids", "renders_like", "save_servable", "write_serving_files"]

logger = logging.getLogger(__name__)

_REPLACED_FOR: weakref.WeakSet = weakref.WeakSet()  # tokenizers whose template replacement was logged (once each)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.47 writes it and reads it before tokenizer_config.json
_SENTINEL = "\x00{}\x00"

# Conversations on which an existing chat_template must render like ours to be kept (see renders_like).
_PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "You are a careful assistant."}, {"role": "user", "content": "<image>\nWhat?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Go"}],
)


def _single_quoted(text: str) -> str:
    """A single-quoted Jinja string literal for ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _literal(text: str) -> str:
    """A Jinja string literal for ``text`` (Jinja decodes the JSON escapes ``\\n``, ``\\"``, ``\\\\`` the same)."""
    return json.dumps(text, ensure_ascii=False)


def _pieces(template: Template, role: str, text: str | None, system: str) -> tuple[str, str]:
    """The text before and after a message's content, as ``template`` renders it in a conversation that goes on
    (system block excluded): a harmony reply ends with ``<|end|>``, as past replies do in a chat prompt."""
    groups = template.chunk_groups([(role, text), (template.roles[0], "")], system_message=system)
    rendered = "".join(chunk for chunk, _ in groups[1])
    if text is None:
        return rendered, ""
    before, sep, after = rendered.partition(text)
    if not sep or text in after:
        raise ValueError(f"template {template.name!r} does not render a {role!r} message around its text")
    return before, after


def _prefix_literal(tokenizer) -> str:
    """The special tokens the tokenizer puts before any text (a BOS), as text that tokenizes back to them."""
    prefix, _ = _affixes(tokenizer)
    text = "".join(tokenizer.convert_ids_to_tokens(prefix))
    if prefix and _encode(tokenizer, text) != list(prefix):
        raise ValueError(f"cannot write the tokenizer's leading special tokens {prefix} as text in a chat template")
    return text


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _needs_space(tokenizer, prefix: str, text: str) -> bool:
    """Whether ``prefix + text`` needs a space between them to give the ids of ``text`` tokenized on its own.

    A sentencepiece dummy prefix (Llama-2 / Yi tokenizers) adds "▁" to the start of a text, but not after a
    special token written in the text, which is where the chat template puts the text: there a space stands for it.
    """
    if not prefix:
        return False
    alone = list(tokenizer(text)["input_ids"])
    if _encode(tokenizer, prefix + text) == alone:
        return False
    if _encode(tokenizer, prefix + " " + text) == alone:
        return True
    raise ValueError(f"cannot write a chat template that tokenizes {text[:40]!r} as {type(tokenizer).__name__} does")


def _opening(tokenizer, prefix: str, system_before: str, system_after: str) -> tuple[list[str], str]:
    """The Jinja expression for the text before the system message, and the lines that set it first when it depends
    on the message.

    It depends on the message only for a template with no text before the message (``internvl_zh``) and a
    dummy-prefix tokenizer: the space is needed unless the message is empty, starts with a space or with an added
    token (which the tokenizer splits out before the dummy prefix applies).
    """
    if system_before or not _needs_space(tokenizer, prefix, "x"):
        return [], _literal(prefix + (" " if _needs_space(tokenizer, prefix, system_before + "x") else ""))
    empty = prefix + (" " if _needs_space(tokenizer, prefix, system_after + "x") else "")
    added = ", ".join(_literal(token) for token in sorted(tokenizer.get_added_vocab()))
    return [
        f"{{%- if system_message == '' -%}}{{%- set lead = {_literal(empty)} -%}}",
        f"{{%- elif system_message[:1] == ' ' or system_message.startswith(({added},)) -%}}"
        f"{{%- set lead = {_literal(prefix)} -%}}",
        f"{{%- else -%}}{{%- set lead = {_literal(prefix + ' ')} -%}}{{%- endif -%}}",
    ], "lead"


def build_chat_template(template: str | Template, tokenizer, system_message: str | None = None, *,
                        image_placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """The Jinja ``chat_template`` that renders ``template`` (with ``system_message`` as the default, else the
    template's) exactly as :func:`internvl_chat.inference.build_prompt` does, for ``tokenizer``'s special tokens.

    ``image_placeholder`` is what an image part of list content becomes (another engine's placeholder, e.g. the
    transformers-native ``<IMG_CONTEXT>``).
    """
    tpl = get_template(template) if isinstance(template, str) else template
    default_system = tpl.system_message if system_message is None else system_message
    system_mark, user_mark, reply_mark = (_SENTINEL.format(name) for name in ("S", "U", "A"))
    system_block = "".join(chunk for chunk, _ in tpl.chunk_groups([], system_message=system_mark)[0])
    system_before, _, system_after = system_block.partition(system_mark)
    user_before, user_after = _pieces(tpl, tpl.roles[0], user_mark, system_mark)
    reply_before, reply_after = _pieces(tpl, tpl.roles[1], reply_mark, system_mark)
    generation, _ = _pieces(tpl, tpl.roles[1], None, system_mark)
    lead_lines, lead = _opening(tokenizer, _prefix_literal(tokenizer), system_before, system_after)
    lit = _literal
    image_line = _single_quoted(image_placeholder + "\n")
    # Only whitespace-trimming tags and literals inside {{ }}: the output does not depend on trim_blocks/lstrip_blocks.
    return "\n".join((
        "{#- the InternVL training conversation template, written by internvl_chat/serving.py -#}",
        "{%- macro content_text(content) -%}",
        "    {%- if content is string -%}{{- content -}}",
        "    {%- else -%}",
        "        {%- set count = namespace(images=0, seen=0) -%}",
        "        {%- for part in content if part['type'] in ['image', 'image_url'] -%}",
        "            {%- set count.images = count.images + 1 -%}",
        "        {%- endfor -%}",
        "        {%- for part in content if part['type'] in ['image', 'image_url'] -%}",
        "            {%- set count.seen = count.seen + 1 -%}",
        "            {%- if count.images > 1 -%}{{- 'Image-' ~ count.seen ~ ': ' -}}{%- endif -%}",
        f"            {{{{- {image_line} -}}}}",
        "        {%- endfor -%}",
        "        {%- for part in content if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}",
        "    {%- endif -%}",
        "{%- endmacro -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "    {%- set system_message = content_text(messages[0]['content']) -%}",
        "    {%- set turns = messages[1:] -%}",
        "{%- else -%}",
        f"    {{%- set system_message = {lit(default_system)} -%}}",
        "    {%- set turns = messages -%}",
        "{%- endif -%}",
        *lead_lines,
        f"{{{{- {lead} + {lit(system_before)} + system_message + {lit(system_after)} -}}}}",
        "{%- for message in turns -%}",
        "    {%- if message['role'] == 'user' -%}",
        f"        {{{{- {lit(user_before)} + content_text(message['content']) + {lit(user_after)} -}}}}",
        "    {%- elif message['role'] == 'assistant' -%}",
        f"        {{{{- {lit(reply_before)} + content_text(message['content']) + {lit(reply_after)} -}}}}",
        "    {%- else -%}",
        "        {{- raise_exception('only user and assistant messages may follow the first (system) message, got '"
        " ~ message['role']) -}}",
        "    {%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {lit(generation)} -}}}}{{%- endif -%}}",
    ))


def end_token_ids(template: str | Template, tokenizer) -> list[int]:
    """The ids generation stops at: the template's end token first (what ``model.chat()`` stops at), then the
    tokenizer's own eos when it differs (e.g. ``<|endoftext|>`` / ``</s>``, which a model may still emit)."""
    tpl = get_template(template) if isinstance(template, str) else template
    ids = [stop_token_id(tpl, tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def renders_like(chat_template: Any, reference: str, tokenizer) -> bool:
    """Whether ``chat_template`` renders the probe conversations exactly as ``reference`` does."""
    if not isinstance(chat_template, str):
        return False
    try:
        for messages in _PROBES:
            for generation in (True, False):
                ours = tokenizer.apply_chat_template(messages, chat_template=reference, tokenize=False,
                                                     add_generation_prompt=generation)
                theirs = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                       add_generation_prompt=generation)
                if ours != theirs:
                    return False
    except Exception:  # noqa: BLE001 - a template that fails on our conversations does not render ours
        return False
    return True


def write_serving_files(folder: str | os.PathLike, tokenizer, template: str | Template | None,
                        system_message: str | None = None, *, image_placeholder: str = IMAGE_PLACEHOLDER) -> None:
    """Give the checkpoint in ``folder`` (tokenizer files already saved there) the training prompt and stop tokens.

    Writes the Jinja template to ``chat_template.jinja`` and to ``tokenizer_config.json``'s ``chat_template`` (older
    transformers and some engines read only the latter; both hold the same text), and sets ``eos_token_id`` in
    ``generation_config.json`` (other fields of an existing one are kept). A ``chat_template`` the tokenizer already
    has is kept only when it renders ours identically; otherwise it is replaced, logged once per tokenizer object.
    ``template=None`` (a model without ``config.template``) writes nothing.
    """
    from transformers import GenerationConfig

    if template is None:
        logger.info("no conversation template set: %s gets no chat_template / eos for serving", folder)
        return
    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: save the tokenizer before write_serving_files")
    tpl = get_template(template) if isinstance(template, str) else template
    ours = build_chat_template(tpl, tokenizer, system_message, image_placeholder=image_placeholder)
    existing = tokenizer.chat_template
    chat_template = ours
    if existing is not None and existing != ours:
        if renders_like(existing, ours, tokenizer):
            chat_template = existing
        elif tokenizer not in _REPLACED_FOR:
            _REPLACED_FOR.add(tokenizer)
            logger.warning("the tokenizer's chat_template does not render the %r training template: replaced in %s "
                           "(and in every later save)", tpl.name, folder)
    (folder / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = chat_template
    config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    generation_file = folder / "generation_config.json"
    generation = GenerationConfig.from_pretrained(folder) if generation_file.is_file() else GenerationConfig()
    generation.eos_token_id = end_token_ids(tpl, tokenizer)
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    if generation.bos_token_id is None and tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    generation.save_pretrained(folder)


def save_servable(model, tokenizer, folder: str, code_from: tuple[str, ...] = ()) -> None:
    """Write a chat checkpoint that loads and serves wherever an official one does: the model, its tokenizer with
    the serving files above, and the *.py remote code of the `code_from` folders (copied, never imported; for
    AutoModel(trust_remote_code=True) users; the first folder's file wins)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_serving_files(folder, tokenizer, model.config.template, getattr(model.config, "system_message", None))
    for source in code_from:
        for src in glob.glob(os.path.join(source, "*.py")):
            if not os.path.exists(os.path.join(folder, os.path.basename(src))):
                shutil.copy2(src, folder)
