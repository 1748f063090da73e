"""Every console script (common/cli.py): ``--help``; an input error is one line and status 2.

No test here trains: each bad command line must be refused before any work starts.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from common.cli import INPUT_ERROR, INTERRUPTED, UNEXPECTED_ERROR, Command, compose_checked
from common.errors import JobError
from tests.unit.conftest import CHECKPOINT_FAULTS, SEGMENTER_FAULTS

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Console script -> module whose main() it runs; checked against pyproject.toml below.
SCRIPTS = {
    "w3s-simulate": "server_app.launch",
    "w3s-verify": "post_training.verify",
    "w3s-postprocess": "post_training.postprocess",
    "w3s-predict": "post_training.predict",
    "w3s-stages": "experiments.stage_grid",
    "w3s-ablate": "experiments.ablation",
    "w3s-experiment": "experiments.run",
    "w3s-report": "experiments.report",
}
# Arguments every call of a script needs besides the one under test (ablate: which variants;
# experiment: which regime, and a runs_dir that is not the repository's).
REQUIRED = {"w3s-ablate": ["variants=levers"], "w3s-experiment": ["regime=fedavg"]}
# A misspelled key of each script's config.
MISSPELLED = {
    "w3s-simulate": "federation.round=3",
    "w3s-verify": "federation.round=3",
    "w3s-experiment": "federation.round=3",
    "w3s-postprocess": "hospitl=hospital_a",
    "w3s-stages": "hospitl=hospital_a",
    "w3s-ablate": "hospitl=hospital_a",
    "w3s-predict": "segmentr=model.pt",
    "w3s-report": "runz=[runs]",
}
MISSING_CHECKPOINT = ["checkpoint=/no/such/final_model.pt", "hospital=hospital_a"]


def main_of(script: str):
    return importlib.import_module(SCRIPTS[script]).main


def call(script: str, args: list[str], capsys) -> tuple[int, str, str]:
    """``main(REQUIRED + args)`` in this process: (status, stdout, stderr)."""
    status = main_of(script)([*REQUIRED.get(script, []), *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(script: str, status: int, err: str, *names: str) -> None:
    assert status == INPUT_ERROR, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{script}: "), err
    for name in names:
        assert name in lines[0], (name, err)


def test_the_table_above_is_every_console_script():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    scripts = pyproject["project"]["scripts"]
    assert scripts == {name: f"{module}:main" for name, module in SCRIPTS.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_installed_script_prints_help_and_exits_0(script):
    executable = BIN / script
    assert executable.is_file(), f"{executable} is not installed: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(executable), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"usage: {script}"), result.stdout
    # Then a blank line and the description: the first line of the module's summary.
    assert lines[1] == "" and len(lines[2].split()) >= 4, result.stdout
    assert script in lines[2], result.stdout
    assert "main keys:" in lines, result.stdout


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_in_process_wins_over_other_arguments(script, flag, capsys):
    # Even next to a bad override, help is printed and nothing runs.
    status = main_of(script)(["data=nonexistent", flag])
    captured = capsys.readouterr()
    assert status == 0 and captured.err == ""
    assert captured.out.startswith(f"usage: {script}")
    for key in importlib.import_module(SCRIPTS[script]).COMMAND.keys:
        assert key in captured.out


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_config_option_is_one_line_and_status_2(script, capsys):
    status, _, err = call(script, ["data=nonexistent"], capsys)
    assert_one_line_error(script, status, err, "nonexistent")


def test_an_unknown_experiment_preset_is_one_line_naming_the_presets(capsys):
    # The group is optional by Hydra's rules only when absent: a misspelt preset ran the
    # defaults in its place.
    status, _, err = call("w3s-simulate", ["experiment=papr"], capsys)
    assert_one_line_error("w3s-simulate", status, err, "experiment/papr", "paper")


@pytest.mark.parametrize("script", SCRIPTS)
def test_misspelled_key_is_one_line_and_status_2(script, capsys):
    override = MISSPELLED[script]
    status, _, err = call(script, [override], capsys)
    assert_one_line_error(script, status, err, override.split("=")[0])


@pytest.mark.parametrize("folder", ["/data/Scans (2024)", "/data/Zellbilder_Müller", "/d/slide#3"])
def test_a_folder_name_the_grammar_takes_only_quoted_says_to_quote_it(folder, capsys):
    status, _, err = call("w3s-predict", [f"input={folder}"], capsys)
    assert_one_line_error("w3s-predict", status, err, "goes in quotes", "input='/data/Scans")


@pytest.mark.parametrize("flag", ["--flag", "-x", "--rounds=3"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_dash_option_is_one_line_and_status_2(script, flag, capsys):
    status, _, err = call(script, [flag], capsys)
    assert_one_line_error(script, status, err, flag)


@pytest.fixture
def no_flower(monkeypatch):
    """Fail the test if anything tries to start ``flwr run``."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"Flower was started: {args}")

    monkeypatch.setattr("server_app.launch.run_and_check", refuse)


def wrong_path_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Per script: arguments with one path that does not exist, and that path."""
    images = tmp_path / "images"
    images.mkdir()
    return {
        "w3s-postprocess": (MISSING_CHECKPOINT, "/no/such/final_model.pt"),
        "w3s-stages": (MISSING_CHECKPOINT, "/no/such/final_model.pt"),
        "w3s-ablate": (MISSING_CHECKPOINT, "/no/such/final_model.pt"),
        "w3s-predict": (
            ["segmenter=/no/such.pt", f"input={images}", f"output={tmp_path / 'masks'}"],
            "/no/such.pt",
        ),
        "w3s-report": (["runs=[/no/such]"], "/no/such"),
        "w3s-simulate": (["data=wbc_zxaoyou", "data.root=/no/such"], "/no/such"),
        "w3s-experiment": (
            ["data=wbc_zxaoyou", "data.root=/no/such", f"runs_dir={tmp_path / 'runs'}"],
            "/no/such",
        ),
    }


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "w3s-verify"])
def test_wrong_path_is_one_line_and_status_2_before_any_work(
    script, tmp_path, no_flower, capsys, monkeypatch
):
    def no_image_read(*args, **kwargs):
        raise AssertionError(f"{script} read an image before naming the wrong path")

    monkeypatch.setattr(Image, "open", no_image_read)
    args, path = wrong_path_cases(tmp_path)[script]
    status, _, err = call(script, args, capsys)
    assert_one_line_error(script, status, err, path)
    assert not (tmp_path / "masks").exists()


def test_verify_lists_the_problems_of_a_wrong_root_with_status_1(capsys):
    # Its own contract: 1 = data problems found (all listed); the command line was valid.
    status, out, err = call("w3s-verify", ["data=wbc_zxaoyou", "data.root=/no/such"], capsys)
    assert status == 1, err
    assert err == ""
    problems = [line for line in out.splitlines() if "[missing_root] /no/such" in line]
    assert len(problems) == 2, out  # one per hospital of wbc_zxaoyou
    assert "2 problem(s):" in out


def test_experiment_without_a_regime_is_one_line_and_status_2(capsys):
    status = main_of("w3s-experiment")([])
    err = capsys.readouterr().err
    assert_one_line_error("w3s-experiment", status, err, "regime")


def test_main_without_argv_reads_sys_argv(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["w3s-report", "runs=[/no/such]"])
    assert main_of("w3s-report")() == INPUT_ERROR
    assert_one_line_error("w3s-report", INPUT_ERROR, capsys.readouterr().err, "/no/such")


# The commands that read a model file, the key naming it, and the other arguments they need.
MODEL_FILE_COMMANDS = {
    "w3s-postprocess": ("checkpoint", ["hospital=hospital_a"]),
    "w3s-stages": ("checkpoint", ["hospital=hospital_a"]),
    "w3s-predict": ("segmenter", []),
}
MODEL_FILE_CASES = [
    (script, fault)
    for script, (key, _) in MODEL_FILE_COMMANDS.items()
    for fault in (CHECKPOINT_FAULTS if key == "checkpoint" else SEGMENTER_FAULTS)
]


@pytest.mark.parametrize(("script", "fault"), MODEL_FILE_CASES)
def test_a_bad_model_file_is_one_line_naming_it_and_status_2(
    script, fault, model_files, tmp_path, capsys
):
    key, extra = MODEL_FILE_COMMANDS[script]
    path = model_files[key][fault]
    if script == "w3s-predict":
        images = tmp_path / "images"
        images.mkdir()
        (images / "cell.png").write_bytes(b"not decoded: the segmenter is refused first")
        extra = [f"input={images}", f"output={tmp_path / 'masks'}"]
    else:
        extra = [*extra, f"output_dir={tmp_path / 'out'}"]
    status, _, err = call(script, [f"{key}={path}", *extra], capsys)
    assert_one_line_error(script, status, err, f"{key}={path}")
    assert not (tmp_path / "masks").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_runs_the_jobs_clean_up_and_exits_130(stop, capsys):
    # A job that a scheduler or `docker stop` ends while it works.
    cleaned = []

    def job(cfg, overrides):
        try:
            os.kill(os.getpid(), stop)
            time.sleep(30)  # the signal interrupts this
        finally:
            cleaned.append(True)

    original = signal.signal(stop, signal.SIG_DFL)  # as a shell starts it (not under nohup)
    try:
        command = Command(name="w3s-test", summary="a job", config="config", job=job)
        with pytest.raises(SystemExit) as stopped:
            command.main([])
        assert signal.getsignal(stop) == signal.SIG_DFL  # no handler outlives the job
    finally:
        signal.signal(stop, original)
    assert stopped.value.code == INTERRUPTED and cleaned == [True]
    assert capsys.readouterr().err.strip() == f"w3s-test: stopped ({stop.name})"


@pytest.mark.parametrize(
    ("override", "said"),
    [
        (
            "federation.round=5",
            "federation.round=5: no such setting (did you mean federation.rounds?)",
        ),
        (
            "fedration.rounds=5",
            "fedration.rounds=5: no such setting (did you mean federation.rounds?)",
        ),
        ("+federation.round=5", "+federation.round: adds a setting that nothing reads (did you "),
        ("++federation.round=5", "++federation.round: adds a setting that nothing reads (did you"),
        (
            "+zzz=1",
            "+zzz: adds a setting that nothing reads; new keys go only under data.hospitals",
        ),
    ],
)
def test_a_mistyped_key_is_named_with_the_nearest_and_never_added(override, said, capsys):
    # Hydra's own answer to the first suggests "+federation.round=5", which ran the default.
    status, out, err = call("w3s-simulate", [override], capsys)
    assert status == INPUT_ERROR and out == ""
    assert err.startswith(f"w3s-simulate: {said}") and len(err.strip().splitlines()) == 1


def test_keys_added_where_the_user_names_them_are_taken():
    cfg = compose_checked(
        [
            "+train.per_hospital.hospital_a.local_epochs=1",
            "+data.hospitals.extra={format:synthetic}",
        ],
        "config",
    )
    assert cfg.train.per_hospital.hospital_a.local_epochs == 1 and "extra" in cfg.data.hospitals


def test_a_key_set_with_plus_plus_where_the_config_has_it_is_taken():
    cfg = compose_checked(
        ["++federation.rounds=3", "++train.per_hospital.a.local_epochs=1"], "config"
    )
    assert cfg.federation.rounds == 3 and cfg.train.per_hospital.a.local_epochs == 1
    # A mandatory key (???) is one the config has, as is one of a group another override picks.
    named = ["++checkpoint=x.pt", "hospital=hospital_a", "pseudo=psa", "++pseudo.alpha_low=2"]
    cfg = compose_checked(named, "postprocess")
    assert cfg.checkpoint == "x.pt" and cfg.pseudo.alpha_low == 2


def test_a_key_added_twice_with_plus_plus_is_still_refused():
    # Each copy was checked against a config the other had added it to.
    with pytest.raises(JobError, match=r"\+\+federation.round: adds a setting that nothing reads"):
        compose_checked(["++federation.round=5", "++federation.round=6"], "config")


def test_ctrl_c_says_the_job_was_interrupted(capsys):
    def job(cfg, overrides):
        raise KeyboardInterrupt  # what Python raises on Ctrl-C: no message

    command = Command(name="w3s-test", summary="a job", config="config", job=job)
    with pytest.raises(SystemExit) as stopped:
        command.main([])
    assert stopped.value.code == INTERRUPTED
    assert capsys.readouterr().err.strip() == "w3s-test: stopped (interrupted)"


def test_an_unexpected_error_keeps_its_traceback_and_an_exit_status_of_its_own(capsys):
    # Python's own status for it, 1, is what w3s-predict answers when some files were skipped.
    def job(cfg, overrides):
        raise RuntimeError("a bug deep inside the job")

    command = Command(name="w3s-test", summary="a job", config="config", job=job)
    assert command.main([]) == UNEXPECTED_ERROR != 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug deep inside the job" in err
    assert err.splitlines()[-1].startswith("w3s-test: stopped by an unexpected error")


def test_a_signal_ignored_at_start_stays_ignored(capsys):
    # nohup starts a job with SIGHUP ignored, so that closing the terminal does not stop it.
    def job(cfg, overrides):
        os.kill(os.getpid(), signal.SIGHUP)
        return 0

    original = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        command = Command(name="w3s-test", summary="a job", config="config", job=job)
        assert command.main([]) == 0
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, original)
    assert "stopped" not in capsys.readouterr().err
