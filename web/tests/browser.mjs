// The demo page end to end in a real headless Chromium: it loads, finds the WebGPU adapter
// (SwiftShader), runs every demo on small inputs through the page's own buttons, and each result
// matches the reference within its bound (the page computes the check; this reads it); bad input
// is a sentence on the page (a file that is not a model, too few files, a knob out of range, a
// broken GGUF); without WebGPU the CPU fallback runs the same demos. Screenshots go to
// target/web-screenshots/.
//
// Run: bash web/build.sh && (cd web && npm ci && node tests/browser.mjs)
import { createServer } from 'node:http';
import { readFile, mkdir } from 'node:fs/promises';
import { extname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = fileURLToPath(new URL('../..', import.meta.url));
const site = join(root, 'target', 'web');
const shots = join(root, 'target', 'web-screenshots');
const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.wasm': 'application/wasm' };

const server = createServer(async (req, res) => {
  const asked = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname)).replace(/^(\.\.[/\\])+/, '');
  const path = asked === '/' ? 'index.html' : asked;
  try {
    const body = await readFile(join(site, path));
    res.writeHead(200, { 'content-type': types[extname(path)] || 'application/octet-stream' });
    res.end(body);
  } catch {
    res.writeHead(404);
    res.end();
  }
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const url = `http://127.0.0.1:${server.address().port}/`;

const failures = [];
function expect(ok, what) {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failures.push(what);
}

// Clicks `button` and waits for `output` to leave the running state; returns its state, check
// and text.
async function press(page, button, output, timeout = 180_000) {
  await page.click(`#${button}`);
  await page.waitForFunction((id) => {
    const o = document.getElementById(id);
    return o.dataset.state === 'done' || o.dataset.state === 'error';
  }, output, { timeout });
  return page.$eval(`#${output}`, (o) => ({ state: o.dataset.state, check: o.dataset.check, text: o.textContent }));
}

async function demos(page, label) {
  for (const method of ['task_arithmetic', 'ties', 'dare', 'fisher']) {
    await page.click('#synthetic');
    await page.selectOption('#method', method);
    const r = await press(page, 'merge-run', 'merge-status');
    expect(r.state === 'done' && r.check === 'pass', `${label}: merge (${method}): ${r.text}`);
  }
  expect(await page.$eval('#merge-download', (a) => !a.hidden && a.href.startsWith('blob:')), `${label}: the merged model can be downloaded`);
  const c = await press(page, 'compress-run', 'compress-status');
  expect(c.state === 'done' && c.check === 'pass', `${label}: ComPEFT: ${c.text}`);
  const g = await press(page, 'gemv-sweep', 'gemv-status');
  expect(g.state === 'done' && g.check === 'pass', `${label}: sparse GEMV sweep: ${g.text}`);
  const l = await press(page, 'lowrank-run', 'lowrank-status');
  expect(l.state === 'done' && l.check === 'pass', `${label}: low rank: ${l.text}`);
  await page.click('#tiny-llm');
  const d = await press(page, 'decode-run', 'decode-status');
  const streamed = await page.textContent('#decode-text');
  expect(d.state === 'done' && d.check === 'pass' && streamed.length > 0, `${label}: decode: ${d.text}`);
}

async function open(browser, label, { hideWebGpu = false } = {}) {
  const page = await browser.newPage({ viewport: { width: 1100, height: 1300 } });
  page.on('pageerror', (e) => expect(false, `${label}: uncaught error on the page: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') console.log(`${label} console ${m.type()}: ${m.text()}`); });
  if (hideWebGpu) {
    await page.addInitScript(() => { delete Navigator.prototype.gpu; });
  }
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.ready, null, { timeout: 60_000 });
  expect(await page.evaluate(() => document.body.dataset.ready) === 'yes', `${label}: the page started`);
  return page;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--enable-unsafe-webgpu', '--enable-unsafe-swiftshader',
    '--use-webgpu-adapter=swiftshader', '--enable-features=Vulkan'],
});
try {
  await mkdir(shots, { recursive: true });
  const gpu = await open(browser, 'WebGPU');
  const backend = await gpu.textContent('#backend');
  expect(await gpu.evaluate(() => document.body.dataset.gpu) === 'true', `WebGPU: the adapter was found (${backend})`);
  await demos(gpu, 'WebGPU');
  await gpu.screenshot({ path: join(shots, 'webgpu.png'), fullPage: true });

  // Bad input, in words: a file that is not a model, and too few models.
  await gpu.setInputFiles('#merge-files', [
    { name: 'base.safetensors', mimeType: 'application/octet-stream', buffer: Buffer.from('not a model at all') },
    { name: 'tuned.safetensors', mimeType: 'application/octet-stream', buffer: Buffer.from('nor this') },
  ]);
  await gpu.waitForFunction(() => document.getElementById('files-picked').textContent.includes('base.safetensors'));
  const bad = await press(gpu, 'merge-run', 'merge-status');
  expect(bad.state === 'error' && bad.text.includes('is not a safetensors file'), `WebGPU: a file that is not a model is named: ${bad.text}`);
  await gpu.setInputFiles('#merge-files', [
    { name: 'only.safetensors', mimeType: 'application/octet-stream', buffer: Buffer.from('x') },
  ]);
  const few = await gpu.$eval('#merge-status', (o) => ({ state: o.dataset.state, text: o.textContent }));
  expect(few.state === 'error' && few.text.includes('two or three'), `WebGPU: one file is not enough: ${few.text}`);
  // Fisher merging with the wrong Fisher files: too few, then not models.
  const garbage = (name) => ({ name, mimeType: 'application/octet-stream', buffer: Buffer.from('no Fisher here') });
  await gpu.click('#synthetic');
  await gpu.selectOption('#method', 'fisher');
  await gpu.setInputFiles('#fisher-files', [garbage('f1.safetensors')]);
  await gpu.waitForFunction(() => document.getElementById('fishers-picked').textContent.includes('f1'));
  const fewFishers = await press(gpu, 'merge-run', 'merge-status');
  expect(fewFishers.state === 'error' && fewFishers.text.includes('one Fisher file per fine-tuned model'), `WebGPU: too few Fisher files are named: ${fewFishers.text}`);
  await gpu.setInputFiles('#fisher-files', [garbage('f1.safetensors'), garbage('f2.safetensors')]);
  await gpu.waitForFunction(() => document.getElementById('fishers-picked').textContent.includes('f2'));
  const badFisher = await press(gpu, 'merge-run', 'merge-status');
  expect(badFisher.state === 'error' && badFisher.text.includes('Fisher file 1 is not a safetensors file'), `WebGPU: a Fisher file that is not one is named: ${badFisher.text}`);
  await gpu.fill('#seed', '-1');
  await gpu.click('#synthetic');
  await gpu.selectOption('#method', 'dare');
  await gpu.fill('#drop-p', '1.5');
  const knob = await press(gpu, 'merge-run', 'merge-status');
  expect(knob.state === 'error' && knob.text.length > 0, `WebGPU: a drop probability of 1.5 is refused: ${knob.text}`);
  await gpu.setInputFiles('#gguf-file', [
    { name: 'model.gguf', mimeType: 'application/octet-stream', buffer: Buffer.from('GGUF, but no more') },
  ]);
  await gpu.waitForFunction(() => document.getElementById('gguf-picked').textContent.includes('model.gguf'));
  const badModel = await press(gpu, 'decode-run', 'decode-status');
  expect(badModel.state === 'error' && badModel.text.length > 0, `WebGPU: a file that is not a GGUF model is named: ${badModel.text}`);
  // Cancel stops a long decode between two tokens.
  await gpu.click('#tiny-llm');
  await gpu.fill('#max-tokens', '200');
  await gpu.click('#decode-run');
  await gpu.waitForFunction(() => document.getElementById('decode-text').textContent.length >= 3);
  await gpu.click('#decode-cancel');
  await gpu.waitForFunction(() => ['done', 'error'].includes(document.getElementById('decode-status').dataset.state));
  const stopped = await gpu.textContent('#decode-status');
  const count = Number(stopped.split(' ')[0]);
  expect(count >= 3 && count < 200, `WebGPU: Cancel stops the decode: ${stopped}`);
  await gpu.screenshot({ path: join(shots, 'webgpu-error.png'), fullPage: true });

  const cpu = await open(browser, 'no WebGPU', { hideWebGpu: true });
  expect(await cpu.evaluate(() => document.body.dataset.gpu) === 'false', 'no WebGPU: the CPU fallback runs');
  expect((await cpu.textContent('#fallback')).includes('no WebGPU'), 'no WebGPU: the page says why it runs on the CPU');
  await demos(cpu, 'no WebGPU');
  await cpu.screenshot({ path: join(shots, 'cpu-fallback.png'), fullPage: true });
} finally {
  await browser.close();
  server.close();
}
if (failures.length) {
  console.error(`${failures.length} check(s) failed`);
  process.exit(1);
}
console.log(`every check passed; screenshots in ${shots}`);
