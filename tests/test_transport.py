"""The providers' lean HTTP/1.1 transport, over real sockets: framing, keep-alive, TLS, timeouts."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.providers import ChatRequest, ProviderError
from app.providers.errors import sdk_http
from app.providers.openai_provider import OpenAIProvider
from app.providers.transport import LeanTransport, lean_client
from tests.fake_upstream import FakeUpstream

REQUEST = ChatRequest("gpt-fake", [{"role": "user", "content": "hello there"}])


class RawServer:
    """A TCP (or TLS) server answering each request with the next canned reply, as given.

    A reply is a list of byte pieces, sent with a short pause between them (so the client
    reads them separately); a None piece closes the connection, and so does None in place
    of a reply (unanswered).
    Every request is recorded whole (head and body, as received), and every connection.
    """

    def __init__(
        self, replies: list[list[bytes | None] | None], tls: ssl.SSLContext | None = None
    ) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/v1") -> str:
        return f"{'https' if self.tls else 'http'}://localhost:{self.port}{path}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.tls:
                sock = self.tls.wrap_socket(sock, server_side=True)
            reader = sock.makefile("rb")
            while True:  # an idle connection stays open
                request = _read_request(reader)
                if request is None or not self.replies:
                    return
                self.requests.append(request)
                reply = self.replies.pop(0)
                if reply is None:
                    return
                for i, piece in enumerate(reply):
                    if piece is None:
                        return
                    if i:
                        time.sleep(0.02)
                    sock.sendall(piece)
        except (OSError, ssl.SSLError):
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self.listener.close()


def _read_request(reader: Any) -> bytes | None:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        if not line:
            return None
        head += line
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size_line = reader.readline()
            body += size_line
            size = int(size_line.strip(), 16)
            body += reader.read(size + 2)
            if not size:
                return head + body
    length = 0
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + reader.read(length)


def response(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


@pytest.fixture()
def client() -> Iterator[Any]:
    http = sdk_http.Client(transport=LeanTransport(), timeout=5.0)
    yield http
    http.close()


def test_sdk_clients_use_the_lean_transport_unless_a_proxy_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "localhost")
    sdk = OpenAIProvider(api_key="sk-x", base_url="http://127.0.0.1:9/v1")._get_client()
    assert isinstance(sdk._client._transport, LeanTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert lean_client(10.0) is None  # the SDK's default client then reads the proxy itself
    sdk = OpenAIProvider(api_key="sk-x", base_url="http://127.0.0.1:9/v1")._get_client()
    assert not isinstance(sdk._client._transport, LeanTransport)


def test_keep_alive_reuses_one_connection_for_calls_and_streams() -> None:
    with FakeUpstream() as upstream:
        provider = OpenAIProvider(api_key="sk-x", base_url=upstream.openai_base_url)
        assert provider.complete(REQUEST).text
        transport = provider._get_client()._client._transport
        (first,) = [c.sock for conns in transport._idle.values() for c in conns]
        assert "".join(c["delta"].get("content", "") for c in provider.stream(REQUEST))
        assert provider.complete(REQUEST).text
        assert [c.sock for conns in transport._idle.values() for c in conns] == [first]


def test_bodies_framed_by_length_chunks_and_close_split_across_reads(client: Any) -> None:
    chunked = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"lo\r\n",
        b"1;ext=1\r\n \r\n",
        b"5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n",
    ]
    until_close = [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the", b" end", None]
    sized = response(b"sized body", b"X-A: 1")
    server = RawServer(
        [[b"HTTP/1.1 100 Continue\r\n\r\n", sized[:30], sized[30:]], until_close, chunked]
    )
    first = client.get(server.url("/a?q=1"))
    assert (first.status_code, first.content, first.headers["x-a"]) == (200, b"sized body", "1")
    assert client.get(server.url("/b")).content == b"to the end"
    assert client.get(server.url("/c")).content == b"hello world"
    assert server.connections == 2  # "Connection: close" was not reused
    assert server.requests[0].startswith(b"GET /a?q=1 HTTP/1.1\r\n")
    assert b"\r\nhost: localhost:%d\r\n" % server.port in server.requests[0].lower()


def test_request_bodies_sized_and_streamed_chunked(client: Any) -> None:
    server = RawServer([[response(b"ok")], [response(b"ok")]])
    assert client.post(server.url("/json"), content=b'{"a": 1}').content == b"ok"
    streamed = client.post(server.url("/up"), content=iter([b"abc", b"", b"defg"]))
    assert streamed.content == b"ok"
    assert b"\r\ncontent-length: 8\r\n" in server.requests[0].lower()
    assert server.requests[0].endswith(b'\r\n\r\n{"a": 1}')
    assert server.requests[1].endswith(b"\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    assert server.connections == 1


def test_no_body_statuses_and_head(client: Any) -> None:
    server = RawServer(
        [
            [b"HTTP/1.1 204 No Content\r\n\r\n"],
            [b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"],
            [response(b"after")],
        ]
    )
    assert client.delete(server.url("/x")).content == b""
    assert client.head(server.url("/x")).headers["content-length"] == "99"
    assert client.get(server.url("/x")).content == b"after"
    assert server.connections == 1


def test_a_connection_the_server_closed_while_idle_is_not_reused(client: Any) -> None:
    server = RawServer([[response(b"one"), None]])  # answers, then closes the connection
    assert client.get(server.url("/1")).content == b"one"
    time.sleep(0.1)  # the server has closed the idle connection by now
    server.replies.append([response(b"two")])
    assert client.get(server.url("/2")).content == b"two"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (
            [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", None],
            sdk_http.RemoteProtocolError,
        ),
        (
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None],
            sdk_http.RemoteProtocolError,
        ),
        ([b"NOT HTTP\r\n\r\n"], sdk_http.RemoteProtocolError),
        (None, sdk_http.RemoteProtocolError),
    ],
    ids=["short-body", "bad-chunk", "bad-status", "no-response"],
)
def test_broken_responses_raise_httpx_errors(client: Any, reply: Any, error: type) -> None:
    server = RawServer([reply])
    with pytest.raises(error):
        client.get(server.url("/"))


def test_timeouts_and_refused_connections_map_as_the_sdk_expects() -> None:
    server = RawServer([[b"HTTP/1.1 200 OK\r\n"]])  # a head that never ends
    provider = OpenAIProvider(api_key="sk-x", base_url=server.url(), timeout=0.3)
    with pytest.raises(ProviderError) as info:
        provider.complete(REQUEST)
    assert info.value.retryable and info.value.code == "upstream_timeout"
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    provider = OpenAIProvider(api_key="sk-x", base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(ProviderError) as info:
        provider.complete(REQUEST)
    assert info.value.retryable and info.value.code == "upstream_connection_error"


def test_a_streams_socket_is_exposed_only_while_the_response_owns_it(client: Any) -> None:
    server = RawServer([[response(b"body")]])
    with client.stream("GET", server.url("/")) as streamed:
        stream = streamed.extensions["network_stream"]
        assert isinstance(stream.get_extra_info("socket"), socket.socket)
        streamed.read()
    assert stream.get_extra_info("socket") is None  # back in the pool: not ours to shut


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def sse(*events: bytes, end: bool = True) -> list[bytes]:
    """A chunked event-stream reply, one chunk per event (and the last chunk, if `end`)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    pieces = [head + b"Transfer-Encoding: chunked\r\n\r\n"]
    pieces += [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
    return [*pieces, b"0\r\n\r\n"] if end else pieces


def openai_chunk(text: str, finish: str | None = None) -> bytes:
    reason = f'"{finish}"' if finish else "null"
    delta = f'{{"content":"{text}"}}' if text else "{}"
    return (
        f'data: {{"choices":[{{"index":0,"delta":{delta},"finish_reason":{reason}}}]}}\n\n'.encode()
    )


def test_tls_calls_and_streams_verified_against_ssl_cert_file(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    body = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"secure"}}]}'
    stream = sse(
        openai_chunk("a"), openai_chunk("b"), openai_chunk("", "stop"), b"data: [DONE]\n\n"
    )
    server = RawServer([[response(body)], stream], tls=tls)

    untrusted = OpenAIProvider(api_key="sk-x", base_url=server.url())
    with pytest.raises(ProviderError) as info:  # the default trust store does not know it
        untrusted.complete(REQUEST)
    assert info.value.code == "upstream_connection_error"

    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    provider = OpenAIProvider(api_key="sk-x", base_url=server.url())
    assert provider.complete(REQUEST).text == "secure"
    assert [c["delta"].get("content") for c in provider.stream(REQUEST)] == ["a", "b", None]
    assert server.connections == 2  # the failed handshake, then one kept-alive connection
    assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


def test_close_from_another_thread_over_tls(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = RawServer([sse(openai_chunk("first"), end=False)], tls=tls)  # then silence
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    provider = OpenAIProvider(api_key="sk-x", base_url=server.url())
    stream = provider.stream(REQUEST)
    seen: list[Any] = []
    reader = threading.Thread(target=lambda: seen.extend(stream), daemon=True)
    reader.start()
    time.sleep(0.3)
    assert reader.is_alive() and [c["delta"]["content"] for c in seen] == ["first"]
    stream.close()
    reader.join(2)
    assert not reader.is_alive()
