"""afa-serve: LLM serving with lossless speculative decoding and AFA-LoRA-trained drafts."""

__version__ = "0.1.0"
