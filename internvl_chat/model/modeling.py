"""InternVLChatModel: InternViT -> pixel shuffle -> `mlp1` projector -> LLM, in the official checkpoint layout.

In-memory parameter names equal the names in official checkpoints (`vision_model.*`, `mlp1.{0,1,3}.*`,
`language_model.*` in the LLM's own naming), so `from_pretrained` / `save_pretrained` / Trainer resume / peft all
see the official layout with no renaming step that could silently drop a tensor. `chat()` / `batch_chat()` keep the
official signatures and hand the prompt building to `internvl_chat/inference.py`.

Differences from the official model, on purpose:
- If the number of `<IMG_CONTEXT>` positions differs from the number of image features, forward raises a
  `ValueError` naming both counts. The official model prints a warning and multiplies the loss by zero, which
  trains on nothing without telling anyone.
- The ViT stops at `select_layer` instead of computing layers whose output is discarded.
- A training-mode forward with labels computes the LM head and the loss at the supervised positions only, in chunks
  (model/loss.py), and returns no logits; `return_logits=True` gives the official full-logits path.
- `generate()` returns only the new tokens (the official output carries one leading placeholder token).
- `from_pretrained` loads safetensors only and refuses a folder holding pickle weight files (`pytorch_model.bin`,
  `*.pt`, ...) unless `allow_pickle=True`; it never imports code from the checkpoint folder and never downloads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from .. import inference
from ..constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from .configuration import InternVLChatConfig, llm_attn_implementation, llm_classes, llm_family
from .loss import causal_lm_loss, supervised_lm_loss
from .vision import InternVisionModel, init_linear_and_norm

_NO_SPLIT = ["InternVisionEncoderLayer", "LlamaDecoderLayer", "InternLM2DecoderLayer", "Phi3DecoderLayer",
             "Qwen2DecoderLayer", "Qwen3DecoderLayer", "Qwen3MoeDecoderLayer", "GptOssDecoderLayer"]


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Trade spatial resolution for channels: [n, w, h, c] -> [n, w*scale, h*scale, c/scale^2].

    With scale 0.5 and `v2`, output token (r, c) concatenates the patches (2r,2c), (2r,2c+1), (2r+1,2c),
    (2r+1,2c+1). `v1` (InternVL 1.x) emits the same groups in transposed (column-major) token order.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3)
    return x.contiguous()


def _config_dtype(path) -> torch.dtype | None:
    """The dtype a checkpoint's config.json names (``dtype`` or the transformers-4 ``torch_dtype``)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, TypeError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def _flash_attn_usable(dtype: torch.dtype | None) -> bool:
    return (
        importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.is_available()
        and dtype in (torch.float16, torch.bfloat16)
    )


def _set_checkpointing(module: PreTrainedModel, enable: bool) -> None:
    if enable:
        module.activation_checkpointing_enable({"use_reentrant": False})
    else:
        module.activation_checkpointing_disable()


def wants_router_aux_loss(llm_config) -> bool:
    """Whether training adds the MoE router's load-balancing loss: as the official training, when the LLM config
    asks for router logits (`output_router_logits`); it is weighted by the config's `router_aux_loss_coef`."""
    return bool(getattr(llm_config, "output_router_logits", False)) and hasattr(llm_config, "router_aux_loss_coef")


def router_aux_loss(causal_lm: nn.Module, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The family's own load-balancing loss (transformers' `load_balancing_loss_func` of the LLM's modeling module)
    over every layer's router logits; a 2-D padding mask keeps padding out, a packed batch has none."""
    module = sys.modules.get(type(causal_lm).__module__)
    func = getattr(module, "load_balancing_loss_func", None)
    if func is None:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func as func
    cfg = causal_lm.config
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    return func(tuple(router_logits), cfg.num_experts, cfg.num_experts_per_tok, mask)


# LLMs whose transformers model builds its attention masks without the position ids, so a packed row (no attention
# mask, position ids restarting per sample) would attend across samples: the chat model passes them the masks.
_MASKS_WITHOUT_POSITION_IDS = {"GptOssForCausalLM"}


def packed_attention_masks(llm_config, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Per-layer-type masks of a packed row, block-diagonal per sample (from the restarting position ids)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kwargs = dict(config=llm_config, inputs_embeds=inputs_embeds, attention_mask=None, past_key_values=None,
                  position_ids=position_ids)
    return {"full_attention": create_causal_mask(**kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**kwargs)}


# Official LoRA targets (internvl_chat_finetune.py); matched by module-name suffix.
LLM_LORA_TARGETS: dict[str, list[str]] = {
    "InternLM2ForCausalLM": ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                             "feed_forward.w3"],
    "Phi3ForCausalLM": ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"],
    "Qwen2ForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"],
    "LlamaForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"],
    "Qwen3ForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"],
    # attention only: transformers 5 keeps a layer's experts as two fused parameters (no nn.Linear for peft to
    # wrap) and the router as a bare weight; both stay frozen under LoRA
    "Qwen3MoeForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "InternLM3ForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"],
    # attention only, as the official generic list gives for GPT-OSS (its MLP names do not exist there): the
    # experts are fused 3-D parameters (gate_up_proj, down_proj and their biases) and the router a bare
    # weight + bias, so peft has no nn.Linear to wrap; experts, router and sinks stay frozen under LoRA
    "GptOssForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
}
VISION_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    config: InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "internvl"  # not a submodule name: checkpoints are always loaded whole
    supports_gradient_checkpointing = True
    _no_split_modules = _NO_SPLIT
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    accepts_loss_kwargs = False  # the loss is ours (loss_weight); the Trainer must scale for accumulation itself

    def __init__(self, config: InternVLChatConfig, vision_model=None, language_model=None) -> None:
        super().__init__(config)
        attn = config._attn_implementation or "sdpa"
        config.vision_config._attn_implementation = attn
        config.llm_config._attn_implementation = llm_attn_implementation(config.llm_config, attn)
        llm_family(config.llm_config)  # clear error for unsupported architectures

        self.template = config.template
        self.select_layer = config.select_layer
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = config.num_image_token
        self.img_context_token_id: int | None = None
        self.system_message = getattr(config, "system_message", None)

        self.vision_model = vision_model if vision_model is not None else InternVisionModel(config.vision_config)
        if language_model is None:
            _, llm_cls = llm_classes(llm_family(config.llm_config))
            language_model = llm_cls(config.llm_config)
        self.language_model = language_model

        vit_hidden = config.vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        shuffled = vit_hidden * int(1 / self.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(shuffled),
            nn.Linear(shuffled, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )
        # a checkpoint saved while LoRA-wrapped stores the adapters under peft's names: wrap before loading
        if config.use_backbone_lora:
            self.wrap_backbone_lora(config.use_backbone_lora, getattr(config, "backbone_lora_alpha", None))
        if config.use_llm_lora:
            self.wrap_llm_lora(
                config.use_llm_lora,
                getattr(config, "llm_lora_alpha", None),
                target_modules=getattr(config, "llm_lora_target_modules", None),
            )
        self.post_init()

    # --- LoRA (peft), the official way: wrap the sub-model, record the rank in the config ----------------------
    def wrap_backbone_lora(self, r: int, lora_alpha: int | None = None, lora_dropout: float = 0.05,
                           target_modules: list[str] | None = None) -> None:
        from peft import LoraConfig, get_peft_model

        alpha = lora_alpha or 2 * r
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout,
                          target_modules=list(target_modules or VISION_LORA_TARGETS))
        self.vision_model = get_peft_model(self.vision_model, lora)
        self.config.use_backbone_lora = r
        if alpha != 2 * r:
            self.config.backbone_lora_alpha = alpha

    def wrap_llm_lora(self, r: int, lora_alpha: int | None = None, lora_dropout: float = 0.05,
                      target_modules: list[str] | None = None) -> None:
        from peft import LoraConfig, get_peft_model

        alpha = lora_alpha or 2 * r
        targets = list(target_modules or LLM_LORA_TARGETS[llm_family(self.config.llm_config)])
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=targets,
                          task_type="CAUSAL_LM")
        self.language_model = get_peft_model(self.language_model, lora)
        self.language_model.enable_input_require_grads()
        self.config.use_llm_lora = r
        if alpha != 2 * r:
            self.config.llm_lora_alpha = alpha
        if target_modules:
            self.config.llm_lora_target_modules = targets

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the base weights and return to plain official key names."""
        from peft import PeftModel

        if isinstance(self.vision_model, PeftModel):
            self.vision_model = self.vision_model.merge_and_unload()
            self.config.use_backbone_lora = 0
        if isinstance(self.language_model, PeftModel):
            self.language_model = self.language_model.merge_and_unload()
            self.config.use_llm_lora = 0
        for key in ("backbone_lora_alpha", "llm_lora_alpha", "llm_lora_target_modules"):
            if hasattr(self.config, key):
                delattr(self.config, key)

    # --- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load an official-layout checkpoint directory (single-file or sharded safetensors).

        Accepts the official keyword `use_flash_attn` (default True: flash-attention 2 when it is installed, a GPU
        is present and the dtype is 16-bit; SDPA otherwise) and `torch_dtype` as an alias of `dtype`.
        `trust_remote_code` is accepted and ignored: nothing from the checkpoint is executed.
        Weights load from safetensors only: a folder with pickle weight files (`pytorch_model.bin`, `*.pt`, ...)
        is refused unless `allow_pickle=True`, and a truncated safetensors file is named in the error
        (model/weight_files.py). Nothing is downloaded (`local_files_only`).
        """
        use_flash = kwargs.pop("use_flash_attn", True)
        kwargs.pop("trust_remote_code", None)
        allow_pickle = kwargs.pop("allow_pickle", False)
        if os.path.isdir(pretrained_model_name_or_path):
            from .weight_files import check_weights_dir

            if not check_weights_dir(str(pretrained_model_name_or_path), allow_pickle):
                kwargs["use_safetensors"] = False  # an allowed pickle-only folder
        kwargs["weights_only"] = True  # even an allowed pickle goes through torch's restricted unpickler
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        dtype = kwargs.get("dtype")
        if dtype is None:  # as transformers 4 and the official code: float32 unless asked (transformers 5: "auto")
            dtype = kwargs["dtype"] = torch.float32
        elif isinstance(dtype, str) and dtype != "auto":
            dtype = kwargs["dtype"] = getattr(torch, dtype.replace("torch.", ""))
        elif dtype == "auto":
            dtype = _config_dtype(pretrained_model_name_or_path)
        # the official evaluation scripts pass these (False unless quantizing); transformers 5 wants a config object
        load_8bit, load_4bit = kwargs.pop("load_in_8bit", False), kwargs.pop("load_in_4bit", False)
        if (load_8bit or load_4bit) and kwargs.get("quantization_config") is None:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=bool(load_8bit),
                                                               load_in_4bit=bool(load_4bit))
        if kwargs.get("attn_implementation") is None:
            kwargs["attn_implementation"] = "flash_attention_2" if use_flash and _flash_attn_usable(dtype) else "sdpa"
        kwargs.setdefault("use_safetensors", True)
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, then give the weight files the permissions the user's umask asks for (safetensors
        writes them 0600, which hides checkpoints from colleagues on a shared cluster)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and os.path.isdir(save_directory):
            umask = os.umask(0)
            os.umask(umask)
            for name in os.listdir(save_directory):
                if name.endswith(".safetensors"):
                    os.chmod(os.path.join(save_directory, name), 0o666 & ~umask)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_linear_and_norm(module, getattr(self.config.llm_config, "initializer_range", 0.02))

    # --- embeddings passthrough (resize_token_embeddings, peft, generation utilities) ------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_vision_gradient_checkpointing(self, enable: bool) -> None:
        """Activation checkpointing of the ViT layers, independent of the LLM's."""
        _set_checkpointing(self.vision_model, enable)

    def set_llm_gradient_checkpointing(self, enable: bool) -> None:
        """Activation checkpointing of the LLM layers, independent of the ViT's."""
        _set_checkpointing(self.language_model, enable)

    # --- vision -------------------------------------------------------------------------------------------------
    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 tiles (channels-last [n, S, S, 3] or [n, 3, S, S]) -> normalised float tiles in the ViT's dtype.

        Data workers ship uint8 (4x smaller than float32) and the device normalises once, with the exact values of
        the official ToTensor + Normalize. Float inputs are taken as already normalised.
        """
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        from ..data.transforms import TileNormalizer

        normalize_type = getattr(self.config, "normalize_type", None) or "imagenet"
        normalizer = self.__dict__.get("_pixel_normalizer")  # a cache, deliberately not a registered submodule
        if normalizer is None or normalizer.normalize_type != normalize_type:
            normalizer = self.__dict__["_pixel_normalizer"] = TileNormalizer(normalize_type)
        normalizer.to(pixel_values.device)
        channels_last = pixel_values.shape[-1] == 3 and pixel_values.shape[1] != 3
        return normalizer(pixel_values, dtype=self.vision_model.dtype, channels_last=channels_last)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [n, 3, S, S] (float, normalised; or uint8, see normalize_pixels) -> [n, num_image_token, hidden]."""
        pixel_values = self.normalize_pixels(pixel_values)
        select = None if self.select_layer == -1 else self.select_layer
        hidden = self.vision_model(pixel_values=pixel_values, select_layer=select).last_hidden_state
        hidden = hidden[:, 1:, :]  # drop CLS
        side = int(hidden.shape[1] ** 0.5)
        if side * side != hidden.shape[1]:
            raise ValueError(f"ViT produced {hidden.shape[1]} patch tokens, which is not a square grid")
        hidden = hidden.reshape(hidden.shape[0], side, side, -1)
        hidden = pixel_shuffle(hidden, self.downsample_ratio, self.ps_version)
        hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
        return self.mlp1(hidden)

    def _merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, vit_embeds: torch.Tensor
    ) -> torch.Tensor:
        if self.img_context_token_id is None:
            raise ValueError(
                "img_context_token_id is not set: assign model.img_context_token_id = "
                "tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>') before a forward with images"
            )
        selected = input_ids == self.img_context_token_id
        n_positions = int(selected.sum())
        features = vit_embeds.reshape(-1, vit_embeds.shape[-1])
        if n_positions != features.shape[0]:
            raise ValueError(
                f"image tokens and image features disagree: the batch has {n_positions} <IMG_CONTEXT> positions "
                f"but the images give {features.shape[0]} features ({vit_embeds.shape[0]} tiles x "
                f"{self.num_image_token} tokens). Usually an image block was truncated by max_seq_length or "
                f"image_flags / num_patches do not match the prompt."
            )
        mask = selected.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))

    def _embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_flags: torch.Tensor | None
    ) -> torch.Tensor:
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return inputs_embeds
        vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            keep = image_flags.reshape(-1) == 1
            if not bool(keep.all()):
                # flag-0 tiles (text-only samples, padding) were computed so every rank runs the ViT; drop them
                # but keep them in the graph so data-parallel gradient hooks fire on every rank
                inputs_embeds = inputs_embeds + 0.0 * vit_embeds[~keep].sum().to(inputs_embeds.dtype)
                vit_embeds = vit_embeds[keep]
        return self._merge_image_features(input_ids, inputs_embeds, vit_embeds)

    # --- training forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        image_flags: torch.LongTensor | None = None,
        past_key_values=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        statistics: torch.Tensor | None = None,
        loss_weight: torch.Tensor | list | None = None,
        loss_reduction_all_gather: bool = False,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        return_logits: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """Official training batch in, `CausalLMOutputWithPast` out (a tuple when `return_dict` is False).

        `pixel_values` holds the tiles of the whole batch concatenated; `image_flags` (one per tile, 0 = dummy)
        says which tiles' features are used; `loss_weight` (same shape as `labels`, optional) weights each token
        for the sample / square loss reductions, its denominator averaged over ranks with
        `loss_reduction_all_gather`. A padded batch has an `attention_mask`; a packed one (data/packing.py) has
        none, `position_ids` restarting at every sample and, for flash-attention 2, the varlen boundaries
        `cu_seq_lens_q/k` and `max_length_q/k`, which go to the language model as they are. `statistics` is
        accepted only because the official packed collator passes it (for its own logs); it is not used.

        With `labels` in training mode the loss is computed from the hidden states at the supervised positions only
        (model/loss.py) and `logits` is None: the full `[tokens, vocabulary]` logits are never built.
        `return_logits=True` (and eval mode, unless `return_logits=False`) computes every position's logits and
        the loss from them, as the official model does.

        An MoE LLM whose config sets `output_router_logits` (Qwen3-MoE, GPT-OSS) adds `router_aux_loss_coef` times
        the router's load-balancing loss over all non-padding tokens to a loss with labels, in both paths, and
        returns a `MoeCausalLMOutputWithPast` carrying `aux_loss`, as the official model does.
        """
        del statistics  # official callers pass it; nothing here reads it
        if isinstance(loss_weight, list):
            loss_weight = torch.tensor(loss_weight, dtype=torch.float32)
        inputs_embeds = self._embed(input_ids, pixel_values, image_flags)
        if labels is not None and use_cache is None:
            # a training forward needs no KV cache, and a cache would also switch off transformers' per-sample
            # (packed) attention mask derived from restarting position_ids
            use_cache = False
        varlen = {"cu_seq_lens_q": cu_seq_lens_q, "cu_seq_lens_k": cu_seq_lens_k,
                  "max_length_q": max_length_q, "max_length_k": max_length_k}
        if return_logits is None:
            return_logits = labels is None or not self.training
        llm_inputs = dict(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **{k: v for k, v in varlen.items() if v is not None},
        )
        router_aux = labels is not None and wants_router_aux_loss(self.config.llm_config)
        if router_aux:
            llm_inputs["output_router_logits"] = True
        # peft's LoRA layers live inside the unwrapped model too
        causal_lm = self.language_model.get_base_model() if hasattr(self.language_model, "get_base_model") \
            else self.language_model
        packed_masks = attention_mask is None and position_ids is not None and past_key_values is None \
            and llm_family(self.config.llm_config) in _MASKS_WITHOUT_POSITION_IDS
        if packed_masks:
            llm_inputs["attention_mask"] = packed_attention_masks(causal_lm.config, inputs_embeds, position_ids)
        loss = logits = None
        if packed_masks and (return_logits or labels is None):  # the LM's own forward would misread the masks
            outputs = causal_lm.model(**llm_inputs)
            logits = causal_lm.get_output_embeddings()(outputs.last_hidden_state)
            if labels is not None:
                loss = causal_lm_loss(logits, labels, loss_weight, loss_reduction_all_gather)
        elif return_logits or labels is None:
            outputs = self.language_model(**llm_inputs)
            logits = outputs.logits
            if labels is not None:
                loss = causal_lm_loss(logits, labels, loss_weight, loss_reduction_all_gather)
        else:  # the LM head only where a label is
            outputs = causal_lm.model(**llm_inputs)
            loss = supervised_lm_loss(outputs.last_hidden_state, labels, causal_lm.get_output_embeddings(),
                                      loss_weight, loss_reduction_all_gather)
        if router_aux:
            aux_loss = router_aux_loss(causal_lm, outputs.router_logits, attention_mask)
            loss = loss + self.config.llm_config.router_aux_loss_coef * aux_loss.to(loss.device)
            output = MoeCausalLMOutputWithPast(
                loss=loss,
                aux_loss=aux_loss,
                logits=logits,
                past_key_values=outputs.past_key_values,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
                router_logits=outputs.router_logits,
            )
            return output.to_tuple() if return_dict is False else output
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output.to_tuple() if return_dict is False else output

    # --- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        output_hidden_states: bool | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """Generate from a prompt whose image blocks are filled with the images' features.

        Returns only the newly generated token ids.
        """
        if input_ids is None:
            raise ValueError("generate() needs input_ids (the tokenized prompt)")
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        if visual_features is not None or pixel_values is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, vit_embeds)
        if hasattr(self.config.llm_config, "output_router_logits"):
            # an MoE LLM would otherwise compute its aux loss at every step, against a mask longer than the step
            generate_kwargs.setdefault("output_router_logits", False)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            output_hidden_states=output_hidden_states,
            use_cache=True,
            **generate_kwargs,
        )

    # --- chat API: the official signatures; prompt building lives in internvl_chat/inference.py ------------------
    def chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict | GenerationConfig | None = None,
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: list[int] | None = None,
        IMG_START_TOKEN: str = IMG_START_TOKEN,
        IMG_END_TOKEN: str = IMG_END_TOKEN,
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,
        verbose: bool = False,
    ):
        """One chat turn, official semantics: `<image>\\n` is prepended to a first question that lacks it,
        `num_patches_list` splits `pixel_values` into images, history is a list of (question, answer)."""
        return inference.chat(
            self, tokenizer, pixel_values, question, generation_config, history, return_history, num_patches_list,
            img_start=IMG_START_TOKEN, img_end=IMG_END_TOKEN, img_context=IMG_CONTEXT_TOKEN, verbose=verbose,
        )

    def batch_chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        questions: list[str],
        generation_config: dict | GenerationConfig | None = None,
        num_patches_list: list[int] | None = None,
        history=None,
        return_history: bool = False,
        IMG_START_TOKEN: str = IMG_START_TOKEN,
        IMG_END_TOKEN: str = IMG_END_TOKEN,
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,
        verbose: bool = False,
        image_counts: list[int] | None = None,
    ) -> list[str]:
        """Several single-turn questions at once, one image each (`num_patches_list[i]` tiles), left-padded."""
        if history is not None or return_history:
            raise ValueError("batch_chat does not take a history; use chat() for multi-turn conversations")
        if image_counts is not None:
            warnings.warn("image_counts is deprecated; use num_patches_list", FutureWarning, stacklevel=2)
            num_patches_list = image_counts
        return inference.batch_chat(
            self, tokenizer, pixel_values, questions, generation_config, num_patches_list,
            img_start=IMG_START_TOKEN, img_end=IMG_END_TOKEN, img_context=IMG_CONTEXT_TOKEN, verbose=verbose,
        )
