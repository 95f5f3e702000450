"""Endpoints that are not a working S3 server, on 127.0.0.1, for the storage tests: one that accepts connections and
never answers (a hung proxy or server), and an HTTP server that answers every request with 404 (a web server or a
wrong path where S3 was expected), with an empty body or an HTML page."""
import abc
import http.server
import socket
import threading


class _Endpoint(abc.ABC):
    """Serves on a thread of its own from the start of a `with` block to its end."""
    _thread: threading.Thread

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop()
        self._thread.join(timeout=5)

    @abc.abstractmethod
    def _stop(self) -> None:
        """Make the serving thread return."""


class StallingEndpoint(_Endpoint):
    """Accepts every connection and never answers. With `answer_head`, a HEAD request is answered as S3 answers it for
    a 10-byte object (so a download gets past its size check and stalls on the GET). Use as a context manager."""

    def __init__(self, answer_head: bool = False):
        self.answer_head = answer_head
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self.accepted = 0

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:  # the listener was closed
                return
            self.accepted += 1
            self._connections.append(connection)  # kept open
            if self.answer_head:
                threading.Thread(target=self._answer_heads, args=(connection,), daemon=True).start()

    def _answer_heads(self, connection: socket.socket) -> None:
        """Answer each HEAD on this connection; go silent at the first other request."""
        pending = b""
        try:
            while True:
                while b"\r\n\r\n" not in pending:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    pending += chunk
                request, _, pending = pending.partition(b"\r\n\r\n")
                if not request.startswith(b"HEAD "):
                    return  # silence from here on
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nETag: \"0123\"\r\n"
                                   b"Last-Modified: Thu, 01 Jan 2026 00:00:00 GMT\r\nContent-Type: binary/octet-stream"
                                   b"\r\n\r\n")
        except OSError:  # closed at exit
            return

    def _stop(self) -> None:
        self._closed.set()
        self._listener.close()
        for connection in self._connections:
            connection.close()


class NotFoundEndpoint(_Endpoint):
    """An HTTP server that answers every request with 404 and `body` (empty: a bare 404; else an HTML page), as a
    plain web server or reverse proxy does for a path it does not serve. Use as a context manager."""

    def __init__(self, body: bytes = b""):
        class Handler(http.server.BaseHTTPRequestHandler):
            def _not_found(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(404)
                if body:
                    self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _not_found

            def log_message(self, *args):  # no line on stderr per request
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
