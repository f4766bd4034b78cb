"""A reverse proxy in front of the real MLflow server that can fail like a real network does.

Not a mock of MLflow: every request that goes through reaches the real server. The proxy
only decides, per request, whether the client gets the answer:

- ``down``: refuse everything (the server is unreachable);
- ``refuse_next(path_part)``: refuse the next request whose path contains ``path_part``
  (the server is down when the client first calls);
- ``drop_after(path_part)``: forward the first request whose path contains ``path_part``,
  let the server commit it, then cut the connection before the client sees the answer
  (what a crash or a proxy timeout after the write looks like).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FlakyProxy:
    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.down = False
        self._drop: str | None = None
        self._refuse: str | None = None
        self.dropped: list[str] = []
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep the test log readable
                pass

            def _forward(self) -> None:
                if proxy._refuse and proxy._refuse in self.path:
                    proxy._refuse = None
                    proxy.refused += 1
                    self.close_connection = True
                    self.connection.close()
                    return
                if proxy.down:
                    proxy.refused += 1
                    self.close_connection = True
                    self.connection.close()
                    return
                body = self._body()
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length")
                }
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                conn.close()
                if proxy._drop and proxy._drop in self.path:
                    proxy._drop = None
                    proxy.dropped.append(self.path)
                    self.close_connection = True
                    self.connection.close()  # the server committed; the client never hears of it
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def refuse_next(self, path_part: str) -> None:
        self._refuse = path_part

    def drop_after(self, path_part: str) -> None:
        self._drop = path_part

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
