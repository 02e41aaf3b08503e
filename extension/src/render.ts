/**
 * What the Model panel and the status bar show, as plain data.
 *
 * No JupyterLab imports here, so the logic is unit-tested with node's own
 * test runner; index.ts turns these views into DOM.
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

/** The status the kernel sends (kernel_magics/frontend.py, model_status). */
export interface ModelStatus {
  version: string;
  class_name: string | null;
  model_name: string | null;
  state: string;
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

export interface Row {
  label: string;
  value: string;
  className?: string;
}

export interface PanelView {
  title: string;
  state: string;
  rows: Row[];
  hint: string | null;
  canLoad: boolean;
  canUnload: boolean;
  canExport: boolean;
}

export function formatBytes(n: number): string {
  const mib = n / 2 ** 20;
  return mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${mib.toFixed(0)} MiB`;
}

function seconds(s: number | null): string {
  return s === null ? '-' : `${s.toFixed(2)} s`;
}

function millis(ms: number | null): string {
  return ms === null ? '-' : `${ms.toFixed(1)} ms`;
}

const HINTS: Record<Exclude<Connection, 'connected'>, string> = {
  'no-notebook': 'Open a notebook to see its model.',
  'not-loaded': 'This kernel has not loaded kernel-magics: run %load_ext kernel_magics in a cell.',
  restarting: 'The kernel restarted, so its model is gone: run %load_ext kernel_magics again.'
};

/** The panel's content for a connection and the last status received. */
export function describe(connection: Connection, status: ModelStatus | null): PanelView {
  if (connection !== 'connected' || status === null) {
    const hint = connection === 'connected' ? HINTS['not-loaded'] : HINTS[connection];
    return { title: 'Model', state: 'not loaded', rows: [], hint, canLoad: false, canUnload: false, canExport: false };
  }
  const state = status.state;
  const rows: Row[] = [
    { label: 'Class', value: status.class_name ?? '-' },
    { label: 'Name', value: status.model_name ?? '-' },
    { label: 'State', value: state, className: `km-state km-state-${state.replace(' ', '-')}` },
    { label: 'Device', value: status.device ?? '-' }
  ];
  if (status.gpu_memory) {
    const m = status.gpu_memory;
    rows.push({
      label: 'GPU memory',
      value: `${formatBytes(m.allocated)} allocated, ${formatBytes(m.reserved)} reserved of ${formatBytes(m.total)}`
    });
  }
  rows.push(
    { label: 'Load time', value: seconds(status.load_seconds) },
    { label: 'Last predict', value: millis(status.last_predict_ms) },
    { label: 'First chunk', value: millis(status.first_chunk_ms) }
  );
  for (const secret of status.secrets) {
    // Only the name and whether it has a value: the value never reaches the browser.
    rows.push({
      label: `Secret ${secret.name}`,
      value: secret.set ? 'set' : 'not set',
      className: secret.set ? 'km-secret-set' : 'km-secret-unset'
    });
  }
  rows.push({ label: 'Last export', value: status.last_export ?? '-' });
  if (status.error) {
    rows.push({ label: 'Error', value: status.error, className: 'km-state-failed' });
  }
  let hint: string | null = null;
  if (state === 'not defined') {
    hint = 'Define the model in a %%model cell, or use "Insert model template".';
  } else if (state === 'defined') {
    hint = 'Load it with the Load button (or %model_load).';
  }
  const defined = state !== 'not defined';
  return {
    title: status.class_name ? `Model: ${status.model_name ?? status.class_name}` : 'Model',
    state,
    rows,
    hint,
    canLoad: defined && state !== 'loading',
    canUnload: state === 'ready' || state === 'failed',
    canExport: defined
  };
}

/** The status bar's one line: state and device at a glance. */
export function statusBarText(connection: Connection, status: ModelStatus | null): string {
  if (connection === 'no-notebook') {
    return '';
  }
  if (connection !== 'connected' || status === null) {
    return 'Model: not loaded';
  }
  const device = status.device ? ` · ${status.device.split(' · ')[0]}` : '';
  return `Model: ${status.state}${status.state === 'ready' ? device : ''}`;
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
