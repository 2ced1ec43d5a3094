"""The Triton Python-backend model: ``TritonPythonModel`` for the ``model.py`` that ``triton-repo`` writes.

Triton starts one stub process per instance (``instance_group``); each builds one
:class:`~runtime.serving.batching.BatchExecutor` (one ``DeltaDiTRuntime``) in ``initialize``, from the
``engines`` and ``threads`` model parameters. The dynamic batcher hands ``execute`` the requests that
arrived together (at most ``max_batch_size`` images in all); they run as one generation per schedule
and guidance, and every request gets its own response. A request that fails its checks gets a
``TritonError`` (INVALID_ARG, HTTP 400) naming the field and the fix; the others in the batch still run,
and the instance keeps serving.

Tensors (batch dimension first, one row per image; see :func:`input_specs`): strings travel as UTF-8
bytes in UINT8 tensors (zero-padded when one request holds several), because the Python-backend stub
bundled with Triton 2.51 (pybind11 older than 2.12) reads numpy 2's dtype descriptors wrongly: a BYTES
input kills the stub, and an output made with ``pb_utils.Tensor(name, array)`` gets a wrong byte size
whatever its dtype. Outputs are therefore handed over by DLPack (``Tensor.from_dlpack``), which works
with numpy 1 and 2 alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .schema import (ImageRequest, Limits, RequestError, check_class_label, check_embeds, check_guidance,
                     check_negative, check_policy, check_prompt, check_seed, check_steps)

# name, Triton data type, dims after the batch dimension, ragged (length may differ per request)
COMMON_INPUTS = (("seed", "TYPE_INT64", (1,), False), ("steps", "TYPE_INT32", (1,), False),
                 ("guidance", "TYPE_FP32", (1,), False), ("policy", "TYPE_UINT8", (-1,), True))


def input_specs(limits: Limits) -> list[dict[str, Any]]:
    """The model's inputs: the conditioning (required) and seed, steps, guidance, policy (optional)."""
    if limits.conditioning == "prompt":
        cond = [("prompt", "TYPE_UINT8", (-1,), True, False)]
    elif limits.conditioning == "class_label":
        cond = [("class_label", "TYPE_INT64", (1,), False, False)]
    else:
        tokens, channels = limits.embeds_shape
        # negative_*: the unconditional half of guidance, from the client's text encoder (required with guidance)
        cond = [("prompt_embeds", "TYPE_FP32", (tokens, channels), False, False),
                ("prompt_mask", "TYPE_FP32", (tokens,), False, True),
                ("negative_embeds", "TYPE_FP32", (tokens, channels), False, True),
                ("negative_mask", "TYPE_FP32", (tokens,), False, True)]
    specs = [dict(name=n, data_type=t, dims=d, ragged=r, optional=o) for n, t, d, r, o in cond]
    specs += [dict(name=n, data_type=t, dims=d, ragged=r, optional=True) for n, t, d, r in COMMON_INPUTS]
    return specs


def output_specs(limits: Limits, sample_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """``latents`` always; ``image`` (PNG bytes, zero-padded to the longest in the request) and ``image_size``
    (each PNG's length) for pixel-space models."""
    outs = [dict(name="latents", data_type="TYPE_FP32", dims=tuple(int(d) for d in sample_shape))]
    if limits.pixel_space:
        outs += [dict(name="image", data_type="TYPE_UINT8", dims=(-1,)),
                 dict(name="image_size", data_type="TYPE_INT64", dims=(1,))]
    return outs


# ---------------------------------------------------------------- tensors ↔ image requests (no Triton needed)


def _text_rows(array: np.ndarray, field: str) -> list[str]:
    if array.dtype != np.uint8 or array.ndim != 2:
        raise RequestError(field, f"'{field}' must be UTF-8 bytes in a UINT8 tensor [batch, length], got "
                                  f"{array.dtype} {list(array.shape)}")
    rows = []
    for row in array:
        try:
            rows.append(row.tobytes().rstrip(b"\x00").decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(field, f"'{field}' is not valid UTF-8: send the text encoded as UTF-8 bytes") from None
    return rows


def _scalars(array: np.ndarray | None, count: int, field: str) -> list | None:
    if array is None:
        return None
    if array.ndim != 2 or array.shape[0] != count:
        raise RequestError(field, f"'{field}' has shape {list(array.shape)}, expected [{count}, 1] (one value per image)")
    return [v.item() for v in array[:, 0]] if array.shape[1] == 1 else None


def parse_tensors(inputs: dict[str, np.ndarray | None], limits: Limits) -> list[ImageRequest]:
    """One request's input tensors (name → array with the batch dimension first) → one ImageRequest per row."""
    main = {"prompt": "prompt", "class_label": "class_label", "prompt_embeds": "prompt_embeds"}[limits.conditioning]
    if inputs.get(main) is None:
        raise RequestError(main, f"missing input '{main}': this model is conditioned on {main}")
    cond = inputs[main]
    count = int(cond.shape[0]) if cond.ndim else 0
    if count < 1:
        raise RequestError(main, f"'{main}' holds no image: send a batch dimension of at least 1")

    def column(field, check, default):
        values = _scalars(inputs.get(field), count, field)
        if inputs.get(field) is not None and values is None:
            raise RequestError(field, f"'{field}' must hold one value per image, shape [{count}, 1]")
        return [check(v) for v in values] if values is not None else [default] * count

    seeds = column("seed", check_seed, 0)
    steps = column("steps", lambda v: check_steps(v, limits), limits.default_steps)
    guidance = column("guidance", lambda v: check_guidance(v, limits), limits.default_guidance)
    policies = ([check_policy(p, limits) for p in _text_rows(inputs["policy"], "policy")]
                if inputs.get("policy") is not None else [limits.default_policy] * count)
    if len(policies) != count:
        raise RequestError("policy", f"'policy' holds {len(policies)} rows for {count} images: send one per image")
    per_image = [dict(seed=s, steps=t, guidance=g, policy=p) for s, t, g, p in zip(seeds, steps, guidance, policies)]

    if main == "prompt":
        prompts = [check_prompt(p, limits) for p in _text_rows(cond, "prompt")]
        return [ImageRequest(prompt=p, **kw) for p, kw in zip(prompts, per_image)]
    if main == "class_label":
        labels = _scalars(cond, count, "class_label")
        if labels is None:
            raise RequestError("class_label", f"'class_label' must have shape [{count}, 1]")
        return [ImageRequest(class_label=check_class_label(v, limits), **kw) for v, kw in zip(labels, per_image)]
    rows = {}
    for name, mask in (("prompt_mask", True), ("negative_embeds", False), ("negative_mask", True)):
        array = inputs.get(name)
        if array is None:
            rows[name] = [None] * count
            continue
        if array.ndim < 1 or array.shape[0] != count:
            raise RequestError(name, f"'{name}' holds {array.shape[0] if array.ndim else 0} rows for {count} images: "
                                     "send one per image")
        rows[name] = [check_embeds(row, limits, name, mask=mask) for row in array]
    if inputs.get("negative_mask") is not None and inputs.get("negative_embeds") is None:
        raise RequestError("negative_mask", "'negative_mask' without 'negative_embeds': send the negative prompt's "
                                            "states with its mask, or neither")
    images = []
    for i, kw in enumerate(per_image):
        check_negative(kw["guidance"], rows["negative_embeds"][i], limits)
        images.append(ImageRequest(prompt_embeds=check_embeds(cond[i], limits), prompt_mask=rows["prompt_mask"][i],
                                   negative_embeds=rows["negative_embeds"][i], negative_mask=rows["negative_mask"][i],
                                   **kw))
    return images


def result_tensors(results: list, requested: set[str] | None, limits: Limits) -> dict[str, np.ndarray]:
    """The output arrays of one request from its images' results (``requested``: output names, None for all)."""
    want = lambda name: not requested or name in requested  # noqa: E731
    out: dict[str, np.ndarray] = {}
    if want("latents"):
        out["latents"] = np.stack([r.sample.numpy() for r in results]).astype(np.float32)
    if limits.pixel_space and (want("image") or want("image_size")):
        pngs = [r.png() for r in results]
        longest = max(len(p) for p in pngs)
        image = np.zeros((len(pngs), longest), dtype=np.uint8)
        for i, p in enumerate(pngs):
            image[i, :len(p)] = np.frombuffer(p, dtype=np.uint8)
        out["image"] = image
        out["image_size"] = np.array([[len(p)] for p in pngs], dtype=np.int64)
    return out


# ---------------------------------------------------------------- the Python-backend model


def model_parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def engines_path(params: dict[str, str], args: dict) -> Path:
    """``engines`` is a path relative to the model's version folder (a self-contained repository), or absolute."""
    path = Path(params.get("engines", "engines"))
    return path if path.is_absolute() else Path(args["model_repository"]) / args["model_version"] / path


def _from_dlpack(tensor) -> np.ndarray:
    # Not tensor.as_numpy(): under numpy 2 the 2.51 stub builds that array with a misread item size, so
    # every element reads as the first one ("hello" arrives as "hhhhh"). DLPack carries dtype and strides.
    import torch

    return torch.from_dlpack(tensor.to_dlpack()).clone().numpy()


def _dlpack(array: np.ndarray):
    # torch's capsule is the one the stub reads directly (numpy's newer versioned capsule makes it log a
    # ValueError before it falls back).
    import torch
    from torch.utils.dlpack import to_dlpack

    return to_dlpack(torch.from_numpy(np.ascontiguousarray(array)))


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict) -> None:
        import torch
        import triton_python_backend_utils as pb_utils  # exists inside the Triton stub only

        from .batching import BatchExecutor

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        threads = int(params.get("threads") or 0) or None
        if threads:
            torch.set_num_threads(threads)  # this stub process is this instance's own: its thread budget
        device = None
        if args.get("model_instance_kind") == "GPU":  # written to the documented API; not run on a GPU yet
            device = f"cuda:{int(args.get('model_instance_device_id', 0))}"
        limits = {k: conv(params[k]) for k, conv in (("max_steps", int), ("max_guidance", float),
                                                      ("max_prompt_chars", int), ("default_guidance", float))
                  if params.get(k)}
        self.executor = BatchExecutor.from_folder(engines_path(params, args), backend=params.get("backend") or "auto",
                                                  threads=threads, device=device, **limits)
        self.limits = self.executor.limits
        self.executor.warmup()
        self.name = args.get("model_instance_name")
        self._say(f"deltadit instance {self.name} ready: {self.executor.runtime.manifest.model.get('name')} from "
                  f"{self.executor.runtime.root}, {threads or 'all'} thread(s)")

    def _say(self, message: str) -> None:
        """Into Triton's own log (pb_utils.Logger, Triton ≥ 23.04), else the stub's stdout (also in that log)."""
        logger = getattr(self.pb, "Logger", None)
        if logger is not None:
            logger.log_info(message)
        else:
            print(message, flush=True)

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        images: list[ImageRequest] = []
        spans: list[tuple[int, int, int]] = []  # request index, first image, image count
        for i, request in enumerate(requests):
            names = [s["name"] for s in input_specs(self.limits)]
            inputs = {}
            for name in names:
                tensor = pb.get_input_tensor_by_name(request, name)
                inputs[name] = _from_dlpack(tensor) if tensor is not None else None
            try:
                parsed = parse_tensors(inputs, self.limits)
            except RequestError as exc:
                responses[i] = pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.INVALID_ARG))
                continue
            except Exception as exc:  # a bug here must fail this request only, never the batch or the instance
                responses[i] = pb.InferenceResponse(error=pb.TritonError(
                    f"could not read the request: {type(exc).__name__}: {exc}", pb.TritonError.INTERNAL))
                continue
            spans.append((i, len(images), len(parsed)))
            images += parsed
        results = self.executor.run(images, return_exceptions=True) if images else []
        for i, start, count in spans:
            mine = results[start:start + count]
            failed = next((r for r in mine if isinstance(r, Exception)), None)
            if failed is not None:
                responses[i] = pb.InferenceResponse(error=pb.TritonError(
                    f"generation failed: {type(failed).__name__}: {failed}", pb.TritonError.INTERNAL))
                continue
            requested = set(requests[i].requested_output_names() or ())
            try:
                arrays = result_tensors(mine, requested, self.limits)
            except Exception as exc:
                responses[i] = pb.InferenceResponse(error=pb.TritonError(
                    f"could not encode the outputs: {type(exc).__name__}: {exc}", pb.TritonError.INTERNAL))
                continue
            # from_dlpack, not pb.Tensor(name, array): the 2.51 stub reads a numpy 2 array's byte size wrongly
            # ("output tensor shape does not match size of output"); DLPack carries dtype and shape itself.
            responses[i] = pb.InferenceResponse(output_tensors=[pb.Tensor.from_dlpack(k, _dlpack(v))
                                                                for k, v in arrays.items()])
        return responses

    def finalize(self) -> None:
        self._say(f"deltadit instance {self.name} shutting down")
        self.executor = None
