"""The trainability plan: official flags resolved into one plan; exactly the named parameters train."""

import pytest

from internvl_chat.model import InternVLChatModel
from internvl_chat.tiny_model import make_tiny_model
from internvl_chat.train.arguments import ModelArguments
from internvl_chat.train.plan import apply_plan, format_plan, parameter_counts, resolve_plan


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return {llm: make_tiny_model(root / llm, llm=llm, seed=0) for llm in ("qwen2", "internlm2", "phi3")}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def plan_for(path, **flags):
    model = InternVLChatModel.from_pretrained(path)
    args = ModelArguments(model_name_or_path=str(path), **flags)
    plan = resolve_plan(args)
    apply_plan(model, plan, args)
    return model, plan


def test_official_full_script_plan(tiny_dirs):
    model, plan = plan_for(tiny_dirs["qwen2"], freeze_llm=False, freeze_mlp=False, freeze_backbone=True)
    assert (plan.vit, plan.mlp, plan.llm) == ("frozen", "full", "full")
    names = trainable(model)
    assert not any(n.startswith("vision_model.") for n in names)
    assert any(n.startswith("mlp1.") for n in names) and any(n.startswith("language_model.") for n in names)
    assert "vit: frozen | mlp: full | llm: full" in format_plan(model, plan)


@pytest.mark.parametrize("llm,target", [("qwen2", "self_attn.q_proj"), ("internlm2", "attention.wqkv"),
                                        ("phi3", "self_attn.qkv_proj")])
def test_official_lora_script_plan(tiny_dirs, llm, target):
    model, plan = plan_for(tiny_dirs[llm], freeze_llm=True, freeze_mlp=True, freeze_backbone=True, use_llm_lora=8)
    assert (plan.vit, plan.mlp, plan.llm) == ("frozen", "frozen", "lora")
    names = trainable(model)
    assert names and all("lora_" in n for n in names)
    assert any(target + ".lora_A" in n for n in names)
    assert model.config.use_llm_lora == 8
    lora_a = next(m for n, m in model.named_modules() if n.endswith(target))
    assert lora_a.scaling["default"] == 2.0  # alpha = 2 r, as the official default


def test_unfreeze_lm_head_really_trains_the_head(tiny_dirs):
    model, plan = plan_for(tiny_dirs["internlm2"], freeze_llm=True, freeze_backbone=True, unfreeze_lm_head=True)
    names = trainable(model)
    assert "language_model.output.weight" in names
    assert not any(n.startswith("language_model.model.") for n in names)


def test_unfreeze_last_vit_layers(tiny_dirs):
    model, plan = plan_for(tiny_dirs["qwen2"], freeze_backbone=True, unfreeze_vit_layers=-1)
    assert plan.vit == "partial"
    vit = {n for n in trainable(model) if n.startswith("vision_model.")}
    assert vit and all(n.startswith("vision_model.encoder.layers.1.") for n in vit)


def test_backbone_lora(tiny_dirs):
    model, plan = plan_for(tiny_dirs["qwen2"], use_backbone_lora=4, freeze_llm=True, freeze_mlp=True)
    vit = {n for n in trainable(model) if n.startswith("vision_model.")}
    assert vit and all("lora_" in n for n in vit)
    assert any("attn.qkv.lora_A" in n for n in vit) and any("mlp.fc2.lora_B" in n for n in vit)
    assert model.config.use_backbone_lora == 4


def test_all_frozen_counts(tiny_dirs):
    model, plan = plan_for(tiny_dirs["qwen2"], freeze_llm=True, freeze_mlp=True, freeze_backbone=True)
    counts = parameter_counts(model)
    assert all(c["trainable"] == 0 for c in counts.values())
    assert sum(c["frozen"] for c in counts.values()) == sum(p.numel() for p in model.parameters())


def test_merge_lora_tool(tiny_dirs, tmp_path):
    import subprocess
    import sys

    import torch
    from safetensors import safe_open

    model, _ = plan_for(tiny_dirs["internlm2"], freeze_llm=True, freeze_mlp=True, freeze_backbone=True,
                        use_llm_lora=4, use_backbone_lora=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model.save_pretrained(tmp_path / "lora")
    from internvl_chat.model import load_tokenizer

    load_tokenizer(tiny_dirs["internlm2"]).save_pretrained(tmp_path / "lora")
    out = tmp_path / "merged"
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "tools/merge_lora.py"), str(tmp_path / "lora"), str(out),
                    "--dtype", "float32"], check=True, capture_output=True)
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any("lora_" in k or "base_model" in k for k in keys)
    assert "language_model.model.layers.0.attention.wqkv.weight" in keys
    merged = InternVLChatModel.from_pretrained(out).eval()
    assert merged.config.use_llm_lora == 0 and merged.config.use_backbone_lora == 0
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pixels = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(merged.language_model(input_ids=ids).logits,
                                   model.language_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged.extract_feature(pixels), model.extract_feature(pixels), atol=1e-4, rtol=1e-4)
    # refuses to overwrite
    again = subprocess.run([sys.executable, str(repo / "tools/merge_lora.py"), str(tmp_path / "lora"), str(out)],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "not empty" in again.stderr
