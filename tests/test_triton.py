"""Triton Inference Server: repositories written by ``edgehebb export --triton``, checked as configuration, and a
real server over the python-backend repository of the shipped model (``edgehebb serve``), checked as a client sees it.

The server is the ``tritonserver`` 2.51 of the nvidia-pytriton wheel (python backend only), which the README's
test command installs (``pip install --no-deps nvidia-pytriton==0.7.0``); the client is tritonclient (``test``
extra). Both are needed: these tests fail, not skip, without them. The onnxruntime-backend repository cannot be
served here (no onnxruntime backend, no GPU): it is checked as configuration, and the real server is shown to
read it up to the backend it lacks.

Everything talks to 127.0.0.1 on free ports; every wait is bounded; every server is stopped by its own PID.
The served outputs are compared with ``Runtime`` on the same ONNX file (OP_SPEC's parity metric): the python
backend's stub once returned wrong numbers without an error (../shared/NOTES-triton.md).
"""

from __future__ import annotations

import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgehebb.cli.export import TRITON_MAX_BATCH, TRITON_PREFERRED, TRITON_QUEUE_DELAY_US, export
from edgehebb.deploy import op
from edgehebb.deploy import triton_repo
from edgehebb.deploy.triton_repo import write_repository
from edgehebb.deploy.triton_server import SHM_DIR, ServerBinary, TritonServer, child_processes, find_server
from edgehebb.errors import EdgehebbError
from tests.conftest import assert_close

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fig2_left-cifar10"
CLIENTS = 8             # concurrent client threads
REQUESTS = 8            # requests per client
WAIT_S = 60             # the longest any wait below may take

if not (sys.platform == "linux" and platform.machine() == "x86_64"):
    pytest.skip("the nvidia-pytriton wheel's tritonserver exists for Linux x86_64 only", allow_module_level=True)


def clients():
    """tritonclient's HTTP and gRPC modules (the ``test`` and ``serve`` extras install them)."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    return {"http": http, "grpc": grpc}


def model_config_pb2():
    from tritonclient.grpc import model_config_pb2 as pb2

    return pb2


def parse_config(path: Path):
    """config.pbtxt parsed against Triton's own ModelConfig schema (shipped in tritonclient)."""
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2().ModelConfig())


def declared(onnx_path: Path) -> dict[str, tuple[str, list]]:
    """{tensor: (Triton type, dims without the batch)} as the ONNX file declares them, read with onnx alone."""
    names = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}
    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for v in [*model.graph.input, *model.graph.output]:
        t = v.type.tensor_type
        out[v.name] = (names[t.elem_type], [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:])
    return out


def frames_for(client: int, request: int) -> np.ndarray:
    """A request's uint8 frames: one frame mostly, two every fourth; client 7 sends 48x64 frames (resized in the graph)."""
    rng = np.random.default_rng(1000 * client + request)
    n = 2 if request % 4 == 3 else 1
    h, w = (48, 64) if client == 7 else (32, 32)
    yy, xx = np.mgrid[0:h, 0:w]
    wave = np.sin(rng.uniform(0.1, 0.6) * (np.cos(a := rng.uniform(0, 3.1)) * xx + np.sin(a) * yy))
    base = 128 + 90 * wave[None, ..., None] * rng.uniform(0.2, 1.0, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 20, (n, h, w, 3)), 0, 255).astype(np.uint8)


def connect(module, url: str):
    """A client whose every call ends within WAIT_S."""
    if module.__name__.endswith("http"):
        return module.InferenceServerClient(url, connection_timeout=WAIT_S, network_timeout=WAIT_S)
    return module.InferenceServerClient(url)


def infer(module, url: str, frames: np.ndarray, outputs=("logits", "probabilities", "features"), **kw) -> dict:
    client = connect(module, url)
    try:
        x = module.InferInput("frames", list(frames.shape), "UINT8")
        x.set_data_from_numpy(frames)
        timeout = {} if module.__name__.endswith("http") else {"client_timeout": WAIT_S}
        result = client.infer(MODEL, [x], outputs=[module.InferRequestedOutput(o, **kw) for o in outputs], **timeout)
        return {o: np.array(result.as_numpy(o)) for o in outputs}   # a writable copy
    finally:
        client.close()


def stats(module, url: str) -> dict:
    client = connect(module, url)
    try:
        s = client.get_inference_statistics(MODEL, as_json=True) if "grpc" in module.__name__ else \
            client.get_inference_statistics(MODEL)
    finally:
        client.close()
    model = s["model_stats"][0]
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model.get("batch_stats", [])}
    return {"inferences": int(model.get("inference_count", 0)), "executions": int(model.get("execution_count", 0)),
            "batches": batches}


def assert_nothing_left(pid: int, stubs: list[tuple[int, str]], shm_prefix: str) -> None:
    from edgehebb.deploy.triton_server import _proc_start

    assert _proc_start(pid) is None, f"tritonserver {pid} still runs"
    alive = [p for p, start in stubs if _proc_start(p) == start]
    assert not alive, f"python backend stubs still run: {alive}"
    left = sorted(f.name for f in SHM_DIR.glob(shm_prefix + "*"))
    assert not left, f"shared-memory files left: {left}"


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def python_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton-python")
    write_repository(MODEL, repo, backend="python")
    return repo


@pytest.fixture(scope="module")
def server(python_repo):
    srv = TritonServer(python_repo).start(timeout=WAIT_S)
    pid, prefix = srv.pid, srv.shm_prefix
    stubs = child_processes(pid)
    assert stubs, "the python backend started no stub"
    yield srv
    srv.stop()
    assert_nothing_left(pid, stubs, prefix)


@pytest.fixture(scope="module")
def reference(python_repo):
    from edgehebb import Runtime

    with Runtime(python_repo / MODEL / "1" / "model.onnx", backend="onnxruntime", device="cpu") as rt:
        yield rt


def expected(rt, frames: np.ndarray) -> dict:
    out = rt.forward(rt.prepare(frames))
    return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in out.items()}


# ----------------------------------------------------------------------------- the repository as configuration

def test_onnxruntime_repository_declares_what_the_onnx_file_declares(tmp_path):
    info = write_repository(MODEL, tmp_path / "repo", frame_size=(240, 320), channel_order="bgr")
    folder = tmp_path / "repo" / MODEL
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1/model.onnx", "config.pbtxt", "labels.txt"]
    config = parse_config(folder / "config.pbtxt")
    onnx_path = folder / "1" / "model.onnx"
    io = declared(onnx_path)
    assert (config.name, config.backend, config.default_model_filename) == (MODEL, "onnxruntime", "model.onnx")
    assert config.max_batch_size == TRITON_MAX_BATCH == triton_repo.DEFAULT_MAX_BATCH
    pb2 = model_config_pb2()
    got = {t.name: (pb2.DataType.Name(t.data_type), list(t.dims)) for t in [*config.input, *config.output]}
    assert got == io == {"frames": ("TYPE_UINT8", [240, 320, 3]), "logits": ("TYPE_FP32", [10]),
                         "probabilities": ("TYPE_FP32", [10]), "features": ("TYPE_FP32", [6400])}
    meta = op.read_metadata(onnx_path)
    assert json.loads(meta[op.META_PREPROCESS])["channel_order"] == "bgr"
    classes = json.loads(meta[op.META_CLASSES])
    assert (folder / "labels.txt").read_text().splitlines() == classes == info["classes"]
    assert {o.name: o.label_filename for o in config.output} == {"logits": "labels.txt",
                                                                 "probabilities": "labels.txt", "features": ""}
    batching = config.dynamic_batching
    assert tuple(batching.preferred_batch_size) == TRITON_PREFERRED == triton_repo.DEFAULT_PREFERRED
    assert batching.max_queue_delay_microseconds == TRITON_QUEUE_DELAY_US == triton_repo.DEFAULT_QUEUE_DELAY_US
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [(a.name, dict(a.parameters)) for a in accelerators] == [("cuda", {"use_tf32": "0"})]


def test_tensorrt_accelerator_is_an_fp32_opt_in_with_a_profile_over_the_batch(tmp_path):
    write_repository(MODEL, tmp_path / "r", frame_size=(32, 32), tensorrt=True, max_batch_size=16,
                     preferred_batch_sizes=(4, 8))
    config = parse_config(tmp_path / "r" / MODEL / "config.pbtxt")
    first, second = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert first.name == "tensorrt" and second.name == "cuda"
    assert dict(first.parameters) == {
        "precision_mode": "FP32", "max_workspace_size_bytes": str(1 << 30),
        "trt_profile_min_shapes": "frames:1x32x32x3", "trt_profile_opt_shapes": "frames:8x32x32x3",
        "trt_profile_max_shapes": "frames:16x32x32x3"}
    with pytest.raises(EdgehebbError, match="fixed frame size"):
        write_repository(MODEL, tmp_path / "r2", tensorrt=True)
    with pytest.raises(EdgehebbError, match="onnxruntime backend only"):
        write_repository(MODEL, tmp_path / "r2", backend="python", frame_size=(32, 32), tensorrt=True)
    assert not (tmp_path / "r2" / MODEL).exists()


def test_python_repository_replaces_a_model_whole_and_refuses_what_is_not_one(tmp_path):
    repo = tmp_path / "repo"
    (repo / "other").mkdir(parents=True)   # a model of someone else's stays untouched
    (repo / "other" / "config.pbtxt").write_text('name: "other"\nbackend: "python"\n')
    info = write_repository(MODEL, repo, backend="python", name="cams", max_batch_size=8, preferred_batch_sizes=(),
                            instances=2)
    assert info["files"] == ["cams/1/model.onnx", "cams/1/model.py", "cams/config.pbtxt", "cams/labels.txt"]
    config = parse_config(repo / "cams" / "config.pbtxt")
    assert (config.name, config.backend, config.max_batch_size) == ("cams", "python", 8)
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert [(g.count, model_config_pb2().ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (2, "KIND_CPU")]
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert (repo / "cams" / "1" / "model.py").read_bytes() == (
        ROOT / "edgehebb" / "deploy" / "triton_python_model.py").read_bytes()
    write_repository(MODEL, repo, name="cams")   # the onnxruntime form replaces it: no stale model.py
    assert not (repo / "cams" / "1" / "model.py").exists()
    assert sorted(p.name for p in repo.iterdir()) == ["cams", "other"]   # no staging folder left
    (repo / "notes").mkdir()
    with pytest.raises(EdgehebbError, match="not a Triton model folder"):
        write_repository(MODEL, repo, name="notes")
    for bad in ("", ".hidden", "a/b", "x" * 200):
        with pytest.raises(EdgehebbError, match="model name"):
            write_repository(MODEL, repo, name=bad)
    with pytest.raises(EdgehebbError, match="must not exceed"):
        write_repository(MODEL, repo, max_batch_size=8, preferred_batch_sizes=(16,))


def test_export_cli_writes_repositories_and_keeps_its_flags_apart(tmp_path):
    runner = CliRunner()
    repo = tmp_path / "repo"
    r = runner.invoke(export, [MODEL, "--triton", str(repo), "--triton-backend", "python", "--name", "cam",
                               "--preferred-batch-sizes", "4,8", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["triton"]["files"][1] == "cam/1/model.py"
    assert list(parse_config(repo / "cam" / "config.pbtxt").dynamic_batching.preferred_batch_size) == [4, 8]
    r = runner.invoke(export, [MODEL, "--triton", str(repo), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0 and (tmp_path / "m.onnx").is_file() and (repo / MODEL / "config.pbtxt").is_file()
    nowhere = runner.invoke(export, [MODEL])   # a required option missing: click's usage error, exit 2
    assert nowhere.exit_code == 2 and "--out FILE.onnx, --triton REPO" in nowhere.output
    for args, message in [(["--out", str(tmp_path / "x.onnx"), "--name", "a"], "--name only apply with --triton"),
                          (["--triton", str(repo), "--standard-ops"], "--standard-ops apply to the ONNX file"),
                          (["--triton", str(repo), "--preferred-batch-sizes", "8,x"], "--preferred-batch-sizes"),
                          (["--triton", str(repo), "--tensorrt-accelerator"], "fixed frame size")]:
        r = runner.invoke(export, [MODEL, *args])
        assert r.exit_code != 0 and message in str(r.exception), (args, r.exception)
    assert not (tmp_path / "x.onnx").exists()


def test_model_py_refuses_malformed_frames_itself():
    # Triton refuses these against config.pbtxt first; the model checks again for what config cannot say
    from edgehebb.deploy.triton_python_model import check_frames

    ok = np.zeros((2, 32, 32, 3), np.uint8)
    assert check_frames(ok, [-1, -1, 3]) is None and check_frames(ok, [32, 32, 3]) is None
    assert "uint8" in check_frames(ok.astype(np.float32), [-1, -1, 3])
    assert "(N, H, W, 3)" in check_frames(ok[0], [-1, -1, 3])
    assert "empty batch" in check_frames(ok[:0], [-1, -1, 3])
    assert "must be 48x64" in check_frames(ok, [48, 64, 3])


# ----------------------------------------------------------------------------- finding the server

def test_a_missing_server_is_one_line_saying_what_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(EdgehebbError) as e:
        find_server(which=lambda name: None)
    assert "\n" not in str(e.value) and "pip install --no-deps nvidia-pytriton==0.7.0" in str(e.value)


def test_the_wheel_server_refuses_an_onnxruntime_repository_before_starting(tmp_path):
    write_repository(MODEL, tmp_path / "r")
    with pytest.raises(EdgehebbError, match="only the python backend.*--triton-backend python"):
        TritonServer(tmp_path / "r", binary=find_server(which=lambda name: None))


def test_a_port_in_use_is_one_line_naming_it(python_repo):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EdgehebbError) as e:
            TritonServer(python_repo, grpc_port=port).start(timeout=WAIT_S)
    assert str(e.value) == (f"127.0.0.1:{port} is already in use (another server?): choose another --grpc-port, "
                            f"or 0 for any free one")


def test_real_server_reads_the_onnxruntime_config_up_to_the_missing_backend(tmp_path):
    # the wheel's server has no onnxruntime backend: it gets as far as looking for one, past the config
    write_repository(MODEL, tmp_path / "r", frame_size=(32, 32), tensorrt=True)
    wheel = find_server(which=lambda name: None)
    raw = ServerBinary(wheel.path, "PATH")   # started as a full install would be: no refusal, no backend folder
    with pytest.raises(EdgehebbError) as e:
        TritonServer(tmp_path / "r", binary=raw).start(timeout=WAIT_S)
    assert "unable to find backend library for backend 'onnxruntime'" in str(e.value)
    assert "text proto" not in str(e.value)


# ----------------------------------------------------------------------------- a real server

@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_outputs_equal_runtime_and_requests_are_batched(server, reference, protocol):
    module = clients()[protocol]
    url = server.endpoints[protocol]
    before = stats(module, url)

    def camera(c: int):
        return [(frames := frames_for(c, r), infer(module, url, frames)) for r in range(REQUESTS)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        sent = [pair for part in pool.map(camera, range(CLIENTS)) for pair in part]
    for frames, got in sent:
        want = expected(reference, frames)
        assert (op.parity_error(got["logits"], want["logits"]) <= op.PARITY_TOLERANCE).all()
        assert (got["logits"].argmax(1) == want["logits"].argmax(1)).all()
        assert_close(got["probabilities"], want["probabilities"], rtol=1e-4, atol=1e-6, what="probabilities")
        assert_close(got["features"], want["features"], rtol=1e-4, atol=1e-6 * float(np.abs(want["features"]).max()),
                     what="features")
    frames_sent = sum(len(f) for f, _ in sent)
    deadline = time.monotonic() + 5   # statistics are updated after the response is sent
    while (after := stats(module, url))["inferences"] - before["inferences"] < frames_sent:
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.05)
    assert after["inferences"] - before["inferences"] == frames_sent
    formed = {size: n - before["batches"].get(size, 0) for size, n in after["batches"].items()}
    print(f"{protocol}: batches formed {formed}")
    assert any(size > 2 and n > 0 for size, n in formed.items()), formed   # more than one request (2: one request's most)
    assert after["executions"] - before["executions"] < CLIENTS * REQUESTS


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_get_errors_and_the_server_goes_on(server, reference, protocol):
    module = clients()[protocol]
    url = server.endpoints[protocol]
    good = frames_for(0, 0)
    client = connect(module, url)
    bad = [("FP32", good.astype(np.float32)), ("UINT8", np.zeros((1, 32, 32, 4), np.uint8)),
           ("UINT8", np.zeros((32, 32, 3), np.uint8)), ("UINT8", np.zeros((0, 32, 32, 3), np.uint8)),
           ("UINT8", np.zeros((TRITON_MAX_BATCH + 1, 32, 32, 3), np.uint8))]
    try:
        for datatype, array in bad:
            x = module.InferInput("frames", list(array.shape), datatype)
            x.set_data_from_numpy(array)
            with pytest.raises(Exception) as e:
                client.infer(MODEL, [x])
            assert type(e.value).__name__ == "InferenceServerException", (datatype, array.shape, e.value)
            got = infer(module, url, good, outputs=("logits",))["logits"]   # the next good request is served
            assert (op.parity_error(got, expected(reference, good)["logits"]) <= op.PARITY_TOLERANCE).all()
        assert client.is_model_ready(MODEL)
    finally:
        client.close()


def test_classification_extension_answers_with_class_names(server, reference):
    frames = np.concatenate([frames_for(1, r) for r in range(3)])
    got = infer(clients()["http"], server.endpoints["http"], frames, outputs=("probabilities",), class_count=3)
    want = expected(reference, frames)["probabilities"]
    for row, p in zip(got["probabilities"], want):
        ids = [int(entry.decode().split(":")[1]) for entry in row]
        names = [entry.decode().split(":")[2] for entry in row]
        assert ids == list(np.argsort(-p)[:3]) and names == [reference.classes[i] for i in ids]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_command_serves_then_stops_cleanly_on_a_signal(python_repo, signum):
    cmd = [sys.executable, "-m", "edgehebb.cli", "serve", str(python_repo), "--http-port", "0", "--grpc-port", "0",
           "--metrics-port", "0", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
        assert ready, "edgehebb serve printed nothing in time"
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        assert [(m["name"], m["state"]) for m in info["models"]] == [(MODEL, "READY")]
        assert info["http"].startswith("127.0.0.1:") and info["grpc"].startswith("127.0.0.1:")
        stubs = child_processes(info["pid"])
        got = infer(clients()["grpc"], info["grpc"], frames_for(2, 0), outputs=("probabilities",))
        assert got["probabilities"].shape == (1, 10)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err
    assert f"{signal.Signals(signum).name}: stopped the Triton server (exit status 0)" in err
    assert_nothing_left(info["pid"], stubs, info["shm_prefix"])


def test_a_server_stopped_hard_leaves_nothing_either(python_repo):
    srv = TritonServer(python_repo).start(timeout=WAIT_S)
    pid, prefix, stubs = srv.pid, srv.shm_prefix, child_processes(srv.pid)
    os.kill(pid, signal.SIGKILL)   # a crash: the stubs and shared memory are ours to clean
    srv.stop()
    assert_nothing_left(pid, stubs, prefix)
    srv.stop()   # a second stop is harmless
