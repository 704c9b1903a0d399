"""Tests for fgrpo_jax/sharding.py.

The sharded checks need 8 devices, i.e. XLA_FLAGS set before jax is imported; other
test modules import jax first, so they run in one subprocess (this file run as a
script) that computes everything on 1 device and on three 8-device meshes and returns
the differences as JSON. The pure spec/mesh logic is tested in-process.

Checked on meshes data=8, fsdp=8 and data=2 x fsdp=2 x tensor=2 against one device:
SFT and RL (clipped surrogate) losses and gradients, greedy rollouts, the parameter
layout; on one mesh also a `steps.rl_step` on a sharded TrainState, the sharded init
and the KV-cache layout. A second worker run does the same for a Qwen3.5 (a Gated
DeltaNet and a gated-attention layer) on the mesh that splits all three axes, its conv
window and recurrent state included in the cache layout, the sharded TrainState's layout
checked without running a step (the step's sharding code is the Llama's).

Tolerances (float32; sharding reorders reductions): losses 1e-5 relative + 1e-6
absolute; gradients elementwise 1e-4 relative + 1e-5 absolute (the largest
gradient entries are ~0.4-0.8); rl_step metrics 1e-4 relative + 1e-5 absolute;
greedy choices identical. Measured: losses within 4e-7 relative, gradients within
6e-6 absolute (~1e-5 of the largest entry).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {
    "data8": {"data": 8},
    "fsdp8": {"fsdp": 8},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-5
RL_STEP_MESH = "data2_fsdp2_tensor2"  # the mesh that also runs steps.rl_step
# The mesh that also checks the sharded init and the KV-cache layout: the one that splits
# every axis (an fsdp4 x tensor2 mesh ran the same code paths and was dropped for time).
INIT_MESH = RL_STEP_MESH
# The Qwen3.5 run uses one mesh that splits all three axes (its compiles cost ~3x Llama's),
# and checks the sharded init and cache layout there too.
QWEN3_5_MESHES = (RL_STEP_MESH,)
QWEN3_5_INIT_MESH = RL_STEP_MESH


# ----------------------------------------------------------------------------
# The subprocess (8 fake CPU devices).


def _model_config(arch: str):
  from fgrpo_jax.models import llama
  if arch == "llama":
    return llama.ModelConfig(vocab_size=64, num_layers=2, hidden=32, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_hidden=64)
  # Qwen3.5: a DeltaNet and a gated-attention layer, GQA in both; chunks of 4 tokens, so
  # the 6-token prompts run two chunks (one padded).
  return llama.ModelConfig(
      arch="qwen3_5", vocab_size=64, num_layers=2, hidden=32, num_heads=4, num_kv_heads=2,
      head_dim=8, mlp_hidden=64, qk_norm=True, partial_rotary_factor=0.5,
      layer_types=("linear_attention", "full_attention"), linear_num_key_heads=2,
      linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=4,
      linear_conv_kernel=3, chunk_size=4)


def _worker(out_path: str, arch: str = "llama") -> None:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
  import warnings

  import jax
  import jax.numpy as jnp
  import numpy as np

  from fgrpo_jax import objectives, sharding
  from fgrpo_jax import steps as steps_lib
  from fgrpo_jax import rewards as R
  from fgrpo_jax import rollout as rollout_lib
  from fgrpo_jax.models.decoders import decoder

  warnings.filterwarnings("ignore", message=".*donat.*")  # CPU does not donate buffers
  assert jax.device_count() == 8, jax.devices()
  t0 = time.time()
  cfg = _model_config(arch)
  model = decoder(cfg)
  meshes = MESHES if arch == "llama" else {k: MESHES[k] for k in QWEN3_5_MESHES}
  layout = rollout_lib.Layout(slate_size=4, rank_size=2, mid_tags=(60, 61), end_tags=(62,))
  B, P, C, G, T = 8, 6, 8, 4, layout.length
  rng = np.random.default_rng(0)
  prompt_mask = np.ones((B, P), bool)
  prompt_mask[1, :2] = False  # left padding
  prompt_mask[5, :1] = False
  pool_mask = np.ones((B, C), bool)
  pool_mask[2, -2:] = False
  batch = {
      "prompt": rng.integers(0, 64, (B, P)).astype(np.int32),
      "prompt_mask": prompt_mask,
      "cand_tokens": np.stack([rng.choice(np.arange(8, 56), C, replace=False)
                               for _ in range(B)]).astype(np.int32),
      "pool_mask": pool_mask,
      "relevance": (rng.integers(1, 3, (B, C)) * (rng.random((B, C)) < 0.4)).astype(np.float32),
  }
  model_keys = ("prompt", "prompt_mask", "cand_tokens", "pool_mask")
  # Fixed RL inputs: random valid rollouts (slate from the pool, ranking from the
  # slate), old log-probs away from the current ones (ratios != 1, some clipped)
  # and per-phase advantages.
  choices = np.full((B, G, T), -1, np.int32)
  for b in range(B):
    for g in range(G):
      slate = rng.choice(np.flatnonzero(pool_mask[b]), layout.slate_size, replace=False)
      choices[b, g, layout.slate_positions] = slate
      choices[b, g, layout.rank_positions] = rng.permutation(slate)[:layout.rank_size]
  phase_ids = np.broadcast_to(layout.phase_ids, (B, G, T)).astype(np.int32)
  is_choice = phase_ids != R.PHASE_TAG
  rl_inputs = {
      "choices": choices, "phase_ids": phase_ids,
      "adv": np.where(is_choice, rng.normal(0, 1, (B, G, T)), 0).astype(np.float32),
      "old_lp": np.where(is_choice, -1.5 + rng.normal(0, 0.5, (B, G, T)), 0).astype(np.float32),
  }
  params0 = model.init_params(cfg, jax.random.key(0))
  # Larger weights than the init, so attention and gradients are far from trivial.
  params0 = jax.device_get(jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, params0))
  key = jax.random.key(1)
  groups = objectives.fgrpo_groups(1.0)
  loss_cfg = objectives.PolicyLossConfig()

  @jax.jit
  def losses_grads_rollouts(params, batch, rl_inputs):
    """SFT loss+grads (as steps.sft_step), RL loss+grads (as steps.rl_step), greedy rollouts."""
    mb = {k: batch[k] for k in model_keys}
    gold = steps_lib.gold_choices(batch["relevance"], batch["pool_mask"], key, layout)[:, None]
    gold_phases = jnp.broadcast_to(jnp.asarray(layout.phase_ids), gold.shape)

    def sft_loss(p):
      lp, _ = rollout_lib.sequence_logprobs(p, mb, gold, cfg=cfg, layout=layout)
      return objectives.sft_loss(lp, gold_phases)

    def rl_loss(p):
      lp, _ = rollout_lib.sequence_logprobs(p, mb, rl_inputs["choices"], cfg=cfg, layout=layout)
      loss, aux = objectives.clipped_surrogate(lp, rl_inputs["old_lp"], rl_inputs["adv"],
                                               rl_inputs["phase_ids"], groups, loss_cfg)
      return loss, aux["clip_frac"]

    sft = jax.value_and_grad(sft_loss)(params)
    (rl_l, clip_frac), rl_g = jax.value_and_grad(rl_loss, has_aux=True)(params)
    greedy = rollout_lib.sample(params, mb, key, cfg=cfg, layout=layout, group_size=2,
                                greedy=True)
    return {"sft_loss": sft[0], "sft_grad": sft[1], "rl_loss": rl_l, "rl_grad": rl_g,
            "clip_frac": clip_frac, "greedy_choices": greedy.choices,
            "greedy_logprobs": greedy.logprobs}

  optimizer = steps_lib.make_optimizer(_optim_config(), 1e-3, total_steps=10)
  settings = steps_lib.RLSettings(
      algorithm="fgrpo", group_size=G, temperature=1.0, coverage="recall", rank_metric="ndcg",
      gain="exp", lam=1.0, advantage="mean", inner_steps=1, loss=loss_cfg)

  def fresh_state(params):
    return steps_lib.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

  def run_rl_step(state, batch, step=steps_lib.rl_step):
    new_state, metrics = step(state, None, batch, key, cfg=cfg, layout=layout,
                              optimizer=optimizer, settings=settings)
    return new_state, {k: float(v) for k, v in jax.device_get(metrics).items()}

  def grad_report(g, g_ref):
    needed, max_abs = 0.0, 0.0  # needed: smallest rtol with allclose(g, g_ref, rtol, GRAD_ATOL)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      err = np.abs(a - b)
      max_abs = max(max_abs, float(err.max()))
      needed = max(needed, float(np.max(np.maximum(err - GRAD_ATOL, 0) / (np.abs(b) + 1e-30))))
    scale = max(float(np.abs(np.asarray(b)).max()) for b in jax.tree.leaves(g_ref))
    return {"max_abs": max_abs, "needed_rtol": needed, "max_abs_ref": scale,
            "max_abs_over_scale": max_abs / scale}

  def spec_json(spec):  # PartitionSpec -> JSON list: None | axis | [axes]
    return [list(e) if isinstance(e, tuple) else e for e in spec]

  def specs(tree):
    return jax.tree.map(lambda x: spec_json(x.sharding.spec), tree)

  # Reference: everything on one device.
  ref = jax.device_get(losses_grads_rollouts(params0, batch, rl_inputs))
  results = {"reference": {"sft_loss": float(ref["sft_loss"]), "rl_loss": float(ref["rl_loss"]),
                           "clip_frac": float(ref["clip_frac"])},
             "meshes": {}}
  # steps.rl_step runs on the Llama only: what it adds to the checks above (the state
  # pinned across a step, Adam moments laid out like their params, metrics equal) is the
  # same code for every architecture, and on Qwen3.5 it cost ~20 CPU s of compiles.
  run_step = arch == "llama"
  if run_step:
    _, ref_metrics = run_rl_step(fresh_state(params0), batch)
    results["reference"]["rl_step_metrics"] = ref_metrics
  results["reference"]["time_s"] = time.time() - t0

  for name, mesh_cfg in meshes.items():
    t = time.time()
    mesh = sharding.make_mesh(mesh_cfg)
    params = sharding.shard_params(params0, mesh)
    sbatch = sharding.shard_batch(batch, mesh)
    out = jax.device_get(losses_grads_rollouts(params, sbatch, sharding.shard_batch(rl_inputs,
                                                                                     mesh)))
    gate = params["layers"]["gate_proj"]
    r = {
        "mesh": {a: int(n) for a, n in mesh.shape.items()},
        "sft_loss_abs": abs(float(out["sft_loss"]) - float(ref["sft_loss"])),
        "rl_loss_abs": abs(float(out["rl_loss"]) - float(ref["rl_loss"])),
        "sft_grad": grad_report(out["sft_grad"], ref["sft_grad"]),
        "rl_grad": grad_report(out["rl_grad"], ref["rl_grad"]),
        "greedy_equal": bool(np.array_equal(out["greedy_choices"], ref["greedy_choices"])),
        "greedy_lp_abs": float(np.max(np.abs(out["greedy_logprobs"] - ref["greedy_logprobs"]))),
        "param_specs": specs(params),
        "batch_spec": spec_json(sbatch["prompt"].sharding.spec),
        "gate_proj_size": int(gate.size),
        "gate_proj_shard_sizes": sorted({s.data.size for s in gate.addressable_shards}),
        "gate_proj_num_shards": len(gate.addressable_shards),
    }
    for k in ("sft_loss_abs", "rl_loss_abs"):
      r[k.replace("_abs", "_rel")] = r[k] / abs(results["reference"][k[:-4]])
    if name == RL_STEP_MESH:  # a sharded TrainState (on the Llama, one rl_step on it)
      state = sharding.shard_train_state(fresh_state(params0), mesh)
      mu = state.opt_state[1][0].mu
      r["adam_mu_o_proj_spec"] = spec_json(mu["attn" if "attn" in mu else "layers"]["o_proj"]
                                           .sharding.spec)
      r["state_specs"] = specs(state)
    if name == RL_STEP_MESH and run_step:
      step = sharding.pin_state_shardings(
          steps_lib.rl_step, sharding.train_state_shardings(state, mesh),
          static_argnames=("cfg", "layout", "optimizer", "settings"))
      new_state, metrics = run_rl_step(state, sbatch, step)
      r["rl_step_metric_err"] = {k: abs(metrics[k] - v) for k, v in ref_metrics.items()}
      r["rl_step_metrics_ok"] = all(abs(metrics[k] - v) <= METRIC_ATOL + METRIC_RTOL * abs(v)
                                    for k, v in ref_metrics.items())
      r["state_specs_after_step"] = specs(new_state)
    if name == (INIT_MESH if arch == "llama" else QWEN3_5_INIT_MESH):
      # params created sharded; the prefix cache laid out as asked
      init = sharding.init_sharded_params(cfg, jax.random.key(0), mesh)
      init_ref = model.init_params(cfg, jax.random.key(0))
      r["init_specs"] = specs(init)
      r["init_max_abs"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                              for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(init_ref)))
      prefill = lambda p, b: model.prefill(p, b["prompt"], cfg, b["prompt_mask"])[1]  # noqa: E731
      cache_sh = sharding.cache_shardings(jax.eval_shape(prefill, params0, batch), mesh)
      cache = jax.jit(prefill, out_shardings=cache_sh)(params, sbatch)
      cache_ref = prefill(params0, batch)
      r["cache_k_spec"] = spec_json(cache.k.sharding.spec)
      r["cache_mask_spec"] = spec_json(cache.mask.sharding.spec)
      r["cache_k_shard_shape"] = list(cache.k.addressable_shards[0].data.shape)
      r["cache_abs"] = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
                           for a, b in zip(cache, cache_ref))
      if arch == "qwen3_5":
        r["cache_state_spec"] = spec_json(cache.state.sharding.spec)
        r["cache_conv_spec"] = spec_json(cache.conv.sharding.spec)
        r["cache_state_shard_shape"] = list(cache.state.addressable_shards[0].data.shape)
    r["time_s"] = time.time() - t
    results["meshes"][name] = r
  results["total_s"] = time.time() - t0
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)


def _optim_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(warmup_steps=2, weight_decay=0.01, b1=0.9, b2=0.99,
                                        grad_clip=1.0, final_lr_frac=0.1))


# ----------------------------------------------------------------------------
# pytest side.


def _run_worker(tmp_path_factory, arch: str):
  out = tmp_path_factory.mktemp("sharding") / "results.json"
  env = dict(os.environ)
  import conftest  # here, not at the top: the worker runs this file before jax is set up
  env["XLA_FLAGS"] = conftest.subprocess_xla_flags(8)  # the session's flags, 8 devices
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), arch], cwd=REPO,
                        env=env,
                        capture_output=True, text=True, timeout=900)
  if proc.returncode:
    pytest.fail(f"sharded worker failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
  results = json.loads(out.read_text())
  summary = {name: {k: v for k, v in r.items() if "spec" not in k and k != "rl_step_metric_err"}
             for name, r in results["meshes"].items()}
  print(json.dumps({"reference": results["reference"], "meshes": summary,
                    "total_s": results["total_s"]}, indent=1))
  return results


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  return _run_worker(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def sharded_qwen3_5(tmp_path_factory):
  return _run_worker(tmp_path_factory, "qwen3_5")


@pytest.mark.parametrize("name", list(MESHES))
def test_losses_and_grads_match_one_device(sharded, name):
  r = sharded["meshes"][name]
  assert r["mesh"] == {**{"data": 1, "fsdp": 1, "tensor": 1}, **MESHES[name]}
  assert 0 < sharded["reference"]["clip_frac"] < 1  # the RL loss exercises the clipping
  for which in ("sft", "rl"):
    ref = abs(sharded["reference"][f"{which}_loss"])
    assert r[f"{which}_loss_abs"] <= LOSS_ATOL + LOSS_RTOL * ref, (which, r)
    assert r[f"{which}_grad"]["needed_rtol"] <= GRAD_RTOL, (which, r[f"{which}_grad"])
    assert r[f"{which}_grad"]["max_abs_ref"] > 1e-2  # the gradients are not trivial


@pytest.mark.parametrize("name", list(MESHES))
def test_greedy_rollouts_match_one_device(sharded, name):
  r = sharded["meshes"][name]
  assert r["greedy_equal"], r
  assert r["greedy_lp_abs"] < 1e-5


def test_rl_step_on_sharded_state_matches_unsharded(sharded):
  r = sharded["meshes"][RL_STEP_MESH]
  assert r["rl_step_metrics_ok"], r["rl_step_metric_err"]
  assert r["adam_mu_o_proj_spec"] == [None, "tensor", "fsdp"]
  assert r["state_specs"][0] == r["param_specs"]
  # The new state keeps the layout it came in with (pin_state_shardings: no drift).
  assert r["state_specs_after_step"] == r["state_specs"]


@pytest.mark.parametrize("name", list(MESHES))
def test_params_and_batch_are_really_sharded(sharded, name):
  r = sharded["meshes"][name]
  mesh, specs = r["mesh"], r["param_specs"]
  assert specs["layers"]["gate_proj"] == [None, "fsdp", "tensor"]
  assert specs["layers"]["down_proj"] == [None, "tensor", "fsdp"]
  assert specs["lm_head"] == ["fsdp", "tensor"]
  assert specs["embed"] == ["tensor", "fsdp"]
  assert specs["final_norm"] == []
  assert r["batch_spec"] == [["data", "fsdp"]]
  assert r["gate_proj_num_shards"] == 8
  # Each device holds 1/(fsdp*tensor) of a kernel: 1/8 on fsdp=8, 1/4 on fsdp2 x tensor2.
  assert r["gate_proj_shard_sizes"] == [r["gate_proj_size"] // (mesh["fsdp"] * mesh["tensor"])]


def test_init_is_sharded_and_cache_layout(sharded):
  r = sharded["meshes"][INIT_MESH]
  assert r["init_specs"] == r["param_specs"]  # created sharded, in the rules' layout
  assert r["init_max_abs"] < 1e-7  # with the unsharded init's values
  assert r["cache_k_spec"] == [None, ["data", "fsdp"], None, "tensor"]
  assert r["cache_mask_spec"] == [["data", "fsdp"]]
  assert r["cache_k_shard_shape"] == [2, 2, 6, 1, 8]  # [L, B/4, P, K/2, D]
  assert r["cache_abs"] < 1e-5


# The same checks on a Qwen3.5 (Gated DeltaNet + gated attention), on the meshes that
# split both the batch and the heads.


@pytest.mark.parametrize("name", QWEN3_5_MESHES)
def test_qwen3_5_losses_grads_and_rollouts_match_one_device(sharded_qwen3_5, name):
  test_losses_and_grads_match_one_device(sharded_qwen3_5, name)
  test_greedy_rollouts_match_one_device(sharded_qwen3_5, name)
  specs = sharded_qwen3_5["meshes"][name]["param_specs"]
  assert specs["linear"]["in_proj_qkv"] == [None, "fsdp", "tensor"]
  assert specs["linear"]["conv"] == [None, None, "tensor"]
  assert specs["linear"]["out_proj"] == [None, "tensor", "fsdp"]
  assert specs["attn"]["q_proj"] == [None, "fsdp", "tensor"]


def test_qwen3_5_state_layout_init_and_cache_layout(sharded_qwen3_5):
  r = sharded_qwen3_5["meshes"][QWEN3_5_INIT_MESH]
  assert r["adam_mu_o_proj_spec"] == [None, "tensor", "fsdp"]  # the attention layer's
  assert r["state_specs"][0] == r["param_specs"]
  assert r["init_specs"] == r["param_specs"]
  # One float32 ulp (1.2e-7 measured) between the sharded and the unsharded init.
  assert r["init_max_abs"] < 5e-7
  assert r["cache_abs"] < 1e-5  # keys, values, conv window and DeltaNet state
  assert r["cache_k_spec"] == [None, ["data", "fsdp"], None, "tensor"]
  assert r["cache_conv_spec"] == [None, ["data", "fsdp"], None, "tensor"]
  assert r["cache_state_spec"] == [None, ["data", "fsdp"], "tensor"]
  assert r["cache_state_shard_shape"] == [1, 2, 2, 8, 4]  # [La, B/4, Hv/2, Dk, Dv]


# ----------------------------------------------------------------------------
# In-process tests of the pure logic (whatever the device count).


def test_mesh_shape_resolution_and_errors():
  from fgrpo_jax import sharding
  assert sharding.mesh_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert sharding.mesh_shape({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert sharding.mesh_shape({"fsdp": -1, "data": 2}, 64) == {"data": 2, "fsdp": 32, "tensor": 1}
  assert sharding.mesh_shape(None, 1) == {"data": 1, "fsdp": 1, "tensor": 1}
  for bad, msg in [({"data": 3}, "needs 3 devices"), ({"data": -1, "fsdp": -1}, "at most one -1"),
                   ({"data": -1, "tensor": 3}, "does not divide"), ({"model": 2}, "unknown axes"),
                   ({"data": 0}, "positive"), ({"data": "x"}, "integers")]:
    with pytest.raises(sharding.MeshError, match=msg) as e:
      sharding.mesh_shape(bad, 8)
    assert "config.mesh=" in str(e.value)


def test_make_mesh_on_available_devices():
  import jax
  from fgrpo_jax import sharding
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert mesh.size == jax.device_count()
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(sharding.MeshError, match="config.mesh"):
    sharding.make_mesh({"data": jax.device_count() + 1})


def test_fit_spec_falls_back_to_replicated_and_logs_once(caplog):
  from jax.sharding import PartitionSpec as P
  from fgrpo_jax import sharding
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  kernel = P(None, "fsdp", "tensor")
  assert sharding.fit_spec(kernel, (2, 32, 64), sizes) == kernel
  with caplog.at_level("WARNING", logger="fgrpo_jax.sharding"):
    spec = sharding.fit_spec(P(None, "fsdp", "tensor"), (2, 30, 63), sizes, "layers/test_odd")
    sharding.fit_spec(P(None, "fsdp", "tensor"), (2, 30, 63), sizes, "layers/test_odd")
  assert spec == P()
  assert sum("layers/test_odd" in m for m in caplog.messages) == 2  # one per dim, once each
  # A multi-axis entry keeps its longest dividing prefix.
  assert sharding.fit_spec(P(("data", "fsdp")), (6, 3), sizes, "b") == P(("data",))
  assert sharding.fit_spec(P(("data", "fsdp")), (16,), sizes, "b") == P(("data", "fsdp"))
  with pytest.raises(ValueError, match="more entries"):
    sharding.fit_spec(P(None, None, "fsdp"), (4, 4), sizes)


def test_param_specs_for_every_llama_variant():
  from jax.sharding import PartitionSpec as P
  from fgrpo_jax import sharding
  from fgrpo_jax.models import llama
  sizes = {"data": 1, "fsdp": 4, "tensor": 2}
  cfg = llama.ModelConfig(vocab_size=64, num_layers=2, hidden=32, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_hidden=64, qkv_bias=True, qk_norm=True)
  specs = sharding.param_specs(llama.param_shapes(cfg), sizes)
  assert specs["layers"]["q_bias"] == P(None, "tensor")
  assert specs["layers"]["q_norm"] == P()
  assert specs["layers"]["attn_norm"] == P()
  assert specs["layers"]["k_proj"] == P(None, "fsdp", "tensor")
  assert specs["layers"]["o_proj"] == P(None, "tensor", "fsdp")
  tied = llama.ModelConfig(vocab_size=50, num_layers=1, hidden=32, num_heads=2, num_kv_heads=1,
                           head_dim=8, mlp_hidden=64, tie_embeddings=True)
  specs = sharding.param_specs(llama.param_shapes(tied), sizes)
  assert "lm_head" not in specs
  assert specs["embed"] == P("tensor", "fsdp")  # 50 = 2 * 25: vocab still over tensor
  odd = llama.ModelConfig(vocab_size=51, num_layers=1, hidden=36, num_heads=3, num_kv_heads=1,
                          head_dim=6, mlp_hidden=60)
  specs = sharding.param_specs(llama.param_shapes(odd), sizes)
  assert specs["embed"] == P(None, "fsdp")  # vocab 51 odd, hidden 36 = 4 * 9
  assert specs["layers"]["q_proj"] == P(None, "fsdp", "tensor")  # 36 / 4, 18 / 2
  assert specs["layers"]["k_proj"] == P(None, "fsdp", "tensor")  # out = 6 = 2 * 3
  # Custom rules: first match wins.
  rules = ((r"layers/.*_proj", P(None, None, "tensor")),) + sharding.DEFAULT_RULES
  specs = sharding.param_specs(llama.param_shapes(cfg), sizes, rules)
  assert specs["layers"]["o_proj"] == P(None, None, "tensor")


def test_param_specs_for_qwen3_5():
  """The DeltaNet and gated-attention kernels get Megatron pairs like Llama's."""
  from jax.sharding import PartitionSpec as P
  from fgrpo_jax import sharding
  from fgrpo_jax.models import llama, qwen3_5
  cfg = llama.ModelConfig(
      arch="qwen3_5", vocab_size=64, num_layers=2, hidden=32, num_heads=4, num_kv_heads=2,
      head_dim=8, mlp_hidden=64, qk_norm=True, layer_types=("linear_attention", "full_attention"),
      linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
      linear_value_head_dim=4)
  specs = sharding.param_specs(qwen3_5.param_shapes(cfg), {"data": 1, "fsdp": 4, "tensor": 2})
  for key in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b"):
    assert specs["linear"][key] == P(None, "fsdp", "tensor"), key
  assert specs["linear"]["conv"] == P(None, None, "tensor")
  assert specs["linear"]["out_proj"] == P(None, "tensor", "fsdp")
  assert specs["linear"]["A_log"] == specs["linear"]["norm"] == P()
  assert specs["attn"]["q_proj"] == P(None, "fsdp", "tensor")
  assert specs["attn"]["o_proj"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["gate_proj"] == P(None, "fsdp", "tensor")
  # LoRA adapters of every target: lora_a @ lora_b lands in its kernel's layout.
  from fgrpo_jax.models import lora
  lcfg = lora.LoraConfig(2, 1.0, tuple(lora.TARGETS))
  adapters = sharding.param_specs(lora.adapter_shapes(cfg, lcfg), {"data": 1, "fsdp": 4,
                                                                     "tensor": 2})
  for group, targeted in adapters.items():
    for t, spec in targeted.items():
      _, fsdp_or_tensor_in, fsdp_or_tensor_out = specs[group][t]
      assert spec["lora_a"] == P(None, fsdp_or_tensor_in), (group, t)
      assert spec["lora_b"] == P(None, None, fsdp_or_tensor_out), (group, t)


def test_opt_state_shardings_follow_params():
  import jax
  import optax
  from jax.sharding import PartitionSpec as P
  from fgrpo_jax import sharding
  from fgrpo_jax.models import llama
  mesh = sharding.make_mesh({"data": -1})
  cfg = llama.ModelConfig(vocab_size=64, num_layers=1, hidden=32, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_hidden=64)
  shapes = llama.param_shapes(cfg)
  p_sh = sharding.param_shardings(shapes, mesh)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  o_shapes = jax.eval_shape(opt.init, shapes)
  o_sh = sharding.opt_state_shardings(o_shapes, p_sh, mesh, params_shapes=shapes)
  adam = o_sh[1][0]
  assert adam.mu["layers"]["down_proj"].spec == P(None, "tensor", "fsdp")
  assert adam.nu["embed"].spec == P("tensor", "fsdp")
  assert adam.count.spec == P()
  # Without param shapes the path suffix alone decides.
  o_sh2 = sharding.opt_state_shardings(o_shapes, p_sh, mesh)
  assert o_sh2[1][0].nu["layers"]["q_proj"].spec == P(None, "fsdp", "tensor")


def test_decoupled_pair_state_shardings_match_role_by_role():
  """{selector, ranker} params and opt states: each role's Adam moments get its own
  parameters' specs (q_proj and o_proj have the same shape but different specs)."""
  import jax
  import jax.numpy as jnp
  import optax
  from fgrpo_jax import sharding
  from fgrpo_jax import steps as steps_lib
  from fgrpo_jax.models import llama
  mesh = sharding.make_mesh({"data": -1})
  cfg = llama.ModelConfig(vocab_size=64, num_layers=1, hidden=32, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_hidden=64)  # heads x head_dim == hidden
  shapes = llama.param_shapes(cfg)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  pair = {"selector": shapes, "ranker": shapes}
  o_pair = {r: jax.eval_shape(opt.init, shapes) for r in pair}
  state = steps_lib.TrainState(pair, o_pair, jax.ShapeDtypeStruct((), jnp.int32))
  sh = sharding.train_state_shardings(state, mesh)
  for role in pair:
    adam = sh.opt_state[role][1][0]
    for name in ("q_proj", "o_proj", "down_proj"):
      assert adam.mu["layers"][name].spec == sh.params[role]["layers"][name].spec, name


def test_shard_batch_and_train_state_single_process():
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from fgrpo_jax import sharding
  from fgrpo_jax import steps as steps_lib
  from fgrpo_jax.models import llama
  mesh = sharding.make_mesh({"data": -1})
  batch = {"x": np.arange(jax.device_count() * 2 * 3).reshape(-1, 3)}
  out = sharding.shard_batch(batch, mesh)
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
  assert out["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert sharding.process_batch_slice(8) == slice(0, 8)
  cfg = llama.ModelConfig(vocab_size=32, num_layers=1, hidden=16, num_heads=2, num_kv_heads=1,
                          head_dim=8, mlp_hidden=32)
  params = sharding.init_sharded_params(cfg, jax.random.key(0), mesh)
  opt = optax.adam(1e-3)
  state = steps_lib.TrainState(params, sharding.init_opt_state(opt, params, mesh),
                           jnp.zeros((), jnp.int32))
  state = sharding.shard_train_state(state, mesh)
  assert isinstance(state, steps_lib.TrainState)
  assert state.step.sharding.spec == jax.sharding.PartitionSpec()
  host = sharding.gather_to_host(state.params)
  assert isinstance(host["embed"], np.ndarray)
  assert "layers/q_proj" in sharding.describe(state.params, mesh)


if __name__ == "__main__":
  _worker(*sys.argv[1:])
