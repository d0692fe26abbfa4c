"""The side commands' bad input (serve-reward, train-rm, sample-pairs, status): one line and an exit status
before anything loads, never a failure inside TRL, vLLM or uvicorn after it, nor a traceback file."""
from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import Iterator

import pytest

from async_rlhf.cli.arguments import fraction, non_negative_float, port, positive_float, positive_int
from async_rlhf.cli.main import main
from tests.helpers import ROOT, one_line_error, taken_port


def test_the_option_types_take_their_range_and_refuse_the_rest() -> None:
    assert positive_int("3") == 3 and positive_float("2e-5") == 2e-5 and non_negative_float("0") == 0.0
    assert fraction("0") == 0.0 and fraction("0.25") == 0.25 and port("0") == 0 and port("65535") == 65535
    for parse, bad in [(positive_int, "0"), (positive_int, "1.5"), (positive_float, "0"), (positive_float, "nan"),
                       (positive_float, "inf"), (non_negative_float, "-0.1"), (fraction, "1"), (fraction, "-0.5"),
                       (port, "65536"), (port, "-1"), (port, "http")]:
        with pytest.raises(Exception, match=r"is not (a|an) "):
            parse(bad)


def test_version_and_a_missing_config(capsys: pytest.CaptureFixture) -> None:
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"async-rlhf {metadata.version('async-rlhf')}\n"
    for command, missing in (("check-config", "config"), ("bench", "name")):
        with pytest.raises(SystemExit) as exit_:
            main([command])
        # Before: "... are required: config, overrides" and "... name, bench_args" (the second ones are optional).
        assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f"are required: {missing}")
    assert main(["train"]) == 2  # its config may come from --resume RUN_DIR (test_bad_input.py)
    assert capsys.readouterr().err.startswith("config error: train needs a config file")


@pytest.mark.parametrize("args, message", [
    (["train-rm", "p.jsonl", "--base", "b", "--out", "o", "--epochs", "0"], "argument --epochs: 0 is not a positive"),
    (["train-rm", "p.jsonl", "--base", "b", "--out", "o", "--batch-size", "0"], "argument --batch-size: 0 is not"),
    (["train-rm", "p.jsonl", "--base", "b", "--out", "o", "--lr", "-1"], "argument --lr: -1 is not a positive"),
    (["train-rm", "p.jsonl", "--base", "b", "--out", "o", "--eval-fraction", "1.5"], "1.5 is not a fraction"),
    (["train-rm", "p.jsonl", "--base", "b", "--out", "o", "--max-length", "0"], "argument --max-length: 0 is not"),
    (["sample-pairs", "c.yaml", "--out", "o", "--prompts", "0"], "argument --prompts: 0 is not a positive integer"),
    (["sample-pairs", "c.yaml", "--out", "o", "--min-margin", "-1"], "argument --min-margin: -1 is not a number"),
    (["serve-reward", "sort_exact", "--port", "99999"], "argument --port: 99999 is not a TCP port"),
    (["serve-reward", "sort_exact", "--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
])
def test_an_option_out_of_range_is_a_usage_error(args: list[str], message: str,
                                                 capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err


def test_serve_reward_on_a_taken_port_is_one_line_before_it_says_it_serves(capsys: pytest.CaptureFixture) -> None:
    with taken_port() as number:
        err = one_line_error(capsys, ["serve-reward", "sort_exact", "--port", str(number)], 2, "config error: ")
    assert err == (f"config error: serve-reward: cannot serve on 127.0.0.1:{number} (Address already in use); "
                   "pass --host and --port of an address this machine can serve")


def test_train_rm_names_its_own_pairs_and_refuses_a_file_as_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "pairs.jsonl"
    broken.write_text('{"prompt": "1>", "chosen": \n')
    err = one_line_error(capsys, ["train-rm", str(broken), "--base", "b", "--out", str(tmp_path / "o")], 2,
                         "config error: ")
    assert err.startswith(f"config error: train-rm: cannot read '{broken}' as jsonl: ")
    assert err.endswith("; fix the file, or give train-rm other pairs") and "task.dataset" not in err
    pairs = tmp_path / "ok.jsonl"
    pairs.write_text('{"prompt": "1>", "chosen": "1", "rejected": "2"}\n')
    (tmp_path / "out").write_text("mine\n")
    err = one_line_error(capsys, ["train-rm", str(pairs), "--base", "b", "--out", str(tmp_path / "out")], 2, "config")
    assert err == f"config error: train-rm: --out '{tmp_path / 'out'}' is a file; pass a new directory"
    assert (tmp_path / "out").read_text() == "mine\n"


@pytest.fixture
def html_server(tmp_path: Path) -> Iterator[str]:
    """A web server that is not this project's API: every path answers an HTML page."""
    (tmp_path / "status").write_text("<html>not a run</html>\n")
    (tmp_path / "queue").write_text("<html>not a run</html>\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_status_of_something_that_is_not_an_api_url_or_not_this_api(html_server: str,
                                                                     capsys: pytest.CaptureFixture) -> None:
    err = one_line_error(capsys, ["status", "--url", "localhost:8000"], 2, "status error: ")
    assert err == "status error: 'localhost:8000' is not an API URL; pass --url http://HOST:PORT"
    for args in (["--url", html_server + "/"], [html_server + "/"]):  # a URL in RUN_DIR's place is --url's
        err = one_line_error(capsys, ["status", *args], 1, "status error: ")
        assert err.startswith(f"status error: {html_server} did not answer with a run's status (JSONDecodeError: ")
        assert err.endswith("is it this project's API?")
    err = one_line_error(capsys, ["status", html_server, "--url", "http://127.0.0.1:9"], 2, "status error: ")
    assert err == f"status error: two API URLs given ({html_server} and --url http://127.0.0.1:9); pass one"


def test_export_model_to_a_file_is_refused_and_the_file_kept(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes").write_text("mine\n")
    err = one_line_error(capsys, ["export-model", str(tmp_path / "notes")], 2, "config error: ")
    assert err == f"config error: export-model: '{tmp_path / 'notes'}' is a file; choose a new directory"
    assert (tmp_path / "notes").read_text() == "mine\n"


@pytest.mark.parametrize("args, message", [
    (["vs_trl", "--steps", "0"], "argument --steps: 0 is not a positive integer"),
    (["weight_sync", "--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    (["startup", "--runs", "0"], "argument --runs: 0 is not a positive integer"),
    (["async_vs_sync", "--staleness", "-1"], "argument --staleness: -1 is not an integer >= 0"),
    (["every_config", "--configs", "nosuch"], "argument --configs: invalid choice: 'nosuch'"),
])
def test_a_benchmark_option_out_of_range_is_a_usage_error_before_any_run(
        args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(ROOT)  # the benchmarks live in the checkout's bench/
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def test_vllms_own_kv_cache_variable_is_named_where_it_overrides_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # VLLM_CPU_KVCACHE_SPACE=40 (as vLLM's CPU guide sets it) beat generation.kv_cache_gib silently, and on this
    # 24 GiB machine failed the generator's start ("less than requested memory for kv (40.0 GiB)").
    from async_rlhf.cli.main import environment_notes
    from async_rlhf.config.run import RunConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert environment_notes(RunConfig()) == []
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "40")
    assert environment_notes(RunConfig()) == [
        "note: VLLM_CPU_KVCACHE_SPACE is set: on CPU vLLM sizes each generator's KV cache from it (GiB), not from "
        "generation.kv_cache_gib; unset it to use the config"]


@pytest.mark.parametrize("command", ["sample-pairs", "train-rm", "export-model", "plot", "bench weight_sync"])
def test_an_output_place_that_cannot_be_written_is_one_line_before_any_work(command: str, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    # Before: each failed after its work (sampling, training, the warm start) with FileNotFoundError, exit 1.
    pairs, blocker = tmp_path / "ok.jsonl", tmp_path / "a-file"
    pairs.write_text('{"prompt": "1>", "chosen": "1", "rejected": "2"}\n')
    blocker.write_text("mine\n")
    for out, why in ((Path("/proc/nope/out"), " (No such file or directory)"),
                     (blocker / "out", f": '{blocker}' is a file, not a directory")):
        args = {"sample-pairs": ["sample-pairs", "configs/quickstart.yaml", "--out", str(out)],
                "train-rm": ["train-rm", str(pairs), "--base", "b", "--out", str(out)],
                "export-model": ["export-model", str(out)],
                "plot": ["plot", str(tmp_path), "--out", str(out)],
                "bench weight_sync": ["bench", "weight_sync", "--sizes", "tiny", f"--out={out}"]}[command]
        flag = "out" if command == "export-model" else "--out"
        err = one_line_error(capsys, args, 2, "config error: ")
        assert err.startswith(f"config error: {command}: cannot write {flag} '{out}'{why}")
