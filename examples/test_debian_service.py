"""A real userland: a small Python HTTP service inside a Debian guest, checked from the guest.

The marker picks a Debian bookworm image with python3 (built with mmdebstrap the first time,
cached afterwards). Every test still gets a fresh machine: the service one test starts is not
running in the next.
"""

import pytest

pytestmark = pytest.mark.ignition(image="debian:bookworm", packages="python3", memory="512M")

SERVICE = """
import http.server, json

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "service": "demo"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Handler).serve_forever()
"""

CLIENT = """
import json, time, urllib.request
for _ in range(100):
    try:
        with urllib.request.urlopen("http://127.0.0.1:8080/hello", timeout=2) as r:
            print(json.load(r)["path"])
            break
    except OSError:
        time.sleep(0.1)
else:
    raise SystemExit("the service never answered")
"""


def test_http_service_answers(ignition_vm):
    ignition_vm.write_file("/srv/service.py", SERVICE)
    # In the background, its output in a file: the command returns at once.
    ignition_vm.run("python3 /srv/service.py > /var/log/service.log 2>&1 &").check()
    out = ignition_vm.run(["python3", "-c", CLIENT], timeout=60).check().stdout
    assert out == "/hello\n"


PROBE = """
import socket
try:
    socket.create_connection(("127.0.0.1", 8080), timeout=2)
except ConnectionRefusedError:
    print("refused")
"""


def test_the_service_is_not_running_in_the_next_test(ignition_vm):
    assert ignition_vm.run(["python3", "-c", PROBE]).check().stdout == "refused\n"
    assert "debian" in ignition_vm.read_file("/etc/os-release").decode().lower()
