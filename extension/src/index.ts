/**
 * kernel-magics for JupyterLab (and Notebook 7): a Model side panel, commands and a status bar item.
 *
 * The kernel side (kernel_magics/notebook/frontend.py) answers a comm the extension opens, and pushes the
 * model's status over it; the extension opens it only once the kernel has kernel_magics loaded (asked with
 * a silent user expression), so a kernel without it never sees a comm for an unknown target. Commands run
 * the magics in the notebook's kernel, so the panel and the notebook cannot disagree about what they do.
 */

import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Clipboard, Dialog, ICommandPalette, InputDialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { ITranslator, nullTranslator } from '@jupyterlab/translation';
import {
  addIcon,
  CommandToolbarButton,
  copyIcon,
  downloadIcon,
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
  describe,
  LOADED_EXPRESSION,
  MODEL_TEMPLATE,
  ModelStatus,
  nonEmptyExpression,
  statusBarText,
  Translate
} from './render';

const TARGET = 'kernel_magics.status';

namespace CommandIDs {
  export const load = 'kernel-magics:load';
  export const unload = 'kernel-magics:unload';
  export const exportModel = 'kernel-magics:export';
  export const insertTemplate = 'kernel-magics:insert-template';
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

  get changed(): ISignal<ModelStatusTracker, void> {
    return this._changed;
  }

  /** The state for the active notebook (or 'no-notebook'). */
  current(): NotebookModelState {
    const panel = this.notebooks.currentWidget;
    if (!panel) {
      return { connection: 'no-notebook', status: null };
    }
    return this.states.get(panel) ?? { connection: 'not-loaded', status: null };
  }

  private track(panel: NotebookPanel): void {
    if (this.states.has(panel)) {
      return;
    }
    this.states.set(panel, { connection: 'not-loaded', status: null });
    const context = panel.sessionContext;
    const attach = () => this.attach(panel, context.session?.kernel ?? null);
    context.kernelChanged.connect(attach);
    context.statusChanged.connect((_, status) => {
      if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
        // The model lived in the old kernel process: say so instead of showing it as it was.
        this.set(panel, { connection: 'restarting', status: null });
      }
    });
    panel.disposed.connect(() => this.states.delete(panel));
    void context.ready.then(attach);
  }

  private attach(panel: NotebookPanel, kernel: Kernel.IKernelConnection | null): void {
    this.set(panel, { connection: 'not-loaded', status: null });
    if (!kernel) {
      return;
    }
    // An older kernel side opens the comm itself: answer it too.
    kernel.registerCommTarget(TARGET, (comm, msg) => {
      comm.onMsg = m => this.receive(panel, m);
      this.receive(panel, msg);
    });
    void this.probe(panel, kernel);
    // After a cell that mentions kernel_magics (%load_ext), ask again.
    let pending = false;
    kernel.iopubMessage.connect((_, msg) => {
      const type = msg.header.msg_type;
      if (type === 'execute_input' && String((msg.content as any).code ?? '').includes('kernel_magics')) {
        pending = true;
      } else if (pending && type === 'status' && (msg.content as any).execution_state === 'idle') {
        pending = false;
        void this.probe(panel, kernel);
      }
    });
  }

  /** Open the status comm if, and only if, the kernel has kernel_magics loaded. */
  private async probe(panel: NotebookPanel, kernel: Kernel.IKernelConnection): Promise<void> {
    if (this.states.get(panel)?.connection === 'connected') {
      return;
    }
    try {
      if ((await evaluate(kernel, LOADED_EXPRESSION)) !== 'True') {
        return;
      }
      const comm = kernel.createComm(TARGET);
      comm.onMsg = m => this.receive(panel, m);
      comm.open({});
    } catch (reason) {
      console.debug('kernel-magics: could not ask the kernel', reason);
    }
  }

  private receive(panel: NotebookPanel, msg: KernelMessage.ICommOpenMsg | KernelMessage.ICommMsgMsg): void {
    const data = msg.content.data as { status?: ModelStatus };
    if (data && data.status) {
      this.set(panel, { connection: 'connected', status: data.status });
    }
  }

  private set(panel: NotebookPanel, state: NotebookModelState): void {
    this.states.set(panel, state);
    if (panel === this.notebooks.currentWidget) {
      this._changed.emit();
    }
  }

  private states = new Map<NotebookPanel, NotebookModelState>();
  private _changed = new Signal<ModelStatusTracker, void>(this);
}

/** The panel's body: compact label/value rows, an empty state, a hint. */
class ModelView extends Widget {
  constructor(private tracker: ModelStatusTracker, private t: Translate) {
    super();
    this.addClass('km-view');
    tracker.changed.connect(() => this.update());
    this.update();
  }

  protected onUpdateRequest(): void {
    const { connection, status } = this.tracker.current();
    const view = describe(connection, status, this.t);
    const root = document.createElement('div');
    if (view.empty) {
      const empty = document.createElement('p');
      empty.className = 'km-empty';
      empty.textContent = view.empty;
      root.appendChild(empty);
    }
    if (view.rows.length) {
      const heading = document.createElement('div');
      heading.className = 'km-title';
      heading.textContent = view.title;
      heading.title = view.title;
      root.appendChild(heading);
      const list = document.createElement('dl');
      list.className = 'km-rows';
      for (const row of view.rows) {
        const label = document.createElement('dt');
        label.textContent = row.label;
        const value = document.createElement('dd');
        value.dataset.key = row.key;
        const text = document.createElement('span');
        text.className = `km-value ${row.className ?? ''}`.trim();
        text.textContent = row.value;
        text.title = row.value; // the whole value on hover: long ones are cut with an ellipsis
        value.appendChild(text);
        if (row.copy) {
          const copy = document.createElement('button');
          copy.className = 'km-copy jp-Button jp-mod-minimal';
          copy.title = this.t('Copy the path');
          copy.setAttribute('aria-label', this.t('Copy the path'));
          copyIcon.element({ container: copy, elementPosition: 'center', height: '14px', width: '14px' });
          copy.onclick = () => Clipboard.copyToSystem(row.value);
          value.appendChild(copy);
        }
        list.append(label, value);
      }
      root.appendChild(list);
    }
    if (view.hint) {
      const hint = document.createElement('p');
      hint.className = 'km-hint';
      hint.textContent = view.hint;
      root.appendChild(hint);
    }
    this.node.replaceChildren(root);
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
async function runInKernel(panel: NotebookPanel, code: string): Promise<string | null> {
  const kernel = panel.sessionContext.session?.kernel;
  if (!kernel) {
    return 'This notebook has no running kernel.';
  }
  const future = kernel.requestExecute({ code, silent: false, store_history: false, stop_on_error: false });
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
  id: 'kernel-magics:plugin',
  description: 'The model of the active notebook (kernel-magics): state, commands, status bar.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, IStatusBar, ILabShell, ITranslator],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null,
    _labShell: ILabShell | null,
    translator: ITranslator | null
  ) => {
    const trans = (translator ?? nullTranslator).load('kernel_magics');
    const t: Translate = (text, ...args) => trans.__(text, ...(args as any[]));
    const tracker = new ModelStatusTracker(notebooks);
    const view = (): ReturnType<typeof describe> => describe(tracker.current().connection, tracker.current().status, t);
    const current = (): NotebookPanel | null => notebooks.currentWidget;
    const fail = (title: string, message: string) => void showErrorMessage(title, message);

    app.commands.addCommand(CommandIDs.load, {
      label: t('Load model'),
      caption: t("Load the model (%model_load in the notebook's kernel)"),
      icon: runIcon,
      isEnabled: () => view().canLoad,
      execute: async () => {
        const nb = current();
        const error = nb && (await runInKernel(nb, '%model_load --no-widget'));
        if (error) {
          fail(t('Load failed'), error);
        }
      }
    });
    app.commands.addCommand(CommandIDs.unload, {
      label: t('Unload model'),
      caption: t('Free the model and its memory (%model_unload)'),
      icon: stopIcon,
      isEnabled: () => view().canUnload,
      execute: async () => {
        const nb = current();
        const error = nb && (await runInKernel(nb, '%model_unload'));
        if (error) {
          fail(t('Unload failed'), error);
        }
      }
    });
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
            text: status?.last_export ?? `${status?.model_name ?? 'model'}-truss`
          });
          if (!answer.button.accept || !answer.value) {
            return;
          }
          dir = answer.value;
        }
        let force = '';
        if ((await evaluate(kernel, nonEmptyExpression(dir))) === 'True') {
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
          force = ' --force';
        }
        const error = await runInKernel(nb, `%model_export ${JSON.stringify(dir)}${force}`);
        if (error) {
          fail(t('Export failed'), error);
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

    // A side panel like Lab's own: a title header, a small icon toolbar, compact rows.
    // One body, no accordion section (as the Table of Contents does it).
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
    panel.addWidget(new ModelView(tracker, t));
    app.shell.add(panel, 'right', { rank: 650 });
    app.commands.addCommand(CommandIDs.showPanel, {
      label: t('Show model panel'),
      execute: () => app.shell.activateById(panel.id)
    });

    notebooks.widgetAdded.connect((_, nb) => highlightMagicCells(nb));
    notebooks.forEach(nb => highlightMagicCells(nb));
    if (palette) {
      const category = t('Model (kernel-magics)');
      for (const command of Object.values(CommandIDs)) {
        palette.addItem({ command, category });
      }
    }
    if (statusBar) {
      const item = new ModelStatusItem(tracker, t);
      statusBar.registerStatusItem('kernel-magics:status', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => notebooks.currentWidget !== null
      });
    }
    tracker.changed.connect(() => app.commands.notifyCommandChanged());
  }
};

export default plugin;
