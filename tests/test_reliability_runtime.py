"""Reliability of the runtime (issue 5): bad manifests and changed engine files are refused before anything is
loaded, bad inputs are refused naming the input, NaN/Inf is caught at the step and segment where it appears, and
generations never share state (8 threads on one runtime, abandoned generations)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import copy_export, edit_manifest

from runtime import DeltaDiTRuntime, GenerationError, InputError, ManifestError, NonFiniteError, generate
from runtime.backends import BackendError
from runtime.dropin import DeltaDiTTransformer
from runtime.integrity import file_sha256
from runtime.manifest import MANIFEST_NAME, load_manifest

# ------------------------------------------------------------------------------------------------ helpers




def pix_inputs(rt: DeltaDiTRuntime, batch: int = 1, seed: int = 0, t: float = 500.0, **override):
    g = torch.Generator().manual_seed(seed)
    c, h, w = rt.manifest.sample_shape
    cond = rt.manifest.conditioning
    d = {"sample": torch.randn(batch, c, h, w, generator=g), "timestep": torch.full((batch,), t),
         "encoder_hidden_states": torch.randn(batch, cond["tokens"], cond["channels"], generator=g)}
    d.update(override)
    return d


def dit_inputs(rt: DeltaDiTRuntime, batch: int = 1, seed: int = 0, t: float = 500.0, **override):
    g = torch.Generator().manual_seed(seed)
    c, h, w = rt.manifest.sample_shape
    d = {"sample": torch.randn(batch, c, h, w, generator=g), "timestep": torch.full((batch,), t),
         "class_labels": torch.randint(0, 1000, (batch,), generator=g)}
    d.update(override)
    return d


class SpyBackend:
    """Records every segment a runtime tries to load; a refused manifest must load none."""

    name = "spy"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self):
        self.loaded: list[str] = []

    def load(self, manifest, segment):
        self.loaded.append(segment.name)
        raise AssertionError("a segment was loaded from a refused manifest")

    def synchronize(self):
        pass


class CountingEngine:
    def __init__(self, engine, counter: list):
        self.engine, self.counter, self.spec = engine, counter, engine.spec

    def run(self, feeds):
        self.counter.append(self.spec.name)
        return self.engine.run(feeds)


@pytest.fixture(scope="module")
def pix_rt(pixart_export) -> DeltaDiTRuntime:
    return DeltaDiTRuntime(pixart_export)


@pytest.fixture(scope="module")
def dit_rt(dit_export) -> DeltaDiTRuntime:
    return DeltaDiTRuntime(dit_export)


# ------------------------------------------------------------------------------------------------ row 3: manifest


def _seg(d, name):
    return next(s for s in d["segments"] if s["name"] == name)


RAW = "raw"  # a change that wrote the manifest file itself


def _drop(key):
    return lambda f, d: d.pop(key) and None


def _write(text: bytes):
    return lambda f, d: ((f / MANIFEST_NAME).write_bytes(text), RAW)[1]


def _set_file(name, value):
    return lambda f, d: _seg(d, name).__setitem__("file", value)


REQUIRED = ["model", "resolution", "sample_shape", "out_channels", "num_layers", "cached_blocks", "cuts", "schedule",
            "precision", "max_batch", "conditioning", "segments"]

# (id, change(folder, manifest dict) -> None, substring of the ManifestError)
MANIFEST_CASES = [
    ("missing", lambda f, d: ((f / MANIFEST_NAME).unlink(), RAW)[1], "no manifest at"),
    ("empty-file", _write(b""), "is not valid JSON"),
    ("not-json", _write(b"{'format': deltadit"), "is not valid JSON"),
    ("binary", _write(bytes(range(256)) * 4), "is not valid JSON"),
    ("json-array", _write(b"[1, 2, 3]"), "manifest must be a JSON object, got list"),
    ("deep-nesting", _write(b"[" * 100000 + b"]" * 100000), "manifest"),
    ("other-format", lambda f, d: d.__setitem__("format", "onnx-bundle"), "not a deltadit manifest"),
    ("version-2", lambda f, d: d.__setitem__("format_version", 2), "format_version 2 is not supported"),
    ("version-str", lambda f, d: d.__setitem__("format_version", "1"), "format_version '1' is not supported"),
    ("version-missing", _drop("format_version"), "format_version None is not supported"),
    *[(f"no-{k}", _drop(k), f"manifest field `{k}` is missing") for k in REQUIRED],
    ("no-model-name", lambda f, d: d["model"].pop("name") and None, "manifest field `model.name` is missing"),
    ("no-seg-file", lambda f, d: _seg(d, "front").pop("file") and None, "`segments[1].file` is missing"),
    ("no-seg-sha", lambda f, d: _seg(d, "rear").pop("sha256") and None, "`segments[3].sha256` is missing"),
    ("no-seg-inputs", lambda f, d: _seg(d, "head").pop("inputs") and None, "`segments[4].inputs` is missing"),
    ("bad-sha", lambda f, d: _seg(d, "embed").__setitem__("sha256", "abc"), "is not a sha256"),
    ("num-layers-str", lambda f, d: d.__setitem__("num_layers", "6"), "`num_layers` must be int, got '6'"),
    ("max-batch-0", lambda f, d: d.__setitem__("max_batch", 0), "`max_batch` = 0 must be ≥ 1"),
    ("cuts-wrong", lambda f, d: d.__setitem__("cuts", {"a": 1, "c": 5}), "do not match N_c=4, L=6"),
    ("steps-0", lambda f, d: d["schedule"].__setitem__("num_steps", 0), "`schedule.num_steps` = 0 must be ≥ 1"),
    ("boundary-big", lambda f, d: d["schedule"].__setitem__("boundary", 99), "schedule.boundary` = 99 is out of"),
    ("cond-kind", lambda f, d: d["conditioning"].__setitem__("kind", "audio"), "conditioning.kind` = 'audio'"),
    ("no-head", lambda f, d: d["segments"].pop() and None, "are incomplete or out of order"),
    ("swapped-order", lambda f, d: d["segments"].reverse(), "are incomplete or out of order"),
    ("blocks-wrong", lambda f, d: _seg(d, "rear").__setitem__("blocks", [3, 6]), "covers blocks (3, 6)"),
    ("hidden-renamed", lambda f, d: _seg(d, "embed")["outputs"][0].__setitem__("name", "tokens"),
     "segment 'embed' has no output named 'hidden'"),
    ("hidden-shape", lambda f, d: _seg(d, "middle")["inputs"][0].__setitem__("shape", ["batch", 16, 17]),
     "segment 'middle' input 'hidden' is float32 ['batch', 16, 17]"),
    ("no-batch-axis", lambda f, d: _seg(d, "head")["outputs"][0].__setitem__("shape", [1, 8, 8, 8]),
     "expected 'batch' first"),
    ("bad-dtype", lambda f, d: _seg(d, "embed")["inputs"][0].__setitem__("dtype", "float8"), "is not one of"),
    # File names that leave the folder, or are not plain names.
    ("dotdot", _set_file("front", "../front.onnx"), "points outside the engine folder"),
    ("dotdot-deep", _set_file("front", "a/../../front.onnx"), "points outside the engine folder"),
    ("absolute", _set_file("rear", "/etc/passwd"), "points outside the engine folder"),
    ("backslash", _set_file("rear", "..\\rear.onnx"), "points outside the engine folder"),
    ("unc", _set_file("rear", "\\\\server\\share\\rear.onnx"), "points outside the engine folder"),
    ("drive", _set_file("embed", "C:/engines/embed.onnx"), "points outside the engine folder"),
    ("home", _set_file("embed", "~/embed.onnx"), "points outside the engine folder"),
    ("nul", _set_file("head", "head.onnx\x00.txt"), "is not a plain file name"),
    ("dot", _set_file("head", "."), "is not a plain file name"),
    ("empty-name", _set_file("head", ""), "must be a file name"),
    ("extra-dotdot", lambda f, d: _seg(d, "front").__setitem__("extra_files", ["../weights.bin"]),
     "points outside the engine folder"),
]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifest_refused_nothing_loaded(case, pixart_export, tmp_path):
    _, change, fragment = case
    folder = copy_export(pixart_export, tmp_path)
    d = json.loads((folder / MANIFEST_NAME).read_text())
    if change(folder, d) != RAW:
        (folder / MANIFEST_NAME).write_text(json.dumps(d))
    spy = SpyBackend()
    for verify in (True, False):  # the override skips sha256 checks, never the manifest's own checks
        with pytest.raises(ManifestError) as info:
            DeltaDiTRuntime(folder, backend=spy, verify=verify)
        assert fragment in str(info.value)
    assert spy.loaded == []


def test_symlink_out_of_folder_refused(pixart_export, tmp_path):
    folder = copy_export(pixart_export, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(folder / "front.onnx", outside)
    os.symlink(outside, folder / "front.onnx")  # same bytes, so the sha256 matches: only the link gives it away
    spy = SpyBackend()
    for verify in (True, False):
        with pytest.raises(ManifestError, match="is a link to .*elsewhere.onnx, outside the engine folder"):
            DeltaDiTRuntime(folder, backend=spy, verify=verify)
    assert spy.loaded == []
    os.unlink(folder / "front.onnx")
    os.symlink("front-real.onnx", folder / "front.onnx")  # a link inside the folder is fine
    shutil.move(outside, folder / "front-real.onnx")
    DeltaDiTRuntime(folder)


# ------------------------------------------------------------------------------------------------ row 4: files


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


FILE_CASES = [
    # (id, file suffix, change, does ONNX Runtime still load it with verify=False?)
    ("graph-bit-flipped", ".onnx", _flip, None),  # may or may not parse: the sha256 is the reliable guard
    ("graph-truncated", ".onnx", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), False),
    ("graph-empty", ".onnx", lambda p: p.write_bytes(b""), False),
    ("graph-text", ".onnx", lambda p: p.write_text("this is not an onnx model\n"), False),
    ("graph-random", ".onnx", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), False),
    ("weights-bit-flipped", ".onnx.data", _flip, True),  # silently different weights: only the sha256 sees it
    ("weights-truncated", ".onnx.data", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), False),
    # Same I/O, other weights; the copied graph reads front.onnx.data, not one of rear's hashed files: refused.
    ("other-segment", "", lambda p: [shutil.copy(p.parent / f"front{x}", p.parent / f"rear{x}")
                                     for x in (".onnx", ".onnx.data")], "location"),
]


# Every change on embed, a block segment and head; a copy of another segment only where one fits (rear ← front).
FILE_PAIRS = [(c, seg) for c in FILE_CASES for seg in (("rear",) if c[0] == "other-segment" else
                                                       ("embed", "rear", "head"))]


@pytest.mark.parametrize("case,segment", FILE_PAIRS, ids=[f"{c[0]}-{seg}" for c, seg in FILE_PAIRS])
def test_changed_segment_file_refused_naming_file(case, segment, pixart_export, tmp_path):
    name, suffix, change, loadable = case
    folder = copy_export(pixart_export, tmp_path)
    if suffix == ".onnx.data" and not (folder / f"{segment}.onnx.data").exists():
        pytest.skip("this export keeps the weights inside the graph file")
    path = folder / f"{segment}{suffix or '.onnx'}"
    change(path)
    spy = SpyBackend()
    with pytest.raises(ManifestError) as info:
        DeltaDiTRuntime(folder, backend=spy)
    msg = str(info.value)
    assert f"segment {segment!r}" in msg and f"{path.name} was changed or damaged after export" in msg
    assert "verify=False" in msg and "--force" in msg
    assert spy.loaded == [], "nothing may be loaded before every file is verified"
    # The explicit override: a file that is not ONNX still gives a clear error, naming it; never a crash.
    if loadable is False:
        with pytest.raises(BackendError) as info:
            DeltaDiTRuntime(folder, verify=False)
        assert f"segment {segment!r}" in str(info.value) and f"{segment}.onnx" in str(info.value)
        assert "is not a loadable ONNX file" in str(info.value)
    elif loadable is True:
        DeltaDiTRuntime(folder, verify=False)  # the user said they changed it on purpose
    elif loadable == "location":  # verify=False skips hashes, never the external-data locations
        with pytest.raises(ManifestError, match=r"keeps the data of tensor .* in 'front.onnx.data', which is not one "
                                                r"of the segment's hashed weight files \(rear.onnx.data\)"):
            DeltaDiTRuntime(folder, verify=False)
    else:
        try:
            DeltaDiTRuntime(folder, verify=False)
        except BackendError as exc:
            assert f"{segment}.onnx" in str(exc)


def test_missing_files_refused(pixart_export, tmp_path):
    for file in ("middle.onnx", "middle.onnx.data"):
        folder = copy_export(pixart_export, tmp_path, f"eng-{file}")
        if not (folder / file).exists():
            continue
        (folder / file).unlink()
        with pytest.raises(ManifestError, match=f"segment 'middle': file .*{file} is missing"):
            DeltaDiTRuntime(folder, backend=SpyBackend())
        with pytest.raises(BackendError, match="segment 'middle': .*middle.onnx"):
            DeltaDiTRuntime(folder, verify=False)


# ------------------------------------------------------------------------------------------------ row 5: inputs


def _pix_case(**override):
    return lambda rt: pix_inputs(rt, **override)


PIX_INPUT_CASES = [
    ("sample-shape", _pix_case(sample=torch.randn(1, 4, 8, 9)),
     "input 'sample' has shape [1, 4, 8, 9], expected [1, 4, 8, 8]"),
    ("sample-rank", _pix_case(sample=torch.randn(4, 8, 8)), "input 'sample' has shape [4, 8, 8], expected [4, 4, 8, 8]"),
    ("sample-channels", _pix_case(sample=torch.randn(1, 8, 8, 8)), "expected [1, 4, 8, 8]"),
    ("caption-tokens", _pix_case(encoder_hidden_states=torch.randn(1, 77, 24)),
     "input 'encoder_hidden_states' has shape [1, 77, 24], expected [1, 120, 24]"),
    ("caption-width", _pix_case(encoder_hidden_states=torch.randn(1, 120, 4096)),
     "input 'encoder_hidden_states' has shape [1, 120, 4096], expected [1, 120, 24]"),
    ("mask-shape", _pix_case(encoder_attention_mask=torch.ones(1, 77)),
     "input 'encoder_attention_mask' has shape [1, 77], expected [1, 120]"),
    ("timestep-batch", _pix_case(timestep=torch.full((2,), 5.0)), "input 'timestep' has shape [2], expected [1]"),
    ("batch-mismatch", lambda rt: pix_inputs(rt, 2, encoder_hidden_states=torch.randn(1, 120, 24)),
     "input 'encoder_hidden_states' has shape [1, 120, 24], expected [2, 120, 24]"),
    ("sample-int", _pix_case(sample=torch.ones(1, 4, 8, 8, dtype=torch.int64)),
     "input 'sample' has dtype torch.int64, expected a floating dtype"),
    ("sample-bool", _pix_case(sample=torch.ones(1, 4, 8, 8, dtype=torch.bool)), "has dtype torch.bool"),
    ("sample-complex", _pix_case(sample=torch.ones(1, 4, 8, 8, dtype=torch.complex64)), "has dtype torch.complex64"),
    ("timestep-bool", _pix_case(timestep=torch.ones(1, dtype=torch.bool)), "input 'timestep' has dtype torch.bool"),
    ("batch-too-big", lambda rt: pix_inputs(rt, 9), "batch 9 is out of range: the engines were exported for 1..8"),
    ("missing-caption", lambda rt: {k: v for k, v in pix_inputs(rt).items() if k != "encoder_hidden_states"},
     "missing input 'encoder_hidden_states' (shape ['batch', 120, 24], float32)"),
    ("unknown-name", _pix_case(prompt=torch.ones(1)), "unknown input(s) 'prompt': this model takes"),
    ("numpy-array", _pix_case(sample=np.zeros((1, 4, 8, 8), np.float32)),
     "input 'sample' must be a torch.Tensor of shape ['batch', 4, 8, 8] (float32), got ndarray"),
    ("a-list", lambda rt: list(pix_inputs(rt).values()), "inputs must be a dict of name -> torch.Tensor, got list"),
]

DIT_INPUT_CASES = [
    ("labels-float", lambda rt: dit_inputs(rt, class_labels=torch.tensor([3.0])),
     "input 'class_labels' has dtype torch.float32, expected an integer dtype (int64)"),
    ("labels-too-big", lambda rt: dit_inputs(rt, class_labels=torch.tensor([1001])),
     "input 'class_labels' holds 1001, out of range: expected class ids 0..999, or 1000 for the unconditional"),
    ("labels-negative", lambda rt: dit_inputs(rt, 2, class_labels=torch.tensor([5, -1])),
     "input 'class_labels' holds -1, out of range"),
    ("labels-shape", lambda rt: dit_inputs(rt, class_labels=torch.tensor([[3]])),
     "input 'class_labels' has shape [1, 1], expected [1]"),
    ("batch-too-big", lambda rt: dit_inputs(rt, 12), "batch 12 is out of range: the engines were exported for 1..8"),
]


def _assert_refused_before_running(rt, make, fragment, monkeypatch):
    with pytest.raises(InputError) as info:
        rt.prepare_inputs(make(rt))
    assert fragment in str(info.value)
    ran: list[str] = []
    monkeypatch.setattr(rt, "engines", {k: CountingEngine(e, ran) for k, e in rt.engines.items()})
    inputs = make(rt)
    with pytest.raises(InputError):
        if isinstance(inputs, dict) and isinstance(inputs.get("sample"), torch.Tensor):
            rt.step(rt.new_generation(1, rt.schedule("none", num_steps=1)), inputs)
        else:
            rt.forward(inputs)
    assert ran == [], "no engine may run on refused inputs"


@pytest.mark.parametrize("case", PIX_INPUT_CASES, ids=[c[0] for c in PIX_INPUT_CASES])
def test_bad_pixart_inputs_refused(case, pix_rt, monkeypatch):
    _assert_refused_before_running(pix_rt, case[1], case[2], monkeypatch)


@pytest.mark.parametrize("case", DIT_INPUT_CASES, ids=[c[0] for c in DIT_INPUT_CASES])
def test_bad_dit_inputs_refused(case, dit_rt, monkeypatch):
    _assert_refused_before_running(dit_rt, case[1], case[2], monkeypatch)


def test_generation_batch_and_misuse_refused(pix_rt, dit_rt):
    for bad in (0, 9, -1, True, 2.0, "2"):
        with pytest.raises(InputError, match=r"batch size .* is out of range: the engines were exported for 1..8"):
            pix_rt.new_generation(bad)
    gen = pix_rt.new_generation(2)
    with pytest.raises(InputError, match=r"input 'sample' has shape \[1, 4, 8, 8\], expected \[2, 4, 8, 8\]"):
        pix_rt.step(gen, pix_inputs(pix_rt, 1))
    foreign = pix_rt.new_generation(1)
    foreign.token_shape = (foreign.token_shape[0] + 1, foreign.token_shape[1])  # engines of another model
    with pytest.raises(InputError, match="made by another runtime"):
        dit_rt.step(foreign, dit_inputs(dit_rt))
    with pytest.raises(InputError, match=r"batch 12 is out of range|batch size 12"):
        generate(pix_rt, prompt_embeds=torch.randn(6, 120, 24), negative_embeds=torch.zeros(6, 120, 24),
                 num_steps=2)  # 6 images × 2 (guidance) rows
    gen = pix_rt.new_generation(1, pix_rt.schedule("none", num_steps=1))
    pix_rt.step(gen, pix_inputs(pix_rt))
    with pytest.raises(GenerationError, match="all have run; start a new generation"):
        pix_rt.step(gen, pix_inputs(pix_rt))
    gen = pix_rt.new_generation(1)
    gen.lock.acquire()  # another thread is inside a step of this generation
    try:
        with pytest.raises(GenerationError, match="already running a step in another thread"):
            pix_rt.step(gen, pix_inputs(pix_rt))
    finally:
        gen.lock.release()
    assert gen.step_index == 0
    with pytest.raises(ValueError, match="nan_policy='skip' is not one of"):
        DeltaDiTRuntime(load_manifest(pix_rt.root), nan_policy="skip")


def test_acceptable_inputs_are_normalised(pix_rt, dit_rt):
    """What the checks must let through: grads, float64, integer or 0-d timesteps, an int32 label."""
    ref = pix_rt.forward(pix_inputs(pix_rt))
    x = pix_inputs(pix_rt)
    x["sample"] = x["sample"].clone().requires_grad_(True)
    assert torch.equal(pix_rt.forward(x), ref)
    x = pix_inputs(pix_rt)
    x = {k: v.double() for k, v in x.items()}
    assert torch.equal(pix_rt.forward(x), ref)
    x = pix_inputs(pix_rt)
    x["timestep"] = torch.tensor(500)
    assert torch.equal(pix_rt.forward(x), ref)
    y = dit_inputs(dit_rt)
    assert torch.equal(dit_rt.forward({**y, "class_labels": y["class_labels"].int()}), dit_rt.forward(y))
    dit_rt.forward(dit_inputs(dit_rt, class_labels=torch.tensor([1000])))  # the null class is valid


# ------------------------------------------------------------------------------------------------ row 8: NaN/Inf


def test_extreme_and_nan_inputs_detected(pix_rt):
    huge = pix_inputs(pix_rt, sample=torch.full((1, 4, 8, 8), 3e38))
    with pytest.raises(NonFiniteError, match=r"NaN/Inf in the output of segment 'embed' at step 0 \(full\)"):
        pix_rt.forward(huge)
    huge = pix_inputs(pix_rt, encoder_hidden_states=torch.full((1, 120, 24), 3e38))
    with pytest.raises(NonFiniteError, match=r"segment 'embed' at step 0"):
        pix_rt.forward(huge)
    for name in ("sample", "encoder_hidden_states", "timestep"):
        x = pix_inputs(pix_rt)
        x[name] = x[name].clone()
        x[name].view(-1)[0] = float("nan")
        with pytest.raises(NonFiniteError, match=f"input '{name}' holds NaN/Inf at step 0"):
            pix_rt.forward(x)


def _poison_weight(folder: Path, segment: str) -> None:
    """Set one bias of a segment to +Inf (a corrupted weight) and record the new sha256s, as an export from a
    corrupted checkpoint would."""
    import onnx
    from onnx import numpy_helper

    path = folder / f"{segment}.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name.endswith("ff.net.2.bias"))
    arr = numpy_helper.to_array(init).copy()
    arr[0] = np.inf
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    seg = load_manifest(folder).segment(segment)
    if seg.extra_files:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=seg.extra_files[0], size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    edit_manifest(folder, lambda d: _seg(d, segment).update(
        sha256=file_sha256(path), extra_sha256={f: file_sha256(folder / f) for f in seg.extra_files}))


def test_corrupted_weight_detected_at_step_and_segment(pixart_export, tmp_path):
    folder = copy_export(pixart_export, tmp_path)
    _poison_weight(folder, "rear")
    for policy in ("error", "fallback"):  # a full step has nothing to fall back to
        rt = DeltaDiTRuntime(folder, nan_policy=policy)
        gen = rt.new_generation(1)
        with pytest.raises(NonFiniteError, match=r"segment 'rear' at step 0 \(full\)"):
            rt.step(gen, pix_inputs(rt))
        assert gen.step_index == 0
    rt = DeltaDiTRuntime(folder, nan_policy="off")  # the explicit override: no check, NaN passes through
    assert not torch.isfinite(rt.forward(pix_inputs(rt))).all()


def test_corrupted_delta_error_or_full_step_fallback(pixart_export):
    """A NaN that comes only from a stored delta: the default raises at the cached step naming the range; the
    fallback recomputes that step in full (bit-identical to a full step), records clean deltas and finishes."""
    strict = DeltaDiTRuntime(pixart_export)
    lenient = DeltaDiTRuntime(pixart_export, nan_policy="fallback")
    sched = strict.schedule("delta-dit", num_steps=6, interval=2, boundary=3)  # steps 1: cache rear, 3, 5: front
    for rt in (strict, lenient):
        gen = rt.new_generation(1, sched)
        rt.step(gen, pix_inputs(rt, t=900))
        gen.deltas["rear"][0, 3, 5] = float("nan")
        if rt is strict:
            with pytest.raises(NonFiniteError, match=r"segment 'rear range \(cached: input \+ delta stored at a "
                                                     r"full step\)' at step 1 \(cache-rear\)"):
                rt.step(gen, pix_inputs(rt, t=800))
            continue
        out = rt.step(gen, pix_inputs(rt, t=800))
        assert gen.nan_fallbacks == [1]
        assert torch.equal(out, rt.forward(pix_inputs(rt, t=800))), "the fallback is a full step"
        assert all(torch.isfinite(d).all() for d in gen.deltas.values()), "the fallback re-records the deltas"
        for i, t in enumerate((700, 600, 500, 400), start=2):
            assert torch.isfinite(rt.step(gen, pix_inputs(rt, t=t))).all()
        assert gen.done and gen.nan_fallbacks == [1]


# ------------------------------------------------------------------------------------------------ rows 9–10: state


def _run_alone(rt, seed: int, steps: int, barrier=None):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(1, 120, 24, generator=g)
    callback = (lambda i, latents: barrier.wait(timeout=60)) if barrier is not None else None
    return generate(rt, prompt_embeds=prompt, negative_embeds=torch.zeros_like(prompt), num_steps=steps, generator=g,
                    step_callback=callback).latents


def test_eight_threads_share_one_runtime(pix_rt):
    """8 generations in lockstep on one runtime (a barrier after every step maximises interleaving): each
    result equals, bit for bit, the same generation run alone; results differ between seeds (so a mix-up
    would show)."""
    steps, seeds = 6, list(range(100, 108))
    alone = {s: _run_alone(pix_rt, s, steps) for s in seeds}
    assert len({tuple(v.flatten()[:8].tolist()) for v in alone.values()}) == len(seeds)
    barrier = threading.Barrier(len(seeds))
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = _run_alone(pix_rt, seed, steps, barrier)
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for s in seeds:
        assert torch.equal(results[s], alone[s]), f"seed {s}: concurrent result differs from the same run alone"


def test_eight_threads_share_one_dropin(dit_rt):
    """The diffusers drop-in shared by 8 threads (per-thread generations), DiT this time."""
    dropin = DeltaDiTTransformer(dit_rt, "delta-dit")
    timesteps = [999.0 - 110 * i for i in range(8)]

    def loop(seed, barrier=None):
        x = dit_inputs(dit_rt, 2, seed=seed)
        dropin.begin_generation(len(timesteps))  # not installed: each generation says its step count
        outs = []
        for t in timesteps:
            out = dropin(x["sample"], timestep=torch.tensor(t), class_labels=x["class_labels"]).sample
            outs.append(out)
            x["sample"] = x["sample"] - 0.1 * out[:, :4]
            if barrier is not None:
                barrier.wait(timeout=60)
        return torch.stack(outs)

    alone = {s: loop(s) for s in range(8)}
    barrier, results = threading.Barrier(8), {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, loop(s, barrier))) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(8))
    for s in range(8):
        assert torch.equal(results[s], alone[s])


def test_abandoned_generation_leaves_next_unaffected(pix_rt, pixart_export):
    fresh = DeltaDiTRuntime(pixart_export)
    reference = _run_alone(fresh, 7, 6)

    class Abandon(Exception):
        pass

    def bail(i, latents):
        if i == 2:
            raise Abandon

    with pytest.raises(Abandon):
        generate(pix_rt, prompt_embeds=torch.randn(1, 120, 24), negative_embeds=torch.zeros(1, 120, 24), num_steps=6,
                 step_callback=bail)
    assert torch.equal(_run_alone(pix_rt, 7, 6), reference)
    # A step refused mid-generation (bad input, NaN) changes nothing: the same generation continues exactly.
    sched = pix_rt.schedule("delta-dit", num_steps=4, interval=2, boundary=2)
    a, b = pix_rt.new_generation(1, sched), pix_rt.new_generation(1, sched)
    outs_a = [pix_rt.step(a, pix_inputs(pix_rt, seed=i, t=900 - 100 * i)) for i in range(4)]
    outs_b = []
    for i in range(4):
        with pytest.raises(InputError):
            pix_rt.step(b, pix_inputs(pix_rt, seed=i, sample=torch.randn(1, 4, 8, 7)))
        with pytest.raises(NonFiniteError):
            pix_rt.step(b, pix_inputs(pix_rt, seed=i, sample=torch.full((1, 4, 8, 8), float("inf"))))
        outs_b.append(pix_rt.step(b, pix_inputs(pix_rt, seed=i, t=900 - 100 * i)))
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))


def test_abandoned_pipeline_call_in_dropin(dit_rt, dit_export):
    """A hand-written loop that raises half-way; the next loop on the same drop-in starts a fresh generation and
    equals a loop on a brand-new drop-in. Not installed, the drop-in refuses a restart whose step count it was not
    told, rather than guessing it (installed, the scheduler says it: test_dropin)."""
    from runtime.dropin import DropInError

    timesteps = [999.0 - 110 * i for i in range(8)]
    x = dit_inputs(dit_rt, 2, seed=3)

    def loop(dropin, n=len(timesteps), begin=True):
        if begin:
            dropin.begin_generation(len(timesteps))
        return [dropin(x["sample"], timestep=torch.tensor(t), class_labels=x["class_labels"]).sample
                for t in timesteps[:n]]

    reference = loop(DeltaDiTTransformer(DeltaDiTRuntime(dit_export), "delta-dit"))
    dropin = DeltaDiTTransformer(dit_rt, "delta-dit")
    loop(dropin, 3)  # abandoned after 3 of 8 steps
    assert dropin.generation.step_index == 3
    with pytest.raises(DropInError, match="does not know how many steps"):
        loop(dropin, begin=False)  # the timestep went back up: a new generation, of unknown length
    assert all(torch.equal(a, b) for a, b in zip(loop(dropin), reference))
    loop(dropin, 5)
    assert all(torch.equal(a, b) for a, b in zip(loop(dropin), reference))
