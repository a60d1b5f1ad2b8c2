"""A real S3-protocol server on 127.0.0.1 for the object-store tests: moto's standalone server
(`moto.server.ThreadedMotoServer`), a bucket created with boto3, and the environment a process
needs to reach it (`AWS_ENDPOINT_URL` and dummy credentials; see avr_core/store/objects.py
`storage_options`). moto is a test double of S3's protocol, not storage: docs/RELIABILITY.md
"Object stores" lists what we rely on that AWS S3 and MinIO must also do."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

BUCKET = "avr-test"


@contextlib.contextmanager
def moto_s3(bucket: str = BUCKET) -> Iterator[dict]:
    """Start the server, create `bucket`, set the environment; yields the env vars it set."""
    import boto3
    from moto.server import ThreadedMotoServer

    from avr_core.backends.net import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
    port = free_port("127.0.0.1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
