"""`hybridmednet serve` through FastAPI's TestClient: every endpoint, every refusal, and that an answer
carries the numbers `predict` would give for the same file (an untrained resnet18 at 32 px).

Models are untrained on purpose: these tests check what the server does with a model's outputs
(thresholds, OOD flag, heatmaps, refusals), not how good the outputs are.
"""

import asyncio
import base64
import io
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from test_data_io import write_dicom

pytest.importorskip('fastapi', reason="the serve extra is not installed: pip install 'hybridmednet[serve]'")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from hybridmednet.checkpoint import load_checkpoint, load_model, save_checkpoint, weights_hash  # noqa: E402
from hybridmednet.commands import serve as serve_command  # noqa: E402
from hybridmednet.config import Config  # noqa: E402
from hybridmednet.data.io import read_image  # noqa: E402
from hybridmednet.data.transforms import build_transforms  # noqa: E402
from hybridmednet.evaluation.gradcam import grad_cam, overlay, reference_entry  # noqa: E402
from hybridmednet.evaluation.inference import batch_logits  # noqa: E402
from hybridmednet.evaluation.operating_point import OperatingPoint  # noqa: E402
from hybridmednet.models.hybrid import HybridMedNet  # noqa: E402
from hybridmednet.serve import ServeError, uploads  # noqa: E402
from hybridmednet.serve.app import Settings, app_from_environment, create_app, settings_environment  # noqa: E402
from hybridmednet.serve.inference import Request, ServedModel  # noqa: E402

SIZE = 32
POSITIVE = ('Effusion', 'Nodule')  # threshold 0: always positive; every other finding has threshold 1: never
IDENTIFIERS = {
    'PatientName': 'DOE^JANE',
    'PatientID': 'PID-48151623',
    'PatientBirthDate': '19450101',
    'StudyDate': '20240229',
    'AcquisitionDate': '2024022x',  # not a valid DA: pydicom would warn and quote it
}


# -- models and images --------------------------------------------------------------------------
def write_model(path, thresholds=True, ood=None, size=SIZE):
    """A resnet18 checkpoint with a heatmap reference; `thresholds` makes POSITIVE the positive findings; `ood` an
    OOD state."""
    config = Config(
        MODEL={'backbone': 'resnet18', 'pretrained': False}, DATA={'image_size': size, 'num_workers': 0}
    ).validate()
    torch.manual_seed(0)
    model = HybridMedNet(config)
    state = {'model_state_dict': model.state_dict(), 'config': config.to_dict(), 'class_names': config.class_names}
    # heatmaps from it differ from HiResCAM's: the overlay test fails if the server leaves it out
    state['heatmap_reference'] = reference_entry([torch.rand(6, 3, size, size)], 'without a finding')  # > NEIGHBOURS
    if thresholds:
        values = np.array([0.0 if n in POSITIVE else 1.0 for n in config.class_names])
        temperatures = np.linspace(0.5, 2.0, len(values))  # so that probabilities are not the plain sigmoid
        state['thresholds'] = OperatingPoint(
            config.class_names, values, temperatures, method='youden', fitted_on={'split': 'val'}
        ).to_meta()
    if ood is not None:
        state['ood'] = ood
    save_checkpoint(path, {**state, 'epoch': 3, 'best_auc': 0.71})
    return path


def xray(seed=0, shape=(48, 40)):
    """A chest-like grey image: bright mediastinum, darker lungs, noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    lungs = np.exp(-(((cols - shape[1] * 0.3) / 6) ** 2) - ((rows - shape[0] / 2) / 14) ** 2)
    lungs += np.exp(-(((cols - shape[1] * 0.7) / 6) ** 2) - ((rows - shape[0] / 2) / 14) ** 2)
    return np.clip(0.8 - 0.5 * lungs + 0.05 * rng.standard_normal(shape), 0, 1)


def png_bytes(image, fmt='PNG'):
    buffer = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def dicom_bytes(tmp_path, image, name='x.dcm', **attrs):
    path = write_dicom(tmp_path / name, np.round(np.asarray(image) * 4095), **attrs)
    return path.read_bytes()


def expected(model_path, file_path):
    """What `predict` computes for the file: probabilities, thresholds, decisions."""
    model, config, meta = load_model(model_path)
    op = OperatingPoint.of_model(meta)
    x = build_transforms(config, train=False)(read_image(file_path))
    probs = op.probabilities(batch_logits(model, x[None]).numpy().astype(np.float64))[0]
    return probs, op.thresholds, op.positives(probs)


def post(client, data, name='x.png', params=None, headers=None):
    return client.post(
        '/v1/predict',
        files={'file': (name, data, 'application/octet-stream')},
        params=params or {},
        headers=headers or {},
    )


@pytest.fixture(scope='module')
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp('serve') / 'best.pth')


@pytest.fixture(scope='module')
def client(model_path):
    app = create_app(Settings(str(model_path), max_upload_mb=1), ServedModel.load(model_path))
    with TestClient(app) as c:
        yield c


# -- answers --------------------------------------------------------------------------------------
@pytest.mark.parametrize('fmt', ['png', 'jpeg', 'dicom'])
def test_predict_gives_predicts_numbers(client, model_path, tmp_path, fmt):
    image = xray(1)
    data = dicom_bytes(tmp_path, image) if fmt == 'dicom' else png_bytes(image, fmt.upper())
    (tmp_path / 'upload').write_bytes(data)
    probs, thresholds, positive = expected(model_path, tmp_path / 'upload')
    r = post(client, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body['image'] == {'format': fmt, 'width': 40, 'height': 48, 'preview_png': None}
    model, _, _ = load_model(model_path)
    assert body['model'] == {
        'name': 'best.pth',
        'backbone': 'resnet18',
        'runtime': 'pytorch',
        'weights_hash': weights_hash(model.state_dict()),
        'thresholds_fitted': True,
        'thresholds_method': 'youden',
    }
    findings = body['findings']
    assert [f['name'] for f in findings] == model.class_names
    np.testing.assert_allclose([f['probability'] for f in findings], probs, atol=2e-6)
    assert [f['threshold'] for f in findings] == thresholds.tolist()
    assert [f['positive'] for f in findings] == positive.tolist()
    assert body['positive_findings'] == list(POSITIVE)
    assert all(f['heatmap_png'] is None for f in findings)
    assert r.headers['cache-control'] == 'no-store'


@pytest.mark.parametrize('shape', [(48, 40), (1100, 900)], ids=['small', 'shrunk to 512'])
def test_heatmaps_are_grad_cam_overlays_of_the_positive_findings(client, model_path, tmp_path, shape):
    data = png_bytes(xray(2, shape))
    body = post(client, data, params={'heatmaps': 'true'}).json()
    assert body['heatmaps'] == {'requested': True, 'available': True}
    model, config, _ = load_model(model_path)
    (tmp_path / 'a.png').write_bytes(data)
    read = read_image(tmp_path / 'a.png')
    x = build_transforms(config, train=False)(read)
    probs, _, _ = expected(model_path, tmp_path / 'a.png')
    np.testing.assert_allclose([f['probability'] for f in body['findings']], probs, atol=2e-6)
    classes = [model.class_names.index(n) for n in POSITIVE]
    cams = grad_cam(model, x, classes)
    for f in body['findings']:
        if f['name'] not in POSITIVE:
            assert f['heatmap_png'] is None
            continue
        k = model.class_names.index(f['name'])
        want = overlay(read, cams[classes.index(k)], label=f'{f["name"]} p={f["probability"]:.2f}', max_side=512)
        got = Image.open(io.BytesIO(base64.b64decode(f['heatmap_png'])))
        assert got.format == 'PNG' and got.size == want.size
        difference = np.abs(np.asarray(got, dtype=float) - np.asarray(want, dtype=float))
        assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 4  # exact but for rounding


def test_heatmaps_side_by_side_answer_the_same_and_leave_torch_threads_as_they_were(model_path):
    """ServedModel keeps a pool of one-torch-thread workers when it measures faster; torch gives threads started
    later the last count any thread set, so loading must leave that count as it found it."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        served = ServedModel.load(model_path)
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == [2] and torch.get_num_threads() == 2
        image = served.preprocess(xray(2))
        served.heatmap_pool = None
        alone = served.score([Request(image, True)])[0].cams
        with ThreadPoolExecutor(2) as pool:
            served.heatmap_pool = pool
            together = served.score([Request(image, True)])[0].cams
        assert sorted(alone) == sorted(together) == sorted(served.class_names.index(n) for n in POSITIVE)
        for k in alone:
            np.testing.assert_allclose(together[k], alone[k], atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_tta_scores_the_same_with_and_without_heatmaps(model_path):
    """With thresholds fitted on TTA outputs the server scores with TTA, with or without heatmaps: the same
    numbers as batch_logits."""
    served = ServedModel.load(model_path)
    served.tta = True
    x = served.preprocess(xray(3))
    with_maps, without = (served.score([Request(x, heatmaps)])[0].probabilities for heatmaps in (True, False))
    model, _, _ = load_model(model_path)
    want = served.op.probabilities(batch_logits(model, x[None], tta=True).numpy().astype(np.float64))[0]
    plain = served.op.probabilities(batch_logits(model, x[None]).numpy().astype(np.float64))[0]
    np.testing.assert_allclose(with_maps, want, atol=1e-6)
    np.testing.assert_allclose(without, want, atol=1e-6)
    assert np.abs(plain - want).max() > 1e-4  # TTA moves them: the checks above do tell TTA from plain


def test_preview_is_the_image_as_read(client, tmp_path):
    image = xray(3)
    body = post(client, dicom_bytes(tmp_path, image), name='x.dcm', params={'preview': 'true'}).json()
    preview = np.asarray(Image.open(io.BytesIO(base64.b64decode(body['image']['preview_png']))))
    read = read_image(tmp_path / 'x.dcm')
    assert preview.shape == (48, 40)
    np.testing.assert_array_equal(preview, np.round(read * 255).astype(np.uint8))


def test_no_ood_statistics_is_said(client):
    body = post(client, png_bytes(xray(4))).json()
    assert body['ood'] is None
    assert any('no out-of-distribution statistics' in n for n in body['notes'])


def test_ood_score_and_flag(tmp_path):
    ood_module = pytest.importorskip('hybridmednet.evaluation.ood')
    path = write_model(tmp_path / 'ood.pth')
    model, config, _ = load_model(path)
    transform = build_transforms(config, train=False)
    train = torch.stack([transform(xray(s)) for s in range(20)])
    fitted = ood_module.fit_ood(ood_module.ood_features(model, train), ood_module.ood_features(model, train[:5]))
    near, far = xray(100), np.random.default_rng(0).random((48, 40)) ** 4  # far: a speckled dark picture
    near, far = (np.round(image * 255) / 255 for image in (near, far))  # as the server reads them from PNG
    scores = fitted.score(ood_module.ood_features(model, torch.stack([transform(near), transform(far)])))
    assert scores[0] < scores[1]
    fitted.threshold = float(scores.mean())
    state = load_checkpoint(path)
    save_checkpoint(path, {**state, 'ood': fitted.to_state()})
    with TestClient(create_app(Settings(str(path)), ServedModel.load(path))) as c:
        answers = [post(c, png_bytes(image)).json() for image in (near, far)]
        facts = c.get('/v1/model').json()['ood']
    for answer, score in zip(answers, scores):
        assert answer['ood']['score'] == pytest.approx(score, rel=1e-4)
        assert answer['ood']['threshold'] == pytest.approx(fitted.threshold)
    assert [a['ood']['flagged'] for a in answers] == [False, True]
    (tmp_path / 'near.png').write_bytes(png_bytes(near))
    probs, _, _ = expected(path, tmp_path / 'near.png')  # one backbone pass gives both, as predict's numbers
    np.testing.assert_allclose([f['probability'] for f in answers[0]['findings']], probs, atol=2e-6)
    assert facts['threshold'] == pytest.approx(fitted.threshold) and facts['n_train'] == 20


def test_model_facts(client, model_path):
    body = client.get('/v1/model').json()
    model, config, meta = load_model(model_path)
    assert [c['name'] for c in body['classes']] == model.class_names
    assert [c['threshold'] for c in body['classes']] == [0.0 if n in POSITIVE else 1.0 for n in model.class_names]
    assert body['preprocessing'] == meta['preprocessing']
    assert body['operating_point']['method'] == 'youden' and body['operating_point']['fitted_on'] == {'split': 'val'}
    assert [c['temperature'] for c in body['classes']] == pytest.approx(np.linspace(0.5, 2.0, 14).tolist())
    assert body['model']['weights_hash'] == weights_hash(model.state_dict())
    assert body['card']['epoch'] == 3 and body['card']['best_validation_auc'] == 0.71
    assert body['card']['image_size'] == SIZE and 'Not a medical device' in body['card']['intended_use']
    assert 'multi-label chest X-ray classification' in body['card']['intended_use']  # the template filled in
    assert body['heatmaps_available'] is True and body['ood'] is None
    assert body['limits']['max_upload_mb'] == 1


def test_unfitted_thresholds_are_said(tmp_path):
    path = write_model(tmp_path / 'plain.pth', thresholds=False)
    with TestClient(create_app(Settings(str(path)), ServedModel.load(path))) as c:
        body = post(c, png_bytes(xray(5))).json()
    assert body['model']['thresholds_fitted'] is False
    assert {f['threshold'] for f in body['findings']} == {0.5}
    assert any('no fitted thresholds' in n for n in body['notes'])


def test_503_until_loaded_then_ready(model_path, monkeypatch):
    release = threading.Event()
    real_load = ServedModel.load

    def slow_load(path, device='cpu'):
        assert release.wait(60)
        return real_load(path, device)

    monkeypatch.setattr(ServedModel, 'load', staticmethod(slow_load))
    for key, value in settings_environment(Settings(str(model_path))).items():
        monkeypatch.setenv(key, value)
    with TestClient(app_from_environment()) as c:
        assert c.get('/healthz').json()['status'] == 'ok'
        loading = c.get('/readyz')
        assert loading.status_code == 503 and loading.json()['status'] == 'loading'
        assert post(c, png_bytes(xray(0))).status_code == 503
        release.set()
        for _ in range(600):
            if c.get('/readyz').status_code == 200:
                break
            time.sleep(0.05)
        assert c.get('/readyz').json()['status'] == 'ready'
        assert post(c, png_bytes(xray(0))).status_code == 200


def test_a_model_that_fails_to_load_is_not_ready(tmp_path):
    with TestClient(create_app(Settings(str(tmp_path / 'missing.pth')))) as c:
        for _ in range(600):
            r = c.get('/readyz')
            if r.json()['status'] != 'loading':
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()['status'] == 'failed' and 'missing.pth' in r.json()['detail']
        assert c.get('/healthz').status_code == 200


def test_metrics(model_path):
    with TestClient(create_app(Settings(str(model_path)), ServedModel.load(model_path))) as c:
        for _ in range(3):
            post(c, png_bytes(xray(0)))
        post(c, b'not an image')
        text = c.get('/metrics').text
    assert 'hybridmednet_requests_total{path="/v1/predict",status="200"} 3.0' in text
    assert 'hybridmednet_requests_total{path="/v1/predict",status="415"} 1.0' in text
    assert 'hybridmednet_request_seconds_count{path="/v1/predict"} 4.0' in text
    assert 'hybridmednet_batch_size_count 3.0' in text
    load = [line for line in text.splitlines() if line.startswith('hybridmednet_model_load_seconds ')]
    assert float(load[0].split()[1]) > 0


def test_openapi_documents_every_field(client):
    schema = client.get('/openapi.json').json()
    for name, component in schema['components']['schemas'].items():
        if name.startswith(('HTTPValidationError', 'ValidationError')):
            continue
        for field, spec in component['properties'].items():
            assert spec.get('description'), f'{name}.{field} has no description'
    predict = schema['paths']['/v1/predict']['post']
    assert set(predict['responses']) >= {'200', '401', '413', '415', '422', '503'}
    assert 'multipart/form-data' in predict['requestBody']['content']


def test_page_and_its_assets_come_from_this_server(client):
    page = client.get('/')
    assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
    assert "default-src 'self'" in page.headers['content-security-policy']
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {'/static/app.js', '/static/style.css'} <= set(assets)
    assert all(a.startswith(('/static/', 'data:')) for a in assets)
    for asset in assets[1:]:
        text = client.get(asset).text
        assert client.get(asset).status_code == 200
        assert not re.search(r'https?://|@import|@font-face|url\(', text), asset  # no CDN, no web font


def test_no_cors_headers(client):
    r = client.get('/v1/model', headers={'Origin': 'https://elsewhere.example'})
    assert r.status_code == 200 and 'access-control-allow-origin' not in r.headers
    preflight = client.options(
        '/v1/predict', headers={'Origin': 'https://elsewhere.example', 'Access-Control-Request-Method': 'POST'}
    )
    assert 'access-control-allow-origin' not in preflight.headers


# -- refusals: one status each, with the input that causes it ---------------------------------------
def test_401_without_the_token(model_path):
    app = create_app(Settings(str(model_path), token='s3cret'), ServedModel.load(model_path))
    with TestClient(app) as c:
        for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': 's3cret'}):
            r = post(c, png_bytes(xray(0)), headers=headers)
            assert r.status_code == 401 and r.headers['www-authenticate'] == 'Bearer'
            assert c.get('/v1/model', headers=headers).status_code == 401
            assert c.get('/metrics', headers=headers).status_code == 401
        good = {'Authorization': 'Bearer s3cret'}
        assert post(c, png_bytes(xray(0)), headers=good).status_code == 200
        assert c.get('/v1/model', headers=good).status_code == 200
        assert c.get('/healthz').status_code == 200 and c.get('/readyz').status_code == 200


def test_413_upload_over_the_limit(client):
    big = png_bytes(np.random.default_rng(0).random((800, 800)))  # ~640 kB of noise, twice: over 1 MB
    r = post(client, big + big)
    assert r.status_code == 413 and '1 MB' in r.json()['detail']


def test_413_from_the_declared_length_before_reading(client):
    headers = {'Content-Type': 'multipart/form-data; boundary=b', 'Content-Length': str(2**30)}
    r = client.post('/v1/predict', content=b'--b--', headers=headers)  # the body itself is small
    assert r.status_code == 413


def test_413_while_streaming_stops_reading_at_the_limit():
    """A body without a length (chunked) is read only until it passes the limit, not to its end."""
    from starlette.requests import Request

    from hybridmednet.serve.app import _read_body

    chunk, received = 65536, []

    async def receive():
        received.append(chunk)
        return {'type': 'http.request', 'body': b'x' * chunk, 'more_body': len(received) < 100}  # 6.4 MB

    with pytest.raises(uploads.UploadError) as refused:
        asyncio.run(_read_body(Request({'type': 'http', 'headers': []}, receive), 2**20))
    assert refused.value.status == 413 and sum(received) <= 2**20 + chunk


def test_413_decompression_bomb_refused_before_decoding(client, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError('the bomb was decoded')

    monkeypatch.setattr(uploads, 'decode_image', no_decoding)
    # A PNG whose header declares 100,000 x 100,000 grey pixels, followed by a few bytes of data.
    header = uploads.PNG_SIGNATURE + _chunk(
        b'IHDR', np.array([100_000, 100_000], '>u4').tobytes() + b'\x08\x00\x00\x00\x00'
    )
    r = post(client, header + _chunk(b'IDAT', b'\x78\x9c\x03\x00\x00\x00\x00\x01'))
    assert r.status_code == 413 and '100,000 x 100,000' in r.json()['detail']
    jpeg = png_bytes(xray(0), 'JPEG')
    at = jpeg.index(b'\xff\xc0')  # the frame header: marker, length, precision, height, width
    bomb = jpeg[: at + 5] + np.array([60_000, 60_000], '>u2').tobytes() + jpeg[at + 9 :]
    assert post(client, bomb, name='x.jpg').status_code == 413


def test_a_png_header_in_a_dicom_preamble_does_not_pass_the_pixel_limit_as_a_png(client, tmp_path, monkeypatch):
    """The reader decodes a file with 'DICM' at byte 128 as DICOM, so the pixel limit must read it as one too."""
    monkeypatch.setattr(uploads, 'MAX_PIXELS', 1000)
    dicom = dicom_bytes(tmp_path, xray(0, (60, 40)))  # 2,400 pixels
    tiny_png = uploads.PNG_SIGNATURE + _chunk(b'IHDR', np.array([1, 1], '>u4').tobytes() + b'\x08\x00\x00\x00\x00')
    polyglot = tiny_png + dicom[len(tiny_png) :]
    assert polyglot[128:132] == b'DICM'
    r = post(client, polyglot)
    assert r.status_code == 413 and 'DICOM' in r.json()['detail'] and '40 x 60' in r.json()['detail']


def _chunk(kind, data):
    import zlib

    return len(data).to_bytes(4, 'big') + kind + data + zlib.crc32(kind + data).to_bytes(4, 'big')


@pytest.mark.parametrize('data', [b'hello, this is text', b'GIF89a' + b'\x00' * 200, b''], ids=['text', 'gif', 'empty'])
def test_415_not_an_image(client, data):
    r = post(client, data)
    assert r.status_code == 415 and 'PNG, JPEG or DICOM' in r.json()['detail']


def test_415_not_multipart(client):
    r = client.post('/v1/predict', content=png_bytes(xray(0)), headers={'Content-Type': 'image/png'})
    assert r.status_code == 415 and 'multipart/form-data' in r.json()['detail']


def _corrupt_inputs(tmp_path):
    png = png_bytes(np.random.default_rng(0).random((64, 64)))
    dicom = dicom_bytes(tmp_path, xray(0, (64, 64)))
    ds = pydicom.dcmread(io.BytesIO(dicom))
    del ds.PixelData
    no_pixels = io.BytesIO()
    ds.save_as(no_pixels, enforce_file_format=True)
    frames = dicom_bytes(tmp_path, np.stack([xray(0), xray(1)]), name='frames.dcm', NumberOfFrames=2)
    return {
        'truncated png': (png[: len(png) // 2], 'truncated'),
        'corrupt png': (png[:40] + bytes(200), 'the uploaded PNG: not a recognised image file'),
        'truncated dicom': (dicom[: len(dicom) // 2], 'the uploaded DICOM: '),
        'dicom without pixels': (no_pixels.getvalue(), 'no pixel data'),
        'multi-frame dicom': (frames, 'multi-frame DICOM (2 frames)'),
    }


@pytest.mark.parametrize(
    'case', ['truncated png', 'corrupt png', 'truncated dicom', 'dicom without pixels', 'multi-frame dicom']
)
def test_422_unreadable_image_with_the_readers_message(client, tmp_path, case):
    data, message = _corrupt_inputs(tmp_path)[case]
    r = post(client, data)
    assert r.status_code == 422, r.text
    assert message in r.json()['detail'] and str(tmp_path) not in r.json()['detail']


def test_422_without_the_file_field(client):
    r = client.post('/v1/predict', files={'image': ('x.png', png_bytes(xray(0)), 'image/png')})
    assert r.status_code == 422 and "'file'" in r.json()['detail']


def test_bad_inputs_leave_the_server_answering(client, tmp_path):
    for data, _ in _corrupt_inputs(tmp_path).values():
        post(client, data)
    post(client, b'junk')
    assert client.get('/readyz').json()['status'] == 'ready'
    assert post(client, png_bytes(xray(0))).status_code == 200


# -- patient data ---------------------------------------------------------------------------------
def test_dicom_identifiers_never_leave_and_uploads_never_touch_the_disk(client, tmp_path, monkeypatch, caplog, capfd):
    seen = []
    real = uploads.decode_image

    def recording(data, name, **kwargs):
        seen.append(name)
        return real(data, name, **kwargs)

    def no_files(*args, **kwargs):
        raise AssertionError(f'an upload was written to disk: {args}')

    monkeypatch.setattr(uploads, 'decode_image', recording)
    for maker in ('mkstemp', 'mkdtemp', 'NamedTemporaryFile', 'TemporaryFile'):  # TemporaryDirectory uses mkdtemp
        monkeypatch.setattr(tempfile, maker, no_files)
    (tmp_path / 'tmp').mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))  # whatever else makes a temporary file
    good = dicom_bytes(tmp_path, xray(0), **IDENTIFIERS)
    frames = dicom_bytes(tmp_path, np.stack([xray(0), xray(1)]), name='f.dcm', NumberOfFrames=2, **IDENTIFIERS)
    with caplog.at_level(logging.DEBUG):
        answers = [post(client, good, params={'heatmaps': 'true', 'preview': 'true'}), post(client, frames)]
        answers.append(client.get('/metrics'))
    assert [a.status_code for a in answers] == [200, 422, 200]
    written = ' '.join(a.text for a in answers) + caplog.text + ''.join(capfd.readouterr())
    for value in IDENTIFIERS.values():
        assert value not in written and value.replace('^', ' ') not in written
    assert seen == ['the uploaded DICOM'] * 2 and not any((tmp_path / 'tmp').iterdir())


# -- the ONNX Runtime path (hybridmednet.deploy) ----------------------------------------------------
def test_exported_folder_served_through_the_deploy_runtime(tmp_path, model_path, monkeypatch):
    """A stand-in for hybridmednet.deploy.runtime: logits only, so no heatmaps and no OOD score."""
    import types

    model, config, meta = load_model(model_path)
    runtime = types.ModuleType('hybridmednet.deploy.runtime')
    runtime.load_exported = lambda folder: (lambda x: model(x).detach().numpy(), config, meta)
    monkeypatch.setitem(sys.modules, 'hybridmednet.deploy', types.ModuleType('hybridmednet.deploy'))
    monkeypatch.setitem(sys.modules, 'hybridmednet.deploy.runtime', runtime)
    (tmp_path / 'onnx').mkdir()
    served = ServedModel.load(tmp_path / 'onnx')
    (tmp_path / 'a.png').write_bytes(png_bytes(xray(6)))
    probs, _, _ = expected(model_path, tmp_path / 'a.png')
    with TestClient(create_app(Settings(str(tmp_path / 'onnx')), served)) as c:
        body = post(c, png_bytes(xray(6)), params={'heatmaps': 'true'}).json()
        facts = c.get('/v1/model').json()
    assert body['model']['runtime'] == 'onnxruntime' and body['model']['name'] == 'onnx'
    np.testing.assert_allclose([f['probability'] for f in body['findings']], probs, atol=2e-6)
    assert body['heatmaps'] == {'requested': True, 'available': False}
    assert all(f['heatmap_png'] is None for f in body['findings'])
    assert any('ONNX Runtime' in n for n in body['notes'])
    assert facts['heatmaps_available'] is False


def test_a_real_onnx_export_is_served_through_onnx_runtime(tmp_path, model_path):
    pytest.importorskip('onnxruntime', reason="ONNX Runtime is not installed: pip install 'hybridmednet[deploy]'")
    export = pytest.importorskip('hybridmednet.deploy.export', reason='hybridmednet.deploy is not in this tree')
    record = export.export_onnx(model_path, tmp_path / 'onnx')
    (tmp_path / 'a.png').write_bytes(png_bytes(xray(7)))
    probs, thresholds, positive = expected(model_path, tmp_path / 'a.png')
    with TestClient(create_app(Settings(str(tmp_path / 'onnx')), ServedModel.load(tmp_path / 'onnx'))) as c:
        body = post(c, png_bytes(xray(7)), params={'heatmaps': 'true'}).json()
    assert body['model']['runtime'] == 'onnxruntime' and body['model']['weights_hash'] == record['weights_hash']
    np.testing.assert_allclose([f['probability'] for f in body['findings']], probs, atol=1e-4)
    assert [f['threshold'] for f in body['findings']] == thresholds.tolist()
    assert [f['positive'] for f in body['findings']] == positive.tolist()
    assert body['heatmaps']['available'] is False and body['ood'] is None


def test_exported_folder_without_the_deploy_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'hybridmednet.deploy.runtime', None)  # import fails as if not installed
    with pytest.raises(ServeError, match=r'hybridmednet\[deploy\]'):
        ServedModel.load(tmp_path)


# -- the command ----------------------------------------------------------------------------------
def test_command_refuses_a_bad_model_in_one_line(tmp_path, capsys):
    assert serve_command.main(['--model_path', str(tmp_path / 'missing.pth')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('hybridmednet serve: error:') and 'missing.pth' in err[0]
    with pytest.raises(SystemExit) as exit_:
        serve_command.main(['--model_path', 'x.pth', '--workers', '0'])
    assert exit_.value.code == 2


def test_command_refuses_an_allocator_setting_that_is_not_a_number(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '8M')
    assert serve_command.main(['--model_path', str(tmp_path / 'm.pth')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '$MALLOC_MMAP_THRESHOLD_ must be a whole number' in err[0] and "'8M'" in err[0]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(model_path, *extra, env=None):
    """`hybridmednet serve` in a subprocess on a free loopback port; returns (process, base URL) once ready."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'hybridmednet.cli',
            'serve',
            '--model_path',
            str(model_path),
            '--port',
            str(port),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f'http://127.0.0.1:{port}'
    for _ in range(1200):
        if process.poll() is not None:
            raise AssertionError(f'the server exited: {process.stdout.read()}')
        try:
            if httpx.get(f'{url}/readyz', timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError('the server did not become ready in 120 s')


def stop_server(process):
    process.terminate()
    try:
        return process.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0]


def test_command_serves_on_loopback(model_path):
    process, url = start_server(model_path, env={**os.environ, 'OMP_NUM_THREADS': '2'})  # 2: heatmaps timed
    try:
        r = httpx.post(f'{url}/v1/predict', files={'file': ('x.png', png_bytes(xray(0)))}, timeout=60)
        assert r.status_code == 200 and r.json()['positive_findings'] == list(POSITIVE)
    finally:
        output = stop_server(process)
    assert url + '/' in output and 'http://127.0.0.1:' in output
    assert re.search(r'heatmaps computed (side by side|one after the other) \(two heatmaps \d+ ms', output)
