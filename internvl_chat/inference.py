"""How a chat turn becomes model inputs: images -> tiles, question + history -> the prompt text.

`model.chat()` / `model.batch_chat()` delegate here, so the model holds no prompt logic and `model/` needs no
conversation template. This module imports only `constants` and `data/` (never `model/`) and takes the model as an
argument, so the import runs one way: model -> inference -> data.

Images load with the training loader's checks (`data/transforms.py` `load_image`): a path that is not a regular
file, a truncated file or one with more than `max_image_pixels` pixels (from its header, before decoding; default
PIL's own bomb limit, 0 = none) raises an error naming the file, where the official README code removes PIL's
limit and decodes whatever it is given. An image over the limit raises `ImageTooLargeError`, a `ValueError`.
Prompts are rendered by the same `Template` that renders training samples, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import GenerationConfig

from .constants import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from .data.config import image_tile_range
from .data.media import DEFAULT_MAX_IMAGE_PIXELS
from .data.templates import Template, get_template
from .data.transforms import image_to_tiles, load_image, normalize_tiles
from .model.configuration import chat_keeps_special_tokens


def load_image_tiles(
    image: str | Path | Image.Image,
    *,
    image_size: int = 448,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    dynamic: bool = True,
    normalize_type: str = "imagenet",
    dtype: torch.dtype = torch.float32,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_truncated: bool = False,
) -> torch.Tensor:
    """One image -> normalised tiles [N, 3, S, S] (dynamic tiling, thumbnail last), ready for `model.chat`.

    A path is loaded with `load_image`'s checks (module docstring); too many pixels raise `ImageTooLargeError`
    (a `ValueError` naming the file and the limit), any other unreadable file `ImageLoadError` (an `OSError`).
    """
    if not isinstance(image, Image.Image):
        image = load_image(image, max_image_pixels=max_image_pixels, allow_truncated=allow_truncated)
    tiles = image_to_tiles(
        image, dynamic=dynamic, min_num=min_num, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail
    )
    return normalize_tiles(tiles, normalize_type, dtype=dtype)


def images_for_model(
    model, images: list, max_num: int | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor | None, list[int]]:
    """Tiles for several images with the model's own tiling settings; returns (pixel_values, num_patches_list)."""
    if not images:
        return None, []
    cfg = model.config
    # the training dataset's tile range: the multi-image budget is shared between the images
    min_num, per_image = image_tile_range(max_num or cfg.max_dynamic_patch, len(images), cfg.min_dynamic_patch)
    tiles = [
        load_image_tiles(
            img, image_size=cfg.image_size, max_num=per_image, min_num=min_num,
            use_thumbnail=cfg.use_thumbnail, dynamic=cfg.dynamic_image_size,
            normalize_type=getattr(cfg, "normalize_type", "imagenet"), max_image_pixels=max_image_pixels,
        )
        for img in images
    ]
    return torch.cat(tiles), [len(t) for t in tiles]


def multi_image_prefix(n_images: int) -> str:
    """`Image-1: <image>\\nImage-2: <image>\\n...` — the convention of the official docs and evaluation."""
    if n_images <= 1:
        return ""
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images))


# --- prompts: how a chat turn becomes the text the model reads --------------------------------------------------
def chat_template(model) -> Template:
    """The model's conversation template (`config.template`), the same one its training data was rendered with."""
    if model.template is None:
        raise ValueError("config.template is not set; cannot build a chat prompt")
    return get_template(model.template)


def build_prompt(
    model,
    question: str,
    history: list[tuple[str, str]] | None = None,
    num_patches_list: list[int] | None = None,
    *,
    img_start: str = IMG_START_TOKEN,
    img_end: str = IMG_END_TOKEN,
    img_context: str = IMG_CONTEXT_TOKEN,
) -> str:
    """The exact prompt `model.chat()` feeds the model: template, history, question, image blocks expanded.

    The i-th `<image>` becomes `img_start + img_context * (num_image_token * num_patches_list[i]) + img_end`.
    """
    template = chat_template(model)
    user, assistant = template.roles
    messages: list[tuple[str, str | None]] = []
    for old_question, old_answer in history or []:
        messages += [(user, old_question), (assistant, old_answer)]
    messages += [(user, question), (assistant, None)]
    prompt = template.render(messages, system_message=model.system_message)
    num_patches_list = num_patches_list or []
    if prompt.count(IMAGE_PLACEHOLDER) < len(num_patches_list):
        raise ValueError(
            f"{len(num_patches_list)} images given (num_patches_list={num_patches_list}) but the prompt has only "
            f"{prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders"
        )
    for num_patches in num_patches_list:
        block = img_start + img_context * (model.num_image_token * num_patches) + img_end
        prompt = prompt.replace(IMAGE_PLACEHOLDER, block, 1)
    return prompt


def stop_token_id(template: Template, tokenizer) -> int:
    """The id of the template's stop string: generation ends there, as in the official chat."""
    stop = template.stop_str
    token_id = tokenizer.convert_tokens_to_ids(stop)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no token for the template's stop string {stop!r}")
    return token_id


def generation_kwargs(template: Template, tokenizer, generation_config: dict | GenerationConfig | None) -> dict:
    """`generate()` keyword arguments: the caller's settings, the template's stop token, the tokenizer's pad id."""
    if isinstance(generation_config, GenerationConfig):
        kwargs = {"generation_config": generation_config}
    else:
        kwargs = dict(generation_config or {})
    kwargs["eos_token_id"] = stop_token_id(template, tokenizer)
    if tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    return kwargs


def answer_prompts(model, tokenizer, pixel_values, prompts: list[str], generation_config) -> list[str]:
    """Tokenize the prompts (left-padded as a batch), generate, decode up to the template's stop string."""
    template = chat_template(model)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = padding_side
    device = model.language_model.get_input_embeddings().weight.device
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=device, dtype=model.vision_model.dtype)
    output = model.generate(
        pixel_values=pixel_values,
        input_ids=inputs["input_ids"].to(device),
        attention_mask=inputs["attention_mask"].to(device),
        **generation_kwargs(template, tokenizer, generation_config),
    )
    decoded = tokenizer.batch_decode(output, skip_special_tokens=skips_special_tokens(model, template))
    return [template.reply_text(text) for text in decoded]


def skips_special_tokens(model, template: Template) -> bool:
    """Whether replies are decoded without special tokens: as the official chat() of the model's generation does
    (InternVL3.5's keeps them), and never for the harmony template, whose header is parsed out of them."""
    return template.skip_special_tokens and not chat_keeps_special_tokens(model.config.llm_config)


def chat(
    model,
    tokenizer,
    pixel_values: torch.Tensor | None,
    question: str,
    generation_config: dict | GenerationConfig | None = None,
    history: list[tuple[str, str]] | None = None,
    return_history: bool = False,
    num_patches_list: list[int] | None = None,
    *,
    img_start: str = IMG_START_TOKEN,
    img_end: str = IMG_END_TOKEN,
    img_context: str = IMG_CONTEXT_TOKEN,
    verbose: bool = False,
):
    """One chat turn with the official semantics; `model.chat()` is this function."""
    if history is None and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    if num_patches_list is None:
        num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
    if pixel_values is not None and len(pixel_values) != sum(num_patches_list):
        raise ValueError(
            f"pixel_values has {len(pixel_values)} tiles but num_patches_list sums to {sum(num_patches_list)}"
        )
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(img_context)
    prompt = build_prompt(
        model, question, history, num_patches_list, img_start=img_start, img_end=img_end, img_context=img_context
    )
    response = answer_prompts(model, tokenizer, pixel_values, [prompt], generation_config)[0]
    history = list(history or []) + [(question, response)]
    if verbose:
        print(prompt.replace(img_context * model.num_image_token, "") + response)
    return (response, history) if return_history else response


def batch_chat(
    model,
    tokenizer,
    pixel_values: torch.Tensor | None,
    questions: list[str],
    generation_config: dict | GenerationConfig | None = None,
    num_patches_list: list[int] | None = None,
    *,
    img_start: str = IMG_START_TOKEN,
    img_end: str = IMG_END_TOKEN,
    img_context: str = IMG_CONTEXT_TOKEN,
    verbose: bool = False,
) -> list[str]:
    """Several single-turn questions at once, one image each (`num_patches_list[i]` tiles); `model.batch_chat()`."""
    if pixel_values is not None:
        if num_patches_list is None or len(num_patches_list) != len(questions):
            raise ValueError("batch_chat needs one num_patches_list entry per question when pixel_values is given")
        if len(pixel_values) != sum(num_patches_list):
            raise ValueError(
                f"pixel_values has {len(pixel_values)} tiles but num_patches_list sums to {sum(num_patches_list)}"
            )
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(img_context)
    prompts = []
    for i, question in enumerate(questions):
        patches = []
        if pixel_values is not None:
            patches = [num_patches_list[i]]
            if IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
        prompts.append(
            build_prompt(model, question, None, patches, img_start=img_start, img_end=img_end, img_context=img_context)
        )
    responses = answer_prompts(model, tokenizer, pixel_values, prompts, generation_config)
    if verbose:
        for question, response in zip(questions, responses):
            print(f"User: {question}\nAssistant: {response}")
    return responses
