"""Serving throughput and latency: `hybridmednet serve` over HTTP on a free 127.0.0.1 port, next to
in-process inference (read_upload + preprocess + ServedModel.score, one request at a time) on the same
images in the same run.

Phases: in-process; 1 client; N clients (micro-batching); resident memory of the server over
1,000 requests; one 2048 x 2048 DICOM with heatmaps=true, one client at a time. Every phase is
bounded in time and in requests. The model is untrained (the weights do not change the cost); its
thresholds are set so that the DICOM has `--positives` positive findings, each one a heatmap (integrated
gradients from a healthy reference image, which a trained model stores).

    .venv/bin/python benchmarks/bench_serve.py [--backbone convnext_tiny] [--image-size 224] [--seconds 20]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from hybridmednet.checkpoint import save_checkpoint
from hybridmednet.config import Config
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.evaluation.gradcam import reference_entry
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.models.hybrid import HybridMedNet
from hybridmednet.serve.inference import Request, ServedModel
from hybridmednet.serve.uploads import read_upload


def dicom_bytes(pixels: np.ndarray) -> bytes:
    """A 16-bit MONOCHROME2 secondary-capture DICOM of `pixels` (uint16 [H, W])."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def percentiles(latencies: list[float]) -> str:
    p50, p95, p99 = (1000 * np.percentile(latencies, q) for q in (50, 95, 99))
    return f'{p50:.0f} / {p95:.0f} / {p99:.0f}'


def in_process(served: ServedModel, images: list[bytes], seconds: float, limit: int) -> tuple[float, list[float]]:
    """One request after another on a worker thread, as the server's inference thread runs (on a loaded
    machine, torch's threads in the main thread ran 10x slower than in a worker thread here)."""
    latencies: list[float] = []
    elapsed = [0.0]

    def loop() -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds and len(latencies) < limit:
            t = time.perf_counter()
            upload = read_upload(images[len(latencies) % len(images)])
            served.score([Request(served.preprocess(upload.image), False)])
            latencies.append(time.perf_counter() - t)
        elapsed[0] = time.perf_counter() - start

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    return len(latencies) / elapsed[0], latencies


def drive(
    url: str, images: list[bytes], clients: int, seconds: float, limit: int, params: dict | None = None
) -> tuple[float, list[float], int]:
    """`clients` threads post images until `seconds` pass or `limit` are sent: (req/s, latencies, failed)."""
    latencies: list[float] = []
    failed = [0]
    sent = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < deadline:
                with lock:
                    if sent[0] >= limit:
                        return
                    i = sent[0]
                    sent[0] += 1
                t = time.perf_counter()
                try:
                    r = http.post(
                        f'{url}/v1/predict', params=params or {}, files={'file': ('x', images[i % len(images)])}
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - t)
                    failed[0] += not ok

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - start), latencies, failed[0]


def rss_mib(pid: int) -> float:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    raise RuntimeError('no VmRSS')


def batch_mean(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = httpx.get(f'{url}/metrics').text
    values = dict(line.split() for line in text.splitlines() if line.startswith('hybridmednet_batch_size_'))
    return float(values['hybridmednet_batch_size_sum']), float(values['hybridmednet_batch_size_count'])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--backbone', default='convnext_tiny')
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--sample-size', type=int, default=1024, help='side of the PNG uploads (NIH PNGs are 1024)')
    p.add_argument('--seconds', type=float, default=20, help='length of each throughput phase')
    p.add_argument('--rounds', type=int, default=3, help='rounds of in-process / 1 client / N clients')
    p.add_argument('--clients', type=int, default=8)
    p.add_argument('--max-batch', type=int, help="(default: the server's own, 4 on the CPU)")
    p.add_argument('--batch-wait-ms', type=float, default=5)
    p.add_argument('--memory-requests', type=int, default=1000)
    p.add_argument('--dicom-requests', type=int, default=20)
    p.add_argument('--positives', type=int, default=2, help='positive findings (heatmaps) of the DICOM')
    p.add_argument('--threads', type=int, help="torch threads, in-process and in the server (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix='bench-serve-'))
    data = generate_sample_dataset(work / 'data', n=16, size=args.sample_size, seed=0, workers=1)
    images = [path.read_bytes() for path in sorted((data / 'images').glob('*.png'))]
    big = Image.open(io.BytesIO(images[0])).convert('L').resize((2048, 2048), Image.Resampling.BICUBIC)
    dicom = dicom_bytes(np.asarray(big, dtype=np.float64) * (4095 / 255))

    config = Config(
        MODEL={'backbone': args.backbone, 'pretrained': False}, DATA={'image_size': args.image_size}
    ).validate()
    torch.manual_seed(0)
    model = HybridMedNet(config).eval()
    state = {'model_state_dict': model.state_dict(), 'config': config.to_dict(), 'class_names': config.class_names}
    model_path = save_checkpoint(work / 'model.pth', state)
    served = ServedModel.load(model_path)
    probs = served.score([Request(served.preprocess(read_upload(dicom).image), False)])[0].probabilities
    ranked = np.sort(probs)[::-1]
    threshold = float(ranked[args.positives - 1] + ranked[args.positives]) / 2
    thresholds = np.full(len(probs), threshold)
    record = OperatingPoint(config.class_names, thresholds, method='youden', fitted_on={'split': 'bench'}).to_meta()
    # a heatmap reference, as training stores one: heatmaps are integrated gradients from it (evaluation/gradcam.py)
    reference = reference_entry([torch.stack([served.preprocess(read_upload(b).image) for b in images])], 'bench')
    save_checkpoint(model_path, {**state, 'thresholds': record, 'heatmap_reference': reference})
    served = ServedModel.load(model_path)
    print(
        f'{args.backbone} at {args.image_size} px, {torch.get_num_threads()} threads, uploads: {len(images)} PNGs of '
        f'{args.sample_size} px; load average {os.getloadavg()[0]:.1f}',
        flush=True,
    )
    port = free_port()
    command = [sys.executable, '-m', 'hybridmednet.cli', 'serve', '--model_path', str(model_path), '--port', str(port)]
    command += ['--batch-wait-ms', str(args.batch_wait_ms)]
    command += ['--max-batch', str(args.max_batch)] if args.max_batch else []
    env = {**os.environ, 'OMP_NUM_THREADS': str(torch.get_num_threads())}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(1200):
            try:
                if httpx.get(f'{url}/readyz').status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError('the server did not become ready in 120 s')
        limits = httpx.get(f'{url}/v1/model').json()['limits']
        print(f'server: --max-batch {limits["max_batch"]} --batch-wait-ms {args.batch_wait_ms:g}', flush=True)
        in_process(served, images, 5, 5)  # warm-up
        drive(url, images, 1, 5, 5)
        # In-process, 1 client and N clients alternate, round after round, so that all three see the same
        # load from other jobs on a shared machine; medians over the rounds.
        rates: dict[str, list[float]] = {'local': [], 'one': [], 'many': []}
        local_lat, one_lat, many_lat = [], [], []
        one_failed = many_failed = 0
        batched = [0.0, 0.0]
        for r in range(args.rounds):
            rps, lat = in_process(served, images, args.seconds, 10_000)
            rates['local'].append(rps)
            local_lat += lat
            rps, lat, failed = drive(url, images, 1, args.seconds, 10_000)
            rates['one'].append(rps)
            one_lat += lat
            one_failed += failed
            before = batch_mean(url)
            rps, lat, failed = drive(url, images, args.clients, args.seconds, 10_000)
            after = batch_mean(url)
            rates['many'].append(rps)
            many_lat += lat
            many_failed += failed
            batched = [batched[0] + after[0] - before[0], batched[1] + after[1] - before[1]]
            print(
                f'round {r + 1}: in-process {rates["local"][-1]:.2f}, 1 client {rates["one"][-1]:.2f}, '
                f'{args.clients} clients {rps:.2f} req/s; load average {os.getloadavg()[0]:.1f}',
                flush=True,
            )
        local_rps, one_rps, many_rps = (float(np.median(rates[k])) for k in ('local', 'one', 'many'))
        mean_batch = batched[0] / max(batched[1], 1)
        one_ratios = np.array(rates['one']) / np.array(rates['local'])
        many_ratios = np.array(rates['many']) / np.array(rates['one'])

        drive(url, images, args.clients, 60, 50)  # settle allocator caches before the memory baseline
        rss_before = rss_mib(server.pid)
        mem_rps, _, mem_failed = drive(url, images, args.clients, 1800, args.memory_requests)
        rss_after = rss_mib(server.pid)
        growth = 100 * (rss_after / rss_before - 1)
        print(f'memory: {rss_before:.0f} -> {rss_after:.0f} MiB over {args.memory_requests} requests', flush=True)

        drive(url, [dicom], 1, 60, 3, {'heatmaps': 'true'})  # warm-up
        _, dicom_lat, dicom_failed = drive(url, [dicom], 1, 600, args.dicom_requests, {'heatmaps': 'true'})
        answer = httpx.post(f'{url}/v1/predict', params={'heatmaps': 'true'}, files={'file': ('x', dicom)}, timeout=120)
        heatmaps = sum(f['heatmap_png'] is not None for f in answer.json()['findings'])
    finally:
        server.terminate()
        server.wait(30)
    failed = one_failed + many_failed + mem_failed + dicom_failed

    print(f'\nload average at the end {os.getloadavg()[0]:.1f}\n')
    print('| measure | result | target |')
    print('|---|---|---|')
    print(f'| in-process, 1 request at a time | {local_rps:.2f} req/s, p50/p95/p99 {percentiles(local_lat)} ms | |')
    print(
        f'| HTTP, 1 client | {one_rps:.2f} req/s ({one_rps / local_rps:.2f}x in-process; rounds '
        f'{one_ratios.min():.2f}-{one_ratios.max():.2f}x), p50/p95/p99 {percentiles(one_lat)} ms | >= 0.85x |'
    )
    print(
        f'| HTTP, {args.clients} clients | {many_rps:.2f} req/s ({many_rps / one_rps:.2f}x 1 client; rounds '
        f'{many_ratios.min():.2f}-{many_ratios.max():.2f}x; mean batch {mean_batch:.1f}), p50/p95/p99 '
        f'{percentiles(many_lat)} ms | >= 1.2x |'
    )
    print(
        f'| server RSS over {args.memory_requests} requests ({args.clients} clients, {mem_rps:.2f} req/s) | '
        f'{rss_before:.0f} -> {rss_after:.0f} MiB ({growth:+.1f}%) | < 5% |'
    )
    print(
        f'| 2048 x 2048 DICOM, heatmaps=true ({heatmaps} heatmaps), 1 client | p50/p95/p99 '
        f'{percentiles(dicom_lat)} ms | p95 <= 300 ms |'
    )
    print(
        f'| failed requests | {failed} of {len(one_lat) + len(many_lat) + args.memory_requests + len(dicom_lat)} | 0 |'
    )


if __name__ == '__main__':
    main()
