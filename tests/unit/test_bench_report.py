"""The benchmark runner's merge and the report's markdown, ratios and plots, on synthetic records.

No VM: the scripts run here are tiny Python files written by the tests.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import __main__ as runner
from benchmarks import common, report
from pytest_ignition._testing import proc_state


def rec(metric, engine, where, samples=(10.0, 20.0, 30.0), **params):
    return common.record(metric, engine, where, params, samples)


META = {
    "date": "2026-11-27T12:00:00Z",
    "command": "python -m benchmarks",
    "machine": {
        "cpu_model": "Test CPU 9000",
        "cores": 2,
        "arch": "x86_64",
        "os": "Linux",
        "kernel": "6.1.0-test",
        "kvm": "kvm-pvm",
        "kvm_is_pvm": True,
        "loadavg": [1.0, 2.0, 3.0],
    },
}


# ----------------------------------------------------------------- stats and record format


def test_percentile_interpolates() -> None:
    assert common.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert common.percentile([0.0, 10.0], 0.1) == pytest.approx(1.0)
    assert common.percentile([7.0], 0.9) == 7.0
    with pytest.raises(ValueError):
        common.percentile([], 0.5)
    with pytest.raises(ValueError):
        common.percentile([1.0], 1.5)


def test_summarize_sorts_and_counts() -> None:
    s = common.summarize_ms([30, 10, 20, 40, 50, 60, 70, 80, 90, 100, 0])
    assert s == {"median_ms": 50.0, "p10_ms": 10.0, "p90_ms": 90.0, "n": 11}
    with pytest.raises(ValueError):
        common.summarize_ms([])
    with pytest.raises(ValueError):
        common.summarize_ms([1.0, -2.0])


def test_record_is_valid_and_rejects_unknown_names() -> None:
    r = rec("launch_to_ready", "qemu", "tcg", memory_mib=512)
    assert common.validate(r) == []
    assert set(common.REQUIRED_KEYS) <= set(r)
    with pytest.raises(ValueError):
        common.record("boot", "qemu", "tcg", {}, [1.0])
    with pytest.raises(ValueError):
        common.record("launch_to_ready", "qemu", "kvm", {}, [1.0])


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"metric": "nope"}, "unknown metric"),
        ({"where": "cloud"}, "unknown where"),
        ({"median_ms": -1.0}, "median_ms"),
        ({"median_ms": float("nan")}, "median_ms"),
        ({"p10_ms": 25.0}, "p10 <= median"),
        ({"n": 0}, "n must be"),
        ({"n": True}, "n must be"),
        ({"params": []}, "params"),
        ({"median_ms": None}, "absent"),
    ],
)
def test_validate_finds_bad_records(change, problem) -> None:
    r = {**rec("snapshot_time", "qemu", "tcg"), **change}
    assert any(problem in p for p in common.validate(r)), common.validate(r)


def test_validate_missing_keys_and_non_objects() -> None:
    assert common.validate([1, 2]) == ["not an object: list"]
    r = rec("snapshot_time", "qemu", "tcg")
    del r["host"]
    assert common.validate(r) == ["missing host"]


def test_absent_record_is_valid() -> None:
    a = common.absent_record("rollback_time", "ignition", "direct", "script missing", memory_mib=1)
    assert common.validate(a) == []
    assert common.is_absent(a) and a["n"] == 0 and a["absent"] == "script missing"


def test_load_records_tolerates_garbage(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    assert common.load_records(p) == []
    p.write_text("{not json")
    assert common.load_records(p) == []
    p.write_text(json.dumps({"metric": "a"}))
    assert common.load_records(p) == [{"metric": "a"}]
    p.write_text(json.dumps([{"metric": "a"}, 3, "x"]))
    assert common.load_records(p) == [{"metric": "a"}]


# ----------------------------------------------------------------- the runner's merge


def test_new_records_for_appending_and_rewriting_scripts() -> None:
    a, b, c = ({"i": 1}, {"i": 2}, {"i": 3})
    assert runner.new_records([a, b], [a, b, c]) == [c]  # appends
    assert runner.new_records([a, b], [c]) == [c]  # rewrites
    assert runner.new_records([a], [a, a]) == [a]  # the same record twice counts once more
    assert runner.new_records([a, b], [a, b]) == []


def test_normalize_maps_accelerators_to_where() -> None:
    r = runner.normalize(rec("launch_to_ready", "qemu", "tcg"), "u", "T")
    assert r["where"] == "tcg" and r["unit"] == "u" and r["when"] == "T"
    k = {**rec("launch_to_ready", "qemu", "tcg"), "where": "kvm"}
    n = runner.normalize(k, "u", "T")
    assert n["where"] == "direct" and n["params"]["accel"] == "kvm"
    assert k["where"] == "kvm"  # the input is not modified


def _unit(name, expects, group=None, **kw) -> runner.Unit:
    return runner.Unit(name, group or name, name, f"{name}.json", [], [], expects, 60, **kw)


def test_merge_marks_every_unmet_expectation_absent_with_its_reason() -> None:
    E = runner.Expect
    units = [
        _unit("good", [E("snapshot_time", "qemu", "tcg", {"memory_mib": 512})]),
        _unit("broken", [E("rollback_time", "ignition", "direct")]),
        _unit("partial", [E("launch_to_ready", "ignition", "nested"), E("guest_boot_time", "qemu", "nested")]),
        _unit("skipped", [E("pytest_per_test", "qemu", "tcg")]),
        _unit("late", [E("restore_to_ready", "qemu", "tcg")]),
    ]  # fmt: skip
    bad = {**rec("snapshot_time", "qemu", "tcg"), "median_ms": "fast"}
    ratio_line = {"metric": "ratio", "of": "snapshot_time", "ignition_over_qemu": 0.5}
    statuses = [
        {"unit": "good", "ok": True, "records": [rec("snapshot_time", "qemu", "tcg", memory_mib=512), bad, ratio_line]},
        {"unit": "broken", "ok": False, "reason": "exit 1: Traceback", "records": []},
        {"unit": "partial", "ok": True, "records": [rec("launch_to_ready", "ignition", "nested")]},
    ]  # fmt: skip
    records, problems = runner.merge(statuses, units, {"good", "broken", "partial", "late"}, "T")
    assert len(problems) == 1 and "median_ms" in problems[0]
    assert all(common.validate(r) == [] for r in records)
    reasons = {(r["metric"]): r.get("absent") for r in records}
    assert reasons["snapshot_time"] is None
    assert reasons["launch_to_ready"] is None
    assert reasons["rollback_time"] == "broken: exit 1: Traceback"
    assert reasons["guest_boot_time"] == "partial ran but produced no such record"
    assert reasons["pytest_per_test"] == "not selected (--only)"
    assert reasons["restore_to_ready"] == "not run (time budget exhausted)"
    assert len(records) == 6


def test_expect_matches_params_subset() -> None:
    e = runner.Expect("restore_to_ready", "qemu", "tcg", {"memory_mib": 128})
    assert e.matches(rec("restore_to_ready", "qemu", "tcg", memory_mib=128, qemu="7.2"))
    assert not e.matches(rec("restore_to_ready", "qemu", "tcg", memory_mib=512))
    assert not e.matches(rec("restore_to_ready", "ignition", "tcg", memory_mib=128))
    assert e.matches(rec("restore_to_ready", "qemu", "tcg", mem_mib=128))


def test_plan_expects_every_metric() -> None:
    units = runner.plan(quick=False, qwhere="tcg")
    expected = {e.metric for u in units for e in u.expects}
    assert expected == set(common.METRICS)
    names = [u.name for u in units]
    assert len(names) == len(set(names))
    sizes = {
        e.params.get("memory_mib")
        for u in units
        for e in u.expects
        if e.metric == "restore_to_ready" and e.where == "tcg"
    }
    assert sizes == {128, 512, 2048}
    nested = {
        e.engine
        for u in units
        for e in u.expects
        if e.metric == "restore_to_ready" and e.where == "nested"
    }
    assert nested == {"ignition", "qemu"}
    per_test = {
        (e.engine, e.where, e.params.get("reset"))
        for u in units
        for e in u.expects
        if e.metric == "pytest_per_test"
    }
    assert per_test == {
        ("qemu", "tcg", None),
        ("ignition", "nested", "restore"),
        ("ignition", "nested", "rollback"),
        ("qemu", "nested", "restore"),
    }
    for u in units:
        if any(e.where == "nested" for e in u.expects):
            assert u.via[:3] == [sys.executable, "-m", "pytest_ignition.nested"], u.name


SCRIPT_OK = """
import json, sys
path = sys.argv[1]
try:
    old = json.load(open(path))
except OSError:
    old = []
new = {"metric": "snapshot_time", "engine": "qemu", "where": "tcg", "params": {},
       "median_ms": 2.0, "p10_ms": 1.0, "p90_ms": 3.0, "n": 3, "host": "h"}
json.dump(old + [new], open(path, "w"))
"""


def _script_unit(tmp_path: Path, body: str, name: str = "fake") -> runner.Unit:
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(body))
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    return runner.Unit(
        name, name, name, f"{name}.json", [str(results / f"{name}.json")], [], [], 30, script=script
    )


def test_run_unit_collects_only_this_runs_records(tmp_path: Path) -> None:
    unit = _script_unit(tmp_path, SCRIPT_OK)
    old = {**rec("snapshot_time", "qemu", "tcg"), "when": "yesterday"}
    (tmp_path / "results" / "fake.json").write_text(json.dumps([old]))
    st = runner.run_unit(unit, False, 30, tmp_path / "results", tmp_path / "logs")
    assert st["ok"], st
    assert [r["median_ms"] for r in st["records"]] == [2.0]
    assert st["command"].startswith("python ")


def test_run_unit_runs_a_wrapped_script_through_its_wrapper(tmp_path: Path) -> None:
    body = SCRIPT_OK.replace(
        '"params": {}', '"params": {"via": __import__("os").environ.get("VIA")}'
    )
    unit = _script_unit(tmp_path, body)
    unit.via = ["env", "VIA=wrapper"]
    st = runner.run_unit(unit, False, 30, tmp_path / "results", tmp_path / "logs")
    assert st["ok"], st
    assert st["records"][0]["params"] == {"via": "wrapper"}
    assert st["command"].startswith("env VIA=wrapper python ")
    assert unit.argv(["--help"], wrapped=False)[0] == sys.executable


def test_run_unit_reports_failure_missing_script_and_silence(tmp_path: Path) -> None:
    failing = _script_unit(tmp_path, "import sys\nprint('kaboom')\nsys.exit(3)\n", "failing")
    st = runner.run_unit(failing, False, 30, tmp_path / "results", tmp_path / "logs")
    assert not st["ok"] and st["reason"].startswith("exit 3") and "kaboom" in st["reason"]

    silent = _script_unit(tmp_path, "pass\n", "silent")
    st = runner.run_unit(silent, False, 30, tmp_path / "results", tmp_path / "logs")
    assert not st["ok"] and "no new records" in st["reason"]

    missing = runner.Unit("m", "m", "m", "m.json", [], [], [], 30, script=tmp_path / "nope.py")
    st = runner.run_unit(missing, False, 30, tmp_path / "results", tmp_path / "logs")
    assert not st["ok"] and "nope.py does not exist" in st["reason"]


def test_run_unit_timeout_kills_the_script_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    body = f"""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open({str(pidfile)!r}, "w").write(str(child.pid))
    time.sleep(60)
    """
    unit = _script_unit(tmp_path, body, "hang")
    st = runner.run_unit(unit, False, 8, tmp_path / "results", tmp_path / "logs")
    assert not st["ok"] and "timed out" in st["reason"]
    assert pidfile.exists(), "the script did not start its child within the timeout"
    child = int(pidfile.read_text())

    def state() -> str:
        return proc_state(child) or "gone"

    # The child was in the script's process group: it dies (a signalled process may need a
    # moment to be scheduled and exit; then it is a zombie until its new parent reaps it).
    deadline = time.monotonic() + 10
    while state() not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state() in ("gone", "Z")


# ----------------------------------------------------------------- ratios and markdown


def test_ratios_pair_same_metric_where_and_workload() -> None:
    records = [
        rec("launch_to_ready", "ignition", "nested", (100.0,), memory_mib=512, loadavg_1m=5.0),
        rec(
            "launch_to_ready",
            "qemu",
            "nested",
            (400.0,),
            memory_mib=512,
            qemu="7.2.22",
            loadavg_1m=3.1,
        ),
        rec("launch_to_ready", "qemu", "nested", (999.0,), memory_mib=2048),
        rec("launch_to_ready", "qemu", "tcg", (50.0,), memory_mib=512),
        rec("restore_time_host", "ignition", "direct", (5.0,), memory_mib=512),
        rec("restore_to_ready", "qemu", "tcg", (200.0,), memory_mib=512),
        common.absent_record("guest_boot_time", "ignition", "nested", "x"),
        rec("guest_boot_time", "qemu", "nested", (30.0,)),
    ]
    rs = report.ratios(records)
    assert len(rs) == 1
    (r,) = rs
    assert (r["metric"], r["where"], r["ratio"]) == ("launch_to_ready", "nested", 0.25)
    assert r["params"] == {"memory_mib": 512}


def test_ratios_never_pair_an_image_root_with_the_initramfs_guest() -> None:
    records = [
        rec("launch_to_ready", "ignition", "nested", (100.0,), memory_mib=512),
        rec("launch_to_ready", "qemu", "nested", (400.0,), memory_mib=512, image="debian:bookworm"),
        rec("launch_to_ready", "ignition", "nested", (300.0,), memory_mib=512, image="debian:bookworm"),
    ]  # fmt: skip
    (r,) = report.ratios(records)
    assert r["ratio"] == 0.75 and r["params"] == {"memory_mib": 512, "image": "debian:bookworm"}


def test_image_and_kernel_sections_set_the_variants_side_by_side() -> None:
    boot = [
        rec("launch_to_ready", "qemu", "tcg", (2000.0,), memory_mib=512),
        rec("launch_to_ready", "qemu", "tcg", (5000.0,), memory_mib=512,
            image="debian:bookworm", packages="python3"),
        # another script's initramfs record (another unit) is not the image's baseline
        {**rec("launch_to_ready", "qemu", "tcg", (9.0,), memory_mib=512), "unit": "other"},
    ]  # fmt: skip
    kern = [
        rec("guest_boot_time", "qemu", "tcg", (1000.0,), kernel_fragment="before",
            fragment_commit="274900e", bzimage_kib=1800, method="console-marker"),
        rec("guest_boot_time", "qemu", "tcg", (1500.0,), kernel_fragment="after",
            fragment_commit="3200732", bzimage_kib=2800, method="console-marker"),
        rec("initcall_time", "qemu", "tcg", (100.0,), kernel_fragment="before", group="total"),
        rec("initcall_time", "qemu", "tcg", (180.0,), kernel_fragment="after", group="total"),
        rec("initcall_time", "qemu", "tcg", (30.0,), kernel_fragment="after", group="net/ipv6"),
    ]  # fmt: skip
    md = report.markdown(boot + kern, META)
    assert "## Root image beside the initramfs-only guest" in md
    assert (
        "| `launch_to_ready` | qemu | tcg | debian:bookworm python3 | 2.00 s | 5.00 s | 2.50× |"
        in md
    )
    assert "## Guest kernel before and after" in md and "`274900e`" in md
    assert "| `guest_boot_time` | qemu/tcg | 1.00 s (1.00 s–1.00 s) | 1.50 s" in md
    assert "1.50×" in md and "before 1800 KiB, after 2800 KiB" in md
    assert "| total | 100 | 180 | +80.00 |" in md
    assert "| net/ipv6 | — | 30.0 | +30.00 |" in md
    assert "Guest kernel before" not in report.markdown(boot, META)


def test_replace_part_keeps_the_other_parts(tmp_path: Path) -> None:
    path = tmp_path / "images.json"
    old_build = rec("image_build_time", "builder", "host", cache="hit")  # no part: "build"
    common.write_records(path, [old_build])
    common.replace_part(path, "kernel-cost", [rec("guest_boot_time", "qemu", "tcg")])
    common.replace_part(path, "kernel-cost", [rec("kernel_to_init", "qemu", "tcg")])
    got = common.load_records(path)
    assert [(r["metric"], r.get("part")) for r in got] == [
        ("image_build_time", None),
        ("kernel_to_init", "kernel-cost"),
    ]
    common.replace_part(path, "build", [rec("image_build_time", "builder", "host", cache="cold")])
    assert [r["params"].get("cache") for r in common.load_records(path)] == [None, "cold"]


def test_ratios_skip_a_zero_qemu_median() -> None:
    records = [
        rec("rollback_time", "ignition", "direct", (1.0,)),
        rec("rollback_time", "qemu", "direct", (0.0,)),
    ]
    assert report.ratios(records)[0]["ratio"] is None


def test_markdown_groups_by_metric_and_says_what_is_comparable() -> None:
    records = [
        rec("pytest_per_test", "qemu", "tcg", (400.0, 410.0)),
        rec("launch_to_ready", "ignition", "nested", (2000.0,)),
        rec("launch_to_ready", "qemu", "nested", (8000.0,)),
        rec("restore_time_host", "ignition", "direct", (12.5,), memory_mib=128),
        common.absent_record("rollback_time", "ignition", "direct", "vmm_restore: exit 1: oops"),
    ]
    md = report.markdown(records, {**META, "units": [{"unit": "u", "ok": False, "reason": "r|x"}]})
    assert md.startswith("# Benchmarks, 2026-11-27T12:00:00Z")
    assert "Test CPU 9000, 2 cores" in md and "6.1.0-test" in md and "PVM" in md
    order = [
        md.index(f"`{m}`:")
        for m in ("launch_to_ready", "restore_time_host", "rollback_time", "pytest_per_test")
    ]
    assert order == sorted(order)  # the record format's metric order
    assert "**0.25×**" in md and "| launch_to_ready | nested |" in md
    assert "vmm_restore: exit 1: oops" in md
    assert "not KVM numbers" in md and "inflated" in md
    assert "shared with other jobs" in md
    assert "r\\|x" in md  # table cells escape pipes
    assert "| ignition | direct | memory_mib=128 | 12.5 |" in md


def test_markdown_without_pairs_says_so() -> None:
    md = report.markdown([rec("snapshot_time", "qemu", "tcg")], META)
    assert "No metric was measured for both engines" in md


def test_fmt_ms_and_params() -> None:
    assert report.fmt_ms(None) == "—"
    assert report.fmt_ms(2500.0) == "2.50 s"
    assert report.fmt_ms(123.4) == "123"
    assert report.fmt_ms(12.34, unit=True) == "12.3 ms"
    p = {"memory_mib": 512, "engine_description": "x", "long": "y" * 60, "l": [1], "loadavg_1m": 2}
    assert report.fmt_params(p) == "memory_mib=512"
    assert report.fmt_params({}) == "—"


def test_memory_and_dirty_page_keys() -> None:
    assert report.memory_mib({"memory_mib": 128}) == 128
    assert report.memory_mib({"memory_bytes": 2 << 30}) == 2048
    assert report.memory_mib({"memory_mib": True}) is None
    assert report.memory_mib({}) is None
    assert report.dirty_pages({"dirty_pages": 0}) == 0
    assert report.dirty_pages({"dirty": -1}) is None


def test_seed_table_sets_both_engines_beside_the_seed() -> None:
    records = [
        rec("guest_boot_time", "ignition", "nested", (4000.0,), memory_mib=256, method="boot-timer"),
        rec("guest_boot_time", "ignition", "nested", (5000.0,), memory_mib=256, method="console-marker"),
        rec("guest_boot_time", "qemu", "nested", (2000.0,), memory_mib=256, method="console-marker"),
        rec("restore_time_host", "ignition", "direct", (9.0,), memory_mib=128),
        rec("restore_time_host", "ignition", "direct", (8.0,), memory_mib=512),
        rec("restore_to_ready", "qemu", "tcg", (300.0,), memory_mib=512),
        rec("rollback_time", "ignition", "direct", (0.5,), dirty_pages=1),
        rec("rollback_time", "ignition", "direct", (40.0,), dirty_pages=100000),
        common.absent_record("launch_to_ready", "qemu", "nested", "x"),
    ]  # fmt: skip
    lines = report.seed_table(records)
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| ")}
    assert (
        "204 ms | 4.00 s (nested, 256 MiB, boot-timer) | 2.00 s (nested, 256 MiB, console-marker) |"
        in rows["Guest-boot-time"]
    )
    assert "| 8.00 ms (direct, 512 MiB) | — |" in rows["Restore-time (host side)"]
    assert rows["launch → ready (seed: → login:)"].endswith("| — | — |")
    assert "0.50 ms–40.0 ms (direct, 1–100000 dirty pages)" in rows["in-place rollback"]
    assert "300 ms (tcg, 512 MiB)" in rows["launch → restored and ready (seed: → prompt)"]


# ----------------------------------------------------------------- README section

README = """\
# Project

intro

## Benchmarks

old table
### sub
more old

```sh
## not a heading inside a fence
```

## License

MIT
"""


def test_replace_section_touches_only_its_section() -> None:
    new = report.replace_section(README, "## Benchmarks\n\nnew table\n")
    assert new.startswith("# Project\n\nintro\n\n## Benchmarks\n\nnew table\n\n## License\n\nMIT\n")
    assert "old table" not in new and "not a heading" not in new
    assert report.replace_section(new, "## Benchmarks\n\nnew table\n") == new  # idempotent


def test_replace_section_at_end_and_absent() -> None:
    text = "# P\n\n## Benchmarks\n\nold\n"
    assert report.replace_section(text, "## Benchmarks\n\nnew\n") == "# P\n\n## Benchmarks\n\nnew\n"
    assert report.replace_section("# P\n", "## Benchmarks\n\nx\n") == "# P\n\n## Benchmarks\n\nx\n"


def test_readme_section_explains_every_clock() -> None:
    records = [rec("restore_time_host", "ignition", "direct", (9.0,), memory_mib=512)]
    sec = report.readme_section(records, META)
    assert sec.startswith("## Benchmarks\n")
    for metric in common.METRICS:
        assert f"(`{metric}`)" in sec
    assert "2026-11-27T12:00:00Z" in sec and "Test CPU 9000" in sec
    assert "vCPU is handed to the run loop" in sec and "boot-timer" in sec
    assert sec.count("\n## ") == 0  # nothing that would end the section early


# ----------------------------------------------------------------- plots


def _is_png(p: Path) -> bool:
    return p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_with_data_writes_everything(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [
        rec("restore_time_host", "ignition", "direct", (5.0, 6.0), memory_mib=m) for m in (128, 512)
    ] + [
        rec("restore_to_ready", "qemu", "tcg", (150.0, 180.0), memory_mib=m) for m in (128, 512)
    ] + [
        rec("rollback_time", "ignition", "direct", (0.1 + d / 1000,), dirty_pages=d, memory_mib=512)
        for d in (0, 10, 1000, 20000)
    ]  # fmt: skip
    out = report.generate(records, META, tmp_path)
    names = {p.name for p in out}
    assert names == {
        "latest.md",
        "latest.meta.json",
        "restore_vs_memory.png",
        "rollback_vs_dirty.png",
    }
    assert all(_is_png(tmp_path / n) for n in names if n.endswith(".png"))
    meta = json.loads((tmp_path / "latest.meta.json").read_text())
    assert meta["ratios"] == [] and meta["date"] == META["date"]


def test_plots_survive_missing_data(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [
        common.absent_record(
            "rollback_time", "ignition", "direct", "vmm_restore.py does not exist"
        ),
        common.absent_record("restore_time_host", "ignition", "direct", "timed out"),
    ]
    report.plot_restore(records, tmp_path / "r.png")
    report.plot_rollback([], tmp_path / "b.png")
    assert _is_png(tmp_path / "r.png") and _is_png(tmp_path / "b.png")


def test_report_cli_regenerates_from_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = tmp_path / "latest.json"
    good = rec("snapshot_time", "qemu", "tcg")
    results.write_text(json.dumps([good, {"metric": "junk"}]))
    (tmp_path / "latest.meta.json").write_text(json.dumps(META))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    md = (tmp_path / "latest.md").read_text()
    assert "Test CPU 9000" in md and "snapshot_time" in md and "junk" not in md
    text = readme.read_text()
    assert "## License" in text and "old table" not in text and "Test CPU 9000" in text


def test_runner_only_rejects_unknown_names(capsys) -> None:
    with pytest.raises(SystemExit):
        runner.main(["--only", "no_such_benchmark", "--list"])
    assert "unknown benchmark" in capsys.readouterr().err


def test_runner_list_prints_the_plan(capsys) -> None:
    assert runner.main(["--list", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "qemu_engine_512M" in out and "--restores 3" in out


def test_per_test_settings_parse_and_become_pytest_args() -> None:
    from benchmarks.pytest_per_test import Setting

    assert Setting.parse("auto").pytest_args() == []
    assert Setting.parse("ignition:rollback").pytest_args() == [
        "--ignition-engine=ignition",
        "--ignition-reset=rollback",
    ]
    assert Setting.parse("qemu").pytest_args() == ["--ignition-engine=qemu"]
    assert Setting.parse("ignition:").reset is None
    for bad in ("firecracker", "qemu:snapshot"):
        with pytest.raises(Exception, match="ENGINE"):
            Setting.parse(bad)


def test_per_test_record_leaves_out_each_runs_setup_test() -> None:
    from benchmarks.pytest_per_test import Suite, to_record

    def suite(times: list[float], modes: list[str]) -> Suite:
        return Suite(times, "ignition", "kvm", "ignition (bundled VMM, kvm)", modes, 9.0, 0.5)

    # The 30 s and 40 s first tests carry the session setup: never in the statistics.
    runs = [suite([30.0, 0.1, 0.3], ["rollback"]), suite([40.0, 0.2, 0.4], ["rollback"])]
    r = to_record(runs, 2, ["--ignition-engine=ignition"], True, "nested")
    assert (r["engine"], r["where"], r["n"]) == ("ignition", "nested", 4)
    assert r["median_ms"] == 250.0 and r["max_ms"] == 400.0
    assert r["params"]["reset"] == "rollback" and r["params"]["accel"] == "kvm"
    assert r["session_setup_s"] == [30.0, 40.0] and r["runs"] == 2
    assert common.validate(r) == []

    # Without a where override the accelerator stays for the runner to map; mixed modes
    # (a fallback from rollback to restore) give no single reset param.
    r = to_record(
        [suite([1.0, 0.1], ["restore"]), suite([1.0, 0.1], ["rollback"])], 1, [], False, None
    )
    assert r["where"] == "kvm" and "reset" not in r["params"] and "accel" not in r["params"]


def test_console_marker_watch_finds_a_file_made_after_it_started(tmp_path: Path) -> None:
    watch = common.ConsoleMarkerWatch(tmp_path / "qemu-*" / "console.log", time.monotonic())
    watch.start()
    time.sleep(0.05)
    d = tmp_path / "qemu-abc"
    d.mkdir()
    (d / "console.log").write_bytes(b"Linux version ...\n")
    time.sleep(0.05)
    assert watch.seen is None and watch.is_alive()
    with open(d / "console.log", "ab") as f:
        f.write(common.BOOT_MARKER + b"\n")
    watch.join(5)
    assert watch.seen is not None and watch.seen >= 0.1


def test_console_marker_watch_stops_when_told(tmp_path: Path) -> None:
    watch = common.ConsoleMarkerWatch(tmp_path / "console.log", time.monotonic())
    watch.start()
    watch.stop.set()
    watch.join(5)
    assert not watch.is_alive() and watch.seen is None
