"""Serving: the OpenAI-compatible API on vLLM, model versions (LoRA adapters) and routing."""
