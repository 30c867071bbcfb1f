"""Reading metrics from a job's output and deciding what its exit means (pure functions)."""

from __future__ import annotations

import math

import pytest

from fanout_research.metrics import (
    classify_exit,
    last_lines,
    parse_metrics,
    parse_result_line,
    parse_summary_block,
    usable_val_bpb,
)
from fanout_research.models import Metrics
from fanout_research.phases import Failure, Phase

# The block autoresearch's train.py prints at the end of a run, verbatim.
AUTORESEARCH_BLOCK = """\
---
val_bpb:          0.997900
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8
"""

AUTORESEARCH_VALUES = {
    "val_bpb": 0.9979, "training_seconds": 300.1, "total_seconds": 325.9, "peak_vram_mb": 45060.2,
    "mfu_percent": 39.8, "total_tokens_M": 499.6, "num_steps": 953, "num_params_M": 50.3, "depth": 8,
}

TRAINING_NOISE = """\
Vocab size: 8,192
Model config: {'sequence_len': 2048, 'depth': 8}
step 00951 (99.8%) | loss: 3.213344 | lrm: 0.01 | dt: 313ms | tok/sec: 1,674,235 | mfu: 39.8%
step 00952 (99.9%) | loss: 3.210125 | lrm: 0.00 | dt: 312ms | tok/sec: 1,679,862 | mfu: 39.9%
val_bpb: 7.5
depth: 99
"""


class TestSummaryBlock:
    def test_exact_autoresearch_block(self):
        parsed = parse_summary_block(AUTORESEARCH_BLOCK)
        assert parsed == AUTORESEARCH_VALUES
        assert type(parsed["num_steps"]) is int
        assert type(parsed["depth"]) is int
        for key in AUTORESEARCH_VALUES.keys() - {"num_steps", "depth"}:
            assert type(parsed[key]) is float, key

    def test_lines_before_the_block_are_ignored(self):
        parsed = parse_summary_block(TRAINING_NOISE + AUTORESEARCH_BLOCK)
        assert parsed == AUTORESEARCH_VALUES  # not the stray "val_bpb: 7.5" / "depth: 99" above it

    def test_the_last_block_wins(self):
        text = "---\nval_bpb: 2.5\ndepth: 4\nfirst run done\n" + "---\nval_bpb: 1.25\nnum_steps: 10\n"
        assert parse_summary_block(text) == {"val_bpb": 1.25, "num_steps": 10}

    def test_block_ends_at_the_first_other_line(self):
        text = "---\nval_bpb: 1.5\n\ndepth: 3\nall done, bye\nnum_steps: 7\n"
        assert parse_summary_block(text) == {"val_bpb": 1.5, "depth": 3}

    def test_no_block_no_metrics(self):
        assert parse_summary_block("val_bpb: 1.0\nnum_steps: 3\n") == {}
        assert parse_summary_block("") == {}

    def test_integer_keys_written_as_floats_become_ints(self):
        parsed = parse_summary_block("---\nnum_steps: 953.0\ndepth: 8.0\n")
        assert parsed == {"num_steps": 953, "depth": 8}
        assert type(parsed["num_steps"]) is int and type(parsed["depth"]) is int

    def test_nan_is_read_as_a_float(self):
        parsed = parse_summary_block("---\nval_bpb: nan\n")
        assert math.isnan(parsed["val_bpb"])


class TestResultLine:
    def test_json_line_wins_key_by_key(self):
        text = AUTORESEARCH_BLOCK + 'fanout-result {"val_bpb": 1.5, "profile": "fast"}\n'
        merged = parse_metrics(text)
        assert merged["val_bpb"] == 1.5  # from the JSON line
        assert merged["profile"] == "fast"  # only in the JSON line
        assert merged["num_steps"] == 953 and merged["depth"] == 8  # only in the block
        assert merged["peak_vram_mb"] == 45060.2

    def test_json_line_alone(self):
        assert parse_metrics('noise\nfanout-result {"val_bpb": 0.9, "num_steps": 3}\n') == {
            "val_bpb": 0.9, "num_steps": 3,
        }

    def test_last_well_formed_line_wins_and_malformed_ones_are_ignored(self):
        text = (
            'fanout-result {"val_bpb": 3.0}\n'
            'fanout-result {"val_bpb": 1.1, "note": "good"}\n'
            "fanout-result {not json at all\n"
            "fanout-result [1, 2, 3]\n"
        )
        assert parse_result_line(text) == {"val_bpb": 1.1, "note": "good"}
        assert parse_metrics(text) == {"val_bpb": 1.1, "note": "good"}

    def test_only_malformed_lines_give_nothing(self):
        assert parse_result_line("fanout-result {oops\n") is None
        assert parse_metrics("---\nval_bpb: 2.0\nfanout-result {oops\n") == {"val_bpb": 2.0}


class TestClassifyExit:
    def test_zero_with_metric_succeeds(self):
        assert classify_exit(0, {"val_bpb": 0.99}, "") == (Phase.SUCCEEDED, None, "")

    def test_zero_without_metric_is_no_metric(self):
        phase, failure, reason = classify_exit(0, {"num_steps": 5}, "")
        assert (phase, failure) == (Phase.FAILED, Failure.NO_METRIC)
        assert reason.startswith("no metric")

    @pytest.mark.parametrize("value", [float("nan"), float("inf"), "1.0", True, None])
    def test_zero_with_unusable_val_bpb_is_no_metric(self, value):
        phase, failure, reason = classify_exit(0, {"val_bpb": value}, "")
        assert (phase, failure) == (Phase.FAILED, Failure.NO_METRIC)
        assert "no metric" in reason and "val_bpb" in reason

    def test_127_is_not_found(self):
        phase, failure, reason = classify_exit(127, {}, "sh: train.py: not found")
        assert (phase, failure) == (Phase.FAILED, Failure.NOT_FOUND)
        assert "127" in reason

    @pytest.mark.parametrize("text", [
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "Traceback ...\nMemoryError\n",
    ])
    def test_oom_text_is_out_of_memory(self, text):
        phase, failure, reason = classify_exit(1, {}, text)
        assert (phase, failure) == (Phase.FAILED, Failure.OUT_OF_MEMORY)
        assert "out of memory" in reason and "1" in reason

    def test_a_metric_does_not_rescue_a_non_zero_exit(self):
        phase, failure, _ = classify_exit(1, {"val_bpb": 0.9}, "")
        assert (phase, failure) == (Phase.FAILED, Failure.CRASH)

    def test_oom_text_does_not_spoil_a_success(self):
        phase, _, _ = classify_exit(0, {"val_bpb": 0.9}, "warning: CUDA out of memory, retrying")
        assert phase is Phase.SUCCEEDED

    def test_signal_is_a_crash(self):
        phase, failure, reason = classify_exit(-15, {}, "")
        assert (phase, failure) == (Phase.FAILED, Failure.CRASH)
        assert "signal 15" in reason

    def test_sigkill_is_a_crash_that_mentions_the_oom_killer(self):
        phase, failure, reason = classify_exit(-9, {}, "")
        assert (phase, failure) == (Phase.FAILED, Failure.CRASH)
        assert "SIGKILL" in reason

    def test_other_exit_is_a_crash_with_the_code(self):
        phase, failure, reason = classify_exit(3, {"val_bpb": float("nan")}, "boom")
        assert (phase, failure) == (Phase.FAILED, Failure.CRASH)
        assert "exit code 3" in reason


def test_usable_val_bpb():
    assert usable_val_bpb({"val_bpb": 1})
    assert usable_val_bpb({"val_bpb": 0.5})
    assert not usable_val_bpb({})
    assert not usable_val_bpb({"val_bpb": False})
    assert not usable_val_bpb({"val_bpb": float("-inf")})


def test_last_lines():
    assert last_lines("a\nb\nc\n", 2) == "b\nc"
    assert last_lines("a\nb\nc", 10) == "a\nb\nc"
    assert last_lines("a\nb\n", 0) == ""


class TestMetricsModel:
    def test_block_values_validate_into_the_model(self):
        metrics = Metrics.lenient(parse_metrics(AUTORESEARCH_BLOCK))
        assert metrics.val_bpb == 0.9979 and metrics.num_steps == 953 and metrics.depth == 8
        assert metrics.has_val_bpb
        assert metrics.reported() == AUTORESEARCH_VALUES

    def test_lenient_keeps_a_malformed_known_key_as_unparsed(self):
        metrics = Metrics.lenient({"val_bpb": "oops", "num_steps": 12, "depth": 2.5, "profile": "x"})
        assert metrics.val_bpb is None and not metrics.has_val_bpb
        assert metrics.depth is None
        assert metrics.num_steps == 12
        extra = metrics.model_extra or {}
        assert extra["unparsed_val_bpb"] == "oops"
        assert extra["unparsed_depth"] == 2.5
        assert extra["profile"] == "x"
        assert metrics.reported() == {
            "num_steps": 12, "unparsed_val_bpb": "oops", "unparsed_depth": 2.5, "profile": "x",
        }

    def test_nan_is_not_a_usable_val_bpb(self):
        assert not Metrics(val_bpb=float("nan")).has_val_bpb
        assert Metrics(val_bpb=1.0).has_val_bpb
