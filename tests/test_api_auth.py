"""API token resolution and read access when bound beyond loopback (no run needed: auth runs first)."""
from __future__ import annotations

import stat
from pathlib import Path
from typing import cast

import pytest
from fastapi.testclient import TestClient

from async_rlhf.api.app import TOKEN_ENV, _is_loopback, create_app, resolve_token
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
