"""Weights: how a policy version travels from the learner to the generators.

Owns the shared-memory slot ring (`shm_ring`) and the CPU weight-transfer engine that vLLM loads from it
(`shm_engine`, registered with vLLM's `WeightTransferEngineFactory` under the name "shm"), the announcements of
published versions (`announce`) and the versions prepared beside sampling (`shadow_weights`). It may import
torch and vLLM's weight-transfer base classes, never the controller, the learner or the actors.
"""
