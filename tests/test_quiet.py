"""Quiet mode: known-harmless library lines are dropped, everything else (tracebacks too) passes."""

import logging
import os
import subprocess
import sys

from xdctr import quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import os, sys
from xdctr import quiet
quiet.configure(verbose=len(sys.argv) > 1)
for line in (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796179645.297799   31899 port.cc:153] oneDNN custom operations are on.",
    b"E0000 00:00:1796175001.086982    4182 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
    b"E0000 00:00:1796220986.156763    3268 util.cc:131] oneDNN supports DT_BOOL only on platforms with AVX-512. "
    b"Falling back to the default Eigen-based implementation if present.",
    b"E0000 00:00:1796175001.086982    4182 util.cc:99] a real error",
    b"user-visible line",
):
    os.write(2, line + b"\n")
raise RuntimeError("the traceback must survive")
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)


def test_native_noise_is_dropped_and_the_rest_passes():
    result = _run()
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert "a real error" in lines[0] and lines[1] == "user-visible line"
    assert "RuntimeError: the traceback must survive" in result.stderr
    assert "InitializeLog" not in result.stderr and "oneDNN" not in result.stderr and "cuInit" not in result.stderr
    assert "AVX-512" not in result.stderr


def test_verbose_keeps_everything():
    result = _run("-v")
    assert "oneDNN" in result.stderr and "cuInit" in result.stderr and "InitializeLog" in result.stderr
    assert "AVX-512" in result.stderr
    assert "RuntimeError: the traceback must survive" in result.stderr


def test_log_filter_drops_only_the_known_messages():
    make = lambda message: logging.LogRecord("absl", logging.WARNING, "f.py", 1, message, (), None)  # noqa: E731
    keep = quiet.HarmlessMessages()
    assert not keep.filter(make("ArtifactQuery.property_predicate is not supported."))
    assert not keep.filter(make("Fallback to non-ZetaSQL contexts execution query due to: x"))
    assert keep.filter(make("Pusher: model not blessed"))
