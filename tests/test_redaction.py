"""Secrets never reach config.yaml, check-config or the sinks: marked fields and URL credentials as ***."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from async_rlhf.config.base import ConfigError
from async_rlhf.config.redaction import SECRET, redact_url, redacted, secret_keys
from async_rlhf.config.run import RunConfig, dump_config, load_config
from async_rlhf.pipeline.resume import config_difference
from tests.helpers import ROOT, cli_command

TOKEN = "tok-0123456789abcdef-secret"


def test_secret_fields_come_from_the_config_declarations() -> None:
    assert "api.token" in secret_keys(RunConfig)
    assert all(key.count(".") >= 1 for key in secret_keys(RunConfig))  # dotted paths into sections


def test_url_credentials_are_redacted_and_plain_urls_kept() -> None:
    assert redact_url("https://bob:hunter2@rm.example:8500/v1") == "https://***@rm.example:8500/v1"
    assert redact_url("http://token@10.0.0.1/") == "http://***@10.0.0.1/"
    assert redact_url("http://127.0.0.1:8500") == "http://127.0.0.1:8500"
    # A password holding "@": HTTP clients split at the last one, and so does the redaction.
    assert redact_url("http://bob:hunt@er2@rm.example:8500/v1") == "http://***@rm.example:8500/v1"
    assert redact_url("http://rm.example:8500/a@b?x=c@d") == "http://rm.example:8500/a@b?x=c@d"  # not userinfo


def test_saved_config_has_no_secret_and_loads_back_equal_for_resume(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"api.token={TOKEN}", "reward.remote.url=http://bob:hunter2@127.0.0.1:8500"])
    data = redacted(cfg)
    assert data["api"]["token"] == SECRET and data["reward"]["remote"]["url"] == "http://***@127.0.0.1:8500"
    dump_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert TOKEN not in text and "hunter2" not in text
    saved = load_config(tmp_path / "config.yaml")  # *** reads back as unset, so it validates
    assert saved.api.token is None and config_difference(saved, cfg) is None


def test_check_config_prints_no_secret() -> None:
    out = subprocess.run(cli_command("check-config", "configs/quickstart.yaml", f"api.token={TOKEN}"), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert TOKEN not in out.stdout + out.stderr and "token: '***'" in out.stdout


@pytest.mark.parametrize(("overrides", "says"), [
    (["reward.remote.url=http://bob:hunt/er2@127.0.0.1:8500"], "reward.remote.url: its host or port cannot be read"),
    (["reward.remote.url=http://bob:hunt#er2@127.0.0.1:8500"], "reward.remote.url: its host or port cannot be read"),
    (["reward.remote.url=bob:hunter2@127.0.0.1:8500"], "reward.remote.url: String should match pattern"),
    (["reward.remote=http://bob:hunter2@127.0.0.1:8500"], "reward.remote: Input should be a valid dictionary"),
    (["reward.remote=x", "reward.remote.url=http://bob:hunter2@h"], "override 'reward.remote.url=***' conflicts"),
    (["http://bob:hunter2@127.0.0.1:8500"], "override '***' is not of the form key.sub=value"),
])
def test_a_config_error_never_repeats_a_credential(overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    assert says in str(err.value) and "hunt" not in str(err.value)
