"""umarvel: universal multimodal retrieval with multimodal LLMs, following the U-MARVEL recipe."""

__version__ = "0.1.0"
