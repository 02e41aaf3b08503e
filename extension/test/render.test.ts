import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { cellLanguage, describe, identity, ModelStatus, nonEmptyExpression, statusBarText } from '../src/render';

const ready: ModelStatus = {
  version: '0.1.0',
  class_name: 'Model',
  model_name: 'tiny-chargen',
  state: 'ready',
  healthy: null,
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

const byKey = (status: ModelStatus) =>
  Object.fromEntries(describe('connected', status).rows.map(r => [r.key, r]));

test('a ready model shows its numbers, device and memory', () => {
  const view = describe('connected', ready);
  const rows = byKey(ready);
  assert.equal(view.title, 'tiny-chargen');
  assert.equal(rows['state'].value, 'ready');
  assert.equal(rows['device'].value, 'cuda:0 · NVIDIA H100 80GB HBM3');
  assert.equal(rows['gpu'].value, '512 MiB allocated, 1.0 GiB reserved of 80.0 GiB');
  assert.equal(rows['load'].value, '1.23 s');
  assert.equal(rows['predict'].value, '12.5 ms');
  assert.equal(rows['first-chunk'].value, '3.3 ms');
  assert.equal(rows['export'].value, '/tmp/out');
  assert.ok(rows['export'].copy, 'a path offers a copy action');
  assert.ok(view.canUnload && view.canLoad && view.canExport);
  assert.equal(view.hint, null);
  assert.equal(view.empty, null);
});

test('rows that do not apply are hidden', () => {
  const cpu = byKey({ ...ready, device: 'cpu', gpu_memory: null, first_chunk_ms: null, last_export: null,
    load_seconds: null, last_predict_ms: null });
  for (const key of ['gpu', 'first-chunk', 'export', 'load', 'predict', 'error']) {
    assert.ok(!(key in cpu), `${key} is hidden`);
  }
  assert.equal(cpu['device'].value, 'cpu');
});

test('secrets are listed by name with set / not set only', () => {
  const rows = describe('connected', ready).rows.filter(r => r.key.startsWith('secret-'));
  assert.deepEqual(rows.map(r => [r.label, r.value]), [
    ['Secret hf_access_token', 'set'],
    ['Secret other', 'not set']
  ]);
});

test('before %load_ext there is an empty state that says what to do first, and nothing is enabled', () => {
  const view = describe('not-loaded', null);
  assert.match(view.empty ?? '', /%load_ext kernel_magics/);
  assert.ok(!view.canLoad && !view.canUnload && !view.canExport);
  assert.ok(view.canInsertTemplate);
  assert.equal(statusBarText('not-loaded', null), 'Model: not loaded');
  assert.ok(!describe('no-notebook', null).canInsertTemplate);
});

test('after a restart the panel does not pretend the model is still there', () => {
  const view = describe('restarting', ready);
  assert.equal(view.state, 'not loaded');
  assert.match(view.empty ?? '', /restarted/);
});

test('states drive the buttons and hints', () => {
  const undefinedModel = describe('connected', { ...ready, class_name: null, state: 'not defined' });
  assert.ok(!undefinedModel.canLoad && !undefinedModel.canExport && !undefinedModel.canUnload);
  assert.match(undefinedModel.empty ?? '', /%%model cell/);
  const defined = describe('connected', { ...ready, state: 'defined', device: null });
  assert.ok(defined.canLoad && !defined.canUnload, 'nothing to unload before a load');
  const loading = describe('connected', { ...ready, state: 'loading' });
  assert.ok(!loading.canLoad && !loading.canUnload && !loading.canExport);
  const failed = describe('connected', { ...ready, state: 'failed', error: 'RuntimeError: no weights' });
  assert.ok(failed.canLoad && failed.canUnload);
  assert.equal(byKey({ ...ready, state: 'failed', error: 'RuntimeError: no weights' })['error'].value,
    'RuntimeError: no weights');
  const unhealthy = describe('connected', { ...ready, state: 'unhealthy', healthy: false });
  assert.match(unhealthy.hint ?? '', /503/);
});

test('strings go through the translator', () => {
  const upper = (text: string, ...args: unknown[]) => identity(text, ...args).toUpperCase();
  const view = describe('connected', ready, upper);
  assert.ok(view.rows.some(r => r.label === 'LOAD TIME'));
  assert.equal(statusBarText('connected', ready, upper), 'MODEL: READY · cuda:0');
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

test('the export check quotes the directory as Python', () => {
  assert.match(nonEmptyExpression('my "dir"'), /expanduser\("my \\"dir\\""\)/);
});
