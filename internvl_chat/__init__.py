"""internvl-chat: fine-tune InternVL chat models on your own multimodal data."""

__version__ = "0.1.0"
