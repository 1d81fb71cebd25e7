"""Find, start and stop a real Triton Inference Server over a model repository (``edgehebb serve``).

Which server: the ``tritonserver`` on ``PATH`` where a full Triton install exists (NVIDIA's
containers, a GPU server), else the one inside the ``nvidia-pytriton`` wheel, found with
``importlib.util.find_spec`` without importing it (``pip install --no-deps nvidia-pytriton==0.7.0``:
its numpy<2 pin conflicts with OpenCV 5, and the binary needs none of its Python dependencies).
That wheel carries Triton 2.51 with the python backend only, so it serves repositories written with
``--triton-backend python``; one that names the onnxruntime backend is refused before it starts.

What it takes to start the wheel's binary (``../shared/NOTES-triton.md``): a backend folder of our
own with links to its python backend and to the stub built for the running Python; ``PATH`` with
this interpreter's ``bin`` first, so that the stub's embedded Python sees this environment
(numpy, onnxruntime); ``LD_LIBRARY_PATH`` with this interpreter's ``LIBDIR``, so that it links the
libpython of this very Python.

:class:`TritonServer` binds to ``127.0.0.1`` by default and to free ports unless given ports. It
waits (bounded) until every model is ready, and :meth:`TritonServer.stop` ends the server by its
own PID (SIGTERM, then SIGKILL after a bounded wait), then any python-backend stub it left by
their own PIDs, and removes the shared-memory files of this server, whose names carry a prefix
unique to it. Linux only, as Triton is.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgehebb.errors import EdgehebbError

WHEEL = "nvidia-pytriton==0.7.0"
INSTALL = f"pip install --no-deps {WHEEL}"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"   # the python backend's own default prefix
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 5          # --exit-timeout-secs: how long the server waits for in-flight requests when stopped
_PORT_IN_USE = re.compile(r"address already in use|failed to (start|bind)|Socket '.*' already in use", re.I)


class Interrupted(EdgehebbError):
    """:meth:`TritonServer.start` was asked to give up (a signal while waiting for the server)."""


@dataclass(frozen=True)
class ServerBinary:
    """A ``tritonserver`` executable; for the wheel's, the files our backend folder links to."""

    path: Path
    source: str                       # "PATH" or "nvidia-pytriton"
    python_backend: Path | None = None   # the wheel's backends/python folder
    stub: Path | None = None             # the stub for the running Python

    def describe(self) -> str:
        return f"{self.path} ({'a full install on PATH' if self.source == 'PATH' else 'the nvidia-pytriton wheel'})"


def find_server(which=shutil.which) -> ServerBinary:
    """The server ``edgehebb serve`` runs, or one line saying what to install."""
    found = which("tritonserver")
    if found:
        return ServerBinary(Path(found), "PATH")
    import importlib.util

    spec = importlib.util.find_spec("pytriton")   # finds the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EdgehebbError(f"no Triton Inference Server found: no tritonserver on PATH and no nvidia-pytriton; "
                            f"install a full Triton, or for the python backend on this machine: {INSTALL}")
    root = Path(locations[0]) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    backend = root / "backends" / "python"
    if not binary.is_file() or not (backend / "libtriton_python.so").is_file():
        raise EdgehebbError(f"nvidia-pytriton at {locations[0]} holds no tritonserver binary with the python "
                            f"backend; reinstall it: {INSTALL}")
    if not stub.is_file():
        raise EdgehebbError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub} is missing); "
                            f"run edgehebb with Python 3.8 to 3.13")
    return ServerBinary(binary, "nvidia-pytriton", backend, stub)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (bind to port 0, read it back, close): the server binds it next."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers bind: a closing socket is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def repository_backends(repo: Path) -> dict[str, str]:
    """{model name: backend or platform} named by each ``REPO/<model>/config.pbtxt``."""
    found = {}
    for config in sorted(repo.glob("*/config.pbtxt")):
        if config.parent.name.startswith("."):
            continue
        text = re.sub(r"#.*", "", config.read_text(errors="replace"))
        m = re.search(r'^\s*(?:backend|platform)\s*:\s*"([^"]*)"', text, re.M)
        found[config.parent.name] = m[1] if m else "?"
    return found


def _proc_start(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): with the PID, who it is; None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if fields[0] != "Z" else None   # a zombie has finished


def child_processes(pid: int) -> list[tuple[int, str]]:
    """(PID, start time) of each live child of ``pid`` (a server's python-backend stubs)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append((int(entry.name), fields[19]))
    return out


class TritonServer:
    """One ``tritonserver`` process over ``repo``; see the module doc. Use as a context manager, or
    :meth:`start` then :meth:`stop` (which is safe to call more than once)."""

    def __init__(self, repo: str | os.PathLike, *, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 host: str = "127.0.0.1", log_path: str | os.PathLike | None = None,
                 binary: ServerBinary | None = None):
        self.repo = Path(repo).expanduser().resolve()
        if not self.repo.is_dir():
            raise EdgehebbError(f"Triton repository {repo} is not a folder")
        self.models = repository_backends(self.repo)
        if not self.models:
            raise EdgehebbError(f"{repo} holds no Triton model (no <name>/config.pbtxt); write one with "
                                f"`edgehebb export MODEL --triton {repo} --triton-backend python`")
        for port in (http_port, grpc_port, metrics_port):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise EdgehebbError(f"a port must be 0 (any free one) to 65535, got {port!r}")
        self.binary = binary or find_server()
        if self.binary.source == "nvidia-pytriton":
            others = {m: b for m, b in self.models.items() if b != "python"}
            if others:
                raise EdgehebbError(f"the nvidia-pytriton server has only the python backend, and {repo} asks for "
                                    f"{', '.join(f'{b!r} ({m})' for m, b in others.items())}: write the repository "
                                    f"with --triton-backend python, or run a full Triton install")
        self.host, self.wanted = host, (http_port, grpc_port, metrics_port)
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.log_path = Path(log_path) if log_path is not None else None
        self.shm_prefix = f"{SHM_PREFIX}edgehebb_{os.getpid()}_{secrets.token_hex(4)}_"
        self.process: subprocess.Popen | None = None
        self._tmp: Path | None = None
        self._stubs: set[tuple[int, str]] = set()

    # ------------------------------------------------------------------ start

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def endpoints(self) -> dict[str, str]:
        local = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return {"http": f"{local}:{self.http_port}", "grpc": f"{local}:{self.grpc_port}",
                "metrics": f"http://{local}:{self.metrics_port}/metrics"}

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.binary.source != "nvidia-pytriton":
            return env   # a full install's stub runs its own Python
        if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
            raise EdgehebbError(f"{sys.executable} has no shared libpython, which the python backend stub links "
                                f"against; use a Python built with --enable-shared")
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        return env

    def _command(self, backends: Path | None) -> list[str]:
        cmd = [str(self.binary.path), "--model-repository", str(self.repo),
               "--http-address", self.host, "--http-port", str(self.http_port),
               "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
               "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
               "--exit-timeout-secs", str(EXIT_TIMEOUT_S),
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        if backends is not None:
            cmd += ["--backend-directory", str(backends)]
        return cmd

    def _backend_folder(self) -> Path | None:
        if self.binary.source != "nvidia-pytriton":
            return None
        folder = self._tmp / "backends" / "python"
        folder.mkdir(parents=True)
        for src in (self.binary.python_backend / "libtriton_python.so",
                    self.binary.python_backend / "triton_python_backend_utils.py", self.binary.stub):
            (folder / src.name).symlink_to(src)
        return folder.parent

    def start(self, timeout: float = READY_TIMEOUT_S, abort=None) -> "TritonServer":
        """Start the server and wait, at most ``timeout`` seconds, until it is ready; on failure it is stopped
        and one line says why (with the end of its log). ``abort``: a function polled while waiting; when it
        returns true the server is stopped and :class:`Interrupted` raised."""
        if self.process is not None:
            raise EdgehebbError("this Triton server has already been started")
        env = self._environment()
        for what, port in zip(("http", "grpc", "metrics"), self.wanted):
            if port and not port_is_free(self.host, port):
                raise EdgehebbError(f"{self.host}:{port} is already in use (another server?): choose another "
                                    f"--{what}-port, or 0 for any free one")
        self._tmp = Path(tempfile.mkdtemp(prefix="edgehebb-triton-"))
        try:
            backends = self._backend_folder()
            deadline = time.monotonic() + timeout
            for attempt in range(3):   # a free port can be taken between our probe and the server's bind
                self.http_port, self.grpc_port, self.metrics_port = (p or free_port(self.host) for p in self.wanted)
                log = self.log_path or self._tmp / "tritonserver.log"
                with open(log, "ab") as out:
                    self.process = subprocess.Popen(self._command(backends), stdin=subprocess.DEVNULL, stdout=out,
                                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
                problem = self._wait_ready(deadline, abort)
                if problem == "interrupted":
                    raise Interrupted("interrupted while the Triton server was starting")
                if problem is None:
                    self._stubs |= set(child_processes(self.process.pid))
                    return self
                tail, errors = self.log_tail(), self.log_errors()
                self._terminate()
                if not (_PORT_IN_USE.search(tail) and attempt < 2):   # only auto-chosen ports can be taken now
                    raise EdgehebbError(f"Triton did not start ({problem}): {errors}")
            raise AssertionError("unreachable")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float, abort=None) -> str | None:
        url = f"http://{self.endpoints['http']}/v2/health/ready"
        while True:
            if abort is not None and abort():
                return "interrupted"
            code = self.process.poll()
            if code is not None:
                return f"tritonserver exited with status {code}"
            self._stubs |= set(child_processes(self.process.pid))   # a stub outlives a server that fails later
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    if r.status == 200:
                        return None
            except (urllib.error.URLError, OSError):
                pass   # not listening yet (refused, reset, timed out): ask again below until the deadline
            if time.monotonic() > deadline:
                return "not ready in time"
            time.sleep(0.1)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log (its last ``chars`` characters)."""
        log = self.log_path or (self._tmp / "tritonserver.log" if self._tmp else None)
        try:
            return log.read_text(errors="replace")[-chars:] if log else ""
        except OSError:
            return ""

    def log_errors(self, most: int = 3) -> str:
        """The last ``most`` error lines of the log (else its last lines), joined into one line; CUDA/NVML
        complaints, noise on a machine without a GPU, left out."""
        lines = [line.strip() for line in self.log_tail(20_000).splitlines() if line.strip()]
        noise = re.compile(r"cuda|nvml|dcgm|gpu metrics|pinned memory", re.I)
        errors = [line for line in lines if re.match(r"E\d{4} ", line) and not noise.search(line)]
        return " | ".join((errors or lines)[-most:])[-1500:] or "(empty log)"

    def get(self, path: str) -> object:
        """GET (or POST with an empty body for ``/v2/repository/index``) on the HTTP endpoint, as JSON."""
        data = b"" if path.endswith("/index") else None
        with urllib.request.urlopen(urllib.request.Request(f"http://{self.endpoints['http']}{path}", data=data),
                                    timeout=5.0) as r:
            return json.loads(r.read() or b"null")

    def describe(self) -> dict:
        """Server version, binary, PID, endpoints and the models with their state, once ready."""
        info = self.get("/v2")
        index = self.get("/v2/repository/index")
        return {"server": f"{info.get('name', 'triton')} {info.get('version', '?')}", "binary": self.binary.describe(),
                "pid": self.pid, "repository": str(self.repo), **self.endpoints, "shm_prefix": self.shm_prefix,
                "models": [{k: m.get(k) for k in ("name", "version", "state")} for m in index]}

    def alive(self) -> bool:
        """True while the server runs; notes the stubs it started since the last look (a model reloaded),
        so that :meth:`stop` can end them even if the server dies first."""
        if self.process is None or self.process.poll() is not None:
            return False
        self._stubs |= set(child_processes(self.process.pid))
        return True

    # ------------------------------------------------------------------ stop

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> dict:
        """Stop the server and what it left; returns ``{"exit_code", "killed", "stubs_killed", "shm_removed"}``."""
        report = self._terminate(timeout)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return report

    def _terminate(self, timeout: float = STOP_TIMEOUT_S) -> dict:
        report = {"exit_code": None, "killed": False, "stubs_killed": [], "shm_removed": []}
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                self._stubs |= set(child_processes(proc.pid))
                proc.send_signal(signal.SIGTERM)   # Triton unloads its models, stops its stubs and exits
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    report["killed"] = True
                    proc.kill()
                    proc.wait(10)
            report["exit_code"] = proc.returncode
        report["stubs_killed"] = self._end_stubs()
        for f in sorted(SHM_DIR.glob(self.shm_prefix + "*")):
            f.unlink(missing_ok=True)
            report["shm_removed"].append(f.name)
        return report

    def _end_stubs(self) -> list[int]:
        """Stubs that outlived their server (they watch it and exit within a second or so) end by their PIDs."""
        killed = []
        deadline = time.monotonic() + 5.0
        for pid, start in sorted(self._stubs):
            while _proc_start(pid) == start and time.monotonic() < deadline:
                time.sleep(0.05)
            if _proc_start(pid) == start:   # the same process, still there
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        self._stubs.clear()
        return killed

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TritonServer({str(self.repo)!r}, pid={self.pid}, http={self.http_port}, grpc={self.grpc_port})"
