"""Datasets for F-GRPO.

Submodules (import them explicitly; nothing heavy is imported here):

* ``tasks`` -- the one door from ``config.data`` to a ``Task`` (model arrays per
  split, the vocabulary, the rollout layout, references);
* ``arrays`` -- the model-array schema and batch selection;
* ``recsys`` / ``qa`` -- the data model of each task, shared by the synthetic
  generators (``synthetic_recsys``, ``synthetic_qa``: known generative models, so
  every example carries its oracle scores) and the real readers (``recsys_real``,
  ``multihop_qa``);
* ``prompts`` (the ``PromptBuilder`` protocol and item-token prompts),
  ``text_prompts`` (word-level QA text), ``chat_prompts`` (chat templates);
* ``cache``, ``pipeline``, ``textio`` -- the prepared array_record cache, grain, and
  reading published text files.
"""
