"""`fedlora certs` and `fedlora launch`: credentials, and real SuperLink/SuperNode processes
on loopback (Flower's deployment engine, TLS and SuperNode authentication)."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.verification import PolicyBuilder, Store
from test_simulation import our_processes, reevaluate

from fedlora import config
from fedlora.cli.deploy import add_commands
from fedlora.errors import FedLoraError
from fedlora.federation.outputs import read_metrics
from fedlora.runtime import certs, deploy

WIDE = dict(os.environ, COLUMNS="500")  # rich would wrap the paths in messages at 80 columns
TINY = ("model.num-hidden-layers=1 data.samples-per-client=16 data.eval-samples=32 "
        "data.max-length=32 train.local-steps=2 train.batch-size=8")


def fedlora_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`fedlora certs|launch ...` in a fresh process (the same commands as `fedlora`)."""
    return subprocess.run([sys.executable, "-m", "fedlora", *args],
                          capture_output=True, text=True, timeout=timeout, env=WIDE)


def launch_error(*argv: str) -> str:
    """Run `fedlora launch ARGV` in this process; return the error it stops with."""
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["launch", *argv])
    with pytest.raises(FedLoraError) as info:
        args.func(args)
    return str(info.value)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------- certs


def test_certs_for_flower_tls_and_supernode_auth(tmp_path):
    # Prepare
    directory = tmp_path / "creds"

    # Execute
    creds = certs.generate(directory, hosts=["superlink.example.org", "10.1.2.3"], nodes=2)

    # Assert: every file, private ones 0600 in a 0700 directory
    assert all(p.is_file() for p in creds.files())
    assert mode(directory) == 0o700
    for private in (creds.ca_key, creds.server_key, *creds.node_keys):
        assert mode(private) == 0o600
    assert mode(creds.ca_cert) == mode(creds.server_cert) == 0o644

    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                        ipaddress.ip_address("10.1.2.3")]
    # the server certificate chains to the CA for every name a SuperNode may dial
    verifier = PolicyBuilder().store(Store([ca])).time(dt.datetime.now(dt.UTC))
    for name in (x509.DNSName("localhost"), x509.DNSName("superlink.example.org"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.IPAddress(ipaddress.ip_address("10.1.2.3"))):
        chain = verifier.build_server_verifier(name).verify(server, [])
        assert chain[-1] == ca

    # SuperNode keys: EC private keys in OpenSSH format, each .pub its own public key
    for key_path, pub_path in zip(creds.node_keys, creds.node_public_keys, strict=True):
        key = load_ssh_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        pub = load_ssh_public_key(pub_path.read_bytes())
        assert pub.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) == \
            key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)


def test_certs_refuse_to_overwrite_without_force(tmp_path):
    first = certs.generate(tmp_path / "c", nodes=1)
    ca_before = first.ca_cert.read_bytes()

    with pytest.raises(certs.CertsError, match="--force") as info:
        certs.generate(tmp_path / "c", nodes=1)
    assert str(first.server_key) in str(info.value)
    assert first.ca_cert.read_bytes() == ca_before

    first.server_key.chmod(0o644)
    again = certs.generate(tmp_path / "c", nodes=1, force=True)
    assert again.ca_cert.read_bytes() != ca_before
    assert mode(again.server_key) == 0o600  # replaced files get private modes again


@pytest.mark.parametrize("host", ["two words", "http://x", "a@b"])
def test_certs_reject_hosts_that_are_neither_names_nor_addresses(tmp_path, host):
    with pytest.raises(certs.CertsError, match="neither an IP address nor a DNS name"):
        certs.generate(tmp_path / "c", hosts=[host])
    assert not (tmp_path / "c").exists()


def test_certs_command(tmp_path):
    directory = tmp_path / "creds"
    res = fedlora_cli("certs", str(directory), "--hosts", "a.example.org,10.0.0.9", "--nodes",
                      "3", timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in directory.glob("supernode-*")) == [
        f"supernode-{i}.{ext}" for i in range(3) for ext in ("key", "pub")]
    again = fedlora_cli("certs", str(directory), timeout=120)
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr and "--force" in again.stderr


# ---------------------------------------------------------------------- bad input


@pytest.fixture
def busy_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_bad_input_fails_before_anything_starts(tmp_path, busy_port):
    """Each error names what to change; nothing is written to OUT and no process starts."""
    incomplete = certs.generate(tmp_path / "creds", nodes=2)
    incomplete.server_key.unlink()
    mismatched = certs.generate(tmp_path / "creds-2", nodes=2)
    mismatched.node_public_keys[0].write_bytes(mismatched.node_public_keys[1].read_bytes())
    out = tmp_path / "out"
    cases = [
        (["--nodes", "0"], "--nodes must be >= 1"),
        (["--gpus", "99"], "GPU index(es) [99] do not exist"),
        (["--auth", "--certs", str(incomplete.directory), "--nodes", "2"],
         f"missing credential file(s): {incomplete.server_key}"),
        (["--auth", "--certs", str(mismatched.directory), "--nodes", "2"],
         f"{mismatched.node_public_keys[0]} is not the public key of "
         f"{mismatched.node_keys[0]}"),
        (["--nodes", "2", "--port", str(busy_port)], f"port {busy_port} on 127.0.0.1 is in use"),
        (["--nodes", "2", "--ranks", "4,8,16"], "one rank per SuperNode (2)"),
        (["--nodes", "2", "--ranks", "4,8"], "needs equal LoRA ranks"),
        (["--nodes", "2", "--data-path", str(tmp_path / "node-{partition-id}.jsonl")],
         "node-0.jsonl"),
    ]
    for argv, message in cases:
        error = launch_error(*argv, "--out", str(out), "-c", TINY)
        assert message in error, (argv, error)
    with pytest.raises(deploy.DeployError, match="needs TLS"):
        deploy.launch({}, out=out, nodes=2, tls=False, auth=True)
    assert not out.exists()
    assert our_processes(str(out)) == []


def _has_gpu() -> bool:
    import torch

    return torch.cuda.device_count() > 0


@pytest.mark.skipif(_has_gpu(), reason="this host has a CUDA GPU")
def test_gpus_on_a_host_without_cuda_fail_before_anything_starts(tmp_path):
    out = tmp_path / "out"
    error = launch_error("--gpus", "0", "--out", str(out), "-c", TINY)
    assert "GPU index(es) [0] do not exist: this host has no CUDA GPU" in error
    assert not out.exists()
    assert our_processes(str(out)) == []


# ---------------------------------------------------------------------- SuperNode setup


def test_gpu_indices_become_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert deploy.visible_devices([1, 0]) == ["1", "0"]
    # indices count within the launcher's own CUDA_VISIBLE_DEVICES, as torch's do
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert deploy.visible_devices([1]) == ["6"]
    with pytest.raises(deploy.DeployError, match=r"\[2\] do not exist: torch sees 2"):
        deploy.visible_devices([0, 2])


def test_supernode_command_environment_and_node_config(tmp_path):
    with warnings.catch_warnings():  # flwr's CLI helpers import deprecated click names
        warnings.simplefilter("ignore", DeprecationWarning)
        from flwr.common.config import parse_config_args

    spec = deploy.NodeSpec(index=1, num_nodes=2, port=9101, home=tmp_path / "home",
                           log_path=tmp_path / "sn.log", rank=8, data_path="/data/my file.jsonl",
                           gpu="1", private_key=tmp_path / "supernode-1.key",
                           signing_key=tmp_path / "signing-1.key")

    cmd = spec.command("127.0.0.1:9100", tmp_path / "ca.crt")
    env = spec.env({"PATH": "/bin"})

    # Flower reads back exactly what the ClientApp's Node.from_configs (and, for the signing
    # key, signed_wire.node_key) expects
    assert parse_config_args([cmd[cmd.index("--node-config") + 1]]) == {
        "partition-id": 1, "num-partitions": 2, "lora-rank": 8, "data-path": "/data/my file.jsonl",
        "signing-key": str(tmp_path / "signing-1.key")}
    assert cmd[cmd.index("--port") + 1] == "9101"
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "supernode-1.key")
    assert "--insecure" not in cmd
    assert env == {"PATH": "/bin", "FLWR_HOME": str(tmp_path / "home"),
                   "CUDA_VISIBLE_DEVICES": "1"}
    plain = deploy.NodeSpec(index=0, num_nodes=1, port=9102, home=tmp_path, log_path=tmp_path)
    assert "--insecure" in plain.command("127.0.0.1:9100", None)
    assert "CUDA_VISIBLE_DEVICES" not in plain.env({})


# ---------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_launch_with_tls_auth_and_mixed_ranks(tmp_path):
    """2 SuperNodes (ranks 4 and 8, FlexLoRA) × 2 rounds over TLS with registered keys."""
    out = tmp_path / "run"
    started = time.monotonic()
    res = fedlora_cli("launch", "--nodes", "2", "--tls", "--auth", "--rounds", "2",
                      "--ranks", "4,8", "--out", str(out), "-c", f"strategy=flexlora {TINY}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round 2/2" in res.stderr
    print(f"launch took {time.monotonic() - started:.0f}s")

    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_sampled"] == r["num_accepted"] == 2 for r in records[1:])
    # both ranks reached the server: its discovery log, and FlexLoRA's exact aggregate
    # stacks the factors of both clients, rank 4 + 8
    assert "2 nodes (nodes per rank {4: 1, 8: 1})" in (out / "run.log").read_text()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 12
    again = reevaluate(out)  # the adapter loads with PeftModel.from_pretrained
    # another process and a folded scale: a prediction within float32 rounding of a tie may
    # flip (see test_simulation.check_run); a wrong adapter costs ≫ 0.01
    assert again["eval-accuracy"] == pytest.approx(records[-1]["eval_accuracy"], abs=0.01)

    deployment = json.loads((out / "deployment.json").read_text())
    assert deployment["superlink"]["tls"] and deployment["superlink"]["auth"]
    assert [n["node-config"] for n in deployment["nodes"]] == [
        "partition-id=0 num-partitions=2 lora-rank=4",
        "partition-id=1 num-partitions=2 lora-rank=8"]
    assert all(n["node-id"] for n in deployment["nodes"])  # registered keys
    assert mode(out / "certs") == 0o700 and mode(out / "certs" / "supernode-0.key") == 0o600
    for name in ("superlink", "supernode-0", "supernode-1"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
    assert our_processes(str(out)) == []  # SuperLink, SuperNodes, SuperExecs, apps: all gone


@pytest.mark.slow
def test_a_supernode_whose_key_is_not_registered_cannot_join(tmp_path, monkeypatch):
    """Only supernode-0's key gets registered: the SuperLink refuses supernode-1 (Flower exit
    code 305, "Failed to activate SuperNode") and the launch stops with that reason."""
    register = deploy.register_keys
    monkeypatch.setattr(deploy, "register_keys",
                        lambda specs, env, cwd: register(specs[:1], env, cwd))
    out = tmp_path / "run"
    flat = config.parse_overrides(TINY)  # the other keys take their defaults

    with pytest.raises(deploy.SupernodeFailed) as info:
        deploy.launch(flat, out=out, nodes=2, auth=True)

    assert info.value.node == "supernode-1"
    assert "Exit Code: 305" in str(info.value)
    assert "Failed to activate SuperNode" in str(info.value)
    assert info.value.log_path == out / "logs" / "supernode-1.log"
    assert not read_metrics(out)  # no run was submitted
    assert our_processes(str(out)) == []


@pytest.mark.slow
def test_a_supernode_lost_mid_run_is_reported_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedlora", "launch", "--nodes",
                             "2", "--rounds", "1", "--out", str(out), "-c", TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=WIDE)
    try:
        deadline = time.monotonic() + 300
        while not read_metrics(out) and time.monotonic() < deadline:
            time.sleep(0.5)  # round 0 logged: the ServerApp has found both nodes
        assert read_metrics(out), "the run never reached round 0"
        os.kill(_supernode_pid(out, 1), signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()  # its reapers stop everything it started
            proc.wait()

    assert proc.returncode == 0, stdout + stderr
    assert "warning: supernode-1 exited with status" in stderr
    last = read_metrics(out)[-1]
    assert last["round"] == 1
    assert last["num_accepted"] == 1 and last["clients"] == [0]
    # the SuperLink answered for the lost node; the server counted it as a failed client
    assert any("Node Unavailable" in error for error in last["errors"]), last
    assert last["rejected"] == {"CLIENT_ERROR": 1}  # counted once, not also as NO_REPLY
    assert our_processes(str(out)) == []


@pytest.mark.long  # 1-3.5 min on 2 cores: make test-long (CI budget)
@pytest.mark.slow
def test_launch_with_signed_updates_from_key_files(tmp_path):
    """sign-updates: each SuperNode signs with its key file from `fedlora certs` (node config
    signing-key), the ServerApp verifies every update against the registered public keys."""
    creds = certs.generate(tmp_path / "creds", nodes=2)
    out = tmp_path / "run"
    res = fedlora_cli("launch", "--nodes", "2", "--rounds", "2", "--certs", str(creds.directory),
                      "--out", str(out), "-c", f"sign-updates=true {TINY}")
    assert res.returncode == 0, res.stdout + res.stderr

    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_accepted"] == 2 and r["rejected"] == {} for r in records[1:])
    assert "signed updates, 2 of 2 node keys (registered keys)" in (out / "run.log").read_text()
    deployment = json.loads((out / "deployment.json").read_text())
    assert [n["node-config"] for n in deployment["nodes"]] == [
        f'partition-id={i} num-partitions=2 signing-key="{creds.signing_keys[i]}"'
        for i in range(2)]
    assert our_processes(str(out)) == []


@pytest.mark.long  # 1-3.5 min on 2 cores: make test-long (CI budget)
@pytest.mark.slow
def test_sigkilled_launch_resumes_bit_identically(tmp_path):
    """`fedlora launch` killed with SIGKILL after round 1, then `--resume`: the adapter equals
    that of the same launch left alone, bit for bit. Both launches run ``--cold`` (every
    ClientApp message in a fresh process), so nothing but the server's checkpoint carries
    state; that warm workers compute what cold processes compute is its own test
    (``test_warm_default.test_warm_and_cold_launches_end_bit_identical``)."""
    from safetensors.numpy import load_file

    args = ["--nodes", "2", "--rounds", "2", "-c", TINY + " strategy=fedit "
            "server-optimizer=fedadam"]
    straight = tmp_path / "straight"
    res = fedlora_cli("launch", "--cold", "--out", str(straight), *args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert our_processes(str(straight)) == []

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedlora", "launch", "--cold", "--out",
                             str(out), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(r["round"] >= 1 for r in read_metrics(out)):
        time.sleep(0.2)
    proc.kill()
    proc.wait(30)
    assert not (out / "adapter").exists()
    deadline = time.monotonic() + 30
    while our_processes(str(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert our_processes(str(out)) == []  # the reapers stopped everything it had started

    res = fedlora_cli("launch", "--resume", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["round"] for r in read_metrics(out)] == [0, 1, 2]
    want = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].tobytes() == got[key].tobytes(), key
    assert our_processes(str(out)) == []


def test_launch_resume_needs_a_launch_directory(tmp_path):
    res = fedlora_cli("launch", "--resume", str(tmp_path), timeout=60)
    assert res.returncode == 2 and "is not the output directory of a `fedlora launch`" in \
        res.stderr


def _supernode_pid(out: Path, index: int) -> int:
    """The `flower-supernode` process of node ``index`` of the launch writing to ``out``."""
    home = f"FLWR_HOME={out}/.flwr/supernode-{index}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(cmd) > 1 and cmd[1].endswith(b"flower-supernode") and home in env:
            return int(proc.name)
    raise AssertionError(f"no flower-supernode process for node {index} of {out}")


def test_a_warm_worker_forgets_the_modules_of_a_replaced_app(tmp_path, monkeypatch):
    """A new FAB (another run, or changed app code) must not reuse the old app's modules."""
    from fedlora.runtime import warm

    old_app = tmp_path / "old-app"
    (old_app / "oldpkg").mkdir(parents=True)
    (old_app / "oldpkg" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(old_app))
    import oldpkg  # noqa: F401  (imported from the app directory, as Flower's loader would)

    warm.forget_modules_under(old_app)

    assert "oldpkg" not in sys.modules
    assert str(old_app.resolve()) not in sys.path
    assert "fedlora.runtime.warm" in sys.modules  # the library, installed elsewhere, stays
