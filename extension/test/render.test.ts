import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import {
  cellLanguage,
  DEFAULT_SETTINGS,
  describe,
  exportMessage,
  exportSuggestion,
  identity,
  isModelCell,
  loadNotice,
  ModelStatus,
  nonEmptyExpression,
  plotPoints,
  runsExport,
  shellQuote,
  statusBarText
} from '../src/render';

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
  assert.equal(rows['name'].value, 'tiny-chargen');
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
    ['hf_access_token', 'set'],
    ['other', 'not set']
  ]);
  assert.deepEqual(describe('connected', ready).sections.find(s => s.key === 'secrets')?.title, 'Secrets');
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

test('the panel is in sections; errors and commands take a row of their own', () => {
  const failed = describe('connected', { ...ready, state: 'failed', error: 'RuntimeError: no weights\n  at line 3' });
  assert.deepEqual(failed.sections.map(s => s.key), ['model', 'secrets', 'export']);
  const error = failed.rows.find(r => r.key === 'error');
  assert.ok(error?.wide, 'the error is on its own row');
  assert.equal(error?.value, 'RuntimeError: no weights\n  at line 3', 'in full');
  const push = byKey(ready)['push'];
  assert.equal(push.value, 'truss push /tmp/out');
  assert.ok(push.wide && push.copy);
  assert.equal(shellQuote("/tmp/it's here"), `'/tmp/it'"'"'s here'`);
});

test('a failed load shows no load time and drops the previous timings and plot', () => {
  const withHistory: ModelStatus = { ...ready, history: [[10, null], [12, 3]] };
  assert.equal(describe('connected', withHistory).history.length, 2);
  for (const state of ['failed', 'defined', 'loading']) {
    const view = describe('connected', { ...withHistory, state, load_seconds: 0, error: 'boom' });
    for (const key of ['load', 'predict', 'first-chunk']) {
      assert.ok(!view.rows.some(r => r.key === key), `${state}: no ${key}`);
    }
    assert.deepEqual(view.history, [], `${state}: no plot`);
  }
});

test('with no kernel the panel says so', () => {
  const view = describe('no-kernel', null);
  assert.match(view.empty ?? '', /no kernel/);
  assert.doesNotMatch(view.empty ?? '', /%load_ext/);
  assert.equal(statusBarText('no-kernel', null), 'Model: no kernel');
});

test('serving: the URL with copy, and which of serve / stop applies', () => {
  const serving = describe('connected', { ...ready, serve_url: 'http://127.0.0.1:8080' });
  assert.equal(byKey({ ...ready, serve_url: 'http://127.0.0.1:8080' })['serve'].value, 'http://127.0.0.1:8080');
  assert.ok(serving.canStopServe && !serving.canServe);
  assert.ok(describe('connected', ready).canServe && !describe('connected', ready).canStopServe);
});

test('notifications: a load that ended, an export with its replayed predictions', () => {
  const loading = { ...ready, state: 'loading', load_seconds: null };
  assert.deepEqual(loadNotice(loading, ready), { kind: 'success', message: 'Loaded tiny-chargen in 1.23 s on cuda:0' });
  assert.deepEqual(loadNotice(loading, { ...ready, state: 'failed', error: '\nRuntimeError: no weights\nmore' }),
    { kind: 'error', message: 'tiny-chargen failed to load: RuntimeError: no weights' });
  assert.equal(loadNotice(ready, ready), null, 'only a load that just ended');
  assert.equal(loadNotice(null, ready), null);
  // The kernel counts ended loads: a load never seen "loading" is still announced, a status resent is not.
  assert.deepEqual(loadNotice({ ...ready, state: 'defined', loads: 0 }, { ...ready, loads: 1 }),
    { kind: 'success', message: 'Loaded tiny-chargen in 1.23 s on cuda:0' });
  assert.equal(loadNotice({ ...ready, loads: 1 }, { ...ready, loads: 1 }), null);
  assert.equal(loadNotice(null, { ...ready, loads: 1 }), null, 'the first status after opening announces nothing');
  // Counts compare within one channel (after %reload_ext a new one counts from 0, and the old one may still send).
  assert.equal(loadNotice({ ...ready, channel: 'a', loads: 3 }, { ...ready, channel: 'b', loads: 4 }), null);
  assert.deepEqual(loadNotice({ ...ready, channel: 'a', loads: 0 }, { ...ready, channel: 'a', loads: 1 }),
    { kind: 'success', message: 'Loaded tiny-chargen in 1.23 s on cuda:0' });
  assert.equal(exportMessage({ ...ready, last_export_relative: 'slow-echo-truss', last_export_replayed: 4 }),
    'Exported to slow-echo-truss · 4 predictions replayed');
  assert.equal(exportMessage({ ...ready, last_export_replayed: 1 }), 'Exported to /tmp/out · 1 prediction replayed');
});

test('the latency plot scales total and first chunk together', () => {
  const { total, firstChunk, max } = plotPoints([[10, null], [20, 5]], 100, 22);
  assert.equal(max, 20);
  assert.equal(total, '0.0,11.0 100.0,1.0');
  assert.equal(firstChunk, '100.0,16.0');
});

test('which cells get the model commands, and which runs export', () => {
  assert.ok(isModelCell('%%model\nclass Model: ...') && isModelCell('%%model_config\nx: 1'));
  assert.ok(!isModelCell('%%predict\n{}') && !isModelCell('x = 1'));
  assert.ok(runsExport('%model_export ./out') && runsExport('x = 1\n  %model_export out --force'));
  assert.ok(!runsExport('print("%model_export")') && !runsExport('%model_exports'));
});

test('the export dialog suggests the last export, else the default folder', () => {
  assert.equal(exportSuggestion({ ...ready, last_export_relative: 'out' }, DEFAULT_SETTINGS), 'out');
  const fresh = { ...ready, last_export: null };
  assert.equal(exportSuggestion(fresh, DEFAULT_SETTINGS), 'tiny-chargen-truss');
  assert.equal(exportSuggestion(fresh, { ...DEFAULT_SETTINGS, exportFolder: 'exports/' }), 'exports/tiny-chargen-truss');
});
