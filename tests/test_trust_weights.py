"""The PyTorch baselines never follow a weights path from the manifest (README "Trust model").

``deltadit bench``, ``generate`` and ``eval`` rebuild the diffusers model the export came from
(``deltadit_export/rebuild.py``). An export folder from elsewhere is untrusted: its ``model.source.path`` may
point anywhere, and ``.bin`` weights are pickles. Each test plays that attacker and checks, with an audit hook
on every file open and directory listing in this process, that nothing outside the folder is read unless the
user names the folder (``--weights DIR``).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from tiny import edit_manifest

from deltadit_export.models import PACKAGE_WEIGHTS, ModelError
from deltadit_export.rebuild import WeightsNotNamed, rebuild_model, resolve_weights
from runtime.manifest import load_manifest

SHIPPED = PACKAGE_WEIGHTS / "pixart-digits" / "transformer"
PROMPT = "a handwritten digit 3"

# ------------------------------------------------------------------------------------------------ helpers

_WATCHED: list[tuple[Path, list[str]]] = []  # (folder, paths under it that were opened or listed)


def _audit(event: str, args) -> None:
    if not _WATCHED or event not in ("open", "os.listdir", "os.scandir"):
        return
    target = args[0] if args else None
    if isinstance(target, int) or target is None:
        return
    try:
        path = os.path.abspath(os.fsdecode(target))
    except TypeError:
        return
    for folder, seen in _WATCHED:
        if path == str(folder) or path.startswith(str(folder) + os.sep):
            seen.append(path)


sys.addaudithook(_audit)  # process-wide and permanent: inert unless a test watches a folder


@contextmanager
def reads_under(folder: Path):
    """Every path under ``folder`` this process opens or lists while the block runs."""
    seen: list[str] = []
    entry = (Path(folder).resolve(), seen)
    _WATCHED.append(entry)
    try:
        yield seen
    finally:
        _WATCHED.remove(entry)


@contextmanager
def warnings_of_deltadit():
    """Warnings of the ``deltadit`` logger, caught on the logger itself (the CLIs stop it propagating)."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("deltadit")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)




def pickled_weights(folder: Path, marker: Path) -> Path:
    """A diffusers-looking folder: the shipped config and a ``.bin`` that creates ``marker`` when unpickled."""

    class Payload:
        def __reduce__(self):
            return builtins.open, (str(marker), "w")  # harmless, and visible: the file appears

    folder.mkdir()
    shutil.copy(SHIPPED / "config.json", folder / "config.json")
    torch.save(Payload(), folder / "diffusion_pytorch_model.bin")
    torch.load(folder / "diffusion_pytorch_model.bin", weights_only=False).close()  # the payload is real: it runs
    assert marker.exists()
    marker.unlink()
    return folder


@pytest.fixture()
def outside(tmp_path):
    """Two weight folders outside any export: a real copy of the shipped weights, and a pickle payload."""
    real = tmp_path / "outside" / "real"
    shutil.copytree(SHIPPED, real)
    marker = tmp_path / "PAYLOAD-RAN"
    pickled = pickled_weights(tmp_path / "outside" / "pickled", marker)
    with reads_under(tmp_path / "outside") as seen:  # the spy sees reads (else "nothing was read" proves nothing)
        (real / "config.json").read_text()
        os.listdir(pickled)
    assert seen == [str(real / "config.json"), str(pickled)]
    return SimpleNamespace(root=tmp_path / "outside", real=real, pickled=pickled, marker=marker)


@pytest.fixture()
def hostile(digits_export, outside, tmp_path):
    """The shipped model's export, its manifest saying it came from a local folder outside it; one per target."""
    folders = {}
    for name in ("real", "pickled"):
        folder = tmp_path / f"eng-{name}"
        shutil.copytree(digits_export, folder)
        edit_manifest(folder, lambda d, n=name: d["model"].update(
            source={"kind": "local", "path": str(getattr(outside, n))}))
        folders[name] = folder
    return folders


def one_error_line(out) -> str:
    assert out.exit_code == 1, out.output
    assert "Traceback" not in out.output
    errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out.output
    return errors[0]


def bench_args(folder: Path, modes: str) -> list[str]:
    return ["--engines", str(folder), "--modes", modes, "--steps", "2", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--prompt", PROMPT]


def generate_args(folder: Path, out: Path) -> list[str]:
    return ["--engines", str(folder), "--samples", "1", "--prompt", PROMPT, "--steps", "2", "--repeats", "1",
            "--threads", "1", "--out", str(out), "-q"]


def eval_args(folder: Path, out: Path) -> list[str]:
    return ["--engines", str(folder), "--samples-per-digit", "1", "--steps", "2", "--repeats", "1", "--rows", "full",
            "--no-hooks", "--threads", "1", "--out", str(out), "--work", ""]


# ------------------------------------------------------------------------------------------------ the CLIs


@pytest.mark.parametrize("target", ["real", "pickled"])
def test_clis_refuse_a_recorded_local_path_without_weights(target, hostile, outside, tmp_path):
    from deltadit_export.bench import cli as bench_cli
    from deltadit_export.evaluate import main as eval_main
    from deltadit_export.generate import main as generate_main

    folder = hostile[target]
    runs = [
        (bench_cli, bench_args(folder, "eager,none"), "or leave out the PyTorch rows (--modes none,delta-dit)"),
        (generate_main, generate_args(folder, tmp_path / "gen"), "or skip the PyTorch timing (--no-timing)"),
        (eval_main, eval_args(folder, tmp_path / "eval"), "weights fingerprint)"),
    ]
    for cli, args, fix in runs:
        with reads_under(outside.root) as seen:
            line = one_error_line(CliRunner().invoke(cli, args))
        assert seen == [], (cli.name, seen)
        assert f"Error: the export at {folder} was exported from a local weights folder (deltadit-export --weights " \
               f"{str(getattr(outside, target))!r}); the PyTorch baseline reads a folder only when you name it" in line
        assert "pass --weights DIR (the folder it was exported from" in line and line.endswith(fix), line
    assert not outside.marker.exists()
    assert not (tmp_path / "gen" / "grid.png").exists()  # refused before any image was made


def test_bench_without_pytorch_rows_needs_no_weights(hostile, outside):
    """The fix the refusal names: the runtime rows alone run, and the independent Δ-DiT (a PyTorch model too)
    is skipped with a warning instead of reading the recorded folder."""
    from deltadit_export.bench import cli as bench_cli

    with reads_under(outside.root) as seen:
        out = CliRunner().invoke(bench_cli, bench_args(hostile["pickled"], "none,delta-dit"))
    assert out.exit_code == 0, out.output
    assert seen == [] and not outside.marker.exists()
    assert "delta-dit is not checked against the independent Δ-DiT" in out.output  # the CLI's warning (stderr)
    assert "delta-dit vs independent Δ-DiT (torch) -" in out.output


def test_named_weights_run_the_baselines(hostile, outside, tmp_path):
    from deltadit_export.bench import cli as bench_cli
    from deltadit_export.generate import main as generate_main

    folder = hostile["pickled"]  # the recorded path is never used: the named folder is
    report = tmp_path / "bench.json"
    out = CliRunner().invoke(bench_cli, bench_args(folder, "eager,none,delta-dit") + [
        "--weights", str(outside.real), "--json", str(report)])
    assert out.exit_code == 0, out.output
    r = json.loads(report.read_text())
    # The eager row ran on the named weights: the ONNX Runtime engines of the shipped model agree with it to fp32
    # float error (the exporter holds each segment to 1e-4; the whole chain over 2 steps stays within that).
    assert r["full_vs_eager_rel_err"] <= 1e-4 and r["delta_vs_reference_rel_err"] <= 1e-4
    out = CliRunner().invoke(generate_main, generate_args(folder, tmp_path / "gen") + ["--weights", str(outside.real)])
    assert out.exit_code == 0, out.output
    assert "pytorch eager" in out.output and (tmp_path / "gen" / "grid.png").is_file()
    assert not outside.marker.exists()


def test_eval_takes_the_named_weights(hostile, outside):
    """eval's PyTorch rows (samples in-process, timing in workers) use the named folder."""
    from runtime import DeltaDiTRuntime

    from deltadit_export.eval_rows import RowSpec, timing_rows
    from deltadit_export.evaluate import eval_setup

    folder = hostile["pickled"]
    setup = eval_setup(DeltaDiTRuntime(folder), folder, 1, 0, None, "", weights=str(outside.real))
    from safetensors.torch import load_file

    shipped = load_file(SHIPPED / "diffusion_pytorch_model.safetensors")
    state = setup.torch_model_factory().state_dict()
    assert shipped.keys() == state.keys() and all(torch.equal(shipped[k], state[k]) for k in shipped)
    (row,) = timing_rows(setup, [RowSpec("pytorch full", "pytorch", 2)])
    assert row.args["weights"] == str(outside.real)
    assert not outside.marker.exists()


def test_named_folder_with_other_weights_refused_before_loading(hostile, outside):
    """The manifest records the weights fingerprint: a named folder that does not match is not loaded (the
    pickle in it never runs)."""
    from deltadit_export.bench import cli as bench_cli

    folder = hostile["real"]
    line = one_error_line(CliRunner().invoke(bench_cli, bench_args(folder, "eager,none") + [
        "--weights", str(outside.pickled)]))
    assert f"Error: --weights {outside.pickled}: these are not the weights the export at {folder} was exported " \
           "from (weights fingerprint" in line and "re-export from this one" in line
    assert not outside.marker.exists()


# ------------------------------------------------------------------------------------------------ rebuild.py


def fake_manifest(source: dict, *, name="pixart-digits", resolution=16, export=None, root=None, num_layers=None):
    """The manifest fields rebuild.py reads, for sources no export can be made of here (the HF cache)."""
    config = {k: v for k, v in json.loads((SHIPPED / "config.json").read_text()).items() if not k.startswith("_")}
    return SimpleNamespace(model={"name": name, "source": source, "config": config}, resolution=resolution,
                           export=export or {}, root=root, precision="fp32",
                           num_layers=num_layers or config["num_layers"])


def test_bundled_source_ignores_the_recorded_path(digits_export, outside):
    m = load_manifest(digits_export)
    assert m.model["source"]["kind"] == "bundled" and m.export["weights_fingerprint"]
    hostile = fake_manifest({"kind": "bundled", "path": str(outside.pickled)},
                            export={"weights_fingerprint": m.export["weights_fingerprint"]})
    with reads_under(outside.root) as seen:
        source = resolve_weights(hostile)
        rebuild_model(hostile)
    assert seen == [] and Path(source.path) == SHIPPED and not outside.marker.exists()


def test_changed_shipped_weights_refused(outside):
    m = fake_manifest({"kind": "bundled"}, export={"weights_fingerprint": "0" * 64})
    with pytest.raises(ModelError, match=r"the bundled weights in .* changed since this export was made .*re-export"):
        resolve_weights(m)


def _save_to_hf_cache(cache: Path, repo_id: str):
    """A tiny model in the layout huggingface_hub's cache uses (refs/main → snapshots/<commit>/transformer)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(5)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=4, cross_attention_dim=16, caption_channels=24, sample_size=64)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    model.save_pretrained(repo / "snapshots" / commit / "transformer")
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return model


def test_hf_cache_source_is_resolved_by_repo_id_not_by_path(outside, tmp_path, monkeypatch):
    repo_id = "PixArt-alpha/PixArt-XL-2-512x512"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    saved = _save_to_hf_cache(tmp_path / "hub", repo_id)
    m = fake_manifest({"kind": "hf-cache", "path": str(outside.pickled), "repo_id": repo_id}, name="pixart-alpha",
                      resolution=512, num_layers=4)
    with reads_under(outside.root) as seen:
        model = rebuild_model(m)
    assert seen == [] and not outside.marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    # A repo id that is not the registry's for this model and resolution is refused, not looked up.
    other = fake_manifest({"kind": "hf-cache", "path": str(outside.pickled), "repo_id": "evil/weights"},
                          name="pixart-alpha", resolution=512, num_layers=4)
    with pytest.raises(ModelError, match=r"records Hugging Face weights 'evil/weights', but pixart-alpha at 512 has "
                                         r"'PixArt-alpha/PixArt-XL-2-512x512'"):
        resolve_weights(other)


def test_local_source_needs_a_named_folder(outside):
    m = fake_manifest({"kind": "local", "path": str(outside.pickled)})
    with reads_under(outside.root) as seen, pytest.raises(WeightsNotNamed, match=r"pass --weights DIR"):
        rebuild_model(m)
    assert seen == [] and not outside.marker.exists()
    # An export from before the fingerprint was recorded: the named folder is used as given, with a warning.
    with warnings_of_deltadit() as warned:
        source = resolve_weights(m, outside.real)
    assert source.kind == "local" and Path(source.path) == outside.real.resolve()
    assert any("predates the recorded weights fingerprint" in w for w in warned), warned


@pytest.mark.parametrize("source, fragment", [
    ({"kind": "ftp", "path": "/x"}, r"records the weights source 'ftp' \(manifest model.source.kind\), not one of"),
    ("local", r"records the weights source 'local'"),
    ({"kind": "random", "seed": "0; rm -rf"}, r"records random weights with seed '0; rm -rf'"),
])
def test_odd_sources_refused(source, fragment):
    with pytest.raises(ModelError, match=fragment):
        resolve_weights(fake_manifest(source))


def test_random_source_takes_no_folder(pixart_export, outside):
    m = load_manifest(pixart_export)
    with pytest.raises(ModelError, match=r"was made from seeded random weights, which are rebuilt from the manifest; "
                                         r"drop --weights"):
        resolve_weights(m, outside.real)
    assert resolve_weights(m).kind == "random"


def test_export_options_like_needs_the_named_folder_for_local_weights(hostile, outside):
    from deltadit_export.variants import export_options_like

    with pytest.raises(ModelError, match=r"was exported from a local weights folder .*pass weights=DIR"):
        export_options_like(hostile["pickled"], precision="int8")
    assert export_options_like(hostile["pickled"], weights=str(outside.real)).weights == str(outside.real)
