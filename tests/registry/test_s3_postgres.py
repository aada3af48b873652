"""PostgreSQL registry + S3 blobs (moto's server on loopback, spoken to by s3fs over HTTP), end to end through
the CLI: ingest, catalog (listing and --sql), bundle. Runs where SPECTR_TEST_POSTGRES_URL is set (.ci/run)."""
from __future__ import annotations

import json
import os
import re
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs", reason="the s3 extra (pip install 'spectr[s3]') is not installed")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def pg_database():
    """A fresh database on the test server, dropped afterwards (other tests migrate the default one up and down)."""
    url = os.environ.get("SPECTR_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("SPECTR_TEST_POSTGRES_URL is not set")
    name = f"spectr_s3_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_ingest_catalog_bundle_on_postgres_and_s3(prefect_harness, s3_endpoint, pg_database, spectr_home,
                                                  monkeypatch, make_adapter, tiny_base_dir, tmp_path):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # botocore (and so s3fs) read it
    bucket = f"spectr-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    monkeypatch.setenv("SPECTR_REGISTRY_URL", pg_database)
    monkeypatch.setenv("SPECTR_BLOB_URL", f"s3://{bucket}/blobs")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # no client from another endpoint

    from spectr.cli import app

    runner = CliRunner()
    a, b = make_adapter("s3-math", seed=31), make_adapter("s3-code", seed=32)
    r = runner.invoke(app, ["ingest", str(a), str(b), "--base-model", str(tiny_base_dir)])
    assert r.exit_code == 0, r.output
    assert "accepted s3-math v1" in r.output and "accepted s3-code v1" in r.output

    listing = json.loads(runner.invoke(app, ["catalog", "--json"]).output)
    assert [(e["name"], e["version"]) for e in listing] == [("s3-code", 1), ("s3-math", 1)]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    # Content-addressed objects only (spectra and the adapters' kept files): no temp objects left behind.
    assert all(re.fullmatch(r"blobs/sha256/[0-9a-f]{2}/[0-9a-f]{62}\.safetensors", k) for k in keys), keys
    for e in listing:
        assert f"blobs/sha256/{e['blob_sha256'][:2]}/{e['blob_sha256'][2:]}.safetensors" in keys

    sql = runner.invoke(app, ["catalog", "--json", "--sql",
                              "select e.name, s.size_bytes > 0 as stored from experts e join spectra s "
                              "on s.blob_sha256 = e.blob_sha256 order by e.name"])
    assert sql.exit_code == 0, sql.output
    assert json.loads(sql.output) == [{"name": "s3-code", "stored": True}, {"name": "s3-math", "stored": True}]

    out = tmp_path / "bundle"
    r = runner.invoke(app, ["bundle", "create", "pg-s3", "--all", "-o", str(out)])
    assert r.exit_code == 0, r.output
    from spectr.runtime.bundle import read_bundle

    bundle = read_bundle(out)
    assert sorted(bundle.expert_names) == ["s3-code", "s3-math"]

    exported = tmp_path / "exported"
    r = runner.invoke(app, ["export", "s3-math", "-o", str(exported)])
    assert r.exit_code == 0, r.output
    for f in ("adapter_config.json", "adapter_model.safetensors"):  # byte-identical, read back from S3
        assert (exported / f).read_bytes() == (a / f).read_bytes()

    # The catalog's snapshot follows PostgreSQL: reused while nothing is written, rebuilt after a write.
    from spectr.registry.catalog import snapshot_dir

    count = ["catalog", "--json", "--sql", "select (select count(*) from experts) e, "
             "(select count(*) from ingestion_runs) r"]
    # The stamp is PostgreSQL's snapshot, which any write anywhere in the cluster moves (another test's
    # leftover writer, a background job): a read pair counts as reused if one of three shows the same file.
    reused = []
    for _ in range(3):
        assert json.loads(runner.invoke(app, count).output) == [{"e": 2, "r": 1}]
        snap = list(snapshot_dir().glob("*.duckdb"))
        assert len(snap) == 1
        inode = snap[0].stat().st_ino
        assert json.loads(runner.invoke(app, count).output) == [{"e": 2, "r": 1}]
        reused.append([p.stat().st_ino for p in snapshot_dir().glob("*.duckdb")] == [inode])
        if reused[-1]:
            break
    assert any(reused), "the catalog snapshot was rebuilt on every read with nothing written"
    r = runner.invoke(app, ["ingest", str(make_adapter("s3-more", seed=33)), "--base-model", str(tiny_base_dir)])
    assert r.exit_code == 0, r.output
    assert json.loads(runner.invoke(app, count).output) == [{"e": 3, "r": 2}]
