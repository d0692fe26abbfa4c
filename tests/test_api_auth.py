"""API token resolution and read access when bound beyond loopback (no run needed: auth runs first)."""
from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import cast

import pytest
from fastapi.testclient import TestClient

from async_rlhf.api.app import _is_loopback, create_app, resolve_token
from async_rlhf.config.runtime import API_TOKEN_ENV as TOKEN_ENV
from async_rlhf.config.runtime import ApiConfig
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.view import RunView


def test_token_from_config_then_env_then_generated_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment-123")
    assert resolve_token(ApiConfig(token="from-the-config-0123456"), tmp_path) == "from-the-config-0123456"
    assert resolve_token(ApiConfig(), tmp_path) == "from-the-environment-123"
    assert not (tmp_path / "api_token").exists()
    monkeypatch.delenv(TOKEN_ENV)
    token = resolve_token(ApiConfig(), tmp_path)
    path = tmp_path / "api_token"
    assert path.read_text().strip() == token and len(token) >= 24
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_short_config_token_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        ApiConfig(token="short")


def test_reads_need_the_token_when_not_on_loopback() -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0")
    # The auth dependency refuses before any controller state is read, so no run is needed here.
    no_view, no_control = cast(RunView, None), cast(RunControl, None)
    with TestClient(create_app(no_view, no_control, token="secret-token-0123456", open_reads=False)) as client:
        for path in ("/status", "/queue", "/metrics", "/healthz", "/history"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 403


def test_fixed_delay_refuses_a_new_bound(tmp_path: Path) -> None:
    # The broker keeps only the versions a fixed N needs; a new N would ask for ones already freed.
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.controller import Controller

    ctl = Controller(RunConfig(queue={"staleness_mode": "fixed"}, api={"enabled": False}), tmp_path)
    with TestClient(create_app(ctl.view, ctl.control, token="secret-token-0123456", open_reads=False)) as client:
        res = client.put("/control/max_staleness", json={"max_staleness": 4},
                         headers={"Authorization": "Bearer secret-token-0123456"})
    assert res.status_code == 409 and "staleness_mode=fixed" in res.json()["detail"]


def test_healthz_answers_503_when_the_run_failed_or_its_loop_is_stuck(tmp_path: Path) -> None:
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.controller import Controller
    from async_rlhf.pipeline.state import RunPhase
    from async_rlhf.pipeline.status import HEARTBEAT_STALE_S

    ctl = Controller(RunConfig(api={"enabled": False}), tmp_path)
    with TestClient(create_app(ctl.view, ctl.control, token="secret-token-0123456", open_reads=True)) as client:
        ctl.stats.phase = RunPhase.RUNNING
        assert client.get("/healthz").status_code == 200 and client.get("/healthz").json()["ok"]
        ctl.stats.heartbeat -= HEARTBEAT_STALE_S + 1  # the loop has not come round for longer than that
        stuck = client.get("/healthz")
        assert stuck.status_code == 503 and not stuck.json()["components"]["controller"]["ok"]
        ctl.stats.heartbeat += HEARTBEAT_STALE_S + 1
        ctl.stats.phase = RunPhase.FAILED
        failed = client.get("/healthz")
        assert failed.status_code == 503 and failed.json()["ok"] is False


def test_train_serves_the_api_only_when_enabled() -> None:
    from async_rlhf.api.app import serve_api
    from async_rlhf.cli.main import api_starter
    from async_rlhf.config.run import RunConfig

    assert api_starter(RunConfig()) is serve_api
    assert api_starter(RunConfig(api={"enabled": False})) is None


def test_a_control_call_is_refused_before_its_body_is_read_and_big_bodies_are_refused() -> None:
    """No run needed: the refusals come before any route, so no controller state is read."""
    no_view, no_control = cast(RunView, None), cast(RunControl, None)
    token = "secret-token-0123456"
    with TestClient(create_app(no_view, no_control, token=token, open_reads=False)) as client:
        broken = {"Content-Type": "application/json"}
        # Without the token a malformed body is not even parsed: 401, not 422.
        response = client.put("/control/max_staleness", headers=broken, content=b"{oops")
        assert response.status_code == 401 and "Authorization: Bearer" in response.json()["detail"]
        wrong = client.put("/control/max_staleness", headers={**broken, "Authorization": "Bearer nope-nope-nope"},
                           content=b"{oops")
        assert wrong.status_code == 403
        huge = client.put("/control/max_staleness", headers={**broken, "Authorization": f"Bearer {token}"},
                          content=b"[" + b"0," * 100_000 + b"0]")
        assert huge.status_code == 413 and "over 4096 bytes" in huge.json()["detail"]
        streamed = client.put("/control/max_staleness", headers={"Authorization": f"Bearer {token}"},
                              content=iter([b'{"max_staleness": ', b"2}"]))  # chunked: no Content-Length
        assert streamed.status_code == 411
        assert client.get("/control/pause").status_code == 405  # a wrong method is still named as such


def test_status_command_sends_the_token_when_reads_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    from async_rlhf.api.app import serve_api
    from async_rlhf.cli.main import main
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.controller import Controller

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cfg = RunConfig(api={"host": "0.0.0.0", "port": 0})  # beyond loopback: reads need the token
    ctl = Controller(cfg, tmp_path)
    ctl.lock.acquire()  # as Controller.start does before serving: the run is going
    api = serve_api(cfg, tmp_path, ctl.view, ctl.control)  # writes api_url and a new api_token
    try:
        capsys.readouterr()
        assert main(["status", "--run-dir", str(tmp_path)]) == 0  # the token from the run's api_token
        assert f"run {tmp_path.name}  phase" in capsys.readouterr().out
        url = (tmp_path / "api_url").read_text().strip()
        assert main(["status", "--url", url]) == 1
        assert capsys.readouterr().err.strip() == (
            f"status error: {url} refused the missing API token (reads need it when api.host is not loopback); "
            f"set ${TOKEN_ENV} or pass --run-dir DIR (its api_token)")
        monkeypatch.setenv(TOKEN_ENV, (tmp_path / "api_token").read_text().strip())
        assert main(["status", "--url", url, "--json"]) == 0
        assert '"phase"' in capsys.readouterr().out
    finally:
        api.stop()


def test_the_page_reads_with_the_token_from_its_fragment(tmp_path: Path) -> None:
    import subprocess

    from async_rlhf.api.app import ApiServer
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.controller import Controller

    cfg = RunConfig(api={"host": "0.0.0.0", "port": 0, "token": "page-token-0123456789"})
    ctl = Controller(cfg, tmp_path)
    api = ApiServer(ctl.view, ctl.control, cfg.api, tmp_path)
    url = api.start()

    def dom(page: str) -> str:
        cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", "--dump-dom", page]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout

    def error(page: str) -> str:
        found = re.search(r'id="error"[^>]*>([^<]*)<', page)
        return found.group(1) if found else "no error element"

    try:
        assert "reads need its API token" in error(dom(url + "/"))
        page = dom(url + "/#token=page-token-0123456789")
        assert re.search(r'data-k="step">-?\d+ / 200<', page) and error(page) == ""  # read, with the token
    finally:
        api.stop()


def test_a_non_finite_body_is_a_422_and_an_error_of_the_apis_own_one_line_with_its_traceback_in_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    # Before: {"max_staleness": 1e309} (or NaN) was answered 500, and two uvicorn tracebacks reached the run's
    # terminal: the 422 echoed the input, which JSON cannot hold.
    import httpx

    from async_rlhf.api.app import ApiServer
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.controller import Controller

    ctl = Controller(RunConfig(api={"enabled": False}), tmp_path)
    api = ApiServer(ctl.view, ctl.control, ApiConfig(port=0, token="secret-token-0123456"), tmp_path)
    url, auth = api.start(), {"Authorization": "Bearer secret-token-0123456", "Content-Type": "application/json"}
    try:
        for body in (b'{"max_staleness": 1e309}', b'{"max_staleness": NaN}'):
            res = httpx.put(f"{url}/control/max_staleness", content=body, headers=auth)
            assert res.status_code == 422 and res.json()["errors"][0]["input"] is None  # JSON has no NaN
        monkeypatch.setattr("async_rlhf.api.app.status_of", lambda *_: 1 / 0)  # a bug of the API's own
        res = httpx.get(f"{url}/status", headers=auth)
    finally:
        api.stop()
    line = (f"the HTTP API failed on GET /status (ZeroDivisionError: division by zero); the run goes on; traceback in "
            f"{tmp_path / 'api_errors.log'}")
    assert res.status_code == 500 and res.json() == {"detail": line}
    err = capfd.readouterr().err
    assert err.strip() == f"[async-rlhf] {line}" and "Traceback" not in err
    assert "ZeroDivisionError" in (tmp_path / "api_errors.log").read_text()
