// The low-rank explorer page.  It fetches one matrix's thin SVD  M = U·diag(S)·Vt  from the server once,
// then truncates it here as the rank slider moves:  M_k = Σ_{i<k} S[i]·U[:, i]·Vt[i, :].
// Energy and errors come from the singular values alone (Eckart–Young):
//   E(k) = Σ_{i≤k} σ² / Σ σ²,   ‖M − M_k‖_F = sqrt(Σ_{i>k} σ²),   ‖M − M_k‖_2 = σ_{k+1}.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_PIXELS = 256;  // heatmaps show at most this many rows / columns (exact values at the sampled cells)

// RdBu (ColorBrewer, 11 classes), blue for negative, white at zero, red for positive.
const DIVERGING = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
                   "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"].map(hexToRgb);

const state = {
  info: null,       // the /api/matrix payload (ids, shape, labels)
  m: 0, n: 0, K: 0, // shape and number of singular values
  S: null,          // Float64Array (K)
  rows: null, cols: null,  // sampled row / column indices (h, w)
  US: null,         // Float64Array (h, K): U[rows, :] · S
  V: null,          // Float64Array (K, w): Vt[:, cols]
  original: null,   // Float64Array (h, w): M at the samples (all K terms)
  approx: null,     // Float64Array (h, w): M_k at the samples, updated term by term
  k: 0,             // number of terms in approx
  head: null, tail: null,  // prefix sums of σ² (head[k] = Σ_{i<k}) and suffix sums (tail[k] = Σ_{i≥k})
};

// ---- data --------------------------------------------------------------------------------------------------
function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

// {dtype: "<f4" | "<f8", shape, data: base64 of little-endian bytes} -> Float64Array (row-major)
function decode(field) {
  const bytes = Uint8Array.from(atob(field.data), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const size = field.dtype === "<f4" ? 4 : 8;
  const out = new Float64Array(bytes.length / size);
  for (let i = 0; i < out.length; i++) {
    out[i] = size === 4 ? view.getFloat32(4 * i, true) : view.getFloat64(8 * i, true);
  }
  return out;
}

// `count` evenly spaced indices into 0..n-1 (all of them when count === n)
function samples(n, count) {
  return Array.from({length: count}, (_, i) => Math.floor((i + 0.5) * n / count));
}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// Decode one matrix, sample the heatmap cells, and precompute what every slider move needs.
function prepare(info) {
  const [m, n] = info.shape, K = info.rank;
  const U = decode(info.U), S = decode(info.S), Vt = decode(info.Vt);
  const scale = Math.min(1, MAX_PIXELS / Math.max(m, n));  // keep the aspect ratio
  const rows = samples(m, Math.max(1, Math.round(m * scale)));
  const cols = samples(n, Math.max(1, Math.round(n * scale)));
  const h = rows.length, w = cols.length;
  const US = new Float64Array(h * K), V = new Float64Array(K * w);
  rows.forEach((r, i) => { for (let j = 0; j < K; j++) US[i * K + j] = U[r * K + j] * S[j]; });
  for (let j = 0; j < K; j++) cols.forEach((c, x) => { V[j * w + x] = Vt[j * n + c]; });
  const head = new Float64Array(K + 1), tail = new Float64Array(K + 1);
  for (let i = 0; i < K; i++) head[i + 1] = head[i] + S[i] * S[i];
  for (let i = K - 1; i >= 0; i--) tail[i] = tail[i + 1] + S[i] * S[i];
  Object.assign(state, {info, m, n, K, S, rows, cols, US, V, head, tail, k: 0,
                        approx: new Float64Array(h * w), original: new Float64Array(h * w)});
  for (let j = 0; j < K; j++) addTerm(state.original, j, 1);
}

// target += sign · S[j]·U[rows, j] ⊗ Vt[j, cols]   (one rank-1 term, h·w multiply-adds)
function addTerm(target, j, sign) {
  const {US, V, K} = state, h = state.rows.length, w = state.cols.length;
  for (let i = 0; i < h; i++) {
    const u = sign * US[i * K + j];
    if (u === 0) continue;
    const row = i * w, v = j * w;
    for (let x = 0; x < w; x++) target[row + x] += u * V[v + x];
  }
}

// Move approx from k terms to k2: add or remove the terms in between, or rebuild when that is cheaper.
function truncateTo(k2) {
  let k = state.k;
  if (k2 < k && k - k2 > k2) { state.approx.fill(0); k = 0; }
  for (; k < k2; k++) addTerm(state.approx, k, +1);
  for (; k > k2; k--) addTerm(state.approx, k - 1, -1);
  state.k = k2;
}

// ---- drawing -----------------------------------------------------------------------------------------------
function colour(t) {  // t in [-1, 1] -> [r, g, b]
  const x = (Math.max(-1, Math.min(1, t)) + 1) / 2 * (DIVERGING.length - 1);
  const i = Math.min(DIVERGING.length - 2, Math.floor(x)), f = x - i;
  const a = DIVERGING[i], b = DIVERGING[i + 1];
  return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
}

// The colour map as a lookup table of 511 steps: value v on scale s -> LUT[round((v/s + 1)·255)]
const LUT = Array.from({length: 511}, (_, i) => colour(i / 255 - 1).map(Math.round));

function drawHeatmap(canvas, values, scale) {
  const h = state.rows.length, w = state.cols.length;
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d"), image = ctx.createImageData(w, h), px = image.data;
  const inv = scale > 0 ? 1 / scale : 0;
  for (let p = 0; p < values.length; p++) {
    const t = Math.max(-1, Math.min(1, values[p] * inv));
    const c = LUT[Math.round((t + 1) * 255)];
    px[4 * p] = c[0]; px[4 * p + 1] = c[1]; px[4 * p + 2] = c[2]; px[4 * p + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function drawColorbar(scale) {
  const canvas = $("colorbar"), ctx = canvas.getContext("2d");
  for (let y = 0; y < canvas.height; y++) {
    const [r, g, b] = colour(1 - 2 * y / (canvas.height - 1));
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(0, y, canvas.width, 1);
  }
  $("scale-max").textContent = "+" + fmt(scale);
  $("scale-min").textContent = "−" + fmt(scale);
}

// Bars of σ_i (kept ones in colour), the cumulative energy line (right axis) and the cut at k.
function drawSpectrum() {
  const canvas = $("spectrum"), dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth, H = canvas.clientHeight;
  canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  const {S, K, k, head} = state, log = $("log-scale").checked;
  const pad = {left: 56, right: 48, top: 12, bottom: 28}, pw = W - pad.left - pad.right, ph = H - pad.top - pad.bottom;
  const top = S[0] > 0 ? S[0] : 1;
  const floor = log ? Math.max(S[K - 1], top * 1e-8) : 0;
  const lo = log ? Math.floor(Math.log10(floor > 0 ? floor : top * 1e-8)) : 0;
  const hi = log ? Math.ceil(Math.log10(top)) + (Math.log10(top) % 1 === 0 ? 1 : 0) : top * 1.05;
  const y = (s) => pad.top + ph * (1 - (log ? (Math.log10(Math.max(s, 10 ** lo)) - lo) / (hi - lo) : s / hi));
  const barW = pw / K;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#667"; ctx.strokeStyle = "#e3e6ec"; ctx.lineWidth = 1;
  // left axis ticks: powers of ten (log) or five even steps (linear)
  const ticks = log ? Array.from({length: hi - lo + 1}, (_, i) => 10 ** (lo + i))
                    : Array.from({length: 6}, (_, i) => hi * i / 5);
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (const t of ticks) {
    ctx.beginPath(); ctx.moveTo(pad.left, y(t)); ctx.lineTo(pad.left + pw, y(t)); ctx.stroke();
    ctx.fillText(log ? `1e${Math.round(Math.log10(t))}` : fmt(t), pad.left - 6, y(t));
  }
  for (let i = 0; i < K; i++) {
    ctx.fillStyle = i < k ? "#2166ac" : "#c3c8d2";
    const top_ = y(S[i]);
    ctx.fillRect(pad.left + i * barW, top_, Math.max(barW - (barW > 3 ? 1 : 0), 0.5), pad.top + ph - top_);
  }
  // cumulative energy, right axis 0..100 %
  ctx.strokeStyle = "#d6604d"; ctx.lineWidth = 2; ctx.beginPath();
  for (let i = 1; i <= K; i++) {
    const e = head[K] > 0 ? head[i] / head[K] : 0;
    const px = pad.left + (i - 0.5) * barW, py = pad.top + ph * (1 - e);
    i === 1 ? ctx.moveTo(px, py) : ctx.lineTo(px, py);
  }
  ctx.stroke();
  ctx.fillStyle = "#b2182b"; ctx.textAlign = "left";
  for (const p of [0, 50, 100]) ctx.fillText(`${p}%`, pad.left + pw + 6, pad.top + ph * (1 - p / 100));
  // the cut between σ_k and σ_{k+1}
  const cut = pad.left + k * barW;
  ctx.strokeStyle = "#111"; ctx.lineWidth = 1.5; ctx.setLineDash([5, 4]);
  ctx.beginPath(); ctx.moveTo(cut, pad.top); ctx.lineTo(cut, pad.top + ph); ctx.stroke(); ctx.setLineDash([]);
  const label = ` k = ${k} `, labelW = ctx.measureText(label).width, right = cut > pad.left + pw - 60;
  ctx.fillStyle = "rgba(255, 255, 255, 0.85)";
  ctx.fillRect(right ? cut - labelW - 2 : cut + 2, pad.top + 1, labelW, 15);
  ctx.fillStyle = "#111"; ctx.textAlign = right ? "right" : "left"; ctx.textBaseline = "top";
  ctx.fillText(label, right ? cut - 2 : cut + 2, pad.top + 2);
  // x axis: index i
  ctx.fillStyle = "#667"; ctx.textAlign = "center";
  for (const i of new Set([1, Math.ceil(K / 4), Math.ceil(K / 2), Math.ceil(3 * K / 4), K])) {
    ctx.fillText(String(i), pad.left + (i - 0.5) * barW, pad.top + ph + 8);
  }
  canvas.dataset.plotLeft = pad.left; canvas.dataset.plotWidth = pw;
}

// ---- text --------------------------------------------------------------------------------------------------
function fmt(x, digits = 4) {
  if (!Number.isFinite(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e5 || a < 1e-3 ? x.toExponential(digits - 1) : x.toPrecision(digits);
}

const count = (x) => x.toLocaleString("en-US");

function sub(text) {
  const el = document.createElement("sub");
  el.textContent = text;
  return el;
}

function setStat(id, text, attr, value) {
  const el = $(id);
  el.textContent = text;
  el.dataset[attr] = String(value);  // full precision, for scripts and tests
}

function updateText() {
  const {k, K, m, n, S, head, tail, info} = state;
  const total = head[K], energy = total > 0 ? head[k] / total : NaN;
  const error = Math.sqrt(tail[k]), relative = total > 0 ? error / Math.sqrt(total) : NaN;
  const rankParams = k * (m + n), fullParams = m * n;
  setStat("energy", Number.isFinite(energy) ? `${(100 * energy).toFixed(4)} %` : "– (M = 0)", "energy", energy);
  setStat("error", fmt(error, 6), "error", error);
  setStat("relative-error", Number.isFinite(relative) ? `${(100 * relative).toFixed(4)} %` : "–",
          "relativeError", relative);
  setStat("params", `${count(rankParams)} vs ${count(fullParams)}`, "paramsRank", rankParams);
  $("params").dataset.paramsFull = String(fullParams);
  const ratio = fullParams / rankParams;
  $("params-detail").textContent = ratio >= 1 ? `${ratio.toFixed(ratio >= 10 ? 0 : 2)}× fewer numbers`
                                              : `${(1 / ratio).toFixed(2)}× more numbers than M itself`;
  if (info.adapter) $("params-detail").textContent += ` · the adapter stores r·(m+n) = ` +
                                                      count(info.adapter.r * (m + n));
  setStat("sigmas", `${fmt(S[k - 1])}, ${k < K ? fmt(S[k]) : "0"}`, "sigmaK", S[k - 1]);
  $("rank-value").textContent = String(k);
  document.querySelectorAll(".k").forEach((el) => { el.textContent = String(k); });
  const stats = $("stats");
  Object.assign(stats.dataset, {matrix: info.id, k: String(k), ready: "true"});
}

// ---- updates -----------------------------------------------------------------------------------------------
function render() {
  const scale = maxAbs(state.original);
  const error = state.original.map((v, p) => v - state.approx[p]);
  const errorScale = $("stretch-error").checked ? maxAbs(error) : scale;
  drawHeatmap($("heat-original"), state.original, scale);
  drawHeatmap($("heat-approx"), state.approx, scale);
  drawHeatmap($("heat-error"), error, errorScale);
  drawColorbar(scale);
  $("colorbar").parentElement.style.height = `${$("heat-original").clientHeight}px`;  // as tall as the maps
  $("error-scale").textContent = errorScale !== scale ? `Error scale: ±${fmt(errorScale)}.` : "";
  drawSpectrum();
  updateText();
}

function maxAbs(values) {
  let best = 0;
  for (const v of values) best = Math.max(best, Math.abs(v));
  return best;
}

function setRank(k) {
  k = Math.max(1, Math.min(state.K, Math.round(k)));
  $("rank").value = String(k);
  truncateTo(k);
  render();
  history.replaceState(null, "", `#matrix=${encodeURIComponent(state.info.id)}&k=${k}`);
}

let loading = 0;  // the latest selectMatrix call; an older response that arrives late is dropped

async function selectMatrix(id, k) {
  const ticket = ++loading;
  $("status").textContent = "computing the SVD…";
  $("stats").dataset.ready = "false";
  let payload;
  try {
    payload = await getJSON(`/api/matrix/${encodeURIComponent(id)}`);
  } catch (e) {
    if (ticket === loading) $("status").textContent = `could not load ${id}: ${e.message}`;
    return;
  }
  if (ticket !== loading) return;
  prepare(payload);
  const {info, m, n, K, rows, cols} = state;
  $("status").textContent = "";
  $("description").textContent = info.description;
  $("shape").replaceChildren(`(${m} × ${n}, ‖M‖`, sub("F"), ` = ${fmt(info.frobenius)})`);
  $("sampling").textContent = rows.length < m || cols.length < n
    ? `Heatmaps show ${rows.length} × ${cols.length} evenly spaced cells of the ${m} × ${n} matrix.` : "";
  $("rank").max = String(K);
  $("rank-max").textContent = String(K) + (info.adapter ? ` (ΔW has rank ≤ r = ${info.adapter.r})` : "");
  $("matrix").value = id;
  setRank(k ?? Number($("rank").value));  // keep the rank the slider shows (moved while loading, too)
}

// Click or drag on the spectrum to move the cut.
function rankFromSpectrum(event) {
  const canvas = $("spectrum"), box = canvas.getBoundingClientRect();
  const x = event.clientX - box.left - Number(canvas.dataset.plotLeft);
  setRank(Math.round(x / Number(canvas.dataset.plotWidth) * state.K));
}

async function main() {
  const {matrices} = await getJSON("/api/matrices");
  const select = $("matrix");
  for (const entry of matrices) {
    const option = document.createElement("option");
    option.value = entry.id; option.textContent = entry.label;
    select.append(option);
  }
  const hash = new URLSearchParams(location.hash.slice(1));
  const first = matrices.some((e) => e.id === hash.get("matrix")) ? hash.get("matrix") : matrices[0].id;
  let pending = null;  // coalesce slider events to one update per frame
  $("rank").addEventListener("input", (e) => {
    if (pending === null) requestAnimationFrame(() => { if (state.info) setRank(pending); pending = null; });
    pending = Number(e.target.value);
  });
  select.addEventListener("change", () => selectMatrix(select.value));
  $("log-scale").addEventListener("change", drawSpectrum);
  $("stretch-error").addEventListener("change", render);
  const spectrum = $("spectrum");
  spectrum.addEventListener("pointerdown", (e) => { spectrum.setPointerCapture(e.pointerId); rankFromSpectrum(e); });
  spectrum.addEventListener("pointermove", (e) => { if (e.buttons) rankFromSpectrum(e); });
  window.addEventListener("resize", () => { if (state.info) drawSpectrum(); });
  await selectMatrix(first, Number(hash.get("k")) || 8);
}

window.explore = {state, setRank, selectMatrix};  // for scripts and tests
main().catch((e) => { $("status").textContent = `error: ${e.message}`; });
