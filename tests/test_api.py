"""HTTP status and control against a real uvicorn server and a real (tiny) run.

One long run (Controller in a background thread, real Ray + vLLM + DeepSpeed) serves every test in
this module in order; the last test stops it through the API.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from async_rlhf.api.app import serve_api
from async_rlhf.config.run import load_config
from async_rlhf.pipeline.controller import Controller
from async_rlhf.pipeline.state import RunPhase
from tests.helpers import ROOT, cli_command

pytestmark = pytest.mark.integration
TOKEN = "test-token-0123456789abcdef"
CONTROL = ["/control/pause", "/control/resume", "/control/stop", "/control/checkpoint"]


def wait_for(predicate, timeout: float = 120.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(scope="module")
def live(ray_local, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("api-run")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      ["learner.steps=100000", "eval.every=0", "task.eval_prompts=16", f"api.token={TOKEN}",
                       # a sum: /metrics has each one's mean, and what the TRL-form one logs (too_long)
                       "reward.train=[sort_partial, examples.rewards:exact_match]"])
    controller = Controller(cfg, run_dir, services=serve_api)
    thread = threading.Thread(target=controller.run, daemon=True)
    thread.start()
    url = wait_for(lambda: (run_dir / "api_url").is_file() and (run_dir / "api_url").read_text().strip())
    client = httpx.Client(base_url=url, timeout=30)
    wait_for(lambda: client.get("/status").json()["step"] >= 3, timeout=300)
    # version 0's evaluation runs beside the first steps (eval_schedule.py): its record may come after step 3
    wait_for(lambda: client.get("/history", params={"since": 1}).json()["evals"], timeout=300)
    yield {"client": client, "url": url, "controller": controller, "thread": thread, "run_dir": run_dir}
    controller.control.stop()
    thread.join(timeout=300)
    client.close()


def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def step(client: httpx.Client) -> int:
    return client.get("/status").json()["step"]


def test_read_endpoints(live) -> None:
    c = live["client"]
    health = c.get("/healthz").json()
    assert health["ok"] and {"controller", "learner", "reward_service", "generator-0"} <= set(health["components"])
    status = c.get("/status").json()
    assert status["phase"] == "running" and status["run_id"] == live["run_dir"].name
    assert status["generators"][0]["tokens_per_s"] > 0 and status["learner"]["mean_step_s"] > 0
    assert status["eta_s"] > 0 and status["reward_service"]["healthy"]
    queue = c.get("/queue").json()
    assert queue["capacity"] == 32 and queue["consumed"] >= 3 * 16 and queue["max_staleness_seen"] <= 1
    assert set(queue["staleness_histogram"]) <= {"0", "1"}
    history = c.get("/history", params={"since": 1}).json()
    assert history["steps"][0]["step"] == 2 and history["evals"][0]["version"] == 0
    wait_for(lambda: c.get("/history", params={"since": 3}).json()["steps"])  # a step logged past the page below
    page = c.get("/history", params={"since": 1, "limit": 2}).json()  # paged: a long run is never one answer
    assert [r["step"] for r in page["steps"]] == [2, 3] and page["next_since"] == 3 and page["more"]
    assert c.get("/history", params={"limit": 0}).status_code == 422
    metrics = c.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(metrics)}
    assert {"async_rlhf_learner_version", "async_rlhf_queue_depth", "async_rlhf_groups_consumed",
            "async_rlhf_trained_groups_by_staleness", "async_rlhf_generator_tokens_per_second",
            "async_rlhf_logprob_gap", "async_rlhf_logprob_gap_fresh"} <= names
    parts = {s.labels["reward"] for f in text_string_to_metric_families(metrics) for s in f.samples
             if f.name == "async_rlhf_reward_part_mean"}
    assert parts == {"sort_partial", "examples.rewards:exact_match"}
    logged = {s.labels["name"]: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
              if f.name == "async_rlhf_reward_logged"}
    assert logged.keys() == {"too_long"} and 0 <= logged["too_long"] <= 1
    assert "/control/max_staleness" in c.get("/openapi.json").json()["paths"]
    assert "<svg" in c.get("/").text


def test_control_requires_the_token_and_bad_requests_do_not_disturb(live) -> None:
    c = live["client"]
    for path in CONTROL:
        assert c.post(path).status_code == 401
        assert c.post(path, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 403
    bad = [
        c.put("/control/max_staleness", headers={**auth(), "Content-Type": "application/json"}, content=b"{oops"),
        c.put("/control/max_staleness", headers=auth(), json={"max_staleness": "many"}),
        c.put("/control/max_staleness", headers=auth(), json={"max_staleness": -1}),
        c.put("/control/max_staleness", headers=auth(), json={"max_staleness": 65}),
        c.put("/control/max_staleness", headers=auth(), json={"max_staleness": 1, "extra": True}),
        c.put("/control/max_staleness", headers=auth()),
        *(c.put("/control/max_staleness", headers=auth(), json={"max_staleness": v}) for v in (True, "3", 3.0)),
    ]
    assert [r.status_code for r in bad] == [422] * 9  # a bool, a string or a float is not coerced to a bound
    assert "not valid JSON" in bad[0].json()["detail"]
    assert "max_staleness" in bad[2].json()["detail"] and "greater than or equal to 0" in bad[2].json()["detail"]
    missing = c.get("/no/such/thing")
    assert missing.status_code == 404 and "no such path /no/such/thing" in missing.json()["detail"]
    assert c.get("/control/pause").status_code == 405
    before = step(c)
    wait_for(lambda: step(c) > before + 2, timeout=60)
    assert c.get("/status").json()["phase"] == "running" and c.get("/queue").json()["max_staleness"] == 1


def test_pause_stops_consumption_and_resume_restarts_it(live, capsys: pytest.CaptureFixture) -> None:
    c = live["client"]
    capsys.readouterr()
    assert c.post("/control/pause", headers=auth()).json()["ok"]
    assert c.post("/control/pause", headers=auth()).json()["ok"]  # already paused: said once
    wait_for(lambda: c.get("/status").json()["phase"] == "paused")
    time.sleep(1.0)  # let the step in flight, if any, finish
    consumed, version = c.get("/queue").json()["consumed"], step(c)
    time.sleep(3.0)
    # No batch taken from the queue; a step whose batch was taken before the pause may still end (on a loaded
    # machine its step outlasted the second above).
    assert c.get("/queue").json()["consumed"] == consumed and step(c) in (version, version + 1)
    assert c.get("/metrics").text.count("async_rlhf_paused 1.0") == 1
    c.post("/control/resume", headers=auth())
    wait_for(lambda: step(c) > version + 2, timeout=60)
    assert c.get("/status").json()["phase"] == "running"
    # Before: nothing on the run's terminal, so its log could not tell why its steps had stopped.
    said = [line for line in capsys.readouterr().out.splitlines() if "/control/" in line]
    assert said == ["[async-rlhf] paused (POST /control/pause): no new generation or learner step until POST "
                    "/control/resume", "[async-rlhf] resumed (POST /control/resume)"]


def test_checkpoint_is_written_and_loadable(live) -> None:
    c = live["client"]
    reply = c.post("/control/checkpoint", headers=auth(), timeout=300)
    assert reply.status_code == 200, reply.text
    path = Path(reply.json()["detail"]["path"])
    assert path.parent == live["run_dir"] / "checkpoints" and not list(path.parent.glob("*.partial"))
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == reply.json()["detail"]["version"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok)


def test_max_staleness_change_takes_effect(live, capsys: pytest.CaptureFixture) -> None:
    c = live["client"]
    assert c.put("/control/max_staleness", headers=auth(), json={"max_staleness": 0}).status_code == 200
    wait_for(lambda: c.get("/queue").json()["max_staleness"] == 0)
    time.sleep(1.0)  # groups sampled under the old bound are trained or dropped by now
    before = c.get("/queue").json()["staleness_histogram"]
    start = step(c)
    wait_for(lambda: step(c) >= start + 4, timeout=120)
    after = c.get("/queue").json()
    assert after["staleness_histogram"].get("1", 0) == before.get("1", 0)  # only fresh samples trained
    assert after["staleness_histogram"]["0"] > before.get("0", 0) and after["capacity"] == 16
    c.put("/control/max_staleness", headers=auth(), json={"max_staleness": 2})
    wait_for(lambda: c.get("/queue").json()["capacity"] == 48)
    assert "[async-rlhf] max_staleness set to 2 (PUT /control/max_staleness), from the next batch on" in (
        capsys.readouterr().out.splitlines())


def test_status_command_prints_the_run(live) -> None:
    out = subprocess.run(cli_command("status", "--url", live["url"]),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"phase running\s+step \d+/100000", out.stdout) and "generator 0" in out.stdout


def test_openapi_fuzz_has_no_server_errors(live, tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    common = [str(st), "run", f"{live['url']}/openapi.json", "--checks", "not_a_server_error",
              "--max-examples", "25", "--generation-deterministic", "--request-timeout", "60"]
    # Without the token everything is fuzzed, control included (all refused); with it, only the bound.
    anonymous = subprocess.run(common, capture_output=True, text=True, timeout=600)
    assert anonymous.returncode == 0, anonymous.stdout[-3000:]
    bound = subprocess.run(common + ["-H", f"Authorization: Bearer {TOKEN}",
                                     "--include-path", "/control/max_staleness"],
                           capture_output=True, text=True, timeout=600)
    assert bound.returncode == 0, bound.stdout[-3000:]
    assert live["client"].get("/status").json()["phase"] == "running"


def test_live_page_renders_numbers_in_chromium(live, tmp_path: Path) -> None:
    shot = tmp_path / "page.png"
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=4000"]
    dom = subprocess.run(base + ["--dump-dom", live["url"] + "/"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'data-k="step">\d+ / 100000<', dom.stdout), dom.stdout[-2000:]
    assert re.search(r'data-k="train reward">\d\.\d{3}<', dom.stdout)  # a sum of two rewards: 0 to 2
    assert "<polyline" in dom.stdout
    subprocess.run(base + [f"--screenshot={shot}", live["url"] + "/"], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000


def test_stop_ends_the_run_cleanly(live) -> None:
    c = live["client"]
    bound = c.get("/queue").json()["max_staleness"]  # whatever the fuzz pass left it at
    assert c.post("/control/stop", headers=auth()).json()["ok"]
    live["thread"].join(timeout=300)
    assert not live["thread"].is_alive() and live["controller"].view.phase is RunPhase.FINISHED
    summary = json.loads((live["run_dir"] / "summary.json").read_text())
    assert summary["stopped_early"] and summary["max_staleness"] == bound
    assert (live["run_dir"] / "final" / "model.safetensors").is_file()
    with pytest.raises(httpx.HTTPError):
        c.get("/healthz")
