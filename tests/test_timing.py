"""The measurement harness (deltadit_export.timing): what it sets for both sides, the order of warm-up and
timed runs, isolation, failures, and the busy-machine warning. Never a timed assertion: durations are
only checked to exist, never compared."""

from __future__ import annotations

import pytest

import fake_rows
from deltadit_export import timing
from deltadit_export.timing import Measurement, Row, RowTiming, ThreadSettings, TimingError, measure


def test_warm_up_of_every_row_precedes_any_timed_run_and_runs_are_round_robin():
    rows = [Row(name, fake_rows.sleeper, {"tag": name}) for name in ("a", "b", "c")]
    m = measure(rows, repeats=3, warmup=2, threads=1)
    kinds = [k for k, _ in m.events]
    first_run = kinds.index("run")
    assert kinds.count("warmup") == 3 * 2 and "warmup" not in kinds[first_run:]
    assert all(k == "setup" for k in kinds[:3])
    assert [n for k, n in m.events if k == "run"] == ["a", "b", "c"] * 3  # round-robin, same order each round
    for name, r in m.rows.items():
        assert len(r.warmup_ms) == 2 and len(r.runs_ms) == 3
        assert r.min_ms <= r.median_ms <= r.max_ms
        # run i of the timed rounds got the round index; warm-ups ran i=0
        assert r.final["calls"] == [0, 0, 0, 1, 2] and r.records == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert r.final["threads"] == 1
    assert len({r.info["pid"] for r in m.rows.values()}) == 1  # one shared worker without isolate
    assert m.rows["a"].peak_rss_mb is None


def test_isolated_rows_get_their_own_process_and_peak_rss():
    rows = [Row(name, fake_rows.sleeper) for name in ("a", "b")]
    m = measure(rows, repeats=1, warmup=1, threads=1, isolate=True)
    assert m.rows["a"].info["pid"] != m.rows["b"].info["pid"]
    assert all(r.peak_rss_mb > 0 for r in m.rows.values())


def test_both_sides_get_the_same_thread_settings_read_back_from_torch_and_onnxruntime(pixart_export, monkeypatch):
    """An eager row and a runtime row on a tiny export: the harness set OMP_WAIT_POLICY=PASSIVE and the thread
    count before torch started in the worker (even against an ACTIVE policy in the caller's environment), and
    the runtime's ONNX Runtime sessions have the same thread count with spinning off."""
    from runtime.manifest import load_manifest

    from deltadit_export import bench_rows
    from deltadit_export.bench_baseline import make_inputs

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    m = load_manifest(pixart_export)
    common = {"engines": str(pixart_export), "inputs": make_inputs(m, pixart_export, 0, "x"), "num_steps": 2,
              "interval": 2, "boundary": 1, "guidance_scale": 4.5}
    rows = [Row("eager", bench_rows.eager_row, common),
            Row("none", bench_rows.runtime_row, dict(common, policy="none"))]
    out = measure(rows, repeats=1, warmup=1, threads=1, isolate=True)
    for r in out.rows.values():
        assert r.info["torch"] == {"threads": 1, "omp_wait_policy": "PASSIVE", "omp_num_threads": "1"}
    assert out.rows["none"].info["onnxruntime"] == {"intra_op_num_threads": 1, "allow_spinning": "0"}
    assert out.mismatches() == []
    header = "\n".join(out.header())
    assert "OMP_WAIT_POLICY=PASSIVE" in header and "allow_spinning=0" in header and "load average" in header


def test_worker_env_sets_the_openmp_policy_and_threads():
    env = ThreadSettings(3).worker_env()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "3"


def test_a_failing_row_names_itself_and_an_optional_one_is_left_out(caplog):
    with pytest.raises(TimingError, match="row 'bad'.*setup failed: RuntimeError: this row cannot be built here"):
        measure([Row("ok", fake_rows.sleeper), Row("bad", fake_rows.broken)], repeats=1, threads=1)
    m = measure([Row("ok", fake_rows.sleeper), Row("bad", fake_rows.broken, optional=True),
                 Row("later", fake_rows.fails_later, optional=True)], repeats=1, threads=1)
    assert list(m.rows) == ["ok"] and set(m.dropped) == {"bad", "later"}
    assert "no luck" in m.dropped["later"]
    assert any("row 'bad' left out" in line for line in m.header())


def _measurement(before, after, threads=2, torch_info=None) -> Measurement:
    info = {"torch": torch_info or {"threads": threads, "omp_wait_policy": "PASSIVE"}}
    row = RowTiming("a", [1.0, 2.0, 3.0], [1.0], 0.1, info)
    return Measurement({"a": row}, ThreadSettings(threads), 3, 1, False, before, after, [])


def test_busy_machine_warning_when_load_exceeds_the_threads_in_use():
    assert not _measurement(1.5, 2.0).busy()
    assert not any("busy" in line for line in _measurement(1.5, 2.0).header())
    for before, after in ((2.5, 1.0), (0.5, 4.0)):
        m = _measurement(before, after)
        assert m.busy()
        assert any(line.startswith("warning: the machine was busy") and "not comparable" in line for line in m.header())
    assert "2.50 before, 1.00 after" in "\n".join(_measurement(2.5, 1.0).header())


def test_mismatched_threads_are_reported():
    m = _measurement(0.0, 0.0, torch_info={"threads": 1, "omp_wait_policy": None})
    assert m.mismatches() and any("did not all get the same thread settings" in line for line in m.header())


def test_format_table_shows_median_min_max_and_ratios():
    a = RowTiming("eager", [10.0, 30.0, 20.0], [5.0], 0.0, {})
    b = RowTiming("none", [5.0, 5.0, 6.0], [5.0], 0.0, {})
    m = Measurement({"eager": a, "none": b}, ThreadSettings(1), 3, 1, False, 0.1, 0.2, [])
    text = timing.format_table(m, {"vs eager": "eager"})
    assert "20.0 (10.0–30.0)" in text and "5.0 (5.0–6.0)" in text and "4.00×" in text
    assert timing.ratio(m, "eager", "none") == pytest.approx(4.0)


def test_prefer_passive_wait_does_not_override_the_user(monkeypatch):
    # torch is imported in the test process, so the function only reports; it never changes the environment then.
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    note = timing.prefer_passive_wait()
    assert "torch was imported" in note
    import os

    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
