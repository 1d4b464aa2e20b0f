"""kvferry's engine: one replica's paged-KV inference engine with a TTL prompt cache.

No Ray in here. The public API (docs/engine-api.md)::

    from engine import LLMEngine, SamplingParams
    eng = LLMEngine.from_pretrained("default")
    outs = eng.generate(["What is the capital of France?"], SamplingParams(temperature=0))
"""

from engine.config import EngineConfig
from engine.errors import ContextLengthExceeded
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, KVExport, RemotePrefillPlan, RequestOutput
from engine.sampling_params import CacheBreakpoint, SamplingParams

__all__ = [
    "ContextLengthExceeded",
    "EngineConfig",
    "EngineStats",
    "KVExport",
    "LLMEngine",
    "RemotePrefillPlan",
    "RequestOutput",
    "CacheBreakpoint",
    "SamplingParams",
]
