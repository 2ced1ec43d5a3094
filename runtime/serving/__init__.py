"""Serving: Triton Inference Server (model repository + Python-backend model) and Ray Serve, on the runtime.

Modules, one job each (none imports Ray or Triton at import time except ``ray_app``):

* ``schema``: what a request may hold and its checks (:class:`RequestError` names the field and the fix);
* ``batching``: :class:`BatchExecutor` joins compatible image requests into generations, splits results back;
* ``images``: samples → uint8 pixels → PNG bytes;
* ``triton_model``, ``triton_repo``, ``triton_server``: the Python-backend model, the repository writer, and
  a launcher for the tritonserver that nvidia-pytriton bundles;
* ``ray_app``: the Ray Serve deployment (``@serve.batch``, replicas, health check);
* ``client``, ``loadtest``, ``bench``: loopback-only clients, the load test, the benchmark matrix;
* ``cli``: the ``serve`` click group (``python -m runtime.serving``).
"""

from .batching import BatchExecutor, ImageResult
from .schema import ImageRequest, Limits, ParsedRequest, RequestError, parse_json_request

__all__ = ["BatchExecutor", "ImageResult", "ImageRequest", "Limits", "ParsedRequest", "RequestError",
           "parse_json_request"]
