"""Kept out of the Ray processes the tests start: tests/ray_harness.py puts this folder first on their PYTHONPATH.

jsonschema imports rfc3987_syntax when it is installed (jupyter_server's extras bring it), and that import builds
about 30 IRI grammars: seconds of CPU in every Ray process, since `import ray` imports jsonschema. A node's raylet
registers only after its agents have imported, and Ray gives it 30 s to (hard-coded in ray/_private/node.py): on a
busy two-core machine the grammars alone made Ray's start miss it. jsonschema leaves out the two IRI formats when
this import fails; neither Ray nor kernel-magics uses them.
"""

raise ImportError("rfc3987_syntax is kept out of the tests' Ray processes (tests/without_iri_grammar)")
