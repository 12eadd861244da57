"""The prepare hook in conftest.py installed a script before the snapshot."""


def test_prepared_script_is_installed(ignition_vm):
    assert ignition_vm.check_output(["greet", "pytest"]).startswith("hello, pytest, from ")


def test_prepared_config_file(ignition_vm):
    assert b"mode = demo" in ignition_vm.read_file("/srv/app/config.ini")
