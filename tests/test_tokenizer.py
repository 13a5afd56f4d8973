"""Tokenizer loading (internvl_chat.model.tokenizer) and the tiny offline tokenizers (internvl_chat.tiny_tokenizer).

References: the fixture tokenizers and tokenizer_info.json written by the official code, transformers'
AutoTokenizer on the same files, and the sentencepiece library run directly on the InternLM2 model file.
"""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from internvl_chat.constants import INTERNVL_SPECIAL_TOKENS
from internvl_chat.model.tokenizer import (
    InternLM2Tokenizer,
    TokenizerLoadError,
    ensure_internvl_tokens,
    load_tokenizer,
)
from internvl_chat.tiny_tokenizer import ALL_SPECIAL_TOKENS, FLAVOURS, GPT_OSS_HARMONY_TOKENS, build_tiny_tokenizer

FIXTURE_TOKENIZERS = {"qwen2": "tokenizer_qwen2", "bos": "tokenizer_bos"}

SAMPLES = [
    "Hello world!",
    " leading space and  double  spaces ",
    "你是书生·万象，英文名是InternVL。",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
    "What is in this picture?<|im_end|>\n<|im_start|>assistant\n"
    "A <ref>cat</ref><box>[[12, 34, 56, 78]]</box>.<|im_end|>\n",
    "<|system|>\nsys<|end|><|user|>\nq<|end|><|assistant|>\na<|end|>",
    "<s>raw bos</s> and <|action_start|><|plugin|>call<|action_end|>",
    "tabs\tand\nnew\n\nlines, emoji 😀, accents éü",
    "",
]

# Text without the patterns the InternLM2 decoder cleans up (" .", " ,", " n't", ...), so decode(encode(x)) == x.
ROUND_TRIP = [s for s in SAMPLES if not re.search(r" [.,?!']", s)]
# transformers 5's Llama tokenizer (Metaspace, prepend "first") folds a leading space into the "▁" it
# prepends, so text that starts with a space comes back one space shorter.
LEADING_SPACE_LOST = {"llama", "phi3"}

BOS_FLAVOURS = {"qwen2": False, "llama": True, "phi3": True, "internlm2": True, "gpt_oss": False}
ROLES = {  # bos, eos, pad per flavour (Phi-3: Phi-3-mini-128k-instruct; InternLM2: released configs)
    "qwen2": (None, "<|im_end|>", "<|endoftext|>"),
    "llama": ("<s>", "</s>", "</s>"),
    "phi3": ("<s>", "<|end|>", "<|endoftext|>"),
    "internlm2": ("<s>", "</s>", "</s>"),
    "gpt_oss": ("<|startoftext|>", "<|return|>", "<|endoftext|>"),  # gpt-oss-20b
}


@pytest.fixture(scope="module")
def tokenizer_info(fixtures_dir):
    return json.loads((fixtures_dir / "tokenizer_info.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """One tiny tokenizer of every flavour, built once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {flavour: _build(flavour, root / flavour) for flavour in FLAVOURS}


def _build(flavour, out_dir, **kwargs):
    build_tiny_tokenizer(flavour, out_dir, **kwargs)
    return out_dir


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in [dst, *dst.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


# ----------------------------------------------------------------------------------------- fixture tokenizers


@pytest.mark.parametrize("name", sorted(FIXTURE_TOKENIZERS))
def test_fixture_tokenizer_loads_with_official_ids(fixtures_dir, tokenizer_info, name):
    path = fixtures_dir / FIXTURE_TOKENIZERS[name]
    tok = load_tokenizer(path)
    info = tokenizer_info[name]

    assert len(tok) == tokenizer_info["total_vocab_size"]
    assert tok.num_added_internvl_tokens == 0
    for token, token_id in tokenizer_info["special_tokens"].items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (info["bos"], info["eos"], info["pad"])
    assert tok.add_bos_token is bool(info.get("add_bos_token", False))
    # README: the qwen2 tokenizer pads on the right, the LlamaTokenizerFast one on the left.
    assert tok.padding_side == {"qwen2": "right", "bos": "left"}[name]

    reference = AutoTokenizer.from_pretrained(path, local_files_only=True)
    for text in SAMPLES:
        for add_special in (True, False):
            ours = tok(text, add_special_tokens=add_special)["input_ids"]
            assert ours == reference(text, add_special_tokens=add_special)["input_ids"], text
    bos = [tokenizer_info["special_tokens"]["<s>"]] if info["bos"] else []
    assert tok("Hi")["input_ids"] == bos + tok("Hi", add_special_tokens=False)["input_ids"]


def test_internvl_tokens_added_in_official_order(fixtures_dir, tokenizer_info, tmp_path):
    """Strip the InternVL (and following) tokens from the Qwen2 fixture: loading must add them back, in order,
    at the ids the official code gave them."""
    path = _writable_copy(fixtures_dir / FIXTURE_TOKENIZERS["qwen2"], tmp_path / "qwen2")
    first_internvl = tokenizer_info["special_tokens"][INTERNVL_SPECIAL_TOKENS[0]]
    keep = lambda token_id: int(token_id) < first_internvl  # noqa: E731

    tokenizer_json = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json["added_tokens"] if keep(t["id"])]
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    removed = {t["content"] for i, t in config["added_tokens_decoder"].items() if not keep(i)}
    config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items() if keep(i)}
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t not in removed]
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for stale in ("added_tokens.json", "special_tokens_map.json"):
        (path / stale).unlink()

    assert len(AutoTokenizer.from_pretrained(path, local_files_only=True)) == first_internvl
    tok = load_tokenizer(path)
    assert tok.num_added_internvl_tokens == len(INTERNVL_SPECIAL_TOKENS)
    assert len(tok) == first_internvl + len(INTERNVL_SPECIAL_TOKENS)
    assert [tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIAL_TOKENS] == [
        tokenizer_info["special_tokens"][t] for t in INTERNVL_SPECIAL_TOKENS
    ]
    assert ensure_internvl_tokens(tok) == 0  # idempotent
    # Added as special tokens: kept whole when encoding, stripped by skip_special_tokens.
    ids = tok("<ref>cat</ref>")["input_ids"]
    assert ids[0] == tokenizer_info["special_tokens"]["<ref>"]
    assert tok.decode(ids, skip_special_tokens=True) == "cat"


def test_internvl_tokens_added_to_internlm2(tiny_dirs, tmp_path):
    """Same for the built-in InternLM2 tokenizer: tokens past the sentencepiece vocabulary come back in order."""
    full = load_tokenizer(tiny_dirs["internlm2"])
    path = _writable_copy(tiny_dirs["internlm2"], tmp_path / "internlm2")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        i: t for i, t in config["added_tokens_decoder"].items() if t["content"] not in INTERNVL_SPECIAL_TOKENS
    }
    for key in ("extra_special_tokens", "additional_special_tokens"):
        config[key] = [t for t in config[key] if t not in INTERNVL_SPECIAL_TOKENS]
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "added_tokens.json").unlink()

    tok = load_tokenizer(path)
    assert tok.num_added_internvl_tokens == len(INTERNVL_SPECIAL_TOKENS)
    sp_size = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).get_piece_size()
    assert tok.convert_tokens_to_ids(list(INTERNVL_SPECIAL_TOKENS)) == list(range(sp_size, sp_size + 9))
    assert tok.convert_tokens_to_ids(list(INTERNVL_SPECIAL_TOKENS)) == full.convert_tokens_to_ids(
        list(INTERNVL_SPECIAL_TOKENS)
    )
    assert set(INTERNVL_SPECIAL_TOKENS) <= set(tok.all_special_tokens)


# ----------------------------------------------------------------------------------------- tiny tokenizers


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tiny_tokenizer_layout(tiny_dirs, flavour):
    tok = load_tokenizer(tiny_dirs[flavour])
    ids = tok.convert_tokens_to_ids(list(ALL_SPECIAL_TOKENS))
    assert len(set(ids)) == len(ALL_SPECIAL_TOKENS) and tok.unk_token_id not in ids[:3] + ids[6:]
    assert tok.num_added_internvl_tokens == 0
    internvl = tok.convert_tokens_to_ids(list(INTERNVL_SPECIAL_TOKENS))
    assert internvl == list(range(internvl[0], internvl[0] + 9))  # consecutive, official order
    assert set(INTERNVL_SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    expected_len = {"qwen2": 1400 + 23, "llama": 1400 + 20, "phi3": 1400 + 20, "internlm2": 1400 + 9,
                    "gpt_oss": 1400 + 30}[flavour]
    assert len(tok) == expected_len
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ROLES[flavour]
    if flavour == "gpt_oss":  # its eos <|return|> is one of the harmony tokens that follow the shared ones
        ids = ids + tok.convert_tokens_to_ids(list(GPT_OSS_HARMONY_TOKENS))
    for token in (tok.eos_token, tok.pad_token):
        assert tok.convert_tokens_to_ids(token) in ids  # roles point at the shared special tokens


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tiny_tokenizer_bos_behaviour(tiny_dirs, flavour):
    tok = load_tokenizer(tiny_dirs[flavour])
    assert tok.add_bos_token is BOS_FLAVOURS[flavour]
    for text in ("Describe this image.", "<|im_start|>user\nHi<|im_end|>"):
        plain = tok(text, add_special_tokens=False)["input_ids"]
        full = tok(text)["input_ids"]
        # BOS prepended or not, and never an EOS appended (add_eos_token=False, as the official loader asks).
        assert full == ([tok.convert_tokens_to_ids("<s>")] if BOS_FLAVOURS[flavour] else []) + plain


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tiny_tokenizer_encode_decode(tiny_dirs, flavour):
    tok = load_tokenizer(tiny_dirs[flavour])
    for text in ROUND_TRIP:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        expected = text[1:] if flavour in LEADING_SPACE_LOST and text.startswith(" ") else text
        assert tok.decode(ids) == expected, text
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nWho are you?<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for token in ("<|im_start|>", "<img>", "<IMG_CONTEXT>", "</img>", "<|im_end|>"):
        assert ids.count(tok.convert_tokens_to_ids(token)) == 1, token  # never split into pieces
    assert tok.decode(ids, skip_special_tokens=True) == "user\n\nWho are you?"
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == tok.convert_tokens_to_ids(
        tok.convert_ids_to_tokens(tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tiny_tokenizer_save_load_round_trip(tiny_dirs, tmp_path, flavour):
    tok = load_tokenizer(tiny_dirs[flavour])
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert type(again) is type(tok)
    assert len(again) == len(tok) and again.get_vocab() == tok.get_vocab()
    assert (again.bos_token, again.eos_token, again.pad_token, again.padding_side) == (
        tok.bos_token, tok.eos_token, tok.pad_token, tok.padding_side,
    )
    for text in SAMPLES:
        assert again(text)["input_ids"] == tok(text)["input_ids"], text


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tiny_tokenizer_is_deterministic(tiny_dirs, tmp_path, flavour):
    again = _files(_build(flavour, tmp_path / "again"))
    assert again == _files(tiny_dirs[flavour])
    other_seed = _files(_build(flavour, tmp_path / "seed1", seed=1))
    vocab_file = "tokenizer.json" if flavour in ("qwen2", "gpt_oss") else "tokenizer.model"
    assert other_seed[vocab_file] != again[vocab_file]


def test_tiny_tokenizer_replaces_another_flavour(tmp_path):
    build_tiny_tokenizer("llama", tmp_path)
    tok = build_tiny_tokenizer("internlm2", tmp_path)
    assert type(load_tokenizer(tmp_path)) is InternLM2Tokenizer
    assert not (tmp_path / "tokenizer.json").exists() and len(tok) == 1400 + len(INTERNVL_SPECIAL_TOKENS)


def test_tiny_tokenizer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="flavour"):
        build_tiny_tokenizer("gpt2", tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer("qwen2", tmp_path, vocab_size=100)


def test_tiny_tokenizer_vocab_size(tmp_path):
    tok = build_tiny_tokenizer("qwen2", tmp_path / "q", vocab_size=600)
    assert len(tok) == 600 + len(ALL_SPECIAL_TOKENS)
    tok = build_tiny_tokenizer("internlm2", tmp_path / "i", vocab_size=600)
    assert len(tok) == 600 + len(INTERNVL_SPECIAL_TOKENS)


# ----------------------------------------------------------------------------------------- InternLM2


def _sentencepiece_reference(model_dir: Path, text: str, add_bos: bool = True) -> list[int]:
    """What the official InternLM2 tokenizer does, computed with sentencepiece directly: split the text on
    the added tokens of tokenizer_config.json (longest first), encode every other chunk with sentencepiece."""
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {t["content"]: int(i) for i, t in config["added_tokens_decoder"].items()}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = [sp.bos_id()] if add_bos else []
    for chunk in re.split(pattern, text):
        if chunk in added:
            ids.append(added[chunk])
        elif chunk:
            ids.extend(sp.encode(chunk))
    return ids


def test_internlm2_matches_sentencepiece(tiny_dirs):
    path = tiny_dirs["internlm2"]
    tok = load_tokenizer(path)
    assert isinstance(tok, InternLM2Tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    for text in SAMPLES + ["  two leading spaces", "Frame1: <image>\n", "[[0, 0, 999, 999]]"]:
        assert tok(text)["input_ids"] == _sentencepiece_reference(path, text), text
        assert tok(text, add_special_tokens=False)["input_ids"] == _sentencepiece_reference(path, text, False)
    # Ordinary text decodes as sentencepiece writes it (leading spaces included).
    for text in ("  two leading spaces", "你是书生·万象", " x"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == sp.decode(ids) == text
    # Special and added tokens decode verbatim, sentencepiece text between them.
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nHi there<|im_end|>"
    assert tok.decode(tok(text)["input_ids"]) == "<s>" + text
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text


def test_internlm2_decode_cleans_up_spaces_like_official(tiny_dirs):
    """The official InternLM2 tokenizer always runs transformers' clean-up of tokenization spaces on decoded
    text (" ." -> ".", " ," -> ",", " n't" -> "n't"), even with clean_up_tokenization_spaces=False."""
    tok = load_tokenizer(tiny_dirs["internlm2"])
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dirs["internlm2"] / "tokenizer.model"))
    text = "Yes , it is . I do n't know !"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert sp.decode(ids) == text
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == "Yes, it is. I don't know!"


def test_internlm2_config_is_official_style(tiny_dirs):
    config = json.loads((tiny_dirs["internlm2"] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "InternLM2Tokenizer"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm2.InternLM2Tokenizer"
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dirs["internlm2"] / "tokenizer.model"))
    decoder = {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
    # Chat tokens are renamed placeholder pieces at the top of the sentencepiece vocabulary, as in InternLM2.
    top = sp.get_piece_size() - 1
    assert decoder[top] == "<|im_start|>" and decoder[top - 1] == "<|im_end|>"
    assert sp.id_to_piece(top).startswith("[UNUSED_TOKEN_")
    assert decoder[sp.get_piece_size() + 2] == "<IMG_CONTEXT>"


def test_internlm2_pickles(tiny_dirs):
    """Data-loader workers started with 'spawn' pickle the tokenizer."""
    tok = load_tokenizer(tiny_dirs["internlm2"])
    clone = pickle.loads(pickle.dumps(tok))
    for text in SAMPLES:
        assert clone(text)["input_ids"] == tok(text)["input_ids"]


def test_internlm2_without_model_file_is_a_clear_error(tiny_dirs, tmp_path):
    path = _writable_copy(tiny_dirs["internlm2"], tmp_path / "no_model")
    (path / "tokenizer.model").unlink()
    with pytest.raises(TokenizerLoadError, match="tokenizer.model"):
        load_tokenizer(path)


# ----------------------------------------------------------------------------------------- remote code


def test_remote_code_without_builtin_is_a_clear_error(tiny_dirs, tmp_path):
    path = _writable_copy(tiny_dirs["qwen2"], tmp_path / "remote")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "QWenTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match="trust_remote_code=True") as err:
        load_tokenizer(path)
    assert "QWenTokenizer" in str(err.value)


def test_auto_map_with_a_library_class_needs_no_remote_code(tiny_dirs, tmp_path):
    path = _writable_copy(tiny_dirs["qwen2"], tmp_path / "auto_map")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": ["tokenization_qwen2.Qwen2Tokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert load_tokenizer(path)("Hi")["input_ids"] == load_tokenizer(tiny_dirs["qwen2"])("Hi")["input_ids"]


def test_trust_remote_code_runs_the_checkpoint_code(tiny_dirs, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    path = _writable_copy(tiny_dirs["internlm2"], tmp_path / "ckpt")
    (path / "tokenization_internlm2.py").write_text(
        "from internvl_chat.model.tokenizer import InternLM2Tokenizer as _Builtin\n\n\n"
        "class InternLM2Tokenizer(_Builtin):\n    from_checkpoint_code = True\n",
        encoding="utf-8",
    )
    remote = load_tokenizer(path, trust_remote_code=True)
    assert getattr(remote, "from_checkpoint_code", False)
    assert type(remote).__module__ != InternLM2Tokenizer.__module__
    builtin = load_tokenizer(path)
    assert type(builtin) is InternLM2Tokenizer
    assert remote(SAMPLES[3])["input_ids"] == builtin(SAMPLES[3])["input_ids"]


def test_trust_remote_code_without_the_code_is_a_clear_error(tiny_dirs):
    """Trainer outputs keep the auto_map but not the *.py files; the built-in tokenizer still loads them."""
    with pytest.raises(TokenizerLoadError, match="tokenization_internlm2.py"):
        load_tokenizer(tiny_dirs["internlm2"], trust_remote_code=True)
    assert type(load_tokenizer(tiny_dirs["internlm2"])) is InternLM2Tokenizer


# ----------------------------------------------------------------------------------------- loader options


def test_loader_options_and_errors(tiny_dirs, tmp_path):
    tok = load_tokenizer(tiny_dirs["qwen2"], model_max_length=300, padding_side="left")
    assert (tok.model_max_length, tok.padding_side) == (300, "left")
    assert load_tokenizer(tiny_dirs["phi3"]).padding_side == "left"
    assert load_tokenizer(tiny_dirs["internlm2"], padding_side="left").padding_side == "left"
    with pytest.raises(TokenizerLoadError, match="padding_side"):
        load_tokenizer(tiny_dirs["qwen2"], padding_side="middle")
    with pytest.raises(TokenizerLoadError, match="not found"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("flavour, expected_pad", [("qwen2", "<|endoftext|>"), ("llama", "</s>")])
def test_missing_pad_token_reuses_an_existing_token(tiny_dirs, tmp_path, flavour, expected_pad):
    path = _writable_copy(tiny_dirs[flavour], tmp_path / flavour)
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("pad_token")
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(path)
    assert tok.pad_token == expected_pad
    assert len(tok) == len(load_tokenizer(tiny_dirs[flavour]))  # no new id


def test_appended_eos_is_dropped_and_bos_kept(tiny_dirs, tmp_path):
    """The official loader passes add_eos_token=False; a tokenizer.json that appends EOS must not."""
    path = _writable_copy(tiny_dirs["llama"], tmp_path / "eos")
    tokenizer_json = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    eos_id = tokenizer_json["model"]["vocab"]["</s>"]
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                           "</s>": {"id": "</s>", "ids": [eos_id], "tokens": ["</s>"]}},
    }
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    assert AutoTokenizer.from_pretrained(path, local_files_only=True)("Hi")["input_ids"][-1] == eos_id
    tok = load_tokenizer(path)
    ids = tok("Hi")["input_ids"]
    assert ids == [1] + tok("Hi", add_special_tokens=False)["input_ids"]
    assert tok.add_bos_token is True and tok.add_eos_token is False
