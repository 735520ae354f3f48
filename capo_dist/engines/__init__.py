"""Generation engines: one small interface (`GenerationEngine`), vLLM and Hugging Face behind it.

`make_engine("vllm" | "hf", model_path, **options)` builds one. vLLM is
imported only when a vLLM engine is built, so this package imports without it.
"""

from capo_dist.engines.base import Backend, GenerationEngine, make_engine

__all__ = ["Backend", "GenerationEngine", "make_engine"]
