"""F-GRPO on the embedded synthetic sequential-recommendation task.

    python -m fgrpo_jax.main --config=configs/recsys.py --workdir=runs/recsys
    python -m fgrpo_jax.main --config=configs/recsys.py:tiny --workdir=/tmp/t
    python -m fgrpo_jax.main --config=configs/recsys.py --config.algorithm=grpo ...
    python -m fgrpo_jax.compare --config=configs/recsys.py:ablate_lambda --workdir=runs/abl
    python -m fgrpo_jax.main --config=configs/recsys.py:movielens \
        --config.data.path=/data/ml-1m --workdir=runs/ml1m

Variants (after the colon, comma-separated to combine, e.g. `tiny,ablate_lambda`):
`default` (the next item among C = 50 candidates, uniform negatives, a 400-step SFT warm
start: issue 14's regime, where errors split between the slate and the ranking; a
2-core CPU run in about 10 minutes; docs/experiments.md, "Choosing the recommendation
regime"), `one_target` (the task before issue 14: C = 20 and 1,000 SFT steps, pinned:
committed results name it), `pool60` (C = 60 with 1,000 SFT steps: the first candidate
that met the regime criteria, ~30 minutes on 2 cores), `tiny` (seconds; used by the tests; one target),
and the ablations of `fgrpo_jax.compare`: `ablate_lambda` (lambda in
0.25/0.5/1/2), `ablate_slate` (k in 5/10/15), `ablate_advantage` (mean vs std),
`ablate_ratio` (token vs per-phase ratio), `ablate_rank_ideal` (pool vs slate),
`ablate_loss_norm` (phase vs joint), `sweep_lr` (rl.lr of `compare.sweep_algorithm`);
`movielens`, `lastfm`, `amazon`, `recbole` read a published dataset from
`--config.data.path` (docs/datasets.md lists the formats).
"""

import ml_collections

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # all projections

REAL = ("movielens", "lastfm", "amazon", "recbole")  # variants reading a published dataset
# The embedded task before issue 14 (the next item only; the target + 19 uniform negatives),
# on which every result committed before it was measured.
ONE_TARGET = dict(pool_size=20, negatives="uniform", num_targets=1, history_len=10, seq_len=20)
ONE_TARGET_SFT_STEPS = 1000  # its warm start (also pool60's)
ABLATIONS = {
    "ablate_lambda": ("reward.lam", (0.25, 0.5, 1.0, 2.0)),
    "ablate_slate": ("rollout.slate_size", (5, 10, 15)),
    "ablate_advantage": ("reward.advantage", ("mean", "std")),
    "ablate_ratio": ("rl.ratio", ("token", "phase")),
    "ablate_rank_ideal": ("reward.rank_ideal", ("pool", "slate")),
    "ablate_loss_norm": ("rl.loss_norm", ("phase", "joint")),
    "sweep_lr": ("rl.lr", (2.5e-4, 1e-3, 4e-3)),
}


def get_config(arg=None):
  variants = [v for v in (arg or "default").split(",") if v]
  variant = ",".join(variants)
  c = ml_collections.ConfigDict()
  c.variant = variant  # which named variant built this config (informational)
  c.algorithm = "fgrpo"  # fgrpo | grpo | decoupled | sft
  c.mode = "train"  # train: SFT warm start, RL, test eval | eval: evaluate the latest params
  c.seed = 0  # seeds the data generator, the initialisation and the sampler

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic_recsys"  # dataset; synthetic_recsys needs no files
  c.data.path = ""  # local directory of a real dataset (unused by synthetic_recsys)
  c.data.cache_dir = ""  # where prepared data is cached ("" = under the workdir)
  c.data.num_items = 200  # synthetic: catalogue size
  c.data.num_clusters = 10  # synthetic: item clusters
  c.data.num_user_types = 8  # synthetic: latent user types
  c.data.num_users = 4000  # synthetic: users (one test and one validation example each)
  c.data.seq_len = 20  # synthetic: interactions per user
  c.data.history_len = 10  # items of history shown in the prompt (last H)
  c.data.pool_size = 50  # C: candidates per example (the target + C-1 negatives)
  # uniform | popularity: the target + C-1 sampled negatives (one target); retrieved: C items
  # drawn from the history alone (data.retrieval_mix), examples missing every target dropped
  c.data.negatives = "uniform"  # how the pool is made: uniform | popularity | retrieved
  c.data.retrieval_mix = "cluster=0.5,popularity=0.25,uniform=0.25"  # retrieved: shares of the pool
  c.data.num_targets = 1  # synthetic: relevant items = the user's next n items (n > 1 needs retrieved)
  c.data.target_decay = 0.5  # synthetic: relevance of the j-th next item is decay**j (graded by recency)
  c.data.kcore = 5  # real data: repeatedly drop users and items with < k interactions (0/1 = off)
  c.data.min_rating = 0.0  # real data: drop interactions rated below this (0 = keep all)
  c.data.dedup = "first"  # real data: repeats of a user-item pair: first | consecutive | none
  c.data.min_history = 2  # real data: fewest history items of a training example
  c.data.max_train_per_user = 0  # real data: keep a user's most recent N training targets (0 = all)
  c.data.category = ""  # amazon: review category when the folder holds several (e.g. Beauty)
  c.data.dataset = ""  # recbole: atomic-file prefix, e.g. ml-100k ("" = the folder's only *.inter)
  c.data.skip_bad_lines = False  # real data: skip (and count) malformed lines instead of stopping
  # training batches: memory (rows drawn by a pure function of the step) | grain (streamed
  # from the prepared array_record files, one shard per host, iterator state checkpointed)
  c.data.loader = "memory"  # memory | grain (prepared datasets only)

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 2  # decoder layers
  c.model.hidden = 128  # residual width
  c.model.num_heads = 4  # query heads
  c.model.num_kv_heads = 2  # key/value heads (grouped-query attention)
  c.model.head_dim = 32  # per-head width
  c.model.mlp_hidden = 384  # SwiGLU inner width
  c.model.tie_embeddings = False  # share the input embedding with the output head
  c.model.rope_theta = 10000.0  # rotary base
  c.model.init_std = 0.02  # std of the random init (residual outputs: / sqrt(2 L))
  c.model.partial_rotary_factor = 1.0  # rotary on this fraction of each head's dims (rest: no position)
  c.model.qk_norm = False  # RMS-normalise queries and keys per head (Qwen3 style)
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (weights stay float32)
  c.model.remat = "none"  # rematerialise layers in backward: none | full
  c.model.hf_checkpoint = ""  # local Hugging Face checkpoint dir (its config.json sets the sizes)
  c.model.lora_rank = 0  # LoRA adapter rank r (0 = off: train all weights); the base stays frozen
  c.model.lora_alpha = 16.0  # LoRA alpha: the update is (alpha / r) * A @ B
  c.model.lora_targets = LORA_TARGETS  # projections that get adapters (comma-separated)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.slate_size = 10  # k: candidates written in the slate
  c.rollout.rank_size = 5  # m: slate members ranked
  c.rollout.group_size = 8  # G: rollouts per prompt
  c.rollout.temperature = 1.0  # sampling temperature of training rollouts
  c.rollout.constrained = True  # True: choices among pool ids, tags forced / False: free decoding
  c.rollout.max_new_tokens = 0  # free decoding: token budget per rollout (0 = twice a well-formed one)

  c.reward = ml_collections.ConfigDict()
  c.reward.coverage = "recall"  # R_gen: recall | f1 (order-invariant) | ndcg (slate order counts)
  c.reward.rank_metric = "ndcg"  # R_rank: ndcg | hit | mrr (over the first rank_k ranked)
  c.reward.rank_k = 0  # cut-off of R_rank (0 = all m ranked; 1 with hit: R_rank = hit@1)
  c.reward.gain = "exp"  # NDCG gain for graded relevance: exp (2^rel-1) | linear
  c.reward.lam = 1.0  # lambda: weight of the rank phase (F-GRPO) / of R_rank (GRPO)
  c.reward.advantage = "mean"  # group advantage: mean (Dr. GRPO) | std | rloo
  # slate: the factorised rank loss leaves out rollouts whose slate holds nothing relevant
  c.reward.rank_ideal = "pool"  # R_rank judged against the relevant items of: pool | slate
  c.reward.format_penalty = 1.0  # free decoding: subtracted from R_gen / R_rank if that part is malformed

  c.prompt = ml_collections.ConfigDict()
  c.prompt.format = "auto"  # ids (token per item/slot) | chat (chat template) | auto (chat iff hf_checkpoint)
  c.prompt.tokenizer = ""  # chat prompts: tokenizer directory ("" = model.hf_checkpoint)
  c.prompt.max_len = 1024  # text prompts (chat templates): prompt tokens; long candidate texts are cut
  c.prompt.identifiers = "letters"  # text prompts: one-token slot names: letters (A..Z, a..z) | "x,y,..."
  c.prompt.system = ""  # text prompts: system message ("" = the built-in format instruction)

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 400  # teacher-forcing steps on gold sequences before RL
  c.sft.batch_size = 64  # sequences per SFT step
  c.sft.lr = 3e-3  # peak learning rate of the SFT stage
  c.sft.supervise = "relevant"  # loss on gold tokens naming relevant candidates | all
  c.sft.slate_order = "random"  # gold slate order: random | relevant_first
  c.sft.prompt_lm_weight = 0.0  # + this x next-token NLL of the prompt itself (0 = off)
  c.sft.slot_relevance_weight = 0.0  # + this x per-slot relevance BCE at each identifier (0 = off)
  c.sft.tied_targets = False  # a choice's target: the gold one (False) | any allowed one as relevant
  c.sft.init_from = ""  # workdir of an earlier run whose SFT params to reuse (skips SFT)

  c.rl = ml_collections.ConfigDict()
  c.rl.steps = 200  # RL steps (each: rollout, rewards, update)
  c.rl.batch_prompts = 16  # B: prompts per RL step (B*G rollouts)
  c.rl.lr = 3e-4  # peak learning rate after the warm start (RL, and the SFT baselines' continuation)
  c.rl.inner_steps = 2  # gradient steps on each batch of rollouts (ratio != 1 after the first)
  c.rl.eps_low = 0.2  # lower clip range of the ratio
  c.rl.eps_high = 0.28  # upper clip range of the ratio (clip-higher)
  c.rl.ratio = "token"  # importance ratio: token | phase (exp of mean log-ratio per phase)
  # phase: mean(slate tokens) + lam * mean(rank tokens); joint: one mean, rank tokens x lam
  c.rl.loss_norm = "phase"  # loss normalisation, the same for every algorithm: phase | joint
  c.rl.kl_coef = 0.0  # beta of the KL penalty to the frozen SFT policy (LoRA: the base; 0 = off)
  c.rl.kl_estimator = "k3"  # k1 | k3

  c.optim = ml_collections.ConfigDict()
  c.optim.warmup_steps = 20  # linear warmup steps (each stage)
  c.optim.weight_decay = 0.01  # AdamW decoupled weight decay
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.99  # Adam beta2
  c.optim.grad_clip = 1.0  # global gradient-norm clip
  c.optim.final_lr_frac = 0.1  # cosine decay ends at this fraction of the peak
  c.optim.grad_accum = 1  # microbatches per gradient step (divides every update's batch)

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 50  # validation every N steps of each stage (0 = only at the end)
  c.eval.val_examples = 500  # validation examples per evaluation (0 = all)
  c.eval.test_examples = 0  # test examples in the final evaluation (0 = all)
  c.eval.batch_size = 256  # prompts per evaluation batch
  c.eval.show_examples = 0  # print N decoded test rollouts at the end
  c.eval.allow_random = False  # mode=eval without a checkpoint: evaluate random weights (else an error)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1 = all devices not used by the others)
  c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis size
  c.mesh.tensor = 1  # tensor-parallel axis size (heads, MLP width, vocab)

  c.log_every = 10  # metrics every N steps
  c.tensorboard = True  # TensorBoard events (imports TensorFlow, ~6 CPU s); False: jsonl + console
  c.ckpt_every = 100  # Orbax checkpoint every N steps
  c.ckpt_keep = 2  # checkpoints kept per stage
  c.profile_steps = 0  # jax.profiler trace of N steps per stage into workdir/profile (0 = off)

  c.compare = ml_collections.ConfigDict()
  c.compare.seeds = 3  # seeds per run in fgrpo_jax.compare
  c.compare.first_seed = 0  # seeds first_seed .. first_seed + seeds - 1 (parallel processes)
  c.compare.algorithms = "fgrpo,grpo,decoupled,decoupled_sft,sft"  # runs of the table
  c.compare.pointwise = True  # also train the SASRec-like pointwise reference
  c.compare.sweep_field = ""  # ablation: dotted config field to sweep ("" = algorithms)
  c.compare.sweep_values = ()  # ablation: the values of sweep_field
  c.compare.sweep_algorithm = "fgrpo"  # ablation: the algorithm run at each value
  c.compare.lr = ""  # per-algorithm rl.lr from the sweep, e.g. "fgrpo=1e-3,sft=3e-4" ("" = rl.lr)

  for v in variants:
    if v == "default":
      continue
    if v == "one_target":
      c.data.update(ONE_TARGET)
      c.sft.steps = ONE_TARGET_SFT_STEPS
    elif v == "pool60":  # issue 14's first regime candidate (slower than the default)
      c.data.pool_size = 60
      c.sft.steps = ONE_TARGET_SFT_STEPS
    elif v == "tiny":
      c.data.update(ONE_TARGET)  # the tests' small task keeps one target
      c.data.update(num_items=60, num_clusters=6, num_user_types=4, num_users=600,
                    seq_len=12, history_len=6)
      c.model.update(num_layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16,
                     mlp_hidden=128)
      c.rollout.update(slate_size=4, rank_size=2, group_size=4)
      c.data.pool_size = 8
      c.sft.update(steps=150, batch_size=32)
      c.rl.update(steps=10, batch_prompts=8)
      c.eval.update(every=0, val_examples=64, test_examples=256, batch_size=128)
      c.compare.seeds = 2
      c.log_every = 5
      c.ckpt_every = 5
    elif v in REAL:
      c.data.update(ONE_TARGET)
      c.data.name = v  # read from --config.data.path (see docs/datasets.md)
      c.data.history_len = 20
      c.model.update(num_layers=4, hidden=256, num_heads=8, num_kv_heads=4, mlp_hidden=768)
      c.sft.steps = 3000
      c.rl.steps = 500
    elif v in ABLATIONS:
      field, values = ABLATIONS[v]
      if v == "ablate_slate" and "tiny" in variants:
        values = (2, 4, 6)  # within the tiny pool of 8
      c.compare.sweep_field = field
      c.compare.sweep_values = values
    else:
      raise ValueError(f"unknown variant {v!r} of configs/recsys.py "
                       f"(default, one_target, pool60, tiny, {', '.join(REAL + tuple(ABLATIONS))})")
  return c
