"""scripts/beam_data_loss.py, the Beam-only reproduction of the DirectRunner's lost records, at tiny size."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "beam_data_loss.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("beam_data_loss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("side_input, seeds", [("dict", 1), ("after-group", 2), ("none", 3)])
def test_counts_the_records_in_and_out_of_each_run(script, tmp_path, capsys, side_input, seeds):
    out = tmp_path / "runs.json"
    code = script.main(["--records", "1000", "--record-bytes", "10", "--keys", "7", "--seeds", str(seeds), "--runs", "2",
                        "--side-input", side_input, "--mode", "in_memory", "--workers", "1", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0  # in_memory keeps every record
    assert len(printed) == 4 and printed[0].startswith("beam ")
    assert printed[-1] == "no records lost in 2 runs"
    runs = json.loads(out.read_text())["runs"]
    assert [(r["run"], r["records_in"], r["records_out"], r["lost"]) for r in runs] == [(1, 1000, 1000, 0), (2, 1000, 1000, 0)]
    assert printed[1].startswith("run 1: records in 1000, out 1000, lost 0 (")
