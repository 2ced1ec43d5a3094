"""Fuzzing (issue 5): the manifest loader and the runtime's input checks, a few hundred cases in CI.

Properties:
- a mutated or random manifest is either refused with a ManifestError, or accepted as one the runtime can run:
  its files stay inside the folder, and a runtime over it (fake engines that return zeros of the declared
  shapes) constructs and runs a step without any other exception;
- runtime inputs are accepted exactly when an independent oracle (written from the manifest's declared
  shapes, not from the implementation) says they are valid; refused ones raise InputError and never run an
  engine; accepted ones come out with the declared shapes and the engine dtype.
Derandomized so CI sees the same cases on every run (a failure is reproducible from the printed example).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import DeltaDiTRuntime, InputError, ManifestError
from runtime.backends import BackendError
from runtime.manifest import BATCH, MANIFEST_NAME, load_manifest, manifest_from_dict

def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------------ manifest


def _paths(node, prefix=()):
    """Every key path in a JSON tree (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
NAMES = st.sampled_from(["../front.onnx", "/etc/passwd", "..\\x.onnx", "a/../../b.onnx", "C:x.onnx", "x\x00.onnx",
                         "", ".", "sub/", "~/x.onnx", "front.onnx", "rear.onnx", "embed.onnx", "batch", "hidden",
                         "hidden_out", "out", "float16", "int64", "delta-dit", "caption", "class"])
SMALL_INTS = st.integers(-3, 30)


@st.composite
def mutated_manifest(draw, base: dict, paths: list):
    d = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = d
        try:
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this branch
        if not isinstance(parent, (dict, list)):
            continue
        action = draw(st.sampled_from(["delete", "json", "name", "int", "swap-type"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "json":
            parent[path[-1]] = draw(JSON)
        elif action == "name":
            parent[path[-1]] = draw(NAMES)
        elif action == "int":
            parent[path[-1]] = draw(SMALL_INTS)
        else:
            value = parent[path[-1]]
            parent[path[-1]] = [value] if not isinstance(value, list) else (value[0] if value else {})
    return d


class ZeroEngine:
    def __init__(self, spec, dtype):
        self.spec, self.dtype = spec, dtype

    def run(self, feeds):
        batch = next(iter(feeds.values())).shape[0]
        return {t.name: torch.zeros(t.concrete_shape(batch), dtype=self.dtype) for t in self.spec.outputs}


class ZeroBackend:
    name = "zero"
    device = torch.device("cpu")
    dtype = torch.float32

    def load(self, manifest, segment):
        return ZeroEngine(segment, self.dtype)

    def synchronize(self):
        pass


def _valid_inputs(rt: DeltaDiTRuntime, batch: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, mi in rt.model_inputs.items():
        shape = mi.spec.concrete_shape(batch)
        out[name] = torch.zeros(shape, dtype=torch.int64) if mi.spec.dtype.startswith("int") else torch.randn(shape)
    return out


@pytest.fixture(scope="module")
def base_manifests(pixart_export, dit_export):
    return {name: json.loads((folder / MANIFEST_NAME).read_text())
            for name, folder in (("pixart", pixart_export), ("dit", dit_export))}


def _check_accepted(manifest, root: Path) -> None:
    for seg in manifest.segments:
        for f in (seg.file, *seg.extra_files):
            real = (root / f).resolve()
            assert real == root.resolve() or root.resolve() in real.parents, f
    try:
        rt = DeltaDiTRuntime(manifest, backend=ZeroBackend(), verify=False)
    except (ManifestError, BackendError):
        return
    rt.new_generation(1)
    inputs = _valid_inputs(rt, 1)
    try:
        out = rt.forward(inputs)
    except InputError:
        return  # e.g. the fuzzed conditioning says "class" with a num_classes that refuses label 0
    head = manifest.segments[-1].outputs[0]
    assert tuple(out.shape) == head.concrete_shape(1)


@pytest.mark.parametrize("model", ["pixart", "dit"])
def test_fuzz_manifest_mutations(model, base_manifests, pixart_export, dit_export):
    base = base_manifests[model]
    root = pixart_export if model == "pixart" else dit_export
    paths = _paths(base)
    accepted = []

    @fuzz(150)
    @given(mutated_manifest(base, paths))
    def check(d):
        try:
            manifest = manifest_from_dict(json.loads(json.dumps(d)), root=root)
        except ManifestError as exc:
            assert str(exc)  # every refusal says something
            return
        accepted.append(1)
        _check_accepted(manifest, root)

    check()
    assert len(accepted) < 150  # most mutations must be refused (the loader is not a no-op)


@fuzz(60)
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(str.encode) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_manifest_bytes(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("m", numbered=True)
    (folder / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(ManifestError):
        load_manifest(folder)


# ------------------------------------------------------------------------------------------------ inputs

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]
OTHER_DTYPES = [torch.bool, torch.complex64]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES + OTHER_DTYPES


@st.composite
def input_case(draw, rt: DeltaDiTRuntime):
    max_batch = rt.manifest.max_batch
    batch = draw(st.integers(0, max_batch + 3))
    inputs, kinds = {}, {}
    for name, mi in rt.model_inputs.items():
        kind = draw(st.sampled_from(["ok"] * 6 + ["missing", "shape", "dtype", "not-tensor"]))
        kinds[name] = kind
        shape = mi.spec.concrete_shape(batch)
        is_int = mi.spec.dtype.startswith("int")
        dtype = torch.int64 if is_int else torch.float32
        if kind == "missing":
            continue
        if kind == "not-tensor":
            inputs[name] = draw(st.sampled_from([None, 1.5, [1, 2], "x"]))
            continue
        if kind == "shape":
            shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=5)))
        if kind == "dtype":
            dtype = draw(st.sampled_from(ALL_DTYPES))
        if name == "class_labels" and dtype not in OTHER_DTYPES:
            hi = draw(st.sampled_from([999, 1000, 1001, 5000]))
            lo = draw(st.sampled_from([0, 0, 0, -1]))
            t = torch.randint(lo, hi + 1, shape) if dtype != torch.uint8 else torch.randint(0, 255, shape)
            value = t.to(dtype)
        elif dtype in OTHER_DTYPES:
            value = torch.zeros(shape, dtype=dtype)
        else:
            value = (torch.rand(shape) * 900).to(dtype)
        inputs[name] = value
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        inputs[draw(st.sampled_from(["prompt", "latents", "guidance"]))] = torch.zeros(1)
    return inputs


def oracle(rt: DeltaDiTRuntime, inputs: dict) -> bool:
    """Valid exactly when: known names; every required input a tensor of the declared shape for one common
    batch 1..max_batch (a 0-d timestep counts as [1]); float inputs floating (a timestep may also be an
    integer); integer inputs integer; class ids within 0..null class."""
    if set(inputs) - set(rt.model_inputs):
        return False
    batches = set()
    for name, mi in rt.model_inputs.items():
        v = inputs.get(name)
        if v is None:
            if mi.optional:
                continue
            return False
        if not isinstance(v, torch.Tensor):
            return False
        shape = tuple(v.shape) if not (name == "timestep" and v.ndim == 0) else (1,)
        spec = mi.spec.shape
        if len(shape) != len(spec) or any(s != d for s, d in zip(shape[1:], spec[1:])) or spec[0] != BATCH:
            return False
        batches.add(shape[0])
        floating = v.dtype.is_floating_point
        if mi.spec.dtype.startswith("float"):
            ok = floating or (name == "timestep" and v.dtype in INT_DTYPES)
        else:
            ok = v.dtype in INT_DTYPES
        if not ok:
            return False
        if name == "class_labels" and v.numel() and not (0 <= int(v.min()) and int(v.max()) <= 1000):
            return False
    return len(batches) == 1 and 1 <= batches.pop() <= rt.manifest.max_batch


@pytest.fixture(scope="module")
def fuzz_runtimes(pixart_export, dit_export):
    return {"pixart": DeltaDiTRuntime(pixart_export, backend=ZeroBackend()),
            "dit": DeltaDiTRuntime(dit_export, backend=ZeroBackend())}


@pytest.mark.parametrize("model", ["pixart", "dit"])
def test_fuzz_runtime_inputs(model, fuzz_runtimes):
    rt = fuzz_runtimes[model]
    seen = {True: 0, False: 0}

    @fuzz(120)
    @given(input_case(rt))
    def check(inputs):
        valid = oracle(rt, inputs)
        seen[valid] += 1
        if not valid:
            with pytest.raises(InputError) as info:
                rt.prepare_inputs(inputs)
            assert str(info.value)
            return
        feeds = rt.prepare_inputs(inputs)
        batch = feeds["sample"].shape[0]
        assert set(feeds) == set(rt.model_inputs)
        for name, mi in rt.model_inputs.items():
            assert tuple(feeds[name].shape) == mi.spec.concrete_shape(batch), name
            want = torch.int64 if mi.spec.dtype.startswith("int") else rt.dtype
            assert feeds[name].dtype == want, name
        out = rt.step(rt.new_generation(batch, rt.schedule("none", num_steps=1)), inputs)
        assert out.shape[0] == batch

    check()
    assert seen[True] >= 10 and seen[False] >= 10, seen  # both sides of the oracle were exercised
