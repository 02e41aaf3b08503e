import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { cellLanguage, describe, ModelStatus, statusBarText } from '../src/render';

const ready: ModelStatus = {
  version: '0.1.0',
  class_name: 'Model',
  model_name: 'tiny-chargen',
  state: 'ready',
  device: 'cuda:0 · NVIDIA H100 80GB HBM3',
  gpu_memory: { allocated: 512 * 2 ** 20, reserved: 1024 * 2 ** 20, total: 80 * 2 ** 30 },
  load_seconds: 1.234,
  last_predict_ms: 12.5,
  first_chunk_ms: 3.25,
  secrets: [
    { name: 'hf_access_token', set: true },
    { name: 'other', set: false }
  ],
  last_export: '/tmp/out',
  error: null
};

test('a ready model shows its numbers, device and memory', () => {
  const view = describe('connected', ready);
  const rows = Object.fromEntries(view.rows.map(r => [r.label, r.value]));
  assert.equal(view.title, 'Model: tiny-chargen');
  assert.equal(rows['State'], 'ready');
  assert.equal(rows['Device'], 'cuda:0 · NVIDIA H100 80GB HBM3');
  assert.equal(rows['GPU memory'], '512 MiB allocated, 1.0 GiB reserved of 80.0 GiB');
  assert.equal(rows['Load time'], '1.23 s');
  assert.equal(rows['Last predict'], '12.5 ms');
  assert.equal(rows['First chunk'], '3.3 ms');
  assert.equal(rows['Last export'], '/tmp/out');
  assert.ok(view.canUnload && view.canLoad && view.canExport);
  assert.equal(view.hint, null);
});

test('secrets are listed by name with set / not set only', () => {
  const view = describe('connected', ready);
  const secrets = view.rows.filter(r => r.label.startsWith('Secret '));
  assert.deepEqual(secrets.map(r => [r.label, r.value]), [
    ['Secret hf_access_token', 'set'],
    ['Secret other', 'not set']
  ]);
});

test('a kernel without kernel_magics says how to load it', () => {
  const view = describe('not-loaded', null);
  assert.match(view.hint ?? '', /%load_ext kernel_magics/);
  assert.ok(!view.canLoad && !view.canExport);
  assert.equal(statusBarText('not-loaded', null), 'Model: not loaded');
});

test('after a restart the panel does not pretend the model is still there', () => {
  const view = describe('restarting', ready);
  assert.equal(view.state, 'not loaded');
  assert.match(view.hint ?? '', /restarted/);
});

test('states drive the buttons and hints', () => {
  const undefinedModel = describe('connected', { ...ready, class_name: null, state: 'not defined' });
  assert.ok(!undefinedModel.canLoad && !undefinedModel.canExport);
  assert.match(undefinedModel.hint ?? '', /Insert model template/);
  const loading = describe('connected', { ...ready, state: 'loading' });
  assert.ok(!loading.canLoad && !loading.canUnload);
  const failed = describe('connected', { ...ready, state: 'failed', error: 'RuntimeError: no weights' });
  assert.ok(failed.canLoad && failed.canUnload);
  assert.equal(failed.rows.find(r => r.label === 'Error')?.value, 'RuntimeError: no weights');
});

test('status bar: state, and the device when ready', () => {
  assert.equal(statusBarText('connected', ready), 'Model: ready · cuda:0');
  assert.equal(statusBarText('connected', { ...ready, state: 'loading' }), 'Model: loading');
  assert.equal(statusBarText('no-notebook', null), '');
});

test('cell magics choose the editor language', () => {
  assert.equal(cellLanguage('%%model_config\nmodel_name: x'), 'yaml');
  assert.equal(cellLanguage('%%model\nclass Model: ...'), 'python');
  assert.equal(cellLanguage('%%predict --no-widget\n{}'), 'python');
  assert.equal(cellLanguage('%%modelx\n'), null);
  assert.equal(cellLanguage('x = 1'), null);
});
