import os
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
