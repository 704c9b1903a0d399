"""The comparison table: every algorithm, several seeds, one command.

    python -m fgrpo_jax.compare --config=configs/recsys.py --workdir=DIR
    python -m fgrpo_jax.compare --config=configs/recsys.py:ablate_lambda --workdir=DIR

Per seed, the SFT warm start is trained once and every algorithm starts from it
(equal budgets: the same warm start, the same number of sampled sequences). Each
run is an ordinary `fgrpo_jax.main` job in DIR/seed_<s>/<run>/, so it resumes if
interrupted. Writes DIR/compare.json (per run, per metric: mean, std, per-seed
values), DIR/compare.md (the table) and DIR/curves.png (per-phase rewards and
validation Hit@1 against steps, shaded across seeds). A sweep (`compare.sweep_field`,
the `ablate_*` variants) writes compare_<field>.{json,md} and curves_<field>.png instead
(compare_<field>_<algorithm>... when the swept algorithm is not fgrpo),
so several ablations can share one DIR and so its warm starts (a run that changes a field
of WARM_START_FIELDS, such as the slate size, trains a warm start of its own).
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fgrpo_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])

TABLE_KEYS = ("hit@1", "hit@3", "hit@5", "ndcg@1", "ndcg@3", "ndcg@5", "recall@3", "recall@5",
              "slate_recall", "slate_miss", "rank_drop", "rank_drop_given_hit")
# Validation columns (settings are chosen on these; the test table only reports).
VAL_KEYS = ("val_hit@1", "val_ndcg@5", "val_slate_recall", "val_slate_miss",
            "val_rank_drop_given_hit")


def _set_field(config, dotted: str, value):
  """config.<dotted> = value, converted to the field's type. Text for a bool or tuple
  field is read as a Python literal ("False", "(0.5, 1.0)"): bool("False") is True and
  tuple("(0.5, 1.0)") a tuple of characters."""
  *path, last = dotted.split(".")
  node = _get_field(config, ".".join(path)) if path else config
  current = node[last]
  if isinstance(current, str):
    node[last] = str(value)
    return
  if isinstance(value, str) and isinstance(current, (bool, tuple, list)):
    value = ast.literal_eval(value)
  node[last] = type(current)(value)


def _get_field(config, dotted: str):
  node = config
  for p in dotted.split("."):
    node = node[p]
  return node


def algorithm_lrs(config) -> dict[str, float]:
  """config.compare.lr ("fgrpo=1e-3,sft=3e-4") as {algorithm: rl.lr}."""
  from fgrpo_jax import config as config_lib
  out = {}
  for part in filter(None, (p.strip() for p in config.compare.get("lr", "").split(","))):
    name, sep, value = part.partition("=")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      sep = ""
    if not sep or name.strip() not in config_lib.ALGORITHMS:
      raise config_lib.ConfigError(f"config.compare.lr={config.compare.lr!r}: expected "
                                   f"algorithm=rate pairs separated by commas with algorithms "
                                   f"among {', '.join(config_lib.ALGORITHMS)}, got {part!r}")
  return out


# Top-level config fields that cannot change a run's results, so a finished run is reused
# whatever they hold (or whether its config had them): the comparison's own fields (seed
# range, run list), the profiler and TensorBoard switches and the name of the variant
# that built the config (two ablation variants share their warm starts).
NOT_RESULT_FIELDS = ("compare", "profile_steps", "tensorboard", "variant")


def finished_run(config, workdir: str, log) -> dict | None:
  """The eval.json of a run already finished in workdir with exactly this config (so a
  comparison can be resumed, or its seeds run as parallel processes and then gathered
  by one more call), else None: the run is (re)started."""
  from fgrpo_jax import train
  paths = [os.path.join(workdir, f) for f in ("eval.json", train.RUN_CONFIG, train.EVAL_EXAMPLES)]
  if not all(os.path.exists(p) for p in paths) or _other_config(config, workdir):
    return None
  with open(paths[0]) as f:
    result = json.load(f)
  log(f"[compare] {workdir}: finished with this config, reusing its eval.json")
  return result


# The reward fields an SFT-only run reads: the evaluation's NDCG gain. The others
# (coverage, lam, advantage, ...) shape only the RL loss.
WARM_START_REWARD_FIELDS = ("gain",)


def reusable_run_dir(config, seed_dir: str, run_dir: str, log) -> str:
  """Where config's run is (or is to be) in seed_dir: run_dir, unless run_dir holds no
  finished run of config and another run directory of the seed does (a sweep's run at the
  config's own value is the comparison's run of that algorithm, a comparison's run may be a
  rate sweep's): then that one, so no identical run is trained twice."""
  quiet = lambda *_: None  # noqa: E731
  if finished_run(config, run_dir, quiet) is not None or not os.path.isdir(seed_dir):
    return run_dir
  for name in sorted(os.listdir(seed_dir)):
    other = os.path.join(seed_dir, name)
    if (other != run_dir and ".stale-" not in name and os.path.isdir(other)
        and finished_run(config, other, quiet) is not None):
      log(f"[compare] {run_dir}: the same run is finished in {other}, reusing it")
      return other
  return run_dir


def _settings(config_dict: dict) -> dict:
  """The fields a run's results depend on. An SFT-only run (a warm start: rl.steps = 0)
  reads no other RL field and no reward field but WARM_START_REWARD_FIELDS, so runs that
  differ only there (an rl.lr sweep, a slate-reward ablation) share it."""
  out = {k: v for k, v in config_dict.items() if k not in NOT_RESULT_FIELDS}
  if out.get("rl", {}).get("steps") == 0:
    out["rl"] = {"steps": 0}
    out["reward"] = {k: v for k, v in out.get("reward", {}).items()
                     if k in WARM_START_REWARD_FIELDS}
  return out


def _other_config(config, workdir: str) -> bool:
  """Whether workdir holds a run (its run_config.json) whose results settings differ
  from config's (False when there is no run there yet)."""
  from fgrpo_jax import train
  path = os.path.join(workdir, train.RUN_CONFIG)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    stored = json.load(f).get("config", {})
  return _settings(stored) != _settings(json.loads(json.dumps(config.to_dict())))


def run_or_reuse(config, workdir: str, log) -> dict:
  """The run's eval.json: reused if workdir finished with exactly this config, else the
  run is trained, resuming an interrupted run of the same config. A workdir left by a
  run of another config (an earlier rate, say) is moved aside to <workdir>.stale-<n>
  first: resuming its checkpoints would report the old run under the new settings."""
  from fgrpo_jax import train
  result = finished_run(config, workdir, log)
  if result is not None:
    return result
  if _other_config(config, workdir):
    n = 0
    while os.path.exists(f"{workdir}.stale-{n}"):
      n += 1
    os.rename(workdir, f"{workdir}.stale-{n}")
    log(f"[compare] {workdir} holds a run of another config: moved to {workdir}.stale-{n}, "
        "training afresh")
  return train.run(config, workdir, log=log)


def read_warm_start(path: str) -> dict:
  """A warm start's row: its test metrics and final validation metrics."""
  with open(os.path.join(path, "eval.json")) as f:
    return {**json.load(f)["metrics"], **final_validation(read_history(path))}


def run_dirname(name: str) -> str:
  """A run's directory name: its table name with every character outside [A-Za-z0-9._=-]
  replaced ("fgrpo[lr=0.001]" -> "fgrpo_lr=0.001"). Brackets are glob patterns to the
  checkpoint library, which then fails to find (and finalize) the run's own files."""
  return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")


def planned_runs(config) -> list[tuple[str, dict]]:
  """(run name, {dotted field: value}) for each run of one seed. Each algorithm
  runs at its own rl.lr from config.compare.lr when given (the sweep's choice)."""
  cmp = config.compare
  lrs = algorithm_lrs(config)

  def fields(algorithm):
    return {"algorithm": algorithm, **({"rl.lr": lrs[algorithm]} if algorithm in lrs else {})}

  if cmp.sweep_field:
    return [(f"{cmp.sweep_algorithm}[{cmp.sweep_field.split('.')[-1]}={v}]",
             {**fields(cmp.sweep_algorithm), cmp.sweep_field: v})
            for v in cmp.sweep_values]
  return [(a, fields(a)) for a in cmp.algorithms.split(",") if a]


def summarize(values: list[float]) -> dict:
  arr = np.asarray(values, np.float64)
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
          "values": [float(v) for v in arr]}


def _aggregate(per_seed: dict[str, list[dict]]) -> dict:
  out = {}
  for name, results in per_seed.items():
    keys = sorted(set.intersection(*(set(r) for r in results)))
    out[name] = {k: summarize([r[k] for r in results]) for k in keys}
  return out


def markdown_table(agg: dict, order: list[str], seeds: int, keys=TABLE_KEYS) -> str:
  head = ["run"] + list(keys) + ["wall time (s)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in order:
    if name not in agg or not any(k in agg[name] for k in keys):
      continue
    row = [name]
    for k in keys:
      m = agg[name].get(k)
      row.append("" if m is None else f"{m['mean']:.3f} ± {m['std']:.3f}")
    wt = agg[name].get("wall_time_s")
    row.append("" if wt is None else f"{wt['mean']:.0f}")
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  lines.append(f"Mean ± sample std over {seeds} seed(s); references are score-based policies "
               "(slate = top-k, ranking = top-m) on the same test examples.")
  return "\n".join(lines)


PAIRED_KEYS = ("hit@1", "ndcg@5")
WARM = "sft warm start"


def paired_difference(a, b, resamples: int = 2000, seed: int = 0) -> dict:
  """Mean of a - b over the same examples, with a 95% bootstrap interval.

  a, b: per-seed lists of per-example values [N_s] (paired: example i of a and of b
  is the same test example). The statistic is the mean over seeds of the per-seed
  mean difference; each bootstrap draw resamples the examples of every seed with
  replacement (the seeds' warm starts and test examples are fixed, so the interval
  is over test examples, as the comparison's claim is about them).
  """
  rng = np.random.default_rng(seed)
  diffs = [np.asarray(x, np.float64) - np.asarray(y, np.float64) for x, y in zip(a, b)]
  per_seed = [float(d.mean()) for d in diffs]
  draws = np.zeros(resamples)
  for d in diffs:
    draws += d[rng.integers(0, d.size, (resamples, d.size))].mean(-1)
  draws /= len(diffs)
  lo, hi = np.percentile(draws, [2.5, 97.5])
  return {"mean": float(np.mean(per_seed)), "lo": float(lo), "hi": float(hi),
          "per_seed": per_seed}


# Fields the SFT warm start depends on. A run that changes one starts from a warm start of
# its own (the slate-size ablation: SFT writes slates of the size RL samples).
WARM_START_FIELDS = ("rollout.slate_size", "rollout.rank_size", "data.", "model.", "sft.",
                     *(f"reward.{f}" for f in WARM_START_REWARD_FIELDS))


def own_warm_start(config, fields: dict) -> dict:
  """The fields of a run ({dotted field: value}) that change its SFT warm start from
  config's (empty: the run starts from the seed's shared warm start)."""
  own = {}
  for f, v in fields.items():
    if f.startswith(WARM_START_FIELDS):
      trial = copy.deepcopy(config)
      _set_field(trial, f, v)
      if _get_field(trial, f) != _get_field(config, f):
        own[f] = v
  return own


def warm_start_label(own: dict) -> str:
  """What sets a run's own warm start apart ("slate_size=5"): its table name is
  WARM[label], its directory warm_start_<label>."""
  return ",".join(f"{f.split('.')[-1]}={v}" for f, v in own.items())


def sweep_lead(config) -> str:
  """The run every other is paired against: F-GRPO, or in a sweep the run at the
  config's own value of the swept field (the ablation's reference)."""
  cmp = config.compare
  if not cmp.sweep_field:
    return "fgrpo"
  current = _get_field(config, cmp.sweep_field)
  for name, fields in planned_runs(config):
    if fields[cmp.sweep_field] == current:
      return name
  return ""


def planned_pairs(names: list[str], base: str | dict = WARM, lead: str = "fgrpo"
                  ) -> list[tuple[str, str]]:
  """(a, b) pairs of the paired table: every run against `base` (the warm start; a dict
  names each run's own), and `lead` (F-GRPO) against every other run."""
  pairs = [(n, base.get(n, WARM) if isinstance(base, dict) else base) for n in names]
  if lead in names:
    pairs += [(lead, n) for n in names if n != lead]
  return pairs


def paired_differences(examples: dict[str, list], pairs: list[tuple[str, str]]) -> dict:
  """{"a − b": {metric: paired_difference}} of the pairs whose runs have per-example
  metrics for every seed; examples: run -> per seed -> {metric: [N]} (or None)."""
  paired = {}
  for a, b in pairs:
    ea, eb = examples.get(a, []), examples.get(b, [])
    if ea and eb and all(x is not None for x in ea + eb):
      paired[f"{a} − {b}"] = {k: paired_difference([x[k] for x in ea], [y[k] for y in eb])
                              for k in PAIRED_KEYS}
  return paired


def paired_table(paired: dict) -> str:
  lines = ["| a − b | " + " | ".join(f"{k}: mean [95% CI] (per seed)" for k in PAIRED_KEYS)
           + " |", "|---|" + "---|" * len(PAIRED_KEYS)]
  for pair, by_key in paired.items():
    cells = []
    for k in PAIRED_KEYS:
      d = by_key[k]
      seeds = ", ".join(f"{v:+.3f}" for v in d["per_seed"])
      cells.append(f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] ({seeds})")
    lines.append(f"| {pair} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Paired over the same test examples of each seed; 95% bootstrap interval over "
               "test examples (2,000 resamples) of the mean over seeds.")
  return "\n".join(lines)


# RL-stage diagnostics of compare.md: what the two algorithms' updates see (the issue's
# "advantage variances, the reward correlation, per-phase gradient norms").
DIAG_KEYS = ("reward_gen_mean", "reward_rank_mean", "reward_corr", "adv_gen_var", "adv_rank_var",
             "adv_gen_zero_groups", "grad_norm_gen", "grad_norm_rank", "entropy")


def stage_diagnostics(history: list[dict], keys=DIAG_KEYS) -> dict[str, float]:
  """Mean of each logged training diagnostic over the run's post-warm-start stage (every
  logged step after SFT; the keys a run does not log are left out)."""
  out = {}
  for k in keys:
    vals = [r[k] for r in history if r.get("stage") != "sft" and k in r]
    if vals:
      out[k] = float(np.mean(vals))
  return out


def diagnostics_table(histories: dict[str, list[list[dict]]], order: list[str]) -> tuple[dict, str]:
  """({run: {key: summary over seeds}}, markdown) of stage_diagnostics per run."""
  agg = _aggregate({name: [stage_diagnostics(h) for h in histories[name]]
                    for name in order if name in histories})
  agg = {n: v for n, v in agg.items() if v}
  keys = [k for k in DIAG_KEYS if any(k in v for v in agg.values())]
  lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, v in agg.items():
    lines.append(f"| {name} | " + " | ".join(
        f"{v[k]['mean']:.3f}" if k in v else "" for k in keys) + " |")
  lines.append("")
  lines.append("Means over every logged step of the RL stage, then over seeds. reward_*_mean: "
               "sampled rewards; reward_corr: correlation of R_gen and R_rank within groups "
               "where both vary; adv_*_var: advantage variance per phase; adv_gen_zero_groups: "
               "share of groups whose slate advantage is zero (every rollout hit or every "
               "one missed); grad_norm_*: gradient norm of each phase's loss.")
  return agg, "\n".join(lines)


def _load_examples(workdir: str):
  from fgrpo_jax import train
  path = os.path.join(workdir, train.EVAL_EXAMPLES)
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    return {k: z[k] for k in PAIRED_KEYS if k in z}


def final_validation(history: list[dict]) -> dict:
  """The last validation metrics of a run's history, keyed val_<metric>."""
  rows = [r for r in history if "val_hit@1" in r]
  return {k: v for k, v in rows[-1].items() if k.startswith("val_")} if rows else {}


def read_history(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(histories: dict[str, list[list[dict]]], path: str) -> None:
  """Per-phase RL rewards and validation Hit@1 against steps, one line per run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = (("reward_gen_mean", "R_gen (slate coverage)"),
            ("reward_rank_mean", "R_rank (NDCG of the ranking)"),
            ("val_hit@1", "validation Hit@1"))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, (key, title) in zip(axes, panels):
    for name, seeds in histories.items():
      curves = []
      for hist in seeds:
        pts = {r["step"]: r[key] for r in hist if key in r and r["stage"] != "sft"}
        if pts:
          curves.append(pts)
      if not curves:
        continue
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      if not steps:
        continue
      vals = np.array([[c[s] for s in steps] for c in curves])
      mean, std = vals.mean(0), vals.std(0)
      ax.plot(steps, mean, label=name, marker="o" if len(steps) < 10 else None)
      ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_title(title)
    ax.set_xlabel("step after the SFT warm start")
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=8)
  fig.tight_layout()
  from fgrpo_jax import logs
  logs.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
  plt.close(fig)


def output_stem(config) -> str:
  """compare, or for a sweep compare_<field> (compare_<field>_<algorithm> when the swept
  algorithm is not fgrpo): several sweeps can share one workdir, and so its warm starts,
  without overwriting each other's tables (a per-algorithm rl.lr sweep, say)."""
  cmp = config.compare
  if not cmp.sweep_field:
    return "compare"
  stem = f"compare_{cmp.sweep_field.split('.')[-1]}"
  return stem if cmp.sweep_algorithm == "fgrpo" else f"{stem}_{cmp.sweep_algorithm}"


def run_compare(config, workdir: str, log=print) -> dict:
  from fgrpo_jax import config as config_lib
  from fgrpo_jax import logs, pointwise, workdir_lock
  from fgrpo_jax.data import arrays as arrays_lib
  from fgrpo_jax.data import tasks as tasks_lib
  workdir_lock.prepare_workdir(workdir)
  runs = planned_runs(config)
  for name, fields in runs:  # fail fast on a bad variant, before hours of training
    trial = copy.deepcopy(config)
    for f, v in fields.items():
      _set_field(trial, f, v)
    config_lib.validate_config(trial)
  per_seed: dict[str, list[dict]] = {}
  histories: dict[str, list[list[dict]]] = {}
  examples: dict[str, list[dict]] = {}  # run -> per seed -> {metric: [N]}
  warm_start_names: dict[str, str] = {}  # run -> its own warm start's table name
  order = [n for n, _ in runs]
  t0 = time.time()
  first = config.compare.get("first_seed", 0)
  for seed in range(first, first + config.compare.seeds):
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    warm = os.path.join(seed_dir, "warm_start")
    base = copy.deepcopy(config)
    base.seed = seed

    def train_warm_start(cfg, path, name):
      warm_cfg = copy.deepcopy(cfg)
      warm_cfg.rl.steps = 0
      warm_cfg.sft.init_from = base.sft.init_from  # not the warm start being trained
      log(f"== seed {seed}: {name}")
      run_or_reuse(warm_cfg, path, log)

    train_warm_start(base, warm, WARM)
    own_warm_starts_done = set()  # this seed's
    for name, fields in runs:
      cfg = copy.deepcopy(base)
      for f, v in fields.items():
        _set_field(cfg, f, v)
      own = own_warm_start(base, fields)
      cfg.sft.init_from = warm
      if own:  # e.g. the slate-size ablation: SFT on slates of this run's size
        label = warm_start_label(own)
        warm_name = warm_start_names[name] = f"{WARM}[{label}]"
        cfg.sft.init_from = os.path.join(seed_dir, "warm_start_" + run_dirname(label))
        if warm_name not in own_warm_starts_done:
          own_warm_starts_done.add(warm_name)
          train_warm_start(cfg, cfg.sft.init_from, warm_name)
          per_seed.setdefault(warm_name, []).append(read_warm_start(cfg.sft.init_from))
          examples.setdefault(warm_name, []).append(_load_examples(cfg.sft.init_from))
      run_dir = reusable_run_dir(cfg, seed_dir, os.path.join(seed_dir, run_dirname(name)), log)
      log(f"== seed {seed}: {name}")
      result = run_or_reuse(cfg, run_dir, log)
      history = read_history(run_dir)
      per_seed.setdefault(name, []).append({**result["metrics"], **final_validation(history),
                                            "wall_time_s": result["wall_time_s"]})
      histories.setdefault(name, []).append(history)
      examples.setdefault(name, []).append(_load_examples(run_dir))
    # References on the same test examples (they need no training but the pointwise one).
    with open(os.path.join(warm, "eval.json")) as f:
      warm_result = json.load(f)
    per_seed.setdefault(WARM, []).append(read_warm_start(warm))
    examples.setdefault(WARM, []).append(_load_examples(warm))
    if warm_result["oracle"]:
      per_seed.setdefault("oracle", []).append(warm_result["oracle"])
    for ref, metrics in warm_result["references"].items():
      per_seed.setdefault(ref, []).append(metrics)
    if config.compare.pointwise and warm_result["task"] == "recsys":
      task = tasks_lib.load_task(base, warm, log)
      mcfg = config_lib.model_config(base, task.vocab_size)
      t_pw = time.time()
      params = pointwise.train_pointwise(task, base, mcfg,
                                         steps=base.sft.steps + base.rl.steps, log=log)
      test = arrays_lib.subset(task.splits["test"], base.eval.test_examples, base.seed + 1)
      from fgrpo_jax import evaluate
      scores = pointwise.pointwise_scores(params, task, test, mcfg)
      m = evaluate.evaluate_scores(scores, test, base.rollout.slate_size, base.rollout.rank_size,
                                   base.seed, base.reward.gain)
      m["wall_time_s"] = time.time() - t_pw
      per_seed.setdefault("pointwise (SASRec-like)", []).append(m)
  order += [WARM, *dict.fromkeys(warm_start_names.values()), "pointwise (SASRec-like)",
            "oracle", "popularity", "random", "bm25"]
  agg = _aggregate(per_seed)
  paired = paired_differences(examples, planned_pairs([n for n, _ in runs], warm_start_names,
                                                      lead=sweep_lead(config)))
  diagnostics, diag_table = diagnostics_table(histories, order)
  result = {"config_variant": config.get("variant", ""), "seeds": config.compare.seeds,
            "runs": agg, "order": [n for n in order if n in agg], "paired": paired,
            "diagnostics": diagnostics, "wall_time_s": round(time.time() - t0, 1)}
  stem = output_stem(config)
  curves = stem.replace("compare", "curves", 1) + ".png"
  logs.write_json_atomic(os.path.join(workdir, f"{stem}.json"), result)
  table = markdown_table(agg, order, config.compare.seeds)
  val_table = markdown_table(agg, order, config.compare.seeds, keys=VAL_KEYS)
  logs.write_text_atomic(
      os.path.join(workdir, f"{stem}.md"),
      table + "\n\nPaired differences on the test examples:\n\n" + paired_table(paired)
      + "\n\nValidation (the split settings are chosen on):\n\n" + val_table
      + "\n\nRL-stage diagnostics:\n\n" + diag_table + "\n")
  plot_curves(histories, os.path.join(workdir, curves))
  log(table)
  log(f"[compare] {time.time() - t0:.0f}s, wrote {stem}.json, {stem}.md, {curves} "
      f"in {workdir}")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with cli.user_errors():
    run_compare(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  cli.precheck()  # a bad --config file or field: one line, before absl's traceback
  app.run(main)
