"""avmm.logs: readable log lines with tracebacks, rich or not, and tracebacks without
source lines on threads whose seccomp filter forbids opening files. Each case runs in a
fresh interpreter: configure_logging sets structlog up for the whole process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_LOG_AN_ERROR = """
import sys, threading
import avmm
from avmm.logs import configure_logging
import structlog

configure_logging(level="info")
log = structlog.get_logger("probe")

def fail():
    raise ValueError("boom")  # the source line a traceback quotes

def log_failure():
    try:
        fail()
    except ValueError:
        log.exception("it failed", where="here")

{run}
print("rich imported:", "rich" in sys.modules, file=sys.stderr)
"""


def _stderr_of(tmp_path: Path, run: str) -> str:
    script = tmp_path / "probe.py"  # a file: a traceback quotes source lines from files
    script.write_text(_LOG_AN_ERROR.format(run=run))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_a_logged_exception_shows_its_traceback_with_source_lines(tmp_path: Path) -> None:
    stderr = _stderr_of(tmp_path, "log_failure()")
    assert "[error    ] it failed" in stderr
    assert "where=here" in stderr
    assert "Traceback (most recent call last):" in stderr
    assert 'raise ValueError("boom")  # the source line a traceback quotes' in stderr
    assert "ValueError: boom" in stderr
    # structlog was imported without rich (avmm._lazy): nothing above needed it.
    assert "rich imported: False" in stderr


def test_a_filtered_thread_logs_the_traceback_from_frames_alone(tmp_path: Path) -> None:
    # A thread that loaded a seccomp filter of its own (marked as such here, without a
    # filter) must not read source files: the traceback names the frames only.
    stderr = _stderr_of(
        tmp_path,
        "from avmm.isolation import seccomp\n"
        "from avmm.isolation.syscalls import ThreadKind\n"
        "def on_vcpu_thread():\n"
        "    seccomp._loaded.kind = ThreadKind.VCPU\n"
        "    log_failure()\n"
        "thread = threading.Thread(target=on_vcpu_thread)\n"
        "thread.start()\n"
        "thread.join()\n")
    assert "Traceback (source lines left out on a filtered thread):" in stderr
    assert "in fail" in stderr
    assert "ValueError: boom" in stderr
    assert "the source line a traceback quotes" not in stderr
