"""Outputs: everything a run writes for people to read.

Owns the metrics and eval logs and their sinks (`recorder`, `sinks`: jsonl, TensorBoard, W&B), the
generator/learner timeline (`timeline`), the plots (`plots`) and summary.json (`summary`). It may import
`config` and reads a run's state through the read-only view it is given; never the controller.
"""
