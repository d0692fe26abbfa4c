"""GeneratorPool with two chunks in flight per generator (generation.chunks_in_flight=2), without Ray:
fake actor handles and refs, a counting broker. Leases, breadth-first dispatch, results, deaths, quiesce."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from actors.generation_result import GenerationResult
from async_rlhf.config.run import RunConfig
from async_rlhf.outputs.timeline import Timeline
from async_rlhf.pipeline import generator_hangs, generators, waits
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.queue import GateInputs
from async_rlhf.pipeline.state import Components, GeneratorSlot, LoopState, RunStats
from async_rlhf.pipeline.timing import Timing
from async_rlhf.rollout import Prompt
from async_rlhf.weights.broker import VersionError


class Ref:
    """A generate call's answer, set by the test: a result, or the actor's death."""

    def __init__(self, prompts: list[Prompt], version: int | None) -> None:
        self.prompts, self.version, self.outcome = prompts, version, None

    def get(self) -> Any:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return GenerationResult([], 0, self.version or 0, 0.1, 0.0, time.time(), 0, reward_s=0.0)


class Probe:
    """An info() call's ref, queued behind the handle's calls."""

    def __init__(self, handle: "Handle") -> None:
        self.handle = handle


class Handle:
    def __init__(self) -> None:
        self.calls: list[Ref] = []
        self.generate = SimpleNamespace(remote=self._generate)
        self.info = SimpleNamespace(remote=lambda: Probe(self))

    def _generate(self, prompts: list[Prompt], weights: Any, **_: Any) -> Ref:
        self.calls.append(Ref(prompts, weights.version if weights else None))
        return self.calls[-1]


class Broker:
    def __init__(self) -> None:
        self.latest_version = 0
        self.leased: Counter[int] = Counter()
        self.released: Counter[int] = Counter()

    def latest(self) -> Any:
        return SimpleNamespace(version=self.latest_version)

    def lease(self, version: int) -> Any:
        self.leased[version] += 1
        return SimpleNamespace(version=version)

    def release(self, version: int) -> None:
        self.released[version] += 1


class Task:
    def train_prompt(self, i: int) -> Prompt:
        return Prompt(i, str(i), [i])


def make_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gens: int = 1, bound: int = 1,
              mode: str = "bound", transport: str = "shm") -> tuple[GeneratorPool, Broker, Any]:
    fake = SimpleNamespace(get=lambda ref: ref.get(), exceptions=ray.exceptions,
                           wait=lambda refs, **_: (refs[:1], refs[1:]))
    for module in (generators, waits):
        monkeypatch.setattr(module, "ray", fake)
    cfg = RunConfig.model_validate(  # nccl needs GPUs where it runs, so not this machine's check
        {"generation": {"num_generators": gens, "prompts_per_step": 4, "chunks_in_flight": 2},
         "queue": {"max_staleness": bound, "staleness_mode": mode}, "weight_sync": {"transport": transport}},
        context={"environment": False})
    broker, rewards = Broker(), SimpleNamespace(queue_scored=lambda *a: None)
    parts = Components(task=Task())  # type: ignore[arg-type]  # fakes: the pool only calls what they define
    pool = GeneratorPool(cfg, parts, LoopState(), RunStats(), broker, rewards,  # type: ignore[arg-type]
                         Timing(), Timeline(tmp_path / "timeline.jsonl"))
    pool.slots = [GeneratorSlot(Handle(), i) for i in range(gens)]

    def gate() -> GateInputs:
        return GateInputs(pool.state.steps_taken, pool.state.outstanding, broker.latest_version, pool.chunk, 4,
                          bound, 100, cfg.queue_capacity, mode)  # type: ignore[arg-type]
    return pool, broker, gate


def prompt_ids(chunks: Any) -> list[list[int]]:
    return [[p.prompt_id for p in c.prompts] for c in chunks]


def test_the_next_chunk_is_queued_behind_the_first_and_each_lease_is_released_once(tmp_path, monkeypatch) -> None:
    pool, broker, gate = make_pool(tmp_path, monkeypatch)
    pool.dispatch(gate)  # step 0 and step 1 (1 ahead of version 0): both go out now, with version 0
    slot = pool.slots[0]
    assert prompt_ids(slot.chunks) == [[0, 1, 2, 3], [4, 5, 6, 7]] and len(pool.jobs()) == 2
    assert broker.leased == {0: 2} and pool.state.outstanding == 8
    pool.dispatch(gate)  # two in flight: nothing more, whatever the gate says
    assert len(slot.chunks) == 2
    first = slot.chunks[0].ref
    pool.on_generated(slot, first)
    assert broker.released == {0: 1} and [c.ref for c in slot.chunks] == [slot.handle.calls[1]]
    pool.state.steps_taken, pool.state.outstanding, broker.latest_version = 1, 4, 1  # step 0 trained
    pool.dispatch(gate)  # step 2 with version 1, queued behind step 1's chunk
    assert [c.leased_version for c in slot.chunks] == [0, 1] and pool.state.outstanding == 8
    pool.finish(slot)  # both, oldest first
    assert not slot.chunks and broker.released == broker.leased == {0: 2, 1: 1}


def test_synchronous_gate_lets_no_second_chunk_out(tmp_path, monkeypatch) -> None:
    for gens in (1, 2):
        pool, broker, gate = make_pool(tmp_path, monkeypatch, gens=gens, bound=0)
        pool.dispatch(gate)
        assert [len(s.chunks) for s in pool.slots] == [1] * gens  # breadth first: the step spread over all
        assert pool.state.outstanding == 4


def test_a_generator_dying_with_two_chunks_re_issues_each_once_with_its_version(tmp_path, monkeypatch,
                                                                                capsys) -> None:
    pool, broker, gate = make_pool(tmp_path, monkeypatch, bound=2, mode="fixed")
    pool.dispatch(gate)
    slot = pool.slots[0]
    refs = [c.ref for c in slot.chunks]
    for ref in refs:
        ref.outcome = ray.exceptions.RayActorError()
    pool.on_generated(slot, refs[0])
    assert slot.recovering and list(pool.state.reissue) == [(refs[0].prompts, 0)]
    pool.dispatch(gate)
    assert slot.probe is None  # not before the second chunk is handled: the probe would queue behind it
    pool.on_generated(slot, refs[1])
    assert [([p.prompt_id for p in ps], v) for ps, v in pool.state.reissue] == [([0, 1, 2, 3], 0), ([4, 5, 6, 7], 0)]
    assert broker.released == broker.leased == {0: 2}
    assert capsys.readouterr().err == ("[async-rlhf] generator 0 died (RayActorError); waiting for Ray to restart it; "
                                       "the prompts of its 2 batch(es) in flight will be re-issued\n")  # once
    slot.not_before = 0.0
    pool.dispatch(gate)
    assert isinstance(slot.probe, Probe) and not slot.chunks
    slot.probe, slot.recovering = None, False  # it answered
    pool.dispatch(gate)  # the lost prompts first, each once, with their versions (fixed delay)
    assert prompt_ids(slot.chunks) == [[0, 1, 2, 3], [4, 5, 6, 7]] and not pool.state.reissue
    assert pool.state.outstanding == 8 and pool.state.next_prompt == 8


def test_a_call_of_a_process_whose_death_was_handled_already_is_re_issued_without_a_second_death(
        tmp_path, monkeypatch, capsys) -> None:
    # An evaluation's wait saw generator 0's death first and awaited its restart ("is back"); the loop then met the
    # training call that the dead process held. Before: "generator 0 died ...; waiting for Ray to restart it" after
    # "is back", and a probe of a generator already back.
    pool, broker, gate = make_pool(tmp_path, monkeypatch)
    pool.dispatch(gate)
    slot = pool.slots[0]
    old = slot.chunks[0].ref
    old.outcome = ray.exceptions.RayActorError()
    slot.restarts += 1  # what GeneratorPool.await_restart counted on its new pid
    pool.on_generated(slot, old)
    assert not slot.recovering and [[p.prompt_id for p in ps] for ps, _ in pool.state.reissue] == [[0, 1, 2, 3]]
    assert capsys.readouterr().err == "" and broker.released == {0: 1}


def test_quiesce_releases_every_chunks_lease(tmp_path, monkeypatch) -> None:
    pool, broker, gate = make_pool(tmp_path, monkeypatch)
    done = SimpleNamespace(wait=lambda refs, **_: (refs, []), exceptions=ray.exceptions)  # every call ended
    for module in (generators, waits):
        monkeypatch.setattr(module, "ray", done)
    pool.dispatch(gate)
    pool.quiesce()
    assert broker.released == broker.leased == {0: 2} and not pool.jobs() and pool.slots[0].recovering


@pytest.mark.parametrize("transport", ["nccl", "shm"])
@pytest.mark.parametrize("queued", [True, False])
def test_quiesce_restarts_a_generator_stuck_in_the_dead_learners_push(tmp_path, monkeypatch, transport: str,
                                                                      queued: bool) -> None:
    # GPU only in life (an NCCL receive whose sender died never returns); here a stuck generator's calls are refs
    # that never complete. Before, only a generator with a batch queued behind its receive call was found: an idle
    # one stayed in the dead push and the new learner's group could not form.
    pool, broker, gate = make_pool(tmp_path, monkeypatch, gens=2, transport=transport)
    if queued:
        pool.dispatch(gate)
    stuck = pool.slots[1].handle

    def wait(refs: list[Any], **_: Any) -> tuple[list[Any], list[Any]]:  # a killed generator's calls fail: done
        never = [r for r in refs if not killed and (r in stuck.calls or getattr(r, "handle", None) is stuck)]
        return [r for r in refs if r not in never], never

    killed: list[Any] = []
    fake = SimpleNamespace(wait=wait, kill=lambda handle, no_restart: killed.append((handle, no_restart)),
                           exceptions=ray.exceptions)
    for module in (generators, waits, generator_hangs):
        monkeypatch.setattr(module, "ray", fake)
    pool.slots[1].answered_at -= 3600  # silent for an hour
    pool.quiesce()
    # shm: nothing waits on the learner, and a generator idle in it is no hang; one with a batch in flight is
    # killed by the hang check the wait runs (it ended the run after learner.stall_timeout_s).
    assert killed == ([(stuck, False)] if transport == "nccl" or queued else [])  # once, and Ray may restart it
    assert not pool.jobs() and broker.released == broker.leased and all(s.recovering for s in pool.slots)


def test_pushed_weights_keep_one_chunk_per_generator() -> None:
    # The learner's push is an actor call: it must not wait behind a second chunk.
    for transport, depth in (("shm", 2), ("nccl", 1), ("ipc", 1)):
        data = {"weight_sync": {"transport": transport}, "generation": {"gpu_memory_utilization": 0.45}}
        cfg = RunConfig.model_validate(data, context={"environment": False})  # no GPU here: the config alone
        assert GeneratorPool(cfg, *[None] * 7).depth == depth  # type: ignore[arg-type]


class Answer:
    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


class Failing:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def get(self) -> Any:
        raise self.exc


@pytest.mark.parametrize("new_pid", [False, True])
def test_pushed_weights_a_generator_restarted_between_calls_is_recovered_not_fatal(
        tmp_path, monkeypatch, new_pid: bool) -> None:
    """nccl (GPU only, so fake handles): a generator killed while idle failed no call; its new process refuses the
    next batch's version. That is a restart (probe, the group formed anew, the prompts re-issued), told apart by
    its pid from a version error of a process that did not change, which still ends the run."""
    pool, _, gate = make_pool(tmp_path, monkeypatch, transport="nccl")
    pool.dispatch(gate)
    slot = pool.slots[0]
    slot.pid = 10
    slot.handle.info = SimpleNamespace(remote=lambda: Answer({"pid": 11 if new_pid else 10}))
    refused = slot.chunks[0].ref
    refused.outcome = ray.exceptions.RayTaskError("generate", "traceback", VersionError("holds version 0, asked 3"))
    if not new_pid:
        with pytest.raises(ray.exceptions.RayTaskError):
            pool.on_generated(slot, refused)
        return
    connected: list[int] = []
    monkeypatch.setattr(pool, "connect", lambda: connected.append(1))
    pool.on_generated(slot, refused)
    assert slot.recovering and [[p.prompt_id for p in ps] for ps, _ in pool.state.reissue] == [[0, 1, 2, 3]]
    pool._note_alive(slot, {"pid": 11})  # the probe's answer: the group is formed anew with the new process
    assert connected == [1] and slot.restarts == 1 and not slot.recovering


def test_pushed_weights_the_group_forms_anew_once_the_generations_in_flight_are_done(tmp_path, monkeypatch) -> None:
    # nccl (GPU only, fakes): each generator joins only after the calls queued before its join, and vLLM's
    # rendezvous waits at most 300 s for all of them, so the pool lets the generations in flight finish first.
    pool, _, gate = make_pool(tmp_path, monkeypatch, gens=2, transport="nccl")
    pool.dispatch(gate)
    events: list[Any] = []
    def wait(refs: list[Any], **kw: Any) -> tuple[list[Any], list[Any]]:
        events.append(("wait", refs, kw))
        return refs, []

    monkeypatch.setattr(generators, "ray", SimpleNamespace(wait=wait, exceptions=ray.exceptions))
    monkeypatch.setattr(pool, "connect", lambda: events.append("connect"))
    in_flight = list(pool.jobs())
    pool._note_alive(pool.slots[0], {"pid": 11})  # generator 0 came back as a new process
    assert events == [("wait", in_flight, {"num_returns": 2, "timeout": pool.cfg.weight_sync.timeout_s}), "connect"]


@pytest.mark.parametrize(("text", "line"), [
    ("The actor died unexpectedly before finishing this task.\n\tclass_name: GeneratorActor\n\tpid: 6830\n"
     "The actor is dead because its owner has died. Worker exit detail: Owner's node has crashed.",
     "the Ray node of generator 0 crashed (its raylet was killed or ran out of memory); Ray logs under "),
    ("The actor died unexpectedly before finishing this task.\n\tclass_name: GeneratorActor\n\tpid: 6830",
     "generator 0 died and Ray will not restart it again (generation.max_restarts=3): ActorDiedError: The actor "
     "died unexpectedly before finishing this task; why it died is in its log under "),
])
def test_a_generator_gone_for_good_ends_the_run_with_one_line_naming_why(tmp_path, monkeypatch, text: str,
                                                                          line: str) -> None:
    """Ray's own ActorDiedError text (here as a killed raylet left it): the run's last line is one line, and a
    lost node is called that, not restarts used up."""
    from async_rlhf.failures import RunError

    pool, _, _ = make_pool(tmp_path, monkeypatch)
    slot = pool.slots[0]
    gone = ray.exceptions.ActorDiedError()
    gone.error_msg = text
    with pytest.raises(RunError) as err:
        pool.on_probe(slot, Failing(gone))
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_a_generator_that_died_running_a_reward_function_says_so_in_both_its_lines(tmp_path, monkeypatch,
                                                                                  capsys) -> None:
    """A train reward scored in the generator that ends its process (os._exit): before, "generator 0 died" three
    times and the run's end, nothing naming the function. Its mark (reward_models/scoring_marks.py) names it."""
    from async_rlhf.failures import RunError
    from reward_models.scoring_marks import ScoringMarks

    pool, _, gate = make_pool(tmp_path, monkeypatch)
    pool.parts.scratch_dir = str(tmp_path / "scratch")
    pool.dispatch(gate)
    slot = pool.slots[0]
    running = ScoringMarks(pool.parts.scratch_dir, "generator-0").held("train", "reward.train scorer 'm:f'")
    running.__enter__()  # and never left: kept referenced, as a dead process leaves it
    chunk = slot.chunks[0].ref
    chunk.outcome = ray.exceptions.ActorUnavailableError("gone", None)  # the process died inside the block above
    pool.on_generated(slot, chunk)
    clause = (" while running reward.train scorer 'm:f' (a reward function that ends its process, with os._exit or a "
              "crash in native code, kills the worker it runs in)")
    assert f"generator 0 died (ActorUnavailableError){clause}; waiting for Ray" in capsys.readouterr().err
    gone = ray.exceptions.ActorDiedError()
    gone.error_msg = "The actor died unexpectedly before finishing this task.\n\tclass_name: GeneratorActor"
    with pytest.raises(RunError) as err:
        pool.on_probe(slot, Failing(gone))
    assert str(err.value).startswith(f"generator 0 died{clause} and Ray will not restart it again ")
