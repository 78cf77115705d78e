"""Engines behind one interface (base.Engine): the embedded PyTorch engine and vLLM."""
