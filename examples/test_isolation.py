"""Each test gets its own guest: nothing one test does is seen by the next."""


def test_make_a_mess(ignition_vm):
    ignition_vm.run("rm -rf /srv/app && echo scribble > /root/notes").check()
    ignition_vm.run("sleep 600 >/dev/null 2>&1 &").check()
    assert ignition_vm.run(["test", "-d", "/srv/app"]).failed


def test_mess_is_gone(ignition_vm):
    assert ignition_vm.read_file("/srv/app/config.ini").startswith(b"[app]")
    assert ignition_vm.run(["test", "-e", "/root/notes"]).exit_code == 1
    assert "sleep 600" not in ignition_vm.check_output("ps -o args")


def test_separate_streams_and_exit_codes(ignition_vm):
    code, out, err = ignition_vm.run("echo fine; echo oops >&2; exit 4")
    assert (code, out, err) == (4, "fine\n", "oops\n")


def test_argv_is_passed_verbatim(ignition_vm):
    assert ignition_vm.check_output(["echo", "$HOME; rm -rf /"]) == "$HOME; rm -rf /\n"
