"""Continuous batching over Hugging Face causal LMs: submit requests from any thread, stream their text."""

from workers.engine.llm_engine import LLMEngine, RequestHandle, SeqOutput
from workers.engine.sequence import SamplingParams

__all__ = ["LLMEngine", "RequestHandle", "SamplingParams", "SeqOutput"]
