"""Writes notebooks/fgrpo_demo.ipynb (committed without outputs).

    python scripts/make_notebook.py

The notebook is generated so its cells stay reviewable as plain Python here;
tests/test_notebook.py executes it end to end on CPU with a small setting.
"""

import os

import nbformat
from nbformat import v4

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CELLS = [
    ("md", """# F-GRPO in JAX: a guided tour

One decoder writes a **slate** of candidates and then a **ranking** of it in a single
rollout; F-GRPO trains it with separate group-relative advantages for the two phases.
This notebook trains F-GRPO and plain GRPO briefly on the embedded recommendation task,
plots their per-phase rewards and validation Hit@1, prints a few rollouts, and uses
`fgrpo_jax.rewards` on its own.

In Colab: clone the repository, `%cd` into it, then run all cells (a TPU or GPU runtime
is used automatically; the CPU works too)."""),
    ("code", """import importlib.util, os, subprocess, sys
# The notebook lives in notebooks/; the repository root is one level up.
REPO = os.path.abspath(os.environ.get("FGRPO_REPO", ".." if os.path.basename(os.getcwd()) == "notebooks" else "."))
if importlib.util.find_spec("fgrpo_jax") is None:
    # Installs jax[tpu] / jax[cuda12] of the pinned version on an accelerator runtime
    # (the pinned CPU jaxlib would silently run on the CPU), and keeps a preinstalled
    # TensorFlow instead of adding tensorflow-cpu beside it.
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "notebook_install.py")], check=True)
sys.path.insert(0, REPO)
os.chdir(REPO)"""),
    ("code", """import jax
print("backend:", jax.default_backend(), "| devices:", jax.device_count(), jax.devices()[:4])
sys.path.insert(0, os.path.join(REPO, "scripts"))
from notebook_install import detect_extra
if detect_extra() != "cpu" and jax.default_backend() == "cpu":
    print(f"WARNING: this runtime has an accelerator (jax[{detect_extra()}]) but jax runs on the CPU: "
          "restart the runtime after the install cell")"""),
    ("code", """# Parameters: FGRPO_NOTEBOOK_SMALL=1 (used by the tests) trains for seconds.
SMALL = os.environ.get("FGRPO_NOTEBOOK_SMALL", "0") == "1"
WORKDIR = os.environ.get("FGRPO_NOTEBOOK_WORKDIR", "runs/notebook")"""),
    ("code", """import copy
from configs import recsys
from fgrpo_jax import train
from fgrpo_jax import config as config_lib

config = recsys.get_config("tiny" if SMALL else None)
if not SMALL:  # a few minutes on a CPU
    config.sft.steps, config.rl.steps = 600, 100
config.eval.every = max(config.rl.steps // 5, 1)
config.eval.val_examples = 256

results = {}
warm = os.path.join(WORKDIR, "fgrpo")  # the F-GRPO run trains the shared SFT warm start
for algorithm in ("fgrpo", "grpo"):
    c = copy.deepcopy(config)
    c.algorithm = algorithm
    if algorithm != "fgrpo":
        c.sft.init_from = warm  # same warm start, same rollout budget
    results[algorithm] = train.run(c, os.path.join(WORKDIR, algorithm), log=lambda *a: None)
    print(algorithm, {k: round(results[algorithm]["metrics"][k], 3) for k in ("hit@1", "ndcg@5", "slate_recall")})
print("oracle", {k: round(results["fgrpo"]["oracle"][k], 3) for k in ("hit@1", "ndcg@5", "slate_recall")})
for name, ref in results["fgrpo"]["references"].items():
    print(name, {k: round(ref[k], 3) for k in ("hit@1", "ndcg@5", "slate_recall")})"""),
    ("code", """from fgrpo_jax import compare
from IPython.display import Image, display

histories = {a: [compare.read_history(os.path.join(WORKDIR, a))] for a in results}
compare.plot_curves(histories, os.path.join(WORKDIR, "curves.png"))
display(Image(os.path.join(WORKDIR, "curves.png")))"""),
    ("md", """## A few rollouts, readable

History, pool (`*` marks the relevant item), the slate the model wrote, its ranking,
and the two rewards."""),
    ("code", """from fgrpo_jax.data import tasks

task = tasks.load_task(config)
layout = task.layout_fn(config.rollout.slate_size, config.rollout.rank_size)
cfg = config_lib.model_config(config, task.vocab_size)
from fgrpo_jax.models import llama
params = train.load_stage_params(os.path.join(WORKDIR, "fgrpo"), "rl",
                                 llama.init_params(cfg, jax.random.key(0)))
train.show_examples(params, task, task.splits["test"], config, cfg, layout, 3)"""),
    ("md", """## The reward library on its own

`fgrpo_jax.rewards` imports only jax and numpy; every function jits and vmaps."""),
    ("code", """import jax.numpy as jnp
from fgrpo_jax import rewards as R

relevance = jnp.array([[0., 1., 0., 0., 1., 0.]])          # one prompt, pool of 6, two relevant
slates = jnp.array([[[1, 4, 0], [2, 3, 5], [4, 2, 1]]])     # G = 3 rollouts, k = 3
rankings = jnp.array([[[4, 1], [2, 3], [2, 4]]])            # m = 2, best first
r_gen = R.coverage(slates, relevance[:, None])
r_rank = R.ndcg(rankings, relevance[:, None])
print("R_gen ", r_gen, "\\nR_rank", r_rank)
print("A_gen ", R.group_advantages(r_gen), "\\nA_rank", R.group_advantages(r_rank, mode="std"))
print("valid ", R.format_validity(slates, rankings, pool_size=6))"""),
]


def build():
  nb = v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["colab"] = {"provenance": []}
  for kind, src in CELLS:
    cell = v4.new_markdown_cell(src) if kind == "md" else v4.new_code_cell(src)
    cell.id = f"cell-{len(nb.cells)}"  # stable ids: regenerating changes only edited cells
    nb.cells.append(cell)
  return nb


def main():
  path = os.path.join(REPO, "notebooks", "fgrpo_demo.ipynb")
  nb = build()
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    nbformat.write(nb, f)
  os.replace(tmp, path)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
