"""The draft trainer: init-draft -> generate -> fit (AFA-LoRA, LoRA, full) -> merge."""
