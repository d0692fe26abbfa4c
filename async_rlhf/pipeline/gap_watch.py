"""GapWatch: says once when the learner and the generators compute different distributions.

At staleness 0 the learner's log-probs of the sampled tokens are the sampling ones: in float32 on both sides they
agreed to ~1e-7 per token on ten architectures (Llama, Qwen2, GPT-2, OPT, GPT-NeoX, Phi, BioGPT, GPTBigCode,
Helium, the embedded model; session 31). A gap far above that means the two sides are not the same policy (dropout
left on in the learner gave 0.03-0.05, a model vLLM implements differently, weights that did not reach the
generators), and every importance ratio, PPO ratio and sampled KL is off by it. bf16 on either side differs by
rounding alone (~1e-2), and top-p sampling's log-probs are of the kept tokens alone: there the gap is only
reported.
"""
from __future__ import annotations

import math

from async_rlhf.config.run import RunConfig

GAP_ALARM = 1e-3  # per token, float32 on both sides


class GapWatch:
    def __init__(self, cfg: RunConfig) -> None:
        # top_p, top_k, ... (allowed where the loss takes no ratio): the sampling log-probs are of the kept tokens
        gen = cfg.generation
        self.limit = GAP_ALARM if all_float32(cfg) and not gen.reshaping(gen.temperature) else None
        self.said = False

    def check(self, metrics: dict) -> str | None:
        """The note for a step whose staleness-0 gap is past the limit, the first time only; else None."""
        gap = metrics.get("logprob_gap_fresh", math.nan)
        if self.limit is None or self.said or not isinstance(gap, float) or not gap > self.limit:
            return None
        self.said = True
        return (f"note: at staleness 0 the learner's log-probs of the sampled tokens differ from the generators' by "
                f"{gap:.3g} per token (logprob_gap_fresh; float32 on both sides agrees to ~1e-7): the two compute "
                "different distributions (dropout on, with learner.disable_dropout=false; a model vLLM implements "
                "differently; weights that did not reach the generators), so ratios and KLs are off by that much")


def all_float32(cfg: RunConfig) -> bool:
    """The learner and the generators both compute in float32, as far as the driver can tell: `auto` is float32 here
    only for a local Ray on a machine without a GPU (a cluster's workers resolve it where they run)."""
    known = cfg.model.dtype == "float32" or cfg.ray.address is None
    return (known and cfg.model.torch_dtype == "float32" and cfg.generation.dtype in ("auto", "float32")
            and cfg.learner.autocast == "none")
