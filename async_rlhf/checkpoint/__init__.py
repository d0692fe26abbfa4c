"""Checkpoint: the durable checkpoint directory of a run.

Owns `store`: atomic writes (a `.partial` directory renamed into place), validity, retention (`keep_last`)
and finding the newest valid checkpoint. What a checkpoint holds and how a run goes back to it is the
pipeline's (`pipeline.resume`), since that is the loop's own state. It imports nothing of the project.
"""
