"""Decoder models: the Llama-family and Qwen3.5 decoders and checkpoint I/O."""

from fgrpo_jax.models.llama import (  # noqa: F401
    DecodeCache, ModelConfig, PrefixCache, completion_logits, count_params,
    decode_step, forward, init_decode_cache, init_params, param_shapes, prefill)
from fgrpo_jax.models.decoders import decoder  # noqa: F401
from fgrpo_jax.models.hf import (  # noqa: F401
    PretrainedModel, config_from_hf, load_hf_params, load_pretrained, save_hf_checkpoint)
