"""What trains: the official freeze / LoRA flags resolved into one declarative plan per component.

    vit: frozen | full | lora | last-N-layers      mlp: frozen | full      llm: frozen | full | lora (+ lm_head)

The flags are applied in the official order (freeze_backbone, freeze_llm, unfreeze_lm_head, ViT LoRA, LLM LoRA,
freeze_mlp, unfreeze_vit_layers), but the outcome is stated up front and logged with parameter counts, and
`unfreeze_lm_head` really trains the head (officially it sets a plain attribute and does nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TrainPlan:
    vit: str  # "frozen" | "full" | "lora" | "partial"
    mlp: str  # "frozen" | "full"
    llm: str  # "frozen" | "full" | "lora"
    lm_head: bool  # head trainable on top of a frozen / LoRA LLM
    vit_layers_from: int | None = None  # first trainable ViT layer when partial (python index, may be negative)
    vit_lora_rank: int = 0
    llm_lora_rank: int = 0

    def describe(self) -> str:
        vit = f"lora r={self.vit_lora_rank}" if self.vit == "lora" else self.vit
        if self.vit == "partial":
            vit = f"layers[{self.vit_layers_from}:] trainable"
        llm = f"lora r={self.llm_lora_rank}" if self.llm == "lora" else self.llm
        if self.lm_head and self.llm != "full":
            llm += " + lm_head"
        return f"vit: {vit} | mlp: {self.mlp} | llm: {llm}"


def resolve_plan(model_args) -> TrainPlan:
    vit = "frozen" if model_args.freeze_backbone else "full"
    if model_args.use_backbone_lora:
        vit = "lora"
    layers_from = None
    if model_args.unfreeze_vit_layers:
        if vit == "full":
            pass  # already fully trainable
        else:
            vit = "partial" if vit == "frozen" else vit
            layers_from = model_args.unfreeze_vit_layers
    llm = "frozen" if model_args.freeze_llm else "full"
    if model_args.use_llm_lora:
        llm = "lora"
    mlp = "frozen" if model_args.freeze_mlp else "full"
    return TrainPlan(
        vit=vit, mlp=mlp, llm=llm, lm_head=bool(model_args.unfreeze_lm_head), vit_layers_from=layers_from,
        vit_lora_rank=model_args.use_backbone_lora, llm_lora_rank=model_args.use_llm_lora,
    )


def _set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _split_targets(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def apply_plan(model, plan: TrainPlan, model_args) -> None:
    """Set requires_grad (and wrap LoRA adapters) so that exactly the plan's parameters train."""
    _set_trainable(model.vision_model, plan.vit == "full")
    _set_trainable(model.language_model, plan.llm == "full")
    if plan.llm == "frozen":
        model.language_model.eval()  # as the official code: no dropout in a frozen LLM
    if plan.vit == "lora":
        model.wrap_backbone_lora(plan.vit_lora_rank, model_args.lora_alpha, model_args.lora_dropout,
                                 _split_targets(model_args.backbone_lora_target_modules))
    if plan.llm == "lora":
        model.wrap_llm_lora(plan.llm_lora_rank, model_args.lora_alpha, model_args.lora_dropout,
                            _split_targets(model_args.llm_lora_target_modules))
    if plan.lm_head and plan.llm != "full":
        _set_trainable(model.get_output_embeddings(), True)
    _set_trainable(model.mlp1, plan.mlp == "full")
    if plan.vit_layers_from is not None:
        layers = vision_layers(model)
        for layer in layers[plan.vit_layers_from:]:
            _set_trainable(layer, True)


def vision_layers(model) -> nn.ModuleList:
    vision = model.vision_model
    base = getattr(vision, "get_base_model", None)
    return (base() if base else vision).encoder.layers


def component_of(name: str) -> str:
    if name.startswith("vision_model."):
        return "vit"
    if name.startswith("mlp1."):
        return "mlp"
    return "llm"


def parameter_counts(model) -> dict[str, dict[str, int]]:
    counts = {c: {"trainable": 0, "frozen": 0} for c in ("vit", "mlp", "llm")}
    for name, p in model.named_parameters():
        counts[component_of(name)]["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def format_plan(model, plan: TrainPlan) -> str:
    counts = parameter_counts(model)
    lines = [f"trainability plan: {plan.describe()}"]
    for comp, c in counts.items():
        lines.append(f"  {comp:<4} trainable {c['trainable']:>14,}  frozen {c['frozen']:>14,}")
    total_t = sum(c["trainable"] for c in counts.values())
    total_f = sum(c["frozen"] for c in counts.values())
    lines.append(f"  all  trainable {total_t:>14,}  frozen {total_f:>14,}")
    return "\n".join(lines)
