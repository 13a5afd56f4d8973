import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # outputs of the official code; README inside

# Tests run offline: never let transformers or huggingface_hub reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tool(name: str):
    """A script of tools/ imported as a module (tools/ is not a package), to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (they are part of the repository)")
    return FIXTURES


# ------------------------------------------------------------------------------ helpers shared by the model tests


def load_chat_model(path, **kwargs):
    """A checkpoint's chat model and tokenizer, the model told its image-context id (as training sets it)."""
    from internvl_chat.constants import IMG_CONTEXT_TOKEN
    from internvl_chat.model import InternVLChatModel, load_tokenizer

    model = InternVLChatModel.from_pretrained(path, **kwargs)
    tok = load_tokenizer(path)
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    return model, tok


def read_safetensors(directory: Path) -> dict:
    """Every tensor of a checkpoint folder's safetensors files, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def forward_backward(model, batch: dict, **kwargs):
    """One forward and backward from cleared gradients: the output and a copy of every gradient, by name."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(got, ref, what: str) -> None:
    """Two `forward_backward` results agree: loss, and the gradient of every parameter that got one."""
    import torch

    (out, grads), (ref_out, ref_grads) = got, ref
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-6, rtol=1e-5, msg=f"{what}: loss")
    assert grads.keys() == ref_grads.keys(), what
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=2e-6, rtol=1e-4,
                                   msg=lambda m, key=key: f"{what}: grad of {key}\n{m}")
