"""Checkpoints serve with the prompt they were trained on: chat_template and eos (internvl_chat/serving.py)."""

import importlib.util
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from internvl_chat.data.templates import TEMPLATE_NAMES, get_template, image_block
from internvl_chat.demo_data import make_demo_dataset
from internvl_chat.finetune import main as finetune
from internvl_chat.inference import build_prompt, multi_image_prefix
from internvl_chat.model import InternVLChatModel, load_tokenizer
from internvl_chat.serving import build_chat_template, end_token_ids, write_serving_files
from internvl_chat.tiny_model import make_tiny_model
from internvl_chat.tiny_tokenizer import FLAVOURS, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
IMAGE_TOKENS = 256


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_tok")
    for flavour in FLAVOURS:
        build_tiny_tokenizer(flavour, root / flavour)
    return root


def served(tokenizer_dirs, tmp_path, flavour, template, system_message=None):
    """A copy of the flavour's tokenizer with serving files for ``template``, loaded back from disk."""
    folder = tmp_path / f"{flavour}-{template}"
    shutil.copytree(tokenizer_dirs / flavour, folder)
    write_serving_files(folder, load_tokenizer(folder), template, system_message)
    return load_tokenizer(folder)


def chat_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def builder_ids(tokenizer, template, question, history=(), system_message=None, num_patches_list=None):
    model = SimpleNamespace(template=template, system_message=system_message, num_image_token=IMAGE_TOKENS)
    return list(tokenizer(build_prompt(model, question, list(history), num_patches_list))["input_ids"])


def as_messages(question, history=(), system=None):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for old_question, old_answer in history:
        messages += [{"role": "user", "content": old_question}, {"role": "assistant", "content": old_answer}]
    return messages + [{"role": "user", "content": question}]


HISTORY = (("Hello, who are you?", "I am InternVL."), ("<image>\nWhat is shown?", "A red car.\n"))


# Every template with every tokenizer that has its tokens (the harmony ones: only GPT-OSS's).
@pytest.mark.parametrize(("flavour", "template"), [
    (flavour, template) for template in TEMPLATE_NAMES for flavour in FLAVOURS
    if template != "internvl3_5_gpt_oss" or flavour == "gpt_oss"])
def test_saved_chat_template_renders_the_prompt_builder_ids(tokenizer_dirs, tmp_path, flavour, template):
    tok = served(tokenizer_dirs, tmp_path, flavour, template)
    cases = [
        ("Describe this image.", (), None),
        ("Describe this image.", (), "You are a careful assistant.\nAnswer briefly."),
        ("And the colour?", HISTORY, None),
        ("And the colour?", HISTORY, "Be brief."),
        ("<image>\nDescribe this image.", (), None),
        (" spaced  text ", (("", ""),), ""),  # empty messages and system message, edge whitespace
        ("Q", (), " A system message after a space."),  # a dummy-prefix tokenizer handles the text start
        ("Q", (), "\nA system message after a newline."),
        ("Q", (), "<|im_start|>a system message after a special token"),
    ]
    for question, history, system in cases:
        expected = builder_ids(tok, template, question, history, system)
        assert chat_ids(tok, as_messages(question, history, system)) == expected, (question, history, system)

    # an <image> turn with its image tokens expanded, as the serving engine does before tokenizing
    rendered = tok.apply_chat_template(as_messages("<image>\nDescribe this image."), add_generation_prompt=True,
                                       tokenize=False)
    expanded = tok(rendered.replace("<image>", image_block(IMAGE_TOKENS * 3)), add_special_tokens=False)["input_ids"]
    assert list(expanded) == builder_ids(tok, template, "<image>\nDescribe this image.", num_patches_list=[3])

    # OpenAI-style content parts: images go first, as model.chat() puts them
    parts = [{"type": "image"}, {"type": "text", "text": "Describe this image."}]
    assert chat_ids(tok, as_messages(parts)) == builder_ids(tok, template, "<image>\nDescribe this image.")
    parts = [{"type": "image_url", "image_url": {"url": "a.jpg"}}, {"type": "image"}, {"type": "text", "text": "Q"}]
    assert chat_ids(tok, as_messages(parts)) == builder_ids(tok, template, multi_image_prefix(2) + "Q")

    # the stop ids: the template's end token first
    generation = GenerationConfig.from_pretrained(tmp_path / f"{flavour}-{template}")
    end = tok.convert_tokens_to_ids(get_template(template).stop_str)
    assert generation.eos_token_id[0] == end
    assert set(generation.eos_token_id) == {end, tok.eos_token_id}


def test_checkpoint_system_message_is_the_default(tokenizer_dirs, tmp_path):
    tok = served(tokenizer_dirs, tmp_path, "qwen2", "internvl2_5", system_message="Answer in one word.")
    expected = builder_ids(tok, "internvl2_5", "Hi", system_message="Answer in one word.")
    assert chat_ids(tok, as_messages("Hi")) == expected
    assert chat_ids(tok, as_messages("Hi", system="Other.")) == builder_ids(tok, "internvl2_5", "Hi",
                                                                          system_message="Other.")


def test_files_both_transformers_locations(tokenizer_dirs, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dirs / "qwen2", folder)
    tok = load_tokenizer(folder)
    write_serving_files(folder, tok, "Hermes-2")
    jinja = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == jinja
    assert jinja == build_chat_template("Hermes-2", tok)
    (folder / "chat_template.jinja").unlink()  # older readers: tokenizer_config.json alone carries it
    assert load_tokenizer(folder).chat_template == jinja


def test_user_chat_template_kept_only_when_it_renders_ours(tokenizer_dirs, tmp_path, caplog):
    generic = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    folder = tmp_path / "generic"
    shutil.copytree(tokenizer_dirs / "qwen2", folder)
    tok = load_tokenizer(folder)
    tok.chat_template = generic
    with caplog.at_level(logging.WARNING, logger="internvl_chat.serving"):
        write_serving_files(folder, tok, "internvl2_5")
    assert len([r for r in caplog.records if "replaced" in r.getMessage()]) == 1
    assert load_tokenizer(folder).chat_template == build_chat_template("internvl2_5", tok)

    equivalent = "{#- the same template, written differently -#}\n" + build_chat_template("internvl2_5", tok)
    folder = tmp_path / "equivalent"
    shutil.copytree(tokenizer_dirs / "qwen2", folder)
    tok = load_tokenizer(folder)
    tok.chat_template = equivalent
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="internvl_chat.serving"):
        write_serving_files(folder, tok, "internvl2_5")
    assert not caplog.records
    assert load_tokenizer(folder).chat_template == equivalent


def _merge_lora(argv):
    spec = importlib.util.spec_from_file_location("merge_lora_tool", REPO / "tools" / "merge_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def assert_serves(folder, template):
    """``folder`` loads a tokenizer whose chat_template renders ``template`` and whose eos is its end token."""
    folder = Path(folder)
    tok = load_tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["template"] == template
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    assert chat_ids(tok, as_messages("<image>\nHi", HISTORY)) == builder_ids(tok, template, "<image>\nHi", HISTORY)
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    assert eos == end_token_ids(template, tok) and eos[0] == tok.convert_tokens_to_ids(get_template(template).stop_str)


def test_training_checkpoints_and_merged_model_serve(tmp_path):
    """A 1-step LoRA run on InternLM2 (BOS, eos </s> != <|im_end|>): checkpoint-1, the final save, the merge.

    The base model serves another template (phi3-chat): the run's saves must replace it by the one it trained with.
    """
    base = make_tiny_model(tmp_path / "base", llm="internlm2", template="phi3-chat")
    assert_serves(base, "phi3-chat")
    meta = make_demo_dataset(tmp_path / "data", num_images=2, seed=0)
    out = tmp_path / "run"
    finetune([
        "--model_name_or_path", str(base), "--meta_path", str(meta), "--output_dir", str(out),
        "--conv_style", "internlm2-chat", "--force_image_size", "448", "--down_sample_ratio", "0.5",
        "--dynamic_image_size", "False", "--max_seq_length", "2048", "--per_device_train_batch_size", "1",
        "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0", "--bf16", "False", "--grad_checkpoint", "False", "--disable_tqdm", "True",
        "--freeze_backbone", "True", "--freeze_mlp", "True", "--freeze_llm", "True", "--use_llm_lora", "2",
    ])
    assert_serves(out, "internlm2-chat")
    assert_serves(out / "checkpoint-1", "internlm2-chat")
    assert _merge_lora([str(out), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    assert_serves(tmp_path / "merged", "internlm2-chat")


class _ScriptedHead(torch.nn.Module):
    """An lm_head whose greedy choice at the n-th generated position is ``script[n]``, whatever the input."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script, self.vocab_size, self.step = script, vocab_size, 0

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size)
        logits[..., self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return logits


def test_generate_with_saved_generation_config_stops_at_the_end_token(tmp_path):
    # Llama tokenizer: its eos is </s>, the Hermes-2 end token is <|im_end|>
    folder = make_tiny_model(tmp_path / "m", llm="llama", template="Hermes-2")
    tok = load_tokenizer(folder)
    model = InternVLChatModel.from_pretrained(folder).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end != model.language_model.generation_config.eos_token_id
    words = tok("a red car", add_special_tokens=False)["input_ids"][:2]
    script = [*words, end, *words]
    inputs = torch.tensor([builder_ids(tok, "Hermes-2", "Hi")])

    def generate(**kwargs):
        model.language_model.lm_head = _ScriptedHead(script, len(tok))
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                             max_new_tokens=len(script), **kwargs)
        return out[0].tolist()

    saved = GenerationConfig.from_pretrained(folder)
    assert generate(generation_config=saved) == [*words, end]
    assert generate() == script  # the LLM's own eos (</s>) would never stop at the template's end


def test_rendering_does_not_depend_on_jinja_whitespace_settings(tokenizer_dirs):
    """Engines render with their own Jinja settings (transformers: trim_blocks and lstrip_blocks on)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok = load_tokenizer(tokenizer_dirs / "llama")
    messages = as_messages("<image>\n Q ", HISTORY, system="  S\n")
    for template in TEMPLATE_NAMES:
        source = build_chat_template(template, tok)
        rendered = {
            ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim).from_string(source).render(
                messages=messages, add_generation_prompt=True)
            for trim in (False, True)
        }
        assert rendered == {tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                    chat_template=source)}, template


def test_image_parts_can_become_another_placeholder(tokenizer_dirs):
    """The transformers-native export renders image parts as <IMG_CONTEXT>, which its processor expands."""
    tok = load_tokenizer(tokenizer_dirs / "qwen2")
    source = build_chat_template("internvl2_5", tok, image_placeholder="<IMG_CONTEXT>")
    parts = [{"type": "image"}, {"type": "text", "text": "Q"}]
    rendered = tok.apply_chat_template(as_messages(parts), chat_template=source, add_generation_prompt=True,
                                       tokenize=False)
    assert "<IMG_CONTEXT>\nQ" in rendered and "<image>" not in rendered
