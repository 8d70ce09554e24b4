"""Stdlib baselines for the /healthz row, run as their own process.

Usage: python -m bench.baselines default|tuned PORT_FILE

(a) default: ThreadingHTTPServer as the stdlib does it (HTTP/1.1 keep-alive, headers and body
    written separately, Nagle on), answering the same JSON.
(b) tuned: the same with TCP_NODELAY and the whole response in one write.
"""

import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = json.dumps({"status": "ok", "mode": "dev-shim", "env": "local"}).encode()


class Default(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


class Tuned(Default):
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self):
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(BODY)}\r\n\r\n").encode()
        self.wfile.write(head + BODY)


def main() -> None:
    kind, port_file = sys.argv[1], sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Tuned if kind == "tuned" else Default)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # wrk resets connections at the end
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
