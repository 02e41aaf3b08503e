/**
 * What the Model panel and the status bar show, as plain data.
 *
 * No JupyterLab imports here, so the logic is unit-tested with node's own
 * test runner; index.ts turns these views into DOM. Every string goes through
 * `t` (JupyterLab's translator in the lab, the identity in tests).
 */

export interface SecretStatus {
  name: string;
  set: boolean;
}

export interface GpuMemory {
  allocated: number;
  reserved: number;
  total: number;
}

/** The status the kernel sends (kernel_magics/notebook/frontend.py, model_status). */
export interface ModelStatus {
  version: string;
  class_name: string | null;
  model_name: string | null;
  state: string;
  healthy?: boolean | null;
  device: string | null;
  gpu_memory: GpuMemory | null;
  load_seconds: number | null;
  last_predict_ms: number | null;
  first_chunk_ms: number | null;
  secrets: SecretStatus[];
  last_export: string | null;
  last_export_relative?: string | null; // below the kernel's working directory: openable in Lab
  last_export_replayed?: number | null;
  exports?: number; // exports finished in this kernel
  loads?: number; // loads ended (loaded or failed) since the kernel's status channel began
  channel?: string; // that channel's id: counts compare within one channel
  serve_url?: string | null;
  history?: [number, number | null][]; // recent predictions: total ms, first chunk ms
  error: string | null;
}

/** How the panel's notebook is connected to kernel-magics. */
export type Connection = 'no-notebook' | 'no-kernel' | 'not-loaded' | 'restarting' | 'connected';

/** A translation function: `t('Load time')`, `t('%1 chunks', n)`. */
export type Translate = (text: string, ...args: unknown[]) => string;

export const identity: Translate = (text, ...args) =>
  args.reduce<string>((out, arg, i) => out.replace(`%${i + 1}`, String(arg)), text);

export interface Row {
  key: string; // stable, untranslated: tests and CSS use it
  label: string;
  value: string;
  className?: string;
  copy?: boolean; // offer a copy action (paths, URLs, commands)
  wide?: boolean; // the value on its own full-width row (errors, commands)
}

export interface Section {
  key: string;
  title: string;
  rows: Row[];
}

export interface PanelView {
  state: string;
  sections: Section[];
  rows: Row[]; // every section's rows, in order
  empty: string | null; // what to do first, when there is nothing to show yet
  hint: string | null;
  history: [number, number | null][];
  serveUrl: string | null;
  exportPath: string | null; // the last export, relative to the notebook's kernel when it is below it
  canLoad: boolean;
  canUnload: boolean;
  canExport: boolean;
  canServe: boolean;
  canStopServe: boolean;
  canInsertTemplate: boolean;
}

export function formatBytes(n: number): string {
  const mib = n / 2 ** 20;
  return mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${mib.toFixed(0)} MiB`;
}

/** States in which the model's timings describe the model as it is now. */
const LIVE = new Set(['ready', 'unhealthy']);

/** The panel's content for a connection and the last status received. */
export function describe(connection: Connection, status: ModelStatus | null, t: Translate = identity): PanelView {
  const nothing = {
    state: 'not loaded',
    sections: [],
    rows: [],
    hint: null,
    history: [],
    serveUrl: null,
    exportPath: null,
    canLoad: false,
    canUnload: false,
    canExport: false,
    canServe: false,
    canStopServe: false,
    canInsertTemplate: connection !== 'no-notebook'
  };
  if (connection === 'no-notebook') {
    return { ...nothing, empty: t('Open a notebook to see its model here.') };
  }
  if (connection === 'no-kernel') {
    return {
      ...nothing,
      canInsertTemplate: true,
      empty: t('This notebook has no kernel, so no model is running. Start a kernel (Kernel menu), then run the notebook.')
    };
  }
  if (connection === 'restarting') {
    return { ...nothing, empty: t('The kernel restarted, so its model is gone. Run %load_ext kernel_magics again.') };
  }
  if (connection !== 'connected' || status === null) {
    return {
      ...nothing,
      empty: t('This notebook has not loaded kernel-magics yet. Run %load_ext kernel_magics in a cell, then define the model, or insert the template (+).')
    };
  }
  const state = status.state;
  const live = LIVE.has(state);
  const sections: Section[] = [];
  const section = (key: string, title: string): Row[] => {
    const rows: Row[] = [];
    sections.push({ key, title, rows });
    return rows;
  };
  const add = (rows: Row[], key: string, label: string, value: string | null | undefined, extra: Partial<Row> = {}) => {
    if (value !== null && value !== undefined && value !== '') {
      rows.push({ key, label, value, ...extra });
    }
  };
  const model = section('model', t('Status'));
  add(model, 'name', t('Name'), status.model_name);
  add(model, 'class', t('Class'), status.class_name);
  add(model, 'state', t('State'), t(state), { className: `km-state km-state-${state.replace(/ /g, '-')}` });
  add(model, 'device', t('Device'), status.device);
  if (status.gpu_memory) {
    const m = status.gpu_memory;
    add(model, 'gpu', t('GPU memory'), t('%1 allocated, %2 reserved of %3', formatBytes(m.allocated), formatBytes(m.reserved), formatBytes(m.total)));
  }
  if (state === 'failed' || state === 'unhealthy') {
    // In full, on its own row: the error is what the user reads next.
    add(model, 'error', t('Error'), status.error, { className: 'km-error', wide: true });
  }
  // A failed or re-defined model's numbers belong to a model that is no longer there.
  const timings = section('timings', t('Timings'));
  if (live) {
    if (status.load_seconds !== null) {
      add(timings, 'load', t('Load time'), `${status.load_seconds.toFixed(2)} s`);
    }
    if (status.last_predict_ms !== null) {
      add(timings, 'predict', t('Last predict'), `${status.last_predict_ms.toFixed(1)} ms`);
    }
    if (status.first_chunk_ms !== null) {
      add(timings, 'first-chunk', t('First chunk'), `${status.first_chunk_ms.toFixed(1)} ms`);
    }
  }
  const secrets = section('secrets', t('Secrets'));
  for (const secret of status.secrets) {
    // Only the name and whether it has a value: the value never reaches the browser.
    add(secrets, `secret-${secret.name}`, secret.name, secret.set ? t('set') : t('not set'), {
      className: secret.set ? 'km-secret-set' : 'km-secret-unset'
    });
  }
  const serving = section('serving', t('Serving'));
  add(serving, 'serve', t('URL'), status.serve_url, { copy: true });
  const exported = section('export', t('Last export'));
  add(exported, 'export', t('Path'), status.last_export, { copy: true });
  if (status.last_export) {
    if (status.last_export_replayed !== null && status.last_export_replayed !== undefined) {
      add(exported, 'replayed', t('Checked'), replayedText(status.last_export_replayed, t));
    }
    add(exported, 'push', t('Deploy'), `truss push ${shellQuote(status.last_export)}`, { copy: true, wide: true, className: 'km-command' });
  }
  let empty: string | null = null;
  let hint: string | null = null;
  if (state === 'not defined') {
    empty = t('No model yet. Define it in a %1 cell, or insert the template (+).', '%%model');
  } else if (state === 'defined') {
    hint = t('Defined: load it with the run button (or %model_load).');
  } else if (state === 'unhealthy') {
    hint = t('is_healthy() says no: a deployment would answer 503 until it recovers.');
  }
  const defined = state !== 'not defined';
  const shown = sections.filter(s => s.rows.length > 0);
  return {
    state,
    sections: shown,
    rows: shown.flatMap(s => s.rows),
    empty,
    hint,
    history: live ? status.history ?? [] : [],
    serveUrl: status.serve_url ?? null,
    exportPath: status.last_export ? status.last_export_relative ?? null : null,
    canLoad: defined && state !== 'loading',
    canUnload: state === 'ready' || state === 'failed' || state === 'unhealthy',
    canExport: defined && state !== 'loading',
    canServe: defined && !status.serve_url,
    canStopServe: !!status.serve_url,
    canInsertTemplate: true
  };
}

export function replayedText(replayed: number, t: Translate = identity): string {
  return replayed === 1 ? t('1 prediction replayed') : t('%1 predictions replayed', replayed);
}

/** A path as one shell word. */
export function shellQuote(path: string): string {
  return /^[\w@%+=:,./-]+$/.test(path) ? path : `'${path.replace(/'/g, `'"'"'`)}'`;
}

/** The status bar's one line: state and device at a glance. */
export function statusBarText(connection: Connection, status: ModelStatus | null, t: Translate = identity): string {
  if (connection === 'no-notebook') {
    return '';
  }
  if (connection === 'no-kernel') {
    return t('Model: no kernel');
  }
  if (connection !== 'connected' || status === null) {
    return t('Model: not loaded');
  }
  const device = status.device ? ` · ${status.device.split(' · ')[0]}` : '';
  return t('Model: %1', t(status.state)) + (status.state === 'ready' ? device : '');
}

/** What a status change is worth a notification for: a load that ended. */
export interface Notice {
  kind: 'success' | 'error';
  message: string;
}

export function loadNotice(before: ModelStatus | null, after: ModelStatus, t: Translate = identity): Notice | null {
  // A load ended: the channel's count of ended loads grew (a load quicker than one status update is never seen
  // "loading"); a kernel that does not count them, or a status from another channel, shows it by the state it left.
  const counted = before?.loads !== undefined && after.loads !== undefined && before.channel === after.channel;
  const ended = counted ? after.loads! > before!.loads! : before?.state === 'loading';
  if (!before || !ended || after.state === 'loading') {
    return null;
  }
  const name = after.model_name ?? after.class_name ?? t('The model');
  if (after.state === 'ready' || after.state === 'unhealthy') {
    const seconds = after.load_seconds === null ? '' : t(' in %1 s', after.load_seconds.toFixed(2));
    const device = after.device ? t(' on %1', after.device.split(' · ')[0]) : '';
    return { kind: 'success', message: t('Loaded %1%2%3', name, seconds, device) };
  }
  if (after.state === 'failed') {
    const first = (after.error ?? '').split('\n').find(line => line.trim()) ?? '';
    return { kind: 'error', message: first ? t('%1 failed to load: %2', name, first) : t('%1 failed to load', name) };
  }
  return null;
}

/** The message of a finished export's notification. */
export function exportMessage(status: ModelStatus, t: Translate = identity): string {
  const where = status.last_export_relative ?? status.last_export ?? '';
  const replayed = status.last_export_replayed;
  return replayed === null || replayed === undefined
    ? t('Exported to %1', where)
    : t('Exported to %1 · %2', where, replayedText(replayed, t));
}

/** SVG polyline points for a small plot of recent predictions (total and first chunk), both on one scale. */
export function plotPoints(
  history: [number, number | null][],
  width: number,
  height: number
): { total: string; firstChunk: string; max: number } {
  const values = history.flatMap(([total, first]) => (first === null ? [total] : [total, first]));
  const max = Math.max(...values, 0) || 1;
  const x = (i: number) => (history.length === 1 ? width / 2 : (i * width) / (history.length - 1));
  const y = (v: number) => height - (v / max) * (height - 2) - 1;
  const fmt = (n: number) => n.toFixed(1);
  const total = history.map(([v], i) => `${fmt(x(i))},${fmt(y(v))}`).join(' ');
  const firstChunk = history
    .map(([, v], i) => (v === null ? null : `${fmt(x(i))},${fmt(y(v))}`))
    .filter(p => p !== null)
    .join(' ');
  return { total, firstChunk, max };
}

/** Whether a cell's source is one of the model's own cells (its context menu offers the model's commands). */
export function isModelCell(source: string): boolean {
  const language = cellLanguage(source);
  const first = source.split('\n', 1)[0].trim();
  return language !== null && !first.startsWith('%%predict');
}

/** Whether an executed cell's code runs an export (its progress notification starts). */
export function runsExport(code: string): boolean {
  return /^\s*%model_export\b/m.test(code);
}

/** The settings the extension reads (schema/plugin.json). */
export interface Settings {
  views: 'auto' | 'always' | 'never';
  streamUpdateRate: number;
  exportFolder: string;
  showStatusItem: boolean;
  confirmReplace: boolean;
}

export const DEFAULT_SETTINGS: Settings = {
  views: 'auto',
  streamUpdateRate: 30,
  exportFolder: '',
  showStatusItem: true,
  confirmReplace: true
};

/** The export dialog's suggestion: the last export, else `<folder>/<model>-truss`. */
export function exportSuggestion(status: ModelStatus | null, settings: Settings): string {
  if (status?.last_export) {
    return status.last_export_relative ?? status.last_export;
  }
  const name = `${status?.model_name ?? 'model'}-truss`;
  const folder = settings.exportFolder.replace(/\/+$/, '');
  return folder ? `${folder}/${name}` : name;
}

/** A new model notebook's cells (the launcher card). */
export function modelNotebookCells(): string[] {
  return ['%load_ext kernel_magics', CONFIG_TEMPLATE.trimEnd(), MODEL_TEMPLATE.trimEnd(), '%model_load', '%model_predict {"x": 1}'];
}

/** The first line of a cell says which language its editor should highlight. */
export function cellLanguage(source: string): 'yaml' | 'python' | null {
  const first = source.split('\n', 1)[0].trim();
  const magic = first.startsWith('%%') ? first.slice(2).split(/\s+/, 1)[0] : '';
  if (magic === 'model_config') {
    return 'yaml';
  }
  if (magic === 'model' || magic === 'predict') {
    return 'python';
  }
  return null;
}

/** Python code that tells, as a user expression, whether this kernel has kernel_magics loaded. */
export const LOADED_EXPRESSION =
  "'kernel_magics' in getattr(getattr(get_ipython(), 'extension_manager', None), 'loaded', ())";

/** Python code that tells whether a directory (relative to the kernel) exists and holds files. */
export function nonEmptyExpression(dir: string): string {
  const path = JSON.stringify(dir);
  return `(lambda p: __import__('os').path.isdir(p) and bool(__import__('os').listdir(p)))(__import__('os').path.expanduser(${path}))`;
}

export const CONFIG_TEMPLATE = `%%model_config
model_name: my-model
requirements: []          # pinned from the kernel at export time
resources: {cpu: "1", memory: 2Gi}   # add accelerator: T4 for a GPU
secrets: {}               # names only, e.g. {hf_access_token: null}
`;

export const MODEL_TEMPLATE = `%%model
class Model:
    def __init__(self, **kwargs):
        # Truss passes what the signature accepts: config, data_dir, secrets, environment.
        self._config = kwargs["config"]
        self._data_dir = kwargs["data_dir"]

    def load(self):
        # Runs once: read weights, move them to the GPU.
        ...

    def predict(self, model_input):
        # Return JSON-serializable data, or yield chunks to stream them.
        return {"echo": model_input}
`;
