"""The pipeline timeline on real gloo processes: peak in-flight microbatches as scheduled,
and idle fractions no lower than the bubble formula (transfers only add waiting)."""

from __future__ import annotations

import pytest

from eurocore.benchmarks import pipeline_timeline as pt


@pytest.mark.parametrize("pp, vpp", [(2, 1), (2, 2)])
def test_timeline_of_two_stages(pp, vpp):
    row = pt.measure_layout(pp, vpp, num_microbatches=4, forward_ms=8.0)
    assert [s["stage"] for s in row["stages"]] == list(range(pp))
    for stage in row["stages"]:
        assert stage["peak_in_flight"] == stage["schedule_peak_in_flight"]
        assert row["bubble_formula"] - 0.03 <= stage["idle_fraction"] < 1.0, row
    assert row["stages"][0]["peak_in_flight"] == (2 if vpp == 1 else 5)
    assert "idle" in pt.format_table([row])
