"""The web page end to end: `hybridmednet serve` in a subprocess, headless Chromium through Selenium.

Uploads a sample X-ray and checks the findings table against the API's JSON for the same file,
toggles a heatmap, uploads an out-of-distribution picture and a corrupt file and sees the warnings,
and saves screenshots (serve_page.png, serve_ood.png, serve_error.png in the test's tmp_path).
Skips, saying why, where Chromium, its driver or Selenium cannot be had.
"""

import shutil

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_serve import POSITIVE, png_bytes, start_server, stop_server, write_model

from hybridmednet.checkpoint import load_checkpoint, load_model, save_checkpoint
from hybridmednet.data.io import read_image
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.data.transforms import build_transforms
from hybridmednet.evaluation.operating_point import OperatingPoint

webdriver = pytest.importorskip('selenium.webdriver', reason='selenium is not installed (the test extra)')
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ready  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMEDRIVER = shutil.which('chromedriver')
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason='no Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver; '
    '.ci/run installs them where it can)',
)
SIZE = 64


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A model whose OOD threshold lies between a sample X-ray and a speckled picture, and the three uploads."""
    ood = pytest.importorskip('hybridmednet.evaluation.ood')
    root = tmp_path_factory.mktemp('browser')
    data = generate_sample_dataset(root / 'data', n=12, size=512, seed=0, workers=1)
    images = sorted((data / 'images').glob('*.png'))
    path = write_model(root / 'model.pth', size=SIZE)
    model, config, _ = load_model(path)
    transform = build_transforms(config, train=False)
    x = torch.stack([transform(read_image(p)) for p in images])
    fitted = ood.fit_ood(ood.ood_features(model, x[2:]), ood.ood_features(model, x[2:6]))
    speckle = root / 'speckle.png'
    speckle.write_bytes(png_bytes(np.random.default_rng(0).random((300, 400)) ** 4))
    scores = fitted.score(ood.ood_features(model, torch.stack([x[0], transform(read_image(speckle))])))
    assert scores[0] < scores[1]
    fitted.threshold = float(scores.mean())
    save_checkpoint(path, {**load_checkpoint(path), 'ood': fitted.to_state()})
    corrupt = root / 'corrupt.png'
    corrupt.write_bytes(images[0].read_bytes()[:2000])
    return {'model': path, 'sample': images[0], 'speckle': speckle, 'corrupt': corrupt}


@pytest.fixture(scope='module')
def server(files):
    process, url = start_server(files['model'])
    yield url
    stop_server(process)


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        f'--user-data-dir={tmp_path_factory.mktemp("chromium-profile")}',
    ):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as exc:  # a driver that does not match the browser, a missing library
        pytest.skip(f'Chromium did not start under chromedriver: {exc}')
    driver.set_page_load_timeout(60)
    # A laptop's screen: the page, not the window, is 1366 x 768.
    metrics = {'width': 1366, 'height': 768, 'deviceScaleFactor': 1, 'mobile': False}
    driver.execute_cdp_cmd('Emulation.setDeviceMetricsOverride', metrics)
    yield driver
    driver.quit()


def upload(driver, path):
    driver.find_element(By.ID, 'file').send_keys(str(path))


def wait(driver, condition, seconds=120):
    return WebDriverWait(driver, seconds).until(condition)


def test_page_scores_an_upload_like_the_api(browser, server, files, tmp_path):
    api = httpx.post(
        f'{server}/v1/predict',
        params={'heatmaps': 'true', 'preview': 'true'},
        files={'file': ('sample.png', files['sample'].read_bytes())},
        timeout=120,
    ).json()
    browser.get(server + '/')
    wait(browser, ready.text_to_be_present_in_element((By.ID, 'model'), 'resnet18'))
    assert 'Not a medical device' in browser.find_element(By.ID, 'use').text

    upload(browser, files['sample'])
    wait(browser, ready.visibility_of_element_located((By.ID, 'findings')))
    rows = browser.find_elements(By.CSS_SELECTOR, '#findings tbody tr')
    assert len(rows) == len(api['findings'])
    by_name = {f['name']: f for f in api['findings']}
    for tr in rows:
        finding = by_name[tr.get_attribute('data-finding')]
        assert tr.find_element(By.CLASS_NAME, 'value').text == f'{finding["probability"]:.2f}'
        assert tr.find_element(By.CLASS_NAME, 'threshold').text == f'┃ {finding["threshold"]:.2f}'
        assert ('positive' in tr.get_attribute('class')) == finding['positive']
    assert [tr.get_attribute('data-finding') for tr in rows[: len(POSITIVE)]] == sorted(
        POSITIVE, key=lambda n: -by_name[n]['probability']
    )
    image = browser.find_element(By.ID, 'image')
    assert image.get_attribute('src') == 'data:image/png;base64,' + api['image']['preview_png']
    assert not browser.find_element(By.ID, 'alert').is_displayed()  # in distribution: no warning
    assert 'Out-of-distribution check: passed' in browser.find_element(By.ID, 'ood').text

    button = browser.find_element(By.CSS_SELECTOR, f'tr[data-finding="{POSITIVE[0]}"] td.heat button')
    button.click()
    assert image.get_attribute('src') == 'data:image/png;base64,' + by_name[POSITIVE[0]]['heatmap_png']
    assert (
        button.get_attribute('aria-pressed') == 'true'
        and f'heatmap: {POSITIVE[0]}' in browser.find_element(By.ID, 'caption').text
    )
    browser.save_screenshot(str(tmp_path / 'serve_page.png'))
    button.click()
    assert image.get_attribute('src') == 'data:image/png;base64,' + api['image']['preview_png']
    assert Image.open(tmp_path / 'serve_page.png').size == (1366, 768)

    upload(browser, files['speckle'])
    alert = wait(browser, ready.visibility_of_element_located((By.ID, 'alert')))
    wait(browser, ready.visibility_of_element_located((By.ID, 'findings')))
    assert 'Out of distribution' in alert.text and 'warn' in alert.get_attribute('class')
    assert 'FLAGGED' in browser.find_element(By.ID, 'ood').text
    browser.save_screenshot(str(tmp_path / 'serve_ood.png'))

    upload(browser, files['corrupt'])
    wait(browser, ready.text_to_be_present_in_element((By.ID, 'alert'), 'Could not read'))
    detail = httpx.post(f'{server}/v1/predict', files={'file': ('c.png', files['corrupt'].read_bytes())}).json()
    alert = browser.find_element(By.ID, 'alert')
    assert detail['detail'] in alert.text and 'error' in alert.get_attribute('class')
    assert not browser.find_element(By.ID, 'findings').is_displayed()  # the last image's findings are gone
    assert not browser.find_element(By.ID, 'figure').is_displayed()
    browser.save_screenshot(str(tmp_path / 'serve_error.png'))


def test_the_findings_table_fits_a_laptop_screen_when_every_finding_is_positive(browser, files, tmp_path):
    """Long names with their POSITIVE tag (Pleural_Thickening) once widened the table past the panel, and the
    heatmap buttons needed sideways scrolling at 1366 x 768."""
    path = write_model(tmp_path / 'model.pth', thresholds=False, size=SIZE)
    config = load_model(path)[1]
    everything = OperatingPoint(config.class_names, np.zeros(len(config.class_names)), method='youden')
    save_checkpoint(path, {**load_checkpoint(path), 'thresholds': everything.to_meta()})
    process, url = start_server(path)
    try:
        browser.get(url + '/')
        wait(browser, ready.text_to_be_present_in_element((By.ID, 'model'), 'resnet18'))
        upload(browser, files['sample'])
        wait(browser, ready.visibility_of_element_located((By.ID, 'findings')))
        assert len(browser.find_elements(By.CSS_SELECTOR, '#findings tbody tr.positive')) == 14
        width, visible = browser.execute_script(
            "const p = document.querySelector('.panel'); return [p.scrollWidth, p.clientWidth];"
        )
        assert width <= visible, (width, visible)
    finally:
        stop_server(process)
