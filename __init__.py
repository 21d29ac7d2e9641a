"""steer-batch: per-request activation steering inside vLLM, at batch scale.

from vllm import LLM, SamplingParams
from steer_batch import steering

llm = LLM(model=path, additional_config={"steering": {"vectors": {"happy": "happy.safetensors"}}})
llm.generate(prompts, SamplingParams(extra_args=steering("happy", 4.0)))
"""

from importlib.metadata import version as _version

from steer_batch.engine.config import steering
from steer_batch.errors import SteerBatchError
from steer_batch.vectors.vector import SteeringVector

__version__ = _version("steer-batch")
__all__ = ["SteerBatchError", "SteeringVector", "__version__", "steering"]
