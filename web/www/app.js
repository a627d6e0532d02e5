// The page's glue: reads the user's files and knobs, calls the wasm Engine, and shows every
// result, error and check in words on the page (`data-state` and `data-check` on each <output>
// are what the browser test reads).
import init, { Engine } from './pkg/kernels_web.js';

const $ = (id) => document.getElementById(id);
let engine;
let models = [];
let fishers = [];

function show(id, state, text, check) {
  const out = $(id);
  out.dataset.state = state;
  out.textContent = text;
  if (check === undefined) delete out.dataset.check;
  else out.dataset.check = check ? 'pass' : 'fail';
}

function verdict(worst) {
  return worst <= 1
    ? `reference check passed (worst error ${worst.toFixed(3)} of its bound)`
    : `reference check FAILED (worst error ${worst.toFixed(3)} of its bound)`;
}

// Runs `work`, showing it in `id`; buttons in `buttons` are disabled meanwhile.
async function run(id, buttons, work) {
  for (const b of buttons) $(b).disabled = true;
  show(id, 'running', 'running…');
  try {
    await work();
  } catch (e) {
    show(id, 'error', e && e.message ? e.message : String(e));
  } finally {
    for (const b of buttons) $(b).disabled = false;
  }
}

async function readFiles(list) {
  const picked = [...list];
  if (picked.length < 2 || picked.length > 3) {
    models = [];
    show('merge-status', 'error', `Pick two or three models (a base, then one or two fine-tunes); you gave ${picked.length}.`);
    $('files-picked').textContent = 'no models yet';
    return;
  }
  models = await Promise.all(picked.map(async (f) => new Uint8Array(await f.arrayBuffer())));
  fishers = [];
  $('fishers-picked').textContent = '';
  $('files-picked').textContent = picked.map((f, i) => (i === 0 ? 'base: ' : '') + f.name).join(', ');
  show('merge-status', 'idle', '');
}

function setupMerge() {
  $('merge-files').addEventListener('change', (e) => readFiles(e.target.files));
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    readFiles(e.dataTransfer.files);
  });
  $('fisher-files').addEventListener('change', async (e) => {
    fishers = await Promise.all([...e.target.files].map(async (f) => new Uint8Array(await f.arrayBuffer())));
    $('fishers-picked').textContent = [...e.target.files].map((f) => f.name).join(', ');
  });
  $('synthetic').addEventListener('click', () => {
    models = [...Engine.synthetic_models(3, 1)];
    fishers = [...Engine.synthetic_fishers(2, 1)];
    $('files-picked').textContent = 'synthetic: a base and two fine-tunes (bf16, 4 tensors)';
    $('fishers-picked').textContent = 'synthetic Fisher information for both fine-tunes';
    show('merge-status', 'idle', '');
  });
  $('merge-cancel').addEventListener('click', () => engine.cancel());
  $('merge-run').addEventListener('click', () => run('merge-status', ['merge-run', 'synthetic'], async () => {
    if (models.length < 2) throw new Error('Pick a base and one or two fine-tuned models first, or make a synthetic set.');
    $('merge-download').hidden = true;
    $('merge-cancel').disabled = false;
    try {
      const r = await engine.merge(models, fishers, $('method').value, Number($('lambda').value),
        Number($('density').value), Number($('drop-p').value), Number($('seed').value),
        (done, total) => { $('merge-progress').value = total ? done / total : 1; });
      const link = $('merge-download');
      if (link.href) URL.revokeObjectURL(link.href);
      link.href = URL.createObjectURL(new Blob([r.bytes], { type: 'application/octet-stream' }));
      link.hidden = false;
      show('merge-status', 'done', `${r.tensors} tensors merged in ${r.millis.toFixed(1)} ms ` +
        `(${r.gb_per_s.toFixed(3)} GB/s); ${verdict(r.worst_ratio)}.`, r.worst_ratio <= 1);
    } finally {
      $('merge-cancel').disabled = true;
    }
  }));
}

function setupCompress() {
  const density = $('compress-density');
  density.addEventListener('input', () => { $('compress-density-value').textContent = Number(density.value).toFixed(2); });
  $('compress-run').addEventListener('click', () => run('compress-status', ['compress-run'], async () => {
    if (models.length < 2) throw new Error('Pick or make models in section 1 first: the task vector is the first fine-tune minus the base.');
    const r = await engine.compress(models[0], models[1], Number(density.value));
    const kib = (b) => (b / 1024).toFixed(1);
    show('compress-status', 'done', `${r.bits_per_parameter.toFixed(3)} bits per parameter, ` +
      `${kib(r.compressed_bytes)} KiB against ${kib(r.original_bytes)} KiB ` +
      `(${(r.original_bytes / r.compressed_bytes).toFixed(1)}× smaller), relative error ` +
      `${r.relative_error.toFixed(4)}, ${r.kept} entries kept; codes ` +
      `${r.codes_match ? 'identical to' : 'DIFFERENT from'} the reference's (${r.millis.toFixed(1)} ms).`, r.codes_match);
  }));
}

function drawBars(canvas, points) {
  const g = canvas.getContext('2d');
  g.clearRect(0, 0, canvas.width, canvas.height);
  const top = Math.max(1.5, ...points.map((p) => p.speedup));
  const w = canvas.width / points.length;
  g.font = '12px system-ui';
  g.strokeStyle = '#999';
  const one = canvas.height - 20 - (canvas.height - 40) / top;
  g.beginPath(); g.moveTo(0, one); g.lineTo(canvas.width, one); g.stroke();
  points.forEach((p, i) => {
    const h = (canvas.height - 40) * (p.speedup / top);
    g.fillStyle = p.pass ? '#2a7' : '#c33';
    g.fillRect(i * w + 8, canvas.height - 20 - h, w - 16, h);
    g.fillStyle = '#222';
    g.fillText(`s=${p.sparsity.toFixed(2)}`, i * w + 8, canvas.height - 5);
    g.fillText(`${p.speedup.toFixed(2)}×`, i * w + 8, canvas.height - 24 - h);
  });
}

function setupGemv() {
  const slider = $('sparsity');
  slider.addEventListener('input', () => { $('sparsity-value').textContent = Number(slider.value).toFixed(2); });
  const size = () => $('gemv-size').value.split('x').map(Number);
  const measure = async (s) => {
    const [inputs, outputs] = size();
    const r = await engine.gemv(inputs, outputs, s, 10);
    return { sparsity: s, dense: r.dense_ms, sparse: r.sparse_ms, speedup: r.dense_ms / Math.max(r.sparse_ms, 1e-6), pass: r.worst_ratio <= 1, worst: r.worst_ratio };
  };
  const report = (points) => {
    drawBars($('gemv-chart'), points);
    const last = points[points.length - 1];
    const worst = Math.max(...points.map((p) => p.worst));
    show('gemv-status', 'done', `sparsity ${last.sparsity.toFixed(2)}: dense ${last.dense.toFixed(3)} ms, sparse ` +
      `${last.sparse.toFixed(3)} ms, ${last.speedup.toFixed(2)}× faster; ${verdict(worst)}.`, worst <= 1);
  };
  $('gemv-run').addEventListener('click', () => run('gemv-status', ['gemv-run', 'gemv-sweep'], async () => {
    report([await measure(Number(slider.value))]);
  }));
  $('gemv-sweep').addEventListener('click', () => run('gemv-status', ['gemv-run', 'gemv-sweep'], async () => {
    const points = [];
    for (const s of [0, 0.25, 0.5, 0.75, 0.9]) {
      points.push(await measure(s));
      drawBars($('gemv-chart'), points);
    }
    report(points);
  }));
}

// The grey values of the picture on the `original` canvas.
function greyPixels() {
  const c = $('original');
  const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const grey = new Float32Array(c.width * c.height);
  for (let i = 0; i < grey.length; i++) {
    grey[i] = (0.299 * data[4 * i] + 0.587 * data[4 * i + 1] + 0.114 * data[4 * i + 2]) / 255;
  }
  return grey;
}

function drawGrey(canvas, values) {
  const g = canvas.getContext('2d');
  const img = g.createImageData(canvas.width, canvas.height);
  values.forEach((v, i) => {
    const byte = Math.max(0, Math.min(255, Math.round(v * 255)));
    img.data.set([byte, byte, byte, 255], 4 * i);
  });
  g.putImageData(img, 0, 0);
}

function drawErrors(canvas, errors, rank) {
  const g = canvas.getContext('2d');
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.strokeStyle = '#36c';
  g.beginPath();
  const top = Math.max(...errors, 1e-12);
  errors.forEach((e, i) => {
    const x = 10 + (canvas.width - 20) * (i / Math.max(1, errors.length - 1));
    const y = canvas.height - 15 - (canvas.height - 30) * (e / top);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  g.fillStyle = '#222';
  g.font = '12px system-ui';
  g.fillText(`relative error vs rank (1 to ${rank}; top ${top.toFixed(3)})`, 10, 12);
}

function generatedPicture() {
  const c = $('original');
  const values = new Float32Array(c.width * c.height);
  for (let i = 0; i < c.height; i++) {
    for (let j = 0; j < c.width; j++) {
      const r = Math.hypot(i - 64, j - 64);
      values[i * c.width + j] = 0.5 + 0.25 * Math.sin(r / 6) + 0.2 * Math.cos(j / 9) * Math.sin(i / 13) + (((i >> 4) + (j >> 4)) % 2) * 0.1;
    }
  }
  drawGrey(c, values);
}

function setupLowRank() {
  generatedPicture();
  const rank = $('rank');
  rank.addEventListener('input', () => { $('rank-value').textContent = rank.value; });
  $('image-file').addEventListener('change', (e) => run('lowrank-status', ['lowrank-run'], async () => {
    const file = e.target.files[0];
    if (!file) return;
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {
      throw new Error(`${file.name} is not an image this browser can read.`);
    }
    $('original').getContext('2d').drawImage(bitmap, 0, 0, 128, 128);
    show('lowrank-status', 'idle', `${file.name}, scaled to 128 × 128`);
  }));
  $('lowrank-run').addEventListener('click', () => run('lowrank-status', ['lowrank-run'], async () => {
    const c = $('original');
    const r = await engine.low_rank(greyPixels(), c.height, c.width, Number(rank.value));
    drawGrey($('approximation'), r.image);
    drawErrors($('rank-chart'), r.errors, Number(rank.value));
    show('lowrank-status', 'done', `rank ${rank.value}: relative error ${r.errors[r.errors.length - 1].toFixed(4)} ` +
      `in ${r.millis.toFixed(1)} ms; singular values: ${verdict(r.worst_ratio)}.`, r.worst_ratio <= 1);
  }));
}

function setupDecode() {
  let gguf = null;
  const slider = $('decode-sparsity');
  slider.addEventListener('input', () => { $('decode-sparsity-value').textContent = Number(slider.value).toFixed(2); });
  $('gguf-file').addEventListener('change', async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    gguf = new Uint8Array(await file.arrayBuffer());
    $('gguf-picked').textContent = `${file.name} (${(file.size / 2 ** 20).toFixed(1)} MiB)`;
    show('decode-status', 'idle', '');
  });
  $('tiny-llm').addEventListener('click', () => {
    gguf = Engine.synthetic_llm(1);
    $('gguf-picked').textContent = 'tiny synthetic model (2 layers, width 64, byte tokens)';
    show('decode-status', 'idle', '');
  });
  $('decode-cancel').addEventListener('click', () => engine.cancel());
  $('decode-run').addEventListener('click', () => run('decode-status', ['decode-run', 'tiny-llm'], async () => {
    if (!gguf) throw new Error('Pick a GGUF model first, or use the tiny synthetic one.');
    const text = $('decode-text');
    text.textContent = '';
    $('decode-cancel').disabled = false;
    try {
      const r = await engine.decode(gguf, $('prompt').value, Number($('max-tokens').value),
        Number(slider.value), (piece) => { text.textContent += piece; });
      show('decode-status', 'done', `${r.generated} tokens after a ${r.prompt_tokens}-token prompt, ` +
        `${r.tokens_per_s.toFixed(1)} tokens/s with CATS at ${Number(slider.value).toFixed(2)}; ` +
        `dense logits: ${verdict(r.worst_ratio)}.`, r.worst_ratio <= 1);
    } finally {
      $('decode-cancel').disabled = true;
    }
  }));
}

async function main() {
  try {
    await init();
    engine = await Engine.create(!!navigator.gpu);
  } catch (e) {
    $('backend').textContent = 'nothing: the module failed to start';
    $('fallback').textContent = String(e && e.message ? e.message : e);
    document.body.dataset.ready = 'failed';
    return;
  }
  $('backend').textContent = engine.describe();
  document.body.dataset.gpu = String(engine.on_gpu());
  if (!engine.on_gpu()) {
    $('fallback').textContent = navigator.gpu
      ? `No WebGPU adapter could be used (${engine.fallback_reason()}): the demos run on the CPU kernels (simd128).`
      : 'This browser has no WebGPU (navigator.gpu is missing): the demos run on the CPU kernels (simd128).';
  }
  setupMerge();
  setupCompress();
  setupGemv();
  setupLowRank();
  setupDecode();
  document.body.dataset.ready = 'yes';
}

main();
