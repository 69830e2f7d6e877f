"""Byte-exact test vectors of ``/modelnet/reason/1.0.0`` and forward statements.

The request id is the caller's random value (a nonce the receipt and every forward
statement sign); with it fixed, seeded keys and a fixed time, the request, the answer
stream with its signed receipt, an error, and a forwarder's statement are exact bytes.
"""

import hashlib

from modelnet.identity import PrivateKey
from modelnet.protocols import forward, reason
from modelnet.protocols.reason import Chunk, Error, ReasonClient, ReasonServer, Request, Result, Usage

CLIENT = PrivateKey.from_seed(bytes(range(128, 160)))
PROVIDER = PrivateKey.from_seed(bytes(range(160, 192)))
FORWARDER = PrivateKey.from_seed(bytes(range(192, 224)))
NOW = 1_700_000_000.0
REQUEST_ID = bytes.fromhex("5a5a5a5a000102030405060708090a0b")
REQUEST = Request(
    request_id=REQUEST_ID,
    capability="chat",
    input="What is two and two?",
    params={"max_tokens": 16, "temperature": 0.5},
    budget=10.0,
    hop_limit=4,
    visited=(FORWARDER.peer_id,),
    grant=b"an encoded session grant",
    model="tiny-1",
)
CHUNKS = (Chunk(0, "fo"), Chunk(1, "ur"))
USAGE = Usage(input_bytes=20, output_bytes=4, compute_ms=2.5)

REQUEST_FRAME = bytes.fromhex(
    "f8018aa6627564676574cb4024000000000000aa6361706162696c697479a463686174a56772616e74c418616e20656e"
    "636f6465642073657373696f6e206772616e74a9686f705f6c696d697404a5696e707574b4576861742069732074776f"
    "20616e642074776f3fa46b696e64a772657175657374a56d6f64656ca674696e792d31a6706172616d7382aa6d61785f"
    "746f6b656e7310ab74656d7065726174757265cb3fe0000000000000aa726571756573745f6964c4105a5a5a5a000102"
    "030405060708090a0ba77669736974656491c426002408011220dde3bccec7f3a66a1115f45d720f4dc135c3ae7c4e22"
    "dca38fdb1efd6a495ff8"
)

RECEIPT = bytes.fromhex(
    "87a6646f6d61696ea86d6f64656c6e6574a765787069726573cb41d95edf80000000a36b6579c424080112204fd099cc"
    "d47d7893dfe9ec24414ecb0d9b5420232aad30d91c465be33cbe65c4a77061796c6f6164c5013989aa6361706162696c"
    "697479a463686174ad6368756e6b735f736861323536c4200c6ba3897798db7765e2dd393b8defa08311b53a2404836f"
    "46ecceafd0e72998a6636c69656e74c426002408011220cd14b37f956e953194ff7fb73b3d81dcc561d61a7538094b7c"
    "3e1a643ee5f3aaac696e7075745f736861323536c420399aa5cc9ca7f5ed94c20c8381c09b787125f0a710649ab40e6c"
    "156980f4f445a6697373756564cb41d954fc40000000a56d6f64656ca674696e792d31ad6f75747075745f7368613235"
    "36c42091a7c4361d8011d829f4c078be6ae62d529e3828cf234d3046e1e225bfa15ff0ad706172616d735f7368613235"
    "36c4201917f37d8c3d0a588df53e14cd99ad9abb34e33c2af91d7c3bd977962e5663ebaa726571756573745f6964c410"
    "5a5a5a5a000102030405060708090a0ba373657100a3736967c44043e3f8845919de251a1acdf81570eda7487fed3252"
    "e332eed6202d8e379f4c61daa7d172f17581862dd38bf386d2921a3ced0d550d10f9ef065a3ab7e2bbb204a474797065"
    "a772656365697074"
)

ANSWER_FRAMES = bytes.fromhex(
    "1983a46b696e64a56368756e6ba373657100a474657874a2666f1983a46b696e64a56368756e6ba373657101a4746578"
    "74a27572e50488a8636170616369747908a46b696e64a6726573756c74a56d6f64656ca674696e792d31a66f75747075"
    "74a4666f7572a5717565756501a772656365697074c501e887a6646f6d61696ea86d6f64656c6e6574a7657870697265"
    "73cb41d95edf80000000a36b6579c424080112204fd099ccd47d7893dfe9ec24414ecb0d9b5420232aad30d91c465be3"
    "3cbe65c4a77061796c6f6164c5013989aa6361706162696c697479a463686174ad6368756e6b735f736861323536c420"
    "0c6ba3897798db7765e2dd393b8defa08311b53a2404836f46ecceafd0e72998a6636c69656e74c426002408011220cd"
    "14b37f956e953194ff7fb73b3d81dcc561d61a7538094b7c3e1a643ee5f3aaac696e7075745f736861323536c420399a"
    "a5cc9ca7f5ed94c20c8381c09b787125f0a710649ab40e6c156980f4f445a6697373756564cb41d954fc40000000a56d"
    "6f64656ca674696e792d31ad6f75747075745f736861323536c42091a7c4361d8011d829f4c078be6ae62d529e3828cf"
    "234d3046e1e225bfa15ff0ad706172616d735f736861323536c4201917f37d8c3d0a588df53e14cd99ad9abb34e33c2a"
    "f91d7c3bd977962e5663ebaa726571756573745f6964c4105a5a5a5a000102030405060708090a0ba373657100a37369"
    "67c44043e3f8845919de251a1acdf81570eda7487fed3252e332eed6202d8e379f4c61daa7d172f17581862dd38bf386"
    "d2921a3ced0d550d10f9ef065a3ab7e2bbb204a474797065a772656365697074a5757361676583aa636f6d707574655f"
    "6d73cb4004000000000000ab696e7075745f627974657314ac6f75747075745f627974657304a376696190"
)

ERROR_FRAME = bytes.fromhex(
    "3e84a4636f6465aa6f7665726c6f61646564a46b696e64a56572726f72a76d657373616765ae616c6c20736c6f747320"
    "62757379a9726574727961626c65c3"
)

FORWARD_STATEMENT = bytes.fromhex(
    "87a6646f6d61696ea86d6f64656c6e6574a765787069726573cb41d95edf80000000a36b6579c42408011220dde3bcce"
    "c7f3a66a1115f45d720f4dc135c3ae7c4e22dca38fdb1efd6a495ff8a77061796c6f6164c4ab84a6636c69656e74c426"
    "002408011220cd14b37f956e953194ff7fb73b3d81dcc561d61a7538094b7c3e1a643ee5f3aaa46e657874c426002408"
    "0112204fd099ccd47d7893dfe9ec24414ecb0d9b5420232aad30d91c465be33cbe65c4ae726563656970745f73686132"
    "3536c4201f05574b3c5b715b469e0991ec81cedb71eee1442ea398e59c7c19455c4dd6d8aa726571756573745f6964c4"
    "105a5a5a5a000102030405060708090a0ba373657100a3736967c44047ef0bc943594f507a35eadf6a5250e0ed0057cb"
    "e9696c346383f372fc36d0c1e96c80909da828fb60fd4bcd56ac7df48833b0d761fa75f11e3e15d27d9bcc0da4747970"
    "65a7666f7277617264"
)


def request_frame() -> bytes:
    return ReasonClient(provider=PROVIDER.peer_id, client=CLIENT.peer_id).send_request(REQUEST)


def server_responding() -> ReasonServer:
    server = ReasonServer()
    server.receive_data(request_frame())
    assert server.next_event() == REQUEST
    return server


def receipt() -> bytes:
    return reason.make_receipt(
        PROVIDER,
        request=REQUEST,
        client=CLIENT.peer_id,
        model="tiny-1",
        output_bytes=reason.encode_output("four"),
        chunks_sha256=reason.chunks_digest(chunk.text for chunk in CHUNKS),
        now=NOW,
    )


def answer_frames() -> bytes:
    server = server_responding()
    data = b"".join(server.send(chunk) for chunk in CHUNKS)
    result = Result(output="four", model="tiny-1", usage=USAGE, receipt=receipt(), queue=1, capacity=8)
    return data + server.send(result)


def error_frame() -> bytes:
    return server_responding().send(Error(reason.OVERLOADED, "all slots busy", True))


def forward_statement() -> bytes:
    return forward.make_statement(
        FORWARDER, request_id=REQUEST_ID, client=CLIENT.peer_id, next=PROVIDER.peer_id, receipt=RECEIPT, now=NOW
    )


def client_awaiting_answer() -> ReasonClient:
    client = ReasonClient(provider=PROVIDER.peer_id, client=CLIENT.peer_id)
    assert client.send_request(REQUEST) == REQUEST_FRAME
    return client


def test_the_request_is_byte_exact():
    assert request_frame().hex() == REQUEST_FRAME.hex()


def test_the_server_accepts_the_request_vector():
    server = ReasonServer()
    server.receive_data(REQUEST_FRAME)
    assert server.next_event() == REQUEST


def test_the_receipt_is_byte_exact_and_opens():
    assert receipt().hex() == RECEIPT.hex()
    opened = reason.open_receipt(RECEIPT, provider=PROVIDER.peer_id, now=NOW)
    assert (opened.request_id, opened.capability, opened.model, opened.provider, opened.client, opened.issued) == (
        REQUEST_ID,
        "chat",
        "tiny-1",
        PROVIDER.peer_id,
        CLIENT.peer_id,
        NOW,
    )
    assert opened.output_sha256 == reason.output_digest("four")
    assert opened.params_sha256 == reason.params_digest(REQUEST.params)


def test_the_answer_is_byte_exact():
    assert answer_frames().hex() == ANSWER_FRAMES.hex()


def test_the_client_accepts_the_answer_vector_and_its_receipt():
    client = client_awaiting_answer()
    client.receive_data(ANSWER_FRAMES)
    assert [client.next_event(), client.next_event()] == list(CHUNKS)
    result = client.next_event()  # the receipt is checked against the request and chunks
    assert result == Result(output="four", model="tiny-1", usage=USAGE, receipt=RECEIPT, queue=1, capacity=8)
    assert client.answered_by == PROVIDER.peer_id and client.state == reason.DONE


def test_the_error_is_byte_exact_and_accepted():
    assert error_frame().hex() == ERROR_FRAME.hex()
    client = client_awaiting_answer()
    client.receive_data(ERROR_FRAME)
    assert client.next_event() == Error(reason.OVERLOADED, "all slots busy", True)


def test_the_forward_statement_is_byte_exact_and_opens():
    assert forward_statement().hex() == FORWARD_STATEMENT.hex()
    statement = forward.open_statement(FORWARD_STATEMENT, forwarder=FORWARDER.peer_id)
    digest = hashlib.sha256(RECEIPT).digest()
    assert statement == forward.Statement(REQUEST_ID, FORWARDER.peer_id, CLIENT.peer_id, PROVIDER.peer_id, digest)
