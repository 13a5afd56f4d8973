"""The InternVL chat model in the official checkpoint layout.

    from internvl_chat.model import InternVLChatModel, InternVLChatConfig, load_tokenizer
"""

from .configuration import InternVisionConfig, InternVLChatConfig
from .modeling import InternVLChatModel, causal_lm_loss, pixel_shuffle
from .vision import InternVisionModel


def __getattr__(name):
    if name == "load_tokenizer":  # imported lazily: tokenizer support pulls in sentencepiece
        from .tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(name)

__all__ = [
    "InternVLChatConfig",
    "InternVLChatModel",
    "InternVisionConfig",
    "InternVisionModel",
    "causal_lm_loss",
    "load_tokenizer",
    "pixel_shuffle",
]
