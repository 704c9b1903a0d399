"""Tests for fgrpo_jax/compare.py and the baselines it runs (tiny, in-process)."""

import copy
import json
import os

import jax
import numpy as np
import pytest

from configs import recsys
from fgrpo_jax import compare, evaluate, rollout, train
from fgrpo_jax import config as config_lib
from fgrpo_jax.data import tasks

ALGORITHMS = ("fgrpo", "grpo", "decoupled", "decoupled_sft", "sft")


def _tiny(**sections):
  c = recsys.get_config("tiny")
  c.sft.steps, c.rl.steps = 8, 3
  c.eval.update(every=3, val_examples=32, test_examples=64)
  c.compare.seeds = 1
  for dotted, value in sections.items():
    compare._set_field(c, dotted.replace("__", "."), value)
  return c


def test_compare_writes_every_algorithm_and_metric(tmp_path):
  c = _tiny()
  result = compare.run_compare(c, str(tmp_path), log=lambda *_: None)
  with open(tmp_path / "compare.json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  runs = saved["runs"]
  for name in ALGORITHMS + ("oracle", "random", "popularity", "pointwise (SASRec-like)",
                            "sft warm start"):
    assert name in runs, name
    for key in compare.TABLE_KEYS:
      entry = runs[name][key]
      assert len(entry["values"]) == 1  # one per seed
      assert entry["mean"] == entry["values"][0]
  table = (tmp_path / "compare.md").read_text()
  assert all(f"| {a} |" in table for a in ALGORITHMS)
  # Paired differences on the same test examples, and the validation table.
  for pair in ["fgrpo − sft warm start", "fgrpo − grpo", "grpo − sft warm start"]:
    d = saved["paired"][pair]["hit@1"]
    assert d["lo"] <= d["mean"] <= d["hi"] and len(d["per_seed"]) == 1
    assert f"| {pair} |" in table
  a = np.load(tmp_path / "seed_0" / "fgrpo" / train.EVAL_EXAMPLES)["hit@1"]
  b = np.load(tmp_path / "seed_0" / "grpo" / train.EVAL_EXAMPLES)["hit@1"]
  assert abs(saved["paired"]["fgrpo − grpo"]["hit@1"]["mean"] - (a.mean() - b.mean())) < 1e-9
  assert runs["fgrpo"]["hit@1"]["mean"] == a.mean()
  assert "val_hit@1" in runs["fgrpo"] and "val_hit@1" in runs["sft warm start"]
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  # The RL-stage diagnostics of the two sequence-level algorithms.
  assert "RL-stage diagnostics" in table
  for a in ("fgrpo", "grpo"):
    d = saved["diagnostics"][a]
    assert {"reward_corr", "adv_gen_var", "adv_rank_var", "grad_norm_gen",
            "grad_norm_rank"} <= set(d), a
    assert len(d["adv_gen_var"]["values"]) == 1
  # Every algorithm started from the same warm start of its seed.
  for seed in range(1):
    for a in ALGORITHMS:
      assert os.path.isdir(tmp_path / f"seed_{seed}" / a / "ckpt")
      assert not os.path.isdir(tmp_path / f"seed_{seed}" / a / "ckpt" / "sft")


def test_finished_runs_are_reused_only_with_the_same_results_config(tmp_path):
  c = _tiny()
  stored = json.loads(json.dumps(c.to_dict()))
  del stored["profile_steps"]  # a run from before the field existed
  stored["compare"]["seeds"] = 5
  stored["variant"] = "ablate_lambda"  # another ablation's warm start: the same settings
  (tmp_path / train.RUN_CONFIG).write_text(json.dumps({"config": stored}))
  (tmp_path / "eval.json").write_text(json.dumps({"metrics": {"hit@1": 0.5}}))
  np.savez(tmp_path / train.EVAL_EXAMPLES, hit1=np.zeros(3))
  assert compare.finished_run(c, str(tmp_path), lambda *_: None)["metrics"]["hit@1"] == 0.5
  c.rl.lr *= 2  # a field that changes results: the run is redone
  assert compare.finished_run(c, str(tmp_path), lambda *_: None) is None
  c.rl.lr /= 2
  # A warm start (no RL steps) is shared by runs that differ only in RL fields.
  c.rl.steps = stored["rl"]["steps"] = 0
  (tmp_path / train.RUN_CONFIG).write_text(json.dumps({"config": stored}))
  c.rl.lr *= 2
  assert compare.finished_run(c, str(tmp_path), lambda *_: None)["metrics"]["hit@1"] == 0.5
  c.reward.coverage, c.reward.lam = "ndcg", 2.0  # nor do the RL stage's reward fields
  assert compare.finished_run(c, str(tmp_path), lambda *_: None)["metrics"]["hit@1"] == 0.5
  c.reward.gain = "linear" if c.reward.gain != "linear" else "exp"
  assert compare.finished_run(c, str(tmp_path), lambda *_: None) is None  # its eval's NDCG
  c.reward.gain, c.reward.lam, c.rl.lr = (stored["reward"]["gain"], stored["reward"]["lam"],
                                          stored["rl"]["lr"])
  assert c.reward.coverage != stored["reward"]["coverage"]
  c.rl.steps = stored["rl"]["steps"] = 3  # an RL run is redone when its slate reward changes
  (tmp_path / train.RUN_CONFIG).write_text(json.dumps({"config": stored}))
  assert compare.finished_run(c, str(tmp_path), lambda *_: None) is None
  c.rl.steps = stored["rl"]["steps"] = 0
  (tmp_path / train.RUN_CONFIG).write_text(json.dumps({"config": stored}))
  c.sft.lr *= 2  # but not by runs that change its own training
  assert compare.finished_run(c, str(tmp_path), lambda *_: None) is None
  os.remove(tmp_path / train.EVAL_EXAMPLES)  # an unfinished run
  assert compare.finished_run(c, str(tmp_path), lambda *_: None) is None


def _fake_finished_run(path, config, hit1):
  path.mkdir(parents=True)
  (path / train.RUN_CONFIG).write_text(json.dumps({"config": config.to_dict()}))
  (path / "eval.json").write_text(json.dumps({"metrics": {"hit@1": hit1}}))
  np.savez(path / train.EVAL_EXAMPLES, hit1=np.zeros(3))


def test_an_identical_finished_run_of_the_seed_is_reused_from_its_directory(tmp_path):
  c = _tiny()
  seed_dir = tmp_path / "seed_0"
  swept = copy.deepcopy(c)
  swept.rl.lr = 3e-5
  _fake_finished_run(seed_dir / "fgrpo_lr=3e-05", swept, 0.7)  # a rate sweep's run
  _fake_finished_run(seed_dir / "fgrpo_lr=1e-05.stale-0", c, 0.1)  # moved aside: never used
  logged = []
  # The comparison's fgrpo at 3e-5 is that run; at the config's own rate nothing is finished.
  assert compare.reusable_run_dir(swept, str(seed_dir), str(seed_dir / "fgrpo"),
                                  logged.append) == str(seed_dir / "fgrpo_lr=3e-05")
  assert len(logged) == 1
  assert compare.reusable_run_dir(c, str(seed_dir), str(seed_dir / "fgrpo"),
                                  logged.append) == str(seed_dir / "fgrpo")
  # A run already finished in its own directory stays there.
  _fake_finished_run(seed_dir / "fgrpo", swept, 0.7)
  assert compare.reusable_run_dir(swept, str(seed_dir), str(seed_dir / "fgrpo"),
                                  logged.append) == str(seed_dir / "fgrpo")
  assert len(logged) == 1
  # No run of another config (the warm start, the sweep's other runs) is taken for it.
  warm = copy.deepcopy(swept)
  warm.rl.steps = 0
  _fake_finished_run(seed_dir / "warm_start", warm, 0.6)
  other = copy.deepcopy(swept)
  other.reward.lam = 2.0
  assert compare.reusable_run_dir(other, str(seed_dir), str(seed_dir / "fgrpo_lam=2.0"),
                                  logged.append) == str(seed_dir / "fgrpo_lam=2.0")


def test_a_run_of_another_config_is_moved_aside_not_resumed(tmp_path, monkeypatch):
  """A run dir left by another rl.lr (its checkpoints would be resumed at their last step
  and reported under the new rate) is renamed; one of the same config is resumed in place."""
  trained = []
  monkeypatch.setattr(train, "run", lambda cfg, d, log: trained.append(d) or {"metrics": {}})
  c = _tiny()
  run_dir = tmp_path / "fgrpo"
  (run_dir / "ckpt").mkdir(parents=True)
  stored = {"config": json.loads(json.dumps(c.to_dict()))}
  (run_dir / train.RUN_CONFIG).write_text(json.dumps(stored))
  compare.run_or_reuse(c, str(run_dir), lambda *_: None)  # same config, unfinished: resumed
  assert (run_dir / "ckpt").is_dir() and not list(tmp_path.glob("fgrpo.stale-*"))
  c.rl.lr *= 2
  logs = []
  compare.run_or_reuse(c, str(run_dir), logs.append)
  assert (tmp_path / "fgrpo.stale-0" / "ckpt").is_dir() and not run_dir.exists()
  assert "another config" in logs[0] and trained == [str(run_dir)] * 2


def test_paired_runs_script_pairs_the_same_examples(tmp_path, load_script):
  script = load_script("paired_runs")
  rng = np.random.default_rng(0)
  runs = {}
  for name in ("base", "a", "b"):
    d = tmp_path / name
    d.mkdir()
    runs[name] = {"hit@1": (rng.random(50) < 0.3).astype(np.float32),
                  "ndcg@5": rng.random(50).astype(np.float32)}
    np.savez(d / train.EVAL_EXAMPLES, **runs[name])
  table = script.main([f"--base=base={tmp_path / 'base'}", f"a={tmp_path / 'a'}",
                       f"b={tmp_path / 'b'}"])
  rows = {line.split("|")[1].strip(): line for line in table.splitlines() if " − " in line}
  assert set(rows) == {"a − base", "b − base", "a − b"}
  want = float(np.mean(runs["a"]["hit@1"] - runs["b"]["hit@1"]))
  assert f"{want:+.4f} [" in rows["a − b"]
  (tmp_path / "short").mkdir()
  np.savez(tmp_path / "short" / train.EVAL_EXAMPLES, **{k: v[:10] for k, v in runs["a"].items()})
  with pytest.raises(SystemExit, match="different numbers"):
    script.main([f"--base=base={tmp_path / 'base'}", f"s={tmp_path / 'short'}"])


def test_paired_runs_script_averages_seeds(tmp_path, load_script):
  script = load_script("paired_runs")
  rng = np.random.default_rng(1)
  dirs, hits = {}, {}
  for name in ("base", "a"):
    for seed, n in enumerate((40, 60)):  # seeds may hold different numbers of examples
      d = tmp_path / f"{name}_{seed}"
      d.mkdir()
      hits[name, seed] = (rng.random(n) < 0.5).astype(np.float32)
      np.savez(d / train.EVAL_EXAMPLES, **{"hit@1": hits[name, seed],
                                           "ndcg@5": rng.random(n).astype(np.float32)})
      dirs.setdefault(name, []).append(str(d))
  table = script.main([f"--base=base={','.join(dirs['base'])}", f"a={','.join(dirs['a'])}"])
  row = next(line for line in table.splitlines() if "a − base" in line)
  # the mean over seeds of each seed's mean difference, not the pooled mean
  want = np.mean([np.mean(hits["a", s] - hits["base", s]) for s in (0, 1)])
  assert f"{want:+.4f} [" in row
  with pytest.raises(SystemExit, match="one per seed"):
    script.main([f"--base=base={','.join(dirs['base'])}", f"a={dirs['a'][0]}"])


def test_set_field_reads_text_as_the_field_type():
  c = recsys.get_config("tiny")
  compare._set_field(c, "compare.pointwise", "False")  # bool("False") would be True
  compare._set_field(c, "rl.lr", "3e-4")
  compare._set_field(c, "rl.steps", "7")
  compare._set_field(c, "sft.slate_order", "relevant_first")
  compare._set_field(c, "compare.sweep_values", "(0.5, 2.0)")
  assert c.compare.pointwise is False and c.rl.lr == 3e-4 and c.rl.steps == 7
  assert c.sft.slate_order == "relevant_first" and c.compare.sweep_values == (0.5, 2.0)
  compare._set_field(c, "compare.pointwise", True)  # typed values pass through
  assert c.compare.pointwise is True


def test_aggregate_over_seeds():
  per_seed = {"a": [{"hit@1": 0.2, "x": 1.0}, {"hit@1": 0.4}]}
  agg = compare._aggregate(per_seed)
  assert set(agg["a"]) == {"hit@1"}  # only keys every seed has
  assert abs(agg["a"]["hit@1"]["mean"] - 0.3) < 1e-12
  assert abs(agg["a"]["hit@1"]["std"] - np.std([0.2, 0.4], ddof=1)) < 1e-12
  assert agg["a"]["hit@1"]["values"] == [0.2, 0.4]


def test_sweep_run_directories_are_plain_names(tmp_path):
  """A sweep's runs ("fgrpo[slate_size=3]") live in directories without glob characters,
  and their checkpoints are complete: a second process reads them back (eval mode). A
  slate size other than the config's starts from a warm start trained at that size; the
  run at the config's own value is the one the others are paired with."""
  assert compare.run_dirname("fgrpo[lr=0.001]") == "fgrpo_lr=0.001"
  assert compare.run_dirname("decoupled/x y") == "decoupled_x_y"
  # The tiny comparison's step counts: the runs at slate size 4 reuse the programs the
  # test above compiled (the schedules' lengths are constants in them).
  c = _tiny(**{"compare__sweep_field": "rollout.slate_size", "compare__sweep_values": (3, 4),
               "compare__pointwise": False})
  assert c.rollout.slate_size == 4
  first = compare.run_compare(c, str(tmp_path), log=lambda *_: None)
  # A second call finds every run finished with the same config and reuses it.
  lines = []
  again = compare.run_compare(c, str(tmp_path), log=lines.append)
  assert sum("reusing its eval.json" in l for l in lines) == 4  # 2 warm starts + 2 runs
  assert again["runs"] == first["runs"]
  seed_dir = tmp_path / "seed_0"
  assert sorted(os.listdir(seed_dir)) == ["fgrpo_slate_size=3", "fgrpo_slate_size=4",
                                          "warm_start", "warm_start_slate_size=3"]
  configs = {}
  for d in os.listdir(seed_dir):
    with open(seed_dir / d / train.RUN_CONFIG) as f:
      configs[d] = json.load(f)["config"]
  assert configs["warm_start_slate_size=3"]["rollout"]["slate_size"] == 3
  assert configs["warm_start_slate_size=3"]["rl"]["steps"] == 0
  assert configs["fgrpo_slate_size=3"]["sft"]["init_from"] == str(
      seed_dir / "warm_start_slate_size=3")
  assert configs["fgrpo_slate_size=4"]["sft"]["init_from"] == str(seed_dir / "warm_start")
  assert "sft warm start[slate_size=3]" in first["order"]
  with open(tmp_path / "compare_slate_size.json") as f:  # named after the swept field
    assert json.load(f)["paired"] == first["paired"]
  assert not (tmp_path / "compare.json").exists()
  assert set(first["paired"]) == {
      "fgrpo[slate_size=3] − sft warm start[slate_size=3]",
      "fgrpo[slate_size=4] − sft warm start",
      "fgrpo[slate_size=4] − fgrpo[slate_size=3]"}
  run = seed_dir / "fgrpo_slate_size=3"
  params = os.listdir(run / "ckpt" / "rl" / str(c.rl.steps) / "params")
  assert "manifest.ocdbt" in params  # finalized (not only the per-process parts)
  c.algorithm, c.mode = "fgrpo", "eval"
  c.rollout.slate_size = 3
  c.eval.allow_random = False
  result = train.run(c, str(run), log=lambda *_: None)  # fails if the params are unreadable
  with open(run / "eval.json") as f:
    assert json.load(f)["metrics"] == result["metrics"]


def test_ablation_variant_sweeps_one_field():
  c = recsys.get_config("tiny,ablate_lambda")
  runs = compare.planned_runs(c)
  assert [fields["reward.lam"] for _, fields in runs] == [0.25, 0.5, 1.0, 2.0]
  assert all(fields["algorithm"] == "fgrpo" for _, fields in runs)
  assert len(compare.planned_runs(recsys.get_config("ablate_slate"))) == 3


def test_decoupled_ranker_sees_only_the_selector_slate():
  c = _tiny()
  task = tasks.load_task(c)
  layout = task.layout_fn(c.rollout.slate_size, c.rollout.rank_size)
  cfg = config_lib.model_config(c, task.vocab_size)
  from fgrpo_jax.models import llama
  sel = llama.init_params(cfg, jax.random.key(1))
  rnk = llama.init_params(cfg, jax.random.key(2))
  arrays = {k: v[:16] for k, v in task.splits["test"].items()}
  batch = {k: jax.numpy.asarray(arrays[k]) for k in ("prompt", "prompt_mask", "cand_tokens",
                                                     "pool_mask")}
  pair = evaluate.greedy_rollout({"selector": sel, "ranker": rnk}, batch, cfg=cfg,
                                 layout=layout)
  alone_sel = evaluate.greedy_rollout(sel, batch, cfg=cfg, layout=layout)
  alone_rnk = evaluate.greedy_rollout(rnk, batch, cfg=cfg, layout=layout)
  # The slate is the selector's; the ranking is the ranker's over that slate.
  np.testing.assert_array_equal(pair.slate, alone_sel.slate)
  assert not np.array_equal(alone_rnk.slate, alone_sel.slate)
  for b in range(16):
    ranked, slate = np.asarray(pair.ranking[b, 0]), np.asarray(pair.slate[b, 0])
    assert set(ranked.tolist()) <= set(slate.tolist())
  forced = rollout.sample(rnk, batch, jax.random.key(0), cfg=cfg, layout=layout, group_size=1,
                          greedy=True, given_slate=alone_sel.slate[:, 0])
  np.testing.assert_array_equal(pair.ranking, forced.ranking)


def test_paired_difference_against_normal_approximation():
  rng = np.random.default_rng(0)
  same = [rng.random(500) < 0.4]
  d = compare.paired_difference(same, same)
  assert d["mean"] == d["lo"] == d["hi"] == 0.0
  # A constant shift is recovered exactly, with no spread.
  d = compare.paired_difference([np.full(300, 0.7)], [np.full(300, 0.2)])
  assert abs(d["mean"] - 0.5) < 1e-12 and abs(d["hi"] - d["lo"]) < 1e-12
  # Two seeds of noisy paired hits: the interval matches mean +- 1.96 standard errors.
  a = [(rng.random(2000) < 0.45).astype(float) for _ in range(2)]
  b = [np.where(rng.random(2000) < 0.8, x, 1 - x) for x in a]
  d = compare.paired_difference(a, b, resamples=4000)
  diffs = [x - y for x, y in zip(a, b)]
  mean = np.mean([x.mean() for x in diffs])
  se = np.sqrt(sum(x.var() / x.size for x in diffs)) / 2
  assert abs(d["mean"] - mean) < 1e-12
  assert abs((d["hi"] - d["lo"]) - 2 * 1.96 * se) < 0.2 * 2 * 1.96 * se
  assert d["per_seed"] == [x.mean() for x in diffs]


def test_stage_diagnostics_average_the_stage_after_the_warm_start():
  sft_row = {"stage": "sft", "step": 10, "entropy": 9.0, "reward_corr": 9.0}
  seed0 = [sft_row, {"stage": "rl", "step": 10, "entropy": 1.0, "reward_corr": 0.5},
           {"stage": "rl", "step": 20, "entropy": 3.0}, {"stage": "rl", "step": 20,
                                                         "val_hit@1": 0.3}]
  seed1 = [sft_row, {"stage": "rl", "step": 10, "entropy": 4.0, "reward_corr": 0.1}]
  assert compare.stage_diagnostics(seed0) == {"entropy": 2.0, "reward_corr": 0.5}
  agg, table = compare.diagnostics_table({"fgrpo": [seed0, seed1], "sft": [[sft_row]]},
                                         ["fgrpo", "sft", "grpo"])
  assert set(agg) == {"fgrpo"}  # no post-warm-start diagnostics: no row
  assert agg["fgrpo"]["entropy"]["mean"] == 3.0 and agg["fgrpo"]["entropy"]["values"] == [2.0, 4.0]
  assert abs(agg["fgrpo"]["reward_corr"]["mean"] - 0.3) < 1e-12
  assert "| fgrpo | 0.300 | 3.000 |" in table


def test_sweeps_of_different_algorithms_write_different_tables():
  """A per-algorithm rl.lr sweep in one workdir: each algorithm's table has its own
  name (the fgrpo ablations keep compare_<field>)."""
  c = _tiny()
  assert compare.output_stem(c) == "compare"
  c.compare.sweep_field, c.compare.sweep_values = "rl.lr", (1e-4, 3e-4)
  stems = {}
  for algorithm in ("fgrpo", "grpo", "sft"):
    c.compare.sweep_algorithm = algorithm
    stems[algorithm] = compare.output_stem(c)
  assert stems == {"fgrpo": "compare_lr", "grpo": "compare_lr_grpo", "sft": "compare_lr_sft"}
