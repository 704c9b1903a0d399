"""configs/recsys_llm.py and configs/multihop_qa_llm.py on a tiny local HF checkpoint whose
tokenizer has a chat template: text prompts, LoRA on the frozen backbone, eval.json."""

import json

import pytest

from configs import multihop_qa_llm, recsys_llm
from fgrpo_jax import train
from fgrpo_jax.errors import UserError


@pytest.mark.parametrize("module", [recsys_llm, multihop_qa_llm], ids=["recsys", "qa"])
def test_llm_config_trains_lora_on_chat_prompts(tiny_hf_checkpoint, tmp_path, module):
  c = module.get_config("tiny")
  c.model.hf_checkpoint = str(tiny_hf_checkpoint(vocab_size=416, tokenizer="chat"))
  c.data.cache_dir = str(tmp_path / "cache")
  logs = []
  result = train.run(c, str(tmp_path / "run"), log=logs.append)
  saved = json.load(open(tmp_path / "run" / "eval.json"))
  assert saved["metrics"] == result["metrics"] and saved["steps"] == 3
  task_line = next(l for l in logs if l.startswith("task "))
  assert "'prompt': 'chat'" in task_line
  assert any("lora" in l.lower() for l in logs)  # adapters on the frozen backbone


def test_llm_config_without_a_checkpoint_is_one_clear_error(tmp_path):
  c = recsys_llm.get_config("tiny")
  with pytest.raises(UserError, match="config.prompt.tokenizer or config.model.hf_checkpoint"):
    train.run(c, str(tmp_path), log=lambda s: None)
