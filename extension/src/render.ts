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
  error: string | null;
}

/** How the panel's notebook is connected to kernel-magics. */
export type Connection = 'no-notebook' | 'not-loaded' | 'restarting' | 'connected';

/** A translation function: `t('Load time')`, `t('%1 chunks', n)`. */
export type Translate = (text: string, ...args: unknown[]) => string;

export const identity: Translate = (text, ...args) =>
  args.reduce<string>((out, arg, i) => out.replace(`%${i + 1}`, String(arg)), text);

export interface Row {
  key: string; // stable, untranslated: tests and CSS use it
  label: string;
  value: string;
  className?: string;
  copy?: boolean; // offer a copy action (paths)
}

export interface PanelView {
  title: string;
  state: string;
  rows: Row[];
  empty: string | null; // what to do first, when there is nothing to show yet
  hint: string | null;
  canLoad: boolean;
  canUnload: boolean;
  canExport: boolean;
  canInsertTemplate: boolean;
}

export function formatBytes(n: number): string {
  const mib = n / 2 ** 20;
  return mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${mib.toFixed(0)} MiB`;
}

/** The panel's content for a connection and the last status received. */
export function describe(connection: Connection, status: ModelStatus | null, t: Translate = identity): PanelView {
  const nothing = {
    title: t('Model'),
    state: 'not loaded',
    rows: [],
    hint: null,
    canLoad: false,
    canUnload: false,
    canExport: false,
    canInsertTemplate: connection !== 'no-notebook'
  };
  if (connection === 'no-notebook') {
    return { ...nothing, empty: t('Open a notebook to see its model here.') };
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
  const rows: Row[] = [];
  const add = (key: string, label: string, value: string | null | undefined, extra: Partial<Row> = {}) => {
    if (value !== null && value !== undefined && value !== '') {
      rows.push({ key, label, value, ...extra });
    }
  };
  add('class', t('Class'), status.class_name);
  add('name', t('Name'), status.model_name);
  add('state', t('State'), t(state), { className: `km-state km-state-${state.replace(/ /g, '-')}` });
  add('device', t('Device'), status.device);
  if (status.gpu_memory) {
    const m = status.gpu_memory;
    add('gpu', t('GPU memory'), t('%1 allocated, %2 reserved of %3', formatBytes(m.allocated), formatBytes(m.reserved), formatBytes(m.total)));
  }
  if (status.load_seconds !== null) {
    add('load', t('Load time'), `${status.load_seconds.toFixed(2)} s`);
  }
  if (status.last_predict_ms !== null) {
    add('predict', t('Last predict'), `${status.last_predict_ms.toFixed(1)} ms`);
  }
  if (status.first_chunk_ms !== null) {
    add('first-chunk', t('First chunk'), `${status.first_chunk_ms.toFixed(1)} ms`);
  }
  for (const secret of status.secrets) {
    // Only the name and whether it has a value: the value never reaches the browser.
    add(`secret-${secret.name}`, t('Secret %1', secret.name), secret.set ? t('set') : t('not set'), {
      className: secret.set ? 'km-secret-set' : 'km-secret-unset'
    });
  }
  add('export', t('Last export'), status.last_export, { copy: true });
  if (state === 'failed' || state === 'unhealthy') {
    add('error', t('Error'), status.error, { className: 'km-error' });
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
  return {
    title: status.model_name ?? status.class_name ?? t('Model'),
    state,
    rows,
    empty,
    hint,
    canLoad: defined && state !== 'loading',
    canUnload: state === 'ready' || state === 'failed' || state === 'unhealthy',
    canExport: defined && state !== 'loading',
    canInsertTemplate: true
  };
}

/** The status bar's one line: state and device at a glance. */
export function statusBarText(connection: Connection, status: ModelStatus | null, t: Translate = identity): string {
  if (connection === 'no-notebook') {
    return '';
  }
  if (connection !== 'connected' || status === null) {
    return t('Model: not loaded');
  }
  const device = status.device ? ` · ${status.device.split(' · ')[0]}` : '';
  return t('Model: %1', t(status.state)) + (status.state === 'ready' ? device : '');
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
