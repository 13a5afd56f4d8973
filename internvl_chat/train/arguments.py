"""Command-line arguments of `internvl_chat/finetune.py`, under the official names.

Every flag the official `internvl_chat_finetune.py` and its shell scripts pass is accepted unchanged, including
TrainingArguments that transformers 5 removed (`overwrite_output_dir`, `evaluation_strategy`, `warmup_ratio`,
`group_by_length`, `logging_dir`, `no_cuda`, `save_safetensors`): they are mapped onto their replacements here, in
one place. Flags of our own are marked "(ours)".
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
import transformers


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "InternVL chat checkpoint to fine-tune"})
    vision_path: str | None = field(default=None, metadata={
        "help": "InternViT folder; with --llm_path, a new model is built from parts (fresh projector) when "
                "--model_name_or_path is not given"})
    llm_path: str | None = field(default=None, metadata={
        "help": "LLM folder (weights and tokenizer); with --vision_path, a new model is built from parts"})
    mlp_path: str | None = field(default=None,
                                 metadata={"help": "mlp1 weights (safetensors) to load into the projector"})
    freeze_llm: bool = field(default=False)
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the ViT"})
    freeze_mlp: bool = field(default=False)
    unfreeze_vit_layers: int = field(default=0, metadata={"help": "train ViT layers [N:] (negative: the last |N|)"})
    vision_select_layer: int = field(default=-1)
    use_backbone_lora: int = field(default=0, metadata={"help": "LoRA rank for the ViT (0 = off)"})
    use_llm_lora: int = field(default=0, metadata={"help": "LoRA rank for the LLM (0 = off)"})
    unfreeze_lm_head: bool = field(default=False, metadata={"help": "train the LM head even when the LLM is frozen"})
    grad_checkpoint: bool = field(default=True, metadata={"help": "activation checkpointing of the LLM"})
    vit_grad_checkpoint: bool | None = field(
        default=None, metadata={"help": "(ours) activation checkpointing of the ViT; default: on when the ViT trains"}
    )
    drop_path_rate: float = field(default=0.0)
    ps_version: str = field(default="v2")
    use_fast_tokenizer: bool = field(default=False)
    use_liger: bool = field(default=False, metadata={"help": "accepted for compatibility; has no effect"})
    lora_alpha: int | None = field(default=None, metadata={"help": "(ours) LoRA alpha; default 2 x rank"})
    lora_dropout: float = field(default=0.05, metadata={"help": "(ours)"})
    llm_lora_target_modules: str | None = field(
        default=None, metadata={"help": "(ours) comma-separated module names; default: the official ones per family"}
    )
    backbone_lora_target_modules: str | None = field(default=None, metadata={"help": "(ours) default: attn.qkv,..."})
    use_qlora: bool = field(default=False, metadata={"help": "(ours) 4-bit NF4 LLM base weights (bitsandbytes)"})
    router_aux_loss_coef: float | None = field(default=None, metadata={
        "help": "(ours) MoE LLMs (Qwen3-MoE, GPT-OSS): weight of the router's load-balancing loss added to the "
                "training loss; default: the checkpoint's llm_config value. Saved in the trained config.json"})
    output_router_logits: bool | None = field(default=None, metadata={
        "help": "(ours) MoE LLMs: add the router's load-balancing loss at all (False: the LM loss only); default: "
                "the checkpoint's llm_config value. Saved in the trained config.json"})
    vision_lr: float | None = field(default=None, metadata={"help": "(ours) learning rate of the ViT"})
    mlp_lr: float | None = field(default=None, metadata={"help": "(ours) learning rate of the projector"})
    llm_lr: float | None = field(default=None, metadata={"help": "(ours) learning rate of the LLM"})
    trust_remote_code: bool = field(default=False, metadata={"help": "(ours) allow tokenizer code from the checkpoint"})
    allow_pickle: bool = field(
        default=False,
        metadata={"help": "(ours) accept pickle weight files (pytorch_model.bin, *.pt); by default only safetensors "
                          "are loaded and a folder holding pickle weights is refused"},
    )


@dataclass
class DataTrainingArguments:
    max_seq_length: int = field(default=8192, metadata={
        "help": "token limit per sample: longer samples are cut, or skipped (too_long) when the cut would split an "
                "image or leave no answer token"})
    force_image_size: int = field(default=448, metadata={
        "help": "tile size in pixels; the ViT's position embeddings are resized when it differs from its own"})
    down_sample_ratio: float = field(default=0.5, metadata={
        "help": "pixel-shuffle ratio of the ViT features (tokens per tile: (size // 14)^2 * ratio^2); must be the "
                "checkpoint's"})
    pad2square: bool = field(default=False, metadata={
        "help": "pad non-tiled images to a square in the mean colour before resizing (no effect on dynamic tiles)"})
    conv_style: str = field(default="internlm2-chat", metadata={
        "help": "conversation template: internvl2_5 | internlm2-chat | Hermes-2 | phi3-chat | internvl_zh"})
    meta_path: str | None = field(default=None, metadata={
        "help": "meta JSON naming the training datasets (annotation file, image root, repeat_time, ...)"})
    use_data_resampling: bool = field(default=False, metadata={"help": "accepted for compatibility; has no effect"})
    dynamic_image_size: bool = field(default=False, metadata={
        "help": "cut each image into a grid of tiles matching its aspect ratio (else one resized tile)"})
    use_thumbnail: bool = field(default=False, metadata={
        "help": "add a whole-image thumbnail tile after the grid when it has more than one tile"})
    min_dynamic_patch: int = field(default=1, metadata={"help": "fewest tiles per image with dynamic_image_size"})
    max_dynamic_patch: int = field(default=12, metadata={
        "help": "most tiles per image (a meta entry's own value wins); a sample's images share it"})
    min_num_frame: int = field(default=8, metadata={"help": "fewest frames drawn from a video"})
    max_num_frame: int = field(default=32, metadata={"help": "most frames drawn from a video"})
    normalize_type: str = field(default="imagenet", metadata={
        "help": "pixel mean and std: imagenet | clip | siglip (also the pad2square fill colour)"})
    use_packed_ds: bool = field(default=False, metadata={
        "help": "pack several samples into each row (planned from the sample lengths) instead of padding"})
    num_images_expected: int = field(default=40, metadata={"help": "with use_packed_ds: most tiles per packed row"})
    max_packed_tokens: int = field(default=8192, metadata={"help": "with use_packed_ds: most tokens per packed row"})
    max_buffer_size: int = field(default=20, metadata={"help": "accepted for compatibility; has no effect"})
    log_freq: int = field(default=1000, metadata={"help": "accepted for compatibility; has no effect"})
    strict_mode: bool = field(default=True, metadata={"help": "accepted for compatibility; has no effect"})
    replacement: bool = field(default=False, metadata={"help": "accepted for compatibility; has no effect"})
    allow_overflow: bool = field(default=False, metadata={"help": "accepted for compatibility; has no effect"})
    loss_reduction: str = field(default="auto", metadata={
        "help": "loss weight per supervised token: token (all equal) | sample (1/n per sample) | square (1/sqrt n) | "
                "auto (square for --conv_style internvl3_5_gpt_oss, as officially; token otherwise)"})
    loss_reduction_all_gather: bool = field(default=False, metadata={
        "help": "average the loss denominator over ranks, so every rank's gradient has the same scale"})
    bad_data: str = field(default="skip", metadata={"help": "(ours) skip (count and report) | fail"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "(ours) fail the run when a larger fraction of the distinct records seen is bad: checked from the "
                "first batch (with a small-sample allowance, data/errors.py) and exactly at the end (exit code 1)"})
    video_backend: str = field(default="pyav", metadata={"help": "(ours) pyav | decord"})
    max_image_pixels: int = field(
        default=178_956_970,
        metadata={"help": "(ours) images and video frames with more pixels are bad samples (image_too_large), read "
                          "from the header before decoding; default PIL's own bomb limit, 0 = no limit"},
    )
    allow_truncated_images: bool = field(
        default=False,
        metadata={"help": "(ours) load truncated image files with the missing part grey (the official behaviour) "
                          "instead of skipping them as bad samples (truncated_image)"},
    )
    max_video_frames: int = field(
        default=1_000_000,
        metadata={"help": "(ours) videos declaring more frames are bad samples (video_too_long); 0 = no limit"},
    )
    max_video_seconds: float = field(
        default=36_000.0,
        metadata={"help": "(ours) videos lasting longer (seconds) are bad samples (video_too_long); 0 = no limit"},
    )
    confine_paths: bool = field(
        default=False,
        metadata={"help": "(ours) image/video paths resolving outside the dataset root are bad samples "
                          "(path_outside_root) instead of being read"},
    )
    fast_image_decode: bool = field(
        default=False,
        metadata={"help": "(ours) faster image tiles: JPEGs decoded at a reduced DCT scale (PIL draft) and large "
                          "downscales with reducing_gap; same grid, tile count and image tokens, pixels close to "
                          "the exact ones (~44 dB PSNR on photos). Off: tiles identical to the official code"},
    )
    eval_meta_path: str | None = field(
        default=None,
        metadata={"help": "(ours) meta JSON of held-out sets, same format as --meta_path; an entry may name its "
                          "`metric` (vqa_acc, iou_acc, ...). Evaluated with --eval_strategy steps --eval_steps N"},
    )
    eval_max_samples: int = field(
        default=64,
        metadata={"help": "(ours) generation metrics on the first N samples of each eval set (0 = eval loss only)"},
    )
    eval_max_new_tokens: int = field(default=64, metadata={"help": "(ours) answer length cap of the generation eval"})

    def __post_init__(self) -> None:
        from ..data.collator import LOSS_REDUCTIONS, default_loss_reduction

        if self.loss_reduction == "auto":
            self.loss_reduction = default_loss_reduction(self.conv_style)
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"--loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)} or auto, "
                             f"got {self.loss_reduction!r}")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments plus the official flags transformers 5 removed."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "accepted for compatibility; never deletes anything and does not disable auto-resume"},
    )
    evaluation_strategy: str | None = field(default=None, metadata={"help": "old name of eval_strategy"})
    warmup_ratio: float | None = field(default=None, metadata={"help": "warmup as a fraction of the total steps"})
    group_by_length: bool = field(default=False, metadata={"help": "length-grouped sampling"})
    logging_dir: str | None = field(default=None, metadata={"help": "tensorboard directory"})
    no_cuda: bool = field(default=False, metadata={"help": "old name of use_cpu"})
    save_safetensors: bool = field(default=True, metadata={"help": "always true: only safetensors are written"})
    auto_resume: bool = field(default=True, metadata={"help": "(ours) resume from the newest complete checkpoint"})
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "tensorboard by default (event files under output_dir/runs)"}
    )

    def __post_init__(self) -> None:
        # transformers turns do_eval on whenever eval_strategy is set; the final evaluation runs only when asked
        self.do_final_eval = bool(self.do_eval)
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise ValueError("give either --warmup_ratio or --warmup_steps, not both")
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = float(self.warmup_ratio)  # transformers 5: a float < 1 is a ratio
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.no_cuda or not torch.cuda.is_available():
            # without use_cpu, transformers on a CPU-only machine silently trains every rank alone (no DDP)
            self.use_cpu = True
        if self.use_cpu and self.ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.ddp_backend = "gloo"
        if not self.save_safetensors:
            warnings.warn("--save_safetensors False is ignored: checkpoints are always safetensors", stacklevel=2)
        # our collators consume every item key (reports of skipped samples, supervised counts); the Trainer's
        # column filter would silently drop them
        self.remove_unused_columns = False
        if self.logging_dir:
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", self.logging_dir)
        super().__post_init__()
