"""Cores by load (resources.balance_cores): the generators' busy board, and the learner's real affinity
following it layer by layer."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from async_rlhf.cluster.busy_board import BusyBoard
from async_rlhf.cluster.resources import CoreLoan, bf16_note, core_loan, cpu_quota, plan_cores, usable_cores
from async_rlhf.config.run import RunConfig


def test_the_board_says_busy_while_a_generator_samples_and_how_long_all_have_idled(tmp_path: Path) -> None:
    board = BusyBoard.create(tmp_path / "board", 2)
    seen = BusyBoard.attach(tmp_path / "board")  # another process's view: the same shared bytes
    assert seen.slots == 2 and 0.0 <= seen.idle_for() < 1.0
    with pytest.raises(ValueError), board.busy(1):
        assert seen.idle_for() == 0.0
        raise ValueError("a failed call")
    assert 0.0 <= seen.idle_for() < 1.0  # idle again after the failed call
    board.mark(0, busy=True)
    time.sleep(0.05)
    assert seen.idle_for() == 0.0  # one of the two samples
    board.mark(0, busy=False)
    time.sleep(0.05)
    assert 0.05 <= seen.idle_for() < 1.0
    board.close()
    seen.close()


def test_bfloat16_on_a_cpu_is_noted_only_where_the_cpu_would_emulate_it(tmp_path: Path) -> None:
    native, plain = tmp_path / "native", tmp_path / "plain"
    native.write_text("flags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    plain.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    learner = RunConfig(learner={"autocast": "bfloat16"})
    generator = RunConfig(generation={"dtype": "bfloat16"})
    assert bf16_note(learner, gpus=False, cpuinfo=native) is None
    assert bf16_note(learner, gpus=True, cpuinfo=plain) is None  # GPUs: not the CPU's matmuls
    assert bf16_note(RunConfig(), gpus=False, cpuinfo=plain) is None  # float32: nothing to say
    note = bf16_note(learner, gpus=False, cpuinfo=plain)
    assert note is not None and "(learner.autocast)" in note and "learner.autocast=none" in note and "\n" not in note
    assert "(generation.dtype)" in (bf16_note(generator, gpus=False, cpuinfo=plain) or "")
    assert bf16_note(learner, gpus=False, cpuinfo=tmp_path / "missing") is not None


def test_only_a_pinned_single_rank_cpu_plan_lends_cores() -> None:
    cfg = RunConfig(resources={"balance_cores": True})
    plan = plan_cores(cfg, [0, 1])
    made = core_loan(cfg, plan, "/dev/shm/board")
    assert plan.pinned and made is not None and (made.own, made.every, made.board) == ([1], [0, 1], "/dev/shm/board")
    assert core_loan(cfg, plan_cores(cfg, [0, 1], gpus=True), "b") is None
    assert core_loan(RunConfig(resources={"balance_cores": False}), plan, "b") is None
    sync = RunConfig(queue={"max_staleness": 0}, resources={"balance_cores": True})
    assert core_loan(sync, plan_cores(sync, [0, 1]), "b") is None


def plan(staleness: int, generators: int, cores: int, pin: str = "auto") -> tuple:
    cfg = RunConfig(queue={"max_staleness": staleness}, resources={"pin_cores": pin},
                    generation={"num_generators": generators, "prompts_per_step": 12})
    made = plan_cores(cfg, list(range(cores)))
    return made.generator_cores, made.learner_cores, made.learner_threads, made.pinned


def test_no_two_thread_pools_share_a_core_unless_there_are_more_generators_than_cores() -> None:
    # Async with a core to spare: a core per generator, the rest to the learner.
    assert plan(1, 1, 2) == ([[0]], [1], 1, True)
    assert plan(1, 2, 8) == ([[0], [1]], [2, 3, 4, 5, 6, 7], 6, True)
    # Async without one: a core per generator (in turn when they outnumber the cores), the learner one thread.
    assert plan(1, 2, 2) == ([[0], [1]], [0, 1], 1, False)
    assert plan(1, 4, 2) == ([[0], [1], [0], [1]], [0, 1], 1, False)
    # Sync: the generators split the cores, the learner (alone) takes them all.
    assert plan(0, 1, 2) == ([[0, 1]], [0, 1], 2, False)
    assert plan(0, 2, 2) == ([[0], [1]], [0, 1], 2, False)
    assert plan(0, 3, 8) == ([[0, 1, 2], [3, 4, 5], [6, 7]], list(range(8)), 8, False)
    assert plan(1, 2, 2, pin="off") == ([[0, 1], [0, 1]], [0, 1], 2, False)
    shared = RunConfig(generation={"num_generators": 2}, resources={"balance_cores": True})
    assert core_loan(shared, plan_cores(shared, [0, 1]), "b") is None  # the learner has no core of its own


class ScriptedBoard:
    """Answers idle_for() from a script, and notes the learner's cores and threads at each question."""

    def __init__(self, answers: list[float]) -> None:
        self.answers = answers
        self.seen: list[tuple[list[int], int]] = []

    def idle_for(self) -> float:
        import torch

        self.seen.append((sorted(os.sched_getaffinity(0)), torch.get_num_threads()))
        return self.answers.pop(0)


def lend_through_a_pass(_actor, own: list[int], every: list[int]) -> dict:
    """In a Ray worker (its affinity may change): 3 layers, idle during the forward, busy in the backward."""
    import torch

    from async_rlhf.cluster.resources import pin_process
    from learners.core_lending import CoreLending

    pin_process(own, len(own))
    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    model = torch.nn.Sequential(layers)
    board = ScriptedBoard([1.0] * 3 + [0.0] * 3)
    lending = CoreLending(own, every, board, idle_s=0.5)  # type: ignore[arg-type]  # a stand-in board
    lending.watch(model)
    x = torch.ones(2, 4, requires_grad=True)
    for layer in layers:
        x = layer(x)
    wide_after_forward = (sorted(os.sched_getaffinity(0)), torch.get_num_threads())
    x.sum().backward()
    return {"seen": board.seen, "wide_after_forward": wide_after_forward, "moves": lending.moves,
            "end": (sorted(os.sched_getaffinity(0)), torch.get_num_threads()), "wide_s": lending.take_wide_s()}


class Worker:
    pass


def test_the_learner_widens_while_the_generators_idle_and_narrows_between_layers_when_one_samples(ray_local) -> None:
    """CoreLending's hooks on a real torch model: asked before each layer's forward and as each layer's
    gradient arrives; the real affinity and thread count follow the board (own = one core, every = all)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("lending needs two cores")
    own, every = cores[1:2], cores[:2]
    worker = ray_local.remote(Worker).options(num_cpus=0).remote()
    out = ray_local.get(worker.__ray_call__.remote(lend_through_a_pass, own, every))
    ray_local.kill(worker)
    narrow, wide = (own, 1), (every, 2)
    # First question on its own core; it widens, so the 2nd and 3rd layers run on both; the first gradient
    # question still sees both, says busy, and the rest of the backward runs on its own core again.
    assert [tuple(s) for s in out["seen"]] == [narrow, wide, wide, wide, narrow, narrow]
    assert tuple(out["wide_after_forward"]) == wide and tuple(out["end"]) == narrow
    assert out["moves"] == 2 and out["wide_s"] > 0


def lending_state(learner) -> dict:
    import torch

    lending = learner.lending
    return {"wide": lending.wide, "moves": lending.moves, "cores": sorted(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads()}


@pytest.mark.integration
def test_a_real_generator_marks_the_board_and_a_real_learner_borrows_its_idle_core(ray_local, random_policies,
                                                                                   tmp_path: Path) -> None:
    """Both ends on real components: a GeneratorActor's call shows as busy on the board while it samples; a
    Learner given the loan widens onto every core in its next pass while the board says idle."""
    from actors.generator import GeneratorActor
    from async_rlhf.config.generation import GenerationConfig
    from async_rlhf.rollout import Prompt
    from learners.learner import Learner
    from tests.helpers import make_group

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("lending needs two cores")
    path = tmp_path / "busy_board"
    board = BusyBoard.create(path, 1)
    cfg = GenerationConfig(samples_per_prompt=4, max_new_tokens=48, max_model_len=64)
    gen = ray_local.remote(GeneratorActor).options(num_cpus=0).remote(0, str(random_policies[0]), cfg, 0, cores[:1],
                                                                      "float32", "shm", None, str(path))
    ray_local.get(gen.info.remote())
    call = gen.generate.remote([Prompt(i, "p", [1, 5, 6, 7]) for i in range(32)])
    seen_busy = False
    while ray_local.wait([call], timeout=0.001)[1]:
        seen_busy = seen_busy or board.idle_for() == 0.0
    ray_local.get(call)
    assert seen_busy and board.idle_for() > 0.0

    loan = CoreLoan(cores[1:2], cores[:2], str(path))
    learner = ray_local.remote(Learner).options(num_cpus=0).remote(RunConfig(), str(random_policies[0]), cores[1:2], 1,
                                                                   None, loan)
    assert ray_local.get(learner.__ray_call__.remote(lending_state))["cores"] == cores[1:2]
    time.sleep(0.1)  # the generator has idled longer than CoreLending.idle_s
    ray_local.get(learner.sampled_kl_to_reference.remote([make_group(0)], 1.0))
    state = ray_local.get(learner.__ray_call__.remote(lending_state))
    assert state == {"wide": True, "moves": 1, "cores": cores[:2], "threads": 2}
    ray_local.kill(gen)
    ray_local.kill(learner)
    board.close()


def cgroup_tree(root: Path, files: dict[str, str], membership: str) -> tuple[Path, Path]:
    """A /sys/fs/cgroup tree with `files` (path -> text) and a /proc/self/cgroup of `membership`."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "self-cgroup").write_text(membership)
    return root / "fs", root / "self-cgroup"


@pytest.mark.parametrize(("files", "membership", "quota"), [
    ({"fs/cpu.max": "150000 100000\n"}, "0::/\n", 1.5),  # cgroup v2 in a container: `docker run --cpus 1.5`
    ({"fs/cpu.max": "max 100000\n"}, "0::/\n", None),  # no quota
    ({"fs/cpu.max": "400000 100000\n", "fs/job/cpu.max": "max 100000\n"}, "0::/job\n", 4.0),  # a parent's quota
    ({"fs/cpu/cpu.cfs_quota_us": "50000\n", "fs/cpu/cpu.cfs_period_us": "100000\n"},
     "4:memory:/x\n3:cpu,cpuacct:/\n0::/\n", 0.5),  # cgroup v1 (the v2 line of a hybrid host has no cpu.max)
    ({"fs/cpu/cpu.cfs_quota_us": "-1\n", "fs/cpu/cpu.cfs_period_us": "100000\n"}, "3:cpu,cpuacct:/\n", None),
    ({}, "", None),  # no cgroups to read (another OS, a sandbox)
])
def test_the_cgroup_cpu_quota_is_read_from_v1_and_v2(tmp_path: Path, files: dict[str, str], membership: str,
                                                      quota: float | None) -> None:
    cgroups, self_cgroup = cgroup_tree(tmp_path, files, membership)
    assert cpu_quota(cgroups, self_cgroup) == quota


def test_a_cpu_quota_below_the_cores_in_view_cuts_the_cores_used(tmp_path: Path) -> None:
    # `docker run --cpus 1.5` on a bigger host: every core in view, CPU time for 1.5; the plan used them all.
    cores = sorted(os.sched_getaffinity(0))
    cgroups, self_cgroup = cgroup_tree(tmp_path, {"fs/cpu.max": "150000 100000\n"}, "0::/\n")
    assert usable_cores(cgroups, self_cgroup) == cores[:2]
    cgroups, self_cgroup = cgroup_tree(tmp_path / "half", {"fs/cpu.max": "50000 100000\n"}, "0::/\n")
    assert usable_cores(cgroups, self_cgroup) == cores[:1]
    assert usable_cores(tmp_path / "none", tmp_path / "none-cgroup") == cores
