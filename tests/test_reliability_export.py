"""Reliability of the exporter (issue 5): bad models, weights and options are refused before any work with a
message naming the value and the accepted ones; a killed export or a full disk never damages the previous export
and never leaves a partial folder that looks complete; an identical re-export is reused, and says so.

The killed-export test SIGKILLs real export processes (the CLI's ``main`` in forked children of a driver process
that imported torch/diffusers once, so each kill costs seconds, not an import) at progress lines, at random delays
and at the exact steps of the publish swap.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltadit_export import export_build as build_mod
from deltadit_export import exporter as exporter_mod
from deltadit_export import publish as publish_mod
from deltadit_export.cli import main as cli_main
from deltadit_export.export_options import ExportOptions, OptionError, resolve
from deltadit_export.exporter import export, reusable
from deltadit_export.models import ModelError
from deltadit_export.onnx_export import ExportError
from deltadit_export.progress import Progress
from runtime.integrity import verify_segment_files
from runtime.manifest import MANIFEST_NAME, ManifestError, load_manifest
from tiny import TINY_PIXART_SET, TINY_RESOLUTION, set_args, tiny_dit, tiny_pixart

QUIET = Progress(quiet=True)


def tiny_options(out: Path | None = None, **kw) -> ExportOptions:
    base = dict(model="pixart-alpha", resolution=TINY_RESOLUTION, random_weights=True,
                overrides=dict(TINY_PIXART_SET), out=str(out) if out else None)
    base.update(kw)
    return ExportOptions(**base)


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file in an export folder: 'intact' means byte-identical to this."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_complete(folder: Path) -> str:
    """A folder that has a manifest must be a whole export: manifest valid, every file's sha256 right."""
    m = load_manifest(folder)
    verify_segment_files(m)
    return m.export["cache_key"]


def assert_no_partial_looks_complete(parent: Path) -> None:
    for d in parent.iterdir():
        if d.is_dir() and (d / MANIFEST_NAME).exists():
            assert_complete(d)  # raises if a half-written folder carries a manifest


@pytest.fixture
def prev_export(pixart_export, tmp_path) -> Path:
    """A private copy of the shared tiny export (tests here corrupt, replace and kill around it)."""
    out = tmp_path / "engines" / "pix"
    shutil.copytree(pixart_export, out)
    return out


@pytest.fixture(scope="module")
def weights_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny diffusers folders written by save_pretrained (the real --weights loading path)."""
    root = tmp_path_factory.mktemp("weights")
    dirs = {"pixart": root / "pixart", "pixart_seed1": root / "pixart1", "dit": root / "dit"}
    tiny_pixart().save_pretrained(dirs["pixart"])
    tiny_pixart(seed=1).save_pretrained(dirs["pixart_seed1"])
    tiny_dit().save_pretrained(dirs["dit"])
    return dirs


# ------------------------------------------------------------------------------------------------ row 1


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _copy_weights(weights_dirs, tmp_path, which="pixart") -> Path:
    dst = tmp_path / f"w-{which}"
    shutil.copytree(weights_dirs[which], dst)
    return dst


# (case id, setup(weights_dirs, tmp_path) -> options kwargs, exception, substrings of the message)
MODEL_CASES = [
    ("unknown-model", lambda w, t: dict(model="pixart-beta"), ModelError,
     ["unknown model 'pixart-beta'", "dit-xl-2, pixart-alpha, pixart-digits"]),
    ("weights-missing", lambda w, t: dict(weights=str(t / "nope")), ModelError,
     ["nope does not exist", "--random-weights"]),
    ("weights-is-file", lambda w, t: (t.joinpath("f").write_text("x"), dict(weights=str(t / "f")))[1], ModelError,
     ["is a file, not a directory"]),
    ("weights-no-config", lambda w, t: (t.joinpath("empty").mkdir(), dict(weights=str(t / "empty")))[1], ModelError,
     ["has no config.json", "save_pretrained"]),
    ("config-not-json", lambda w, t: (_copy_weights(w, t).joinpath("config.json").write_text("{oops"),
                                      dict(weights=str(t / "w-pixart")))[1], ModelError,
     ["config.json is not valid JSON"]),
    ("config-a-list", lambda w, t: (_copy_weights(w, t).joinpath("config.json").write_text("[1, 2]"),
                                    dict(weights=str(t / "w-pixart")))[1], ModelError,
     ["holds a JSON list"]),
    ("dit-weights-for-pixart", lambda w, t: dict(weights=str(w["dit"])), ModelError,
     ["holds a 'DiTTransformer2DModel'", "--model pixart-alpha needs one of PixArtTransformer2DModel"]),
    ("pixart-weights-for-dit", lambda w, t: dict(model="dit-xl-2", weights=str(w["pixart"])), ModelError,
     ["holds a 'PixArtTransformer2DModel'", "--model dit-xl-2 needs one of DiTTransformer2DModel"]),
    ("legacy-class-wrong-norm", lambda w, t: (_edit_config(_copy_weights(w, t), _class_name="Transformer2DModel"),
                                              dict(model="dit-xl-2", weights=str(t / "w-pixart")))[1], ModelError,
     ["norm_type 'ada_norm_single'", "expects 'ada_norm_zero'"]),
    ("resolution-mismatch", lambda w, t: dict(weights=str(w["pixart"]), resolution=128), ModelError,
     ["sample_size 8 (resolution 64)", "--resolution 128 needs sample_size 16", "pass --resolution 64"]),
    ("sample-size-null", lambda w, t: (_edit_config(_copy_weights(w, t), sample_size=None),
                                       dict(weights=str(t / "w-pixart")))[1], ModelError,
     ["sample_size None", "positive integer (8 for --resolution 64)"]),
    ("config-without-weights", lambda w, t: ((t / "cfg").mkdir(), shutil.copy(w["pixart"] / "config.json", t / "cfg"),
                                             dict(weights=str(t / "cfg")))[2], ModelError,
     ["has a config.json but no weights", "diffusion_pytorch_model.safetensors"]),
    ("hf-cache-empty", lambda w, t: dict(random_weights=False, overrides={}, resolution=512), ModelError,
     ["no local weights for pixart-alpha at 512", "'PixArt-alpha/PixArt-XL-2-512x512'", "--weights DIR",
      "--random-weights"]),
    ("unpublished-resolution", lambda w, t: dict(random_weights=False, overrides={}, resolution=768), ModelError,
     ["--resolution 768 has no published pixart-alpha weights; accepted: 512, 1024"]),
    ("set-unknown-key", lambda w, t: dict(overrides={"num_layerz": 4}), ModelError,
     ["'num_layerz' is not a PixArtTransformer2DModel config field", "num_layers"]),
    ("set-not-int", lambda w, t: dict(overrides={"num_layers": "six"}), ModelError,
     ["--set num_layers='six': expected a positive integer"]),
    ("set-one-layer", lambda w, t: dict(overrides={**TINY_PIXART_SET, "num_layers": 1}), OptionError,
     ["num_layers=1", "expected an integer ≥ 2"]),
    ("set-without-random", lambda w, t: dict(random_weights=False, weights=str(w["pixart"]),
                                             overrides={"num_layers": 4}), OptionError,
     ["--set changes the architecture, so it needs --random-weights"]),
    ("weights-and-random", lambda w, t: dict(weights=str(w["pixart"])), OptionError,
     ["--weights and --random-weights exclude each other"]),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_or_weights_refused_before_any_work(case, weights_dirs, tmp_path, monkeypatch):
    name, setup, exc_type, fragments = case
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    kwargs = setup(weights_dirs, tmp_path)
    if "weights" in kwargs and name != "weights-and-random":
        kwargs.setdefault("random_weights", False)
        kwargs.setdefault("overrides", {})
    monkeypatch.setattr(build_mod, "build", lambda *a, **k: pytest.fail("work started for a bad input"))
    out = tmp_path / "engines" / "out"
    with pytest.raises(exc_type) as info:
        export(tiny_options(out, **kwargs), QUIET)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not out.parent.exists() or not any(out.parent.iterdir()), "nothing may be written for a refused input"


def _export_raises(options, out: Path, exc_type, fragments):
    with pytest.raises(exc_type) as info:
        export(options, QUIET)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "the staging folder must be removed"
    return info.value


def test_damaged_weight_file_refused_with_the_folder_named(weights_dirs, tmp_path):
    """Config fine, safetensors damaged: found when the weights load (first work), as a ModelError, nothing left."""
    w = _copy_weights(weights_dirs, tmp_path)
    (w / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    out = tmp_path / "engines" / "out"
    _export_raises(tiny_options(out, weights=str(w), random_weights=False, overrides={}), out, ModelError,
                   ["cannot load the PixArtTransformer2DModel weights in", "damaged or incomplete"])


def test_non_finite_weight_refused_naming_the_tensor(tmp_path):
    """A corrupted checkpoint (one Inf) is refused before any segment is exported, naming the tensor."""
    model = tiny_pixart()
    model.transformer_blocks[3].ff.net[0].proj.weight.data[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    out = tmp_path / "engines" / "out"
    _export_raises(tiny_options(out, weights=str(tmp_path / "bad"), random_weights=False, overrides={}), out,
                   ModelError, ["weight 'transformer_blocks.3.ff.net.0.proj.weight' holds 1 NaN/Inf", "corrupted"])


# ------------------------------------------------------------------------------------------------ row 2

RANGE_CASES = [
    (dict(cached_blocks=0), "--cached-blocks=0 is out of range: expected an integer 1..5"),
    (dict(cached_blocks=6), "--cached-blocks=6 is out of range: expected an integer 1..5"),
    (dict(cached_blocks=-2), "--cached-blocks=-2 is out of range"),
    (dict(cached_blocks="3"), "--cached-blocks='3' is out of range"),
    (dict(num_steps=0), "--steps=0 is out of range: expected an integer 1..10000"),
    (dict(num_steps=2.5), "--steps=2.5 is out of range"),
    (dict(interval=0), "--interval=0 is out of range: expected an integer ≥ 1"),
    (dict(boundary=-1), "--boundary=-1 is out of range: expected an integer 0..20"),
    (dict(boundary=21), "--boundary=21 is out of range: expected an integer 0..20"),
    (dict(num_steps=4, boundary=5), "--boundary=5 is out of range: expected an integer 0..4"),
    (dict(resolution=0), "--resolution=0 is out of range: expected a positive integer"),
    (dict(resolution=-64), "--resolution=-64 is out of range"),
    (dict(resolution=100), "--resolution 100 for pixart-alpha must be a multiple of 16"),
    (dict(resolution=64.0), "--resolution=64.0 is out of range"),
    (dict(max_batch=0), "--max-batch=0 is out of range: expected an integer 1..256"),
    (dict(max_batch=257), "--max-batch=257 is out of range: expected an integer 1..256"),
    (dict(precision="fp8"), "--precision 'fp8' is not one of fp32, fp16, int8"),
    (dict(opset=16), "--opset=16 is out of range: expected an integer 17..20"),
    (dict(opset=23), "--opset=23 is out of range: expected an integer 17..20"),
    (dict(exporter="onnxscript"), "--exporter 'onnxscript' is not one of torchscript, dynamo"),
    (dict(exporter="dynamo", opset=17), "--exporter dynamo needs --opset 18..20"),
    (dict(seed=-1), "--seed=-1 is out of range"),
    (dict(backends=("onnx", "trt")), "--backend 'trt' is not one of onnx, tensorrt, torch"),
]


@pytest.mark.parametrize("kwargs,message", RANGE_CASES, ids=[m.split(" ")[0] for _, m in RANGE_CASES])
def test_option_out_of_range_names_parameter_and_range(kwargs, message):
    with pytest.raises((OptionError, ModelError)) as info:
        resolve(tiny_options(**kwargs))
    assert message in str(info.value)


def test_option_in_range_edges_accepted():
    """The edges of each range are valid (so the range checks are not off by one)."""
    for kwargs in (dict(cached_blocks=1), dict(cached_blocks=5), dict(boundary=0), dict(boundary=20),
                   dict(num_steps=1, boundary=1, interval=1), dict(max_batch=1), dict(max_batch=256),
                   dict(opset=17), dict(opset=20), dict(num_steps=4)):
        job = resolve(tiny_options(**kwargs))
        assert job.cuts.num_layers == 6
    # The default boundary scales with --steps (12 of 20 → 2 of 4, the LCM setting of DESIGN.md §2).
    assert resolve(tiny_options(num_steps=4)).schedule["boundary"] == 2


@pytest.mark.parametrize("argv,message", [
    (["--cached-blocks", "6"], "Error: --cached-blocks=6 is out of range: expected an integer 1..5"),
    (["--steps", "0"], "Error: --steps=0 is out of range"),
    (["--boundary", "99"], "Error: --boundary=99 is out of range: expected an integer 0..20"),
    (["--model", "sdxl"], "Error: unknown model 'sdxl': expected one of"),
    (["--precision", "fp8"], "Invalid value for '--precision'"),
    (["--resolution", "abc"], "Invalid value for '--resolution'"),
    (["--set", "num_layers"], "Error: --set 'num_layers' is not key=value"),
])
def test_cli_shows_user_errors_without_traceback(argv, message, tmp_path):
    args = ["--model", "pixart-alpha", "--random-weights", "--resolution", str(TINY_RESOLUTION),
            *set_args(TINY_PIXART_SET), "--out", str(tmp_path / "out"), "-q", *argv]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (TypeError, KeyError))
    assert not (tmp_path / "out").exists()


def test_out_folder_that_is_not_an_export_is_never_replaced(tmp_path, monkeypatch):
    """A stale or wrong --out (a user's folder, a file) is refused before any work; its contents stay."""
    monkeypatch.setattr(build_mod, "build", lambda *a, **k: pytest.fail("work started for a bad --out"))
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"meow")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for out in (user, a_file):
        with pytest.raises(OptionError, match=f"--out {out} exists and is not a deltadit export"):
            export(tiny_options(out), QUIET)
    assert (user / "cat.jpg").read_bytes() == b"meow" and a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photos"]


# ------------------------------------------------------------------------------------------------ reuse


def test_reexport_reuses_and_says_so_force_rebuilds(prev_export):
    before = snapshot(prev_export)
    key = load_manifest(prev_export).export["cache_key"]
    result = CliRunner().invoke(cli_main, ["--model", "pixart-alpha", "--random-weights", "--resolution",
                                           str(TINY_RESOLUTION), *set_args(TINY_PIXART_SET), "--out",
                                           str(prev_export)])
    assert result.exit_code == 0, result.output
    assert "reused the existing export at" in result.output and "--force rebuilds" in result.output
    assert snapshot(prev_export) == before
    inode = (prev_export / "front.onnx").stat().st_ino
    forced = export(tiny_options(prev_export, force=True), QUIET)
    assert not forced.reused and forced.reports, "--force must rebuild every segment"
    assert (prev_export / "front.onnx").stat().st_ino != inode, "--force must write new files"
    assert assert_complete(prev_export) == key
    # A damaged file in the folder is never reused: the export would rebuild.
    with open(prev_export / "rear.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    assert reusable(prev_export, key) is None


def test_cache_key_changes_with_every_option_and_the_weights(weights_dirs, tmp_path):
    base = resolve(tiny_options()).cache_key
    # Where it goes and whether to rebuild do not change the artifacts; explicit defaults equal implicit ones.
    for same in (dict(out=str(tmp_path / "elsewhere")), dict(force=True), dict(parity_batches=(1, 3)),
                 dict(cached_blocks=4), dict(num_steps=20, interval=2, boundary=12)):
        assert resolve(tiny_options(**same)).cache_key == base, same
    changes = [dict(cached_blocks=3), dict(precision="fp16"), dict(opset=17), dict(exporter="dynamo"),
               dict(max_batch=2), dict(num_steps=10), dict(interval=3), dict(boundary=5), dict(seed=1),
               dict(overrides={**TINY_PIXART_SET, "num_layers": 8}), dict(resolution=128),
               dict(backends=("onnx", "torch")), dict(calibration={"b": 7})]
    keys = {resolve(tiny_options(**c)).cache_key for c in changes}
    assert len(keys) == len(changes) and base not in keys
    # Local weights: the key follows the file contents, not the path.
    local = dict(random_weights=False, overrides={})
    k0 = resolve(tiny_options(weights=str(weights_dirs["pixart"]), **local)).cache_key
    moved = shutil.copytree(weights_dirs["pixart"], tmp_path / "moved")
    assert resolve(tiny_options(weights=str(moved), **local)).cache_key == k0
    assert resolve(tiny_options(weights=str(weights_dirs["pixart_seed1"]), **local)).cache_key != k0


# ------------------------------------------------------------------------------------------------ full disk


def test_disk_full_mid_export_keeps_previous_and_rerun_succeeds(prev_export, monkeypatch):
    """ENOSPC at the third segment's ONNX file, then at the manifest: previous export intact, no leftovers."""
    import onnx

    before, key = snapshot(prev_export), load_manifest(prev_export).export["cache_key"]
    real_save, calls = onnx.save_model, []

    def save_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", save_model)
    with pytest.raises(ExportError) as info:
        export(tiny_options(prev_export, seed=1, force=True), QUIET)
    msg = str(info.value)
    assert "disk full while writing the export" in msg and "middle.onnx" in msg
    assert f"the previous export at {prev_export} is untouched" in msg and "Free space" in msg
    monkeypatch.setattr(onnx, "save_model", real_save)

    def full_manifest(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_mod, "write_manifest", full_manifest)
    with pytest.raises(ExportError, match="disk full while writing the export"):
        export(tiny_options(prev_export, seed=1, force=True), QUIET)
    monkeypatch.undo()
    assert snapshot(prev_export) == before and assert_complete(prev_export) == key
    assert not [p for p in prev_export.parent.iterdir() if p.name.startswith(".")], "partial files left"
    # The CLI shows it as a user error (no traceback); here the disk is full before the staging folder exists.
    monkeypatch.setattr(exporter_mod, "staging_dir", full_manifest)
    result = CliRunner().invoke(cli_main, ["--model", "pixart-alpha", "--random-weights", "--resolution",
                                           str(TINY_RESOLUTION), *set_args(TINY_PIXART_SET), "--seed", "1",
                                           "--force", "--out", str(prev_export), "-q"])
    assert result.exit_code == 1 and "Error: disk full while writing the export" in result.output
    assert "Traceback" not in result.output
    monkeypatch.undo()
    # The rerun succeeds; it is also the check that a changed option (the seed) rebuilds instead of reusing.
    old = load_manifest(prev_export)
    rerun = export(tiny_options(prev_export, seed=1, force=True), QUIET)
    new = load_manifest(prev_export)
    assert not rerun.reused and assert_complete(prev_export) != key
    assert new.segment("front").sha256 != old.segment("front").sha256
    assert not [p for p in prev_export.parent.iterdir() if p.name.startswith(".")]


def test_really_full_disk(pixart_export, tmpfs):
    tiny_tmpfs = tmpfs("small-disk", "520k")  # room for one tiny export (332 KiB), not two
    out = tiny_tmpfs / "pix"
    shutil.copytree(pixart_export, out)
    before, key = snapshot(out), load_manifest(out).export["cache_key"]
    with pytest.raises(ExportError) as info:
        export(tiny_options(out, seed=1, force=True), QUIET)
    assert "disk full while writing the export" in str(info.value)
    assert snapshot(out) == before and assert_complete(out) == key
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["pix"], "partial files left on the full disk"
    subprocess.run(["mount", "-o", "remount,size=2m", str(tiny_tmpfs)], check=True)
    assert export(tiny_options(out, seed=1, force=True), QUIET).reused is False
    assert assert_complete(out) != key


# ------------------------------------------------------------------------------------------------ publish


def _fake_export(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    (folder / MANIFEST_NAME).write_text(tag)
    (folder / "a.onnx").write_text(tag)
    return folder


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_publish_replaces_whole_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(publish_mod, "_exchange", lambda a, b: False)
    out = _fake_export(tmp_path / "out", "old")
    tmp = publish_mod.staging_dir(out)
    (tmp / MANIFEST_NAME).write_text("new")
    publish_mod.publish(tmp, out)
    assert (out / MANIFEST_NAME).read_text() == "new" and not (out / "a.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask()), "published folder must not stay 0700"


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_publish_failure_in_second_rename_puts_previous_back(tmp_path, monkeypatch):
    monkeypatch.setattr(publish_mod, "_exchange", lambda a, b: False)
    out = _fake_export(tmp_path / "out", "old")
    tmp = publish_mod.staging_dir(out)
    real, calls = os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real(a, b)

    monkeypatch.setattr(publish_mod.os, "replace", replace)
    with pytest.raises(OSError):
        publish_mod.publish(tmp, out)
    monkeypatch.undo()
    assert (out / MANIFEST_NAME).read_text() == "old"


def test_recover_restores_parked_and_removes_stale_temporaries(tmp_path):
    out = tmp_path / "out"
    _fake_export(tmp_path / ".out.old-12345", "old")  # killed between the two renames: out is gone
    dead = tmp_path / ".out.tmp-dead"
    dead.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (dead / ".pid").write_text(str(proc.pid))  # its owner is gone
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (live / ".pid").write_text(str(sleeper.pid))  # another export still running: keep its folder
        done = publish_mod.recover(out)
        assert (out / MANIFEST_NAME).read_text() == "old"
        assert not dead.exists() and live.exists()
        assert any("restored" in d for d in done) and any("removed stale temporary" in d for d in done)
        # A recycled pid (same number, another process start time) does not keep a stale folder alive.
        (live / ".pid").write_text(f"{sleeper.pid} 1")
        publish_mod.recover(out)
        assert not live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------------------ SIGKILL

DRIVER = r"""
import json, os, signal, sys, types
import deltadit_export.cli as cli
import deltadit_export.export_build as build
import deltadit_export.publish as publish
import deltadit_export.onnx_export, deltadit_export.split, deltadit_export.models, deltadit_export.exporter
import diffusers, onnx, onnxruntime
from diffusers import PixArtTransformer2DModel  # noqa: heavy lazy import, done once before forking

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(point):
    if point == "after-manifest":  # staging folder complete, not yet swapped in
        real = build.write_manifest
        build.write_manifest = lambda *a, **k: (real(*a, **k), die())
    elif point == "after-exchange":  # swapped in; the previous export sits in the staging folder
        real_x = publish._exchange
        publish._exchange = lambda a, b: (real_x(a, b) and die())
    elif point == "after-park":  # no renameat2: previous export parked, new one not yet renamed in
        publish._exchange = lambda a, b: False
        fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        fake.replace = lambda a, b: (os.replace(a, b), die())
        publish.os = fake

print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                arm(req.get("die_at"))
                cli.main(req["args"], prog_name="deltadit-export")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        print(json.dumps({"signal": sig, "code": os.WEXITSTATUS(status) if sig is None else None}), flush=True)
"""


class ExportDriver:
    """Runs `deltadit-export` (cli.main) in forked children of one process that imported everything once."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=workdir, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout.readline().strip() == "ready"
        self.runs = 0

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, args: list[str], die_at: str | None = None) -> tuple[int, Path]:
        self.runs += 1
        log = self.workdir / f"run{self.runs}.log"
        return self._ask({"op": "run", "args": args, "log": str(log), "die_at": die_at})["pid"], log

    def wait(self, pid: int) -> dict:
        return self._ask({"op": "wait", "pid": pid})

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _wait_for_line(log: Path, pattern: str, pid: int, timeout: float = 120) -> float | None:
    """Poll the child's log for a line; the monotonic time it was seen, or None if the child ended first."""
    rx, t0 = re.compile(pattern, re.M), time.monotonic()
    while time.monotonic() - t0 < timeout:
        if log.exists() and rx.search(log.read_text(errors="replace")):
            return time.monotonic()
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None
        if state == "Z":
            return None  # exited before printing it
        time.sleep(0.005)
    return None


def test_sigkilled_export_never_damages_previous(pixart_export, prev_export, tmp_path):
    """SIGKILL a real export at progress lines, at random moments and inside the swap; after every kill the
    output folder is a complete export (byte-identical to the previous one unless the swap had happened), no
    folder with a manifest is partial, and a rerun cleans up and succeeds."""
    args = ["--model", "pixart-alpha", "--random-weights", "--resolution", str(TINY_RESOLUTION),
            *set_args(TINY_PIXART_SET), "--seed", "1", "--force", "--out", str(prev_export)]
    driver = ExportDriver(tmp_path)
    rng = random.Random(5)
    old_key = load_manifest(prev_export).export["cache_key"]
    # Seven kills (each costs a partial or whole tiny export): while the model loads, inside a segment's ONNX
    # export, right after the last segment (racing the swap), at a seeded random moment of the build, and at the
    # three steps of the swap itself (staging complete; previous parked without renameat2; right after the
    # atomic exchange). Kills at or after the last segment may find the export finished (exit 0) or swapped in:
    # then the new export must be complete.
    may_finish = {"line:^head .* done", "delay", "die_at:after-exchange"}
    scenarios = [("line", r"^loading pixart-alpha"), ("line", r"^front .* export"), ("line", r"^head .* done"),
                 ("delay", rng.uniform(0.05, 0.9)), ("die_at", "after-manifest"), ("die_at", "after-park"),
                 ("die_at", "after-exchange")]
    build_seconds = None  # from "loading" to the last segment, measured on the "head done" run
    try:
        for kind, arg in scenarios:
            label = f"{kind}:{arg}" if kind != "delay" else kind
            before = snapshot(prev_export)
            pid, log = driver.start(args, die_at=arg if kind == "die_at" else None)
            if kind in ("line", "delay"):
                t_load = _wait_for_line(log, r"^loading", pid)
                assert t_load, f"{label}: no loading line:\n{log.read_text()}"
                if kind == "line":
                    t_line = _wait_for_line(log, arg, pid)
                    assert t_line, f"{label}: line not seen:\n{log.read_text()}"
                    if "head" in arg:
                        build_seconds = t_line - t_load
                else:
                    time.sleep(arg * build_seconds)  # a random moment inside the build
                os.kill(pid, signal.SIGKILL)
            status = driver.wait(pid)
            killed = status["signal"] == signal.SIGKILL
            assert killed or (label in may_finish and status["code"] == 0), (label, status, log.read_text())
            if arg == "after-park":
                # No renameat2, killed between the two renames: the previous export is parked whole under a
                # hidden name and the folder is absent (a loader says "no manifest", never loads half a
                # folder); the next export's recover() puts it back first.
                assert not prev_export.exists()
                with pytest.raises(ManifestError, match="no manifest"):
                    load_manifest(prev_export)
                done = publish_mod.recover(prev_export)
                assert done[0] == f"restored {prev_export} from an interrupted swap", done
            assert_no_partial_looks_complete(prev_export.parent)
            key = assert_complete(prev_export)
            if key == old_key:
                assert snapshot(prev_export) == before, f"{label}: previous export changed"
            else:
                assert label in may_finish, f"{label}: output replaced before the swap"
                shutil.rmtree(prev_export)  # put the seed-0 export back for the next kill
                shutil.copytree(pixart_export, prev_export)
        assert label == "die_at:after-exchange" and key != old_key  # that kill came after the swap
        # The same command again: cleans up every stale temporary and succeeds.
        pid, log = driver.start(args)
        assert driver.wait(pid)["code"] == 0, log.read_text()
        assert assert_complete(prev_export) != old_key
        assert [p.name for p in prev_export.parent.iterdir()] == [prev_export.name], "leftovers after the rerun"
    finally:
        driver.close()
