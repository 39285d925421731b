"""Results table and plot from probing JSON files."""

import json

import pytest

from train.probing import report


def _write(tmp_path, task, model, seed, acc):
    (tmp_path / f"{task}-{model}-s{seed}.json").write_text(json.dumps(
        {"task": task, "model": model, "seed": seed, "eval_accuracy": acc, "chance": 0.5}))


def test_table_has_means_std_and_gaps(tmp_path):
    _write(tmp_path, "parity", "prism", 0, 1.0)
    _write(tmp_path, "parity", "prism", 1, 0.8)
    _write(tmp_path, "parity", "la", 0, 0.5)
    table = report.markdown_table(report.load_results(str(tmp_path)))
    row = next(line for line in table.splitlines() if "Parity Check" in line)
    assert "0.90 ± 0.14 (n=2)" in row and "| 0.50 |" in row and "not run" in row
    assert "1.00 / 0.49 / 0.50 / 1.00" in row  # the paper's Table 4 row
    assert len(table.splitlines()) == 2 + 9


def test_plot_written_when_matplotlib_is_present(tmp_path):
    pytest.importorskip("matplotlib")
    _write(tmp_path, "mux", "gdn", 0, 0.3)
    path = tmp_path / "out" / "p.png"
    assert report.plot(report.load_results(str(tmp_path)), str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_empty_dir_raises(tmp_path):
    with pytest.raises(ValueError, match="no result JSON"):
        report.main(["--in-dir", str(tmp_path)])
