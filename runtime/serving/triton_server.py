"""Start and stop the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles, on 127.0.0.1.

For local use, tests and the benchmark; in production use your own Triton (the NGC container) with
the repository ``triton-repo`` writes. What the bundled 2.51 server needs here:

* the Python backend with the stub built for this Python version, assembled in a work folder (the
  wheel keeps one stub per Python version apart from the backend, as pytriton itself does);
* this interpreter's ``bin`` first on ``PATH``: the stub embeds the ``libpython`` of the first
  ``python3`` it finds and ignores ``PYTHONPATH``, so it sees this environment's packages only that way;
* ``LD_LIBRARY_PATH`` with the lib folder of the interpreter this environment was made from (where
  its ``libpython3.X.so`` lives) and the wheel's own libraries.

pytriton itself is not imported (its Python API is not used, and it pins numpy<2).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("deltadit.serving")
PYTRITON_INSTALL = "pip install --no-deps 'nvidia-pytriton==0.7.0' (it bundles tritonserver 2.51; see the README)"


class TritonNotFound(RuntimeError):
    """The bundled tritonserver (nvidia-pytriton) is not installed or lacks a stub for this Python."""


@dataclass(frozen=True)
class TritonDist:
    binary: Path
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    libs: Path  # the wheel's shared libraries (nvidia_pytriton.libs)


def find_tritonserver() -> TritonDist:
    """The files of the bundled tritonserver, located without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFound(f"the bundled Triton server is not installed: {PYTRITON_INSTALL}")
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = TritonDist(binary=dist / "bin" / "tritonserver", python_backend=dist / "backends" / "python",
                       stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
                       libs=root.parent / "nvidia_pytriton.libs")
    if not found.binary.is_file():
        raise TritonNotFound(f"{found.binary} is missing: reinstall with {PYTRITON_INSTALL}")
    if not found.stub.is_file():
        raise TritonNotFound(f"the bundled Triton has no Python-backend stub for Python {version} ({found.stub}); "
                             "use Python 3.8–3.13 or your own Triton")
    return found


def prepare_backends(dist: TritonDist, workdir: Path) -> Path:
    """A backend folder with the Python backend and this Python's stub side by side (what Triton expects)."""
    backends = workdir / "backends"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in dist.python_backend.iterdir():
        if f.is_file():
            shutil.copy2(f, python / f.name)
    shutil.copy2(dist.stub, python / "triton_python_backend_stub")
    return backends


def server_env(dist: TritonDist, base: dict | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)  # this environment's bin (a venv's, not the base interpreter's)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [p for p in (libdir, str(dist.libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    return env


class TritonProcess:
    """A tritonserver process serving ``repository`` on 127.0.0.1; a context manager that stops it gracefully."""

    def __init__(self, repository: str | os.PathLike, *, http_port: int, grpc_port: int, metrics_port: int,
                 host: str = "127.0.0.1", workdir: str | os.PathLike, log_path: str | os.PathLike | None = None,
                 model_config_name: str | None = None, extra_args: tuple[str, ...] = ()):
        self.repository = Path(repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.workdir = Path(workdir)
        self.log_path = Path(log_path) if log_path else self.workdir / "tritonserver.log"
        self.model_config_name = model_config_name
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def command(self, dist: TritonDist, backends: Path) -> list[str]:
        cmd = [str(dist.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
               f"--http-address={self.host}", f"--http-port={self.http_port}", f"--grpc-address={self.host}",
               f"--grpc-port={self.grpc_port}", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", "--exit-timeout-secs=30", "--log-verbose=0"]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        return cmd + list(self.extra_args)

    def start(self) -> "TritonProcess":
        dist = find_tritonserver()
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(dist, self.workdir)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(dist, backends), stdout=self._log, stderr=subprocess.STDOUT,
                                        env=server_env(dist), cwd=self.workdir, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until ``/v2/health/ready`` answers 200 (every model loaded); raises with the log's tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (Triton finishes what is in flight and unloads the models, calling ``finalize``), then waits;
        SIGKILL only if it has not exited within ``timeout``. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s of SIGTERM: killing it", timeout)
                os.killpg(self.process.pid, signal.SIGKILL)  # the group we started: the server and its stubs
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> "TritonProcess":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
