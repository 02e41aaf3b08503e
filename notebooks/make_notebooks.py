"""Write the example notebooks from source (run, then execute them to store outputs).

Keeping the cells here makes notebook changes reviewable as plain Python.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

HELPERS = '''\
import codecs
import this  # noqa: F401  (prints the Zen once; the text ships with Python)

import torch
from torch import nn

TEXT = codecs.decode(this.s, "rot13")
CONTEXT = 4


def build_vocab(text):
    chars = sorted(set(text))
    return {c: i for i, c in enumerate(chars)}, chars


class CharNet(nn.Module):
    """A tiny character model: the last CONTEXT characters predict the next one."""

    def __init__(self, vocab_size, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mlp = nn.Sequential(nn.Linear(CONTEXT * dim, 128), nn.Tanh(), nn.Linear(128, vocab_size))

    def forward(self, idx):
        return self.mlp(self.embed(idx).flatten(1))


def train_charnet(text, steps=300, seed=0):
    """Train CharNet on text in about a second, deterministically."""
    torch.manual_seed(seed)
    stoi, chars = build_vocab(text)
    data = torch.tensor([stoi[c] for c in text])
    xs = torch.stack([data[i:i + CONTEXT] for i in range(len(data) - CONTEXT)])
    ys = data[CONTEXT:]
    net = CharNet(len(chars))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), stoi, chars


@torch.no_grad()
def generate(net, stoi, chars, prompt, max_new_tokens):
    """Greedy decoding, one character at a time."""
    device = next(net.parameters()).device  # wherever load put the weights (GPU or CPU)
    ids = [stoi.get(c, 0) for c in prompt]
    ids = [0] * max(0, CONTEXT - len(ids)) + ids
    for _ in range(max_new_tokens):
        logits = net(torch.tensor([ids[-CONTEXT:]], device=device))
        ids.append(int(logits.argmax()))
        yield chars[ids[-1]]
'''

TRAINING_CELL = '''\
# Try the helpers before wrapping them in a model: this cell is not part of the export.
net, stoi, chars = train_charnet(TEXT, steps=50)
"".join(generate(net, stoi, chars, "Beautiful", 20))
'''

CONFIG = '''\
%%model_config
model_name: tiny-chargen
requirements: [torch]
resources: {cpu: "1", memory: 2Gi}
model_metadata:
  example_model_input: {prompt: "Beautiful is", max_new_tokens: 40}
'''

MODEL = '''\
%%model
class Model:
    def __init__(self, **kwargs):
        self._config = kwargs["config"]

    def load(self):
        torch.set_num_threads(1)  # deterministic and fair on a shared CPU
        self.net, self.stoi, self.chars = train_charnet(TEXT)

    def predict(self, model_input):
        prompt = model_input["prompt"]
        n = int(model_input.get("max_new_tokens", 40))
        completion = "".join(generate(self.net, self.stoi, self.chars, prompt, n))
        return {"prompt": prompt, "completion": completion}
'''


STREAM_CONFIG = '''\
%%model_config
model_name: tiny-chargen-stream
requirements: [torch]
resources: {accelerator: T4}
model_metadata:
  example_model_input: {prompt: "Beautiful is", max_new_tokens: 60}
'''

STREAM_MODEL = '''\
%%model
class Model:
    def load(self):
        # %model_load --device picks torch's default device here: the GPU when the kernel has one.
        torch.set_num_threads(1)
        self.net, self.stoi, self.chars = train_charnet(TEXT)

    def predict(self, model_input):
        # A generator: each character streams into the notebook (and over HTTP) as it is made.
        n = int(model_input.get("max_new_tokens", 60))
        yield from generate(self.net, self.stoi, self.chars, model_input["prompt"], n)
'''


def streaming() -> nbformat.NotebookNode:
    return new_notebook(
        cells=[
            new_markdown_cell(
                "# Streaming with kernel-magics\n\n"
                "A generator `predict` streams token by token into a live view (in JupyterLab: text as it "
                "arrives, time to first chunk, chunks/s, and a Stop button). Without a widget frontend, as "
                "here under nbval, the same magics print the text as it arrives and a summary line."
            ),
            new_code_cell("%load_ext kernel_magics"),
            new_code_cell("# NBVAL_IGNORE_OUTPUT\n" + HELPERS),
            new_code_cell(STREAM_CONFIG),
            new_code_cell(STREAM_MODEL),
            new_code_cell("%model_load"),
            new_code_cell('%model_predict {"prompt": "Beautiful is", "max_new_tokens": 60}'),
            new_code_cell('%%predict\n{"prompt": "Now is", "max_new_tokens": 40}'),
            new_markdown_cell("`%model_unload` gives the memory back (on a GPU: allocated memory returns to its level before load)."),
            new_code_cell("%model_unload"),
        ],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    )


def quickstart() -> nbformat.NotebookNode:
    return new_notebook(
        cells=[
            new_markdown_cell(
                "# kernel-magics quickstart\n\n"
                "A tiny character-level torch model, trained in about a second on the Zen of Python, "
                "turned into a Truss `Model` with cell magics."
            ),
            new_code_cell("%load_ext kernel_magics"),
            new_markdown_cell("Helpers: ordinary notebook code that the model uses."),
            new_code_cell("# NBVAL_IGNORE_OUTPUT\n" + HELPERS),
            new_code_cell(TRAINING_CELL),
            new_markdown_cell("The deployment config (Truss's `config.yaml`) and the model class:"),
            new_code_cell(CONFIG),
            new_code_cell(MODEL),
            new_code_cell("%model_load"),
            new_code_cell('%model_predict {"prompt": "Beautiful is", "max_new_tokens": 40}'),
            new_code_cell('%%predict\nprompt = "Errors should"\n{"prompt": prompt, "max_new_tokens": 30}'),
            new_markdown_cell("Re-running a `%%model` cell swaps the code of the loaded model without retraining:"),
            new_code_cell(MODEL.replace(
                'return {"prompt": prompt, "completion": completion}',
                'return {"prompt": prompt, "completion": completion, "length": len(completion)}',
            )),
            new_code_cell('%model_predict {"prompt": "Simple is", "max_new_tokens": 20}'),
            new_code_cell("%model_status"),
        ],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    )


if __name__ == "__main__":
    for name, build in (("quickstart", quickstart), ("streaming", streaming)):
        nbformat.write(build(), HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")
