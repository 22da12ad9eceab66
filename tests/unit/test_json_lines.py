"""JSON lines of raw outputs stay small: a large output is summarised, not written value by value."""
from __future__ import annotations

import json

import numpy as np

from lepton_edge.runtime.runtime import RAW_JSON_VALUES, Result
from lepton_edge.sinks import JsonLines


def test_a_large_raw_output_is_summarised_and_a_small_one_kept(tmp_path):
    """ddddocr's CRNN returns [32, 1, 8210] logits a frame: written whole, a 5 MB line (a 30 fps stream
    filled 500 GB an hour); summarised, its shape, range and peak. `--raw-values` sets the limit."""
    big = np.zeros((32, 1, 8210), np.float32)
    big[5, 0, 77] = 3.0
    big[0, 0, 0] = np.nan
    small = np.arange(10, dtype=np.float32)
    path = tmp_path / "r.jsonl"
    sink = JsonLines(path)
    sink.write(Result(task="raw", output=[big, small]))
    sink.close()
    line = path.read_text()
    assert len(line) < 2000
    first, second = json.loads(line)["result"]
    assert first == {"shape": [32, 1, 8210], "dtype": "float32", "values_omitted": big.size, "min": 0.0, "max": 3.0,
                     "mean": first["mean"], "argmax": [5, 0, 77]}
    assert second == small.tolist() and big.size > RAW_JSON_VALUES >= small.size
    whole = JsonLines(tmp_path / "w.jsonl", raw_limit=big.size)
    whole.write(Result(task="raw", output=[big]))
    whole.close()
    assert np.asarray(json.loads((tmp_path / "w.jsonl").read_text())["result"][0], dtype=float).shape == (32, 1, 8210)
