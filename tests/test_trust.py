"""Loading a folder never runs code or reads outside it (issue 9 §3).

Each test plays the attacker of README "Trust model": a folder from elsewhere whose manifest hashes were
recomputed after the change, so sha256 verification alone cannot see it.
"""

import builtins
import hashlib
import io
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import TINY_PIXART_SET, copy_export, edit_manifest, set_args

from runtime import DeltaDiTRuntime, ManifestError, ScheduleError, generate, load_manifest
from runtime.backends import BackendError
from runtime.manifest import MANIFEST_NAME

SEGMENTS = ("embed", "front", "middle", "rear", "head")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()






class SpyBackend:
    """An engine library stand-in that reads ONNX: records every segment it is asked to load."""

    name = "spy"
    device = torch.device("cpu")
    dtype = torch.float32
    reads_onnx = True

    def __init__(self):
        self.loaded = []

    def load(self, manifest, segment):
        self.loaded.append(segment.name)
        raise AssertionError("an engine was created from a refused folder")

    def synchronize(self):
        pass


# ------------------------------------------------------------------------------------------------ pickled artifacts


def hostile_program(path: Path, marker: Path) -> None:
    """A real torch.export program whose weight is a pickle that creates ``marker`` when unpickled."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    class Payload:
        def __reduce__(self):
            return builtins.open, (str(marker), "w")  # harmless, and visible: the file appears

    good = path.with_suffix(".good.pt2")
    torch.export.save(torch.export.export(Tiny(), (torch.ones(3),)), good)
    payload = io.BytesIO()
    torch.save(Payload(), payload)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                for entry in cfg["config"].values():
                    entry["use_pickle"] = True
                data = json.dumps(cfg).encode()
            elif "/data/weights/weight_" in info.filename:
                data = payload.getvalue()
            dst.writestr(info, data)
    good.unlink()


@pytest.fixture()
def hostile_torch_folder(pixart_export, tmp_path):
    """An export whose torch programs carry a payload, manifest hashes recomputed; returns (folder, marker)."""
    folder = copy_export(pixart_export, tmp_path)
    marker = tmp_path / "PAYLOAD-RAN"
    files = {}
    for seg in SEGMENTS:
        hostile_program(folder / f"{seg}.pt2", marker)
        files[seg] = {"file": f"{seg}.pt2", "sha256": sha(folder / f"{seg}.pt2")}
    edit_manifest(folder, lambda d: d["engines"].update(
        torch={"files": files, "torch": torch.__version__, "dtype": "float32"}))
    # The payload is real: torch.export.load runs it.
    with pytest.raises(Exception):
        torch.export.load(str(folder / "embed.pt2"))
    assert marker.exists()
    marker.unlink()
    return folder, marker


@pytest.mark.parametrize("backend", ["torch", "torch-compile"])
def test_pickled_programs_need_the_opt_in(backend, hostile_torch_folder):
    folder, marker = hostile_torch_folder
    for verify in (True, False):
        with pytest.raises(BackendError) as info:
            DeltaDiTRuntime(folder, backend=backend, verify=verify)
        msg = str(info.value)
        assert f"backend {backend!r} loads <segment>.pt2 programs with torch.export.load (it unpickles them)" in msg
        assert "trust_artifacts=True (CLI: --trust-artifacts)" in msg and "backend='onnxruntime'" in msg
    assert not marker.exists()
    # A backend built directly (not through make_backend or the runtime) refuses too.
    from runtime.backends.torch_backend import TorchBackend

    with pytest.raises(BackendError, match="trust_artifacts=True"):
        TorchBackend(device="cpu").load(load_manifest(folder), load_manifest(folder).segment("embed"))
    assert not marker.exists()


def test_auto_never_implies_the_opt_in(hostile_torch_folder, monkeypatch, caplog):
    """auto on a CUDA host without TensorRT/onnxruntime-gpu used to pick torch-cuda and run the payload."""
    import runtime.backends.torch_backend as tb

    folder, marker = hostile_torch_folder
    monkeypatch.setattr(tb, "require_cuda", lambda name, device=None: torch.device("cpu"))  # "a GPU is here"
    with caplog.at_level(logging.WARNING, logger="deltadit"):
        rt = DeltaDiTRuntime(folder)
    assert rt.backend.name == "onnxruntime" and not marker.exists()
    assert any("torch-cuda skipped: its <segment>.pt2 programs" in r.getMessage() and "--trust-artifacts" in
               r.getMessage() for r in caplog.records)
    # Opting in by name does what it says: the programs are loaded (and this one runs its payload).
    with pytest.raises(Exception):
        DeltaDiTRuntime(folder, trust_artifacts=True)
    assert marker.exists()


def test_tensorrt_plans_need_the_opt_in_too():
    from runtime.backends.tensorrt_backend import TensorRTBackend

    assert "native code" in TensorRTBackend.code_artifacts
    backend = TensorRTBackend.__new__(TensorRTBackend)  # no TensorRT here: the check comes before any TensorRT call
    backend.trust_artifacts = False
    with pytest.raises(BackendError, match=r"backend 'tensorrt' loads TensorRT plans .* trust_artifacts=True"):
        backend.load(None, None)


def test_cli_refuses_pickled_backends_without_the_flag(hostile_torch_folder):
    from deltadit_export.bench import cli as bench_cli
    from deltadit_export.evaluate import main as eval_main
    from deltadit_export.generate import main as generate_main

    folder, marker = hostile_torch_folder
    out = CliRunner().invoke(bench_cli, ["--engines", str(folder), "--backend", "torch", "--modes", "none"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "Error: backend 'torch' loads <segment>.pt2 programs" in out.output and "--trust-artifacts" in out.output
    assert not marker.exists()
    for cli in (bench_cli, generate_main, eval_main):  # every CLI that loads a folder takes the opt-in
        assert "--trust-artifacts" in CliRunner().invoke(cli, ["--help"]).output


# ------------------------------------------------------------------------------------------------ ONNX external data


def _external(tensor):
    return {e.key: e for e in tensor.external_data}


def _relocate_first(model, location):
    t = next(t for t in model.graph.initializer if _external(t))
    _external(t)["location"].value = location


def _external_tensor(name, location, dims=(4,)):
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(dims))))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _add_sparse(model, location):
    from onnx import helper, numpy_helper

    values = _external_tensor("sparse_values", location, (4,))
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(values, numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx"), [2, 2]))


def _add_subgraph_constant(model, location):
    """An If node whose branch holds a Constant with external data: attributes inside subgraphs are walked too."""
    from onnx import TensorProto, helper

    const = helper.make_node("Constant", [], ["c"], value=_external_tensor("const", location))
    branch = helper.make_graph([const], "branch", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    model.graph.initializer.append(cond)
    model.graph.node.append(helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch))


def _drop_location(model, _):
    t = next(t for t in model.graph.initializer if _external(t))
    kept = [(e.key, e.value) for e in t.external_data if e.key != "location"]
    del t.external_data[:]
    for k, v in kept:
        e = t.external_data.add()
        e.key, e.value = k, v


LOCATION_CASES = [
    ("dotdot", _relocate_first, "../secret.bin", "leaves the folder ('..')"),
    ("absolute", _relocate_first, "ABS", "is an absolute path"),
    ("other-segment", _relocate_first, "embed.onnx.data", "is not one of the segment's hashed weight files "
                                                          "(front.onnx.data)"),
    ("unhashed-file", _relocate_first, "loose.bin", "is not one of the segment's hashed weight files"),
    ("sparse-initializer", _add_sparse, "../secret.bin", "leaves the folder"),
    ("subgraph-attribute", _add_subgraph_constant, "../secret.bin", "leaves the folder"),
    ("no-location", _drop_location, None, "has no location"),
]


@pytest.mark.parametrize("case", LOCATION_CASES, ids=[c[0] for c in LOCATION_CASES])
def test_external_data_outside_the_hashed_files_refused(case, pixart_export, tmp_path, monkeypatch):
    import onnx
    import onnxruntime

    name, mutate, location, fragment = case
    folder = copy_export(pixart_export, tmp_path)
    secret = tmp_path / "secret.bin"
    shutil.copy(folder / "front.onnx.data", secret)  # what an old onnxruntime would read as weights
    shutil.copy(folder / "front.onnx.data", folder / "loose.bin")
    location = str(secret) if location == "ABS" else location
    model = onnx.load(str(folder / "front.onnx"), load_external_data=False)
    mutate(model, location)
    onnx.save_model(model, str(folder / "front.onnx"))
    edit_manifest(folder, lambda d: next(s for s in d["segments"] if s["name"] == "front").update(
        sha256=sha(folder / "front.onnx")))  # the attacker recomputes the hash
    sessions = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: sessions.append(a) or 1 / 0)
    for verify in (True, False):
        spy = SpyBackend()
        with pytest.raises(ManifestError) as info:
            DeltaDiTRuntime(folder, backend=spy, verify=verify)
        assert spy.loaded == [], "checked before any engine is created"
        msg = str(info.value)
        assert "segment 'front':" in msg and fragment in msg and "refused before any engine is created" in msg
        with pytest.raises(ManifestError, match="refused before any engine is created"):
            DeltaDiTRuntime(folder, backend="onnxruntime", verify=verify)
    assert sessions == [], "no ONNX Runtime session may see the graph"


def test_onnxruntime_floor_checks_external_data_too():
    """onnxruntime 1.20 (allowed by the old >=1.18) reads '../' and absolute locations; 1.24 refuses them for dense
    tensors and 1.27 for sparse ones too (probed: 1.23.2 and 1.26.0 read a sparse '../' file, 1.27.0 refuses)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    for name in ("onnxruntime", "onnxruntime-gpu"):
        spec = next(r.specifier for r in reqs if r.name == name)
        assert not spec.contains(Version("1.26.0")) and spec.contains(Version("1.27.0")), (name, spec)


# ------------------------------------------------------------------------------------------------ companion files


def test_companion_files_are_hashed_at_export(digits_export):
    m = load_manifest(digits_export)
    assert set(m.companion_files) == {"scheduler/scheduler_config.json", "text_encoder/config.json"}
    for rel, digest in m.companion_files.items():
        assert sha(digits_export / rel) == digest
    DeltaDiTRuntime(digits_export)


def test_changed_companion_file_refused(digits_export, tmp_path):
    from types import SimpleNamespace

    from runtime.sampling import default_scheduler

    folder = copy_export(digits_export, tmp_path)
    config = folder / "scheduler" / "scheduler_config.json"
    d = json.loads(config.read_text())
    d["solver_order"] = 3  # a different sampler: every image changes, no segment file does
    config.write_text(json.dumps(d))
    fragment = (r"companion file 'scheduler/scheduler_config.json': .*scheduler_config.json was changed or damaged "
                r"after export .*re-export with `deltadit-export ... --force`, or load it anyway with "
                r"DeltaDiTRuntime\(..., verify=False\)")
    with pytest.raises(ManifestError, match=fragment):
        DeltaDiTRuntime(folder, backend=SpyBackend())
    with pytest.raises(ManifestError, match="was changed or damaged after export"):
        default_scheduler(SimpleNamespace(root=folder))  # bench's and generate's path, without a runtime
    from runtime.__main__ import main as runtime_main

    with pytest.raises(SystemExit) as exit_info:  # deltadit-runtime info verifies them too
        runtime_main(["info", str(folder)])
    assert exit_info.value.code == 1
    rt = DeltaDiTRuntime(folder, verify=False)  # the user said they changed it on purpose
    assert default_scheduler(rt).config.solver_order == 3


def test_unrecorded_companion_file_refused(digits_export, tmp_path):
    folder = copy_export(digits_export, tmp_path)
    (folder / "text_encoder" / "vocab.json").write_text("{}")
    with pytest.raises(ManifestError, match=r"text_encoder/vocab.json is not recorded in the manifest .*re-export"):
        DeltaDiTRuntime(folder, backend=SpyBackend())


def test_old_manifest_without_companion_hashes_is_refused_then_rebuilt(digits_export, tmp_path):
    """Decision: an export from before companion files were hashed is not loaded (its sampler config could have been
    changed unseen); the message says to re-export, and deltadit-export rebuilds it instead of reusing it."""
    from deltadit_export.export_options import ExportOptions
    from deltadit_export.exporter import export
    from deltadit_export.progress import Progress

    folder = copy_export(digits_export, tmp_path)
    edit_manifest(folder, lambda d: d.pop("companion_files"))
    with pytest.raises(ManifestError, match=r"scheduler_config.json is not recorded in the manifest \(an export made "
                                            r"before companion files were hashed"):
        DeltaDiTRuntime(folder)
    assert not export(ExportOptions(out=str(folder)), Progress(quiet=True)).reused
    DeltaDiTRuntime(folder)


def test_companion_folder_linking_out_refused(digits_export, tmp_path):
    folder = copy_export(digits_export, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(folder / "scheduler", outside)
    os.symlink(outside, folder / "scheduler")  # same bytes, so every sha256 matches: only the link gives it away
    for verify in (True, False):
        with pytest.raises(ManifestError, match="is a link to .*elsewhere.*, outside the engine folder"):
            DeltaDiTRuntime(folder, backend=SpyBackend(), verify=verify)


def test_text_encoder_folder_must_be_the_companion_one(digits_export, tmp_path):
    folder = copy_export(digits_export, tmp_path)
    edit_manifest(folder, lambda d: d["conditioning"].update(text_encoder="../../etc"))
    with pytest.raises(ManifestError, match=r"`conditioning.text_encoder` = '../../etc': expected 'text_encoder'"):
        load_manifest(folder)


# ------------------------------------------------------------------------------------------------ bounds


@pytest.fixture()
def no_plans(monkeypatch):
    """Fail the test if any step plan is built: a refusal must come before the (T-long) schedule exists."""
    import runtime.schedule as schedule

    def built(*args, **kwargs):
        raise AssertionError("a step plan was built before the step count was checked")

    monkeypatch.setattr(schedule, "_full_step", built)
    monkeypatch.setattr(schedule, "_cached_step", built)


def test_huge_step_counts_refused_before_any_plan(pixart_export, no_plans):
    from runtime.schedule import build_schedule

    msg = r"num_steps=1000000000 is out of range: expected 1 ≤ num_steps ≤ 10000 \(longer schedules are refused"
    for policy in ("none", "delta-dit", "delta-rear"):
        with pytest.raises(ScheduleError, match=msg):
            build_schedule(policy, num_steps=10**9, num_layers=6, cached_blocks=4, boundary=3)
    rt = DeltaDiTRuntime(pixart_export)
    with pytest.raises(ScheduleError, match=msg):
        rt.schedule("delta-dit", num_steps=10**9)
    with pytest.raises(ScheduleError, match=msg):
        generate(rt, prompt_embeds=torch.zeros(1, 120, 24), negative_embeds=torch.zeros(1, 120, 24), num_steps=10**9)


def test_manifest_asking_for_a_huge_schedule_refused(pixart_export, tmp_path, no_plans):
    folder = copy_export(pixart_export, tmp_path)
    edit_manifest(folder, lambda d: d["schedule"].update(num_steps=10**9))
    with pytest.raises(ManifestError, match=r"`schedule.num_steps` = 1000000000 is out of range 1..10000 .*re-export"):
        DeltaDiTRuntime(folder, backend=SpyBackend())


def test_clis_refuse_huge_step_counts_fast(pixart_export, digits_export, no_plans, capsys):
    from deltadit_export.bench import cli as bench_cli
    from deltadit_export.cli import main as export_cli
    from deltadit_export.generate import main as generate_main
    from runtime.__main__ import main as runtime_main

    with pytest.raises(SystemExit) as exit_info:
        runtime_main(["schedule", str(pixart_export), "--steps", "100000000"])
    assert exit_info.value.code == 1
    assert "Error: num_steps=100000000 is out of range: expected 1 ≤ num_steps ≤ 10000" in capsys.readouterr().err
    runs = [
        (export_cli, ["--model", "pixart-alpha", "--random-weights", "--resolution", "64", *set_args(TINY_PIXART_SET),
                      "--steps", "100000000", "--print-schedule"],
         "Error: --steps=100000000 is out of range: expected an integer 1..10000"),
        (bench_cli, ["--engines", str(pixart_export), "--steps", "100000000"], "Error: num_steps=100000000 is out of"),
        (generate_main, ["--engines", str(digits_export), "--steps", "100000000", "--no-timing"],
         "Error: num_steps=100000000 is out of range"),
    ]
    for cli, args, expected in runs:
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 1 and expected in out.output and "Traceback" not in out.output, out.output


def _set_hidden(d, shape):
    for seg in d["segments"]:
        for t in seg["inputs"] + seg["outputs"]:
            if t["name"] in ("hidden", "hidden_out"):
                t["shape"] = shape


SHAPE_CASES = [
    ("tokens×width", lambda d: _set_hidden(d, ["batch", 10**6, 10**6]),
     "asks for more than 268,435,456 elements per batch row"),
    ("rank", lambda d: _set_hidden(d, ["batch"] + [2] * 9), "has 10 axes, more than the 8"),
    ("max-batch", lambda d: d.update(max_batch=10**9), "`max_batch` = 1000000000 is out of range 1..1024"),
    ("layers", lambda d: d.update(num_layers=10**9), "`num_layers` = 1000000000 is out of range 2..1024"),
]


@pytest.mark.parametrize("case", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_manifest_asking_for_unbounded_memory_refused(case, pixart_export, tmp_path):
    folder = copy_export(pixart_export, tmp_path)
    edit_manifest(folder, case[1])
    spy = SpyBackend()
    with pytest.raises(ManifestError, match=case[2]):
        DeltaDiTRuntime(folder, backend=spy, verify=False)
    assert spy.loaded == []


def test_manifest_size_capped_before_it_is_read(pixart_export, tmp_path, monkeypatch):
    folder = copy_export(pixart_export, tmp_path)
    with open(folder / MANIFEST_NAME, "r+b") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MiB that cost nothing to make
    import runtime.manifest as manifest_module

    monkeypatch.setattr(manifest_module.json, "loads", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("an oversized manifest was parsed")))
    with pytest.raises(ManifestError, match=r"manifest.json is 67,108,864 bytes, more than the 16,777,216 a manifest "
                                            r"may have .*re-export"):
        load_manifest(folder)


def test_manifest_oddities_give_manifest_errors(pixart_export, tmp_path):
    folder = copy_export(pixart_export, tmp_path)
    text = (folder / MANIFEST_NAME).read_text()
    (folder / MANIFEST_NAME).write_text(text.replace('"max_batch": 8', '"max_batch": 1' + "0" * 5000))
    with pytest.raises(ManifestError, match="is not a manifest .*re-export"):
        load_manifest(folder)  # Python refuses to convert a 5001-digit integer: a ValueError, not a traceback
    outside = tmp_path / "manifest-elsewhere.json"
    outside.write_text(text)
    (folder / MANIFEST_NAME).unlink()
    os.symlink(outside, folder / MANIFEST_NAME)
    with pytest.raises(ManifestError, match="is a link to .*manifest-elsewhere.json, outside the engine folder"):
        load_manifest(folder)


def test_companion_configs_bounded(digits_export, tmp_path):
    from runtime.text_encoder import HashedWordEncoder

    folder = copy_export(digits_export, tmp_path)
    config = folder / "scheduler" / "scheduler_config.json"
    with open(config, "r+b") as f:
        f.truncate(32 * 2**20)  # sparse
    edit_manifest(folder, lambda d: d["companion_files"].update({"scheduler/scheduler_config.json": sha(config)}))
    with pytest.raises(ManifestError, match=r"scheduler_config.json is 33,554,432 bytes, more than the 16,777,216"):
        DeltaDiTRuntime(folder, backend=SpyBackend())
    with pytest.raises(ValueError, match="need dim <= 8192 and max_tokens <= 1024"):
        HashedWordEncoder.from_config({"kind": "hashed-words", "dim": 10**6, "max_tokens": 10**6})


def test_caption_shape_in_conditioning_must_match_the_engines(pixart_export, tmp_path):
    """bench and calibration allocate caption states from conditioning.tokens/channels: bounded by the engines."""
    folder = copy_export(pixart_export, tmp_path)
    edit_manifest(folder, lambda d: d["conditioning"].update(tokens=10**9))
    with pytest.raises(ManifestError, match=r"says tokens=1000000000, channels=24, but segment 'embed' takes "
                                            r"encoder_hidden_states \['batch', 120, 24\]"):
        load_manifest(folder)
