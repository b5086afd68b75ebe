"""Sphinx configuration of the vdm_jax documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (tests/test_docs.py
runs the same build). ``nitpicky`` with ``-W`` turns every unresolved cross-reference to a
vdm_jax name into an error, so a renamed function that a page or a docstring still names
fails the build. No extension needs the network (no intersphinx): the build runs offline.
"""

import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "vdm_jax"
author = "vdm_jax authors"
copyright = "the vdm_jax authors"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
exclude_patterns = ["_build"]

# The docstrings are Google style ("Args:", "Returns:") with Sphinx roles (:func:, :class:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" as a field list of the class, not as objects that autodoc documents again.
napoleon_use_ivar = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
# Flax modules are dataclasses: their fields are documented in "Attributes:".
autodoc_inherit_docstrings = False
python_use_unqualified_type_names = True

nitpicky = True
# Names of other libraries have nothing to link to offline; every vdm_jax name must resolve.
_EXTERNAL = (
    r"(jax|jnp|np|numpy|nn|flax|optax|orbax|grain|ml_collections|epath|etils|tfds|absl|PIL"
    r"|diffrax|collections|typing|types|os|matplotlib|tqdm)(\..*)?"
)
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    (r"py:.*", r"(Array|PyTree|Any|Callable|Iterable|Iterator|Mapping|Sequence|Dtype|Path)"),
    (r"py:.*", r"(int|float|str|bool|dict|list|tuple|None|bytes|object|type)"),
    (r"py:.*", r".*[\[\]].*"),  # pieces of annotations such as tuple[int, int]
]

html_theme = "alabaster"
html_static_path = []
html_theme_options = {"page_width": "1100px", "sidebar_width": "230px"}


def _attribute_docstring_as_text(self):
    """Napoleon reads the first line of a property's or constant's docstring as ``type:
    description``; ours are sentences ("Data shards of a global batch: one per device."), so
    keep them as text."""
    return self.__class__(self._dedent(self._consume_to_end()), self._config).lines()


_SHARED_ENTRY = re.compile(r"^(\s+)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)+): (.*)$")


def _split_shared_attributes(app, what, name, obj, options, lines):
    """``a, b: text`` in an "Attributes:" section becomes one entry per name (before napoleon
    reads it; a field list needs one name per entry)."""
    out, section, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        if line.strip().endswith(":") and not line.startswith(" "):
            section = line.strip()
        match = _SHARED_ENTRY.match(line) if section == "Attributes:" else None
        if not match:
            out.append(line)
            i += 1
            continue
        indent, names, text = match.groups()
        rest = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            rest.append(lines[i])
            i += 1
        for entry in names.split(", "):
            out += [f"{indent}{entry}: {text}", *rest]
    lines[:] = out


def setup(app):
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    GoogleDocstring._parse_attribute_docstring = _attribute_docstring_as_text
    app.connect("autodoc-process-docstring", _split_shared_attributes, priority=400)
