"""benchmarks/browser.py's failure path (no VM): a failed sample keeps its VM's logs and is
named, so the run goes on and the column it leaves empty says why."""

from __future__ import annotations

from pathlib import Path

from benchmarks import browser


def test_a_failed_sample_keeps_its_logs_and_says_why(tmp_path: Path) -> None:
    work = tmp_path / "ignition-r3"
    (work / "vmm-abc").mkdir(parents=True)
    (work / "vmm-abc" / "console.log").write_text("[ 1.0] rcu: INFO: rcu_sched stall\n")
    (work / "vmm-abc" / "vmm.log").write_text("Restore-time = 198 ms\n")
    (work / "vmm-abc" / "memory.bin").write_bytes(b"\0" * 16)  # not a log: not copied
    failures: dict[str, list[str]] = {"ignition": []}

    browser._failed(
        failures, "ignition", "restore 3 (restore)", TimeoutError("no answer"), work, tmp_path / "l"
    )

    (why,) = failures["ignition"]
    assert why.startswith("restore 3 (restore): TimeoutError: no answer (logs: ")
    dest = Path(why.rsplit("(logs: ", 1)[1].rstrip(")"))
    assert (dest / "vmm-abc" / "console.log").read_text().endswith("stall\n")
    assert (dest / "vmm-abc" / "vmm.log").read_text() == "Restore-time = 198 ms\n"
    assert not (dest / "vmm-abc" / "memory.bin").exists()


def test_a_failed_sample_without_logs_is_still_named(tmp_path: Path) -> None:
    failures: dict[str, list[str]] = {"qemu": []}
    browser._failed(
        failures, "qemu", "boot 0", RuntimeError("x" * 900), tmp_path / "gone", tmp_path
    )
    (why,) = failures["qemu"]
    assert why == "boot 0: RuntimeError: " + "x" * 500


def test_rollbacks_are_spread_among_the_restores() -> None:
    assert [browser._rolls_back(i, 6, 3) for i in range(6)] == [False, True] * 3
    assert all(browser._rolls_back(i, 5, 5) for i in range(5))
    assert not any(browser._rolls_back(i, 5, 0) for i in range(5))
    assert sum(browser._rolls_back(i, 7, 2) for i in range(7)) == 2
