"""The web app (`sparseflex app`): served from a subprocess on a free local port and driven through gradio_client,
as a browser would: a convert job returns a mesh and metrics, bad uploads are a message and the server keeps
serving, jobs submitted together queue and all finish, Stop ends a job and its process, and stopping the app removes
every file it made. Skipped where gradio is not installed (`pip install sparseflex[app]`)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HAVE_GRADIO = importlib.util.find_spec("gradio") is not None and importlib.util.find_spec("gradio_client") is not None
needs_gradio = pytest.mark.skipif(not HAVE_GRADIO, reason="gradio is not installed (pip install sparseflex[app])")

UPLOAD_LIMIT_MB = 1


def test_without_gradio_the_command_says_how_to_install_it(monkeypatch, capsys):
    from sparseflex.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["app", "--port", "7999"]) == 2
    err = capsys.readouterr().err
    assert err == "error: the app needs gradio: pip install sparseflex[app]\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sphere_obj(path: Path, subdivisions: int = 2) -> Path:
    import trimesh
    trimesh.creation.icosphere(subdivisions).export(path)
    return path


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = root / "server.log"
        env = {**os.environ, "TMPDIR": str(root), "GRADIO_ANALYTICS_ENABLED": "False"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sparseflex", "app", "--port", str(self.port),
                                          "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--device", "cpu"],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"the app did not answer within {timeout} s:\n{self.log.read_text()}")

    def answers(self) -> bool:
        with urllib.request.urlopen(self.url + "config", timeout=10) as r:
            return r.status == 200 and b"SparseFlex" in r.read()

    def workers(self) -> set[int]:
        """Pids of the app's worker processes (its children running multiprocessing's spawn entry point)."""
        pids = set()
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                pids.update(int(p) for p in (task / "children").read_text().split())
            except OSError:
                continue
        found = set()
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                found.add(pid)
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not HAVE_GRADIO:
        pytest.skip("gradio is not installed (pip install sparseflex[app])")
    srv = Server(tmp_path_factory.mktemp("app"))
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    root = tmp_path_factory.mktemp("meshes")
    return {"sphere": _sphere_obj(root / "sphere.obj")}


def _client(server, tmp_path):
    from gradio_client import Client
    return Client(server.url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)


def _app_error(exc) -> str:
    return str(exc)


@needs_gradio
def test_the_app_starts_and_answers(server):
    assert server.answers()
    assert len(server.workers()) == 1  # started warm, before the first job


@needs_gradio
def test_convert_returns_a_mesh_metrics_renders_and_downloads(server, meshes, tmp_path):
    from gradio_client import handle_file

    from sparseflex.data.mesh import load_mesh
    client = _client(server, tmp_path)
    start = time.perf_counter()
    source, result, metrics, views, files, summary = client.predict(
        handle_file(str(meshes["sphere"])), 32, 0, 20_000, True, api_name="/convert")
    seconds = time.perf_counter() - start
    assert Path(result).suffix == ".glb" and Path(source).suffix == ".glb"
    mesh = load_mesh(result)  # a valid GLB with faces
    assert mesh.num_faces > 100
    assert load_mesh(source).num_faces == 320  # the input as uploaded (an icosphere of 320 faces)
    assert sorted(Path(f).suffix for f in files) == [".glb", ".obj", ".ply"]
    assert all(load_mesh(f).num_faces == mesh.num_faces for f in files)
    rows = {row[0]: row[1:] for row in metrics["data"]}
    assert float(rows["F-score @ 0.01 (%)"][0]) > 95 and float(rows["normal consistency"][0]) > 0.9
    assert float(rows["F-score @ 0.01 (%)"][1]) == 100  # what a perfect result scores
    assert Path(views).suffix == ".png" and Path(views).stat().st_size > 1000
    assert "convert" in summary and "32^3" in summary and "faces" in summary
    # the job's files live in the session's folder under the app's temporary root
    roots = list(server.root.glob("sparseflex-app-*"))
    assert len(roots) == 1 and any((roots[0] / "jobs" / "sessions").rglob("sphere_convert.glb"))
    print(f"convert job through the page's API: {seconds:.1f} s")


@needs_gradio
def test_bad_uploads_are_one_line_messages_and_the_server_keeps_serving(server, meshes, tmp_path):
    from gradio_client import handle_file
    client = _client(server, tmp_path)
    corrupt = tmp_path / "corrupt.obj"
    corrupt.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 7\n")
    empty = tmp_path / "empty.ply"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.glb"
    garbage.write_bytes(os.urandom(3000))
    text = tmp_path / "notes.txt"
    text.write_text("not a mesh")
    huge = tmp_path / "huge.obj"
    huge.write_bytes(b"v 0 0 0\n" * (UPLOAD_LIMIT_MB * 200_000))  # 1.6 MB, over the 1 MB limit
    expected = {corrupt: ("corrupt.obj", "7"), empty: ("empty.ply", "empty"), garbage: ("garbage.glb",),
                text: (".obj",), huge: ()}
    for path, words in expected.items():
        with pytest.raises(Exception) as info:
            client.predict(handle_file(str(path)), 32, 0, 0, True, api_name="/convert")
        message = _app_error(info.value)
        assert "Traceback" not in message and len(message.splitlines()) == 1, message
        for word in words:
            assert word in message, message
        if path is huge:
            assert "maximum file size" in message, message
        print(f"{path.name}: {message}")
    # the server refuses it too (not only the client): a raw upload over the limit
    boundary = "sparseflexboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"huge.obj\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + huge.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server.url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    # a missing upload and an option outside the page's choices
    with pytest.raises(Exception, match="upload a mesh first"):
        client.predict(None, 32, 0, 0, True, api_name="/convert")
    with pytest.raises(Exception, match="48"):
        client.predict(handle_file(str(meshes["sphere"])), 48, 0, 0, True, api_name="/convert")
    # still serving: the page, and the next job
    assert server.answers()
    result = client.predict(handle_file(str(meshes["sphere"])), 32, 0, 0, True, api_name="/convert")
    assert Path(result[1]).suffix == ".glb"
    print("no metrics asked:", result[2])


@needs_gradio
def test_two_jobs_submitted_together_queue_and_both_finish(server, meshes, tmp_path):
    """Two users at once: one job runs, the other waits in the queue (its place shown), then runs; both finish."""
    from gradio_client import handle_file
    from gradio_client.utils import Status
    clients = [_client(server, tmp_path / "a"), _client(server, tmp_path / "b")]
    jobs = [c.submit(handle_file(str(meshes["sphere"])), 32, seed, 0, True, api_name="/convert")
            for seed, c in enumerate(clients)]
    seen = [set(), set()]
    end = time.monotonic() + 240
    while not all(j.done() for j in jobs) and time.monotonic() < end:
        for k, job in enumerate(jobs):
            seen[k].add(job.status().code)
        time.sleep(0.05)
    results = [j.result(timeout=10) for j in jobs]
    for r in results:
        assert Path(r[1]).suffix == ".glb" and "convert" in r[5]
    assert any(Status.IN_QUEUE in s for s in seen), seen  # one waited its turn


@needs_gradio
def test_stop_ends_the_running_job_and_its_process(server, meshes, tmp_path):
    from gradio_client import handle_file
    from gradio_client.utils import Status
    client = _client(server, tmp_path)
    before = server.workers()
    assert len(before) == 1
    job = client.submit(handle_file(str(meshes["sphere"])), 64, 5000, 0, 0, api_name="/fit")
    end = time.monotonic() + 120
    while job.status().code not in (Status.PROGRESS, Status.ITERATING) and time.monotonic() < end:
        assert not job.done(), job.exception()
        time.sleep(0.2)
    time.sleep(2)  # inside the fit
    job.cancel()
    end = time.monotonic() + 60
    while server.workers() & before and time.monotonic() < end:
        time.sleep(0.2)
    assert not server.workers() & before, "the stopped job's process still runs"
    # a fresh worker serves the next job at once (the stopped fit would have taken hours)
    start = time.perf_counter()
    result = _client(server, tmp_path / "next").predict(handle_file(str(meshes["sphere"])), 32, 0, 0, True,
                                                        api_name="/convert")
    assert Path(result[1]).suffix == ".glb"
    assert time.perf_counter() - start < 120


@needs_gradio
def test_stopping_the_app_removes_every_file_it_made(server):
    assert list(server.root.glob("sparseflex-app-*"))
    workers = server.workers()
    server.stop()
    assert server.proc.returncode in (0, -signal.SIGTERM), server.log.read_text()
    assert not list(server.root.glob("sparseflex-app-*")), list(server.root.rglob("*"))
    assert not list(server.root.glob("gradio*"))
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
    log = server.log.read_text()
    assert "sparseflex/app" not in log, log  # no traceback through the app (gradio logs its own refusals)
