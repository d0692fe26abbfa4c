"""Weight sync: publication -> a generator serving the new version, vs the memory-copy floor.

    .venv/bin/python -m bench.weight_sync [--sizes tiny small medium] [--repeats 5]

Per model size: the learner-side write (an in-place copy into the broker's shared-memory slot ring, as
`Learner.save_weights` does) and the broker's publish, then the generator-side load (a Ray call to
`GeneratorActor.load_weights`: vLLM's weight-update protocol with the "shm" engine, which loads the slot
through the model's `load_weights` inside the layer-wise reload and re-packs the CPU kernels; the time
inside the actor and the Ray round trip are recorded apart), after which a one-token generate confirms
the engine serves. The floor is the model's bytes divided by the memory-copy bandwidth measured in this
process (one large tensor copy). Goal: write + load <= 3x the floor (two copies are 2x).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from async_rlhf.cli.arguments import positive_int
from bench.common import RESULTS, SIZES, build_policy, save_figure, start_bench_ray, write_result
from bench.generator_path import CORE

COPY_BYTES = 256 * 2**20  # large enough to leave the caches, small enough for any CI machine


def copy_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of a single-threaded large tensor copy (the floor moves every byte once)."""
    import torch

    torch.set_num_threads(1)
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return COPY_BYTES / min(times)


def perturbed_state(model_dir: Path, version: int) -> dict:
    """The checkpoint's tensors shifted by a version-dependent amount: every sync moves new bytes."""
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    return {k: (v + version * 1e-4).contiguous() for k, v in state.items()}


def sync_once(broker, ring, actor, state: dict, version: int, probe) -> dict[str, float]:
    import ray

    from async_rlhf.weights.slot_location import parse_slot_location

    start = time.perf_counter()
    location = parse_slot_location(broker.staging_location(version))
    if location is None:
        raise RuntimeError("bench: the broker's staging location is not an shm slot")
    _, slot = location
    ring.write(slot, state)
    ref = broker.publish(version)
    written = time.perf_counter()
    inside = ray.get(actor.load_weights.remote(ref))  # seconds inside vLLM's weight update
    loaded = time.perf_counter()
    served = ray.get(actor.generate.remote([probe], n=1, temperature=0.0))
    if served.policy_version != version:
        raise RuntimeError(f"generator serves version {served.policy_version}, expected {version}")
    return {"write_s": written - start, "load_s": loaded - written, "reload_inside_s": inside,
            "ray_call_s": loaded - written - inside, "sync_s": loaded - start}


def measure_size(size: str, repeats: int, workdir: Path, bandwidth: float) -> dict:
    import ray

    from actors.generator import GeneratorActor
    from async_rlhf.config.generation import GenerationConfig
    from async_rlhf.weights.broker import SharedMemoryTransport, WeightSyncBroker
    from async_rlhf.weights.shm_ring import ShmSlotRing
    from bench.generator_path import make_prompts

    model_dir = build_policy(size, workdir / size)
    nbytes = (model_dir / "model.safetensors").stat().st_size
    actor: Any = ray.remote(GeneratorActor).options(num_cpus=0).remote(  # Ray's types miss .options()
        0, str(model_dir), GenerationConfig(), 0, [CORE])
    root = Path(tempfile.mkdtemp(prefix="bench-sync-", dir="/dev/shm"))
    broker, ring = WeightSyncBroker(SharedMemoryTransport(root)), ShmSlotRing(root)
    try:
        probe = make_prompts(1)[0]
        # The first versions create and touch the ring's slots (once per run); the rest reuse them.
        runs = [sync_once(broker, ring, actor, perturbed_state(model_dir, v), v, probe)
                for v in range(1, repeats + 3)][2:]
    finally:
        broker.close()
        ray.kill(actor)
    floor = nbytes / bandwidth
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    return {"size": size, "bytes": nbytes, "floor_s": floor, "runs": runs, "best": best,
            "ratio_to_floor": best["sync_s"] / floor, "load_ratio_to_floor": best["load_s"] / floor}


def main(argv: list[str] | None = None) -> dict:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_weight_sync")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth()
    start_bench_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sync-models-") as tmp:
            sizes = [measure_size(s, args.repeats, Path(tmp), bandwidth) for s in args.sizes]
    finally:
        ray.shutdown()
    result = {"copy_bandwidth_gb_s": bandwidth / 1e9, "sizes": sizes, "goal_ratio": 3.0}
    plot(write_result(args.out, result), sizes)
    for s in sizes:
        print(f"{s['size']}: {s['bytes'] / 1e6:.1f} MB, write {s['best']['write_s'] * 1e3:.1f} ms + load "
              f"{s['best']['load_s'] * 1e3:.1f} ms, floor {s['floor_s'] * 1e3:.2f} ms, {s['ratio_to_floor']:.1f}x")
    return result


def plot(png: Path, sizes: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    mb = [s["bytes"] / 1e6 for s in sizes]
    for key, label in (("write_s", "write + publish"), ("load_s", "generator load"), ("sync_s", "total")):
        ax.plot(mb, [s["best"][key] * 1e3 for s in sizes], marker="o", label=label)
    ax.plot(mb, [3 * s["floor_s"] * 1e3 for s in sizes], linestyle="--", color="#c44e52", label="goal: 3x copy floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model size (MB, fp32)")
    ax.set_ylabel("ms")
    ax.set_title("weight sync, shm slot ring + vLLM weight-transfer engine")
    ax.legend()
    save_figure(fig, png)


if __name__ == "__main__":
    main()
