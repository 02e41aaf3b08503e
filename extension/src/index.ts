/**
 * kernel-magics for JupyterLab: a Model side panel, commands and a status bar item.
 *
 * The kernel side (kernel_magics/frontend.py) pushes the model's status over a
 * comm; commands run the magics in the notebook's kernel, so the panel and the
 * notebook can never disagree about what a command does.
 */

import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Dialog, ICommandPalette, InputDialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import {
  cellLanguage,
  CONFIG_TEMPLATE,
  Connection,
  describe,
  MODEL_TEMPLATE,
  ModelStatus,
  statusBarText
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
    // The kernel opens a comm to us when `%load_ext kernel_magics` runs ...
    kernel.registerCommTarget(TARGET, (comm, msg) => {
      comm.onMsg = m => this.receive(panel, m);
      this.receive(panel, msg);
    });
    // ... and a kernel that already has it (a page reload, a second view) answers our comm.
    try {
      const comm = kernel.createComm(TARGET);
      comm.onMsg = m => this.receive(panel, m);
      comm.open({});
    } catch (reason) {
      console.debug('kernel-magics: could not probe the kernel', reason);
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

/** The side panel: what the model is doing, and buttons for the commands. */
class ModelPanel extends Widget {
  constructor(private tracker: ModelStatusTracker, private app: JupyterFrontEnd) {
    super();
    this.id = 'kernel-magics-panel';
    this.addClass('km-panel');
    this.title.icon = modelIcon;
    this.title.caption = 'Model (kernel-magics)';
    tracker.changed.connect(() => this.update());
    this.update();
  }

  protected onUpdateRequest(): void {
    const { connection, status } = this.tracker.current();
    const view = describe(connection, status);
    const root = document.createElement('div');
    const heading = document.createElement('h2');
    heading.textContent = view.title;
    root.appendChild(heading);
    const table = document.createElement('table');
    for (const row of view.rows) {
      const tr = table.insertRow();
      tr.dataset.label = row.label;
      const label = tr.insertCell();
      label.className = 'km-label';
      label.textContent = row.label;
      const value = tr.insertCell();
      value.textContent = row.value;
      if (row.className) {
        value.className = row.className;
      }
    }
    root.appendChild(table);
    if (view.hint) {
      const hint = document.createElement('p');
      hint.className = 'km-hint';
      hint.textContent = view.hint;
      root.appendChild(hint);
    }
    const buttons = document.createElement('div');
    buttons.className = 'km-buttons';
    const add = (label: string, command: string, enabled: boolean) => {
      const button = document.createElement('button');
      button.className = 'jp-mod-styled jp-mod-accept';
      button.textContent = label;
      button.disabled = !enabled;
      button.dataset.command = command;
      button.onclick = () => void this.app.commands.execute(command);
      buttons.appendChild(button);
    };
    add('Load', CommandIDs.load, view.canLoad);
    add('Unload', CommandIDs.unload, view.canUnload);
    add('Export…', CommandIDs.exportModel, view.canExport);
    add('Insert model template', CommandIDs.insertTemplate, connection !== 'no-notebook');
    root.appendChild(buttons);
    this.node.replaceChildren(root);
  }
}

/** The status bar item: state and device at a glance. */
class ModelStatusItem extends Widget {
  constructor(private tracker: ModelStatusTracker) {
    super();
    this.addClass('jp-StatusBar-TextItem');
    this.id = 'kernel-magics-status';
    tracker.changed.connect(() => this.update());
    this.update();
  }

  protected onUpdateRequest(): void {
    const { connection, status } = this.tracker.current();
    this.node.textContent = statusBarText(connection, status);
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
  optional: [ICommandPalette, IStatusBar, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null
  ) => {
    const tracker = new ModelStatusTracker(notebooks);
    const panel = new ModelPanel(tracker, app);
    app.shell.add(panel, 'right', { rank: 650 });
    notebooks.widgetAdded.connect((_, nb) => highlightMagicCells(nb));
    notebooks.forEach(nb => highlightMagicCells(nb));

    const current = (): NotebookPanel | null => notebooks.currentWidget;
    const fail = (title: string, message: string) => void showErrorMessage(title, message);

    app.commands.addCommand(CommandIDs.load, {
      label: 'Load model',
      caption: 'Run %model_load in the active notebook\'s kernel',
      isEnabled: () => describe(tracker.current().connection, tracker.current().status).canLoad,
      execute: async () => {
        const nb = current();
        const error = nb && (await runInKernel(nb, '%model_load --no-widget'));
        if (error) {
          fail('Load failed', error);
        }
      }
    });
    app.commands.addCommand(CommandIDs.unload, {
      label: 'Unload model',
      isEnabled: () => describe(tracker.current().connection, tracker.current().status).canUnload,
      execute: async () => {
        const nb = current();
        const error = nb && (await runInKernel(nb, '%model_unload'));
        if (error) {
          fail('Unload failed', error);
        }
      }
    });
    app.commands.addCommand(CommandIDs.exportModel, {
      label: 'Export model…',
      caption: 'Write the model as a deployable Truss directory (%model_export)',
      isEnabled: () => describe(tracker.current().connection, tracker.current().status).canExport,
      execute: async args => {
        const nb = current();
        if (!nb) {
          return;
        }
        const status = tracker.current().status;
        let dir = (args['dir'] as string | undefined) ?? null;
        if (dir === null) {
          const answer = await InputDialog.getText({
            title: 'Export model',
            label: 'Directory, relative to the notebook:',
            text: status?.last_export ?? `${status?.model_name ?? 'model'}-truss`
          });
          if (!answer.button.accept || !answer.value) {
            return;
          }
          dir = answer.value;
        }
        const quoted = JSON.stringify(dir);
        let error = await runInKernel(nb, `%model_export ${quoted}`);
        if (error && error.includes('exists and is not empty')) {
          const replace = await showDialog({
            title: 'The directory exists',
            body: `${dir} already holds files. Replace it with this export? The old files are removed only once the new export has passed its checks.`,
            buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Replace' })]
          });
          if (!replace.button.accept) {
            return;
          }
          error = await runInKernel(nb, `%model_export ${quoted} --force`);
        }
        if (error) {
          fail('Export failed', error);
        }
      }
    });
    app.commands.addCommand(CommandIDs.insertTemplate, {
      label: 'Insert model template',
      caption: 'Add a %%model_config cell and a %%model cell with the Truss contract',
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
    app.commands.addCommand(CommandIDs.showPanel, {
      label: 'Show model panel',
      execute: () => app.shell.activateById(panel.id)
    });
    if (palette) {
      const category = 'Model (kernel-magics)';
      for (const command of Object.values(CommandIDs)) {
        palette.addItem({ command, category });
      }
    }
    if (statusBar) {
      const item = new ModelStatusItem(tracker);
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
