"""Progress without a terminal: one line per stage, curvature pass and shot, stamped with elapsed seconds;
--quiet prints nothing."""
import io
import re
from pathlib import Path

import pytest

from surgeon_fx.cli import main
from surgeon_fx.progress import Progress

MODELS = Path(__file__).resolve().parents[1] / "models"
RUN = [str(MODELS / "tiny_llama.py"), "--calib-windows", "2", "--calib-length", "32", "--shots", "2",
       "--eval-windows", "1", "--target", "0.8"]
LINE = re.compile(r"^\[\s*(\d+\.\d) s\] (.+)$")


def test_a_log_shows_every_stage_pass_and_shot(tmp_path, capsys):
    # pytest's captured stderr is not a terminal; a cache of its own, so the dense evaluation really runs
    assert main(RUN + ["--out", str(tmp_path / "o"), "--cache", str(tmp_path / "cache")]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    matched = [LINE.match(line) for line in lines]
    assert all(matched), f"not a progress line: {lines[matched.index(None)]!r}"  # nothing else (no \r bars)
    elapsed = [float(m.group(1)) for m in matched]
    assert elapsed == sorted(elapsed)
    events = [m.group(2) for m in matched]
    stages = ["build", "trace", "data", "evaluate dense", "prune", "rewrite", "evaluate pruned", "emit + verify"]
    assert [e.split(":")[0] for e in events if not e.startswith(("curvature", "shot"))] == stages
    assert [e.split(":")[0] for e in events if e.startswith(("curvature", "shot"))] == [
        "curvature pass 1", "shot 1/2", "curvature pass 2", "shot 2/2"]
    shots = [e for e in events if e.startswith("shot")]
    assert re.fullmatch(r"shot 2/2: kept 0\.\d{3} \(target 0\.800\), \d+\.\d s", shots[-1])
    assert re.fullmatch(r"curvature pass 1: 2 windows, \d+\.\d s", events[events.index(shots[0]) - 1])
    assert "wrote" in captured.out


def test_quiet_prints_nothing_on_stderr(tmp_path, capsys):
    assert main(RUN + ["--quiet", "--shots", "1", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "wrote" in captured.out


def test_progress_modes():
    stream = io.StringIO()
    Progress("lines", stream).line("hello")
    assert LINE.match(stream.getvalue().strip()).group(2) == "hello"
    stream = io.StringIO()
    Progress("bars", stream).line("hello")
    Progress("off", stream).line("hello")
    assert stream.getvalue() == ""
    assert Progress.of(False).mode == "off" and Progress.of(True).bars and Progress.of("lines").mode == "lines"
    with pytest.raises(ValueError, match="bars, lines, off"):
        Progress("loud")
