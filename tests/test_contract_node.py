"""The stage contract on real nodes: op modules from a user file, capabilities, refusals, per-sample splits."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest

from nearstore import Loader
from nearstore.node.client import NodeClient, NodeRequestError
from nearstore.node.cluster import ClusterSpec
from nearstore.node.protocol import Ticket, decode_rows
from nearstore.ops import Pipeline
from nearstore.ops.base import unregister
from nearstore.ops.plugins import load_op_modules

pytestmark = pytest.mark.timeout(240)

# the example of docs/architecture.md, run as it is shipped (the doc shows this file verbatim)
USER_OP_FILE = Path(__file__).resolve().parents[1] / "examples" / "user_op.py"

HOST_ONLY = '''
from nearstore.ops.base import Op, register


@register
class HostOnly(Op):
    name = "test_host_only"
    inputs = ("image",)

    def declare(self, spec):
        return spec.costless()

    def __call__(self, x, rng):
        return x
'''

BROKEN = "import numpy\nraise ImportError('no module named fancy_codec (on purpose)')\n"

OPS = ["decode_jpeg", {"op": "random_resized_crop", "size": 48}, {"op": "posterize", "levels": 8}, "to_uint8_chw"]


@pytest.fixture(scope="module")
def served(store, tmp_path_factory):
    """`nearstore up` with the example user op file (examples/user_op.py) and a broken one; the test process
    loads the user ops too."""
    import shutil

    d = tmp_path_factory.mktemp("userops")
    (d / "host_only_ops.py").write_text(textwrap.dedent(HOST_ONLY))
    (d / "broken_ops.py").write_text(BROKEN)
    copy = d / "s"
    shutil.copytree(store, copy)
    load_op_modules([str(USER_OP_FILE), str(d / "host_only_ops.py")], entry_points=False)
    run = lambda *a: subprocess.run([sys.executable, "-m", "nearstore.cli.main", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    r = run("up", str(copy), "--workers-per-node", "1", "--link-mbps", "100", "--ops-module", str(USER_OP_FILE),
            "--ops-module", str(d / "broken_ops.py"))
    assert r.returncode == 0, r.stderr
    spec = ClusterSpec.load(copy)
    try:
        yield spec, copy
    finally:
        workers = [p for ep in spec.nodes for p in _health(ep)["worker_pids"]]
        r = run("down", str(copy))
        unregister("posterize")
        unregister("test_host_only")
        assert r.returncode == 0, r.stderr
        # `down` leaves no process (nodes and their worker processes) and no cluster file
        for pid in [ep.pid for ep in spec.nodes] + workers:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert not (copy / "cluster.json").exists()


def _health(ep) -> dict:  # noqa: ANN001
    c = NodeClient(ep.uri, node=ep.node)
    try:
        return c.health()
    finally:
        c.close()


def test_up_records_the_link_cap_and_refuses_a_second_cluster(served):
    """The CLI's `up` (this module's cluster) as a user runs it; `down` is checked when the module ends."""
    spec, copy = served
    assert len(spec.nodes) == 2 and spec.link_mbps == 100
    assert all(_health(ep)["worker_kind"] == "process" for ep in spec.nodes)
    r = subprocess.run([sys.executable, "-m", "nearstore.cli.main", "up", str(copy)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "run `nearstore down" in " ".join(r.stderr.split())


def _digest(loader) -> str:
    h = hashlib.sha256()
    for b in loader:
        h.update(np.ascontiguousarray(b.data).tobytes())
        h.update(b.labels.tobytes())
    return h.hexdigest()


def test_the_architecture_doc_shows_the_example_op_file_verbatim():
    doc = (USER_OP_FILE.parents[1] / "docs" / "architecture.md").read_text()
    assert "```python\n" + USER_OP_FILE.read_text() + "```" in doc


def test_capabilities_list_user_ops_engines_and_the_import_error(served):
    spec, _ = served
    for ep in spec.nodes:
        c = NodeClient(ep.uri, node=ep.node)
        caps = c.capabilities()
        c.close()
        assert caps["ops"]["posterize"]["version"] == "1.0" and "user_op.py" in caps["ops"]["posterize"]["origin"]
        assert caps["ops"]["decode_jpeg"]["origin"] == "builtin" and "flip" in caps["ops"]
        (src, err), = caps["import_errors"].items()
        assert "broken_ops.py" in src and "fancy_codec (on purpose)" in err
        assert "pytorch" in caps["engines"] and caps["engines"]["pytorch"] and caps["cores"] >= 1 and caps["memory_bytes"] > 0


def test_user_op_runs_on_the_nodes_bit_identical_to_the_host(served, store):
    spec, _ = served
    with Loader(store, pipeline=OPS, batch_size=8, seed=4) as local:
        want = _digest(local)
    with Loader(cluster=spec, pipeline=OPS, split="node", batch_size=8, seed=4) as remote:
        assert _digest(remote) == want


def test_a_pipeline_needing_an_op_a_node_lacks_is_refused_before_any_data_moves(served):
    spec, _ = served
    clients = [NodeClient(ep.uri, node=ep.node) for ep in spec.nodes]
    before = [c.stats()["requests"] for c in clients]
    ops = ["decode_jpeg", "test_host_only", "to_uint8_chw"]
    with pytest.raises(NodeRequestError) as info:
        Loader(cluster=spec, pipeline=ops, split="node", batch_size=8)
    msg = str(info.value)
    assert "node 0" in msg and "node 1" in msg and "no op 'test_host_only'" in msg
    assert "broken_ops.py" in msg and "fancy_codec (on purpose)" in msg and "--ops-module" in msg
    assert [c.stats()["requests"] for c in clients] == before  # nothing was asked for
    with Loader(cluster=spec, pipeline=ops, split=1, batch_size=8) as ld:  # before that op: fine
        assert sum(len(b) for b in ld) == 48
    for c in clients:
        c.close()


def test_a_malformed_op_in_a_ticket_is_a_precise_error_and_the_node_serves_on(served):
    spec, _ = served
    ep = spec.nodes[0]
    c = NodeClient(ep.uri, node=ep.node)
    try:
        name = c.manifest().name
        for ops, match in [([{"op": "posterize", "levels": "many"}], "posterize: levels"),
                           ([{"op": "no_such_op"}], "unknown op 'no_such_op'.*broken_ops.py"),
                           ([{"levels": 3}], "an op is given as")]:
            with pytest.raises(NodeRequestError, match=match):
                c.get(Ticket(dataset=name, samples=[0], ops=ops))
        batches, _ = c.get(Ticket(dataset=name, samples=[0], ops=OPS[:3]))
        assert decode_rows(batches[0])[0].value.shape == (48, 48, 3)
    finally:
        c.close()


def test_samples_processed_to_different_depths_in_one_ticket_and_finished_on_the_host(served, store):
    spec, _ = served
    pipe = Pipeline(OPS)
    assert pipe.valid_splits == [0, 2, 3, 4]
    ep = spec.nodes[0]
    c = NodeClient(ep.uri, node=ep.node)
    try:
        name = c.manifest().name
        prefixes = [0, 2, 3, 4, 2]
        ids = list(range(5))
        batches, _ = c.get(Ticket(dataset=name, samples=ids, ops=pipe.to_json(), prefixes=prefixes, seed=1))
        rows = [r for b in batches for r in decode_rows(b)]
        assert [r.prefix for r in rows] == prefixes
        assert isinstance(rows[0].value, bytes) and rows[1].value.shape == (48, 48, 3)
        assert rows[3].value.shape == (3, 48, 48)
        with pytest.raises(NodeRequestError, match=r"prefixes \[1\] are not valid splits"):
            c.get(Ticket(dataset=name, samples=ids, ops=pipe.to_json(), prefixes=[0, 1, 2, 3, 4]))
    finally:
        c.close()

    def mixed(ids: np.ndarray) -> np.ndarray:  # a different depth per sample: the case a planner may choose
        return np.array([0, 2, 3, 4])[ids % 4]

    with Loader(store, pipeline=OPS, batch_size=8, seed=6) as local:
        want = _digest(local)
    with Loader(cluster=spec, pipeline=OPS, split=mixed, batch_size=8, seed=6) as remote:
        assert _digest(remote) == want
