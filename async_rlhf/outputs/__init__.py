"""Outputs: the files a run writes for people to read.

Owns the metrics and eval logs and their sinks (`recorder`, `sinks`: jsonl, TensorBoard, W&B), the
generator/learner timeline (`timeline`) and the plots (`plots`). summary.json's content is built by the
pipeline from its read-only view (`pipeline.summary`) and written here. It may import `config`; never the
pipeline.
"""
