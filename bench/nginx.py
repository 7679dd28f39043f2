"""nginx as a peer, when its binary is installed: what a C reverse proxy costs on the same path.

One process (`master_process off`) pinned like the relay, so its CPU is the relay's to compare with;
keep-alive to the upstream, no buffering either way (streams pass as they come), the upstream key set
like the relay sets it. Nothing is installed for it: without the binary the peer is skipped.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bench.procs import Proc, Processes

_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
error_log stderr warn;
pid {work}/nginx.pid;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 512;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer sk-bench-upstream";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def find(explicit: str | None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)


def start(procs: Processes, binary: str, work: Path, port: int, upstream_port: int, cpus: frozenset[int]) -> Proc:
    conf = work / "nginx.conf"
    conf.write_text(_CONFIG.format(work=work, port=port, upstream_port=upstream_port))
    # -e: before reading its config nginx would open the packaged error log, which may not exist or be ours.
    argv = [binary, "-p", str(work), "-e", "stderr", "-c", str(conf)]
    return procs.start("nginx", argv, cpus)


def version(binary: str) -> str:
    import subprocess

    probe = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    text = (probe.stderr or probe.stdout).strip()
    return text.split(":", 1)[-1].strip() or "nginx"


if __name__ == "__main__":
    print(find(sys.argv[1] if len(sys.argv) > 1 else None))
