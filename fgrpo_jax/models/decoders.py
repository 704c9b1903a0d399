"""`decoder(cfg)`: the module that implements cfg.arch (llama.py or qwen3_5.py).

Both modules offer the same functions with the same shapes: init_params, param_shapes,
forward, prefill, init_decode_cache, decode_step, completion_logits. Callers that do
not care which decoder they run (the rollout, the steps, checkpoint I/O) go through here.
"""

from types import ModuleType

from fgrpo_jax.models import llama, qwen3_5
from fgrpo_jax.models.llama import ModelConfig


def decoder(cfg: ModelConfig) -> ModuleType:
  return qwen3_5 if cfg.arch == "qwen3_5" else llama
