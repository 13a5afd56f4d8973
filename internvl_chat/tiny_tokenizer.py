"""Tiny, offline, deterministic tokenizers for tests, the demo and benchmarks.

Real InternVL tokenizers are 92k-151k tokens and must be downloaded; the tests, `make demo` and the
benchmarks need something that builds in a second without network and behaves like each LLM family:

* ``qwen2``     byte-level BPE in the Qwen2 layout (no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>``),
                the same layout as the reference fixture tokenizers (1,400 BPE tokens + 23 special ones).
* ``llama``     sentencepiece-style BPE with byte fallback (Llama-2 / Yi layout: ``<unk>``/``<s>``/``</s>``
                at ids 0-2, a BOS added to every sequence), saved as a transformers ``LlamaTokenizer``.
* ``phi3``      the same model with the Phi-3-mini-128k-instruct special-token roles (bos ``<s>``,
                eos ``<|end|>``, pad ``<|endoftext|>``, padding on the left).
* ``internlm2`` a real sentencepiece ``tokenizer.model`` plus a ``tokenizer_config.json`` in the layout
                of the released InternLM2 checkpoints (``InternLM2Tokenizer`` with ``auto_map``, the chat
                tokens stored as placeholder pieces at the top of the sentencepiece vocabulary and renamed
                through ``added_tokens_decoder``), loaded by the built-in
                :class:`internvl_chat.model.tokenizer.InternLM2Tokenizer`.
* ``gpt_oss``   byte-level BPE like ``qwen2`` (GPT-OSS's o200k_harmony is byte-level BPE too; the ids do not
                match it) plus the harmony chat tokens (``<|start|>``, ``<|message|>``, ``<|channel|>``, ...), with
                GPT-OSS's roles: no BOS added, eos ``<|return|>``, pad ``<|endoftext|>``.

Every flavour holds the special tokens of all templates (``INTERNVL_SPECIAL_TOKENS`` included, in the
official order), so one tiny tokenizer works with every conversation template. The vocabulary is learnt
from a corpus generated here from ``seed`` (English sentences, the Chinese characters of the official
system messages, digits and boxes), with single-threaded trainers: the same arguments give byte-identical
files on every run.

Tiny models (:mod:`internvl_chat.tiny_model`, ``tools/make_tiny_model.py``) are built on top of
:func:`build_tiny_tokenizer`.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from .constants import INTERNVL_SPECIAL_TOKENS

FLAVOURS = ("qwen2", "llama", "phi3", "internlm2", "gpt_oss")

# Chat-template tokens of the LLM families InternVL uses (Qwen2/InternLM2 ChatML, Phi-3), in the order of
# the reference fixture tokenizers; the InternVL tokens and the InternLM2 tool tokens follow.
CHAT_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<s>",
    "</s>",
    "<unk>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
INTERNLM2_TOOL_TOKENS = ("<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>")
ALL_SPECIAL_TOKENS = CHAT_SPECIAL_TOKENS + tuple(INTERNVL_SPECIAL_TOKENS) + INTERNLM2_TOOL_TOKENS
# The harmony format's tokens (GPT-OSS) not already above (<|endoftext|> and <|end|> are), in o200k_harmony's id order.
GPT_OSS_HARMONY_TOKENS = ("<|startoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|message|>",
                          "<|call|>")

DEFAULT_VOCAB_SIZE = 1400
TINY_MODEL_MAX_LENGTH = 8192

# The default system messages of the official templates (`conversation.py`): their characters are
# what Chinese text the tiny models will see most.
_SYSTEM_MESSAGES = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
)

_PROMPTS = (
    "Describe this image.",
    "Describe this image in detail.",
    "What is shown in this picture?",
    "Please describe the image shortly.",
    "Answer the question using a single word or phrase.",
    "Provide a one-sentence caption for the provided image.",
    "What is the color of the car?",
    "How many people are in the image?",
    "Please provide the bounding box coordinate of the region this sentence describes:",
    "Who are you?",
    "Hello, who are you?",
    "Tell me a story about this picture.",
    "Is there a dog in the image? Answer yes or no.",
    "What is written on the sign?",
    "Where was this photo taken?",
)

_WORDS = (
    "the a an this that these those there here it its is are was were be been being has have had do does "
    "did can could will would should may might must not no yes and or but if then so because while when "
    "where what which who whom whose why how all any each every some many much more most few less least "
    "one two three four five six seven eight nine ten first second third last next other another same "
    "image picture photo video frame scene view left right top bottom middle center front back side "
    "corner edge background foreground color colour red green blue yellow black white gray grey brown "
    "orange purple pink dark light bright large small big little tall short long wide narrow round square "
    "man woman person people child children boy girl player team crowd dog cat bird horse cow sheep "
    "elephant giraffe zebra bear car bus truck train plane boat bicycle motorcycle street road sidewalk "
    "building house window door wall roof tree grass flower water river lake sea beach sky cloud sun snow "
    "mountain hill field park city table chair bed sofa kitchen room desk computer phone book bottle cup "
    "plate bowl food pizza cake sandwich banana apple orange fruit vegetable clock sign text word letter "
    "number chart table graph document page line bar axis value title label caption question answer "
    "describe show shows showing shown see seen look looks looking sit sits sitting stand stands standing "
    "walk walks walking ride rides riding hold holds holding play plays playing eat eats eating wear wears "
    "wearing carry carrying fly flying park parked open close near far above below under over inside "
    "outside behind between next to on in at of for with without from into onto across along around "
    "during before after about again always often never very really quite just only also still even "
    "please thank thanks hello sorry model assistant user system helpful harmless answer reply response "
    "detail details detailed region object objects box boxes coordinate coordinates location position "
    "count total several group pair single multiple simple complex image-text multimodal language vision "
    "model models train training fine-tune dataset sample samples token tokens sequence length batch"
).split()

_TEMPLATES = (
    "{D} {n} is {v} {p} {d} {n}.",
    "{D} {a} {n} {v} {p} {d} {n}.",
    "There are {c} {n}s {p} {d} {a} {n}.",
    "Is {d} {n} {a}? {Y}.",
    "{D} {n} has {c} {a} {n}s and {d} {n} is {a}.",
    "In {d} {n}, {d} {a} {n} is {v} {p} {d} {n}.",
    "What is {v} {p} {d} {n}? {D} {a} {n}.",
)
_DETERMINERS = ("the", "a", "this", "that", "one", "every", "some")
_ADJECTIVES = ("red", "green", "blue", "small", "large", "tall", "white", "black", "bright", "old", "young",
               "wooden", "empty", "busy", "quiet", "happy", "round", "striped")
_NOUNS = ("man", "woman", "dog", "cat", "car", "bus", "table", "tree", "building", "bird", "horse", "boat",
          "sign", "clock", "chart", "plate", "window", "child", "player", "street", "field", "picture")
_VERBS = ("standing", "sitting", "walking", "riding", "holding", "looking", "playing", "parked", "shown",
          "flying", "eating", "waiting")
_PREPOSITIONS = ("on", "in", "near", "next to", "behind", "under", "above", "beside", "in front of", "at")
_COUNTS = ("two", "three", "four", "five", "several", "many", "2", "3", "12")


def training_corpus(seed: int = 0, num_sentences: int = 3000) -> list[str]:
    """The deterministic text the tiny vocabularies are learnt from (one sentence per item).

    Mixes fixed prompts, the official Chinese system messages, template fragments (role names, frame and
    image prefixes), generated English sentences, boxes like ``[[12, 34, 56, 78]]`` and numbers; ``seed``
    only changes the generated part.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(20):
        lines.extend(_SYSTEM_MESSAGES)
        lines.extend(_PROMPTS)
        lines.extend(("system\n", "user\n", "assistant\n", "Frame1: ", "Frame-1: ", "Image-1: ", "Image-2: "))
    lines.append(" ".join(_WORDS))
    for i in range(num_sentences):
        kind = i % 5
        if kind == 4:
            box = ", ".join(str(rng.randrange(1000)) for _ in range(4))
            noun = rng.choice(_NOUNS)
            lines.append(f"the {noun} [[{box}]] and {rng.choice(_NOUNS)}")
            continue
        if kind == 3:
            words = rng.sample(_WORDS, 8)
            lines.append(" ".join(words).capitalize() + rng.choice((".", "?", "!", ",", ";")))
            continue
        template = rng.choice(_TEMPLATES)
        sentence = template.format(
            D=rng.choice(_DETERMINERS).capitalize(),
            d=rng.choice(_DETERMINERS),
            a=rng.choice(_ADJECTIVES),
            n=rng.choice(_NOUNS),
            v=rng.choice(_VERBS),
            p=rng.choice(_PREPOSITIONS),
            c=rng.choice(_COUNTS),
            Y=rng.choice(("Yes", "No")),
        )
        if kind == 2:
            chars = "".join(rng.choice(_SYSTEM_MESSAGES[i % 2]) for _ in range(rng.randrange(4, 12)))
            sentence = f"{sentence} {chars}"
        lines.append(sentence)
    return lines


# --------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------

MIN_VOCAB_SIZE = 512
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json",
                    "special_tokens_map.json", "vocab.json", "merges.txt")
MAX_VOCAB_SIZE = 4096

# Qwen2's pre-tokenizer split (digits one by one), as in released Qwen2 tokenizer.json files.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# InternLM2 keeps its chat/tool tokens as placeholder pieces at the top of the sentencepiece vocabulary
# (92538 <|plugin|> ... 92543 <|im_start|>) renamed by added_tokens_decoder; the other template tokens of
# the tiny vocabulary sit just below them. Listed from the lowest id up.
_INTERNLM2_PLACEHOLDER_TOKENS = (
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
# Order of additional_special_tokens in released InternLM2 configs, then ours.
_INTERNLM2_ADDITIONAL = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>",
                         "<|plugin|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_INTERNLM2_AUTO_MAP = {
    "AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", "tokenization_internlm2_fast.InternLM2TokenizerFast"]
}

# Roles of the named special tokens per flavour (bos, eos, unk, pad).
_ROLES = {
    "qwen2": {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "pad_token": "<|endoftext|>"},
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    # Phi-3-mini-128k-instruct's tokenizer_config.json (eos <|end|> since its mid-2024 update).
    "phi3": {"bos_token": "<s>", "eos_token": "<|end|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"},
    "internlm2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    # gpt-oss-20b's tokenizer: a BOS exists but is never added; <|return|> ends the final answer.
    "gpt_oss": {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "unk_token": None,
                "pad_token": "<|endoftext|>"},
}


def build_tiny_tokenizer(
    flavour: str,
    out_dir: str | Path,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
):
    """Train a tiny tokenizer of one LLM family, save it to ``out_dir`` and return it loaded back.

    ``vocab_size`` is the size of the learnt vocabulary: the BPE merges plus byte alphabet (``qwen2``,
    ``gpt_oss``), or the whole sentencepiece model including ``<unk>``/``<s>``/``</s>``, byte pieces and, for
    ``internlm2``, the 11 placeholder pieces of the chat/tool tokens. Special tokens that are not part of it follow
    it with consecutive ids in the order of ``ALL_SPECIAL_TOKENS`` (then ``GPT_OSS_HARMONY_TOKENS``), so
    ``len(tokenizer)`` is ``vocab_size + 23`` (qwen2), ``+ 30`` (gpt_oss), ``+ 20`` (llama, phi3) or ``+ 9``
    (internlm2). The returned tokenizer is the one
    :func:`internvl_chat.model.tokenizer.load_tokenizer` gives for ``out_dir``. Tokenizer files already in
    ``out_dir`` are replaced; other files (a model's config and weights) are left alone.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown tiny tokenizer flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}], got {vocab_size!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:  # a stale file of another flavour would change how the folder loads
        (out_dir / name).unlink(missing_ok=True)
    corpus = training_corpus(seed)
    if flavour in ("qwen2", "gpt_oss"):
        _build_byte_level(corpus, out_dir, vocab_size, flavour)
    elif flavour in ("llama", "phi3"):
        _build_llama(corpus, out_dir, vocab_size, flavour)
    else:
        _build_internlm2(corpus, out_dir, vocab_size)

    from .model.tokenizer import load_tokenizer  # imported late: the model package imports heavy modules

    return load_tokenizer(out_dir)


def _special(token: str):
    from tokenizers import AddedToken

    return AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _extra_tokens(roles: dict[str, str | None], tokens=ALL_SPECIAL_TOKENS) -> list[str]:
    named = {token for token in roles.values() if token is not None}
    return [token for token in tokens if token not in named]


def _build_byte_level(corpus: list[str], out_dir: Path, vocab_size: int, flavour: str) -> None:
    """Byte-level BPE with Qwen2's pre-tokenizer, saved through transformers' Qwen2Tokenizer (no BOS added)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    _check_size(backend.get_vocab_size(), vocab_size, flavour)
    specials = ALL_SPECIAL_TOKENS + (GPT_OSS_HARMONY_TOKENS if flavour == "gpt_oss" else ())
    backend.add_special_tokens([_special(token) for token in specials])

    roles = _ROLES[flavour]
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        **roles,
        extra_special_tokens=_extra_tokens(roles, specials),
        errors="replace",
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_MODEL_MAX_LENGTH,
    )
    tokenizer.save_pretrained(out_dir)


def _train_sentencepiece(corpus: list[str], vocab_size: int, add_dummy_prefix: bool) -> bytes:
    """A Llama-style BPE sentencepiece model (byte fallback, digits split), single-threaded for determinism."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=add_dummy_prefix,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(f"cannot train a {vocab_size}-piece sentencepiece model on the tiny corpus: {err}") from err
    return buffer.getvalue()


def _build_llama(corpus: list[str], out_dir: Path, vocab_size: int, flavour: str) -> None:
    from transformers import LlamaTokenizer

    model_file = out_dir / "tokenizer.model"
    model_file.write_bytes(_train_sentencepiece(corpus, vocab_size, add_dummy_prefix=True))
    # transformers' own sentencepiece -> BPE conversion, so the result is what a Llama checkpoint gives.
    native = LlamaTokenizer.convert_to_native_format(vocab_file=str(model_file))
    base = LlamaTokenizer(vocab=native["vocab"], merges=native["merges"], legacy=False)
    _check_size(len(base), vocab_size, flavour)
    backend = base.backend_tokenizer
    backend.add_special_tokens([_special(token) for token in ALL_SPECIAL_TOKENS if token not in native["vocab"]])

    roles = _ROLES[flavour]
    tokenizer = LlamaTokenizer(
        tokenizer_object=backend,
        **roles,
        extra_special_tokens=_extra_tokens(roles),
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        use_default_system_prompt=False,
        model_max_length=TINY_MODEL_MAX_LENGTH,
    )
    tokenizer.save_pretrained(out_dir)


def _append_placeholder_pieces(model_proto: bytes, count: int) -> bytes:
    """Append ``count`` user-defined pieces ``[UNUSED_TOKEN_i]`` at the top of a sentencepiece model."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    for index in range(count):
        piece = model.pieces.add()
        piece.piece = f"[UNUSED_TOKEN_{index}]"
        piece.score = 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    model.trainer_spec.vocab_size = len(model.pieces)
    return model.SerializeToString()


def _build_internlm2(corpus: list[str], out_dir: Path, vocab_size: int) -> None:
    from .model.tokenizer import InternLM2Tokenizer

    placeholders = len(_INTERNLM2_PLACEHOLDER_TOKENS)
    proto = _train_sentencepiece(corpus, vocab_size - placeholders, add_dummy_prefix=False)
    model_file = out_dir / "tokenizer.model"
    model_file.write_bytes(_append_placeholder_pieces(proto, placeholders))

    first = vocab_size - placeholders
    decoder = {0: "<unk>", 1: "<s>", 2: "</s>"}
    decoder.update({first + i: token for i, token in enumerate(_INTERNLM2_PLACEHOLDER_TOKENS)})
    decoder.update({vocab_size + i: token for i, token in enumerate(INTERNVL_SPECIAL_TOKENS)})
    roles = _ROLES["internlm2"]
    tokenizer = InternLM2Tokenizer(
        vocab_file=str(model_file),
        **roles,
        added_tokens_decoder={index: _special(token) for index, token in decoder.items()},
        extra_special_tokens=list(_INTERNLM2_ADDITIONAL) + list(INTERNVL_SPECIAL_TOKENS),
        add_bos_token=True,
        add_eos_token=False,
        decode_with_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_MODEL_MAX_LENGTH,
        auto_map=_INTERNLM2_AUTO_MAP,
    )
    _check_size(len(tokenizer), vocab_size + len(INTERNVL_SPECIAL_TOKENS), "internlm2")
    tokenizer.save_pretrained(out_dir)


def _check_size(actual: int, wanted: int, flavour: str) -> None:
    if actual != wanted:
        raise ValueError(
            f"the tiny {flavour} tokenizer came out with {actual} tokens instead of {wanted}; "
            "the built-in corpus cannot support that vocab_size, choose a smaller one"
        )
