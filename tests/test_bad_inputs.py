"""The bad-input corpus (tests/bad_inputs/*.yaml): every case gets a one-line error that names
the problem — CLI mistakes exit with code 2 and print no traceback, leave no run directory;
malformed or unauthorised tensors sent to a socket's gRPC server are refused while the server
keeps serving."""

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from rdu.interconnect.grpc_plane import InterconnectServer
from rdu.interconnect.wire import chunk_tensor
from rdu.node.cli.main import main
from rdu.protos import interconnect_pb2 as pb
from rdu.protos import interconnect_pb2_grpc as pb_grpc

CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*.yaml"))
TOKEN = "corpus-token"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_corpus_is_large():
    assert len(CASES) >= 30


@pytest.mark.parametrize("path", [p for p in CASES if "command" in load(p)], ids=lambda p: p.stem)
def test_cli_case(path, tmp_path, capsys):
    case = load(path)
    for name, text in case.get("files", {}).items():
        (tmp_path / name).write_text(text)
    argv = [arg.replace("{case}", str(tmp_path)) for arg in case["command"]]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == case["exit_code"], err
    assert case["expect"] in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


async def _send_raw(address: str, header: pb.TensorHeader, payload: bytes, seqs: list[int]):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InterconnectStub(channel)

        def stream():
            for i, seq in enumerate(seqs):
                yield pb.TensorChunk(header=header if i == 0 else None, seq=seq, data=payload, last=i == len(seqs) - 1)

        return [ack async for ack in stub.Transfer(stream(), timeout=10)]


@pytest.mark.parametrize("path", [p for p in CASES if "grpc" in load(p)], ids=lambda p: p.stem)
def test_grpc_case(path):
    case = load(path)

    async def scenario():
        server = InterconnectServer("node0/socket0", members=["node0/socket0", "node0/socket1"], run_token=TOKEN)
        address = await server.start()
        try:
            fields = {"tensor_id": "bad", "src": "node0/socket1", "dst": "node0/socket0", "run_token": TOKEN,
                      "want_ack": True, **case["grpc"]["header"]}
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _send_raw(address, pb.TensorHeader(**fields), b"\0" * case["grpc"]["payload_bytes"],
                                case["grpc"].get("seqs", [0]))
            assert info.value.code().name == case["status"]
            assert case["expect"] in (info.value.details() or "")
            # the server keeps serving well-formed traffic from members with the token
            good = pb.TensorHeader(tensor_id="good", src="node0/socket1", dst="node0/socket0", run_token=TOKEN,
                                   want_ack=True)
            async with grpc.aio.insecure_channel(address) as channel:
                acks = [a async for a in pb_grpc.InterconnectStub(channel).Transfer(
                    chunk_tensor(good, np.ones(3, np.float32)), timeout=10)]
            assert [a.tensor_id for a in acks] == ["good"]
            assert (await server.mailbox.take("good", 5)).array.tolist() == [1, 1, 1]
        finally:
            await server.stop(0)

    asyncio.run(scenario())
