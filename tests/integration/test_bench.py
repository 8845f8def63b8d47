"""`bench/run.py --quick` produces its table (a smoke test of the harness: no speed is asserted here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import report

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_prints_the_table(tmp_path: Path) -> None:
    missing = [tool for tool in ("nginx", "haproxy", "wrk", "taskset") if shutil.which(tool) is None]
    assert not missing, f"{missing} not installed (scripts/setup installs them)"
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    for row in ("| HTTP keep-alive |", "| HTTP new-conn |", "| TCP keep-alive |", "| TCP new-conn |"):
        assert row in text, text
    assert "nginx direct keep-alive (ceiling)" in text and "- command: `python " in text
    assert "- haproxy: " in text and "- uvloop: " in text and "- cpu: " in text
    assert out.exists()
    for line in text.splitlines():
        if line.startswith("| HTTP") or line.startswith("| TCP"):
            report("bench --quick (smoke run, 1 s per cell: not a measurement)", line)


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("http", []),
        ("https", []),
        ("tcp", ["--access-log", "1", "--python", sys.executable, "--python", sys.executable]),
    ],
)
def test_ab_harness_compares_two_trees(mode: str, extra: list[str]) -> None:
    """`bench/ab.py` runs each tree from its own checkout: here the same checkout twice, one round. A run
    with error answers or a failed wrk would fail the harness (bench/ab.py `measure`)."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "ab.py"),
            str(ROOT),
            str(ROOT),
            "--rounds",
            "1",
            "--duration",
            "1",
            "--mode",
            mode,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if "req/s (median)" in line]
    assert len(rows) == 2 and all(str(ROOT) in row for row in rows), done.stdout
    assert all(float(row.split()[0].replace(",", "")) > 0 for row in rows), done.stdout
    assert ("access log on" in rows[1]) == ("--access-log" in extra) and "access log on" not in rows[0]
    assert all((f"({sys.executable})" in row) == ("--python" in extra) for row in rows), done.stdout


def test_inline_cost_serves_every_request_inline() -> None:
    """`bench/inline_cost.py` exits non-zero unless every request it feeds took the inline path (so its
    figure is the cost of that path); here a short run, no speed asserted."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inline_cost.py"), "--requests", "2000", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "us of Python per inline request" in done.stdout, done.stdout
