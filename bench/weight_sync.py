"""Weight sync: publication -> a generator serving the new version, vs the memory-copy floor.

    .venv/bin/python -m bench.weight_sync [--sizes tiny small medium] [--repeats 5]

Per model size: the learner-side write (safetensors into the shared-memory transport, as
`Learner.save_weights` does) and the broker's atomic publish, then the generator-side load (a Ray
call to `GeneratorActor.load_weights`, vLLM's in-place `reload_weights`; the time inside the actor
and the Ray round trip are recorded apart), after which a one-token
generate confirms the engine serves. The floor is the model's bytes divided by the memory-copy
bandwidth measured in this process (one large tensor copy). Goal: write + load <= 2x the floor.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, build_policy, write_result, save_figure
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


def sync_once(broker, actor, state: dict, version: int, probe) -> dict[str, float]:
    import ray
    from safetensors.torch import save_file

    start = time.perf_counter()
    location = Path(broker.staging_location(version))
    save_file(state, str(location / "model.safetensors"), metadata={"format": "pt"})
    ref = broker.publish(version)
    written = time.perf_counter()
    inside = ray.get(actor.load_weights.remote(ref))  # seconds inside vLLM's reload_weights
    loaded = time.perf_counter()
    served = ray.get(actor.generate.remote([probe], n=1, temperature=0.0))
    if served.policy_version != version:
        raise RuntimeError(f"generator serves version {served.policy_version}, expected {version}")
    return {"write_s": written - start, "load_s": loaded - written, "reload_inside_s": inside,
            "ray_call_s": loaded - written - inside, "sync_s": loaded - start}


def measure_size(size: str, repeats: int, workdir: Path, bandwidth: float) -> dict:
    import ray

    from actors.generator import GeneratorActor
    from async_rlhf.broker import SharedMemoryTransport, WeightSyncBroker
    from async_rlhf.config import GenerationConfig
    from bench.generator_path import make_prompts

    model_dir = build_policy(size, workdir / size)
    nbytes = (model_dir / "model.safetensors").stat().st_size
    actor = ray.remote(GeneratorActor).options(num_cpus=0).remote(0, str(model_dir), GenerationConfig(), 0, [CORE])
    broker = WeightSyncBroker(SharedMemoryTransport(Path(tempfile.mkdtemp(prefix="bench-sync-", dir="/dev/shm"))))
    try:
        probe = make_prompts(1)[0]
        runs = [sync_once(broker, actor, perturbed_state(model_dir, v), v, probe) for v in range(1, repeats + 2)][1:]
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
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_weight_sync")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sync-models-") as tmp:
            sizes = [measure_size(s, args.repeats, Path(tmp), bandwidth) for s in args.sizes]
    finally:
        ray.shutdown()
    result = {"copy_bandwidth_gb_s": bandwidth / 1e9, "sizes": sizes, "goal_ratio": 2.0}
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
    ax.plot(mb, [2 * s["floor_s"] * 1e3 for s in sizes], linestyle="--", color="#c44e52", label="goal: 2x copy floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model size (MB, fp32)")
    ax.set_ylabel("ms")
    ax.set_title("weight sync, shared-memory transport")
    ax.legend()
    save_figure(fig, png)


if __name__ == "__main__":
    main()
