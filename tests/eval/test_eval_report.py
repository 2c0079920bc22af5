"""Result reports: JSON (with NaN as null), markdown table, per-shot aggregate, PNG plot."""

import json
import math

import pytest
from PIL import Image

from idefics.eval.report import (
    EvalResult,
    aggregate_by_shots,
    markdown_table,
    read_results_json,
    write_report,
)

RESULTS = [
    EvalResult("vqav2", 4, 47.0, 100, 43, "vqa_accuracy"),
    EvalResult("vqav2", 0, 40.125, 100, 42, "vqa_accuracy"),
    EvalResult("vqav2", 4, 45.0, 100, 42, "vqa_accuracy"),
    EvalResult("hateful_memes", 0, 0.61, 50, 42, "roc_auc", {"selection": "random"}),
    EvalResult("hateful_memes", 0, math.nan, 50, 43, "roc_auc"),
]


def test_aggregate_mean_and_population_std_ignoring_nan():
    summary = aggregate_by_shots(RESULTS)
    assert summary["vqav2"] == [{"shots": 0, "mean": 40.125, "std": 0.0, "seeds": 1},
                                {"shots": 4, "mean": 46.0, "std": 1.0, "seeds": 2}]  # std of {45, 47}
    assert summary["hateful_memes"] == [{"shots": 0, "mean": 0.61, "std": 0.0, "seeds": 2}]


def test_markdown_table_rows_sorted_by_task_shots_seed():
    lines = markdown_table(RESULTS).splitlines()
    assert lines[0] == "| task | shots | score | n | seed |"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert rows == [["hateful_memes", "0", "0.61", "50", "42"], ["hateful_memes", "0", "nan", "50", "43"],
                    ["vqav2", "0", "40.12", "100", "42"], ["vqav2", "4", "45.00", "100", "42"],
                    ["vqav2", "4", "47.00", "100", "43"]]


def test_write_report_files(tmp_path):
    paths = write_report(RESULTS, tmp_path / "out")
    doc = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert doc["results"][4]["score"] is None and doc["results"][3]["extra"] == {"selection": "random"}
    assert doc["summary"]["vqav2"][1]["mean"] == 46.0
    back = read_results_json(paths["json"])
    assert back[:4] == RESULTS[:4] and math.isnan(back[4].score)
    assert paths["markdown"].read_text() == markdown_table(RESULTS)
    with Image.open(paths["plot"]) as png:
        assert png.format == "PNG"
        assert png.size == (720, 320)  # two task panels of 3.6 x 3.2 inches at 100 dpi


def test_bad_results_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="result #1 is a dict"):
        markdown_table([RESULTS[0], {"task": "x"}])
    with pytest.raises(ValueError, match="no results to report"):
        write_report([], tmp_path)
    assert list(tmp_path.iterdir()) == []
