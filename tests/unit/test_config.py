"""Settings resolution (no VM): precedence, parsing, and helpful usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_ignition import config as cfg


@pytest.fixture(autouse=True)
def _no_outer_ignition_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pytester runs below inherit the environment; settings from the caller's shell
    # (IGNITION_MEMORY=..., say) must not leak into them.
    for opt in cfg.OPTIONS:
        monkeypatch.delenv(opt.env, raising=False)


def _resolve(cli=None, ini=None, env=None) -> cfg.Settings:
    cli = cli or {}
    ini = ini or {}
    return cfg.resolve(lambda d: cli.get(d), lambda k: ini.get(k, ""), env or {})


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512", 512),
        ("512M", 512),
        ("512m", 512),
        ("512MiB", 512),
        ("1G", 1024),
        ("1g", 1024),
        ("1.5G", 1536),
        ("2GiB", 2048),
        ("262144K", 256),
        (" 64M ", 64),
    ],
)
def test_parse_memory_accepts(text: str, mib: int) -> None:
    assert cfg.parse_memory(text) == mib


@pytest.mark.parametrize("text", ["12X", "", "M", "-1G", "1.3M", "abc", "1 G B", "16M", "0"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        cfg.parse_memory(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64M", 64 << 20),
        ("64m", 64 << 20),
        ("64MiB", 64 << 20),
        ("64MB", 64 << 20),
        ("1G", 1 << 30),
        ("1.5M", 3 << 19),
        ("512K", 512 << 10),
        ("4096", 4096),  # a plain number is bytes
        ("100b", 100),
        ("0", 0),  # no limit
        (" 2T ", 2 << 40),
        (7, 7),
    ],
)
def test_parse_size_accepts(text: str, size: int) -> None:
    assert cfg.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1", "-1M", "1.3", "0.5", "12X", "1 G B", "lots", True])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        cfg.parse_size(text)


def test_max_output_default_env_ini_cli() -> None:
    from pytest_ignition import vm

    s = _resolve()
    assert s.max_output == 64 << 20 == cfg.DEFAULT_MAX_OUTPUT == vm.DEFAULT_MAX_OUTPUT
    assert s.sources["max_output"] == "default"
    s = _resolve(ini={"ignition_max_output": "1G"})
    assert (s.max_output, s.sources["max_output"]) == (1 << 30, "ini key ignition_max_output")
    s = _resolve(ini={"ignition_max_output": "1G"}, env={"IGNITION_MAX_OUTPUT": "0"})
    assert s.max_output == 0
    assert s.sources["max_output"] == "environment variable IGNITION_MAX_OUTPUT"
    s = _resolve(cli={"ignition_max_output": "2M"}, env={"IGNITION_MAX_OUTPUT": "0"})
    assert (s.max_output, s.sources["max_output"]) == (2 << 20, "--ignition-max-output")


def test_defaults() -> None:
    s = _resolve()
    assert (s.kernel, s.initrd, s.rootfs) == (None, None, None)
    assert s.memory_mib == 512 and s.cpus == 1
    assert s.engine == "auto" and s.reset == "restore" and s.timeout == 120.0
    assert s.kernel_args == "" and s.require is False
    assert s.sources["memory"] == "default"


def test_precedence_cli_over_env_over_ini() -> None:
    ini = {"ignition_memory": "256M", "ignition_cpus": "2", "ignition_engine": "ignition"}
    env = {"IGNITION_MEMORY": "1G", "IGNITION_CPUS": "3"}
    cli = {"ignition_memory": "2G"}
    s = _resolve(cli, ini, env)
    assert s.memory_mib == 2048  # CLI beats env and ini
    assert s.cpus == 3  # env beats ini
    assert s.engine == "ignition"  # ini beats default
    assert s.sources["memory"] == "--ignition-memory"
    assert s.sources["cpus"] == "environment variable IGNITION_CPUS"
    assert s.sources["engine"] == "ini key ignition_engine"


def test_empty_env_var_does_not_override_ini() -> None:
    s = _resolve(ini={"ignition_cpus": "2"}, env={"IGNITION_CPUS": ""})
    assert s.cpus == 2


def test_require_from_env() -> None:
    assert _resolve(env={"IGNITION_REQUIRE": "1"}).require is True
    assert _resolve(env={"IGNITION_REQUIRE": "0"}).require is False


def test_paths_are_checked(tmp_path: Path) -> None:
    k = tmp_path / "bzImage"
    k.write_bytes(b"k")
    s = _resolve(cli={"ignition_kernel": str(k)})
    assert s.kernel == k.resolve()
    with pytest.raises(pytest.UsageError, match="does not exist"):
        _resolve(cli={"ignition_kernel": str(tmp_path / "nope")})
    with pytest.raises(pytest.UsageError, match="not a regular file"):
        _resolve(cli={"ignition_kernel": str(tmp_path)})


def test_initrd_without_kernel_is_an_error(tmp_path: Path) -> None:
    i = tmp_path / "initrd"
    i.write_bytes(b"i")
    with pytest.raises(pytest.UsageError, match="initrd"):
        _resolve(env={"IGNITION_INITRD": str(i)})


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("ignition_memory", "12X", "not a memory size"),
        ("ignition_cpus", "0", "outside"),
        ("ignition_cpus", "two", "not a whole number"),
        ("ignition_engine", "vbox", "not one of auto, ignition, qemu"),
        ("ignition_reset", "reboot", "not one of restore, rollback"),
        ("ignition_timeout", "-5", "positive"),
        ("ignition_timeout", "soon", "not a number"),
        ("ignition_max_output", "-1", "not a size"),
        ("ignition_max_output", "1.3", "not a whole number of bytes"),
    ],
)
def test_bad_values_name_source_problem_and_fix(key: str, value: str, expect: str) -> None:
    with pytest.raises(pytest.UsageError) as ei:
        _resolve(cli={key: value})
    msg = str(ei.value)
    assert expect in msg
    assert "--ignition-" in msg  # where it came from
    assert repr(value) in msg
    assert "write" in msg or "give" in msg  # what to do instead


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(pytest.UsageError, match="IGNITION_MEMORY"):
        _resolve(env={"IGNITION_MEMORY": "lots"})


def test_overrides_and_apply(tmp_path: Path) -> None:
    base = _resolve(cli={"ignition_kernel_args": "quiet"})
    o = cfg.parse_overrides({"memory": "1G", "cpus": 2, "kernel_args": "foo=1"}, where="t")
    s = cfg.apply_overrides(base, o)
    assert s.memory_mib == 1024 and s.cpus == 2
    assert s.kernel_args == "quiet foo=1"  # appended to the session's
    assert cfg.parse_overrides({"memory": 256}, where="t").as_dict() == {"memory": 256}
    # equal keywords give equal (hashable) overrides, so they share a snapshot
    assert cfg.parse_overrides({"cpus": 2, "memory": "1G"}, where="t") == cfg.parse_overrides(
        {"memory": "1024M", "cpus": "2"}, where="t"
    )


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"memroy": "1G"}, "unknown setting 'memroy'"),
        ({"memory": "12X"}, "not a memory size"),
        ({"memory": True}, "not a memory size"),
        ({"cpus": 0}, "outside"),
        ({"reset": "nope"}, "not one of"),
        ({"kernel": "/nonexistent/bzImage"}, "does not exist"),
    ],
)
def test_bad_overrides(kwargs: dict, expect: str) -> None:
    with pytest.raises(pytest.UsageError, match="where-it-was") as ei:
        cfg.parse_overrides(kwargs, where="where-it-was")
    assert expect in str(ei.value)


# ---------------------------------------------------------------- through pytest itself


def test_cli_bad_memory_is_a_usage_error_not_a_traceback(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--ignition-memory=12X")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--ignition-memory = '12X'" in err
    assert "512M, 1G" in err
    assert "Traceback" not in err + result.stdout.str()


def test_nonexistent_kernel_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--ignition-kernel=/nonexistent/bzImage")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "'/nonexistent/bzImage' does not exist" in err
    assert "Traceback" not in err


def test_ini_env_cli_precedence_in_pytest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nignition_memory = 256M\nignition_cpus = 2\nignition_timeout = 30\n")
    pytester.makepyfile(
        """
        from pytest_ignition.fixtures import get_session

        def test_settings(request):
            s = get_session(request.config).settings
            print("SETTINGS", s.memory_mib, s.cpus, s.timeout)
        """
    )
    monkeypatch.setenv("IGNITION_CPUS", "3")
    monkeypatch.setenv("IGNITION_TIMEOUT", "40")
    result = pytester.runpytest_subprocess("-s", "--ignition-timeout=50")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*SETTINGS 256 3 50.0*"])


def test_max_output_through_pytest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nignition_max_output = 1G\n")
    pytester.makepyfile(
        """
        from pytest_ignition.fixtures import get_session

        def test_settings(request):
            session = get_session(request.config)
            s = session.settings
            print("MAXOUT", s.max_output, s.sources["max_output"], session.vm_limits())
        """
    )
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*MAXOUT 1073741824 ini key ignition_max_output*"])
    monkeypatch.setenv("IGNITION_MAX_OUTPUT", "0")
    result = pytester.runpytest_subprocess("-s")
    result.stdout.fnmatch_lines(["*MAXOUT 0 environment variable IGNITION_MAX_OUTPUT*"])
    result = pytester.runpytest_subprocess("-s", "--ignition-max-output=3K")
    result.stdout.fnmatch_lines(
        [
            "*MAXOUT 3072 --ignition-max-output {'max_output': 3072, "
            "'max_output_source': '--ignition-max-output', 'command_timeout': 600.0, "
            "'command_timeout_source': 'default', 'max_transfer': 268435456, *"
        ]
    )
    result = pytester.runpytest_subprocess("--ignition-max-output=lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--ignition-max-output = 'lots'" in err and "0 for no limit" in err
    assert "Traceback" not in err


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nignition_engine = vmware\n")
    # reported once a test uses a VM (tests/unit/test_plugin_cost.py: not before)
    pytester.makepyfile("def test_x(ignition_vm):\n    pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini key ignition_engine = 'vmware'" in result.stderr.str()


def test_bad_marker_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.ignition(memroy="1G")
        def test_x(ignition_vm):
            pass
        """
    )
    result = pytester.runpytest_subprocess("--strict-markers")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown setting 'memroy'" in result.stderr.str()
    assert "test_bad_marker_is_a_usage_error.py::test_x" in result.stderr.str()


def test_marker_and_hook_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.ignition(memory=*"])
    pytester.makeconftest("def pytest_ignition_prepare(vm):\n    pass\n")
    pytester.makepyfile("def test_x():\n    pass\n")
    # an unknown hook name in a conftest would be a PluginValidationError
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
