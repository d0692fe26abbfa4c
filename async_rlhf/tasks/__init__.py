"""Tasks: where prompts come from and how they are split, for train and for evaluation.

Owns the built-in tasks (`builtin`: sort, arith; their prompt streams and warm-start data), user datasets
(`dataset`: jsonl/csv/parquet/HF hub tables, chat templates) and the prompts that ship with the package
(`data/`). A task's static side (its name in the registry, vocabulary, context and the size bounds the
config checks) is its `TaskShape` in `async_rlhf/config/task_shapes.py`: the config cannot import this
package. It may import `config`, `async_rlhf.rollout` and transformers' tokenizers; never the pipeline.
"""
