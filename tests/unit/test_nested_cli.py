"""The nested harness outside any VM: argument parsing, errors, QEMU command line, console parsing."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_ignition import nested


@pytest.fixture
def outside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IGNITION_NESTED", raising=False)
    monkeypatch.delenv("IGNITION_NESTED_KERNEL", raising=False)


# ----------------------------------------------------------------------------- parsing


def test_run_takes_the_command_after_double_dash() -> None:
    a = nested.parse_args(["run", "--mem", "2048", "--timeout", "60", "--", "ls", "-l", "--x"])
    assert a.command == "run"
    assert a.cmd == ["ls", "-l", "--x"]
    assert a.mem == 2048
    assert a.timeout == 60.0


def test_run_without_double_dash_keeps_options_of_the_command() -> None:
    a = nested.parse_args(["run", "python3", "-c", "pass", "--mem", "1"])
    assert a.cmd == ["python3", "-c", "pass", "--mem", "1"]
    assert a.mem == nested.DEFAULT_MEM_MB


def test_defaults() -> None:
    a = nested.parse_args(["run", "--", "true"])
    assert (a.mem, a.cpus, a.timeout, a.kernel, a.verbose) == (
        nested.DEFAULT_MEM_MB,
        nested.DEFAULT_CPUS,
        nested.DEFAULT_TIMEOUT,
        None,
        False,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["run", "--"],
        ["run", "--mem", "10", "--", "true"],
        ["run", "--cpus", "0", "--", "true"],
        ["run", "--timeout", "-1", "--", "true"],
        ["run", "--mem", "lots", "--", "true"],
        ["run", "--retries", "-1", "--", "true"],
        [],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        nested.parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err  # argparse said why


# ----------------------------------------------------------------------------- errors


def test_missing_host_kernel_is_a_clear_error(
    outside: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(nested, "_host_kernel", lambda: None)
    ok, reason = nested.available()
    if nested.shutil.which(nested.QEMU) is None:
        assert not ok and "qemu" in reason.lower()
        return
    assert not ok
    assert "python -m pytest_ignition.guest build --host" in reason
    assert nested.main(["run", "--", "true"]) == nested.EXIT_HARNESS
    assert "not built" in capsys.readouterr().err


def test_missing_qemu_is_a_clear_error(
    outside: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(nested, "QEMU", "qemu-system-does-not-exist")
    ok, reason = nested.available()
    assert not ok
    assert "qemu-system-does-not-exist not found" in reason
    assert nested.main(["check"]) == 1
    assert "not usable" in capsys.readouterr().out


def test_explicit_kernel_that_does_not_exist(
    outside: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-bzImage"
    assert nested.main(["run", "--kernel", str(missing), "--", "true"]) == nested.EXIT_HARNESS
    assert str(missing) in capsys.readouterr().err


def test_refuses_to_nest_inside_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNITION_NESTED", "1")
    ok, reason = nested.available()
    assert not ok and "already inside" in reason
    with pytest.raises(nested.NestedError, match="already inside"):
        nested.run(["true"])


def test_empty_command_is_rejected() -> None:
    with pytest.raises(ValueError):
        nested.run([])


def test_cli_entry_point_runs_as_a_module(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "IGNITION_NESTED_KERNEL": str(tmp_path / "none")}
    p = subprocess.run(
        [sys.executable, "-m", "pytest_ignition.nested", "check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 1
    assert "not usable" in p.stdout


# ----------------------------------------------------------------------------- host panics

# The end of a real host-kernel oops under TCG (CI, 2026-12-02; function names as kallsyms
# prints them, the call trace shortened).
PANIC_CONSOLE = """\
tests/nested/test_chaos_ignition.py::test_chaos_on_the_bundled_vmm[restore]
BUG: kernel NULL pointer dereference, address: 0000000000000018
#PF: supervisor read access in kernel mode
Oops: 0000 [#1] SMP NOPTI
CPU: 1 PID: 812 Comm: python3 Not tainted 6.1.192 #1
Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1 04/01/2014
RIP: 0010:lock_mm_and_find_vma+0x65/0x101
Code: 4c 89 e7 e8 2a 4a 25 00 85 c0 75 35 eb d8 f6 85 88 00 00 00 03 75 e9 48 8b bd 80 00
RSP: 0000:ffff888100bebee0 EFLAGS: 00000206
RAX: 0000000000000018 RBX: 0000000000000018 RCX: ffff88810e42afd8
Call Trace:
 <TASK>
 do_user_addr_fault+0x1a1/0x3b0
 exc_page_fault+0x5c/0x110
 asm_exc_page_fault+0x22/0x30
 ? 0xffffffff810a2ed9
 </TASK>
---[ end trace 0000000000000000 ]---
RIP: 0010:lock_mm_and_find_vma+0x65/0x101
Kernel panic - not syncing: Fatal exception in interrupt
Shutting down cpus with NMI
"""


def test_oops_digest_keeps_what_died_and_where() -> None:
    d = nested.oops_digest(PANIC_CONSOLE).splitlines()
    assert d[0] == "BUG: kernel NULL pointer dereference, address: 0000000000000018"
    assert "CPU: 1 PID: 812 Comm: python3 Not tainted 6.1.192 #1" in d
    assert "RIP: 0010:lock_mm_and_find_vma+0x65/0x101" in d
    assert " do_user_addr_fault+0x1a1/0x3b0" in d
    assert d[-1] == "Kernel panic - not syncing: Fatal exception in interrupt"
    assert not any(line.startswith(("RAX:", "Code:", "RSP:", "tests/")) for line in d)


def test_oops_digest_of_a_clean_console_is_empty() -> None:
    assert nested.oops_digest("booted\n@@ignition-nested:x:start@@\nok\n") == ""


def test_oops_digest_is_bounded() -> None:
    flood = "BUG: soft lockup\n" + "".join(f" f{i}+0x1/0x2\n" for i in range(1000))
    assert len(nested.oops_digest(flood).splitlines()) == nested._OOPS_MAX_LINES


def test_error_ends_with_the_digest() -> None:
    e = nested.NestedError("nested host exited: the command never ended", PANIC_CONSOLE)
    assert e.host_panicked
    text = str(e)
    assert text.rstrip().endswith("Fatal exception in interrupt\n---")
    assert text.index("console tail") < text.index("oops, in short")
    assert not nested.NestedError("no QEMU", "").host_panicked


def _fake_runs(monkeypatch: pytest.MonkeyPatch, outcomes: list[object]) -> list[int]:
    """nested.run replaced: each call takes the next outcome (an exception is raised)."""
    calls: list[int] = []

    def fake_run(cmd: list[str], **kwargs: object) -> nested.NestedResult:
        calls.append(1)
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, nested.NestedResult)
        return outcome

    monkeypatch.setattr(nested, "run", fake_run)
    return calls


def test_a_host_panic_runs_the_command_again_in_a_new_host(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = nested.NestedResult(exit_code=3, output="", duration=1.0, boot_time=0.5)
    calls = _fake_runs(monkeypatch, [nested.NestedError("host died", PANIC_CONSOLE), ok])
    assert nested.main(["run", "--retries", "1", "--", "true"]) == 3  # CMD's own status
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert "lock_mm_and_find_vma" in err
    assert "running the command again in a new host (retry 1 of 1)" in err


def test_retries_are_bounded_and_only_for_host_panics(monkeypatch: pytest.MonkeyPatch) -> None:
    panic = nested.NestedError("host died", PANIC_CONSOLE)
    calls = _fake_runs(monkeypatch, [panic, panic, panic])
    assert nested.main(["run", "--retries", "1", "--", "true"]) == nested.EXIT_HARNESS
    assert len(calls) == 2
    calls = _fake_runs(monkeypatch, [nested.NestedError("QEMU not found")])
    assert nested.main(["run", "--retries", "3", "--", "true"]) == nested.EXIT_HARNESS
    assert len(calls) == 1
    calls = _fake_runs(monkeypatch, [nested.NestedTimeout("timed out", PANIC_CONSOLE)])
    assert nested.main(["run", "--retries", "3", "--", "true"]) == nested.EXIT_TIMEOUT
    assert len(calls) == 1
    calls = _fake_runs(monkeypatch, [panic])
    assert nested.main(["run", "--", "true"]) == nested.EXIT_HARNESS  # default: no retry
    assert len(calls) == 1


# ----------------------------------------------------------------------------- QEMU argv


def test_qemu_command_line(tmp_path: Path) -> None:
    ctl = tmp_path / "ctl,with,commas"
    argv = nested.build_qemu_argv(Path("/k/bzImage"), ctl, Path("/work/x"), mem_mb=1024, cpus=1)
    joined = shlex.join(argv)
    assert argv[0] == nested.QEMU
    assert "-accel tcg" in joined
    assert "EPYC,+svm,+npt" in argv
    assert "-no-reboot" in argv
    assert argv[argv.index("-m") + 1] == "1024"
    assert argv[argv.index("-smp") + 1] == "1"
    assert "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap" in argv
    assert f"local,id=ctl,path={str(ctl).replace(',', ',,')},security_model=none" in argv
    assert any(a.startswith("local,id=cwd,path=/work/x,") and "readonly" not in a for a in argv)
    append = argv[argv.index("-append") + 1]
    assert "root=ignroot" in append and "rootfstype=9p" in append and "panic=-1" in append
    # KVM in the host must accept the refined TSC rate (else guests' timers never fire)
    assert "kvm.tsc_tolerance_ppm=10000" in append.split()
    init = str(nested.INIT_SCRIPT)
    assert append.endswith(f" {init} {init}")  # the script gets its own path as $1
    shell = f"-- sh {init}" if Path(nested.BUSYBOX).exists() else f"-- {init}"
    assert shell in append and " init=/" in append


def test_qemu_command_line_without_cwd_share(tmp_path: Path) -> None:
    argv = nested.build_qemu_argv(Path("/k"), tmp_path, None)
    assert not any("id=cwd" in a for a in argv)


# ----------------------------------------------------------------------------- run.sh and env


def test_child_env_keeps_essentials_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNITION_ENGINE", "qemu")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent")
    monkeypatch.setenv("PYTHONHOME", "/nowhere")
    env = nested._child_env({"EXTRA": "1"})
    assert env["IGNITION_ENGINE"] == "qemu"
    assert env["EXTRA"] == "1"
    assert env["IGNITION_NESTED"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "SSH_AUTH_SOCK" not in env and "PYTHONHOME" not in env
    assert "PATH" in env and "HOME" in env


def test_run_script_quotes_everything(tmp_path: Path) -> None:
    cmd = ["printf", "%s|", "a b", "$HOME", "it's", "`x`"]
    script = nested._run_script(cmd, tmp_path, {"PATH": "/usr/bin:/bin", "V": "x y $z"})
    p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "a b|$HOME|it's|`x`|"


def test_run_script_runs_in_cwd_with_only_the_given_env(tmp_path: Path) -> None:
    cmd = ["sh", "-c", 'pwd; echo "$V"; env | wc -l']
    script = nested._run_script(cmd, tmp_path, {"PATH": "/usr/bin:/bin", "V": "x y $z"})
    p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    lines = p.stdout.splitlines()
    assert lines[0] == str(tmp_path)
    assert lines[1] == "x y $z"
    assert int(lines[2]) <= 4  # PATH, V, PWD, SHLVL/_ added by sh itself


def test_run_script_rejects_nul() -> None:
    with pytest.raises(ValueError):
        nested._run_script(["echo", "a\0b"], Path("/"), {})
    with pytest.raises(ValueError):
        nested._run_script(["echo"], Path("/"), {"A=B": "1"})


# ----------------------------------------------------------------------------- console parsing


def _split(chunks: list[bytes], nonce: str = "abc") -> tuple[nested._Splitter, bytes]:
    out: list[bytes] = []
    s = nested._Splitter(nonce, out.append)
    for c in chunks:
        s.feed(c)
    s.flush()
    return s, b"".join(out)


def test_splitter_separates_boot_log_output_and_exit_code() -> None:
    stream = (
        b"[ 0.1] booting\r\n@@ignition-nested:abc:start@@\n"
        b"hello\nno newline at end@@ignition-nested:abc:exit=3@@\nreboot: Restarting"
    )
    s, out = _split([stream])
    assert out == b"hello\nno newline at end"
    assert s.started and s.exit_code == 3
    assert b"booting" in s.tail


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_splitter_handles_any_chunking(size: int) -> None:
    stream = (
        b"log @@ @@ignition-nested:abc:start@@\n"
        b"a@b@@c @@ignition-nested:abd:exit=1@@ x@@ignition-nested:abc:exit=42@@\n"
    )
    s, out = _split([stream[i : i + size] for i in range(0, len(stream), size)])
    assert out == b"a@b@@c @@ignition-nested:abd:exit=1@@ x"
    assert s.exit_code == 42


def test_splitter_without_exit_marker_keeps_output() -> None:
    s, out = _split([b"@@ignition-nested:abc:start@@\npartial @@ignition-nested:abc:ex"])
    assert s.started and s.exit_code is None
    assert out == b"partial @@ignition-nested:abc:ex"


def test_splitter_never_started() -> None:
    s, out = _split([b"Kernel panic - not syncing: VFS: Unable to mount root fs\r\n"])
    assert not s.started and out == b""
    assert b"Kernel panic" in s.tail


def test_splitter_rejects_out_of_range_exit_codes() -> None:
    s, out = _split([b"@@ignition-nested:abc:start@@\nx@@ignition-nested:abc:exit=999@@"])
    assert s.exit_code is None


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"0\n", 0),
        (b"42", 42),
        (b"255\n", 255),
        (b"256", None),
        (b"-1", None),
        (b"x", None),
        (b"9" * 100000, None),
        (b"", None),
    ],
)
def test_rc_file_is_validated(tmp_path: Path, content: bytes, expected: int | None) -> None:
    (tmp_path / "rc").write_bytes(content)
    assert nested._read_rc(tmp_path / "rc") == expected


def test_rc_file_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("3\n")
    (tmp_path / "rc").symlink_to(tmp_path / "target")
    assert nested._read_rc(tmp_path / "rc") is None
    assert nested._read_rc(tmp_path / "missing") is None


def test_reset_cause_tells_a_triple_fault_from_a_requested_reset(tmp_path: Path) -> None:
    log = tmp_path / "reset.log"
    log.write_text("CPU Reset (CPU 0)\nEAX=00000000\n" * 3 + "Triple fault\n")
    assert nested._reset_cause(log) == "the host's CPU triple-faulted; QEMU reset it"
    log.write_text("CPU Reset (CPU 0)\nEAX=00000000\n")
    assert nested._reset_cause(log) == "the host reset itself without a kernel panic"
    assert (
        nested._reset_cause(tmp_path / "absent") == "the host reset itself without a kernel panic"
    )


def test_a_host_reset_runs_the_command_again_and_a_boot_failure_does_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = nested.NestedResult(exit_code=0, output="", duration=1.0, boot_time=0.5)
    reset = nested.NestedError("host exited (QEMU status 0)", "tests/x.py::t ", host_reset=True)
    assert reset.host_died and not reset.host_panicked
    calls = _fake_runs(monkeypatch, [reset, ok])
    assert nested.main(["run", "--retries", "1", "--", "true"]) == 0
    assert len(calls) == 2
    assert "the host's machine reset (not the command)" in capsys.readouterr().err
    calls = _fake_runs(monkeypatch, [nested.NestedError("host exited (QEMU status 0)", "boot")])
    assert nested.main(["run", "--retries", "1", "--", "true"]) == nested.EXIT_HARNESS
    assert len(calls) == 1
