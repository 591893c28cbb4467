// The page talks to the same server's API only; every text from a file or an answer goes in as text, never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'hybridmednet-token';
let token = sessionStorage.getItem(TOKEN_KEY) || '';
let answer = null; // the answer shown now
let shown = null; // the finding whose heatmap is over the image, or null

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => null);
  if (response.status === 401) $('token-form').hidden = false;
  if (!response.ok) {
    const detail = body && typeof body.detail === 'string' ? body.detail : response.statusText;
    throw new ApiError(response.status, detail);
  }
  return body;
}

async function loadModel() {
  try {
    const facts = await api('/v1/model');
    const m = facts.model;
    $('model').textContent =
      `${m.backbone} · ${facts.card.image_size} px · ${m.runtime} · weights ${m.weights_hash || 'unrecorded'}` +
      (m.thresholds_fitted ? ` · thresholds: ${m.thresholds_method}` : ' · thresholds NOT fitted (0.5)');
    $('use').textContent = facts.card.intended_use;
    if (!facts.heatmaps_available) {
      $('want-heatmaps').checked = false;
      $('want-heatmaps').disabled = true;
    }
  } catch (error) {
    $('model').textContent = error.status === 503 ? `Model: ${error.message}…` : `Model: ${error.message}`;
    if (error.status === 503 && error.message === 'the model is loading') setTimeout(loadModel, 2000);
  }
}

function setAlert(kind, text) {
  const box = $('alert');
  box.className = `alert ${kind}`;
  box.textContent = text;
  box.hidden = !text;
}

function clearResults() {
  // A new upload first removes the last one's image and findings: they must never sit beside another image.
  answer = null;
  shown = null;
  setAlert('', '');
  $('figure').hidden = true;
  $('image').removeAttribute('src');
  $('findings').hidden = true;
  $('findings').tBodies[0].replaceChildren();
  $('notes').replaceChildren();
  $('summary').textContent = 'No image yet.';
  $('ood').textContent = '';
}

async function score(file) {
  clearResults();
  $('drop').hidden = true;
  $('busy').hidden = false;
  $('summary').textContent = `Scoring ${file.name}…`;
  const form = new FormData();
  form.append('file', file, file.name);
  const params = new URLSearchParams({ preview: 'true', heatmaps: String($('want-heatmaps').checked) });
  try {
    show(await api(`/v1/predict?${params}`, { method: 'POST', body: form }), file.name);
  } catch (error) {
    $('drop').hidden = false;
    $('summary').textContent = 'No findings: the image was not scored.';
    const unreadable = [413, 415, 422].includes(error.status);
    setAlert('error', `${unreadable ? 'Could not read' : 'Could not score'} ${file.name}: ${error.message}`);
  } finally {
    $('busy').hidden = true;
  }
}

function fmt(value) {
  return value.toFixed(2);
}

function show(result, name) {
  answer = result;
  const image = result.image;
  $('image').src = `data:image/png;base64,${image.preview_png}`;
  $('caption').textContent = `${name} · ${image.format.toUpperCase()} · ${image.width} × ${image.height}`;
  $('figure').hidden = false;
  const ood = result.ood;
  if (ood && ood.flagged) {
    setAlert(
      'warn',
      `Out of distribution: this image does not resemble the images the model was trained on ` +
        `(score ${ood.score.toFixed(1)} > ${ood.threshold.toFixed(1)}). Its findings may mean nothing.`,
    );
  }
  $('ood').textContent = ood
    ? `Out-of-distribution check: ${ood.flagged ? 'FLAGGED' : 'passed'} ` +
      `(score ${ood.score.toFixed(1)} ${ood.flagged ? '>' : '≤'} ${ood.threshold.toFixed(1)})`
    : 'Out-of-distribution check: not available for this model';
  const positives = result.positive_findings;
  $('summary').replaceChildren();
  if (positives.length) {
    const strong = document.createElement('strong');
    strong.textContent = `${positives.length} positive: `;
    $('summary').append(strong, positives.join(', '));
  } else {
    $('summary').textContent = 'No finding at or above its threshold.';
  }
  const rows = [...result.findings].sort((a, b) => b.positive - a.positive || b.probability - a.probability);
  $('findings').tBodies[0].replaceChildren(...rows.map(row));
  $('findings').hidden = false;
  $('notes').replaceChildren(
    ...result.notes.map((text) => {
      const item = document.createElement('li');
      item.textContent = text;
      return item;
    }),
  );
}

function row(finding) {
  const tr = document.createElement('tr');
  tr.dataset.finding = finding.name;
  if (finding.positive) tr.className = 'positive';

  const name = document.createElement('th');
  name.scope = 'row';
  name.textContent = finding.name;
  if (finding.positive) {
    const tag = document.createElement('span');
    tag.className = 'tag';
    tag.textContent = 'POSITIVE';
    name.append(tag);
  }

  const cell = document.createElement('td');
  const prob = document.createElement('div');
  prob.className = 'prob';
  const track = document.createElement('div');
  track.className = 'track';
  track.title = `probability ${fmt(finding.probability)}, threshold ${fmt(finding.threshold)}`;
  const fill = document.createElement('div');
  fill.className = 'fill';
  fill.style.width = `${(100 * finding.probability).toFixed(1)}%`;
  const mark = document.createElement('div');
  mark.className = 'mark';
  mark.style.left = `${(100 * Math.min(Math.max(finding.threshold, 0), 1)).toFixed(1)}%`;
  track.append(fill, mark);
  const value = document.createElement('span');
  value.className = 'value';
  value.textContent = fmt(finding.probability);
  const threshold = document.createElement('span');
  threshold.className = 'threshold';
  threshold.textContent = `┃ ${fmt(finding.threshold)}`;
  prob.append(track, value, threshold);
  cell.append(prob);

  const heat = document.createElement('td');
  heat.className = 'heat';
  if (finding.heatmap_png) {
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = 'Show';
    button.setAttribute('aria-pressed', 'false');
    button.addEventListener('click', () => toggleHeatmap(finding.name));
    heat.append(button);
  } else {
    heat.textContent = '–';
  }
  tr.append(name, cell, heat);
  return tr;
}

function toggleHeatmap(name) {
  shown = shown === name ? null : name;
  const finding = answer.findings.find((f) => f.name === shown);
  $('image').src = `data:image/png;base64,${finding ? finding.heatmap_png : answer.image.preview_png}`;
  for (const button of document.querySelectorAll('td.heat button')) {
    const on = button.closest('tr').dataset.finding === shown;
    button.setAttribute('aria-pressed', String(on));
    button.textContent = on ? 'Hide' : 'Show';
  }
  const caption = $('caption').textContent.split(' · heatmap')[0];
  $('caption').textContent = finding ? `${caption} · heatmap: ${name}` : caption;
}

$('open').addEventListener('click', () => $('file').click());
$('drop').addEventListener('click', () => $('file').click());
$('file').addEventListener('change', () => {
  if ($('file').files.length) score($('file').files[0]);
  $('file').value = '';
});
const viewer = $('viewer');
viewer.addEventListener('dragover', (event) => {
  event.preventDefault();
  viewer.classList.add('dragging');
});
viewer.addEventListener('dragleave', () => viewer.classList.remove('dragging'));
viewer.addEventListener('drop', (event) => {
  event.preventDefault();
  viewer.classList.remove('dragging');
  if (event.dataTransfer.files.length) score(event.dataTransfer.files[0]);
});
$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  token = $('token').value;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token-form').hidden = true;
  loadModel();
});
loadModel();
