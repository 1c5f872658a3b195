"""The causal Wan2.1 family (CausVid, Self-Forcing, LongLive, Matrix-Game 2.0 actions).

Modules: ``config`` (sizes), ``dit`` (the transformer), ``kv_cache`` (rolling window with
sinks), ``vae`` (streaming decoder), ``action`` (keyboard/mouse modules), ``sampler``
(few-step schedule), ``keys`` (the original checkpoint naming), ``loading`` (wrappers,
LoRA, strict checks), ``text`` (precomputed umT5 prompts), ``pipeline`` (one session's
stream), ``adapter`` (the ``WorldModel``) and ``factory`` (what the registry calls).
"""
