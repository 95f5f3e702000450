"""A real HTTP server on 127.0.0.1 (a free port) that records the POSTs it receives, for alert and heartbeat tests.

    with webhook_server() as server:        # delay_s=10: each request answers after 10 s
        url = server.url("/hook/secret")
        ...
        server.posts("/hook/secret")         # [Post(path, headers, body)] in arrival order
"""
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The scheduler variables that change an alert's title (internlm/monitor/utils.py: get_job_key); tests that check
# titles run without them.
JOB_ENV = ("SLURM_JOB_ID", "KUBERNETES_POD_NAME", "MLP_TASK_INSTANCE_ID", "MLP_TASK_ID", "JOB_NAME")


@dataclass(frozen=True)
class Post:
    path: str
    headers: dict
    body: dict


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay_s: float, answer: dict):
        self.delay_s = delay_s
        self.answer = json.dumps(answer).encode()
        self.received: list[Post] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def posts(self, path: str | None = None) -> list[Post]:
        with self.lock:
            return [post for post in self.received if path is None or post.path == path]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.received.append(Post(self.path, dict(self.headers), json.loads(body.decode("utf-8"))))
        time.sleep(self.server.delay_s)
        answer = self.server.answer
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        except OSError:  # the client gave up waiting (a slow-endpoint test)
            pass

    def log_message(self, *args):  # keep the test output clean
        pass


@contextmanager
def webhook_server(delay_s: float = 0.0, answer: dict | None = None):
    """`answer`: the JSON body of every reply (default: Feishu's success)."""
    server = _Recorder(delay_s, answer or {"code": 0, "msg": "success"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
