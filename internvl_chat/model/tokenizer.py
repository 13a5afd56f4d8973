"""Loading the tokenizer of an InternVL checkpoint (or of its bare LLM), offline and without remote code.

The official pipeline calls ``AutoTokenizer.from_pretrained(path, add_eos_token=False, trust_remote_code=True,
use_fast=False)`` under transformers 4.37 and then adds the 9 InternVL tokens. Under transformers 5 three
things change, and this module absorbs them in one place:

* Qwen2 / Llama / Yi / Llama-3 / Phi-3 tokenizers are served by the library's own classes, but a
  ``tokenizer.json`` now decides on its own whether a BOS is added, so ``tokenizer.add_bos_token`` may read
  ``False`` while a BOS is in fact prepended. :func:`load_tokenizer` makes the flag tell the truth (the
  templates' preprocessing keys off it) and drops an appended EOS, as ``add_eos_token=False`` did.
* InternLM2 checkpoints ship their tokenizer as remote code (``tokenization_internlm2.py``). The built-in
  :class:`InternLM2Tokenizer` reproduces it on top of the ``tokenizer.model`` sentencepiece file, so no code
  from the checkpoint runs unless the caller opts in with ``trust_remote_code=True``.
* Nothing is fetched: every load is ``local_files_only``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from shutil import copyfile
from typing import Any

import sentencepiece as spm
from transformers import (
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedTokenizer,
    PreTrainedTokenizerBase,
    TokenizersBackend,
    dynamic_module_utils,
)
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

from internvl_chat.constants import INTERNVL_SPECIAL_TOKENS

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class TokenizerLoadError(ValueError):
    """A tokenizer directory that cannot be loaded as asked; the message says what to do instead."""


class InternLM2Tokenizer(PreTrainedTokenizer):
    """The InternLM2 / InternLM2.5 tokenizer, rebuilt on sentencepiece without the checkpoint's remote code.

    Same behaviour as the official ``tokenization_internlm2.InternLM2Tokenizer`` that InternVL 1.5 / 2 / 2.5
    checkpoints ship:

    * text between added tokens is encoded by the sentencepiece model as is (``sp.encode(chunk)``), so the
      model's own ``add_dummy_prefix`` / whitespace settings apply to every chunk;
    * a BOS is prepended (``add_bos_token=True``), no EOS is appended (``add_eos_token=False``);
    * the chat / tool tokens live in the sentencepiece vocabulary as placeholder pieces and are renamed by
      ``added_tokens_decoder`` in ``tokenizer_config.json``; tokens past the sentencepiece vocabulary (the
      InternVL ones) are plain added tokens. Both are handled by the transformers base class;
    * decoding runs sentencepiece over each stretch of ordinary pieces (so leading spaces come out exactly as
      sentencepiece writes them) and, like the official code, always applies the classic clean-up of
      tokenization spaces (``" ."`` -> ``"."``, ``" n't"`` -> ``"n't"`` ...) to those stretches, whatever
      ``clean_up_tokenization_spaces`` says. Added tokens are written verbatim. (The official class also
      inserted a space before a special token that follows text when special tokens are kept; that quirk of
      ``decode(..., skip_special_tokens=False)`` is not reproduced.)
    """

    vocab_files_names = {"vocab_file": SENTENCEPIECE_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        decode_with_prefix_space: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise TokenizerLoadError(
                f"InternLM2Tokenizer needs the sentencepiece file {SENTENCEPIECE_FILE!r}; not found: {vocab_file!r}"
            )
        self.vocab_file = vocab_file
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # Stored for round trips only: the official class keeps the option but never reads it.
        self.decode_with_prefix_space = decode_with_prefix_space
        self.sp_model = self._load_sp_model(vocab_file)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            sp_model_kwargs=self.sp_model_kwargs,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            decode_with_prefix_space=decode_with_prefix_space,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def _load_sp_model(self, vocab_file: str | None = None, proto: bytes | None = None):
        model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        if proto is not None:
            model.LoadFromSerializedProto(proto)
        else:
            model.Load(vocab_file)
        return model

    # A SentencePieceProcessor cannot be pickled; data-loader workers started with "spawn" need to.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["_sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        proto = state.pop("_sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = self._load_sp_model(proto=proto)

    @property
    def vocab_size(self) -> int:
        """Size of the sentencepiece vocabulary (tokens added past it are not counted, as in the base class)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.convert_ids_to_tokens(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.IdToPiece(index)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        # The official class puts no separator between the two sequences of a pair.
        return bos + token_ids_0 + (token_ids_1 or []) + eos

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        body = [0] * (len(token_ids_0) + len(token_ids_1 or []))
        return [1] * bool(self.add_bos_token) + body + [1] * bool(self.add_eos_token)

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def _decode_pieces(self, pieces: list[str]) -> str:
        """Ordinary sentencepiece pieces -> text, with the official unconditional space clean-up."""
        return self.clean_up_tokenization(self.sp_model.decode(pieces)) if pieces else ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        added = self._added_tokens_encoder
        out: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in added:
                out.append(self._decode_pieces(run))
                run = []
                out.append(token)
            else:
                run.append(token)
        out.append(self._decode_pieces(run))
        return "".join(out)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        out: list[str] = []
        run: list[str] = []
        for index in ids:
            if index in skip:
                continue
            if index in self._added_tokens_decoder:
                out.append(self._decode_pieces(run))
                run = []
                out.append(self._added_tokens_decoder[index].content)
            else:
                run.append(self._convert_id_to_token(index))
        out.append(self._decode_pieces(run))
        return "".join(out)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"cannot save the tokenizer vocabulary: {save_directory!r} is not a directory")
        out_file = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + SENTENCEPIECE_FILE)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_file) and os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, out_file)
        elif not os.path.isfile(out_file):
            with open(out_file, "wb") as handle:
                handle.write(self.sp_model.serialized_model_proto())
        return (out_file,)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save like the base class, then write back the keys released InternLM2 configs carry.

        transformers 5 leaves ``add_bos_token`` / ``add_eos_token`` out of ``tokenizer_config.json`` and
        names the extra special tokens ``extra_special_tokens``; the official tokenizer class (transformers
        4.x) reads the flags and ``additional_special_tokens``, so both are written too.
        """
        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        config_file = Path(save_directory) / ((prefix + "-" if prefix else "") + TOKENIZER_CONFIG_FILE)
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["add_bos_token"] = bool(self.add_bos_token)
            config["add_eos_token"] = bool(self.add_eos_token)
            if config.get("extra_special_tokens"):  # the transformers 4.x name of the same list
                config["additional_special_tokens"] = config["extra_special_tokens"]
            for loading_option in ("is_local", "local_files_only"):  # from_pretrained arguments, not settings
                config.pop(loading_option, None)
            config_file.write_text(
                json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        return files


# Remote-code tokenizer classes we carry a built-in equivalent of (the Fast variant reads the same
# tokenizer.model and gives the same ids, so it maps to the same class).
BUILTIN_TOKENIZER_CLASSES: dict[str, type[PreTrainedTokenizer]] = {
    "InternLM2Tokenizer": InternLM2Tokenizer,
    "InternLM2TokenizerFast": InternLM2Tokenizer,
}


def read_tokenizer_config(path: str | os.PathLike) -> dict[str, Any]:
    """``tokenizer_config.json`` of a checkpoint directory as a dict ({} when the file is absent)."""
    config_file = Path(path) / TOKENIZER_CONFIG_FILE
    if not config_file.is_file():
        return {}
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerLoadError(f"{config_file} is not valid JSON: {err}") from err


def _auto_map_entry(config: dict[str, Any]) -> list[str | None] | None:
    """The ``AutoTokenizer`` entry of ``auto_map`` as ``[slow_ref, fast_ref]``, or None."""
    auto_map = config.get("auto_map")
    if auto_map is None:
        return None
    entry = auto_map if isinstance(auto_map, (list, tuple)) else auto_map.get("AutoTokenizer")
    if entry is None:
        return None
    if isinstance(entry, str):
        return [entry, None]
    entry = list(entry) + [None] * (2 - len(entry))
    return entry[:2]


def ensure_internvl_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the InternVL special tokens the tokenizer lacks, in the official order; return how many were added.

    The official script adds all 9 with ``add_tokens(..., special_tokens=True)``: tokens already present keep
    their ids, missing ones get consecutive new ids in ``INTERNVL_SPECIAL_TOKENS`` order (so ``<IMG_CONTEXT>``
    lands where released checkpoints have it). They are also registered as special tokens so that
    ``decode(..., skip_special_tokens=True)`` strips them, as the official chat output does. A non-zero result
    means the model's embeddings must grow to ``len(tokenizer)``.
    """
    before = len(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(INTERNVL_SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    return len(tokenizer) - before


def _has_token(tokenizer: PreTrainedTokenizerBase, token: str | None) -> bool:
    return token is not None and token in tokenizer.get_vocab()


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token if it has none, reusing an existing token (no new id).

    Choice, by family (what released checkpoints use): InternLM2 pads with ``</s>``, Qwen with
    ``<|endoftext|>``, anything else with its EOS token.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id is not None:
        return
    candidates = [tokenizer.eos_token]
    if isinstance(tokenizer, InternLM2Tokenizer):
        candidates.insert(0, "</s>")
    elif type(tokenizer).__name__.startswith("Qwen"):
        candidates.insert(0, "<|endoftext|>")
    for candidate in candidates:
        if _has_token(tokenizer, candidate):
            tokenizer.pad_token = candidate
            return
    raise TokenizerLoadError(
        f"tokenizer {tokenizer.name_or_path!r} has no pad token and no EOS token to pad with; "
        "set pad_token in its tokenizer_config.json"
    )


def _sync_bos_eos_flags(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make ``add_bos_token`` report what encoding really does, and stop an appended EOS.

    transformers 5 drops ``add_bos_token``/``add_eos_token`` from the config when a ``tokenizer.json`` is
    present (its post-processor decides), so the attribute can read False while a BOS is prepended. The
    official pipeline loads with ``add_eos_token=False``; an EOS appended by a post-processor is removed.
    """
    if not isinstance(tokenizer, TokenizersBackend):
        return
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    n = len(plain)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos_id is not None and full[:1] == [bos_id] and full[1 : 1 + n] == plain
    start = 1 if adds_bos else 0
    adds_eos = eos_id is not None and len(full) == start + n + 1 and full[-1] == eos_id and full[start:-1] == plain
    # Set the private fields: the public setters rebuild the post-processor.
    object.__setattr__(tokenizer, "_add_bos_token", adds_bos)
    object.__setattr__(tokenizer, "_add_eos_token", adds_eos)
    if adds_eos:
        tokenizer.add_eos_token = False  # rebuilds the post-processor, keeping the BOS found above


def _default_padding_side(config: dict[str, Any]) -> str | None:
    """Padding side the official loader would end up with when the caller does not choose one.

    A ``padding_side`` in the config wins. Otherwise Llama-class tokenizers pad on the left (class default
    of ``LlamaTokenizerFast`` in transformers 4.37 and of ``LlamaTokenizer`` in 5.x); transformers 5 loses
    that default when it serves a byte-level ``LlamaTokenizer`` config through ``TokenizersBackend``.
    """
    if config.get("padding_side") in ("left", "right"):
        return config["padding_side"]
    if (config.get("tokenizer_class") or "").removesuffix("Fast") == "LlamaTokenizer":
        return "left"
    return None


def _load_remote_code(path: Path, entry: list[str | None], use_fast: bool | None) -> PreTrainedTokenizerBase:
    """Run the checkpoint's own tokenizer code (explicit opt-in): slow class unless ``use_fast``."""
    slow_ref, fast_ref = entry
    class_ref = fast_ref if (use_fast and fast_ref) else (slow_ref or fast_ref)
    if class_ref is None:
        raise TokenizerLoadError(f"{path / TOKENIZER_CONFIG_FILE}: auto_map names no AutoTokenizer class")
    module_file = path / (class_ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    if not module_file.is_file():
        # Trainer outputs carry the config's auto_map but not the *.py files it points to.
        raise TokenizerLoadError(
            f"trust_remote_code=True but {path} lacks {module_file.name} named by its auto_map ({class_ref}); "
            "copy the *.py files from the original checkpoint, or load without trust_remote_code"
            + (" to use the built-in tokenizer" if (path / SENTENCEPIECE_FILE).is_file() else "")
        )
    tokenizer_class = dynamic_module_utils.get_class_from_dynamic_module(class_ref, str(path), local_files_only=True)
    return tokenizer_class.from_pretrained(
        str(path), trust_remote_code=True, local_files_only=True, add_eos_token=False
    )


def _load_builtin_or_library(path: Path, config: dict[str, Any], entry: list[str | None] | None):
    class_name = config.get("tokenizer_class") or ""
    builtin = BUILTIN_TOKENIZER_CLASSES.get(class_name)
    if builtin is not None:
        if not (path / SENTENCEPIECE_FILE).is_file():
            raise TokenizerLoadError(
                f"{path} declares {class_name} but has no {SENTENCEPIECE_FILE}; copy the sentencepiece file "
                "from the original checkpoint into this directory"
            )
        return builtin.from_pretrained(str(path), local_files_only=True, add_eos_token=False)

    known = bool(class_name) and (
        tokenizer_class_from_name(class_name) is not None
        or tokenizer_class_from_name(class_name.removesuffix("Fast")) is not None
    )
    if entry is not None and not known:
        remote = ", ".join(ref for ref in entry if ref)
        raise TokenizerLoadError(
            f"{path} needs remote code for its tokenizer ({class_name or 'no tokenizer_class'}; auto_map: {remote}) "
            f"and there is no built-in equivalent (built-in: {', '.join(sorted(BUILTIN_TOKENIZER_CLASSES))}). "
            "Either pass trust_remote_code=True (--trust_remote_code) to run the checkpoint's own tokenizer code, "
            "or re-save the tokenizer with a transformers class (tokenizer.save_pretrained) and point to that copy."
        )
    try:
        # A blank config keeps AutoTokenizer from importing the checkpoint's model config (remote code for
        # InternVL checkpoints) just to pick a tokenizer class.
        return AutoTokenizer.from_pretrained(
            str(path), config=PreTrainedConfig(), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as err:
        raise TokenizerLoadError(f"cannot load the tokenizer in {path}: {err}") from err


def load_tokenizer(
    path: str | os.PathLike,
    *,
    use_fast: bool | None = None,
    trust_remote_code: bool = False,
    model_max_length: int | None = None,
    padding_side: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local checkpoint directory, ready for InternVL training and chat.

    * Never touches the network. Qwen2/2.5, Llama/Yi/Llama-3 and Phi-3 load through the transformers classes;
      InternLM2/2.5 (remote code in the checkpoint) through the built-in :class:`InternLM2Tokenizer`, or
      through the checkpoint's own code when ``trust_remote_code=True``. Other remote-code tokenizers need
      ``trust_remote_code=True``; without it a :class:`TokenizerLoadError` says so.
    * ``use_fast`` only matters for remote code (slow class unless True, as the official default
      ``--use_fast_tokenizer False``); transformers 5 has a single implementation of the library tokenizers.
    * Adds the missing InternVL tokens (:func:`ensure_internvl_tokens`); how many were added is stored in
      ``tokenizer.num_added_internvl_tokens`` so the model can resize its embeddings.
    * Sets ``model_max_length`` / ``padding_side`` when given, makes sure a pad token exists
      (:func:`ensure_pad_token`) and that ``add_bos_token`` tells the truth.
    """
    path = Path(path)
    if not path.is_dir():
        raise TokenizerLoadError(
            f"tokenizer directory not found: {str(path)!r} (tokenizers are loaded from local folders only; "
            "download the checkpoint first, e.g. `huggingface-cli download <repo> --local-dir <dir>`)"
        )
    if padding_side not in (None, "left", "right"):
        raise TokenizerLoadError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if model_max_length is not None and (not isinstance(model_max_length, int) or model_max_length <= 0):
        raise TokenizerLoadError(f"model_max_length must be a positive int, got {model_max_length!r}")

    config = read_tokenizer_config(path)
    entry = _auto_map_entry(config)
    if trust_remote_code and entry is not None:
        tokenizer = _load_remote_code(path, entry, use_fast)
    else:
        tokenizer = _load_builtin_or_library(path, config, entry)

    _sync_bos_eos_flags(tokenizer)
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    padding_side = padding_side or _default_padding_side(config)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    ensure_pad_token(tokenizer)
    added = ensure_internvl_tokens(tokenizer)
    tokenizer.num_added_internvl_tokens = added
    if added:
        logger.info("added %d InternVL special tokens to the tokenizer in %s", added, path)
    return tokenizer
