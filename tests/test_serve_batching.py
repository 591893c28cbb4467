"""Micro-batching: requests that arrive together share a batch, each gets its own result, a lone request
does not wait for company, and inference never runs on the event loop."""

import asyncio
import threading

import pytest

pytest.importorskip('fastapi', reason="the serve extra is not installed: pip install 'hybridmednet[serve]'")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import png_bytes, post, write_model, xray  # noqa: E402

from hybridmednet.serve.app import Settings, create_app  # noqa: E402
from hybridmednet.serve.batching import MicroBatcher, default_max_batch  # noqa: E402
from hybridmednet.serve.inference import ServedModel  # noqa: E402

LONG = 30  # seconds: a bound that only a wrong implementation reaches


class Recorder:
    """run(): records each batch, answers item * 10; the first batch can be held until released."""

    def __init__(self, hold_first=False):
        self.batches = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items):
        self.entered.set()
        assert self.release.wait(LONG)
        self.batches.append(list(items))
        return [i * 10 for i in items]


async def wait_until(condition):
    for _ in range(LONG * 100):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError('condition not reached')


def run_with(batcher, coroutine):
    batcher.start()
    try:
        return asyncio.run(asyncio.wait_for(coroutine, LONG))
    finally:
        batcher.stop()


@pytest.mark.parametrize('waiting', [7, 20])
def test_requests_queued_together_share_batches_of_at_most_max_batch(waiting):
    run = Recorder(hold_first=True)
    batcher = MicroBatcher(run, max_batch=8, wait_s=0.0)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(0))
        await wait_until(run.entered.is_set)  # the worker is busy with the first request
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, waiting + 1)]
        await wait_until(lambda: batcher._queue.qsize() == waiting)
        run.release.set()
        return await asyncio.gather(first, *rest)

    results = run_with(batcher, scenario())
    assert results == [i * 10 for i in range(waiting + 1)]  # each request gets its own answer
    sizes = [len(b) for b in run.batches]
    assert sizes[0] == 1 and max(sizes) <= 8 and sum(sizes) == waiting + 1
    assert sizes[1] == min(waiting, 8)


def test_a_lone_request_does_not_wait_for_company():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=8, wait_s=3600)  # a batcher that waited out its window would time out
    assert run_with(batcher, batcher.submit(4)) == 40


def test_a_batch_waits_for_requests_already_arriving():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=8, wait_s=LONG / 2)

    async def scenario():
        with batcher.expecting() as second:  # a request being received/decoded
            first = asyncio.ensure_future(batcher.submit(1))
            await asyncio.sleep(0.2)
            answers = await asyncio.gather(first, batcher.submit(2, second))
        return answers

    assert run_with(batcher, scenario()) == [10, 20]
    assert run.batches == [[1, 2]]


def test_inference_runs_off_the_event_loop():
    release = threading.Event()

    def run(items):
        assert release.wait(LONG)  # set by a coroutine: only possible while the loop keeps running
        return items

    batcher = MicroBatcher(run, max_batch=8, wait_s=0)

    async def scenario():
        pending = asyncio.ensure_future(batcher.submit('x'))
        await asyncio.sleep(0.05)
        release.set()
        return await pending

    assert run_with(batcher, scenario()) == 'x'


def test_an_error_reaches_every_request_of_its_batch_and_the_worker_goes_on():
    calls = []

    def run(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError('boom')
        return items

    batcher = MicroBatcher(run, max_batch=8, wait_s=0)

    async def scenario():
        with pytest.raises(RuntimeError, match='boom'):
            await batcher.submit(1)
        return await batcher.submit(2)

    assert run_with(batcher, scenario()) == 2


def test_the_server_answers_while_a_batch_is_scored(tmp_path):
    path = write_model(tmp_path / 'm.pth')
    served = ServedModel.load(path)
    entered, release = threading.Event(), threading.Event()
    score = served.score

    def held(requests):
        entered.set()
        assert release.wait(LONG)
        return score(requests)

    served.score = held
    with TestClient(create_app(Settings(str(path)), served)) as client:
        answers = []
        thread = threading.Thread(target=lambda: answers.append(post(client, png_bytes(xray(0)))))
        thread.start()
        assert entered.wait(LONG)
        assert client.get('/healthz').status_code == 200  # the event loop is free while the model runs
        assert client.get('/v1/model').status_code == 200
        release.set()
        thread.join(LONG)
    assert answers[0].status_code == 200 and len(answers[0].json()['findings']) == 14


def test_the_default_batch_fits_the_cpu_caches_and_an_explicit_one_is_kept(tmp_path):
    """On a CPU a batch above about 4 x 224 x 224 pixels is slower per image (docs/benchmarks.md); a GPU gets 8."""
    assert [default_max_batch('cpu', size) for size in (64, 224, 256, 320, 512)] == [49, 4, 3, 1, 1]
    assert default_max_batch('cuda:1', 512) == 8 and default_max_batch('cpu:0', 224) == 4
    path = write_model(tmp_path / 'm.pth', size=224)
    for settings, expected in [(Settings(str(path)), 4), (Settings(str(path), max_batch=2), 2)]:
        with TestClient(create_app(settings, ServedModel.load(path))) as c:
            assert c.get('/v1/model').json()['limits']['max_batch'] == expected
