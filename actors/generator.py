"""GeneratorActor: a vLLM engine inside a Ray actor that samples K completions per prompt.

Every group it returns carries the policy version of the weights that sampled it. New weights
are loaded only at the start of a `generate` call, i.e. between generation batches.

With an `MCRequest` (loss `vineppo`), the same call also samples VinePPO's Monte Carlo rollouts:
it splits each response into steps, gathers the batch's unique states and continues each of them
K_mc times, all before it returns, so the values come from the weights that sampled the responses.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from actors.generation_result import GenerationResult
from async_rlhf.cluster.busy_board import BusyBoard
from async_rlhf.cluster.gc_pause import paused_gc
from async_rlhf.cluster.resources import pin_process
from async_rlhf.config.generation import GenerationConfig
from async_rlhf.rollout import Completion, FinishReason, Prompt, RolloutGroup
from async_rlhf.weights.announce import AnnouncementReader, version_tag
from async_rlhf.weights.broker import VersionError, WeightRef
from async_rlhf.weights.nccl import check_generator_version
from async_rlhf.weights.slot_location import parse_slot_location
from learners.advantages.monte_carlo import (
    MCBatch,
    MCRequest,
    State,
    StepSplit,
    continuation_seed,
    delimiter_splitter,
    gather_states,
)
from reward_models.scoring_marks import ScoringMarks
from reward_models.service import RewardService, TrainReward

if TYPE_CHECKING:  # vllm is imported after the engine environment is set (GeneratorActor.__init__)
    from vllm.inputs import TokensPrompt


def _cpu_list(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


class GeneratorActor:
    @paused_gc()  # the start's imports and engine build (gc_pause.py)
    def __init__(
        self,
        generator_id: int,
        model_dir: str,
        gen_cfg: GenerationConfig,
        seed: int = 0,
        cores: list[int] | None = None,
        dtype: str = "float32",
        weight_transport: str = "shm",
        train_reward: TrainReward | None = None,
        busy_board: str | None = None,
        scratch_dir: str | None = None,
    ) -> None:
        allowed = os.sched_getaffinity(0)  # the run's cores: where the next version is prepared (announce.py)
        cores = cores or sorted(allowed)
        # Pin before vLLM starts: its engine (this process on CPU, child processes on GPU) gets this
        # affinity and its OMP threads bind to exactly these cores, so generation and learning do not
        # fight over a core.
        pin_process(cores, len(cores))
        set_engine_env(cores, _has_cuda(), weight_transport)
        from vllm import LLM  # imported here: the environment above must be set first

        from async_rlhf.weights.shm_engine import register

        register()  # the "shm" weight-transfer backend, before the engine's worker is built

        self.generator_id = generator_id
        # Asked once: a process's restart count does not change, and a later ask needs the GCS, which a SIGTERM to
        # the driver's whole process group (`timeout`, a job scheduler) stops serving while the run winds down.
        self.restarted = _restarted_by_ray()
        # Where this generator says when it samples: the learner borrows its core between calls (core_lending.py).
        self.board = BusyBoard.attach(busy_board) if busy_board else None
        # A rule train reward scored here, with the reward actor's own failure handling (reward.in_generator).
        marks = ScoringMarks(scratch_dir, f"generator-{generator_id}")  # names a reward that ends this process
        self.reward = RewardService({"train": train_reward.scorer}, train_reward.timeout_s, marks=marks,
                                    run=train_reward.run) if train_reward else None
        self.seed = seed
        self.cfg = gen_cfg
        self.version = 0
        self.lineage = 0  # the broker's lineage of `version` (a learner rollback reuses version numbers)
        self.cores = cores
        self.shm_root: str | None = None  # the slot ring this engine's shm transfer is set up for
        self.announcements: AnnouncementReader | None = None  # its thread prepares each announced version
        self.allowed_cores = allowed
        self.generating = False  # a generate call is running (a version announced meanwhile is prepared beside it)
        self.transfer_joined = False  # init_weight_transfer ran (a learner-driven group: nccl, or a push)
        dtype = resolve_dtype(dtype, _has_cuda())
        if not _has_cuda():
            skip_cpu_start_costs()
        with temp_files_in(scratch_dir), cpu_kv_cache_named(gen_cfg, _has_cuda()):
            self.llm = LLM(
                model=model_dir,
                # RunConfig.generator_dtype: the learner's (model.dtype, auto resolved here), or bfloat16 over
                # float32 weights on a CPU (generation.dtype; each published float32 version is converted as it loads).
                dtype=dtype,  # type: ignore[arg-type]  # a str from the config, one of vLLM's literal names
                max_model_len=gen_cfg.max_model_len,
                seed=seed + generator_id,
                **engine_options(gen_cfg, _has_cuda(), weight_transport, model_dir, dtype),
            )

    def info(self) -> dict:
        return {"generator_id": self.generator_id, "version": self.version, "cores": self.cores, "pid": os.getpid(),
                "restarted": self.restarted}

    def load_weights(self, ref: WeightRef) -> float:
        """Swap in published weights (in place, no engine restart); returns seconds taken.

        shm weights may be of any version still in the broker's ring, older than the ones held included
        (queue.staleness_mode=fixed samples N versions behind, and an evaluation may have loaded a newer
        one meanwhile). Pushed weights (nccl, ipc) are not loaded here: the learner pushed them
        (receive_weights) before the broker published them, so this only checks that this generator holds
        that version or a newer one (fixed delay is refused with them)."""
        if ref.transport in ("nccl", "ipc"):
            check_generator_version(self.version, ref.version, self.generator_id)
            return 0.0
        slot = parse_slot_location(ref.location) if ref.transport == "shm" else None
        if slot is None:
            raise ValueError(f"GeneratorActor cannot load transport '{ref.transport}' from '{ref.location}'")
        start = time.perf_counter()
        self._load_slot(str(slot[0]), slot[1], version_tag(ref.lineage, ref.version))
        self.version, self.lineage = ref.version, ref.lineage
        return time.perf_counter() - start

    def _load_slot(self, root: str, slot: int, tag: str) -> None:
        """vLLM's weight-update protocol with the "shm" engine (async_rlhf/weights/shm_engine.py): a version
        prepared beside sampling under `tag` is put in place, any other one loaded."""
        if root != self.shm_root:  # first load, a restarted actor, or a resumed run's new ring
            ahead = not _has_cuda()  # a CUDA engine loads in its call (ShadowWeights is CPU-only)
            self.llm.collective_rpc("init_weight_transfer_engine",
                                    kwargs={"init_info": {"root": root, "prepare_ahead": ahead}})
            self.shm_root = root
            self._listen(Path(root), ahead)
        self._update_or_exit({"slot": slot, "tag": tag})
        self._forget_old_kv()

    def _listen(self, root: Path, ahead: bool) -> None:
        """Announced versions prepared on a thread."""
        if self.announcements is not None:
            self.announcements.close()
        if ahead:
            self.announcements = AnnouncementReader(root, self.generator_id, self._prepare, self.allowed_cores)

    def _prepare(self, slot: int, tag: str) -> None:
        """Only beside a call: an idle generator loads the version in the call that asks for it, off any critical
        path, where a prepare would take a core from the learner and the call could wait for it (SmolLM2: a
        prepare 0.57 s on another core, a load 0.3 s)."""
        from async_rlhf.weights.shm_engine import prepare_on_worker  # vLLM: imported once its environment is set

        if self.generating:
            self.llm.collective_rpc(prepare_on_worker, args=(slot, tag))

    def _update_or_exit(self, update_info: dict) -> None:
        """vLLM's start -> update -> finish. One that fails part way leaves a mix of two versions in the engine,
        sampled under the old version's tag by the next batch, and a failed finish leaves vLLM's update marked
        active, which refuses every later one: so the process exits, Ray starts it again clean, and it loads (or
        is pushed) the current weights as any restarted generator."""
        try:
            self.llm.collective_rpc("start_weight_update")
            self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})
            self.llm.collective_rpc("finish_weight_update")
        except BaseException as exc:  # noqa: BLE001  # whatever failed, the engine's weights are no longer known
            print(f"[async-rlhf] generator {self.generator_id}: a weight update failed part way ({type(exc).__name__}: "
                  f"{exc}); exiting so that Ray starts it again clean", file=sys.stderr, flush=True)
            os._exit(1)

    def _forget_old_kv(self) -> None:
        """KV blocks computed with the old weights must not serve a prompt sampled with the new ones
        (a shared prefix would otherwise be partly computed with an older policy)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"generator {self.generator_id}: vLLM refused to reset its prefix cache after a "
                               f"weight load (requests still running)")

    def _holds_other(self, ref: WeightRef) -> bool:
        return (ref.lineage, ref.version) != (self.lineage, self.version)

    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the learner's weight-sync group (NCCL: blocks until every member has joined). Called again
        when the group is formed anew after another generator's restart: the old group is left first."""
        if self.transfer_joined:
            self.llm.collective_rpc("shutdown_weight_transfer_engine")
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})
        self.transfer_joined = True

    def receive_weights(self, update_info: dict, version: int) -> float:
        """Receive one whole version from the learner's broadcast; seconds taken. One actor call, so
        no generation batch runs while the weights are half swapped."""
        if not self.transfer_joined:  # a restarted process: start_weight_update would empty its layers for nothing
            raise VersionError(f"generator {self.generator_id} is not in the weight group (a restarted process); "
                               "the controller forms the group anew once it answers")
        start = time.perf_counter()
        self._update_or_exit(update_info)
        self._forget_old_kv()
        self.version = version
        return time.perf_counter() - start

    def generate(
        self,
        prompts: list[Prompt],
        weights: WeightRef | None = None,
        n: int | None = None,
        temperature: float | None = None,
        mc: MCRequest | None = None,
        score: bool = False,
    ) -> GenerationResult:
        """Sample n completions per prompt (with MC rollouts for `mc`); with `score`, the train reward too."""
        with self._busy():
            return self._generate(prompts, weights, n, temperature, mc, score)

    @contextmanager
    def _busy(self) -> Iterator[None]:
        """While a call runs: on the busy board (core lending reads it), and `generating` (announcements do)."""
        with self.board.busy(self.generator_id) if self.board else nullcontext():
            self.generating = True
            try:
                yield
            finally:
                self.generating = False

    def _generate(self, prompts: list[Prompt], weights: WeightRef | None, n: int | None, temperature: float | None,
                  mc: MCRequest | None, score: bool) -> GenerationResult:
        started_at = time.time()
        sync_s = self.load_weights(weights) if weights and self._holds_other(weights) else 0.0
        n = n or self.cfg.samples_per_prompt
        params = [self._sampling_params(n, temperature, p.prompt_id) for p in prompts]
        start = time.perf_counter()
        inputs: list[TokensPrompt] = [{"prompt_token_ids": p.token_ids} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        texts = iter(self._decode([c.token_ids for out in outputs for c in out.outputs]))
        gen_s = time.perf_counter() - start
        now = time.time()
        groups = [
            RolloutGroup(p, [self._completion(c, next(texts)) for c in out.outputs], self.version, self.generator_id,
                         now, gen_s=gen_s)
            for p, out in zip(prompts, outputs)
        ]
        tokens = sum(g.num_tokens for g in groups)
        mc_batch = self._monte_carlo(groups, mc, temperature) if mc else None
        result = GenerationResult(groups, self.generator_id, self.version, gen_s, sync_s, started_at, tokens, mc_batch)
        if score:
            result.reward_s = self._score(groups + (mc_batch.rollouts if mc_batch else []))
        return result

    def _score(self, groups: list[RolloutGroup]) -> float:
        if self.reward is None:
            raise RuntimeError(f"generator {self.generator_id} was asked to score but has no train scorer")
        start = time.perf_counter()
        self.reward.score(groups)
        return time.perf_counter() - start

    def _sampling_params(self, n: int, temperature: float | None, prompt_id: int, max_tokens: int | None = None,
                         seed: int | None = None, logprobs: int | None = 0):
        """Sampling is seeded per prompt, not per engine: a prompt re-issued after a generator died,
        or regenerated after a resume, draws the same samples on any generator; and evaluation
        prompts share their random numbers across versions, which makes version-to-version
        comparisons less noisy. MC continuations pass their own per-state `seed`."""
        from vllm import SamplingParams

        temp = self.cfg.temperature if temperature is None else temperature
        return SamplingParams(
            n=n,
            temperature=temp,
            **self.cfg.sampling_settings(temp),
            max_tokens=max_tokens or self.cfg.max_new_tokens,
            logprobs=logprobs,  # 0: the sampled token's logprob, the behaviour policy for importance ratios
            seed=(self.seed * 1_000_003 + prompt_id) % (2**31 - 1) if seed is None else seed,
            # The texts are decoded once, after the call (_decode), of the ids the learner trains on; stop strings
            # need vLLM's own per-step detokenizer, and are kept: the ids end with them either way.
            detokenize=bool(self.cfg.stop),
            stop=self.cfg.stop or None,
            include_stop_str_in_output=True,
        )

    def _monte_carlo(self, groups: list[RolloutGroup], mc: MCRequest, temperature: float | None) -> MCBatch:
        """Split every response into steps (setting `step_ends`), then sample K_mc continuations of
        each unique state, each within what is left of the response's `max_new_tokens`."""
        split = delimiter_splitter(mc.delimiter_ids)
        owners, splits = [], []
        for group in groups:
            for c in group.completions:
                c.step_ends = split(c.token_ids)
                owners.append(group.prompt)
                splits.append(StepSplit(tuple(group.prompt.token_ids), tuple(c.token_ids), tuple(c.step_ends),
                                        self.version))
        found = gather_states(splits)
        prompts = [owners[r] for r in found.owner]
        params = [
            self._sampling_params(mc.k_mc, temperature, p.prompt_id, state.remaining_tokens(self.cfg.max_new_tokens),
                                  continuation_seed(self.seed, p.prompt_id, state.prefix_ids), logprobs=None)
            for state, p in zip(found.states, prompts)
        ]
        start = time.perf_counter()
        inputs: list[TokensPrompt] = [{"prompt_token_ids": s.token_ids} for s in found.states]
        outputs = self.llm.generate(inputs, params, use_tqdm=False) if inputs else []
        gen_s, now = time.perf_counter() - start, time.time()
        rollouts = [
            RolloutGroup(p, [self._continuation(state, c) for c in out.outputs], self.version, self.generator_id, now)
            for state, p, out in zip(found.states, prompts, outputs)
        ]
        tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        return MCBatch(rollouts, found.index, gen_s, tokens)

    def _continuation(self, state: State, out) -> Completion:
        """A whole response, prefix + continuation, decoded together (as the response's own text is)."""
        ids = [*state.prefix_ids, *out.token_ids]
        return Completion(ids, self._decode([ids])[0], [], _finish_reason(out))

    def _decode(self, token_ids: list) -> list[str]:
        """Texts of whole completions, after the call: vLLM's own detokenizer is off (SamplingParams.detokenize),
        since it decodes every token of every sequence at every engine step, and each sampled log-prob's token
        too (9-21 % of a call's time on the toy policy; tests/test_generator.py checks the texts are equal)."""
        tokenizer = self.llm.get_tokenizer()
        return [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in token_ids]

    @staticmethod
    def _completion(out, text: str) -> Completion:
        logprobs = [step[tok].logprob for tok, step in zip(out.token_ids, out.logprobs)]
        return Completion(list(out.token_ids), text, logprobs, _finish_reason(out))


def set_engine_env(cores: list[int], cuda: bool, weight_transport: str = "shm") -> None:
    """vLLM's environment, set before vLLM is imported: OMP threads bound to this actor's cores and, on
    CPU, the engine core in this process (see engine_options; the KV cache size is an engine option there).

    With ipc, vLLM's GPU engine core is a child process and `collective_rpc` sends it the update through
    vLLM's msgpack channel, which refuses the CUDA IPC handles' torch types (`reduce_tensor`'s tensor and
    storage classes, dtypes) unless pickle is allowed: the first push would fail and leave the engine mid-update.
    The channel runs between this actor and its own child, so allowing it there exposes nothing."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_list(cores)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not cuda:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if weight_transport == "ipc":
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


@contextmanager
def temp_files_in(path: str | None) -> Iterator[None]:
    """Temporary files made inside go to `path`, a directory the caller removes (a run: at its end, or its
    reaper when the driver was killed). vLLM's engine build makes a file there for its process group (torch's
    FileStore, vllm_dist_<uuid>) that it removes only on a clean engine shutdown, which a generator killed at a
    run's end never has: one file per engine start was left in /tmp (836 on this machine after 15 sessions).
    Without `path`, or where it cannot be made (a cluster node without the driver's shm_root), nothing changes."""
    try:
        if path:
            Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        path = None
    previous = tempfile.tempdir
    tempfile.tempdir = path or previous
    try:
        yield
    finally:
        tempfile.tempdir = previous


@contextmanager
def cpu_kv_cache_named(cfg: GenerationConfig, cuda: bool) -> Iterator[None]:
    """vLLM-CPU refuses a KV cache too small for one sequence by naming gpu_memory_utilization, a GPU knob ("No
    available memory for the cache blocks", "... KV cache is needed, which is larger than the available"); on a
    CPU the budget is generation.kv_cache_gib, so the error names that."""
    try:
        yield
    except ValueError as exc:
        if cuda or "gpu_memory_utilization" not in str(exc):
            raise
        vllm_says = str(exc).split(". ")[0]
        raise ValueError(f"the CPU KV cache is too small for one sequence of generation.max_model_len "
                         f"({cfg.max_model_len}) tokens; raise generation.kv_cache_gib (now {cfg.kv_cache_gib:g}) or "
                         f"lower generation.max_model_len (vLLM: {vllm_says})") from None


def skip_cpu_start_costs() -> None:
    """Two costs of a CPU engine's start that buy nothing here (measured in docs/benchmarks.md, Start-up):
    - vLLM compiles one small sampler op (the sampled token's rank, batched_count_greater_than) with
      torch.compile on the first generate call: 2-5 s of dynamo and inductor on 2 cores, for an op that
      takes microseconds eagerly (same log-probs, tested). The model itself is eager already
      (enforce_eager), so force_eager changes nothing else; it holds for this process only.
    - vLLM's gc.collect() calls while it loads the model walk every object the imports made (~0.5 s
      each); frozen, they are skipped. They live as long as the process anyway."""
    import torch

    torch.compiler.set_stance("force_eager")
    gc.freeze()


def _restarted_by_ray() -> bool:
    """This actor's process is a restart (Ray's record): the one way to count a death during its start, since its
    first answer already comes from the new process. False outside a Ray actor (a test, a benchmark)."""
    import ray

    context = ray.get_runtime_context() if ray.is_initialized() else None
    return bool(context and context.get_actor_id() and context.was_current_actor_reconstructed)


def resolve_dtype(dtype: str, cuda: bool) -> str:
    """`auto` resolved where the generator runs, as the learner resolves model.dtype in its own process: bfloat16
    on a GPU, float32 on a CPU. Resolved on the driver instead, a GPU-less head node made GPU generators float32
    beside a bfloat16 learner (twice the weight memory, behaviour log-probs of another precision)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if cuda else "float32"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Behaviour log-probs of the distribution that sampled: after temperature and top-k/top-p masking
# (vLLM's default, raw_logprobs, is the untempered softmax). Greedy requests get the untempered one.
LOGPROBS_MODE = "processed_logprobs"


def engine_options(cfg: GenerationConfig, cuda: bool, weight_transport: str = "shm", model_dir: str | None = None,
                   dtype: str = "auto") -> dict:
    """vLLM engine arguments that differ between a CUDA generator and a CPU one."""
    transfer = {"weight_transfer_config": {"backend": weight_transport}}
    if not cuda:
        # vLLM-CPU fails ("CPU Generator does not use offset") when a per-request seed meets a
        # prefill split into chunks (long prompts in a big batch); whole prefills avoid it.
        # One process: the engine core and its worker run inside this actor ("uni" executor, no
        # engine-core process), instead of two more processes that each import torch and vLLM again
        # (~15 s each on 2 cores; this is most of a run's start-up).
        return {"enforce_eager": True, "enable_chunked_prefill": False, "distributed_executor_backend": "uni",
                "logprobs_mode": LOGPROBS_MODE, "max_num_seqs": CPU_MAX_NUM_SEQS,
                "kv_cache_memory_bytes": cpu_kv_cache_bytes(cfg, model_dir, dtype), **transfer}
    options: dict = {"tensor_parallel_size": cfg.tensor_parallel_size, "logprobs_mode": LOGPROBS_MODE,
                     "gpu_memory_utilization": cfg.gpu_memory_utilization}
    if cfg.tensor_parallel_size > 1:
        # The actor holds all TP GPUs itself (one placement bundle): vLLM's own processes, not Ray workers.
        options["distributed_executor_backend"] = "mp"
    return {**options, **transfer}


CPU_MAX_NUM_SEQS = 256  # vLLM's own default for an offline CPU engine, set so that the KV budget below holds
CPU_BLOCK_TOKENS = 128  # vLLM-CPU's KV block size


def cpu_kv_cache_bytes(cfg: GenerationConfig, model_dir: str | None, dtype: str) -> int:
    """The CPU KV cache: what CPU_MAX_NUM_SEQS sequences of max_model_len tokens can fill, at most
    generation.kv_cache_gib. A tiny policy needs megabytes; the whole GiB would be allocated and touched at
    start (~0.5 s of page faults on 2 cores) and its every block walked by each prefix-cache reset."""
    cap = int(cfg.kv_cache_gib * 2**30)
    per_token = _kv_bytes_per_token(Path(model_dir) / "config.json", dtype) if model_dir else None
    if per_token is None:  # no model given, or one this cannot size: the configured budget, as vLLM would use it
        return cap
    blocks_per_seq = -(-cfg.max_model_len // CPU_BLOCK_TOKENS)
    return min(cap, CPU_MAX_NUM_SEQS * blocks_per_seq * CPU_BLOCK_TOKENS * per_token)


STATE_SPACE_KEYS = ("mamba", "ssm", "linear_")  # hybrid models also cache a per-sequence state: not sized here


def _kv_bytes_per_token(config_json: Path, dtype: str) -> int | None:
    """Keys and values of every layer for one token (a dense decoder's; None where the fields are missing or
    the model caches more than keys and values)."""
    try:
        hf = json.loads(config_json.read_text())
        if any(part in key for key in hf for part in STATE_SPACE_KEYS):
            return None
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        layers, kv_heads = hf["num_hidden_layers"], hf.get("num_key_value_heads") or heads
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    width = 2 if dtype in ("bfloat16", "float16") else 4  # "auto" sized as float32: never too small
    return 2 * layers * kv_heads * head_dim * width


def _finish_reason(out) -> FinishReason:
    return out.finish_reason if out.finish_reason in ("stop", "length") else "abort"
