"""Security defaults: no pickle is loaded (safetensors only; --allow_pickle to accept), no code from a checkpoint
folder is imported, nothing is fetched from the network during training or chat.

Every hostile file is generated here. A malicious pickle would write a sentinel file when unpickled, malicious
checkpoint code when imported; the tests assert the sentinels never appear.
"""

import ast
import importlib.util
import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_chat.cli import chat
from internvl_chat.demo_data import make_demo_dataset
from internvl_chat.finetune import main as finetune
from internvl_chat.model import InternVLChatModel, load_tokenizer
from internvl_chat.model.weight_files import CorruptWeightsError, UnsafeWeightsError
from internvl_chat.tiny_model import make_tiny_model
from internvl_chat.train.checkpoint import write_marker, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs code: it writes the sentinel file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return exec, (f"open({self.sentinel!r}, 'w').write('pickle executed')",)


REMOTE_CODE = "open({sentinel!r}, 'a').write(__name__ + ' imported\\n')\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    model = make_tiny_model(root / "model", llm="qwen2", template="internvl2_5", seed=0)
    meta = make_demo_dataset(root / "data", num_images=6, seed=0)
    return root, model, meta


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def hostile_checkpoint(src, dst, sentinel):
    """A checkpoint that asks for its own code to be run (auto_map + *.py, as released checkpoints have)."""
    path = copy_of(src, dst)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                          "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                          "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
    (path / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_qwen2.Qwen2Tokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py", "tokenization_qwen2.py"):
        (path / name).write_text(REMOTE_CODE.format(sentinel=str(sentinel)))
    return path


# --- pickle -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bin_beside", "bin_instead", "pt_beside"])
def test_pickle_weights_are_refused(tiny, tmp_path, layout):
    _, model, _ = tiny
    sentinel = tmp_path / "sentinel"
    path = copy_of(model, tmp_path / "ckpt")
    name = "model.pt" if layout == "pt_beside" else "pytorch_model.bin"
    (path / name).write_bytes(pickle.dumps(_Payload(sentinel)))
    if layout == "bin_instead":
        (path / "model.safetensors").unlink()
    with pytest.raises(UnsafeWeightsError, match=f"{path} holds pickle weight file\\(s\\) {name}; loading a pickle "
                                                 "can run arbitrary code, so only .safetensors weights are loaded"):
        InternVLChatModel.from_pretrained(path)
    assert not sentinel.exists()


def test_allow_pickle_still_never_unpickles_code(tiny, tmp_path):
    """--allow_pickle loads real tensors from a pickle (torch's weights_only unpickler), never code."""
    _, model, _ = tiny
    good = copy_of(model, tmp_path / "good")
    state = InternVLChatModel.from_pretrained(model).state_dict()
    torch.save(state, good / "pytorch_model.bin")
    (good / "model.safetensors").unlink()
    loaded = InternVLChatModel.from_pretrained(good, allow_pickle=True)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())

    sentinel = tmp_path / "sentinel"
    bad = copy_of(model, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    with pytest.raises(Exception):
        InternVLChatModel.from_pretrained(bad, allow_pickle=True)
    assert not sentinel.exists()


def test_trainer_state_files_are_not_weights(tiny, tmp_path):
    """optimizer.pt, rng_state.pth, training_args.bin (what the Trainer writes) do not make a folder refused."""
    _, model, _ = tiny
    path = copy_of(model, tmp_path / "ckpt")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_3.pth", "training_args.bin"):
        torch.save({}, path / name)
    InternVLChatModel.from_pretrained(path)


def test_truncated_safetensors_is_named(tiny, tmp_path):
    _, model, _ = tiny
    path = copy_of(model, tmp_path / "ckpt")
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(CorruptWeightsError, match=f"{weights}: header declares \\d+ data bytes, the file holds "
                                                  "\\d+ \\(truncated\\)"):
        InternVLChatModel.from_pretrained(path)


def test_chat_cli_refuses_pickle_unless_allowed(tiny, tmp_path, capsys):
    _, model, _ = tiny
    sentinel = tmp_path / "sentinel"
    path = copy_of(model, tmp_path / "ckpt")
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    question = ["--question", "hi", "--max-new-tokens", "2"]
    assert chat.main([str(path), *question]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} holds pickle weight file(s) pytorch_model.bin;") and "--allow_pickle" in err
    assert chat.main([str(path), *question, "--allow-pickle"]) == 0  # the safetensors weights load, the pickle not
    assert not sentinel.exists()


def _merge_lora_main():
    spec = importlib.util.spec_from_file_location("merge_lora", REPO / "tools" / "merge_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_merge_lora_refuses_pickle_unless_allowed(tiny, tmp_path, capsys):
    _, model, _ = tiny
    sentinel = tmp_path / "sentinel"
    path = copy_of(model, tmp_path / "ckpt")
    (path / "adapter.pt").write_bytes(pickle.dumps(_Payload(sentinel)))
    merge = _merge_lora_main()
    with pytest.raises(SystemExit) as exit_info:
        merge([str(path), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "holds pickle weight file(s) adapter.pt" in capsys.readouterr().err
    assert merge([str(path), str(tmp_path / "out"), "--allow_pickle", "--dtype", "float32"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists() and not sentinel.exists()


def test_training_refuses_pickle_unless_allowed(tiny, tmp_path):
    _, model, meta = tiny
    path = copy_of(model, tmp_path / "ckpt")
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin"):
        finetune(["--model_name_or_path", str(path), "--meta_path", str(meta), "--output_dir", str(tmp_path / "o"),
                  "--conv_style", "internvl2_5", "--report_to", "none"])


def test_resume_skips_a_checkpoint_with_a_planted_pickle(tiny, tmp_path):
    _, model, _ = tiny
    ckpt = copy_of(model, tmp_path / "checkpoint-2")
    torch.save({}, ckpt / "optimizer.pt")  # the Trainer's own files are listed in the marker
    write_marker(str(ckpt), 2)
    assert verify_checkpoint(str(ckpt)) == []
    torch.save({}, ckpt / "pytorch_model.bin")
    assert verify_checkpoint(str(ckpt)) == [
        "pytorch_model.bin is a pickle weight file this run did not write (--allow_pickle to accept)"]
    assert verify_checkpoint(str(ckpt), allow_pickle=True) == []


def _load_calls(source: str, modules: tuple[str, ...]) -> list[ast.Call]:
    """`<module>.load(...)` / `<module>.loads(...)` calls in `source`, for the given module names."""
    calls = []
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "loads") \
                and isinstance(node.func.value, ast.Name) and node.func.value.id in modules:
            calls.append(node)
    return calls


def _keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def test_no_unrestricted_unpickling_in_the_repository():
    """Our code never unpickles: no pickle.load(s), torch.load only with weights_only=True, np.load never with
    allow_pickle=True."""
    offenders = []
    for folder in ("internvl_chat", "tools", "eval"):
        for path in sorted((REPO / folder).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            offenders += [f"{path}:{c.lineno}" for c in _load_calls(source, ("pickle", "dill", "cloudpickle"))]
            offenders += [f"{path}:{c.lineno}" for c in _load_calls(source, ("torch",))
                          if not _keyword_is(c, "weights_only", True)]
            offenders += [f"{path}:{c.lineno}" for c in _load_calls(source, ("np", "numpy"))
                          if _keyword_is(c, "allow_pickle", True)]
    assert offenders == []


def test_trainer_resume_loads_its_files_with_weights_only():
    """transformers' Trainer torch.loads optimizer.pt, scheduler.pt, scaler.pt and rng_state*.pth at resume: every
    one of those calls must use the restricted unpickler (a transformers upgrade that drops it fails here)."""
    from transformers import Trainer

    methods = [Trainer._load_from_checkpoint, Trainer._load_optimizer_and_scheduler, Trainer._load_rng_state]
    calls = [(m.__name__, c) for m in methods for c in _load_calls(inspect.getsource(m), ("torch",))]
    assert len(calls) >= 5
    assert [name for name, c in calls if not _keyword_is(c, "weights_only", True)] == []


# --- remote code --------------------------------------------------------------------------------------------------
def test_checkpoint_code_is_never_imported(tiny, tmp_path):
    """auto_map + *.py in the checkpoint: model and tokenizer load with our own classes, nothing is imported
    (trust_remote_code=True, as the official scripts pass it, is accepted and ignored by the model)."""
    _, model, _ = tiny
    sentinel = tmp_path / "sentinel"
    path = hostile_checkpoint(model, tmp_path / "ckpt", sentinel)
    loaded = InternVLChatModel.from_pretrained(path, trust_remote_code=True)
    assert type(loaded) is InternVLChatModel
    load_tokenizer(path)
    assert not sentinel.exists()
    assert not [m for m in sys.modules if "internvl_chat" in m and m.startswith(("transformers_modules", "modeling_"))]


# --- network ------------------------------------------------------------------------------------------------------
NETWORK_GUARD = textwrap.dedent('''
    """Record and refuse every connection or name lookup that leaves the machine, then chat and train."""
    import json, os, socket, sys

    log = os.environ["NETWORK_LOG"]


    def local(host):
        return host in (None, "", "localhost", "::1") or str(host).startswith("127.")


    def refuse(what):
        with open(log, "a") as f:
            f.write(what + "\\n")
        raise OSError(101, "network access refused by the test: " + what)


    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo


    def connect(self, address):
        if self.family != getattr(socket, "AF_UNIX", None) and not local(address[0]):
            refuse(f"connect {address}")
        return real_connect(self, address)


    def connect_ex(self, address):
        if self.family != getattr(socket, "AF_UNIX", None) and not local(address[0]):
            refuse(f"connect {address}")
        return real_connect_ex(self, address)


    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            refuse(f"resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)


    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo

    from internvl_chat.cli import chat
    from internvl_chat.finetune import main

    chat_argv, train_argv = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    assert chat.main(chat_argv) == 0
    main(train_argv)
''')


def test_chat_and_training_never_touch_the_network(tiny, tmp_path):
    """A subprocess without HF_HUB_OFFLINE, behind a dead proxy, with every non-local connection and DNS lookup
    refused and recorded, chats (with an image) and trains one step from a checkpoint that carries remote code:
    no network attempt, no checkpoint code imported."""
    _, model, meta = tiny
    sentinel = tmp_path / "sentinel"
    path = hostile_checkpoint(model, tmp_path / "ckpt", sentinel)
    image = tmp_path / "cat.png"
    Image.new("RGB", (64, 48), (200, 120, 40)).save(image)
    guard = tmp_path / "guard.py"
    guard.write_text(NETWORK_GUARD)
    network_log = tmp_path / "network.log"
    out = tmp_path / "out"
    chat_argv = [str(path), "--image", str(image), "--question", "What is it?", "--max-new-tokens", "3"]
    train_argv = ["--model_name_or_path", str(path), "--meta_path", str(meta), "--output_dir", str(out),
                  "--conv_style", "internvl2_5", "--dynamic_image_size", "True", "--use_thumbnail", "True",
                  "--max_dynamic_patch", "2", "--per_device_train_batch_size", "1", "--max_steps", "1",
                  "--freeze_backbone", "True", "--bf16", "False", "--grad_checkpoint", "False",
                  "--dataloader_num_workers", "0", "--save_strategy", "no", "--disable_tqdm", "True"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(REPO), NETWORK_LOG=str(network_log), HF_HOME=str(tmp_path / "hf_home"),
               HTTPS_PROXY="http://10.255.255.1:9", HTTP_PROXY="http://10.255.255.1:9")
    proc = subprocess.run([sys.executable, str(guard), json.dumps(chat_argv), json.dumps(train_argv)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not network_log.exists(), network_log.read_text()
    assert not sentinel.exists(), sentinel.read_text()
    assert (out / "model.safetensors").exists()
