"""An s3:// store that cannot be reached fails before anything starts (issue 34, item 7): one line
naming the store and the cause, exit 2, no traceback, from `avr run` and `avr resume --store`,
within the probe's 10 s, instead of a minute of SDK retries inside the first stage."""
import socket
import threading

import pytest

from avr_cli.main import main
from avr_core.store.probe import probe
from tests.s3server import moto_s3


@pytest.fixture
def silent_endpoint():
    """A TCP endpoint that accepts connections and never answers: a hung server or a black hole."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    held, stop = [], threading.Event()

    def accept():
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(s.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    s.close()


def refused_endpoint() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                               # nothing listens there: connection refused
    return f"http://127.0.0.1:{port}"


def _one_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err, (code, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avr: error: "), err
    return lines[0]


def test_a_store_that_answers_passes_and_leaves_nothing():
    with moto_s3():
        import boto3
        assert probe("s3://avr-test/probe-test") is None
        # moto keeps one state per process: other tests' objects may be in the bucket, not under this prefix
        left = boto3.client("s3").list_objects_v2(Bucket="avr-test", Prefix="probe-test/")
        assert left.get("KeyCount", 0) == 0, left


def test_an_unreachable_endpoint_is_one_line_before_anything_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with moto_s3():                           # credentials in the environment, the endpoint then moved
        monkeypatch.setenv("AWS_ENDPOINT_URL", refused_endpoint())
        line = _one_line(capsys, ["run", "--preset", "tiny", "store.root=s3://avr-test/avr"])
    assert "key 'store.root': store s3://avr-test/avr: " in line and "connect" in line.lower(), line
    assert not list(tmp_path.iterdir())


def test_a_missing_bucket_and_a_silent_endpoint_are_named(capsys, silent_endpoint, monkeypatch):
    with moto_s3():
        line = _one_line(capsys, ["run", "--preset", "tiny", "store.root=s3://no-such-bucket/avr"])
        assert "store s3://no-such-bucket/avr: " in line and "bucket" in line.lower(), line
        monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
        assert probe("s3://avr-test/avr", timeout_s=2) == \
            "store s3://avr-test/avr: no answer in 2 s (is the endpoint up and reachable?)"


def test_resume_against_an_unreachable_store_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AVR_RUN_TOKEN", "0:probe-test")          # as the supervisor's worker: no subprocess
    with moto_s3():
        monkeypatch.setenv("AWS_ENDPOINT_URL", refused_endpoint())
        line = _one_line(capsys, ["resume", "20261207-000000-abcdef", "--store", "s3://avr-test/avr"])
    assert line.startswith("avr: error: store s3://avr-test/avr: "), line
