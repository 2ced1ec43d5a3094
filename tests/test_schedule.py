"""The schedule against hand-computed plans (DESIGN.md §2)."""

import pytest

from runtime.schedule import Cuts, ScheduleError, bound, build_schedule, default_cached_blocks


def plan_rows(schedule):
    return [(s.kind, s.actions, s.record, s.block_runs) for s in schedule.steps]


FULL3 = (("run", "front"), ("run", "middle"), ("run", "rear"))


def test_default_pixart_plan_by_hand():
    # T=20, N=2, N_c=21, b=12, L=28: cuts a=7, c=21; front=[0,7) middle=[7,21) rear=[21,28).
    # Rear range [7,28) = middle+rear; front range [0,21) = front+middle.
    s = build_schedule("delta-dit", num_steps=20, num_layers=28, cached_blocks=21, interval=2, boundary=12)
    assert (s.cuts.a, s.cuts.c) == (7, 21)
    assert [(x.name, x.start, x.end) for x in s.cuts.segments] == [("front", 0, 7), ("middle", 7, 21), ("rear", 21, 28)]
    full = ("full", FULL3, ("front", "rear"), 28)
    cache_rear = ("cache-rear", (("run", "front"), ("reuse", "rear")), (), 7)
    cache_front = ("cache-front", (("reuse", "front"), ("run", "rear")), (), 7)
    expected = []
    for i in range(20):
        if i % 2 == 0:
            expected.append(full)
        elif i < 12:
            expected.append(cache_rear)
        else:
            expected.append(cache_front)
    assert plan_rows(s) == expected
    # Steps 1,3,...,11 cache the rear; 13,...,19 the front.
    assert [s.steps[i].kind for i in (1, 11, 13, 19)] == ["cache-rear", "cache-rear", "cache-front", "cache-front"]
    assert s.block_runs == 10 * 28 + 10 * 7 == 350
    assert s.bound == pytest.approx(560 / 350) == pytest.approx(1.6)


def test_interval_one_means_every_step_full():
    s = build_schedule("delta-dit", num_steps=7, num_layers=28, cached_blocks=21, interval=1, boundary=3)
    assert all(step.kind == "full" for step in s.steps)
    assert s.bound == 1.0
    # Nothing is ever reused, so nothing needs recording (no delta buffers get allocated).
    assert s.cached_ranges == ()


def test_boundary_zero_caches_only_the_front():
    s = build_schedule("delta-dit", num_steps=6, num_layers=28, cached_blocks=21, interval=2, boundary=0)
    assert [st.kind for st in s.steps] == ["full", "cache-front"] * 3
    assert s.steps[0].record == ("front",)
    assert s.cached_ranges == ("front",)


def test_boundary_T_caches_only_the_rear():
    s = build_schedule("delta-dit", num_steps=6, num_layers=28, cached_blocks=21, interval=2, boundary=6)
    assert [st.kind for st in s.steps] == ["full", "cache-rear"] * 3
    assert s.steps[0].record == ("rear",)


def test_cached_blocks_below_half():
    # N_c=6 < L/2: a=6, c=22; the front range is the front segment alone, the rear range the rear alone.
    s = build_schedule("delta-dit", num_steps=4, num_layers=28, cached_blocks=6, interval=2, boundary=2)
    assert (s.cuts.a, s.cuts.c) == (6, 22)
    assert s.cuts.range_segments("front") == ("front",)
    assert s.cuts.range_segments("rear") == ("rear",)
    assert plan_rows(s) == [
        ("full", FULL3, ("front", "rear"), 28),
        ("cache-rear", (("run", "front"), ("run", "middle"), ("reuse", "rear")), (), 22),
        ("full", FULL3, ("front", "rear"), 28),
        ("cache-front", (("reuse", "front"), ("run", "middle"), ("run", "rear")), (), 22),
    ]
    # The LCM setting of DESIGN.md §2: 4 steps, N=2, N_c=6 → 1.12×.
    assert s.bound == pytest.approx(1.12)


def test_cached_blocks_half_has_no_middle():
    s = build_schedule("delta-dit", num_steps=4, num_layers=28, cached_blocks=14, interval=2, boundary=2)
    assert [x.name for x in s.cuts.segments] == ["front", "rear"]
    assert s.steps[0].actions == (("run", "front"), ("run", "rear"))
    assert s.steps[1].actions == (("run", "front"), ("reuse", "rear"))
    assert s.steps[3].actions == (("reuse", "front"), ("run", "rear"))


def test_cached_blocks_above_half_ranges_overlap_in_the_middle():
    cuts = Cuts(12, 9)
    assert (cuts.a, cuts.c) == (3, 9)
    assert cuts.range_segments("front") == ("front", "middle")
    assert cuts.range_segments("rear") == ("middle", "rear")


def test_policy_none_is_all_full():
    s = build_schedule("none", num_steps=5, num_layers=12, cached_blocks=9)
    assert [st.kind for st in s.steps] == ["full"] * 5
    assert s.block_runs == 60 and s.bound == 1.0


def test_output_cache_mode_and_presets():
    s = build_schedule("output-cache", num_steps=4, num_layers=12, cached_blocks=9, interval=2, boundary=2)
    assert s.cache_mode == "output"
    assert build_schedule("delta-front", num_steps=4, num_layers=12, cached_blocks=9).boundary == 0
    assert build_schedule("delta-rear", num_steps=4, num_layers=12, cached_blocks=9).boundary == 4


@pytest.mark.parametrize("T", [1, 4, 7, 20, 33])
@pytest.mark.parametrize("N", [1, 2, 3, 5])
def test_bound_formula_matches_the_plan(T, N):
    s = build_schedule("delta-dit", num_steps=T, num_layers=28, cached_blocks=21, interval=N, boundary=min(12, T))
    assert s.bound == pytest.approx(bound(T, 28, 21, N))
    full = sum(1 for i in range(T) if i % N == 0)
    assert s.block_runs == full * 28 + (T - full) * 7


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(interval=0), "interval"),
        (dict(interval=-1), "interval"),
        (dict(boundary=-1), "boundary"),
        (dict(boundary=21), "boundary"),
        (dict(num_steps=0), "num_steps"),
        (dict(cached_blocks=0), "cached_blocks"),
        (dict(cached_blocks=28), "cached_blocks"),
        (dict(cached_blocks=2.5), "cached_blocks"),
        (dict(boundary=None), "boundary"),
    ],
)
def test_invalid_parameters_name_themselves(kwargs, name):
    args = dict(num_steps=20, num_layers=28, cached_blocks=21, interval=2, boundary=12) | kwargs
    with pytest.raises(ScheduleError, match=name):
        build_schedule("delta-dit", **args)


def test_unknown_policy():
    with pytest.raises(ScheduleError, match="unknown policy 'fast'.*delta-dit"):
        build_schedule("fast", num_steps=2, num_layers=4, cached_blocks=2)


def test_default_cached_blocks():
    assert default_cached_blocks(28) == 21
    assert default_cached_blocks(12) == 9
    assert default_cached_blocks(2) == 1


def test_printable():
    s = build_schedule("delta-dit", num_steps=20, num_layers=28, cached_blocks=21, interval=2, boundary=12)
    text = s.format()
    assert "front=[0,7), middle=[7,21), rear=[21,28)" in text
    assert "block-runs 350 of 560; ideal speedup bound 1.600x" in text
    assert len(text.splitlines()) == 3 + 20 + 1
    assert s.to_dict()["bound"] == 1.6


def test_runtime_cli_prints_the_plan_of_an_export(pixart_export):
    from click.testing import CliRunner

    from runtime.__main__ import cli

    r = CliRunner().invoke(cli, ["schedule", str(pixart_export), "--steps", "6"])
    assert r.exit_code == 0, r.output
    # Tiny export: L=6, N_c=4; the manifest's b=12 of 20 steps scales to 4 of 6.
    assert "T=6 N=2 N_c=4 b=4 L=6" in r.stdout and "   5  cache-front" in r.stdout
    r = CliRunner().invoke(cli, ["info", str(pixart_export)])
    assert r.exit_code == 0 and "files verified (sha256)" in r.stdout
    r = CliRunner().invoke(cli, ["schedule", str(pixart_export), "--boundary", "9", "--steps", "6"])
    assert r.exit_code == 1 and "Error: " in r.stderr and "boundary=9 is out of range" in r.stderr
    assert "Traceback" not in r.output
