"""Config: defaults validate, overrides apply, every bad input is one clear line with exit code 2."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from async_rlhf.cli.main import main
from async_rlhf.config.base import ConfigError, load_yaml, parse_overrides
from async_rlhf.config.run import RunConfig, load_config
from async_rlhf.config.runtime import SOCKET_PATH_MAX, SOCKET_TAIL
from learners.loss_traits import builtin_losses
from tests.helpers import cli_command

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def test_quickstart_validates_and_overrides_apply() -> None:
    cfg = load_config(QUICKSTART, ["queue.max_staleness=0", "learner.lr=3e-4", "loss.name=ipo"])
    assert cfg.queue.max_staleness == 0 and cfg.learner.lr == 3e-4 and cfg.loss.name == "ipo"
    assert cfg.queue_capacity == cfg.generation.prompts_per_step  # (N+1) * prompts_per_step


def test_fixed_delay_is_valid_with_shm_at_any_n() -> None:
    for n in (0, 1, 16):  # N=0 is the synchronous run, as in bound mode
        cfg = load_config(QUICKSTART, ["queue.staleness_mode=fixed", f"queue.max_staleness={n}"])
        assert cfg.queue.staleness_mode == "fixed" and cfg.queue_capacity == (n + 1) * cfg.generation.prompts_per_step
    assert load_config(QUICKSTART).queue.staleness_mode == "bound"


def test_the_generators_dtype_is_the_learners_unless_set() -> None:
    from actors.generator import resolve_dtype

    # auto (model.dtype's) goes to the generators as is: each resolves it where it runs, as the learner does, so a
    # GPU-less driver cannot make GPU generators float32 beside a bfloat16 learner.
    assert load_config(QUICKSTART).generator_dtype == "auto"
    assert resolve_dtype("auto", cuda=False) == "float32" and resolve_dtype("auto", cuda=True) == "bfloat16"
    assert load_config(QUICKSTART, ["model.dtype=float32"]).generator_dtype == "float32"
    bf16 = load_config(QUICKSTART, ["generation.dtype=bfloat16"])
    assert bf16.generator_dtype == "bfloat16" and bf16.model.torch_dtype == "float32"
    assert resolve_dtype("bfloat16", cuda=False) == "bfloat16"  # set: kept on any device


def test_zero_stage_unset_is_0_for_one_float32_rank_and_2_otherwise() -> None:
    """One rank has nothing to partition: ZeRO 1-2 would only add copies. A stage that is given is kept."""
    assert load_config(QUICKSTART).learner.zero_stage == 0
    assert load_config(QUICKSTART, ["learner.num_ranks=2"]).learner.zero_stage == 2
    assert load_config(QUICKSTART, ["learner.zero_stage=1"]).learner.zero_stage == 1
    assert load_config(QUICKSTART, ["learner.num_ranks=4", "learner.zero_stage=3"]).learner.zero_stage == 3
    # bf16 weights (a GPU's): ZeRO keeps the float32 master copies, so the default 2 stays
    assert load_config(None, ["model.dtype=bfloat16"], environment=False).learner.zero_stage == 2


def test_parse_overrides_types_values() -> None:
    parsed = parse_overrides(["a.b=1", "a.c=x", "d=true", "e=[1, 2]"])
    assert parsed == {"a": {"b": 1, "c": "x"}, "d": True, "e": [1, 2]}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["queue.max_stalenes=1"],
         "unknown key 'queue.max_stalenes'; valid keys at queue: max_staleness, capacity, staleness_mode"),
        (["queue.staleness_mode=delayed"], "queue.staleness_mode: Input should be 'bound' or 'fixed' (got 'delayed')"),
        (["queue.staleness_mode=fixed", "weight_sync.transport=nccl"],
         ("queue.staleness_mode=fixed samples with older versions, which weight_sync.transport=nccl does not keep "
          "(it pushes only the newest); use weight_sync.transport=shm")),
        (["weight_sync.transport=nccl", "generation.dtype=bfloat16"],
         ("generation.dtype=bfloat16 differs from the learner's model.dtype (float32), which "
          "weight_sync.transport=nccl pushes as is; set generation.dtype=auto")),
        (["queue.max_staleness=-1"], "queue.max_staleness: Input should be greater than or equal to 0 (got -1)"),
        (["learner.lr=fast"], "learner.lr: Input should be a valid number"),
        (["learner.zero_stage=4"], "learner.zero_stage: Input should be 0, 1, 2 or 3 (got 4)"),
        (["loss.name=ppo2"], f"loss.name: unknown loss 'ppo2'; valid names: {', '.join(sorted(builtin_losses()))}"),
        (["generation.samples_per_prompt=1"], "samples_per_prompt (1) must be >= 2 for loss 'online_dpo'"),
        (["generation.prompts_per_step=15", "generation.num_generators=2"], "must be a multiple of"),
        (["model.source=local"], "model.path is required when model.source=local"),
        (["model.path=/etc"], "model.path is set but model.source is 'embedded' (the built-in tiny model), which would "
                               "ignore it; set model.source=local"),  # before: the embedded model trained, silently
        (["model.source=local", "model.path=/no/such/dir"], "model.path: no config.json in '/no/such/dir'"),
        (["task.min_digits=9", "task.max_digits=3"], "task.min_digits (9) must be <= task.max_digits (3)"),
        (["generation.max_new_tokens=60"], "generation.max_model_len (64) is shorter than"),
        # found by hand: YAML's yes/no/on/off are booleans, which pydantic took as 1 and 0 (steps: yes trained 1 step)
        (["learner.steps=yes"], "learner.steps: a yes/no value where a number is expected (YAML reads yes, no, on, "
                                "off, true and false as booleans); write the number (got True)"),
        (["learner.zero_stage=off"], "learner.zero_stage: a yes/no value where a number is expected"),
        (["resources.num_cpus=on"], "resources.num_cpus: a yes/no value where a number is expected"),
        (["loss.beta=true"], "loss.beta: a yes/no value where a number is expected"),
    ],
)
def test_bad_values_give_one_line_errors(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, overrides)
    message = str(err.value)
    assert expected in message and "\n" not in message and message.startswith("config error: ")


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file '.*missing.yaml' not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' is a directory; pass a YAML file"):
        load_config(tmp_path)  # it said "not found"
    broken = tmp_path / "broken.yaml"
    broken.write_text("queue: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe task: [")
    with pytest.raises(ConfigError, match="cannot read '.*binary.yaml': it is not UTF-8 text"):
        load_config(binary)


def test_defaults_are_a_valid_config() -> None:
    assert RunConfig().loss.name == "online_dpo"


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(QUICKSTART), "queue.max_staleness=-1", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_staleness" in err
    assert not (tmp_path / "r").exists()  # nothing started, nothing written


def test_console_script_exit_code_for_unknown_key() -> None:
    proc = subprocess.run(
        cli_command("train", str(QUICKSTART), "bogus.key=1"),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("config error: unknown key 'bogus'")
    assert "Traceback" not in proc.stderr


def test_a_key_given_twice_in_a_section_is_refused_with_both_lines(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("learner:\n  steps: 5\n  lr: 1.0e-4\n  steps: 6\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == f"config error: '{config}' is not valid YAML at line 4: key 'steps' given twice (first " \
                             "at line 2)"


def test_the_same_key_in_two_sections_and_yaml_merge_keys_are_fine(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("generation: &gen\n  temperature: 0.7\n  max_new_tokens: 12\n"
                      "learner:\n  steps: 7\n"
                      "eval:\n  every: 7\n")
    assert load_config(config).learner.steps == 7
    assert load_yaml("base: &b {x: 1, y: 2}\nchild:\n  <<: *b\n  y: 3\n") == {"base": {"x": 1, "y": 2},
                                                                           "child": {"x": 1, "y": 3}}


def test_a_section_with_nothing_under_it_is_its_defaults(tmp_path: Path) -> None:
    """Found by hand: `learner:` with its keys commented out (YAML's null) was "learner: Input should be a valid
    dictionary or instance of LearnerConfig"."""
    config = tmp_path / "run.yaml"
    config.write_text("learner:\n  # steps: 5\neval:\n")
    assert load_config(config).learner == RunConfig().learner
    assert load_config(config, ["learner.steps=7"]).learner.steps == 7
    config.write_text("seed:\n")  # a setting, not a section: null is still refused
    with pytest.raises(ConfigError, match="^config error: seed: Input should be a valid integer"):
        load_config(config)


def test_a_home_where_ray_cannot_keep_its_token_is_a_config_error(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by hand: under a read-only HOME (a container's) ray.init failed after start-up had begun with
    "OSError: [Errno 30] Read-only file system: '/home/u/.ray'". A file as HOME fails the same way as root too."""
    home = tmp_path / "home"
    home.write_text("")
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # a Ray started by this process sets one
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART)
    assert str(err.value) == ("config error: a local Ray keeps its authentication token in ~/.ray, which cannot be "
                              f"made (Not a directory: '{home / '.ray'}'); set HOME to a writable directory, or give "
                              "Ray a token in $RAY_AUTH_TOKEN")
    load_config(QUICKSTART, ["ray.address=auto"])  # a cluster's Ray has its token where it was started
    for var, value in (("RAY_AUTH_TOKEN", "0123456789abcdef0123456789abcdef"), ("RAY_AUTH_MODE", "disabled")):
        with monkeypatch.context() as given:
            given.setenv(var, value)
            load_config(QUICKSTART)


def test_a_temp_dir_a_local_ray_cannot_use_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    # ray.init failed after start-up had begun: "AF_UNIX path length cannot exceed 107 bytes: ..." for a scheduler's
    # long per-job TMPDIR, "[Errno 2] No such file or directory: '/proc/nope'" for one that cannot be made.
    long = tmp_path / ("d" * 40)
    assert len(str(long)) > SOCKET_PATH_MAX - SOCKET_TAIL
    monkeypatch.setenv("TMPDIR", str(long))
    assert main(["train", str(QUICKSTART), "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"config error: $TMPDIR ('{long}') is too long for a local Ray: its socket paths there would pass the 107 "
        f"bytes a Unix socket allows; set RAY_TMPDIR to a writable directory of at most "
        f"{SOCKET_PATH_MAX - SOCKET_TAIL} characters (e.g. /tmp/ray-$USER)")
    assert not (tmp_path / "r").exists()
    load_config(QUICKSTART, ["ray.address=auto"])  # a cluster's Ray has its own temp directory
    load_config(QUICKSTART, environment=False)  # --portable: a config for another machine
    short = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # tmp_path is longer than a Ray temp dir may be
    try:
        (short / "a_file").write_text("")
        monkeypatch.setenv("RAY_TMPDIR", str(short / "a_file" / "ray"))  # Ray reads it before TMPDIR
        with pytest.raises(ConfigError, match=r"RAY_TMPDIR \('.*a_file/ray'\) cannot hold a local Ray's session "
                                              r"files \(Not a directory: '.*a_file/ray'\)"):
            load_config(QUICKSTART)
        monkeypatch.setenv("RAY_TMPDIR", str(short / "new" / "ray"))
        load_config(QUICKSTART)
        assert (short / "new" / "ray").is_dir()  # made, as Ray would make it
    finally:
        shutil.rmtree(short)


def test_the_generator_hang_timeout_is_half_the_stall_timeout_unless_set_below_it() -> None:
    assert load_config(QUICKSTART, ["learner.stall_timeout_s=120"]).hang_timeout_s == 60
    assert load_config(QUICKSTART, ["generation.hang_timeout_s=30"]).hang_timeout_s == 30
    with pytest.raises(ConfigError, match=r"^config error: generation.hang_timeout_s \(600\) must be below "
                                          r"learner.stall_timeout_s \(600\): the stall would end the run before"):
        load_config(QUICKSTART, ["generation.hang_timeout_s=600"])


@pytest.mark.parametrize("address, problem", [
    ("headnode", "is not HOST:PORT; give the head node's GCS address"),
    ("headnode:0", "is not HOST:PORT"),
    ("headnode:65536", "is not HOST:PORT"),
    (":6379", "is not HOST:PORT"),
    ("ray://headnode:10001", "is a Ray Client address, which runs cannot use; run `async-rlhf train` on a node"),
])
def test_a_ray_address_ray_cannot_join_is_refused_before_start(address: str, problem: str) -> None:
    """Ray read a malformed address only inside ray.init, after the run's start-up ("Invalid address format")."""
    with pytest.raises(ConfigError, match=f"ray.address '{re.escape(address)}' {re.escape(problem)}"):
        load_config(QUICKSTART, [f"ray.address={address}"])
    for good in ("auto", "10.0.0.1:6379", "head-node.cluster.local:6380"):
        assert load_config(QUICKSTART, [f"ray.address={good}"]).ray.address == good


def test_a_bare_off_for_pin_cores_is_off_not_a_type_error(tmp_path: Path) -> None:
    # Before: YAML reads `off` as false, and `resources.pin_cores=off` (as the field's own help says) failed with
    # "Input should be 'auto' or 'off' (got False)".
    assert load_config(QUICKSTART, ["resources.pin_cores=off"], environment=False).resources.pin_cores == "off"
    path = tmp_path / "run.yaml"
    path.write_text(QUICKSTART.read_text() + "\nresources:\n  pin_cores: off\n")
    assert load_config(path, [], environment=False).resources.pin_cores == "off"


def test_settings_the_loss_does_not_read_are_named_at_the_start(capsys: pytest.CaptureFixture) -> None:
    # A PPO config trained with loss.name=grpo kept its GAE settings, which then did nothing, silently.
    ppo = load_config(QUICKSTART.with_name("quickstart_ppo.yaml"), ["loss.name=grpo"])
    assert ppo.unused_settings() == ["loss.gamma", "loss.lam", "loss.value_clip_eps"]
    assert load_config(QUICKSTART.with_name("arith_vineppo.yaml"), ["loss.name=grpo"]).unused_settings() == [
        "mc_values.k_mc"]
    assert load_config(QUICKSTART.with_name("quickstart_ppo.yaml")).unused_settings() == []
    assert main(["check-config", str(QUICKSTART.with_name("quickstart_ppo.yaml")), "loss.name=rloo"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "# note: loss.gamma, loss.lam, loss.value_clip_eps set but not read by loss 'rloo' (docs/losses.md says "
        "which loss reads each)")
