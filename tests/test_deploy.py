"""`fedllm certs`, and a real deployment on localhost: a TLS SuperLink with SuperNode
authentication, three authenticated SuperNodes that each bring their own data file and score the
global model on it (the server holds no data), a `flwr run`, and SuperNodes that must be refused.

Everything runs as real processes (no mocks), with the commands docs/deploy.md documents. Every
process started here is stopped by PID, with its children, in the fixtures' teardown.
"""

from __future__ import annotations

import json
import re
import ssl
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedllm.cli import main as fedllm_main
from tests.conftest import PROJECT
from tests.deploy_support import Processes, command, flwr_json, start_tls_link, tls_supernode, wait_for
from tests.deploy_support import read_metrics as metrics

try:
    import tomllib
except ImportError:  # Python 3.10: flwr depends on tomli
    import tomli as tomllib

CONNECTION = "deploy-tls"
HOSTS = "localhost,127.0.0.1,::1"
GOOD_NODES = 3  # node0..node2: registered and started correctly
SPARE_NODE = 3  # node3: registered, only ever used by SuperNodes that must fail TLS
UNREGISTERED_NODE = 4  # node4: never registered
# the run's `dataset` names no file: the server reads no data, the nodes train and evaluate on their own
RUN_CONFIG = ("model='builtin:micro' num-server-rounds=1 local-steps=3 min-clients=3 round-timeout=120 "
              "evaluation='clients' dataset='/the/server/holds/no/data.jsonl'")
NODE2_RANK = 4  # node 2 also brings its own adapter rank
OWN_TASKS = {"reverse": lambda w: w[::-1], "copy": lambda w: w, "upper": str.upper}  # node i's task: the i-th


# --------------------------------------------------------------------------------------------
# fedllm certs
# --------------------------------------------------------------------------------------------


def certs(out: Path, *extra: str, nodes: int = 2, hosts: str = HOSTS) -> int:
    return fedllm_main(["certs", "--out", str(out), "--hosts", hosts, "--nodes", str(nodes), *extra])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_writes_every_file_with_its_mode(tmp_path, capsys):
    out = tmp_path / "certs"
    assert certs(out, nodes=2) == 0
    printed = capsys.readouterr().out
    for name in ("ca.key", "server.key", "nodes/node0", "nodes/node1"):
        assert mode(out / name) == 0o600, name
    for name in ("ca.crt", "server.pem", "nodes/node0.pub", "nodes/node1.pub"):
        assert mode(out / name) == 0o644, name
    assert mode(out) == 0o700 and mode(out / "nodes") == 0o700
    assert not (out / "nodes" / "node2").exists()
    assert str((out / "nodes" / "node1.pub").resolve()) in printed and "flower-superlink" in printed


def test_server_certificate_is_issued_by_the_ca_for_every_host(tmp_path):
    out = tmp_path / "certs"
    assert certs(out, hosts="superlink.example.org,203.0.113.7,2001:db8::1", nodes=1) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"superlink.example.org", "localhost"} <= set(dns)
    assert {"203.0.113.7", "2001:db8::1", "127.0.0.1", "::1"} <= ips
    # and the standard library's TLS accepts the pair as a server and the CA as a trust root
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(out / "server.pem", out / "server.key")
    ssl.create_default_context(cafile=str(out / "ca.crt"))


def test_node_keys_are_p384_openssh_pairs(tmp_path):
    out = tmp_path / "certs"
    assert certs(out, nodes=3) == 0
    publics = set()
    for i in range(3):
        private = serialization.load_ssh_private_key((out / f"nodes/node{i}").read_bytes(), password=None)
        public = serialization.load_ssh_public_key((out / f"nodes/node{i}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.public_numbers() == private.public_key().public_numbers()
        assert (out / f"nodes/node{i}").read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        publics.add(public.public_numbers())
    assert len(publics) == 3


def test_certs_refuse_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "certs"
    assert certs(out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert certs(out) != 0
    error = capsys.readouterr().err
    assert "already exists" in error and "--force" in error and str(out / "ca.crt") in error
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # one existing file is enough to refuse, and nothing else gets written
    (out / "ca.crt").unlink()
    assert certs(out) != 0
    assert not (out / "ca.crt").exists()
    assert certs(out, "--force") == 0
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.keys() == before.keys() | {out / "ca.crt"}
    assert all(after[p] != before[p] for p in before)
    assert mode(out / "ca.key") == 0o600 and mode(out / "ca.crt") == 0o644


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--hosts", HOSTS], "--nodes must be at least 1"),
    (["--nodes", "1", "--hosts", " , "], "--hosts is empty"),
    (["--nodes", "1", "--hosts", "bad host/name"], "neither an IP address nor a DNS name"),
])
def test_certs_bad_arguments_are_clear_errors(tmp_path, capsys, args, message):
    assert fedllm_main(["certs", "--out", str(tmp_path / "c"), *args]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------
# A real deployment
# --------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def link(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    (root / "logs").mkdir()
    procs = Processes(root / "logs")
    try:
        # certificates and node keys (the documented command, as a real process); the SuperLink with
        # TLS (all three files) + SuperNode authentication, offline; node0..node3 registered
        link = start_tls_link(root, procs, CONNECTION, nodes=SPARE_NODE + 1, keys=5, hosts=HOSTS)
        yield link
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def deployment(link):
    """Start the good and the bad SuperNodes together, run one round, collect what happened."""
    root, c = link.root, link.certs
    words = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat", "ink", "jar"]
    good = []
    for i, (task, answer) in enumerate(OWN_TASKS.items()):
        own_data = root / f"institution{i}.jsonl"
        own_data.write_text("\n".join(json.dumps({"instruction": task, "input": w, "output": answer(w), "task": task})
                                      for w in words) + "\n")
        config = f"partition-id={i} num-partitions={GOOD_NODES} data-path='{own_data}'"
        if i == 2:
            config += f" lora-rank={NODE2_RANK}"
        good.append(tls_supernode(link, f"node{i}", i, node_config=config))
    bad = {
        # a key the SuperLink has never seen
        "unregistered": link.supernode("unregistered", "--root-certificates", str(c / "ca.crt"),
                                       "--auth-supernode-private-key", str(c / f"nodes/node{UNREGISTERED_NODE}"),
                                       node_config="partition-id=7 num-partitions=3"),
        # a registered key, but the SuperNode does not trust our CA (system CAs only)
        "no-ca": link.supernode("no-ca", "--auth-supernode-private-key", str(c / f"nodes/node{SPARE_NODE}"),
                                node_config="partition-id=8 num-partitions=3"),
        # plain HTTP against the TLS link (no key: Flower refuses auth without TLS locally)
        "insecure": link.supernode("insecure", "--insecure", node_config="partition-id=9 num-partitions=3",
                                   max_retries=3),
    }

    def online() -> list[dict]:
        nodes = flwr_json(link.cli_env, "supernode", "ls", CONNECTION)["nodes"]
        for name, proc in zip(("node0", "node1", "node2"), good):
            if proc.poll() is not None:
                pytest.fail(f"SuperNode {name} exited with {proc.returncode}:\n{link.procs.log(name)[-3000:]}")
        return nodes if sum(n["status"] == "online" for n in nodes) >= GOOD_NODES else []

    wait_for("three SuperNodes online", online, 90, link.procs, interval=1)
    out = root / "out"
    started = time.monotonic()
    run = subprocess.Popen(
        [command("flwr"), "run", str(PROJECT), CONNECTION, "--stream",
         "--run-config", f"{RUN_CONFIG} output-dir='{out}'"],
        env=link.cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=PROJECT,
    )
    try:
        run_log, _ = run.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        run.kill()
        run_log, _ = run.communicate()
        pytest.fail(f"flwr run did not finish within 180 s:\n{run_log[-4000:]}\n{link.procs.log('superlink')[-3000:]}")
    run_seconds = time.monotonic() - started

    # the refused SuperNodes must be gone by now, or at least have said why they failed
    def bad_done() -> bool:
        return all(p.poll() is not None for p in bad.values())

    wait_for("the refused SuperNodes to exit", bad_done, 60, link.procs)
    return {
        "out": out, "run_rc": run.returncode, "run_log": run_log, "run_seconds": run_seconds,
        "runs": flwr_json(link.cli_env, "ls", CONNECTION)["runs"],
        "nodes": flwr_json(link.cli_env, "supernode", "ls", CONNECTION)["nodes"],
        "bad": {name: (proc.returncode, link.procs.log(name)) for name, proc in bad.items()},
        "own_data_lines": len(words),
    }



def test_the_run_completes_with_three_authenticated_nodes(deployment):
    out = deployment["out"]
    assert (out / "summary.json").exists(), f"no summary.json; flwr run said:\n{deployment['run_log'][-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1
    rows = metrics(out)
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["clients"] == 3 and r["rejected"] == 0 for r in rows[1:]), rows
    assert (out / "model" / "config.json").exists() and (out / "adapter").is_dir()
    # every node's own settings arrived: each trained on its file (one example of ten held out), node 2 with its rank
    nodes = {n["partition_id"]: n for n in summary["nodes"]}
    assert sorted(nodes) == [0, 1, 2]
    assert nodes[2]["rank"] == NODE2_RANK and all(n["num_examples"] == deployment["own_data_lines"] - 1
                                                  for n in nodes.values())
    # each node scored the global model on its own held-out example; the server read no data
    tasks = list(OWN_TASKS)
    for row in rows:
        assert row["client_examples"] == {str(i): {task: 1} for i, task in enumerate(tasks)}
        assert sorted(row["per_task_accuracy"]) == sorted(tasks) and "server_accuracy" not in row
    assert set(summary["client_accuracy"]) == {"0", "1", "2"}
    assert set(rows[-1]["refactor_error"]) == {str(NODE2_RANK), "8"}
    # the run really finished as far as Flower is concerned, too
    assert deployment["run_rc"] == 0
    statuses = [r["status"] for r in deployment["runs"]]
    assert statuses == ["finished:completed"], deployment["runs"]


def test_an_unregistered_node_key_is_refused(deployment):
    rc, log = deployment["bad"]["unregistered"]
    assert rc != 0
    assert "Failed to activate SuperNode" in log, log[-3000:]


def test_a_node_without_the_ca_fails_tls_verification(deployment):
    rc, log = deployment["bad"]["no-ca"]
    assert rc != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]


def test_an_insecure_node_is_refused_by_the_tls_link(deployment):
    rc, log = deployment["bad"]["insecure"]
    assert rc != 0
    # the TLS side either resets the plain connection or closes it unanswered; either way Flower gives up
    # with its "no connection to the SuperLink" exit code
    assert "Exit Code: 305" in log and "could not establish a connection to the SuperLink" in log, log[-3000:]


def test_no_refused_node_ever_joined(deployment):
    nodes = deployment["nodes"]
    # exactly the four registered keys are known; the three good ones came online, node3 never did
    assert len(nodes) == SPARE_NODE + 1, nodes
    never_online = [n for n in nodes if n["online-at"] == "N/A"]
    assert len(never_online) == 1, nodes
    summary = json.loads((deployment["out"] / "summary.json").read_text())
    assert {n["partition_id"] for n in summary["nodes"]} == {0, 1, 2}
    for row in metrics(deployment["out"])[1:]:
        assert row["clients"] == GOOD_NODES
    assert "partition 7" not in deployment["run_log"] and "partition 8" not in deployment["run_log"]


def test_the_guide_documents_the_tested_commands():
    """docs/deploy.md shows the commands and flags this file runs, and a valid connection entry."""
    doc = (PROJECT / "docs" / "deploy.md").read_text()
    for needle in (
        "fedllm certs --out", "--hosts", "--nodes", "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
        "--enable-supernode-auth", "--database", "--disable-runtime-dependency-installation",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1", "/health", "flwr supernode register",
        "--root-certificates", "--auth-supernode-private-key", "--port", "--node-config", "partition-id=",
        "num-partitions=", "lora-rank=", "data-path=", "flwr run . federation --stream --run-config",
        "min-clients=", "output-dir=", "summary.json", "flwr ls federation --format json", "finished:completed",
        "pip install", "--insecure",
    ):
        assert needle in doc, needle
    block = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    entry = tomllib.loads(block)["superlink"]["federation"]
    assert set(entry) == {"address", "root-certificates"} and Path(entry["root-certificates"]).is_absolute()
