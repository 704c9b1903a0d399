"""Bad inputs and faults (issue 16): one line, exit code 2, nothing lost or half-written.

Each row of the tables below is one mistake a user makes. A row runs what
`python -m fgrpo_jax.main` (or `fgrpo_jax.export`, `fgrpo_jax.compare`) runs — in this
process through `cli.user_errors`, the same wrapper the entry points use, or as a
real subprocess for the flag-parsing rows — and checks

- the exit code (2 for a UserError),
- that stderr is exactly one line `error: ...` naming the field or file,
- that every file that existed before (a sentinel result in the workdir, the input
  files, the data cache) is still there with the same bytes, and that no lock,
  temporary or half-written file is left behind.

Most rows fail at config or data time and need no training. The export, resume,
corrupt-checkpoint and divergence cases share one tiny finished run (SFT only, so
only the SFT step and the greedy evaluation are compiled, once per session).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import recsys
from fgrpo_jax import cli, export, guards, train, workdir_lock
from fgrpo_jax import config as config_lib
from fgrpo_jax import steps as steps_lib
from fgrpo_jax.data import cache, recsys_real, textio
from fgrpo_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


# ----------------------------------------------------------------------------
# Helpers: the run as main runs it, and the "nothing lost" check.


def tiny(**fields):
  """configs/recsys.py:tiny, smaller still: 60 users, 4 SFT steps, no RL."""
  c = recsys.get_config("tiny")
  c.data.num_users = 60
  c.sft.update(steps=4, batch_size=8)
  c.rl.steps = 0
  c.eval.update(val_examples=16, test_examples=16, batch_size=16)
  c.update(log_every=2, ckpt_every=2)
  return set_fields(c, fields)


def set_fields(c, fields: dict):
  for dotted, value in fields.items():
    config_lib.set_config_value(c, dotted, value)
  return c


def like_main(fn):
  """(exit code, stderr) of fn() run inside the entry points' error wrapper."""
  err = io.StringIO()
  code = 0
  with contextlib.redirect_stderr(err):
    try:
      with cli.user_errors():
        fn()
    except SystemExit as e:
      code = e.code
  return code, err.getvalue()


def assert_one_line(code: int, stderr: str, *expected: str):
  assert code == 2, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  for text in expected:
    assert text in lines[0], lines[0]


def snapshot(*dirs) -> dict[str, str]:
  """{path: sha256} of every file under dirs (missing dirs are empty)."""
  out = {}
  for d in dirs:
    for root, _, files in os.walk(d):
      for name in files:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_nothing_lost(before: dict, *dirs):
  after = snapshot(*dirs)
  changed = [p for p, h in before.items() if after.get(p) != h]
  assert not changed, f"lost or modified: {changed}"
  litter = [p for p in after if p not in before and (
      ".tmp" in p or os.path.basename(p) == workdir_lock.LOCK_FILE)]
  assert not litter, f"left behind: {litter}"
  for d in dirs:  # nor half-prepared or half-exported directories
    for root, subdirs, _ in os.walk(d):
      assert not [s for s in subdirs if ".tmp" in s or ".export-" in s], (root, subdirs)


def workdir_with_result(tmp_path) -> str:
  """A workdir holding an earlier result that a failing run must not touch."""
  w = tmp_path / "w"
  w.mkdir()
  (w / "eval.json").write_text('{"metrics": {"hit@1": 0.5}}\n')
  (w / "metrics.jsonl").write_text('{"stage": "sft", "step": 2}\n')
  return str(w)


# ----------------------------------------------------------------------------
# Input files in their published formats (tiny; the readers have their own tests).


def _events(n_users=8, n_items=30, per_user=9):
  rng = np.random.default_rng(0)
  return [(u + 1, int(i) + 1, int(rng.integers(1, 6)), 1_000_000 + 1000 * u + k)
          for u in range(n_users) for k, i in enumerate(rng.choice(n_items, per_user, False))]


def write_ml100k(d, bom=False, extra_line=None, newline=True, sep="\t"):
  d.mkdir(parents=True, exist_ok=True)
  lines = [sep.join(map(str, e)) for e in _events()]
  if extra_line is not None:
    lines.append(extra_line)
  text = "\n".join(lines) + ("\n" if newline else "")
  (d / "u.data").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
  (d / "u.item").write_text("".join(f"{i}|Film {i}|01-Jan-1995||http://x|0\n"
                                    for i in range(1, 31)), encoding="latin-1")
  return d


def write_ml1m(d):
  d.mkdir(parents=True)
  (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in _events()))
  return d


def write_ml25m(d):
  d.mkdir(parents=True)
  (d / "ratings.csv").write_text("userId;movieId;rating;timestamp\n1;2;3;4\n")
  (d / "movies.csv").write_text("movieId,title,genres\n2,X,Drama\n")
  return d


def write_hetrec(d):
  d.mkdir(parents=True)
  rows = [f"{u}\t{i}\t1\t{t}" for u, i, _, t in _events()] + ["3\tabba\t1\t5"]
  (d / "user_taggedartists-timestamps.dat").write_text(
      "userID\tartistID\ttagID\ttimestamp\n" + "\n".join(rows) + "\n")
  (d / "artists.dat").write_text("id\tname\turl\tpictureURL\n1\tA\tu\tp\n")
  return d


def write_amazon(d, reviews=("Beauty",), tail=""):
  d.mkdir(parents=True)
  for cat in reviews:
    with open(d / f"{cat}_5.json", "w") as f:
      for u, i, r, t in _events():
        f.write(json.dumps({"reviewerID": f"A{u}", "asin": f"B{i}", "overall": float(r),
                            "unixReviewTime": t}) + "\n")
      f.write(tail)
    (d / f"meta_{cat}.json").write_text(json.dumps({"asin": "B1", "title": "t"}) + "\n")
  return d


def _musique_line(k, paragraphs=None):
  paras = [{"idx": j, "title": f"T{k}-{j}", "paragraph_text": f"passage {j} about {k}",
            "is_supporting": j < 2} for j in range(6)]
  return json.dumps({"id": f"2hop__{k}", "question": f"what links {k}?",
                     "paragraphs": paras if paragraphs is None else paragraphs})


def write_musique(d, dev_lines=None):
  d.mkdir(parents=True)
  (d / "musique_ans_v1.0_train.jsonl").write_text(
      "".join(_musique_line(k) + "\n" for k in range(8)))
  lines = dev_lines if dev_lines is not None else [_musique_line(k) for k in range(8, 12)]
  (d / "musique_ans_v1.0_dev.jsonl").write_text("".join(line + "\n" for line in lines))
  return d


def write_hotpot_truncated(d):
  d.mkdir(parents=True)
  ex = {"_id": "a", "question": "q?", "supporting_facts": [["T", 0]],
        "context": [["T", ["s."]]]}
  (d / "hotpot_train_v1.1.json").write_text(json.dumps([ex, ex])[:-2])  # cut: no "}]"
  (d / "hotpot_dev_distractor_v1.json").write_text(json.dumps([ex]))
  return d


def _cut_musique_line(k):
  """A line cut in the middle of a string, the line break kept (a damaged copy)."""
  line = _musique_line(k)
  return line[:line.index("passage 3") + 4]


def movielens(setup):
  return lambda tmp: {"data.name": "movielens", "data.path": str(setup(tmp / "ml")),
                      "data.cache_dir": str(tmp / "cache")}


def lastfm(setup):
  return lambda tmp: {"data.name": "lastfm", "data.path": str(setup(tmp / "fm")),
                      "data.cache_dir": str(tmp / "cache")}


def amazon(setup):
  return lambda tmp: {"data.name": "amazon", "data.path": str(setup(tmp / "az")),
                      "data.cache_dir": str(tmp / "cache")}


def qa(name, setup):
  return lambda tmp: {"data.name": name, "data.path": str(setup(tmp / "qa")),
                      "data.cache_dir": str(tmp / "cache")}


def hf_dir(make):
  """Fields pointing config.model.hf_checkpoint at make(tmp) (item-token prompts)."""
  return lambda tmp: {"model.hf_checkpoint": str(make(tmp)), "prompt.format": "ids"}


def _hf_files(tmp, config_text=None, truncate=False, tokenizer=True):
  from fgrpo_jax.models import hf, llama
  cfg = llama.ModelConfig(vocab_size=128, num_layers=1, hidden=16, num_heads=2, num_kv_heads=1,
                          head_dim=8, mlp_hidden=32)
  rng = np.random.default_rng(0)
  params = {k: v for k, v in _tree_map(lambda s: rng.normal(0, .1, s.shape).astype(np.float32),
                                       llama.param_shapes(cfg)).items()}
  d = tmp / "hf"
  hf.save_hf_checkpoint(params, cfg, d)
  if config_text is not None:
    (d / "config.json").write_text(config_text)
  if truncate:
    path = d / "model.safetensors"
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  if tokenizer:
    golden = os.path.join(REPO, "tests", "golden", "hf", "llama_tied")
    for name in ("tokenizer.json", "tokenizer_config.json"):
      shutil.copy(os.path.join(golden, name), d / name)
  return d


def _tree_map(fn, tree):
  return {k: _tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _no_config_json(tmp):
  d = tmp / "hf"
  d.mkdir()
  (d / "model.safetensors").write_bytes(b"")
  return d


def _busy(tmp):
  """The workdir's lock held by a live process (this test's parent) on this host."""
  w = tmp / "w"
  (w / workdir_lock.LOCK_FILE).write_text(json.dumps(
      {"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier"}))
  return {}


# ----------------------------------------------------------------------------
# The table of runs that must stop: (id, config fields, setup(tmp) -> more fields,
# texts the one line must contain). setup may also write files.

NAN, INF = math.nan, math.inf
RUN_CASES = [
    # config values (already one line before issue 16)
    ("algorithm", {"algorithm": "ppo"}, None, ["config.algorithm='ppo'"]),
    ("mode", {"mode": "predict"}, None, ["config.mode='predict'"]),
    ("group_size", {"rollout.group_size": 1}, None, ["config.rollout.group_size=1"]),
    ("slate_zero", {"rollout.slate_size": 0}, None, ["config.rollout.slate_size=0"]),
    ("rank_gt_slate", {"rollout.rank_size": 5}, None, ["config.rollout.rank_size=5"]),
    ("slate_gt_pool", {"rollout.slate_size": 9}, None, ["config.rollout.slate_size=9",
                                                        "config.data.pool_size"]),
    ("coverage", {"reward.coverage": "dice"}, None, ["config.reward.coverage='dice'"]),
    ("ratio", {"rl.ratio": "sequence"}, None, ["config.rl.ratio"]),
    ("sft_steps", {"sft.steps": -1}, None, ["config.sft.steps"]),
    ("batch_prompts", {"rl.batch_prompts": 0}, None, ["config.rl.batch_prompts=0"]),
    ("temperature_zero", {"rollout.temperature": 0.0}, None, ["config.rollout.temperature"]),
    ("grad_accum", {"optim.grad_accum": 3}, None, ["config.optim.grad_accum=3"]),
    ("lora_rank", {"model.lora_rank": -1}, None, ["config.model.lora_rank=-1"]),
    ("lora_targets", {"model.lora_rank": 4, "model.lora_targets": "q_proj,wq"}, None,
     ["config.model.lora_targets"]),
    ("dataset", {"data.name": "imagenet"}, None, ["config.data.name", "imagenet"]),
    ("grain_synthetic", {"data.loader": "grain"}, None, ["config.data.loader=grain"]),
    ("prompt_format", {"prompt.format": "html"}, None, ["config.prompt.format='html'"]),
    ("chat_without_tokenizer", {"prompt.format": "chat"}, None, ["needs a tokenizer"]),
    ("init_from", {"sft.init_from": "/nonexistent/run"}, None,
     ["/nonexistent/run/ckpt/sft", "config.sft.init_from"]),
    # non-finite and out-of-range numbers (issue 16, item 2)
    ("rl_lr_nan", {"rl.lr": NAN}, None, ["config.rl.lr=nan", "finite"]),
    ("sft_lr_inf", {"sft.lr": INF}, None, ["config.sft.lr=inf"]),
    ("rl_lr_zero", {"rl.lr": 0.0}, None, ["config.rl.lr=0.0", "> 0"]),
    ("kl_negative", {"rl.kl_coef": -0.1}, None, ["config.rl.kl_coef=-0.1"]),
    ("lam_nan", {"reward.lam": NAN}, None, ["config.reward.lam=nan"]),
    ("b2_one", {"optim.b2": 1.0}, None, ["config.optim.b2=1.0", "[0, 1)"]),
    ("eps_low", {"rl.eps_low": 1.5}, None, ["config.rl.eps_low=1.5"]),
    ("temperature_inf", {"rollout.temperature": INF}, None, ["config.rollout.temperature=inf"]),
    ("grad_clip_nan", {"optim.grad_clip": NAN}, None, ["config.optim.grad_clip=nan"]),
    ("weight_decay", {"optim.weight_decay": -1.0}, None, ["config.optim.weight_decay=-1.0"]),
    # the pool size is blamed, not slate_size (item 10)
    ("pool_negative", {"data.pool_size": -3}, None, ["config.data.pool_size=-3"]),
    # the workdir (items 3, 7, 8)
    ("workdir_busy", {}, _busy, ["in use by another run", f"pid {os.getppid()}",
                                 workdir_lock.LOCK_FILE]),
    ("eval_no_checkpoint", {"mode": "eval"}, None, ["no checkpoint to evaluate",
                                                    "config.eval.allow_random"]),
    # Hugging Face checkpoints (item 6 and earlier ones)
    ("hf_missing", {"model.hf_checkpoint": "/nonexistent/hf", "prompt.format": "ids"}, None,
     ["config.model.hf_checkpoint", "/nonexistent/hf"]),
    ("hf_no_config", {}, hf_dir(_no_config_json), ["config.model.hf_checkpoint",
                                                   "config.json: not found"]),
    ("hf_bad_json", {}, hf_dir(lambda t: _hf_files(t, config_text="{oops")), ["invalid JSON"]),
    ("hf_architecture", {}, hf_dir(lambda t: _hf_files(
        t, config_text=json.dumps({"architectures": ["GPT2LMHeadModel"]}))),
     ["unsupported architecture 'GPT2LMHeadModel'"]),
    ("hf_truncated", {}, hf_dir(lambda t: _hf_files(t, truncate=True)),
     ["config.model.hf_checkpoint: ", "hf/model.safetensors: truncated or corrupt"]),
    ("hf_no_tokenizer_chat", {"prompt.format": "chat"},
     lambda t: {"model.hf_checkpoint": str(_hf_files(t, tokenizer=False))},
     ["config.model.hf_checkpoint=", "/hf: no tokenizer"]),
    # recommendation files (items 5 and earlier ones)
    ("data_path_missing", {"data.name": "movielens", "data.path": "/nonexistent/ml"}, None,
     ["config.data.path=/nonexistent/ml"]),
    ("movielens_empty_dir", {}, movielens(lambda d: d.mkdir() or d), ["no MovieLens files"]),
    ("movielens_delimiter", {}, movielens(lambda d: write_ml100k(d, sep=",")),
     ["u.data:1: expected 4 fields", "wrong delimiter"]),
    ("movielens_truncated", {},
     movielens(lambda d: write_ml100k(d, extra_line="9\t3", newline=False)),
     ["u.data:73:", "truncated"]),
    ("movielens_rating", {}, movielens(lambda d: write_ml100k(d, extra_line="9\t3\tfive\t7")),
     ["u.data:73: field 'rating' is not a number"]),
    ("movielens_item_id", {},
     movielens(lambda d: write_ml100k(d, extra_line="9\ttt0114709\t4\t7")),
     ["u.data:73: field 'item id' is not an integer: 'tt0114709'"]),
    ("movielens_no_items", {}, movielens(write_ml1m), ["movies.dat: file not found"]),
    ("movielens_header", {}, movielens(write_ml25m), ["ratings.csv:1: expected the header"]),
    ("lastfm_artist_id", {}, lastfm(write_hetrec),
     ["user_taggedartists-timestamps.dat:74: field 'artistID' is not an integer"]),
    ("amazon_two_files", {}, amazon(lambda d: write_amazon(d, ("Beauty", "Toys"))),
     ["several Amazon review files", "config.data.category"]),
    ("amazon_cut_line", {}, amazon(lambda d: write_amazon(d, tail='{"reviewerID": "A1", "as')),
     ["Beauty_5.json:73: invalid JSON: the line is truncated"]),
    ("negatives", {"data.negatives": "hard"}, movielens(write_ml100k),
     ["config.data.negatives='hard'"]),
    ("dedup", {"data.dedup": "last"}, movielens(write_ml100k), ["config.data.dedup='last'"]),
    ("kcore_empties", {"data.kcore": 50}, movielens(write_ml100k),
     ["no user is left", "config.data.kcore=50"]),
    # multi-hop QA files (item 10 and earlier ones)
    ("musique_cut_line", {}, qa("musique", lambda d: write_musique(
        d, [_musique_line(8), _musique_line(9), _cut_musique_line(10)])),
     ["musique_ans_v1.0_dev.jsonl:3: invalid JSON: the line is truncated"]),
    ("musique_paragraphs", {}, qa("musique", lambda d: write_musique(
        d, [_musique_line(8, paragraphs="oops")])),
     ["musique_ans_v1.0_dev.jsonl:1:", "'paragraphs' must be a list", "found str"]),
    ("musique_question", {}, qa("musique", lambda d: write_musique(
        d, ['{"id": "x", "paragraphs": []}'])), ["missing field 'question'"]),
    ("hotpot_truncated", {}, qa("hotpotqa", write_hotpot_truncated),
     ["hotpot_train_v1.1.json:1:", "truncated file"]),
    ("qa_path_missing", {"data.name": "hotpotqa", "data.path": "/nonexistent/qa"}, None,
     ["config.data.path=/nonexistent/qa"]),
]


@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_stops_with_one_line_and_loses_nothing(tmp_path, case):
  _, fields, setup, expected = case
  workdir = workdir_with_result(tmp_path)
  fields = dict(fields)
  if setup is not None:
    fields.update(setup(tmp_path))
  config = tiny(**fields)
  before = snapshot(tmp_path)  # with workdir_busy, the other run's lock must survive too
  code, stderr = like_main(lambda: train.run(config, workdir, log=lambda *a: None))
  assert_one_line(code, stderr, *expected)
  if case[0] == "pool_negative":
    assert "slate_size" not in stderr
  assert_nothing_lost(before, tmp_path)


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "run"
  path.write_text("not a directory\n")
  before = snapshot(tmp_path)
  code, stderr = like_main(lambda: train.run(tiny(), str(path), log=lambda *a: None))
  assert_one_line(code, stderr, f"--workdir={path}", "not a directory")
  assert_nothing_lost(before, tmp_path)


def test_config_errors_create_nothing(tmp_path):
  """A config mistake stops before the workdir is even created."""
  code, stderr = like_main(lambda: train.run(tiny(**{"rl.lr": NAN}), str(tmp_path / "new")))
  assert_one_line(code, stderr, "config.rl.lr=nan")
  assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------
# The command line: flags checked before absl parses them (item 7). Real
# subprocesses; they stop before jax is imported, so each takes well under a second.

CLI_CASES = [
    ("unknown_field", "main", ["--config=configs/recsys.py:tiny", "--config.rl.stepz=3"],
     "error: unknown config field rl.stepz (did you mean rl.steps?)"),
    ("unknown_nested", "main", ["--config=configs/recsys.py", "--config.rollout.slate=4"],
     "error: unknown config field rollout.slate (did you mean rollout.slate_size?)"),
    ("unknown_section", "main", ["--config=configs/recsys.py", "--config.rll.steps", "4"],
     "error: unknown config field rll.steps"),
    ("unknown_variant", "main", ["--config=configs/recsys.py:tinyy"],
     "error: --config=configs/recsys.py:tinyy: ValueError: unknown variant 'tinyy'"),
    ("missing_file", "main", ["--config=configs/recsyss.py"],
     "error: --config=configs/recsyss.py: configs/recsyss.py not found"),
    ("not_an_integer", "main", ["--config=configs/recsys.py", "--config.rl.steps=ten"],
     "error: --config.rl.steps=ten: not an integer"),
    ("not_a_number", "main", ["--config=configs/recsys.py", "--config.rl.lr=fast"],
     "error: --config.rl.lr=fast: not a number"),
    ("compare_unknown_field", "compare",
     ["--config=configs/recsys.py:tiny", "--config.compare.seedz=1"],
     "error: unknown config field compare.seedz (did you mean compare.seeds?)"),
    ("qa_unknown_variant", "main", ["--config=configs/multihop_qa.py:huge"],
     "error: --config=configs/multihop_qa.py:huge: ValueError: unknown variant 'huge'"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line_mistakes_are_one_line(tmp_path, case):
  _, program, args, expected = case
  workdir = workdir_with_result(tmp_path)
  before = snapshot(tmp_path)
  proc = subprocess.run([sys.executable, "-m", f"fgrpo_jax.{program}", f"--workdir={workdir}",
                         *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
  assert proc.stderr.strip().startswith(expected), proc.stderr
  assert_nothing_lost(before, tmp_path)


def test_known_fields_and_values_pass_the_precheck():
  cli.check_config_args(["--config=configs/recsys.py:tiny", "--config.rl.steps=3",
                         "--config.rl.lr", "1e-3", "--config.rollout.constrained=False",
                         "--noconfig.model.tie_embeddings", "--workdir=/x"])
  cli.check_config_args(["--workdir=/x"])  # absl reports the missing --config itself
  with pytest.raises(UserError, match=r"did you mean rl\.steps"):
    cli.check_config_args(["-config=configs/recsys.py", "-config.rl.step=1"])


# ----------------------------------------------------------------------------
# One tiny finished run, shared by the export, resume, corrupt-checkpoint and
# divergence cases (each mutating case works on a copy).


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  logs = []
  train.run(tiny(), workdir, log=logs.append)
  assert sorted(os.listdir(os.path.join(workdir, "ckpt", "sft"))) == ["2", "4"]
  return workdir


def copy_run(finished_run, tmp_path) -> str:
  dst = str(tmp_path / "run")
  shutil.copytree(finished_run, dst)
  return dst


def _export(workdir, out, **kw):
  return like_main(lambda: export.export_run(workdir, str(out), log=lambda *a: None, **kw))


EXPORT_CASES = [  # (id, --out as a function of (workdir, tmp), texts of the line) (item 1)
    ("out_is_workdir", lambda w, t: w, ["is the workdir", "would delete it"]),
    ("out_is_parent", lambda w, t: os.path.dirname(w), ["contains the workdir"]),
    ("out_is_grandparent", lambda w, t: os.path.dirname(os.path.dirname(w)),
     ["contains the workdir"]),
    ("out_is_workdir_dot", lambda w, t: os.path.join(w, "ckpt", ".."), ["is the workdir"]),
    ("out_in_checkpoints", lambda w, t: os.path.join(w, "ckpt", "sft"),
     ["inside the run's checkpoints"]),
    ("out_is_file", lambda w, t: os.path.join(w, "eval.json"), ["is an existing file"]),
    ("out_is_foreign_dir", lambda w, t: _foreign(t), ["not an earlier export", "--overwrite"]),
]


def _foreign(tmp):
  d = tmp / "papers"
  d.mkdir()
  (d / "draft.tex").write_text("\\section{Results}\n")
  return str(d)


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_refuses_to_lose_anything(finished_run, tmp_path, case):
  _, out_of, expected = case
  out = out_of(finished_run, tmp_path)
  before = snapshot(finished_run, tmp_path)
  code, stderr = _export(finished_run, out)
  assert_one_line(code, stderr, f"--out={out}", *expected)
  assert_nothing_lost(before, finished_run, tmp_path)


@pytest.mark.parametrize("case", [
    ("no_run_config", lambda t, run: str(t), "run_config.json: not found"),
    ("no_checkpoint", lambda t, run: _run_config_only(t, run), "no checkpoint to export"),
], ids=["no_run_config", "no_checkpoint"])
def test_export_of_a_workdir_without_a_run(finished_run, tmp_path, case):
  _, make, expected = case
  workdir = make(tmp_path, finished_run)
  before = snapshot(tmp_path)
  assert_one_line(*_export(workdir, tmp_path / "out"), expected)
  assert_nothing_lost(before, tmp_path)
  assert not (tmp_path / "out").exists()


def _run_config_only(tmp, finished_run):
  w = tmp / "w"
  w.mkdir()
  shutil.copy(os.path.join(finished_run, train.RUN_CONFIG), w / train.RUN_CONFIG)
  return str(w)


def test_export_bad_dtype(finished_run, tmp_path):
  assert_one_line(*_export(finished_run, tmp_path / "out", dtype="int8"), "--dtype='int8'")


def test_export_replaces_only_its_own_exports(finished_run, tmp_path):
  out = tmp_path / "hf"
  assert _export(finished_run, out) == (0, "")
  record = json.loads((out / "config.json").read_text())[export.EXPORT_RECORD]
  assert record["stage"] == "sft" and record["workdir"] == os.path.realpath(finished_run)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  (out / "model.safetensors").write_bytes(b"stale")
  assert _export(finished_run, out) == (0, "")  # an earlier export: replaced, no flag needed
  assert (out / "model.safetensors").stat().st_size > 100
  foreign = _foreign(tmp_path)
  assert _export(finished_run, foreign)[0] == 2
  assert _export(finished_run, foreign, overwrite=True) == (0, "")  # asked for
  assert not os.path.exists(os.path.join(foreign, "draft.tex"))
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # no staging left


def test_export_cli_into_the_workdir_keeps_the_run(finished_run, tmp_path):
  """The reported disaster, end to end: `export --workdir=W --out=W` used to delete W."""
  run = copy_run(finished_run, tmp_path)
  before = snapshot(run)
  proc = subprocess.run([sys.executable, "-m", "fgrpo_jax.export", f"--workdir={run}",
                         f"--out={run}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: --out={run} is the workdir {os.path.realpath(run)}: exporting there would "
      "delete it; choose another --out"]
  assert_nothing_lost(before, run)


def test_eval_without_checkpoint_runs_when_asked(finished_run, tmp_path):
  lines = []
  config = tiny(**{"mode": "eval", "eval.allow_random": True})
  result = train.run(config, str(tmp_path / "w"), log=lines.append)
  assert any("evaluating the initial (random) parameters" in line for line in lines)
  assert result["steps"] == 0
  assert not os.path.exists(tmp_path / "w" / workdir_lock.LOCK_FILE)


def test_resume_with_another_schedule_warns(finished_run, tmp_path):
  run = copy_run(finished_run, tmp_path)
  lines = []
  train.run(tiny(**{"sft.lr": 1e-3, "optim.warmup_steps": 3, "log_every": 1}), run,
            log=lines.append)
  warnings = [line for line in lines if line.startswith("[resume] warning")]
  assert len(warnings) == 1, lines
  assert "sft.lr 0.003 -> 0.001" in warnings[0] and "optim.warmup_steps 20 -> 3" in warnings[0]
  assert "log_every" not in warnings[0]  # logging settings change nothing
  assert any("[sft] resumed from step 4" in line for line in lines)
  lines.clear()
  train.run(tiny(**{"sft.lr": 1e-3, "optim.warmup_steps": 3}), run, log=lines.append)
  assert not [line for line in lines if line.startswith("[resume]")]  # now the saved config


def test_every_checkpoint_corrupt_is_said_and_kept_aside(finished_run, tmp_path, caplog):
  run = copy_run(finished_run, tmp_path)
  sft = os.path.join(run, "ckpt", "sft")
  corrupted = {}
  for step in ("2", "4"):
    for root, _, files in os.walk(os.path.join(sft, step)):
      for name in files:
        path = os.path.join(root, name)
        if os.path.getsize(path) > 64:
          with open(path, "r+b") as f:
            f.truncate(16)
          corrupted.setdefault(step, []).append(os.path.relpath(path, os.path.join(sft, step)))
  assert set(corrupted) == {"2", "4"}
  lines = []
  with caplog.at_level("WARNING"):
    train.run(tiny(), run, log=lines.append)
  said = [r.getMessage() for r in caplog.records if "every checkpoint" in r.getMessage()]
  assert len(said) == 1 and "starts again from step 0" in said[0] and "sft_corrupt" in said[0]
  assert not any("[sft] resumed" in line for line in lines)
  aside = os.path.join(run, "ckpt", "sft_corrupt")
  assert sorted(os.listdir(aside)) == ["2", "4"]  # kept, renamed, not deleted by rotation
  for step, files in corrupted.items():
    for rel in files:
      assert os.path.getsize(os.path.join(aside, step, rel)) == 16
  assert sorted(os.listdir(sft)) == ["2", "4"]  # retrained and saved again


def test_diverged_loss_stops_without_saving_the_bad_state(finished_run, tmp_path, monkeypatch):
  """A loss that turns NaN at step 3 is noticed at step 4 (a log and checkpoint step):
  exit 2 naming step 4 and the last good checkpoint (2); step 4 is not saved."""
  original = steps_lib.sft_step

  def poisoned(state, batch, key, **kw):
    new, metrics = original(state, batch, key, **kw)
    if int(new.step) >= 3:
      metrics = {**metrics, "loss": metrics["loss"] * np.nan}
    return new, metrics

  monkeypatch.setattr(steps_lib, "sft_step", poisoned)
  workdir = str(tmp_path / "w")
  code, stderr = like_main(lambda: train.run(tiny(), workdir, log=lambda *a: None))
  assert_one_line(code, stderr, "[sft] step 4: training diverged (loss nan is not finite)",
                  "the last good checkpoint is step 2", "config.sft.lr")
  assert sorted(os.listdir(os.path.join(workdir, "ckpt", "sft"))) == ["2"]
  assert not os.path.exists(os.path.join(workdir, "eval.json"))
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def test_non_finite_parameters_are_never_checkpointed(finished_run, tmp_path, monkeypatch):
  """Finite metrics but NaN weights (e.g. an update that overflowed) at a save step."""
  original = steps_lib.sft_step

  def poisoned(state, batch, key, **kw):
    new, metrics = original(state, batch, key, **kw)
    if int(new.step) == 2:
      params = dict(new.params, final_norm=new.params["final_norm"] * np.nan)
      new = new._replace(params=params)
    return new, metrics

  monkeypatch.setattr(steps_lib, "sft_step", poisoned)
  workdir = str(tmp_path / "w")
  code, stderr = like_main(lambda: train.run(tiny(), workdir, log=lambda *a: None))
  assert_one_line(code, stderr, "[sft] step 2: training diverged (parameters",
                  "no checkpoint of this stage was saved")
  assert os.listdir(os.path.join(workdir, "ckpt", "sft")) == []


# ----------------------------------------------------------------------------
# The workdir lock (item 3).


def test_stale_lock_is_taken_over_and_released(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(
      {"pid": dead.pid, "host": socket.gethostname(), "started": "long ago"}))
  lines = []
  with workdir_lock.hold(str(tmp_path), log=lines.append) as path:
    assert len(lines) == 1 and "taking over" in lines[0] and f"pid {dead.pid}" in lines[0]
    held = json.loads(open(path).read())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(workdir_lock.WorkdirBusy, match="in use by another run"):
      workdir_lock.acquire(str(tmp_path))  # even this process cannot take it twice
  assert not os.path.exists(path)


def test_lock_of_another_host_is_not_taken(tmp_path):
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(
      {"pid": 1, "host": "tpu-worker-7", "started": "now"}))
  with pytest.raises(workdir_lock.WorkdirBusy, match="pid 1 on host tpu-worker-7"):
    workdir_lock.acquire(str(tmp_path))
  assert (tmp_path / workdir_lock.LOCK_FILE).exists()


# ----------------------------------------------------------------------------
# Self-checking caches (item 4) and text encodings (item 5).


def _ml_config(tmp_path, data_dir):
  return tiny(**{"data.name": "movielens", "data.path": str(data_dir),
                 "data.cache_dir": str(tmp_path / "cache"), "data.kcore": 1,
                 "data.min_history": 2})


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_cache_is_prepared_again(tmp_path, damage):
  config = _ml_config(tmp_path, write_ml100k(tmp_path / "ml"))
  first = recsys_real.load(config, log=lambda *a: None)
  directory = first.info["cache_dir"]
  manifest = json.loads(open(os.path.join(directory, cache.MANIFEST)).read())
  assert {"train.array_record", "items.json"} <= set(manifest["files"])
  path = os.path.join(directory, "train.array_record")
  if damage == "truncate":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == "flip":
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
  else:
    os.remove(path)
  assert cache.verify(directory, manifest) is not None
  logs = []
  again = recsys_real.load(config, log=logs.append)
  assert any("is corrupt (train.array_record" in line and "preparing it again" in line
             for line in logs), logs
  assert again.info["cache_dir"] == directory
  with open(os.path.join(directory, cache.MANIFEST)) as f:
    assert cache.verify(directory, json.load(f)) is None
  np.testing.assert_array_equal(again.train.pool, first.train.pool)
  assert not [p for p in os.listdir(tmp_path / "cache") if ".tmp" in p]


def test_byte_order_mark_is_not_data(tmp_path):
  plain = recsys_real.load(_ml_config(tmp_path / "a", write_ml100k(tmp_path / "a" / "ml")),
                           log=lambda *a: None)
  marked = recsys_real.load(_ml_config(tmp_path / "b", write_ml100k(tmp_path / "b" / "ml",
                                                                    bom=True)),
                            log=lambda *a: None)
  assert marked.info["counts"]["users"] == plain.info["counts"]["users"] == 8  # no phantom
  for split in ("train", "validation", "test"):
    np.testing.assert_array_equal(getattr(marked, split).pool, getattr(plain, split).pool)
  assert textio.text_encoding(str(tmp_path / "b" / "ml" / "u.item"), "latin-1") == "latin-1"


def test_json_line_messages():
  with pytest.raises(ValueError, match="the line is truncated"):
    textio.loads_line('{"a": "cut\n')  # what used to read as "Invalid control character"
  with pytest.raises(ValueError, match="the line is truncated"):
    textio.loads_line('{"a": 1', had_newline=False)
  with pytest.raises(ValueError) as e:
    textio.loads_line('{"a": 1,, "b": 2}\n')
  assert "truncated" not in str(e.value)
  assert textio.loads_line('\ufeff{"a": 1}'[1:]) == {"a": 1}


def test_config_changes_ignore_evaluation_and_logging():
  saved = tiny().to_dict()
  now = tiny(**{"rl.steps": 3, "eval.every": 7, "log_every": 1, "mode": "eval"}).to_dict()
  assert guards.config_changes(saved, now) == ["rl.steps 0 -> 3"]
