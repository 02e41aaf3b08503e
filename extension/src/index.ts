/**
 * kernel-magics for JupyterLab (and Notebook 7): a Model side panel, commands, menus, shortcuts,
 * notifications and a status bar item.
 *
 * The kernel side (kernel_magics/notebook/frontend.py) opens the status comm itself from the
 * `%load_ext kernel_magics` cell, so the panel follows the model during Run All and whatever cell
 * fails; the extension also opens one to a kernel that already has kernel_magics loaded (a reloaded
 * page), asked with a silent user expression so a kernel without it never sees an unknown target.
 * Commands run the magics in the notebook's kernel, so the panel and the notebook cannot disagree
 * about what they do.
 */

import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import {
  Clipboard,
  Dialog,
  ICommandPalette,
  InputDialog,
  Notification,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { PathExt } from '@jupyterlab/coreutils';
import { ILauncher } from '@jupyterlab/launcher';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { ITranslator, nullTranslator } from '@jupyterlab/translation';
import {
  addIcon,
  CommandToolbarButton,
  copyIcon,
  downloadIcon,
  launchIcon,
  LabIcon,
  runIcon,
  SidePanel,
  stopIcon
} from '@jupyterlab/ui-components';
import { ISignal, Signal } from '@lumino/signaling';
import { Panel, Widget } from '@lumino/widgets';

import {
  cellLanguage,
  CONFIG_TEMPLATE,
  Connection,
  DEFAULT_SETTINGS,
  describe,
  exportMessage,
  exportSuggestion,
  isModelCell,
  LOADED_EXPRESSION,
  loadNotice,
  MODEL_TEMPLATE,
  modelNotebookCells,
  ModelStatus,
  nonEmptyExpression,
  plotPoints,
  runsExport,
  Settings,
  statusBarText,
  Translate
} from './render';

const TARGET = 'kernel_magics.status';
const PLUGIN_ID = 'kernel-magics:plugin';

namespace CommandIDs {
  export const load = 'kernel-magics:load';
  export const unload = 'kernel-magics:unload';
  export const exportModel = 'kernel-magics:export';
  export const serve = 'kernel-magics:serve';
  export const stopServe = 'kernel-magics:stop-serve';
  export const stopStream = 'kernel-magics:stop-stream';
  export const showModel = 'kernel-magics:show-model';
  export const openExport = 'kernel-magics:open-export';
  export const insertTemplate = 'kernel-magics:insert-template';
  export const newNotebook = 'kernel-magics:new-notebook';
  export const showPanel = 'kernel-magics:show-panel';
}

const modelIcon = new LabIcon({
  name: 'kernel-magics:model',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><path class="jp-icon3" fill="#616161" ' +
    'd="M12 2 3 7v10l9 5 9-5V7l-9-5zm0 2.3 6.7 3.7L12 11.7 5.3 8 12 4.3zM5 9.7l6 3.3v6.7l-6-3.3V9.7zm8 10v-6.7l6-3.3v6.7l-6 3.3z"/></svg>'
});

interface NotebookModelState {
  connection: Connection;
  status: ModelStatus | null;
}

/** Evaluate one Python expression silently in a kernel (no output, no history); its text/plain, or null. */
async function evaluate(kernel: Kernel.IKernelConnection, expression: string): Promise<string | null> {
  const future = kernel.requestExecute({
    code: '',
    silent: true,
    store_history: false,
    user_expressions: { value: expression },
    stop_on_error: false
  });
  const reply = (await future.done) as KernelMessage.IExecuteReplyMsg;
  const content = reply.content as KernelMessage.IExecuteReply & { user_expressions?: Record<string, any> };
  const value = content.user_expressions?.value;
  return value && value.status === 'ok' ? String(value.data?.['text/plain'] ?? '') : null;
}

/** The model status of every open notebook's kernel, fed by comms; views subscribe, never poll. */
class ModelStatusTracker {
  constructor(private notebooks: INotebookTracker) {
    notebooks.widgetAdded.connect((_, panel) => this.track(panel));
    notebooks.forEach(panel => this.track(panel));
    notebooks.currentChanged.connect(() => this._changed.emit());
  }

  /** The active notebook's state changed. */
  get changed(): ISignal<ModelStatusTracker, void> {
    return this._changed;
  }

  /** A notebook received a status: before and after (notifications compare them). */
  get received(): ISignal<ModelStatusTracker, [NotebookPanel, ModelStatus | null, ModelStatus]> {
    return this._received;
  }

  /** A cell running %model_export started (true) or its execution ended (false). */
  get exporting(): ISignal<ModelStatusTracker, [NotebookPanel, string, boolean]> {
    return this._exporting;
  }

  /** The state for the active notebook (or 'no-notebook'). */
  current(): NotebookModelState {
    const panel = this.notebooks.currentWidget;
    if (!panel) {
      return { connection: 'no-notebook', status: null };
    }
    return this.stateOf(panel);
  }

  stateOf(panel: NotebookPanel): NotebookModelState {
    return this.states.get(panel) ?? { connection: 'not-loaded', status: null };
  }

  /** Send the extension's settings to every kernel that has kernel_magics loaded (the kernel applies its part). */
  sendSettings(settings: Settings): void {
    this.settings = settings;
    for (const comms of this.comms.values()) {
      for (const comm of comms) {
        this.trySend(comm);
      }
    }
  }

  private trySend(comm: Kernel.IComm): void {
    if (!comm.isDisposed) {
      try {
        comm.send({ settings: { views: this.settings.views, streamUpdateRate: this.settings.streamUpdateRate } });
      } catch (reason) {
        console.debug('kernel-magics: could not send the settings', reason);
      }
    }
  }

  private track(panel: NotebookPanel): void {
    if (this.states.has(panel)) {
      return;
    }
    this.states.set(panel, { connection: 'not-loaded', status: null });
    const context = panel.sessionContext;
    const attach = () => this.attach(panel, context.session?.kernel ?? null);
    context.kernelChanged.connect(attach);
    context.sessionChanged.connect(attach); // a shut-down kernel ends its session: no kernelChanged then
    context.statusChanged.connect((_, status) => {
      if (status === 'restarting' || status === 'autorestarting') {
        // The model lived in the old kernel process: say so instead of showing it as it was.
        this.comms.set(panel, []);
        this.set(panel, { connection: 'restarting', status: null });
      } else if (status === 'dead') {
        this.comms.set(panel, []);
        this.set(panel, { connection: 'no-kernel', status: null });
      }
    });
    panel.disposed.connect(() => {
      this.states.delete(panel);
      this.comms.delete(panel);
      this.kernels.delete(panel);
    });
    void context.ready.then(attach);
  }

  private attach(panel: NotebookPanel, kernel: Kernel.IKernelConnection | null): void {
    if (kernel !== null && (kernel.isDisposed || kernel.status === 'dead')) {
      kernel = null; // (a late `ready`, or a restart of a dead kernel: its signals will never fire again)
    }
    if (kernel !== null && kernel === this.kernels.get(panel)) {
      return; // the same kernel (a session change that kept it)
    }
    this.kernels.set(panel, kernel);
    this.comms.set(panel, []);
    if (!kernel) {
      this.set(panel, { connection: 'no-kernel', status: null });
      return;
    }
    this.set(panel, { connection: 'not-loaded', status: null });
    // This kernel's own end, whatever the session does meanwhile: a session shut down while its kernel was still
    // starting may drop the kernel before the context relays 'dead' (seen once in a loaded run).
    const gone = () => {
      if (this.kernels.get(panel) === kernel) {
        this.comms.set(panel, []);
        this.set(panel, { connection: 'no-kernel', status: null });
      }
    };
    kernel.statusChanged.connect((_, status) => {
      if (status === 'dead') {
        gone();
      }
    });
    kernel.disposed.connect(gone);
    // The kernel opens the comm from the %load_ext cell, even while Run All is still queued behind it.
    kernel.registerCommTarget(TARGET, (comm, msg) => this.connect(panel, comm, msg));
    void this.probe(panel, kernel);
    let pending = false; // a cell that mentions kernel_magics ran: ask again when it ends (an older kernel side)
    const exports = new Set<string>(); // requests running %model_export
    kernel.iopubMessage.connect((_, msg) => {
      const type = msg.header.msg_type;
      const parent = (msg.parent_header as any)?.msg_id as string | undefined;
      if (type === 'execute_input') {
        const code = String((msg.content as any).code ?? '');
        if (code.includes('kernel_magics')) {
          pending = true;
        }
        if (parent && runsExport(code)) {
          exports.add(parent);
          this._exporting.emit([panel, parent, true]);
        }
      } else if (type === 'status' && (msg.content as any).execution_state === 'idle') {
        if (parent && exports.delete(parent)) {
          this._exporting.emit([panel, parent, false]);
        }
        if (pending) {
          pending = false;
          void this.probe(panel, kernel);
        }
      }
    });
  }

  /** Open the status comm if, and only if, the kernel has kernel_magics loaded. */
  private async probe(panel: NotebookPanel, kernel: Kernel.IKernelConnection): Promise<void> {
    if (this.stateOf(panel).connection === 'connected') {
      return;
    }
    try {
      if ((await evaluate(kernel, LOADED_EXPRESSION)) !== 'True' || this.stateOf(panel).connection === 'connected') {
        return;
      }
      const comm = kernel.createComm(TARGET);
      this.connect(panel, comm, null);
      comm.open({});
    } catch (reason) {
      console.debug('kernel-magics: could not ask the kernel', reason);
    }
  }

  private connect(panel: NotebookPanel, comm: Kernel.IComm, msg: KernelMessage.ICommOpenMsg | null): void {
    comm.onMsg = m => this.receive(panel, m);
    comm.onClose = () => {
      const comms = this.comms.get(panel) ?? [];
      this.comms.set(panel, comms.filter(c => c !== comm));
    };
    this.comms.set(panel, [...(this.comms.get(panel) ?? []), comm]);
    if (msg) {
      this.receive(panel, msg);
    }
    if (msg || !comm.isDisposed) {
      // Sent once the comm is open (for ours, right after comm.open): the kernel applies its part.
      void Promise.resolve().then(() => this.trySend(comm));
    }
  }

  private receive(panel: NotebookPanel, msg: KernelMessage.ICommOpenMsg | KernelMessage.ICommMsgMsg): void {
    const data = msg.content.data as { status?: ModelStatus };
    if (data && data.status) {
      const before = this.stateOf(panel).status;
      this.set(panel, { connection: 'connected', status: data.status });
      this._received.emit([panel, before, data.status]);
    }
  }

  private set(panel: NotebookPanel, state: NotebookModelState): void {
    this.states.set(panel, state);
    if (panel === this.notebooks.currentWidget) {
      this._changed.emit();
    }
  }

  private settings: Settings = DEFAULT_SETTINGS;
  private states = new Map<NotebookPanel, NotebookModelState>();
  private comms = new Map<NotebookPanel, Kernel.IComm[]>();
  private kernels = new Map<NotebookPanel, Kernel.IKernelConnection | null>();
  private _changed = new Signal<ModelStatusTracker, void>(this);
  private _received = new Signal<ModelStatusTracker, [NotebookPanel, ModelStatus | null, ModelStatus]>(this);
  private _exporting = new Signal<ModelStatusTracker, [NotebookPanel, string, boolean]>(this);
}

/** What the panel's buttons do (commands, so the palette, menus and shortcuts do the same). */
interface PanelActions {
  run(id: string, args?: Record<string, string>): void;
  open(path: string): void;
}

function button(label: string, title: string, onclick: () => void, className = ''): HTMLButtonElement {
  const b = document.createElement('button');
  b.className = `km-action jp-Button ${className}`.trim();
  b.textContent = label;
  b.title = title;
  b.onclick = onclick;
  return b;
}

function iconButton(icon: LabIcon, title: string, onclick: () => void, className: string): HTMLButtonElement {
  const b = document.createElement('button');
  b.className = `${className} jp-Button jp-mod-minimal`;
  b.title = title;
  b.setAttribute('aria-label', title);
  icon.element({ container: b, elementPosition: 'center', height: '14px', width: '14px' });
  b.onclick = onclick;
  return b;
}

/** The panel's body: sections as Lab's own panels have them, label over value where space is short. */
class ModelView extends Widget {
  constructor(private tracker: ModelStatusTracker, private t: Translate, private actions: PanelActions) {
    super();
    this.addClass('km-view');
    tracker.changed.connect(() => this.update());
    this.update();
  }

  protected onUpdateRequest(): void {
    const { connection, status } = this.tracker.current();
    const view = describe(connection, status, this.t);
    const t = this.t;
    const root = document.createElement('div');
    root.className = 'km-body';
    if (view.empty) {
      const empty = document.createElement('p');
      empty.className = 'km-empty';
      empty.textContent = view.empty;
      root.appendChild(empty);
    }
    for (const section of view.sections) {
      const box = document.createElement('section');
      box.className = `km-section km-section-${section.key}`;
      const heading = document.createElement('h3');
      heading.className = 'km-section-title';
      heading.textContent = section.title;
      box.appendChild(heading);
      const list = document.createElement('dl');
      list.className = 'km-rows';
      for (const row of section.rows) {
        const item = document.createElement('div');
        item.className = `km-row${row.wide ? ' km-wide' : ''}`;
        item.dataset.key = row.key;
        const label = document.createElement('dt');
        label.textContent = row.label;
        const value = document.createElement('dd');
        value.dataset.key = row.key;
        const text = document.createElement('span');
        text.className = `km-value ${row.className ?? ''}`.trim();
        text.textContent = row.value; // values wrap: nothing is cut, so no text is out of reach
        value.appendChild(text);
        if (row.copy) {
          value.appendChild(iconButton(copyIcon, t('Copy'), () => Clipboard.copyToSystem(row.value), 'km-copy'));
        }
        if (row.key === 'serve') {
          value.appendChild(iconButton(launchIcon, t('Open in a new browser tab'), () => window.open(row.value, '_blank'), 'km-open'));
        }
        item.append(label, value);
        list.appendChild(item);
      }
      box.appendChild(list);
      if (section.key === 'timings' && view.history.length > 1) {
        box.appendChild(this.plot(view.history));
      }
      if (section.key === 'export' && view.exportPath !== null) {
        const links = document.createElement('div');
        links.className = 'km-actions';
        for (const file of ['config.yaml', 'model/model.py']) {
          links.appendChild(button(file, t('Open %1 in JupyterLab', file), () => this.actions.open(`${view.exportPath}/${file}`), 'km-open-file'));
        }
        box.appendChild(links);
      }
      if (section.key === 'serving') {
        box.appendChild(this.serveActions(view.canStopServe));
      }
      root.appendChild(box);
    }
    if (connection === 'connected' && view.canServe && !view.sections.some(s => s.key === 'serving')) {
      const box = document.createElement('section');
      box.className = 'km-section km-section-serving';
      const heading = document.createElement('h3');
      heading.className = 'km-section-title';
      heading.textContent = t('Serving');
      box.append(heading, this.serveActions(false));
      root.appendChild(box);
    }
    if (view.hint) {
      const hint = document.createElement('p');
      hint.className = 'km-hint';
      hint.textContent = view.hint;
      root.appendChild(hint);
    }
    this.node.replaceChildren(root);
  }

  private serveActions(serving: boolean): HTMLElement {
    const actions = document.createElement('div');
    actions.className = 'km-actions';
    actions.appendChild(
      serving
        ? button(this.t('Stop serving'), this.t('%model_serve --stop'), () => this.actions.run(CommandIDs.stopServe), 'km-stop-serve')
        : button(this.t('Serve'), this.t("Serve the live model over Truss's HTTP API (%model_serve)"), () => this.actions.run(CommandIDs.serve), 'km-serve')
    );
    return actions;
  }

  /** A small plot of recent predictions: total time, and time to the first chunk when streamed. */
  private plot(history: [number, number | null][]): HTMLElement {
    const [w, h] = [200, 36];
    const { total, firstChunk, max } = plotPoints(history, w, h);
    const ns = 'http://www.w3.org/2000/svg';
    const figure = document.createElement('figure');
    figure.className = 'km-plot';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
    svg.setAttribute('preserveAspectRatio', 'none');
    svg.setAttribute('role', 'img');
    const caption = this.t('Last %1 predictions, up to %2 ms', history.length, max.toFixed(1));
    svg.setAttribute('aria-label', caption);
    for (const [points, cls] of [[total, 'km-plot-total'], [firstChunk, 'km-plot-first']]) {
      if (points) {
        const line = document.createElementNS(ns, 'polyline');
        line.setAttribute('points', points);
        line.setAttribute('class', cls);
        line.setAttribute('vector-effect', 'non-scaling-stroke');
        svg.appendChild(line);
      }
    }
    const legend = document.createElement('figcaption');
    legend.textContent = firstChunk ? `${caption} · ${this.t('total')} / ${this.t('first chunk')}` : caption;
    figure.append(svg, legend);
    return figure;
  }
}

/** The status bar item: state and device at a glance. */
class ModelStatusItem extends Widget {
  constructor(private tracker: ModelStatusTracker, private t: Translate) {
    super();
    this.addClass('jp-StatusBar-TextItem');
    this.id = 'kernel-magics-status';
    tracker.changed.connect(() => this.update());
    this.update();
  }

  protected onUpdateRequest(): void {
    const { connection, status } = this.tracker.current();
    this.node.textContent = statusBarText(connection, status, this.t);
  }
}

/** Run code in the notebook's kernel; resolve to the error text, or null when it worked. */
async function runInKernel(
  panel: NotebookPanel,
  code: string,
  onOutput?: (text: string) => void
): Promise<string | null> {
  const kernel = panel.sessionContext.session?.kernel;
  if (!kernel) {
    return 'This notebook has no running kernel.';
  }
  const future = kernel.requestExecute({ code, silent: false, store_history: false, stop_on_error: false });
  if (onOutput) {
    future.onIOPub = msg => {
      const content = msg.content as any;
      if (msg.header.msg_type === 'stream') {
        onOutput(String(content.text ?? ''));
      } else if (msg.header.msg_type === 'display_data' || msg.header.msg_type === 'execute_result') {
        onOutput(String(content.data?.['text/plain'] ?? ''));
      }
    };
  }
  const reply = await future.done;
  const content = reply.content;
  if (content.status === 'error') {
    return content.ename === 'UsageError' ? content.evalue : `${content.ename}: ${content.evalue}`;
  }
  return null;
}

/** Give %%model_config cells YAML highlighting and %%model / %%predict cells Python. */
function highlightMagicCells(panel: NotebookPanel): void {
  const notebook = panel.content;
  let scheduled = 0;
  const apply = () => {
    scheduled = 0;
    for (const cell of notebook.widgets) {
      if (cell.model.type !== 'code') {
        continue;
      }
      const language = cellLanguage(cell.model.sharedModel.getSource());
      const mime = language === 'yaml' ? 'text/x-yaml' : language === 'python' ? 'text/x-ipython' : notebook.codeMimetype;
      if (cell.model.mimeType !== mime) {
        cell.model.mimeType = mime;
      }
    }
  };
  const schedule = () => {
    if (!scheduled) {
      scheduled = window.setTimeout(apply, 50);
    }
  };
  notebook.modelContentChanged.connect(schedule);
  notebook.activeCellChanged.connect(schedule);
  panel.sessionContext.kernelChanged.connect(schedule);
  void panel.revealed.then(schedule);
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'The model of the active notebook (kernel-magics): panel, commands, menus, notifications, status bar.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, IStatusBar, ILabShell, ITranslator, ISettingRegistry, ILauncher],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null,
    _labShell: ILabShell | null,
    translator: ITranslator | null,
    settingRegistry: ISettingRegistry | null,
    launcher: ILauncher | null
  ) => {
    const trans = (translator ?? nullTranslator).load('kernel_magics');
    const t: Translate = (text, ...args) => trans.__(text, ...(args as any[]));
    const tracker = new ModelStatusTracker(notebooks);
    let settings: Settings = { ...DEFAULT_SETTINGS };
    const settingsChanged = new Signal<object, void>({});
    const view = (): ReturnType<typeof describe> => describe(tracker.current().connection, tracker.current().status, t);
    const current = (): NotebookPanel | null => notebooks.currentWidget;
    const fail = (title: string, message: string) => void showErrorMessage(title, message);
    /** A path the kernel gave (relative to the notebook's folder) as a path Lab opens. */
    const labPath = (nb: NotebookPanel, path: string) => PathExt.join(PathExt.dirname(nb.context.path), path);
    const openInLab = (path: string) => {
      const nb = current();
      if (nb) {
        void app.commands.execute('docmanager:open', { path: labPath(nb, path) });
      }
    };
    const magic = (id: string, label: string, caption: string, code: string, isEnabled: () => boolean, icon?: LabIcon) =>
      app.commands.addCommand(id, {
        label,
        caption,
        icon,
        isEnabled,
        execute: async () => {
          const nb = current();
          const error = nb && (await runInKernel(nb, code));
          if (error) {
            fail(t('%1 failed', label), error);
          }
        }
      });

    magic(CommandIDs.load, t('Load model'), t("Load the model (%model_load in the notebook's kernel)"), '%model_load --no-widget',
      () => view().canLoad, runIcon);
    magic(CommandIDs.unload, t('Unload model'), t('Free the model and its memory (%model_unload)'), '%model_unload',
      () => view().canUnload, stopIcon);
    magic(CommandIDs.serve, t('Serve model'), t("Serve the live model over Truss's HTTP API on a free port (%model_serve)"),
      '%model_serve --port 0', () => view().canServe, launchIcon);
    magic(CommandIDs.stopServe, t('Stop serving model'), t('Stop the model server (%model_serve --stop)'), '%model_serve --stop',
      () => view().canStopServe);
    app.commands.addCommand(CommandIDs.exportModel, {
      label: t('Export model…'),
      caption: t('Write the model as a deployable Truss directory (%model_export)'),
      icon: downloadIcon,
      isEnabled: () => view().canExport,
      execute: async args => {
        const nb = current();
        const kernel = nb?.sessionContext.session?.kernel;
        if (!nb || !kernel) {
          return;
        }
        const status = tracker.current().status;
        let dir = (args['dir'] as string | undefined) ?? null;
        if (dir === null) {
          const answer = await InputDialog.getText({
            title: t('Export model'),
            label: t("Directory (relative to the kernel's working directory):"),
            text: exportSuggestion(status, settings)
          });
          if (!answer.button.accept || !answer.value) {
            return;
          }
          dir = answer.value;
        }
        let force = '';
        if ((await evaluate(kernel, nonEmptyExpression(dir))) === 'True') {
          if (settings.confirmReplace) {
            const replace = await showDialog({
              title: t('The directory exists'),
              body: t(
                '%1 already holds files. Replace it with this export? Only a directory an earlier export made is replaced, and only once the new export has passed its checks.',
                dir
              ),
              buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: t('Replace') })]
            });
            if (!replace.button.accept) {
              return;
            }
          }
          force = ' --force';
        }
        const error = await runInKernel(nb, `%model_export ${JSON.stringify(dir)}${force}`);
        if (error) {
          fail(t('Export failed'), error);
        }
      }
    });
    app.commands.addCommand(CommandIDs.showModel, {
      label: t('Show model.py'),
      caption: t('The model.py an export would write (%model_show)'),
      isEnabled: () => tracker.current().status?.class_name != null,
      execute: async () => {
        const nb = current();
        if (!nb) {
          return;
        }
        let text = '';
        const error = await runInKernel(nb, '%model_show', out => (text += out));
        if (error) {
          fail(t('Show model.py failed'), error);
          return;
        }
        const body = new Widget({ node: document.createElement('pre') });
        body.addClass('km-model-py');
        body.node.textContent = text;
        await showDialog({ title: 'model.py', body, buttons: [Dialog.okButton({ label: t('Close') })] });
      }
    });
    app.commands.addCommand(CommandIDs.stopStream, {
      label: t('Stop the stream'),
      caption: t("Stop the active notebook's running stream (its Stop button)"),
      isEnabled: () => current() !== null,
      execute: () => {
        // The stream view's own button: its message takes the route that reaches a busy kernel.
        const stops = current()?.node.querySelectorAll<HTMLButtonElement>('.km-stream-stop');
        const running = Array.from(stops ?? []).filter(b => !b.disabled && b.style.display !== 'none');
        running[running.length - 1]?.click();
      }
    });
    app.commands.addCommand(CommandIDs.openExport, {
      label: args => t('Open %1 of the last export', (args['file'] as string) ?? 'config.yaml'),
      isEnabled: () => view().exportPath !== null,
      execute: args => {
        const path = view().exportPath;
        if (path !== null) {
          openInLab(`${path}/${(args['file'] as string) ?? 'config.yaml'}`);
        }
      }
    });
    app.commands.addCommand(CommandIDs.insertTemplate, {
      label: t('Insert model template'),
      caption: t('Add a %1 cell and a %2 cell with the Truss contract', '%%model_config', '%%model'),
      icon: addIcon,
      isEnabled: () => current() !== null,
      execute: () => {
        const nb = current();
        if (!nb) {
          return;
        }
        for (const source of [CONFIG_TEMPLATE, MODEL_TEMPLATE]) {
          NotebookActions.insertBelow(nb.content);
          nb.content.activeCell?.model.sharedModel.setSource(source);
        }
      }
    });
    app.commands.addCommand(CommandIDs.newNotebook, {
      label: args => (args['isLauncher'] ? t('Model notebook') : t('New model notebook')),
      caption: t('A notebook with %1, a %2 cell and a %3 cell, ready to load and export', '%load_ext', '%%model_config', '%%model'),
      icon: modelIcon,
      execute: async args => {
        const kernelName = app.serviceManager.kernelspecs.specs?.default ?? undefined;
        const nb = (await app.commands.execute('notebook:create-new', { cwd: (args['cwd'] as string) ?? '', kernelName })) as NotebookPanel;
        await nb.context.ready;
        await nb.revealed; // a new notebook gets its first empty cell by then: replace it, too
        const shared = nb.content.model!.sharedModel;
        const cells = modelNotebookCells().map(source => ({ cell_type: 'code' as const, source }));
        shared.transact(() => {
          shared.deleteCellRange(0, shared.cells.length);
          shared.insertCells(0, cells);
        });
        return nb;
      }
    });

    // A side panel like Lab's own: a title header, a small icon toolbar, sections.
    const panel = new SidePanel({ content: new Panel(), translator: translator ?? nullTranslator });
    panel.id = 'kernel-magics-panel';
    panel.addClass('km-panel');
    panel.title.icon = modelIcon;
    panel.title.caption = t('Model (kernel-magics)');
    const heading = new Widget({ node: document.createElement('h2') });
    heading.node.textContent = t('Model');
    heading.addClass('jp-text-truncated'); // as the Table of Contents and Running panels title themselves
    panel.header.addWidget(heading);
    for (const [name, id] of [
      ['load', CommandIDs.load],
      ['unload', CommandIDs.unload],
      ['export', CommandIDs.exportModel],
      ['template', CommandIDs.insertTemplate]
    ]) {
      panel.toolbar.addItem(name, new CommandToolbarButton({ commands: app.commands, id, label: '' }));
    }
    panel.addWidget(
      new ModelView(tracker, t, {
        run: id => void app.commands.execute(id),
        open: openInLab
      })
    );
    app.shell.add(panel, 'right', { rank: 650 });
    app.commands.addCommand(CommandIDs.showPanel, {
      label: t('Show model panel'),
      execute: () => app.shell.activateById(panel.id)
    });

    // Cell context menu (declared in schema/plugin.json): only on the model's own cells.
    const onModelCell = () => {
      const cell = current()?.content.activeCell;
      return !!cell && cell.model.type === 'code' && isModelCell(cell.model.sharedModel.getSource());
    };
    for (const [id, command] of [
      ['load', CommandIDs.load],
      ['show-model', CommandIDs.showModel],
      ['export', CommandIDs.exportModel],
      ['serve', CommandIDs.serve]
    ]) {
      app.commands.addCommand(`kernel-magics:cell-${id}`, {
        label: () => app.commands.label(command),
        isEnabled: () => app.commands.isEnabled(command),
        isVisible: onModelCell,
        execute: () => app.commands.execute(command)
      });
    }

    // Notifications: a load that ended, and an export from its start to its check's end.
    tracker.received.connect((_, [nb, before, after]) => {
      const notice = nb === current() ? loadNotice(before, after, t) : null;
      if (notice) {
        Notification.emit(notice.message, notice.kind, { autoClose: notice.kind === 'success' ? 5000 : false });
      }
    });
    // An export in progress, by the id of the request running it: the kernel counts finished exports.
    const running = new Map<string, { id: string; before: number; done: boolean }>();
    const settle = (nb: NotebookPanel, key: string, timedOut: boolean) => {
      const entry = running.get(key);
      const status = tracker.stateOf(nb).status;
      if (!entry) {
        return;
      }
      if (status && (status.exports ?? 0) > entry.before && status.last_export) {
        running.delete(key);
        const path = status.last_export;
        const relative = status.last_export_relative;
        Notification.update({
          id: entry.id,
          message: exportMessage(status, t),
          type: 'success',
          autoClose: 10000,
          actions: [
            ...(relative ? [{ label: t('Open'), caption: t('Open its config.yaml'), callback: () => openInLab(`${relative}/config.yaml`) }] : []),
            { label: t('Copy path'), caption: path, callback: () => Clipboard.copyToSystem(path) }
          ]
        });
      } else if (timedOut) {
        running.delete(key);
        Notification.update({ id: entry.id, message: t('The export did not finish: its cell says why.'), type: 'error', autoClose: 10000 });
      }
    };
    tracker.received.connect((_, [nb]) => {
      for (const key of [...running.keys()]) {
        settle(nb, key, false);
      }
    });
    tracker.exporting.connect((_, [nb, key, started]) => {
      if (started) {
        const status = tracker.stateOf(nb).status;
        const id = Notification.emit(
          t('Exporting %1: checking that it answers as the notebook did…', status?.model_name ?? t('the model')),
          'in-progress',
          { autoClose: false }
        );
        running.set(key, { id, before: status?.exports ?? 0, done: false });
      } else if (running.has(key)) {
        // The cell is over; its export's status is sent within 0.1 s of it, so wait a little for it.
        settle(nb, key, false);
        window.setTimeout(() => settle(nb, key, true), 1500);
      }
    });

    notebooks.widgetAdded.connect((_, nb) => highlightMagicCells(nb));
    notebooks.forEach(nb => highlightMagicCells(nb));
    if (palette) {
      const category = t('Model (kernel-magics)');
      for (const command of Object.values(CommandIDs)) {
        palette.addItem({ command, category });
      }
    }
    if (launcher) {
      launcher.add({ command: CommandIDs.newNotebook, category: t('Notebook'), rank: 10 });
    }
    if (statusBar) {
      const item = new ModelStatusItem(tracker, t);
      statusBar.registerStatusItem('kernel-magics:status', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => settings.showStatusItem && notebooks.currentWidget !== null,
        activeStateChanged: settingsChanged
      });
    }
    tracker.changed.connect(() => app.commands.notifyCommandChanged());
    notebooks.activeCellChanged.connect(() => app.commands.notifyCommandChanged());

    if (settingRegistry) {
      const apply = (loaded: ISettingRegistry.ISettings) => {
        settings = { ...DEFAULT_SETTINGS, ...(loaded.composite as Partial<Settings>) };
        settingsChanged.emit();
        tracker.sendSettings(settings);
      };
      void settingRegistry
        .load(PLUGIN_ID)
        .then(loaded => {
          apply(loaded);
          loaded.changed.connect(apply);
        })
        .catch(reason => console.warn('kernel-magics: settings not loaded', reason));
    }
  }
};

export default plugin;
