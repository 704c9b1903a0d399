"""Datasets for F-GRPO.

Submodules (import them explicitly; nothing heavy is imported here):

* ``fgrpo_jax.data.synthetic_recsys`` -- embedded synthetic sequential
  recommendation task with a known generative model, so every example carries
  the Bayes-optimal (oracle) score of each pool item.
"""
