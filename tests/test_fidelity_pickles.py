"""Notebook classes and functions inside saved values, and identity, in a real kernel.

Each notebook makes values that hold its own classes or functions (a wrapper around a fitted
vectorizer and classifier, a notebook nn.Module through torch's full save, dataclass instances, a
functools.partial, a nested class) or names one object twice, records predictions, exports with
%model_export, then the export answers as the notebook did from `kernel-magics serve` and from
Truss 0.18.36's own server. No saved file refers to ``__main__``.
"""

import json
import textwrap

import httpx
import pytest

from server_harness import serve_ours, serve_truss, truss_venv_with_models
from test_export import leftovers, run_notebook_cells, write_notebook
from test_fidelity import predict_cells

CASES = {
    "wrapper around fitted scikit-learn parts": ([
        "from sklearn.feature_extraction.text import TfidfVectorizer\n"
        "from sklearn.linear_model import LogisticRegression",
        textwrap.dedent("""\
            class TextClassifier:
                def __init__(self):
                    self.vectorizer = TfidfVectorizer()
                    self.clf = LogisticRegression(max_iter=200)
                def fit(self, texts, labels):
                    self.clf.fit(self.vectorizer.fit_transform(texts), labels)
                    return self
                def predict(self, texts):
                    return self.clf.predict_proba(self.vectorizer.transform(texts))
            """),
        "clf = TextClassifier()\nclf.fit(['good movie', 'great film', 'bad movie', 'awful film', 'good fun', "
        "'terrible plot'], [1, 1, 0, 0, 1, 0])",
        textwrap.dedent("""\
            %%model
            class Model:
                def predict(self, model_input):
                    return {"proba": clf.predict(model_input["texts"]).tolist()}
            """),
    ], [{"texts": ["good film"]}, {"texts": ["awful plot", "great fun"]}], {"clf": "pickle"}),
    "notebook nn.Module with a nested class, fully saved": ([
        "import torch\nfrom torch import nn",
        textwrap.dedent("""\
            class Tagger(nn.Module):
                class Head(nn.Module):
                    def __init__(self, n):
                        super().__init__()
                        self.lin = nn.Linear(n, 2)
                    def forward(self, x):
                        return self.lin(x).softmax(-1)
                def __init__(self):
                    super().__init__()
                    self.body = nn.Linear(4, 8)
                    self.head = Tagger.Head(8)
                def forward(self, x):
                    return self.head(torch.relu(self.body(x)))
            def build():
                torch.manual_seed(0)
                return Tagger().eval()
            """),
        "tagger = build()",
        textwrap.dedent("""\
            %%model
            class Model:
                def predict(self, model_input):
                    with torch.no_grad():
                        return {"tags": tagger(torch.tensor([model_input["x"]])).tolist()}
            """),
    ], [{"x": [1.0, 2.0, 3.0, 4.0]}, {"x": [0.5, -1.0, 0.0, 2.0]}], {"tagger": "torch.save (pickle)"}),
    "dataclasses, a partial, a nested class and one object under two names": ([
        "import dataclasses, functools\nimport numpy as np",
        textwrap.dedent("""\
            @dataclasses.dataclass
            class Label:
                name: str
                weight: float

            def score(x, k=1.0, offset=0.0):
                return x * k + offset

            class Outer:
                class Inner:
                    def __init__(self, factor):
                        self.factor = factor
                    def apply(self, x):
                        return x * self.factor

            calls = []
            def train():
                calls.append(1)
                return np.arange(3.0) * 7, f"run-{len(calls)}"
            """),
        "LABELS = {'a': Label('alpha', 1.0)}\nLABELS['b'] = Label('beta', 2.5)\n"
        "scorer = functools.partial(score, k=2.0)\nscorer.keywords['offset'] = 0.5\n"
        "inner = Outer.Inner(3)\ninner.factor += 1",
        "weights = np.linspace(0, 1, 4)\nsame = weights\nsame *= 2\nw, tag = train()",
        textwrap.dedent("""\
            %%model
            class Model:
                def predict(self, model_input):
                    x, label = model_input["x"], LABELS[model_input["key"]]
                    return {"label": label.name, "weighted": label.weight * x, "scored": scorer(x),
                            "inner": inner.apply(x), "one object": same is weights,
                            "weights": (weights * x).tolist(), "w": w.tolist(), "tag": tag}
            """),
    ], [{"x": 2.0, "key": "a"}, {"x": -1.5, "key": "b"}],
        {"LABELS": "pickle", "scorer": "pickle", "inner": "pickle", "weights": "npy",
         "same": "the same object as `weights`", "w": "npy", "tag": "literal"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_values_holding_notebook_code_export_and_answer_alike_on_both_servers(tmp_path, case, truss_validate):
    cells, inputs, formats = CASES[case]
    path = write_notebook(tmp_path / "nb.ipynb", ["%load_ext kernel_magics", *cells, "%model_load",
                                                   *predict_cells(inputs), "%model_export out", "%model_show --why"])
    k, results = run_notebook_cells(path)
    k.shutdown()
    answers = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results[-2 - len(inputs):-2]]
    exported, why = results[-2].stdout, results[-1].stdout
    assert f"Replayed {len(inputs)} recorded predictions in a fresh Python" in exported
    lines = {line.split()[0]: line for line in why.splitlines() if line.strip()}
    for name, how in formats.items():
        assert f"value ({how}" in lines[name], lines[name]
    out = tmp_path / "out"
    model_py = (out / "model" / "model.py").read_text()
    saved = {p.name: p.read_bytes() for p in (out / "data" / "notebook_values").iterdir()}
    assert "__main__" not in model_py and all(b"__main__" not in data for data in saved.values()), sorted(saved)
    if "same" in formats:
        assert sorted(saved) == ["LABELS.pkl", "inner.pkl", "scorer.pkl", "w.npy", "weights.npy"]
        assert "same = weights" in model_py and "train" not in model_py  # `w, tag = train()` does not re-run
        assert all(a["one object"] is True for a in answers)
    truss_validate(out)
    with serve_ours(out) as ours:
        assert [httpx.post(ours.predict_url(), json=i).json() for i in inputs] == answers
    venv = truss_venv_with_models()
    if venv is not None:
        with serve_truss(out, venv=venv) as theirs:
            assert [httpx.post(theirs.predict_url(), json=i).json() for i in inputs] == answers
    assert leftovers(tmp_path) == []
