"""Generator path overhead: tokens/s through GeneratorActor + RewardService vs raw vLLM `LLM.generate`.

    .venv/bin/python bench/generator_path.py [--size tiny] [--prompts 16] [--samples 4] [--repeats 8]

Both sides use the same model, prompts, sampling parameters and per-prompt seeds (so they produce the
same tokens, which the script checks) and the same single core. The raw side is an `LLM` in its own
Ray actor, timed inside the actor around `LLM.generate` alone (so no Ray cost is charged to it); the
actor is killed at the end, which also ends its engine process (an `LLM` in the benchmark process
itself could hang at interpreter exit in vLLM's engine shutdown). The path side is what the controller
does for one chunk: a Ray call to a GeneratorActor,
the groups pickled back, then a Ray call to the RewardService that scores them. They are timed
alternately. Goal: path >= 0.95 of raw.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import alternate, build_policy, ratio_main, start_bench_ray

if TYPE_CHECKING:  # vllm is imported after the engine environment is set
    from vllm.inputs import TokensPrompt

CORE = 0  # the pipeline pins generator 0 to the first core when it overlaps generation and learning


def make_prompts(n: int):
    from async_rlhf.config.task import TaskConfig
    from async_rlhf.policies.embedded import build_tokenizer
    from async_rlhf.tasks.builtin import SortTask

    task = SortTask(TaskConfig(), build_tokenizer(), seed=0)
    return [task.train_prompt(i) for i in range(n)]


class RawVLLM:
    """`LLM.generate` and nothing else, configured as GeneratorActor configures its engine."""

    def __init__(self, model_dir: str, gen_cfg, prompts) -> None:
        from actors.generator import engine_options, set_engine_env, skip_cpu_start_costs

        set_engine_env([CORE], cuda=False)
        from vllm import LLM

        os.sched_setaffinity(0, [CORE])  # after the import, which thus runs beside the other side's start
        skip_cpu_start_costs()  # as the generator: no torch.compile of a sampler op on the (untimed) first call
        self.llm = LLM(model=model_dir, dtype="float32", max_model_len=gen_cfg.max_model_len, seed=0,
                       **engine_options(gen_cfg, cuda=False, model_dir=model_dir, dtype="float32"))
        self.inputs: list[TokensPrompt] = [{"prompt_token_ids": p.token_ids} for p in prompts]
        self.params = raw_params(prompts, gen_cfg)

    def generate(self) -> tuple[float, int]:
        """Seconds spent in `LLM.generate` and the number of tokens it sampled."""
        start = time.perf_counter()
        results = self.llm.generate(self.inputs, self.params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return seconds, sum(len(c.token_ids) for r in results for c in r.outputs)


def raw_params(prompts, gen_cfg):
    from vllm import SamplingParams

    # The same seeds GeneratorActor derives (seed 0): both sides sample identical tokens.
    return [SamplingParams(n=gen_cfg.samples_per_prompt, temperature=gen_cfg.temperature, top_p=gen_cfg.top_p,
                           max_tokens=gen_cfg.max_new_tokens, logprobs=0, seed=p.prompt_id % (2**31 - 1))
            for p in prompts]


def measure(size: str, n_prompts: int, samples: int, repeats: int, workdir: Path) -> dict:
    import ray

    from actors.generator import GeneratorActor
    from async_rlhf.config.generation import GenerationConfig
    from reward_models.service import RewardService

    gen_cfg = GenerationConfig(samples_per_prompt=samples)
    model_dir = build_policy(size, workdir / size)
    prompts = make_prompts(n_prompts)
    start_bench_ray()
    handles: list[Any] = []  # Ray actor handles (Ray's types do not follow .options().remote())
    try:
        actor: Any = ray.remote(GeneratorActor).options(num_cpus=0).remote(0, str(model_dir), gen_cfg, 0, [CORE])
        reward: Any = ray.remote(RewardService).options(num_cpus=0).remote({"train": "sort_partial"})
        raw_actor: Any = ray.remote(RawVLLM).options(num_cpus=0).remote(str(model_dir), gen_cfg, prompts)
        handles += [actor, raw_actor]
        ray.get([actor.info.remote(), raw_actor.__ray_ready__.remote()])  # both engines start at once
        out: dict = {}

        def raw() -> float:
            seconds, out["raw_tokens"] = ray.get(raw_actor.generate.remote())
            return seconds

        def path() -> None:
            result = ray.get(actor.generate.remote(prompts))
            ray.get(reward.score.remote(result.groups))
            out["path_tokens"] = result.tokens

        samples_by_side = alternate({"raw_vllm": raw, "generator_path": path}, repeats)
    finally:
        for handle in handles:  # ends the engines' processes with their actors
            ray.kill(handle)
        ray.shutdown()
    if out["raw_tokens"] != out["path_tokens"]:
        raise RuntimeError(f"sides sampled different token counts: {out['raw_tokens']} vs {out['path_tokens']}")
    tps = {k: out["raw_tokens"] / s.median for k, s in samples_by_side.items()}
    return {"size": size, "prompts": n_prompts, "samples_per_prompt": samples, "tokens_per_call": out["raw_tokens"],
            "repeats": repeats, "seconds": {k: s.seconds for k, s in samples_by_side.items()},
            "tokens_per_s": tps, "ratio": tps["generator_path"] / tps["raw_vllm"], "goal": 0.95}


def main(argv: list[str] | None = None) -> dict:
    return ratio_main(argv, __doc__, measure, "generator_path", repeats=8, title="generation tokens/s")


if __name__ == "__main__":
    main()
