"""The FastAPI application: endpoints, bearer token, Prometheus metrics, the web page.

Requests are received and decoded on worker threads (at most max(DECODERS, `max_batch`) at once, so a burst
of large DICOMs cannot exhaust memory), scored on the one inference thread of `MicroBatcher`, and
answered with overlays encoded on worker threads again: the event loop only moves bytes.

Patient data: uploads stay in memory and are never written to disk; answers and logs carry the image's size
and format, never a file name or a DICOM header value; predictions are marked `Cache-Control: no-store`. No
CORS headers are sent, so browsers let only the server's own page call the API.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hybridmednet.evaluation.card import intended_use
from hybridmednet.evaluation.gradcam import overlay, shrink
from hybridmednet.serve import schemas
from hybridmednet.serve.batching import MicroBatcher, default_max_batch
from hybridmednet.serve.inference import Request as ScoreRequest
from hybridmednet.serve.inference import Scored, ServedModel
from hybridmednet.serve.uploads import (
    ACCEPTED,
    FIELD,
    MAX_PIXELS,
    MULTIPART_OVERHEAD,
    Upload,
    UploadError,
    file_field,
    read_upload,
    too_large,
)

log = logging.getLogger('hybridmednet.serve')
STATIC = Path(__file__).parent / 'static'  # the web page: plain HTML, CSS and JavaScript, no build step
SETTINGS_ENV = 'HYBRIDMEDNET_SERVE_SETTINGS'  # how `serve --workers N` hands the settings to each worker
HEATMAP_SIDE = 512  # overlays: the heatmap itself is model-sized (224 px); 512 keeps encoding fast
PREVIEW_SIDE = 1024
DECODERS = 8  # uploads decoded at once, at least: a burst of large DICOMs cannot take all the memory
PATHS = ('/', '/v1/predict', '/v1/model', '/healthz', '/readyz', '/metrics')  # metric labels; others: 'other'
SECURITY_HEADERS = {
    'X-Content-Type-Options': 'nosniff',
    'Referrer-Policy': 'no-referrer',
    'X-Frame-Options': 'DENY',
    # Everything the page uses comes from this server; images also as data: URLs (previews, heatmaps).
    'Content-Security-Policy': "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}
UPLOAD_BODY = {
    'requestBody': {
        'required': True,
        'content': {
            'multipart/form-data': {
                'schema': {
                    'type': 'object',
                    'required': [FIELD],
                    'properties': {
                        FIELD: {'type': 'string', 'format': 'binary', 'description': f'one {ACCEPTED} file'}
                    },
                }
            }
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {'model': schemas.ErrorResponse, 'description': text}
    for status, text in {
        401: 'the server has a token and the request did not bear it',
        413: f'the upload is over the size limit, or its header declares more than {MAX_PIXELS:,} pixels',
        415: f'not a {ACCEPTED} file, or not sent as multipart/form-data',
        422: "the image cannot be read (corrupt, truncated, DICOM without pixels or with several frames): the reader's "
        'message',
        503: 'the model is still loading, or failed to load',
    }.items()
}


@dataclass(frozen=True)
class Settings:
    model_path: str
    device: str = 'cpu'
    token: str | None = None
    max_upload_mb: float = 50.0
    max_batch: int = 0  # 0: default_max_batch(device, the model's image size)
    batch_wait_ms: float = 5.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class Metrics:
    """Prometheus metrics in the app's own registry (two apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            'hybridmednet_requests',
            'requests answered, by endpoint and status',
            ['path', 'status'],
            registry=self.registry,
        )
        self.latency = Histogram(
            'hybridmednet_request_seconds',
            'time to answer a request, by endpoint',
            ['path'],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            'hybridmednet_batch_size', 'images per forward pass', buckets=(1, 2, 4, 8, 16, 32), registry=self.registry
        )
        self.load_seconds = Gauge(
            'hybridmednet_model_load_seconds', 'seconds loading the model took', registry=self.registry
        )
        self.ready = Gauge('hybridmednet_model_ready', '1 once the model is loaded', registry=self.registry)


class CountAndProtect:
    """Counts and times every request and adds the security headers. A plain ASGI middleware: Starlette's
    `@app.middleware('http')` starts a task group for every chunk of a request body it passes on (an 8 MiB
    DICOM arrives in about 128): an 8 MiB upload answered in 17.7 ms through it, 13.0 ms through this."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope['path'] if scope['path'] in PATHS else 'other'
        status = 500  # unless the app starts a response

        async def send_protected(message: Message) -> None:
            nonlocal status
            if message['type'] == 'http.response.start':
                status = message['status']
                headers = MutableHeaders(scope=message)
                headers.update(SECURITY_HEADERS)
                if path == '/v1/predict':
                    headers['Cache-Control'] = 'no-store'
            await send(message)

        try:
            await self.app(scope, receive, send_protected)
        finally:
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


class _State:
    """The model once loaded; until then, why not."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.served: ServedModel | None = None
        self.batcher: MicroBatcher[ScoreRequest, Scored] | None = None
        self.model_info: schemas.ModelResponse | None = None
        self.error: str | None = None
        self.decoders: anyio.CapacityLimiter | None = None

    def start(self, served: ServedModel) -> None:
        s = self.settings
        batch = s.max_batch or default_max_batch(s.device, served.image_size)
        self.batcher = MicroBatcher(served.score, batch, s.batch_wait_ms / 1000, self.metrics.batch_size.observe)
        self.batcher.start()
        self.model_info = _model_response(served, s, batch)
        self.metrics.load_seconds.set(served.load_seconds)
        self.metrics.ready.set(1)
        self.served = served  # last: ready from here on
        log.info(
            'model ready: %s (%s, %s, weights %s) in %.1f s',
            served.name,
            served.config.MODEL['backbone'],
            served.runtime,
            served.weights_hash,
            served.load_seconds,
        )

    def load(self) -> None:
        try:
            self.start(ServedModel.load(self.settings.model_path, self.settings.device))
        except Exception as exc:  # readyz says why; the process stays up to say it
            self.error = ' '.join(str(exc).split()) or type(exc).__name__
            log.error('the model failed to load: %s', self.error)

    def require(self) -> tuple[ServedModel, MicroBatcher[ScoreRequest, Scored]]:
        if self.served is None or self.batcher is None:
            raise HTTPException(
                503, f'the model failed to load: {self.error}' if self.error else 'the model is loading'
            )
        return self.served, self.batcher


def create_app(settings: Settings, model: ServedModel | None = None) -> FastAPI:
    """The app; `model` when already loaded, else it is loaded on a background thread at startup (/readyz)."""
    import pydicom

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own guard, behind the header check
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE  # its warnings quote header values
    metrics = Metrics()
    state = _State(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.decoders = anyio.CapacityLimiter(max(DECODERS, settings.max_batch))
        if model is not None:
            state.start(model)
        else:
            threading.Thread(target=state.load, name='hybridmednet-load', daemon=True).start()
        yield
        if state.batcher is not None:
            state.batcher.stop()

    app = FastAPI(
        title='HybridMedNet',
        summary='Chest X-ray findings with calibrated thresholds, out-of-distribution check and heatmaps',
        description=intended_use(),  # the server reads 2D images
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # the interactive pages load their scripts from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.mount('/static', StaticFiles(directory=STATIC), name='static')
    authorized = [Depends(_bearer(settings.token))]

    app.add_middleware(CountAndProtect, metrics=metrics)

    @app.exception_handler(UploadError)
    async def refused(request: Request, exc: UploadError) -> JSONResponse:
        log.info('upload refused with %d', exc.status)  # the status only: the message may describe the file
        return JSONResponse({'detail': str(exc)}, exc.status)

    @app.get('/', include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / 'index.html')

    @app.get('/healthz', response_model=schemas.Status, summary='the process answers')
    async def healthz() -> schemas.Status:
        return schemas.Status(status='ok', detail=None)

    @app.get(
        '/readyz',
        response_model=schemas.Status,
        summary='the model is loaded',
        responses={503: {'model': schemas.Status, 'description': 'loading, or failed to load (detail says why)'}},
    )
    async def readyz() -> Response:
        if state.served is not None:
            return JSONResponse(schemas.Status(status='ready', detail=None).model_dump())
        status = schemas.Status(status='failed' if state.error else 'loading', detail=state.error)
        return JSONResponse(status.model_dump(), 503)

    @app.get('/metrics', dependencies=authorized, summary='Prometheus metrics', response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        '/v1/model',
        response_model=schemas.ModelResponse,
        dependencies=authorized,
        summary='classes, thresholds, preprocessing and model card facts',
        responses={k: ERRORS[k] for k in (401, 503)},
    )
    async def model_facts() -> schemas.ModelResponse:
        state.require()
        assert state.model_info is not None
        return state.model_info

    @app.post(
        '/v1/predict',
        response_model=schemas.PredictResponse,
        dependencies=authorized,
        summary=f'score one chest X-ray ({ACCEPTED}) sent as multipart/form-data field {FIELD!r}',
        responses=ERRORS,
        openapi_extra=UPLOAD_BODY,
    )
    async def predict(
        request: Request,
        heatmaps: bool = Query(False, description='add a heatmap overlay (base64 PNG) per positive finding'),
        preview: bool = Query(False, description='add the image as read, as a base64 PNG (for DICOM viewers)'),
    ) -> schemas.PredictResponse:
        served, batcher = state.require()
        limit = settings.max_upload_bytes
        with batcher.expecting() as arrival:
            body = await _read_body(request, limit + MULTIPART_OVERHEAD)
            data = file_field(body, request.headers.get('content-type', ''))
            del body
            if len(data) > limit:
                raise too_large(limit)
            upload, tensor = await anyio.to_thread.run_sync(_prepare, served, data, limiter=state.decoders)
            del data
            scored = await batcher.submit(ScoreRequest(tensor, heatmaps), arrival)
        pictures = await _pictures(served, upload, scored, preview, state.decoders)
        return _answer(served, upload, scored, pictures, heatmaps)

    return app


def app_from_environment() -> FastAPI:
    """The factory each uvicorn worker process calls (`serve --workers N`): settings from the environment."""
    return create_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))


def settings_environment(settings: Settings) -> dict[str, str]:
    return {SETTINGS_ENV: json.dumps(asdict(settings))}


def _version() -> str:
    from hybridmednet import __version__

    return __version__


def _bearer(token: str | None):
    async def check(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get('authorization', '').partition(' ')
        if scheme.lower() != 'bearer' or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(
                401, 'this server needs a bearer token: Authorization: Bearer <token>', {'WWW-Authenticate': 'Bearer'}
            )

    return check


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes: a declared length is not trusted."""
    declared = request.headers.get('content-length', '')
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit - MULTIPART_OVERHEAD)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large(limit - MULTIPART_OVERHEAD)
    except ClientDisconnect:
        raise UploadError(400, 'the upload was interrupted') from None
    return bytes(body)


def _prepare(served: ServedModel, data: bytes) -> tuple[Upload, Any]:
    upload = read_upload(data, served.config.DATA['intensity'])
    return upload, served.preprocess(upload.image)


def _png(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format='PNG', compress_level=1)  # speed over size: these go straight to a screen
    return base64.b64encode(buffer.getvalue()).decode('ascii')


def _preview(image: np.ndarray) -> str:
    picture = Image.fromarray(np.round(image * 255).astype(np.uint8), mode='L')
    picture.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
    return _png(picture)


def _heatmap(small: np.ndarray, cam: np.ndarray, label: str) -> str:
    return _png(overlay(small, cam, label=label, max_side=HEATMAP_SIDE))


async def _pictures(
    served: ServedModel, upload: Upload, scored: Scored, preview: bool, limiter: anyio.CapacityLimiter | None
) -> dict[int | str, str]:
    """Base64 PNGs: the heatmap overlay of each finding index in `scored.cams`, and 'preview' when asked.
    Encoded on worker threads side by side (PNG encoding releases the GIL): two heatmaps cost one's time."""
    jobs: dict[int | str, Any] = {}
    if scored.cams:
        small = await anyio.to_thread.run_sync(shrink, upload.image, HEATMAP_SIDE, limiter=limiter)  # once for all
        for k, cam in scored.cams.items():
            label = f'{served.class_names[k]} p={scored.probabilities[k]:.2f}'
            jobs[k] = partial(_heatmap, small, cam, label)
    if preview:
        jobs['preview'] = partial(_preview, upload.image)
    done = await asyncio.gather(*(anyio.to_thread.run_sync(job, limiter=limiter) for job in jobs.values()))
    return dict(zip(jobs, done))


def _answer(
    served: ServedModel, upload: Upload, scored: Scored, pictures: dict[int | str, str], heatmaps: bool
) -> schemas.PredictResponse:
    op, names = served.op, served.class_names
    findings = [
        schemas.Finding(
            name=name,
            probability=round(float(p), 6),
            threshold=float(t),
            positive=bool(positive),
            heatmap_png=pictures.get(k),
        )
        for k, (name, p, t, positive) in enumerate(zip(names, scored.probabilities, op.thresholds, scored.positive))
    ]
    notes = list(served.notes)
    if served.ood_note:
        notes.append(served.ood_note)
    if heatmaps and served.heatmaps_note:
        notes.append(served.heatmaps_note)
    elif heatmaps and not scored.positive.any():
        notes.append('no finding is positive, so there is no heatmap')
    ood = None
    if scored.ood_score is not None and served.ood is not None:
        threshold = float(served.ood.threshold)
        ood = schemas.OodResult(score=scored.ood_score, threshold=threshold, flagged=scored.ood_score > threshold)
    height, width = upload.image.shape
    return schemas.PredictResponse(
        model=_model_info(served),
        image=schemas.ImageInfo(format=upload.kind, width=width, height=height, preview_png=pictures.get('preview')),
        findings=findings,
        positive_findings=[f.name for f in findings if f.positive],
        ood=ood,
        heatmaps=schemas.HeatmapStatus(requested=heatmaps, available=served.torch_model is not None),
        notes=notes,
    )


def _model_info(served: ServedModel) -> schemas.ModelInfo:
    return schemas.ModelInfo(
        name=served.name,
        backbone=served.config.MODEL['backbone'],
        runtime=served.runtime,
        weights_hash=served.weights_hash,
        thresholds_fitted=served.op.fitted,
        thresholds_method=served.op.method,
    )


def _model_response(served: ServedModel, settings: Settings, max_batch: int) -> schemas.ModelResponse:
    op, m, meta = served.op, served.config.MODEL, served.meta
    temperatures = op.temperatures if op.temperatures is not None else [None] * len(served.class_names)
    ood = served.ood
    return schemas.ModelResponse(
        model=_model_info(served),
        classes=[
            schemas.ClassInfo(name=n, threshold=float(t), temperature=None if tau is None else float(tau))
            for n, t, tau in zip(served.class_names, op.thresholds, temperatures)
        ],
        operating_point=op.to_meta(),
        preprocessing=dict(meta['preprocessing']),
        test_time_augmentation=served.tta,
        heatmaps_available=served.torch_model is not None,
        ood=None
        if ood is None
        else schemas.OodInfo(threshold=ood.threshold, quantile=ood.quantile, n_train=ood.n_train, n_val=ood.n_val),
        card={
            'architecture': f'HybridMedNet, {m["backbone"]} backbone'
            + (', hierarchical head' if m['hierarchical'] else ''),
            'num_classes': len(served.class_names),
            'image_size': served.image_size,
            'epoch': meta.get('epoch'),
            'best_validation_auc': meta.get('best_auc'),
            'intended_use': intended_use(served.config.DATA['spatial_dims']),
        },
        limits={
            'formats': ['png', 'jpeg', 'dicom'],
            'max_upload_mb': settings.max_upload_mb,
            'max_pixels': MAX_PIXELS,
            'max_batch': max_batch,
            'batch_wait_ms': settings.batch_wait_ms,
        },
        notes=[*served.notes, *([served.ood_note] if served.ood_note else [])],
    )
