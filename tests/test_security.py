"""The node's security review (issue 15): what a manifest, a ticket or a client can make a node do.

Real node processes on loopback; the hostile client is a real Flight client opening real streams.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import threading
import time
import warnings
from pathlib import Path

import pyarrow.flight as flight
import pytest

from nearstore.bench.faults import copy_store
from nearstore.core.errors import StoreError, StoreFormatError
from nearstore.node import LocalCluster
from nearstore.node.client import NodeClient
from nearstore.node.server import TokenMiddlewareFactory
from nearstore.store import Manifest, Store
from nearstore.store.manifest import MANIFEST_NAME, node_dir_name

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("name", ["../outside", "..", "a/b", "/etc/passwd", ".hidden", "a\\\\b"])
def test_a_manifest_cannot_name_a_shard_outside_its_node_directory(store, tmp_path, name):
    copy = copy_store(store, tmp_path / "s")
    doc = json.loads((copy / MANIFEST_NAME).read_text())
    doc["shards"][0]["name"] = name
    doc.pop("checksum")  # a hand-made manifest need not be sealed: the name check must hold on its own
    for where in (copy, copy / node_dir_name(0)):
        (where / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError, match="name"):
        Manifest.load(copy)
    with pytest.raises(StoreFormatError, match="name"):
        Store.node(copy / node_dir_name(0))


def test_a_symlink_out_of_the_node_directory_is_refused_and_never_served(store, tmp_path):
    copy = copy_store(store, tmp_path / "s")
    man = Manifest.load(copy)
    shard = man.shards[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for n in shard.nodes:  # every copy of shard 0 becomes a link to a (perfectly valid) file outside
        for suffix in (".tar", ".idx.arrow"):
            f = copy / node_dir_name(n) / f"{shard.name}{suffix}"
            target = outside / f"{n}{suffix}"
            shutil.move(f, target)
            f.symlink_to(target)
    st = Store.node(copy / node_dir_name(shard.nodes[0]))
    with pytest.raises(StoreError, match="outside its node directory"):
        st.read(shard.first)
    st.close()
    with LocalCluster(copy, nodes=1, worker_kind="thread") as c:  # no ops run: no worker processes needed
        reader = flight.FlightClient(c.spec.nodes[0].uri)
        ticket = json.dumps({"dataset": man.name, "samples": [shard.first, shard.first + 1]}).encode()
        table = reader.do_get(flight.Ticket(ticket)).read_all()
        reader.close()
        assert table.column("error_kind").to_pylist() == ["read", "read"]  # a per-sample refusal, no bytes
        assert "outside its node directory" in table.column("error")[0].as_py()
        assert sum(len(v.as_py()) for v in table.column("data")) == 0
        assert c.procs[0].poll() is None


def test_token_check_is_constant_time_and_exact():
    mw = TokenMiddlewareFactory("s3cret")
    assert mw.start_call(None, {"authorization": ["Bearer s3cret"]}) is None
    assert mw.start_call(None, {"authorization": ["Bearer nope", "Bearer s3cret"]}) is None
    for bad in (["Bearer s3cre"], ["Bearer s3crett"], ["bearer s3cret"], [], ["s3cret"]):
        with pytest.raises(flight.FlightUnauthenticatedError, match="missing or wrong token"):
            mw.start_call(None, {"authorization": bad})
    import inspect

    assert "hmac.compare_digest" in inspect.getsource(TokenMiddlewareFactory.start_call)


def test_a_burst_of_streams_from_one_client_does_not_starve_another(store, cluster):
    """One client opens 120 streams at once and never reads them; another client is still served."""
    man = Manifest.load(store)
    big = json.dumps({"dataset": man.name, "samples": list(range(man.num_samples)),
                      "ops": ["decode_jpeg"], "batch_size": 4}).encode()
    c = cluster  # node 0 of the shared cluster
    uri = c.spec.nodes[0].uri
    hostile = flight.FlightClient(uri)
    opened, refused, stop = [], [], threading.Event()
    lock = threading.Lock()

    def greedy() -> None:
        try:
            r = hostile.do_get(flight.Ticket(big), flight.FlightCallOptions(timeout=60))
            with lock:
                opened.append(r)
            stop.wait(60)  # hold the stream open, unread
        except flight.FlightError as exc:
            with lock:
                refused.append(str(exc))

    threads = [threading.Thread(target=greedy, daemon=True) for _ in range(120)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(opened) + len(refused) < 120 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        good = NodeClient(uri, node=0, timeout=60)
        t0 = time.monotonic()
        ticket = json.dumps({"dataset": man.name, "samples": list(range(16)), "ops": ["decode_jpeg"]}).encode()
        rows = sum(ch.data.num_rows for ch in good._client.do_get(flight.Ticket(ticket), good._opts))
        served_in = time.monotonic() - t0
        streams = good.stats()["streams"]
        good.close()
    finally:
        stop.set()
        for r in opened:
            r.cancel()
        for t in threads:
            t.join(30)
        hostile.close()
    assert rows == 16 and served_in < 30
    assert len(opened) == 16 and len(refused) == 104  # the per-client bound
    assert all("node busy" in m and "limit 16" in m for m in refused)
    assert streams["refused"] >= 104 and streams["open_streams"] <= 17
    assert c.procs[0].poll() is None


def test_tls_refuses_protocol_versions_below_1_2(store, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    with LocalCluster(store, nodes=1, tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem"),
                      worker_kind="thread") as c:  # handshakes only: no worker processes needed
        port = int(c.spec.nodes[0].uri.rsplit(":", 1)[1])

        def handshake(lo: ssl.TLSVersion, hi: ssl.TLSVersion) -> str:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ca.configure_trust(ctx)
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer the old versions at all
            ctx.minimum_version, ctx.maximum_version = lo, hi
            ctx.set_alpn_protocols(["h2"])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                    return tls.version()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # naming TLS 1.0/1.1 is the point here
            for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
                with pytest.raises(ssl.SSLError):
                    handshake(old, old)
        assert handshake(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        assert handshake(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        assert c.procs[0].poll() is None


def test_contained_refuses_a_path_that_climbs_out(tmp_path):
    from nearstore.store.store import contained

    (tmp_path / "node-000").mkdir()
    contained(tmp_path / "node-000", tmp_path / "node-000" / "a.tar")
    with pytest.raises(StoreError, match="outside"):
        contained(tmp_path / "node-000", tmp_path / "node-000" / ".." / "a.tar")
    assert Path(tmp_path / "node-000").exists()
