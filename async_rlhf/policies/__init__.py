"""Policies: the starting checkpoints a run can use without downloads.

Owns the embedded tiny Llama, built and warm-started on the run's task (`embedded`), and the pretrained
policies that ship offline and are converted to HF checkpoints once (`pretrained`, `async-rlhf prepare`;
their names and cache directories are in `async_rlhf/config/pretrained_names.py`, which the config resolves).
It may import `config` and `tasks`; never the pipeline.
"""
