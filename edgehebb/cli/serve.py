"""``edgehebb serve``: a real Triton Inference Server over a model repository, on this machine.

Registered in ``cli/__init__.py``. Only click and the standard library at module level; the server
logic is :mod:`edgehebb.deploy.triton_server`.
"""

from __future__ import annotations

import json
import signal
import threading

import click

from edgehebb.errors import EdgehebbError

# Triton's own default ports; 0 picks any free one
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
POLL_S = 0.5   # how often the foreground loop checks that the server still runs


@click.command("serve")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.option("--http-port", type=click.IntRange(0, 65535), default=PORTS["http"], help="HTTP/REST port (0: any free one).")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=PORTS["grpc"], help="gRPC port (0: any free one).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=PORTS["metrics"],
              help="Prometheus metrics port (0: any free one).")
@click.option("--host", default="127.0.0.1",
              help="Address the server listens on (0.0.0.0: every interface, e.g. behind a load balancer).")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=60.0,
              help="Seconds to wait for every model to be ready before giving up.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
              help="Append the server's own log to this file [default: a temporary file, removed when the server "
                   "stops; its error lines are shown if it fails].")
@click.option("--json", "as_json", is_flag=True, help="Print the endpoints as one JSON line on stdout when ready.")
def serve(repo, http_port, grpc_port, metrics_port, host, ready_timeout, log_path, as_json):
    """Start a Triton Inference Server over REPO (written by `edgehebb export MODEL --triton REPO`).

    Runs the tritonserver on PATH where a full Triton is installed, else the one in the nvidia-pytriton
    wheel (pip install --no-deps nvidia-pytriton==0.7.0; python backend only: export with
    --triton-backend python). Prints the endpoints when every model is ready; Ctrl-C or SIGTERM stops the
    server and removes what it left (stub processes, shared-memory files), then exits 0.
    """
    from edgehebb.deploy.triton_server import Interrupted, TritonServer

    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, host=host,
                          log_path=log_path)
    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum, _frame):
        caught.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start(timeout=ready_timeout, abort=stop.is_set)
        except Interrupted:
            return
        info = server.describe()
        if as_json:
            click.echo(json.dumps(info))
        else:
            models = ", ".join(f"{m['name']} (version {m['version']}, {m['state']})" for m in info["models"])
            click.echo(f"{info['server']} ready: {info['binary']}, pid {info['pid']}, repository {info['repository']}\n"
                       f"  models   {models}\n"
                       f"  HTTP     {info['http']}\n"
                       f"  gRPC     {info['grpc']}\n"
                       f"  metrics  {info['metrics']}\n"
                       f"Ctrl-C or SIGTERM stops it.")
        while not stop.wait(POLL_S):
            if not server.alive():
                raise EdgehebbError(f"the Triton server stopped by itself: {server.log_errors()}")
    finally:
        report = server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            name = signal.Signals(caught[0]).name
            left = f"; killed stubs {report['stubs_killed']}" if report["stubs_killed"] else ""
            click.echo(f"{name}: stopped the Triton server (exit status {report['exit_code']}){left}", err=True)
