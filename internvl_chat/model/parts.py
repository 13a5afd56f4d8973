"""A chat model's parts: build one from an InternViT + an LLM (+ a projector), and the surgery the official tools do.

The official pretraining stage starts from parts (`--vision_path`, `--llm_path`, optional `--mlp_path`): the ViT and
the LLM are loaded from their own checkpoint folders, the chat config is built around their configs, and the
projector `mlp1` starts fresh with PyTorch's default initialisation (the official model never re-initialises it).
The same pieces serve `tools/extract_mlp.py` (save `mlp1` alone), `tools/replace_llm.py` (swap the LLM of a chat
checkpoint) and `tools/resize_pos_embed.py` (change the ViT's tile size).

Parts are read from local folders only, safetensors unless `allow_pickle`, with no code from the folders: the LLM
class comes from `llm_config.architectures[0]` (configuration.LLM_FAMILIES).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from .configuration import InternVLChatConfig, llm_classes, llm_family
from .modeling import InternVLChatModel, _flash_attn_usable
from .vision import InternVisionModel
from .weight_files import CorruptWeightsError, check_weights_dir, safetensors_problem

logger = logging.getLogger(__name__)

# mlp1 = LayerNorm(4 C_v), Linear(4 C_v -> D), GELU, Linear(D -> D): index 2 has no parameters
PROJECTOR_KEYS = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
PROJECTOR_FILE = "mlp_projector.safetensors"  # the official tool writes mlp_projector.pth (a pickle)
VISION_MODEL_TYPE = "intern_vit_6b"  # model_type of every InternViT config, 300M included
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")  # one of them: a tokenizer is there


class PartsError(ValueError):
    """A part (ViT folder, LLM folder, projector file) that cannot be used as asked; the message says why."""


# --- reading the parts ----------------------------------------------------------------------------------------------
def read_config(path: str, flag: str) -> dict[str, Any]:
    """config.json of a part folder, with the flag that named it in every error."""
    if not path or not os.path.isdir(path):
        raise PartsError(f"{flag} {path}: no such folder (parts are loaded from local folders only)")
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except OSError:
        raise PartsError(f"{flag} {path}: the folder holds no config.json") from None
    except ValueError as exc:
        raise PartsError(f"{flag} {path}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PartsError(f"{flag} {path}: config.json does not hold an object")
    return config


def vision_config_of(path: str) -> dict[str, Any]:
    """The InternViT config of a `--vision_path` folder (a chat checkpoint is refused: it has its own projector)."""
    config = read_config(path, "--vision_path")
    if config.get("model_type") == "internvl_chat":
        raise PartsError(f"--vision_path {path} is an InternVL chat checkpoint, not an InternViT: fine-tune it with "
                         "--model_name_or_path, or swap its LLM with tools/replace_llm.py")
    if config.get("model_type") != VISION_MODEL_TYPE and "InternVisionModel" not in (config.get("architectures") or []):
        raise PartsError(f"--vision_path {path} is not an InternViT checkpoint (model_type "
                         f"{config.get('model_type')!r}; an InternViT has model_type {VISION_MODEL_TYPE!r})")
    return config


def llm_config_of(path: str) -> dict[str, Any]:
    """The LLM config of an `--llm_path` / replace_llm folder, its architecture checked against those supported."""
    config = read_config(path, "--llm_path")
    if config.get("model_type") == "internvl_chat":
        raise PartsError(f"--llm_path {path} is an InternVL chat checkpoint, not an LLM: pass the LLM's own folder")
    try:
        llm_family(config)
    except ValueError as exc:
        raise PartsError(f"--llm_path {path}: {exc}") from None
    return config


def check_parts(vision_path: str | None, llm_path: str | None, mlp_path: str | None = None,
                downsample_ratio: float = 0.5, allow_pickle: bool = False) -> None:
    """The parts of a new model are usable, before anything loads: an InternViT folder, an LLM folder with its
    tokenizer, weights that are safetensors (or allowed pickles) and whole, a projector file of the right widths."""
    if not (vision_path and llm_path):
        given, missing = ("--vision_path", "--llm_path") if vision_path else ("--llm_path", "--vision_path")
        raise PartsError(f"{given} without {missing}: a new model is built from an InternViT folder (--vision_path) "
                         "and an LLM folder (--llm_path); to fine-tune a chat checkpoint pass --model_name_or_path")
    vision, llm = vision_config_of(vision_path), llm_config_of(llm_path)
    if not any(os.path.isfile(os.path.join(llm_path, name)) for name in TOKENIZER_FILES):
        raise PartsError(f"--llm_path {llm_path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); the new model "
                         "uses the LLM's tokenizer")
    for flag, path in (("--vision_path", vision_path), ("--llm_path", llm_path)):
        try:
            check_weights_dir(path, allow_pickle)
        except ValueError as exc:  # UnsafeWeightsError, CorruptWeightsError
            raise PartsError(f"{flag} {path}: {exc}") from None
    if mlp_path:
        check_projector_file(mlp_path, vision, llm, downsample_ratio, allow_pickle)


def check_projector_file(mlp_path: str, vision_config: dict, llm_config: dict, downsample_ratio: float,
                         allow_pickle: bool = False) -> None:
    """An `--mlp_path` file fits a ViT and an LLM of these configs (read from the file's header only)."""
    expected = projector_shapes(vision_config["hidden_size"], llm_config["hidden_size"], downsample_ratio)
    try:
        shapes = projector_file_shapes(mlp_path, allow_pickle)
    except CorruptWeightsError as exc:
        raise PartsError(str(exc)) from None
    check_projector(shapes, expected, f"--mlp_path {mlp_path}")


def projector_shapes(vit_hidden: int, llm_hidden: int, downsample_ratio: float) -> dict[str, tuple[int, ...]]:
    """The shape of each mlp1 tensor for a ViT width, an LLM width and a pixel-shuffle ratio."""
    shuffled = vit_hidden * int(1 / downsample_ratio) ** 2
    return {"0.weight": (shuffled,), "0.bias": (shuffled,), "1.weight": (llm_hidden, shuffled),
            "1.bias": (llm_hidden,), "3.weight": (llm_hidden, llm_hidden), "3.bias": (llm_hidden,)}


def check_projector(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """The projector tensors (by shape) fit the model; a mismatch names the widths involved."""
    if set(shapes) != set(expected):
        raise PartsError(f"{where}: holds {sorted(shapes)}, a projector holds {list(PROJECTOR_KEYS)} "
                         "(tools/extract_mlp.py writes that file)")
    bad = [k for k in PROJECTOR_KEYS if tuple(shapes[k]) != tuple(expected[k])]
    if bad:
        got_in, got_out = shapes["1.weight"][1], shapes["1.weight"][0]
        want_in, want_out = expected["1.weight"][1], expected["1.weight"][0]
        raise PartsError(f"{where}: the projector maps {got_in} -> {got_out} features, the model needs {want_in} -> "
                         f"{want_out} (ViT width x 4 -> LLM hidden size): it comes from another ViT or LLM")


def projector_file_shapes(path: str, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a projector file: from the safetensors header (a pickle is read whole, when allowed)."""
    from safetensors import safe_open

    if os.path.isfile(path) and safetensors_problem(path) is None:
        with safe_open(path, "pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    return {k: tuple(v.shape) for k, v in read_projector(path, allow_pickle).items()}


def read_projector(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The mlp1 state dict of a projector file: safetensors (ours), or the official `mlp_projector.pth` with
    `allow_pickle` (read by torch's restricted unpickler; keys with or without the `mlp1.` prefix)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise PartsError(f"--mlp_path {path}: no such file")
    problem = safetensors_problem(path)
    if problem is None:
        return load_file(path)
    if not allow_pickle:
        raise CorruptWeightsError(f"--mlp_path {path}: {problem} (a .safetensors file is needed: write one with "
                                  "tools/extract_mlp.py, or pass --allow_pickle to read an official .pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise CorruptWeightsError(f"--mlp_path {path}: neither safetensors ({problem}) nor a readable torch file "
                                  f"({exc})") from None
    if not isinstance(state, dict):
        raise PartsError(f"--mlp_path {path}: holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("mlp1."): v for k, v in state.items()}


def load_projector(model: InternVLChatModel, path: str, allow_pickle: bool = False) -> None:
    """Load a projector file (`--mlp_path`) into `model.mlp1`, refusing one of another ViT / LLM width."""
    state = read_projector(path, allow_pickle)
    expected = {k: tuple(v.shape) for k, v in model.mlp1.state_dict().items()}
    check_projector({k: tuple(v.shape) for k, v in state.items()}, expected, f"--mlp_path {path}")
    model.mlp1.load_state_dict(state)
    logger.info("loaded the projector (mlp1) from %s", path)


def save_projector(model: InternVLChatModel, path: str, dtype: torch.dtype | None = None) -> None:
    """Write `model.mlp1` as safetensors (keys `0.weight` ... `3.bias`, what `--mlp_path` loads), the widths in the
    file's metadata."""
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in model.mlp1.state_dict().items()}
    cfg = model.config
    metadata = {"format": "pt", "vit_hidden_size": str(cfg.vision_config.hidden_size),
                "llm_hidden_size": str(cfg.llm_config.hidden_size), "downsample_ratio": str(cfg.downsample_ratio)}
    save_file(state, path, metadata=metadata)


@torch.no_grad()
def init_projector(mlp1: nn.Module, seed: int | None = None) -> None:
    """PyTorch's default initialisation of a fresh projector (LayerNorm: ones and zeros; Linear: Kaiming-uniform),
    which is what the official model gets: it never re-initialises mlp1 after construction. With ``seed``, drawn
    from a generator of that seed, so every process and every way of loading the parts (ZeRO-3 included, whose
    loading draws random numbers) starts from the same projector."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for module in mlp1.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()


def _attn_implementation(dtype: torch.dtype) -> str:
    return "flash_attention_2" if _flash_attn_usable(dtype) else "sdpa"


def load_vision_part(path: str, config: InternVLChatConfig, dtype: torch.dtype,
                     allow_pickle: bool = False) -> InternVisionModel:
    """The InternViT of a `--vision_path` folder, with `config.vision_config` as its config."""
    safetensors = check_weights_dir(path, allow_pickle)
    model = InternVisionModel.from_pretrained(
        path, config=config.vision_config, dtype=dtype, attn_implementation=_attn_implementation(dtype),
        use_safetensors=safetensors, weights_only=True, local_files_only=True)
    config.vision_config = model.config  # from_pretrained works on a copy: keep one live config
    return model


def load_llm_part(path: str, config: InternVLChatConfig, dtype: torch.dtype, allow_pickle: bool = False,
                  **load_kwargs: Any):
    """The LLM of an `--llm_path` folder, its class from `llm_config.architectures[0]` (no remote code)."""
    _, llm_cls = llm_classes(llm_family(config.llm_config))
    safetensors = check_weights_dir(path, allow_pickle)
    model = llm_cls.from_pretrained(
        path, config=config.llm_config, dtype=dtype, attn_implementation=_attn_implementation(dtype),
        use_safetensors=safetensors, weights_only=True, local_files_only=True, **load_kwargs)
    config.llm_config = model.config
    return model


def build_from_parts(vision_path: str, llm_path: str, *, dtype: torch.dtype = torch.float32,
                     allow_pickle: bool = False, seed: int | None = None, **fields: Any) -> InternVLChatModel:
    """An InternVL chat model from an InternViT folder and an LLM folder, with a fresh projector.

    ``fields`` are the chat config's own (template, downsample_ratio, select_layer, ps_version, ...); ``seed``
    makes the projector's initialisation independent of how the parts load (init_projector). The tile
    size is the ViT's unless ``force_image_size`` says otherwise. The tokenizer is the LLM's (load_tokenizer adds
    the InternVL tokens; the caller grows the vocabulary when they do not fit).
    """
    vision_raw, llm_raw = vision_config_of(vision_path), llm_config_of(llm_path)
    fields.setdefault("force_image_size", vision_raw.get("image_size"))
    config = InternVLChatConfig(vision_config=vision_raw, llm_config=llm_raw, architectures=["InternVLChatModel"],
                                **fields)
    config._attn_implementation = _attn_implementation(dtype)
    vision_model = load_vision_part(vision_path, config, dtype, allow_pickle)
    language_model = load_llm_part(llm_path, config, dtype, allow_pickle)
    model = InternVLChatModel(config, vision_model=vision_model, language_model=language_model)
    init_projector(model.mlp1, seed)
    model.mlp1.to(dtype)
    logger.info("built an InternVL chat model from parts: ViT %s (width %d), LLM %s (%s, hidden %d), a fresh "
                "projector", vision_path, config.vision_config.hidden_size, llm_path, llm_family(config.llm_config),
                config.llm_config.hidden_size)
    return model


def replace_llm(model: InternVLChatModel, llm_path: str, dtype: torch.dtype | None = None,
                allow_pickle: bool = False) -> tuple[InternVLChatModel, bool]:
    """`model` with the LLM of `llm_path` in place of its own, and whether the projector was re-initialised: it is
    kept when its output width is the new LLM's hidden size, and starts fresh (PyTorch default) otherwise. The
    ViT, the chat fields and the template are kept."""
    llm_raw = llm_config_of(llm_path)
    dtype = dtype or model.dtype
    old = model.config.to_dict()
    old.pop("llm_config")
    vision_raw = old.pop("vision_config")
    for key in ("dtype", "torch_dtype", "hidden_size", "model_type", "transformers_version", "auto_map"):
        old.pop(key, None)
    config = InternVLChatConfig(vision_config=vision_raw, llm_config=llm_raw, **old)
    config._attn_implementation = model.config._attn_implementation
    config.vision_config = model.vision_model.config
    language_model = load_llm_part(llm_path, config, dtype, allow_pickle)
    new = InternVLChatModel(config, vision_model=model.vision_model, language_model=language_model)
    keep = new.mlp1[3].weight.shape == model.mlp1[3].weight.shape
    if keep:
        new.mlp1.load_state_dict(model.mlp1.state_dict())
    else:
        init_projector(new.mlp1)
    new.mlp1.to(dtype)
    new.img_context_token_id = model.img_context_token_id
    return new, not keep


# --- resizing -------------------------------------------------------------------------------------------------------
def check_image_size(image_size: int, patch_size: int, downsample_ratio: float) -> None:
    """A tile size the ViT and the pixel shuffle can take: whole patches, and a patch grid the shuffle divides."""
    if image_size <= 0 or image_size % patch_size:
        raise PartsError(f"image size {image_size} is not a positive multiple of the patch size {patch_size}")
    grid = image_size // patch_size
    step = int(round(1 / downsample_ratio))
    if grid % step:
        raise PartsError(f"image size {image_size} gives a {grid}x{grid} patch grid, which the pixel shuffle "
                         f"(ratio {downsample_ratio}) cannot divide: use a multiple of {patch_size * step}")


def resize_position_embedding(model: InternVLChatModel, image_size: int) -> None:
    """Permanently resample the ViT position table for a new tile size: bicubic in float32, CLS kept (the official
    interpolation, the same the ViT applies on the fly to a tile of another size)."""
    emb = model.vision_model.embeddings
    grid = image_size // emb.patch_size
    with torch.no_grad():
        patches = emb.patch_position_embedding(grid, grid, torch.float32)
        table = torch.cat([emb.position_embedding[:, :1].float(), patches], dim=1).to(emb.position_embedding.dtype)
    emb.position_embedding = nn.Parameter(table)
    emb.grid = grid
    model.config.vision_config.image_size = image_size
    logger.info("resized ViT position embeddings to %dx%d patches (tile %d px)", grid, grid, image_size)


def resize_embeddings(model: InternVLChatModel, new_size: int) -> None:
    """Grow the vocabulary; new output rows start at the mean of the old ones (as the official script does)."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    old = model.config.llm_config.vocab_size
    model.language_model.resize_token_embeddings(new_size)
    out = model.get_output_embeddings().weight
    gather = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([out], modifier_rank=0)
    with gather, torch.no_grad():
        out[old:] = out[:old].mean(dim=0, keepdim=True)
    model.config.llm_config.vocab_size = new_size
    logger.info("resized token embeddings %d -> %d", old, new_size)
