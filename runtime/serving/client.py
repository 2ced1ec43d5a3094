"""Small HTTP clients for the two servers (KServe v2 JSON for Triton, our JSON for Ray), loopback only.

Used by the load test and the tests; the standard library's ``http.client`` with one kept-alive
connection per client, so each load-test worker thread holds its own connection. They refuse any
address outside this machine: a load test must never reach another host.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import urllib.parse
from dataclasses import dataclass

import numpy as np


class ClientError(ValueError):
    """A URL or server the clients cannot use; the message says why and what to pass instead."""


def check_loopback(url: str) -> urllib.parse.SplitResult:
    """``url`` split, if it is http:// on a loopback address (127.0.0.0/8, ::1, localhost); else ClientError."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback or parts.port is None:
        raise ClientError(f"--url {url!r}: the load test sends traffic to this machine only; pass "
                          "http://127.0.0.1:PORT (or localhost, [::1]) with the server's port")
    return parts


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.status == 200

    def json(self):
        return json.loads(self.body)


class _Http:
    def __init__(self, url: str, timeout: float = 600.0):
        self.parts = check_loopback(url)
        self.prefix = self.parts.path.rstrip("/")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Reply:
        headers = {"Content-Type": content_type} if body is not None else {}
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: reconnect once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=self.timeout)
            try:
                self._conn.request(method, self.prefix + path, body=body, headers=headers)
                r = self._conn.getresponse()
                return Reply(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # An open kept-alive connection holds up a server's graceful shutdown (Triton waits for its HTTP
    # connections to close): use clients in a with block, or close() them.
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _text_tensor(name: str, text: str) -> dict:
    data = list(text.encode("utf-8"))
    return {"name": name, "datatype": "UINT8", "shape": [1, len(data)], "data": data}


class TritonClient(_Http):
    """KServe v2 over HTTP/JSON: ``/v2/models/<model>/infer``."""

    engine = "triton"

    def __init__(self, url: str, model: str = "deltadit", **kw):
        super().__init__(url, **kw)
        self.model = model

    def infer_body(self, *, prompt: str | None = None, class_label: int | None = None,
                   prompt_embeds: np.ndarray | None = None, prompt_mask: np.ndarray | None = None,
                   negative_embeds: np.ndarray | None = None, negative_mask: np.ndarray | None = None,
                   seed: int = 0, steps: int | None = None, guidance: float | None = None, policy: str | None = None,
                   outputs=("image", "image_size")) -> dict:
        """One image's request; caption states and masks are that image's ([tokens, channels], [tokens])."""
        # Triton batches only requests that carry the same inputs: the masks go along (all ones: every token kept,
        # what the model assumes for an absent mask), so any two caption-states requests of this client can batch.
        if prompt_embeds is not None and prompt_mask is None:
            prompt_mask = np.ones(np.shape(prompt_embeds)[0], np.float32)
        if negative_embeds is not None and negative_mask is None:
            negative_mask = np.ones(np.shape(negative_embeds)[0], np.float32)
        inputs = []
        if prompt is not None:
            inputs.append(_text_tensor("prompt", prompt))
        if class_label is not None:
            inputs.append({"name": "class_label", "datatype": "INT64", "shape": [1, 1], "data": [int(class_label)]})
        for name, value in (("prompt_embeds", prompt_embeds), ("prompt_mask", prompt_mask),
                            ("negative_embeds", negative_embeds), ("negative_mask", negative_mask)):
            if value is not None:
                e = np.asarray(value, np.float32)
                inputs.append({"name": name, "datatype": "FP32", "shape": [1, *e.shape], "data": e.ravel().tolist()})
        inputs.append({"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [int(seed)]})
        if steps is not None:
            inputs.append({"name": "steps", "datatype": "INT32", "shape": [1, 1], "data": [int(steps)]})
        if guidance is not None:
            inputs.append({"name": "guidance", "datatype": "FP32", "shape": [1, 1], "data": [float(guidance)]})
        if policy is not None:
            inputs.append(_text_tensor("policy", policy))
        return {"inputs": inputs, "outputs": [{"name": o} for o in outputs]}

    def infer(self, body: dict | bytes) -> Reply:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", f"/v2/models/{self.model}/infer", data)

    def generate_one(self, *, output: str = "png", **fields) -> Reply:
        """One image; on success ``body`` is the PNG (cut to ``image_size``), or with ``output="latents"`` (latent
        models have no PNG) the KServe JSON answer holding the ``latents`` tensor."""
        if output == "latents":
            return self.infer(self.infer_body(**fields, outputs=("latents",)))
        reply = self.infer(self.infer_body(**fields))
        if reply.ok:
            outs = {o["name"]: o for o in reply.json()["outputs"]}
            size = int(outs["image_size"]["data"][0])
            reply.body = bytes(outs["image"]["data"][:size])
        return reply

    def config(self) -> dict:
        return self.request("GET", f"/v2/models/{self.model}/config").json()

    def stats(self) -> dict:
        """``inference_count`` (images) and ``execution_count`` (execute calls) of the model so far."""
        stats = self.request("GET", f"/v2/models/{self.model}/stats").json()["model_stats"][0]
        return {"inference_count": int(stats.get("inference_count", 0)),
                "execution_count": int(stats.get("execution_count", 0))}

    def describe(self) -> dict:
        cfg = self.config()
        groups = cfg.get("instance_group") or [{}]
        params = {k: v.get("string_value") for k, v in (cfg.get("parameters") or {}).items()}
        inputs = {i["name"]: [int(d) for d in i.get("dims", [])] for i in cfg.get("input", [])}
        outputs = {o["name"] for o in cfg.get("output", [])}
        return {"engine": "triton", "instances": sum(int(g.get("count", 1)) for g in groups),
                "threads": params.get("threads"), "batching": "dynamic_batching" in cfg,
                "max_images": int(cfg.get("max_batch_size", 1)), "conditioning": _conditioning(inputs),
                "embeds_shape": inputs.get("prompt_embeds"), "pixel_space": "image" in outputs}


class RayClient(_Http):
    """The Ray Serve app's JSON API: ``POST /``, ``GET /info``."""

    engine = "ray"

    def generate(self, payload: dict | bytes) -> Reply:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", "/", data)

    def generate_one(self, *, output: str = "png", **fields) -> Reply:
        """One image; on success ``body`` is the PNG, or with ``output="latents"`` the JSON answer."""
        payload = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in fields.items() if v is not None}
        return self.generate(payload | {"output": output})

    def describe(self) -> dict:
        info = self.request("GET", "/info").json()
        limits = info.get("limits", {})
        return {"engine": "ray", "instances": info.get("replicas"), "threads": info.get("threads_per_replica"),
                "batching": info.get("batching"), "max_images": info.get("max_images"),
                "conditioning": limits.get("conditioning"), "embeds_shape": limits.get("embeds_shape"),
                "pixel_space": bool(limits.get("pixel_space", True))}


def _conditioning(inputs: dict) -> str:
    return next((n for n in ("prompt", "class_label", "prompt_embeds") if n in inputs), "prompt")


def connect(url: str, protocol: str = "auto", model: str = "deltadit", timeout: float = 600.0):
    """A client for the server at ``url``: ``triton``, ``ray``, or ``auto`` (asks Triton's health route first)."""
    check_loopback(url)
    if protocol == "auto":
        probe = _Http(url, timeout=10)
        try:
            protocol = "triton" if probe.request("GET", "/v2/health/live").ok else "ray"
        except OSError as exc:
            raise ClientError(f"no server answers at {url} ({exc}); start one first (`serve triton` or `serve ray`)") \
                from None
        finally:
            probe.close()
    if protocol == "triton":
        return TritonClient(url, model=model, timeout=timeout)
    if protocol == "ray":
        return RayClient(url, timeout=timeout)
    raise ClientError(f"protocol {protocol!r} is not one of auto, triton, ray")
