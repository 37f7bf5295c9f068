"""The ``pyro-mpt`` command line: every argument checked before the work starts (usage
error, exit code 2, a message naming the option), log lines on stderr, progress lines when
piped, results on stdout (pyro_mpt.cli, pyro_mpt.cli_args)."""

import importlib
import logging
import os
import subprocess
import sys

import pytest

from pyro_mpt import cli
from pyro_mpt.cli_args import StepReporter, logging_to_stderr
from pyro_mpt.progress import logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_work(monkeypatch):
    """Replaces the demo and reproduce with recorders: a usage error must come first."""
    calls = []
    monkeypatch.setattr(cli, "demo", lambda **kw: calls.append(("demo", kw)))
    # the module, not the function of the same name that pyro_mpt.experiments exports
    rep = importlib.import_module("pyro_mpt.experiments.reproduce")

    monkeypatch.setattr(rep, "reproduce", lambda *a, **kw: calls.append(("reproduce", a)))
    return calls


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["demo", "--plot", "/nonexistent/x.png"],
            "--plot: cannot save '/nonexistent/x.png': directory '/nonexistent' does not exist",
        ),
        (["demo", "--plot", "curve.txt"], "--plot: 'curve.txt': the file name must end in one of"),
        (["demo", "--lr", "-0.1"], "--lr: expected a finite number > 0, got '-0.1'"),
        (["demo", "--noise-scale", "nan"], "--noise-scale: expected a finite number > 0"),
        (["demo", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
        (["demo", "-v", "-q"], "not allowed with argument"),
    ],
)
def test_demo_arguments_fail_before_any_work(argv, match, capsys, no_work):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert no_work == []


def test_demo_plot_into_a_directory_that_is_a_file(tmp_path, capsys, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--plot", str(blocker / "x.png")])
    assert e.value.code == 2 and "is a file, not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--plot", str(tmp_path)])  # a directory, not a file name
    assert "unsupported" not in capsys.readouterr().err
    assert no_work == []


def test_reproduce_output_checked_before_any_work(tmp_path, capsys, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, match in [
        (blocker, "exists and is not a directory"),
        (blocker / "sub", "is a file, not a directory"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(["reproduce", "--output", str(out)])
        assert e.value.code == 2 and match in capsys.readouterr().err
    assert no_work == []
    # a directory that does not exist yet under a writable one is fine
    assert cli.main(["reproduce", "--output", str(tmp_path / "new" / "dir"), "-q"]) == 0
    assert no_work == [("reproduce", (str(tmp_path / "new" / "dir"),))]


def test_plot_error_as_a_process_exit_code():
    """The README's case, as a user runs it: exit code 2 at once, no traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_mpt", "demo", "--plot", "/nonexistent/x.png"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "directory '/nonexistent' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_demo_piped_logs_progress_on_stderr_and_results_on_stdout(tmp_path, capsys):
    """Under capsys stderr is not a terminal, as when piped: log lines instead of a bar;
    each repeated package message (the backend chosen per step) only once."""
    png = tmp_path / "curve.png"
    argv = ["demo", "--steps", "3", "--num-data", "8", "--num-tokens", "4", "--num-masks", "1"]
    assert cli.main(argv + ["--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert "demo: 3 SVI steps on PPCA (N=8, T=4, K=2)" in err
    assert "SVI (MaskedELBO, stratified) step 1/3, loss_per_seq" in err
    assert "SVI (MaskedELBO, stratified) step 3/3, loss_per_seq" in err
    assert err.count("conditionals='auto' chose") == 1
    assert "MPT estimate (area of S(m), trained model)" in out and "step 1/3" not in out
    assert png.stat().st_size > 0
    # --quiet: results only
    assert cli.main(argv + ["-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "MPT estimate" in out


def test_step_reporter_logs_first_last_and_by_time(caplog):
    with caplog.at_level(logging.INFO, logger="pyro_mpt"):
        bar = StepReporter(5, None, "work", every_seconds=1e9)
        for i in range(5):
            bar.update(loss=float(i))
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == [
        "work step 1/5, loss 0",
        "work step 5/5, loss 4",
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyro_mpt"):
        bar = StepReporter(3, None, "work", every_seconds=0.0)
        for _ in range(3):
            bar.update()
    assert len(caplog.records) == 3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyro_mpt"):
        bar = StepReporter(3, False, "work", every_seconds=0.0)
        for _ in range(3):
            bar.update()
    assert caplog.records == []


def test_logging_to_stderr_restores_the_logger(capsys):
    before = (logger.level, logger.propagate, list(logger.handlers))
    with logging_to_stderr(1):
        logger.debug("decision %d", 1)
        logger.debug("decision %d", 1)  # repeated: shown once
        logger.info("other")
    err = capsys.readouterr().err
    assert err.count("pyro_mpt: decision 1") == 1 and "pyro_mpt: other" in err
    with logging_to_stderr(0):
        logger.debug("hidden")
        logger.warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "shown" in err
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
