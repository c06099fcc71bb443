"""Mutual TLS of the gRPC plane between two hosts: two Linux network namespaces joined by a veth
pair (10.77.0.1 and 10.77.0.2), a server bound to its namespace's address, clients in the other.

What it proves: off loopback the plane serves only TLS with the run's CA; an authenticated TLS
transfer arrives intact; a plaintext client, a client whose certificate comes from another run's
CA, and a client with the right certificate but a wrong run secret are all refused; and every
byte that crossed the veth (captured with a raw AF_PACKET socket in the server's namespace) holds
neither the run secret, nor the sender's HMAC credential, nor the payload in clear.

Needs root and `ip` (iproute2); skips with the reason where namespaces cannot be made. The
namespaces (and with them the veth pair) are deleted even when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rdu.interconnect.plane_auth import make_run_tls, sender_credential

SECRET = "netns-run-secret-5f1c9a"
SERVER, CLIENT = "node0/socket0", "node1/socket0"
SERVER_IP, CLIENT_IP = "10.77.0.1", "10.77.0.2"
MARKER = b"RDU-PAYLOAD-IN-CLEAR-7d41"     # 25 bytes; padded into a float32 tensor
TAG = f"{os.getpid() % 100000}"
NS_A, NS_B = f"rdutls-a-{TAG}", f"rdutls-b-{TAG}"
VETH_A, VETH_B = f"rdua{TAG}", f"rdub{TAG}"   # interface names must stay under 16 characters


def _ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    command = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=20)


def _delete_namespaces() -> None:
    for ns in (NS_A, NS_B):
        _ip("netns", "del", ns)


@pytest.fixture
def two_hosts():
    """Two namespaces joined by a veth pair, addressed and up; removed afterwards whatever happens."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): network namespaces cannot be made here")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    _delete_namespaces()
    try:
        made = _ip("netns", "add", NS_A)
        if made.returncode != 0:
            pytest.skip(f"network namespaces cannot be made here: {made.stderr.strip()}")
        steps = [
            ("netns", "add", NS_B),
            ("link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B),
            ("link", "set", VETH_A, "netns", NS_A),
            ("link", "set", VETH_B, "netns", NS_B),
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"`ip {' '.join(step)}` failed: {done.stderr.strip()}")
        for ns, veth, address in ((NS_A, VETH_A, SERVER_IP), (NS_B, VETH_B, CLIENT_IP)):
            for step in (("addr", "add", f"{address}/24", "dev", veth), ("link", "set", veth, "up"),
                         ("link", "set", "lo", "up")):
                done = _ip(*step, netns=ns)
                assert done.returncode == 0, done.stderr
        yield
    finally:
        _delete_namespaces()


SERVER_SCRIPT = textwrap.dedent("""
    import asyncio, hashlib, json, sys
    from rdu.interconnect.grpc_plane import InterconnectServer
    from rdu.interconnect.plane_auth import PlaneTLS
    folder, secret, name, peer, ip = sys.argv[1:6]
    tls = PlaneTLS(*(open(f"{folder}/a.{part}", "rb").read() for part in ("ca", "cert", "key")))
    async def main():
        server = InterconnectServer(name, bind_host=ip, members=[name, peer], run_token=secret, tls=tls)
        print(json.dumps({"address": await server.start()}), flush=True)
        got = await server.mailbox.take("hello", 60, sender=peer)
        await asyncio.sleep(0.3)
        print(json.dumps({"sha256": hashlib.sha256(got.array.tobytes()).hexdigest(),
                          "virtual_arrival_ns": got.header.virtual_arrival_ns,
                          "rejected": server.stats.rejected}), flush=True)
        await server.stop(0)
    asyncio.run(main())
""")

CLIENT_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    import grpc, numpy as np
    from rdu.interconnect.grpc_plane import PeerClient, PlaneStats
    from rdu.interconnect.plane_auth import PlaneTLS
    from rdu.protos import interconnect_pb2 as pb, interconnect_pb2_grpc as pb_grpc
    folder, secret, name, peer, address, marker = sys.argv[1:7]
    def tls(run):
        return PlaneTLS(*(open(f"{folder}/{run}.{part}", "rb").read() for part in ("ca", "cert", "key")))
    async def resolve(_):
        return address
    async def outcome(call):
        try:
            reply = await call
            return "OK " + reply.status
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    async def main():
        results = {}
        async with grpc.aio.insecure_channel(address) as channel:      # plaintext, no credential
            results["plaintext"] = await outcome(pb_grpc.InterconnectStub(channel).Health(pb.HealthRequest(),
                                                                                          timeout=5))
        other = PeerClient(name, resolve, PlaneStats(), run_token=secret, tls=tls("b"))   # another run's CA
        results["other_ca"] = await outcome(other.health(peer, timeout_s=5))
        await other.close()
        wrong = PeerClient(name, resolve, PlaneStats(), run_token="not-the-secret", tls=tls("a"))
        results["wrong_token"] = await outcome(wrong.health(peer, timeout_s=5))
        await wrong.close()
        good = PeerClient(name, resolve, PlaneStats(), run_token=secret, tls=tls("a"))
        results["tls_health"] = await outcome(good.health(peer, timeout_s=5))
        payload = np.frombuffer(marker.encode().ljust(32, b"."), dtype=np.float32)
        await good.send(pb.TensorHeader(tensor_id="hello", dst=peer, virtual_send_ns=5, virtual_arrival_ns=9),
                        np.tile(payload, 64), wait_ack=True)
        results["tls_transfer"] = "acknowledged"
        await good.close()
        print(json.dumps(results), flush=True)
    asyncio.run(main())
""")

CAPTURE_SCRIPT = textwrap.dedent("""
    import socket, sys
    iface, path = sys.argv[1:3]
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))   # every frame
    raw.bind((iface, 0))
    print("capturing", flush=True)
    with open(path, "wb") as out:
        while True:
            frame = raw.recv(65535)
            out.write(len(frame).to_bytes(4, "big") + frame)
            out.flush()
""")


def _in(ns: str, script: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _stop(process: subprocess.Popen) -> str:
    """End a process this test started (by its own handle) and return what it printed on stderr."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[1]


def test_mutual_tls_across_two_namespaces(two_hosts, tmp_path: Path):
    import hashlib

    import numpy as np

    for run, label in (("a", "run A"), ("b", "another run")):
        material = make_run_tls(label)
        for part, pem in (("ca", material.ca_pem), ("cert", material.cert_pem), ("key", material.key_pem)):
            (tmp_path / f"{run}.{part}").write_bytes(pem)
    capture_file = tmp_path / "veth.frames"
    capture = _in(NS_A, CAPTURE_SCRIPT, VETH_A, str(capture_file))
    server = client = None
    try:
        assert capture.stdout.readline().strip() == "capturing", _stop(capture)
        server = _in(NS_A, SERVER_SCRIPT, str(tmp_path), SECRET, SERVER, CLIENT, SERVER_IP)
        line = server.stdout.readline()
        assert line, _stop(server)
        address = json.loads(line)["address"]
        assert address.startswith(f"{SERVER_IP}:")           # bound to its namespace's address, not loopback
        client = _in(NS_B, CLIENT_SCRIPT, str(tmp_path), SECRET, CLIENT, SERVER, address, MARKER.decode())
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err[-2000:]
        results = json.loads(out.strip().splitlines()[-1])
        done = json.loads(server.stdout.readline() or "{}")
        assert server.wait(timeout=20) == 0
    finally:
        for process in (client, server, capture):
            if process is not None:
                _stop(process)

    assert results["plaintext"] == "UNAVAILABLE"           # no TLS handshake, no call
    assert results["other_ca"] == "UNAVAILABLE"            # the handshake fails both ways
    assert results["wrong_token"] == "PERMISSION_DENIED"   # TLS is not enough: the credential is checked
    assert results["tls_health"] == "OK serving" and results["tls_transfer"] == "acknowledged"
    payload = np.tile(np.frombuffer(MARKER.ljust(32, b"."), dtype=np.float32), 64)
    assert done["sha256"] == hashlib.sha256(payload.tobytes()).hexdigest() and done["virtual_arrival_ns"] == 9
    assert done["rejected"] == 1                            # the wrong token (the other two never got a call)

    frames = capture_file.read_bytes()
    assert len(frames) > 2_000                              # the veth carried the whole exchange
    assert bytes([0x16, 0x03]) in frames                    # TLS handshake records
    for secret in (SECRET.encode(), sender_credential(SECRET, CLIENT).encode(), MARKER, b"hello"):
        assert secret not in frames, f"{secret!r} crossed the wire in clear"
