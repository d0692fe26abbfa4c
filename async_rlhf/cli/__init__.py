"""CLI: the `async-rlhf` command (also `python -m async_rlhf.cli`).

Owns argument parsing and the one-line error contract (`main`: train, resume, check-config, bench), the model
commands (`models`: prepare, sample-pairs with `pairs`, train-rm, serve-rm) and `status` against a live run
(`status`). It sits on top: it may import every package, and nothing imports it.
"""
