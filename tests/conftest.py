import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from tiny import export_tiny  # noqa: E402


@pytest.fixture(scope="session")
def pixart_export(tmp_path_factory) -> Path:
    """A tiny PixArt-α export (6 blocks, N_c=4 → front/middle/rear = 2/2/2), shared read-only."""
    return export_tiny(tmp_path_factory.mktemp("exports") / "pixart", "pixart-alpha")


@pytest.fixture(scope="session")
def dit_export(tmp_path_factory) -> Path:
    """A tiny DiT-XL/2-shaped export (6 blocks), shared read-only."""
    return export_tiny(tmp_path_factory.mktemp("exports") / "dit", "dit-xl-2")


@pytest.fixture()
def one_torch_thread():
    """torch on one thread for the test (restored after): for tests of tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shipped_export(tmp_path_factory) -> Path:
    """The shipped pixart-digits model exported as `deltadit export` does by default (pixel space, max batch 4
    images, with scheduler/ and text_encoder/): what generate, eval and the servers run on. Shared read-only."""
    from deltadit_export.export_options import ExportOptions
    from deltadit_export.exporter import export
    from deltadit_export.progress import Progress

    out = tmp_path_factory.mktemp("shipped") / "pixart-digits-16-fp32"
    export(ExportOptions(out=str(out)), Progress(quiet=True))
    return out


@pytest.fixture(scope="session")
def digits_export(shipped_export) -> Path:
    """The same export under the name the serving and trust tests use (one export for the whole session)."""
    return shipped_export


@pytest.fixture()
def tmpfs(tmp_path):
    """A factory of real tmpfs file systems of a given size (needs mount rights: root in the CI container),
    unmounted after the test; remountable read-only or larger by the test."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(name: str, size: str) -> Path:
        mnt = tmp_path / name
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture()
def forbid_work(monkeypatch):
    """Every entry into real work (export, engines, runtime) fails the test: for refusals that must come first."""
    import runtime
    from deltadit_export import bench, evaluate, export_build, generate

    boom = lambda *a, **k: pytest.fail("work started before the options and the output folder were checked")  # noqa: E731
    monkeypatch.setattr(export_build, "build", boom)
    monkeypatch.setattr(generate, "ensure_export", boom)
    monkeypatch.setattr(runtime, "DeltaDiTRuntime", boom)
    monkeypatch.setattr(evaluate, "open_engines", boom)
    monkeypatch.setattr(bench, "_engines_folder", boom)
