"""Nothing is left billing on S3 (issue 34 item 4): a killed model upload's unfinished multipart
upload is aborted by the sweep that removes its attempt's files, and `verify` lists it until then;
files a stale holder writes after the commit's sweep are listed by `verify` and swept by the next
process that locks the artifact. Against moto's S3 server (tests/s3server.py)."""
from __future__ import annotations

import pytest


def _killed_upload(store, path: str) -> str:
    """What a model upload killed after its first part leaves: an unfinished multipart upload (the
    calls s3fs's `put_file` makes for a large file, without the completing one)."""
    bucket, key, _ = store.fs.split_path(path)
    mpu = store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    store.fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=1,
                     Body=b"w" * (5 * 2**20))
    return mpu["UploadId"]


def test_a_killed_multipart_upload_is_listed_by_verify_and_aborted_by_the_sweep(store):
    from avr_core.catalog import verify
    from avr_core.store.objects import pending_uploads

    killed = store.writer("rsft", "m", {}, [], "v1")
    _killed_upload(store, f"{killed.base}/model/model.safetensors")
    assert store.fs.find(killed.base) == []                  # no object: a listing of files shows nothing
    problems = verify(store)
    assert len(problems) == 1 and "rsft/m/attempts/" in problems[0] and \
        "an unfinished multipart upload" in problems[0], problems
    taker = store.writer("rsft", "m", {}, [], "v1")        # the process that took over
    taker.write_file("model/model.safetensors", b"weights")
    ref = taker.finalize()                                  # its commit sweeps the killed attempt
    assert pending_uploads(store.fs, store.path()) == []
    assert verify(store) == [] and store.read_file(ref, "model/model.safetensors") == b"weights"


def test_a_losers_own_unfinished_upload_is_aborted_with_its_files(store):
    from avr_core.store import LeaseLost
    from avr_core.store.objects import pending_uploads

    winner, loser = store.writer("rsft", "w", {}, [], "v1"), store.writer("rsft", "w", {}, [], "v1")
    winner.finalize()
    _killed_upload(store, f"{loser.base}/model/shard-2.safetensors")   # e.g. an upload thread of the loser's
    loser.write_file("model/config.json", b"{}")
    with pytest.raises(LeaseLost):
        loser.finalize()
    assert pending_uploads(store.fs, store.path()) == []


def test_late_garbage_is_listed_by_verify_and_swept_by_the_next_lock(store):
    from avr_core.catalog import verify

    w = store.writer("respond", "r", {}, [], "v1")
    w.commit_shard(0, {"records": [{"id": "a"}]}, {})
    ref = w.finalize()
    # a stale holder's write landing after the commit's sweep (its lease check passed before it froze)
    store.fs.pipe_file(store.path(ref, "attempts", "20260101T000000-stale000", "data", "records-00003.jsonl"), b"{}\n")
    problems = verify(store)
    assert problems == ["respond/r: attempts/20260101T000000-stale000: 1 file(s) its manifest does not name "
                        "(an attempt's leftovers, e.g. a stale holder's late writes): garbage, swept by the next "
                        "process that locks this artifact"]
    assert verify(store, ref) == []                         # the artifact itself is intact: stages may use it
    with store.lock(ref):                                   # the next process to lock it (a cache hit)
        assert store.exists(ref)
    assert verify(store) == []
    assert [r["id"] for r in store.read_records(ref)] == ["a"]
