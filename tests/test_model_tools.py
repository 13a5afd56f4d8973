"""The official tools on tiny models (extract_mlp, resize_pos_embed, replace_llm) and building a model from parts
(--vision_path / --llm_path / --mlp_path of finetune.py), down to a one-step run from parts that loads and chats."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from internvl_chat.constants import INTERNVL_SPECIAL_TOKENS
from internvl_chat.model import InternVLChatModel, load_tokenizer
from internvl_chat.model.configuration import _llm_config_from_dict, llm_classes
from internvl_chat.model.parts import (
    PROJECTOR_KEYS,
    PartsError,
    build_from_parts,
    check_parts,
    load_projector,
    read_projector,
)
from internvl_chat.tiny_model import make_tiny_model, tiny_llm_config
from internvl_chat.tiny_tokenizer import build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("tools/extract_mlp.py", "tools/resize_pos_embed.py", "tools/replace_llm.py")


@functools.cache
def load_tool(relpath: str):
    """Import a script of tools/ as a module (they are run as files, not installed)."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def strip_internvl_tokens(folder: Path) -> None:
    """Make a tiny InternLM2 tokenizer look like a released InternLM2 one: no InternVL tokens."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if v["content"] not in INTERNVL_SPECIAL_TOKENS}
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if key in config:
            config[key] = [t for t in config[key] if t not in INTERNVL_SPECIAL_TOKENS]
    config_file.write_text(json.dumps(config))
    added = folder / "added_tokens.json"
    if added.is_file():
        added.write_text(json.dumps({k: v for k, v in json.loads(added.read_text()).items()
                                     if k not in INTERNVL_SPECIAL_TOKENS}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny chat checkpoints and the parts cut out of them: an InternViT folder, LLM folders (with tokenizers)."""
    root = tmp_path_factory.mktemp("parts")
    make_tiny_model(root / "qwen2", llm="qwen2", template="internvl2_5", seed=0)
    make_tiny_model(root / "internlm2", llm="internlm2", template="internlm2-chat", seed=1)
    make_tiny_model(root / "llama", llm="llama", template="Hermes-2", seed=2)
    qwen2 = InternVLChatModel.from_pretrained(root / "qwen2")
    qwen2.vision_model.save_pretrained(root / "vit")
    qwen2.language_model.save_pretrained(root / "llm_qwen2")
    load_tokenizer(root / "qwen2").save_pretrained(root / "llm_qwen2")
    llama = InternVLChatModel.from_pretrained(root / "llama")
    llama.language_model.save_pretrained(root / "llm_llama")
    load_tokenizer(root / "llama").save_pretrained(root / "llm_llama")
    # a released InternLM2 LLM: a tokenizer without the InternVL tokens and a vocabulary without their rows
    internlm2 = InternVLChatModel.from_pretrained(root / "internlm2")
    build_tiny_tokenizer("internlm2", root / "llm_internlm2", seed=1)
    strip_internvl_tokens(root / "llm_internlm2")
    llm = internlm2.language_model
    llm.resize_token_embeddings(llm.config.vocab_size - len(INTERNVL_SPECIAL_TOKENS))
    llm.save_pretrained(root / "llm_internlm2")
    # an LLM wider than the projectors of the chat models (hidden 96, not 64)
    tokenizer = build_tiny_tokenizer("qwen2", root / "llm_wide")
    raw = tiny_llm_config("qwen2", tokenizer, hidden_size=96)
    torch.manual_seed(0)
    llm_classes("Qwen2ForCausalLM")[1](_llm_config_from_dict(raw)).save_pretrained(root / "llm_wide")
    return root


def test_every_tool_has_help(capsys):
    for relpath in TOOLS:
        with pytest.raises(SystemExit) as exit_info:
            load_tool(relpath).main(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "usage:" in out and "model_path" in out, relpath


def test_extract_mlp_writes_what_mlp_path_loads(world, tmp_path):
    assert load_tool("tools/extract_mlp.py").main([str(world / "qwen2"), str(tmp_path)]) == 0
    path = tmp_path / "mlp_projector.safetensors"
    state = read_projector(str(path))
    source = weights(world / "qwen2")
    assert set(state) == set(PROJECTOR_KEYS)
    for key in PROJECTOR_KEYS:
        assert torch.equal(state[key], source[f"mlp1.{key}"]), key
    with safe_open(path, "pt") as h:
        assert h.metadata()["llm_hidden_size"] == "64"

    model = InternVLChatModel.from_pretrained(world / "llama")  # same widths: the projector fits
    load_projector(model, str(path))
    for key, value in model.mlp1.state_dict().items():
        assert torch.equal(value, state[key])


def test_a_projector_of_other_widths_or_a_pickle_is_refused(world, tmp_path):
    wide = build_from_parts(str(world / "vit"), str(world / "llm_wide"), template="internvl2_5")
    assert load_tool("tools/extract_mlp.py").main([str(world / "qwen2"), str(tmp_path / "p.safetensors")]) == 0
    with pytest.raises(PartsError, match=r"maps 192 -> 64 features, the model needs 192 -> 96"):
        load_projector(wide, str(tmp_path / "p.safetensors"))
    with pytest.raises(PartsError, match=r"maps 192 -> 64 features, the model needs 192 -> 96"):
        check_parts(str(world / "vit"), str(world / "llm_wide"), str(tmp_path / "p.safetensors"))

    # the official tool's output: a pickle, read only when allowed (and then by torch's restricted unpickler)
    official = tmp_path / "mlp_projector.pth"
    torch.save(dict(InternVLChatModel.from_pretrained(world / "qwen2").mlp1.state_dict()), official)
    with pytest.raises(ValueError, match="--allow_pickle"):
        read_projector(str(official))
    state = read_projector(str(official), allow_pickle=True)
    assert set(state) == set(PROJECTOR_KEYS)


def test_resize_pos_embed_uses_the_official_interpolation(world, tmp_path, capsys):
    tool = load_tool("tools/resize_pos_embed.py")
    out = tmp_path / "r224"
    assert tool.main([str(world / "qwen2"), str(out), "224"]) == 0
    assert "max |diff| 0.00e+00" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["force_image_size"] == 224 and config["vision_config"]["image_size"] == 224
    resized = InternVLChatModel.from_pretrained(out)
    assert resized.num_image_token == 64  # (224 / 14)^2 / 4

    # bicubic over the 32x32 grid in float32, CLS kept: what the official resize_pos_embeddings computes
    table = weights(world / "qwen2")["vision_model.embeddings.position_embedding"]
    grid = table[:, 1:].reshape(1, 32, 32, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    expected = torch.cat([table[:, :1], grid.reshape(1, -1, 256).permute(0, 2, 1)], dim=1)
    torch.testing.assert_close(weights(out)["vision_model.embeddings.position_embedding"], expected)
    assert (out / "generation_config.json").is_file()  # served with the training template's eos
    assert load_tokenizer(out).convert_tokens_to_ids("<IMG_CONTEXT>") == load_tokenizer(
        world / "qwen2").convert_tokens_to_ids("<IMG_CONTEXT>")

    with pytest.raises(SystemExit) as exit_info:  # 25x25 patches: the pixel shuffle cannot halve them
        tool.main([str(world / "qwen2"), str(tmp_path / "r350"), "350"])
    assert exit_info.value.code == 2
    assert "multiple of 28" in capsys.readouterr().err


def test_replace_llm_keeps_vit_and_projector_of_the_same_width(world, tmp_path):
    out = tmp_path / "swapped"
    tool = load_tool("tools/replace_llm.py")
    assert tool.main([str(world / "qwen2"), str(world / "llm_llama"), str(out), "--template", "Hermes-2"]) == 0
    written, source, llm = weights(out), weights(world / "qwen2"), weights(world / "llm_llama")
    for key, value in source.items():
        if key.startswith(("vision_model.", "mlp1.")):
            assert torch.equal(written[key], value), key
    for key, value in llm.items():
        assert torch.equal(written[f"language_model.{key}"], value), key
    assert not any(k.startswith("language_model.") and k.removeprefix("language_model.") not in llm for k in written)
    config = json.loads((out / "config.json").read_text())
    assert config["llm_config"]["architectures"] == ["LlamaForCausalLM"] and config["template"] == "Hermes-2"
    assert len(load_tokenizer(out)) == len(load_tokenizer(world / "llm_llama"))


def test_replace_llm_with_another_width_reinitialises_the_projector(world, tmp_path, capsys):
    out = tmp_path / "wide"
    assert load_tool("tools/replace_llm.py").main([str(world / "qwen2"), str(world / "llm_wide"), str(out)]) == 0
    said = capsys.readouterr().out
    assert "projector (mlp1) was re-initialised" in said and "template stays internvl2_5" in said
    written = weights(out)
    assert written["mlp1.1.weight"].shape == (96, 192) and written["mlp1.3.weight"].shape == (96, 96)
    assert torch.equal(written["mlp1.0.weight"], torch.ones(192))  # a fresh LayerNorm


def test_replace_llm_adds_the_internvl_tokens_the_new_tokenizer_lacks(world, tmp_path):
    out = tmp_path / "i2"
    tool = load_tool("tools/replace_llm.py")
    args = [str(world / "qwen2"), str(world / "llm_internlm2"), str(out), "--template", "internlm2-chat"]
    assert tool.main(args) == 0
    tokenizer = load_tokenizer(out)
    assert tokenizer.num_added_internvl_tokens == 0 and tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == 1402
    assert json.loads((out / "config.json").read_text())["llm_config"]["vocab_size"] == len(tokenizer) == 1409
    assert weights(out)["language_model.output.weight"].shape[0] == 1409


def test_build_from_parts(world):
    model = build_from_parts(str(world / "vit"), str(world / "llm_qwen2"), template="internvl2_5",
                             downsample_ratio=0.5, ps_version="v2")
    state, vit, llm = model.state_dict(), weights(world / "vit"), weights(world / "llm_qwen2")
    for key, value in vit.items():
        assert torch.equal(state[f"vision_model.{key}"], value), key
    for key, value in llm.items():
        assert torch.equal(state[f"language_model.{key}"], value), key
    # the official projector starts with PyTorch's defaults: LayerNorm 1/0, Linear uniform within 1/sqrt(fan_in)
    mlp = model.mlp1
    assert torch.equal(mlp[0].weight, torch.ones(192)) and torch.equal(mlp[0].bias, torch.zeros(192))
    for linear in (mlp[1], mlp[3]):
        bound = linear.in_features ** -0.5
        assert linear.weight.abs().max() <= bound and linear.bias.abs().max() <= bound
        assert linear.weight.std() > bound / 3  # not left near zero
    cfg = model.config
    assert (cfg.template, cfg.force_image_size, cfg.num_image_token) == ("internvl2_5", 448, 256)
    assert model.language_model.config is cfg.llm_config and model.vision_model.config is cfg.vision_config

    # with a seed, the projector does not depend on what loading the parts drew from the global generator
    seeded = [build_from_parts(str(world / "vit"), str(world / "llm_qwen2"), template="internvl2_5", seed=seed)
              for seed in (3, 3, 4)]
    assert torch.equal(seeded[0].mlp1[1].weight, seeded[1].mlp1[1].weight)
    assert not torch.equal(seeded[0].mlp1[1].weight, seeded[2].mlp1[1].weight)


def test_wrong_parts_are_named_early(world, tmp_path, capsys):
    from internvl_chat.finetune import cli

    with pytest.raises(PartsError, match="--vision_path without --llm_path"):
        check_parts(str(world / "vit"), None)
    with pytest.raises(PartsError, match="is an InternVL chat checkpoint, not an InternViT"):
        check_parts(str(world / "qwen2"), str(world / "llm_qwen2"))
    with pytest.raises(PartsError, match="not an InternViT checkpoint"):
        check_parts(str(world / "llm_qwen2"), str(world / "llm_qwen2"))
    with pytest.raises(PartsError, match="--llm_path .*: no such folder"):
        check_parts(str(world / "vit"), str(tmp_path / "missing"))
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    code = cli(["--llm_path", str(world / "llm_qwen2"), "--meta_path", str(meta), "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert "--llm_path without --vision_path" in capsys.readouterr().err
    # a projector of another LLM width, with a chat checkpoint too: named before anything loads
    from internvl_chat.model.parts import save_projector

    save_projector(build_from_parts(str(world / "vit"), str(world / "llm_wide")), str(tmp_path / "wide.safetensors"))
    code = cli(["--model_name_or_path", str(world / "qwen2"), "--mlp_path", str(tmp_path / "wide.safetensors"),
                "--meta_path", str(meta), "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert "maps 192 -> 96 features, the model needs 192 -> 64" in capsys.readouterr().err


def finetune_args(out, meta, *extra):
    return ["--meta_path", str(meta), "--output_dir", str(out), "--conv_style", "internlm2-chat",
            "--force_image_size", "448", "--down_sample_ratio", "0.5", "--dynamic_image_size", "True",
            "--use_thumbnail", "True", "--max_dynamic_patch", "2", "--max_seq_length", "4096",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "7",
            "--bf16", "False", "--grad_checkpoint", "False", "--disable_tqdm", "True", *extra]


def test_one_step_from_parts_writes_a_checkpoint_that_chats(world, tmp_path, capsys):
    """The official pretraining start: InternViT + a released-style InternLM2 (no InternVL tokens) + a projector
    file, through `python -m internvl_chat.finetune`; the output is a complete chat checkpoint."""
    from internvl_chat.demo_data import make_demo_dataset
    from internvl_chat.finetune import cli
    from internvl_chat.inference import load_image_tiles

    meta = make_demo_dataset(tmp_path / "data", num_images=4, seed=0)
    assert load_tool("tools/extract_mlp.py").main([str(world / "internlm2"), str(tmp_path / "mlp")]) == 0
    mlp = tmp_path / "mlp" / "mlp_projector.safetensors"
    out = tmp_path / "run"
    parts = ["--vision_path", str(world / "vit"), "--llm_path", str(world / "llm_internlm2"), "--mlp_path", str(mlp)]
    args = finetune_args(out, meta, *parts, "--freeze_backbone", "True", "--freeze_mlp", "True")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "internvl_chat.finetune", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    written, vit = weights(out), weights(world / "vit")
    for key, value in vit.items():  # frozen ViT, as loaded from its folder
        assert torch.equal(written[f"vision_model.{key}"], value), key
    projector = read_projector(str(mlp))
    for key, value in projector.items():  # frozen projector, as loaded from --mlp_path
        assert torch.equal(written[f"mlp1.{key}"], value), key
    config = json.loads((out / "config.json").read_text())
    assert config["template"] == "internlm2-chat" and config["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    tokenizer = load_tokenizer(out)
    assert tokenizer.num_added_internvl_tokens == 0  # the InternVL tokens were added and saved by the run
    assert config["llm_config"]["vocab_size"] == len(tokenizer) == 1409  # and the vocabulary grew for them

    model = InternVLChatModel.from_pretrained(out).eval()
    pixel_values = load_image_tiles(sorted((tmp_path / "data" / "images").iterdir())[0], max_num=2)
    reply = model.chat(tokenizer, pixel_values, "What is in the image?", dict(max_new_tokens=4, do_sample=False))
    assert isinstance(reply, str)

    # the run folder knows the parts: the same command is complete; another LLM is refused, by name
    assert cli(args) == 0
    other = finetune_args(out, meta, "--vision_path", str(world / "vit"), "--llm_path", str(world / "llm_qwen2"),
                          "--mlp_path", str(mlp), "--freeze_backbone", "True", "--freeze_mlp", "True")
    capsys.readouterr()
    assert cli(other) == 2
    assert "model: llm: " in capsys.readouterr().err
