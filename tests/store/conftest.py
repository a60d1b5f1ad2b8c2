"""The object-store tests' server and store: moto's S3 server for a test module, and a store under a
prefix of its own for each test (tests/s3server.py)."""
import pytest

from tests.s3server import BUCKET, moto_s3


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as env:
        yield env


@pytest.fixture
def store(s3, request):
    from avr_core.store import Store

    return Store(f"s3://{BUCKET}/{request.node.name}", lease_s=1.0)
