"""InternViT against transformers' InternVLVisionModel (which matches the official InternViT within 1e-6)."""

import pytest
import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from internvl_chat.model import InternVisionConfig, InternVisionModel, pixel_shuffle
from internvl_chat.model.vision import drop_path

STYLES = {
    "300m": dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False, initializer_factor=1.0),
    "6b": dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True, initializer_factor=0.1),
}


def tiny_vit(style: str, image_size: int = 56, **overrides) -> InternVisionModel:
    torch.manual_seed(0)
    cfg = InternVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, patch_size=14,
        image_size=image_size, **{**STYLES[style], **overrides}
    )
    model = InternVisionModel(cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere, including norms and layer scales
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def to_transformers(model: InternVisionModel) -> InternVLVisionModel:
    c = model.config
    hf = InternVLVisionModel(
        InternVLVisionConfig(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_attention_heads=c.num_attention_heads, num_hidden_layers=c.num_hidden_layers,
            attention_bias=c.qkv_bias, use_qk_norm=c.qk_normalization, norm_type=c.norm_type,
            layer_norm_eps=c.layer_norm_eps, image_size=c.image_size, patch_size=c.patch_size,
            use_mean_pooling=True, attn_implementation="eager",
        )
    ).eval()
    sd = {}
    for key, value in model.state_dict().items():
        key = key.replace("encoder.layers.", "encoder.layer.")
        key = key.replace("embeddings.class_embedding", "embeddings.cls_token")
        key = key.replace("embeddings.patch_embedding", "embeddings.patch_embeddings.projection")
        key = key.replace("embeddings.position_embedding", "embeddings.position_embeddings")
        key = key.replace(".ls1", ".lambda_1").replace(".ls2", ".lambda_2")
        key = key.replace(".norm1.", ".layernorm_before.").replace(".norm2.", ".layernorm_after.")
        key = key.replace(".attn.proj.", ".attention.projection_layer.").replace(".attn.", ".attention.")
        if ".attention.qkv." in key:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                sd[key.replace(".qkv.", f".{name}_proj.")] = part
            continue
        sd[key] = value
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "layernorm." not in k], (missing, unexpected)
    return hf


@pytest.mark.parametrize("style", ["300m", "6b"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_transformers_internvl_vision(style, attn):
    model = tiny_vit(style)
    model.config._attn_implementation = attn
    hf = to_transformers(model)
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        ours = model(x, output_hidden_states=True)
        ref = hf(x, output_hidden_states=True)
    torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    # select_layer=-2 stops one layer early and returns hidden_states[-2]
    with torch.no_grad():
        early = model(x, select_layer=-2).last_hidden_state
    torch.testing.assert_close(early, ours.hidden_states[-2])
    torch.testing.assert_close(early, ref.hidden_states[-2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["300m", "6b"])
def test_position_embedding_interpolation(style):
    """Tiles larger than the trained size: patch position embeddings are resized bicubically."""
    model = tiny_vit(style, image_size=28)  # trained for a 2x2 patch grid
    hf = to_transformers(model)
    x = torch.randn(2, 3, 70, 70)  # 5x5 grid
    with torch.no_grad():
        ours = model(x).last_hidden_state
        ref = hf(x).last_hidden_state
    assert ours.shape == (2, 26, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # the interpolation must actually change something relative to the raw table
    with torch.no_grad():
        table = model.embeddings.patch_position_embedding(5, 5, torch.float32)
    assert table.shape == (1, 25, 32)
    assert not torch.allclose(table[0, :4], model.embeddings.position_embedding[0, 1:5])


def test_position_embedding_identity_at_trained_size():
    model = tiny_vit("300m")
    with torch.no_grad():
        table = model.embeddings.patch_position_embedding(4, 4, torch.float32)
    assert torch.equal(table, model.embeddings.position_embedding[:, 1:])


def test_select_layer_bounds():
    model = tiny_vit("300m")
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        full = model(x, output_hidden_states=True)
        emb = model(x, select_layer=-4).last_hidden_state  # hidden_states[0]: the embeddings
    torch.testing.assert_close(emb, full.hidden_states[0])
    with pytest.raises(ValueError, match="out of range"):
        model(x, select_layer=-5)


def test_drop_path_rates_and_training_only():
    model = tiny_vit("300m", drop_path_rate=0.4)
    rates = [layer.drop_path_rate for layer in model.encoder.layers]
    assert rates == pytest.approx([0.0, 0.2, 0.4])
    x = torch.randn(8, 3, 56, 56)
    with torch.no_grad():
        a = model(x).last_hidden_state
        b = model(x).last_hidden_state
    assert torch.equal(a, b)  # eval: deterministic, no drop path
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        c = model(x).last_hidden_state
    assert not torch.allclose(a, c)
    model.encoder.set_drop_path_rate(0.0)
    with torch.no_grad():
        d = model(x).last_hidden_state
    torch.testing.assert_close(a, d)


def test_drop_path_statistics():
    torch.manual_seed(0)
    x = torch.ones(20000, 1, 1)
    y = drop_path(x, 0.25, training=True)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.02
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_pixel_shuffle_v2_channel_groups():
    n, side, c = 2, 4, 3
    x = torch.randn(n, side, side, c)  # x[:, row, col] = patch at (row, col)
    y = pixel_shuffle(x, 0.5, "v2")
    assert y.shape == (n, 2, 2, 4 * c)
    for r in range(2):
        for col in range(2):
            expect = torch.cat(
                [x[:, 2 * r, 2 * col], x[:, 2 * r, 2 * col + 1], x[:, 2 * r + 1, 2 * col], x[:, 2 * r + 1, 2 * col + 1]],
                dim=-1,
            )
            torch.testing.assert_close(y[:, r, col], expect)


def test_pixel_shuffle_v1_is_transposed_token_order():
    x = torch.randn(2, 4, 4, 3)
    v1 = pixel_shuffle(x, 0.5, "v1")
    v2 = pixel_shuffle(x, 0.5, "v2")
    torch.testing.assert_close(v1, v2.transpose(1, 2))
    assert not torch.allclose(v1, v2)


def test_gradient_checkpointing_same_grads():
    model = tiny_vit("6b").train()
    x = torch.randn(2, 3, 56, 56)
    model(x).last_hidden_state.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
    model(x).last_hidden_state.square().mean().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(a, p.grad)
