"""The model behind HTTP: a Ray Serve application (`ray_job.py serve`).

POST /embed, /search, /classify and /caption take one JSON object naming its input by
modality (`{"text": ...}`, `{"image": "<base64>"}`, `{"audio": "<base64>"}`) plus options
(`serve_requests.py` says which and checks them); GET /healthz says what is loaded. Each
replica holds one copy of the model (on a GPU when given one) and runs one model call at a
time on a worker thread, so the event loop keeps reading requests and answering /healthz.

Every refusal is a 4xx with one JSON line `{"error": "..."}`: an unknown path or method too.
An unexpected exception is a 500 with its traceback in the replica's log; the replica lives
on. There is no authentication: the default host is loopback, and `serve_forever` warns
when asked to listen anywhere else.
"""
# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at
# run time, from signatures Serve rewrites
import asyncio
import ipaddress
import logging
import signal
import socket
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from pipelines.errors import UserError
from pipelines.settings import Settings, at_least

from .inputs import BadInput
from .serve_requests import (DEFAULT_TARGET, MAX_BODY_BYTES, MODALITIES, ParsedRequest, RequestError,
                             check_declared_length, one_line, parse_request, read_capped)

APP_NAME = "mmtrain"
LABEL_CACHE = 32  # label sets whose prompt embeddings a replica keeps (clients repeat theirs)
log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServeConfig(Settings):
    LABEL = "serve"
    model: str                   # a run directory or an exported .safetensors
    index: str | None = None     # an `embed` output (OUT) for /search
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    gpus_per_replica: float = 0
    max_body_bytes: int = MAX_BODY_BYTES
    storage_options: dict = field(default_factory=dict)  # fsspec options for a model or index in a bucket

    def checks(self):
        yield from at_least(self, 1, "port", "replicas")
        yield self.port <= 65535, f"port must be at most 65535, got {self.port}"
        yield from at_least(self, 0, "gpus_per_replica")
        yield from at_least(self, 1024, "max_body_bytes")


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


# no /docs, /redoc or /openapi.json: the endpoints are these five, and they take raw JSON
api = FastAPI(title="mmtrain", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # the router's own refusals (unknown path 404, wrong method 405) in the same JSON as ours
    where = f"{request.method} {request.url.path}"
    message = {404: f"no such endpoint: {where}", 405: f"method not allowed: {where}"}.get(exc.status_code,
                                                                                         f"{exc.detail}: {where}")
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # our routes take the raw request, so this means a route's signature is wrong: still one line
    return error_response(400, f"bad request to {request.url.path}: {exc.errors()[:1]}")


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class ModelServer:
    """One replica: the model, the search index (if any), and a worker thread for model calls."""

    def __init__(self, cfg: ServeConfig):
        import ray
        import torch

        from .loaded import load_model

        # the device comes from Ray: a replica given a GPU sees only its own
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.loaded = load_model(cfg.model, device=device, storage_options=cfg.storage_options or None)
        self.index = None
        if cfg.index:
            from .search import open_index

            self.index = open_index(cfg.index, cfg.storage_options or None)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.label_cache: OrderedDict = OrderedDict()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.loaded.origin, "device": str(self.loaded.device),
                "embed_dim": self.loaded.embed_dim, "index": self.cfg.index,
                "rows": self.index.count if self.index is not None else None,
                "replica": serve.get_replica_context().replica_id.unique_id}

    @api.post("/embed")
    async def embed(self, request: Request) -> JSONResponse:
        return await self._answer(request, "embed", self._embed)

    @api.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        if self.index is None:
            return error_response(400, "this server has no index: start it with --index OUT (an `embed` output)")
        return await self._answer(request, "search", self._search)

    @api.post("/classify")
    async def classify(self, request: Request) -> JSONResponse:
        return await self._answer(request, "classify", self._classify)

    @api.post("/caption")
    async def caption(self, request: Request) -> JSONResponse:
        return await self._answer(request, "caption", self._caption)

    async def _answer(self, request: Request, endpoint: str, work: Callable[[ParsedRequest], object]) -> JSONResponse:
        try:
            # the size is settled before a byte is decoded: from the header, else while streaming
            check_declared_length(request.headers.get("content-length"), self.cfg.max_body_bytes)
            body = await read_capped(request.stream(), self.cfg.max_body_bytes)
            result = await asyncio.get_running_loop().run_in_executor(self.worker, self._run, body, endpoint, work)
            return JSONResponse(result)  # in the try: a NaN from a broken model is a ValueError here
        except RequestError as e:
            return error_response(e.status, str(e))
        except BadInput as e:
            return error_response(400, str(e))
        except ClientDisconnect:
            return error_response(400, "the client went away before sending the whole body")
        except Exception:  # a bug: its traceback to the replica's log, one line to the client
            log.exception("/%s failed", endpoint)
            return error_response(500, f"internal error in /{endpoint} (the traceback is in the replica's log)")

    def _run(self, body: bytes, endpoint: str, work: Callable[[ParsedRequest], object]):
        # on the worker thread: parsing a large body does not hold up the event loop either
        return work(parse_request(body, endpoint, max_len=self.loaded.model_cfg.max_text_len))

    def _embed(self, req: ParsedRequest) -> dict:
        from .inputs import embed_items

        emb = embed_items([req.item], self.loaded)
        return {m: emb[m][0].tolist() for m in MODALITIES if m in req.item}

    def _search(self, req: ParsedRequest) -> list[dict]:
        from .search import query_vector

        vector, modality = query_vector(self.loaded, req.item)
        target = req.options["target"] or DEFAULT_TARGET[modality]
        return [{k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
                for row in self.index.search(vector, target, req.options["k"])]

    def _classify(self, req: ParsedRequest) -> dict:
        from .classify import logit_scale, zero_shot
        from .inputs import embed_items

        labels = req.options["labels"]
        emb = embed_items([req.item], self.loaded)[req.modality]
        # the model's own temperature, as the `classify` command uses it
        best, scores = zero_shot(emb, self._label_embeddings(labels, req.options.get("template")),
                                 logit_scale(self.loaded))
        i = int(best[0])
        return {"label": labels[i], "score": float(scores[0, i]),
                "scores": {label: float(s) for label, s in zip(labels, scores[0])}}

    def _label_embeddings(self, labels: list[str], template: str | None):
        from .classify import label_embeddings

        key = (tuple(labels), template)
        if key not in self.label_cache:
            given = {"template": template} if template is not None else {}
            self.label_cache[key] = label_embeddings(self.loaded, labels, **given)
            if len(self.label_cache) > LABEL_CACHE:
                self.label_cache.popitem(last=False)
        self.label_cache.move_to_end(key)
        return self.label_cache[key]

    def _caption(self, req: ParsedRequest) -> dict:
        from .caption import caption_rows
        from .inputs import rows_from_items

        rows = rows_from_items([req.item], self.loaded)
        return {"caption": caption_rows(self.loaded, rows, max_len=req.options["max_len"],
                                        beams=req.options["beams"])[0]}


def build_app(cfg: ServeConfig):
    """The Serve application: `cfg.replicas` ModelServer replicas (`replica_resources`)."""
    return ModelServer.options(num_replicas=cfg.replicas, ray_actor_options=replica_resources(cfg)).bind(cfg)


def replica_resources(cfg: ServeConfig) -> dict:
    """1 CPU per replica (+ its GPUs). An embedded Ray has a fixed size and no autoscaler: there
    the replicas share its CPUs when there are more replicas than CPUs (logical CPUs are a
    scheduling budget; requests share the real cores either way), and GPUs it does not have
    are a one-line error, not a deployment that waits for ever."""
    import ray

    from pipelines.runtime import cluster_cpus, is_embedded

    cpus = 1.0
    if is_embedded():
        cpus = min(1.0, cluster_cpus() / cfg.replicas)
        gpus = ray.cluster_resources().get("GPU", 0)
        if cfg.gpus_per_replica * cfg.replicas > gpus:
            raise UserError(f"--replicas {cfg.replicas} x --gpus-per-replica {cfg.gpus_per_replica} needs "
                            f"{cfg.gpus_per_replica * cfg.replicas:g} GPUs; this machine's Ray has {gpus:g}")
    return {"num_cpus": cpus, **({"num_gpus": cfg.gpus_per_replica} if cfg.gpus_per_replica else {})}


def start_app(cfg: ServeConfig) -> str:
    """`start_proxy`, then `run_app`."""
    start_proxy(cfg)
    return run_app(cfg)


def start_proxy(cfg: ServeConfig) -> None:
    """Start Serve with its HTTP proxy on cfg.host:cfg.port. Serve's HTTP options are per
    cluster: a Serve already listening elsewhere, or already running an app of our name (which
    `serve.run` would replace), is refused in one line."""
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    http = _get_global_client().http_config
    if (http.host, http.port) != (cfg.host, cfg.port):
        raise UserError(f"Ray Serve already runs on this cluster at {http.host}:{http.port}: pass --host "
                        f"{http.host} --port {http.port}, or shut that Serve down first (`serve shutdown`)")
    if APP_NAME in serve.status().applications:
        raise UserError(f"an app named {APP_NAME} already runs on this cluster's Serve (another `serve`?): "
                        f"stop it first")


def run_app(cfg: ServeConfig) -> str:
    """Run the app at "/"; returns its URL once every replica is up."""
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{host}:{cfg.port}"


def exposure_warning(host: str) -> str | None:
    """The one-line warning for listening beyond this machine, or None on loopback."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if loopback:
        return None
    return (f"warning: listening on {host}: the endpoint has no authentication, anyone who can reach "
            f"this port can use the model; keep it behind a proxy that authenticates")


def serve_forever(cfg: ServeConfig, say: Callable[[str], None] = print,
                  warn: Callable[[str], None] = print) -> None:
    """`ray_job.py serve`: check the model and index here (one-line errors before Serve
    starts), run the app, block until Ctrl-C or SIGTERM, then take the app down: Serve
    whole on an embedded Ray, only this app on a cluster."""
    from pipelines.runtime import init_ray, is_embedded

    from .loaded import load_model

    if (line := exposure_warning(cfg.host)) is not None:
        warn(line)
    opts = cfg.storage_options or None
    loaded = load_model(cfg.model, storage_options=opts)
    rows = ""
    if cfg.index:
        from .search import check_model_fits, open_index

        index = open_index(cfg.index, opts)
        check_model_fits(loaded, index, cfg.index, opts)
        rows = f", index {cfg.index} ({index.count:,} rows)"
    init_ray(dashboard=False, ray_data=False)
    replica_resources(cfg)  # what cannot be placed is a one-line error before Serve starts
    if is_embedded():
        _check_port_free(cfg.host, cfg.port)
    start_proxy(cfg)
    # SIGTERM (a `kill`, a service manager) stops the server the way Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = run_app(cfg)
        say(f"serving {loaded.origin}{rows} at {url} (POST /embed /search /classify /caption, GET /healthz); "
            f"Ctrl-C stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # on an error too: no app of ours is left behind on a cluster
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second `kill` does not cut the shutdown short
        if is_embedded():
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        signal.signal(signal.SIGTERM, previous)
    say("stopped")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port or --host") from None
