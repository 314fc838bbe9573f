"""docs/configuration.md, generated from the config itself.

  python -m jaxtrain.config_doc > docs/configuration.md

A reference written by hand drifts the day someone adds a key. Here every fact comes from the
code: the keys and defaults from `config.base_config()`, the type from the default, the meaning
from the one-line `# comment` written where the key is defined (trailing the line, or on the
lines just above it) in `base_config()`, `ModelConfig`, `data.default_config()` and
`optim.default_config()`, and the valid values from what `config.validate()` itself says when it
rejects a deliberately wrong value. tests/test_config_doc.py fails when a key has no comment or
the committed file differs from what this prints.
"""

import ast
import copy
import importlib
import inspect
import io
import os
import sys
import textwrap
import tokenize

import ml_collections

from jaxtrain import config as config_lib
from jaxtrain.errors import UserError

COMMAND = "python -m jaxtrain.config_doc > docs/configuration.md"


def _sources():
  """[(object whose source defines keys, prefix of its keys)]: `base_config()` itself, and for each
  `cfg.SECTION = ...` in it, the module-level function or class it calls (`optim.default_config()`,
  `model.ModelConfig()`), so a section built in a new module is found without editing this file."""
  found = [(config_lib.base_config, "")]
  tree = ast.parse(textwrap.dedent(inspect.getsource(config_lib.base_config)))
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    path = _attribute_path(node.targets[0])
    if not path or len(path) != 1:
      continue
    for call in ast.walk(node.value):
      func = getattr(call, "func", None)
      if isinstance(call, ast.Call) and isinstance(func, ast.Attribute) and isinstance(
          func.value, ast.Name):
        try:
          obj = getattr(importlib.import_module(f"jaxtrain.{func.value.id}"), func.attr)
        except (ImportError, AttributeError):
          continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
          found.append((obj, f"{path[0]}."))
  return found


def _comments(source):
  """{line: (text, is_whole_line)} for every `#` comment in `source`."""
  out = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      line = tok.line.lstrip()
      out[tok.start[0]] = (tok.string.lstrip("#").strip(), line.startswith("#"))
  return out


def _attribute_path(node):
  """`cfg.muon.momentum` -> ['muon', 'momentum'] (the root variable dropped), else None."""
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  return list(reversed(names)) if isinstance(node, ast.Name) and names else None


def _dict_keywords(node):
  """The keywords of `dict(a=..)` or `ConfigDict(dict(a=..))`, else []."""
  if not isinstance(node, ast.Call):
    return []
  func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
  if func == "dict":
    return [kw for kw in node.keywords if kw.arg]
  if func == "ConfigDict" and node.args:
    return _dict_keywords(node.args[0])
  return []


def _meaning(comments, first, last):
  """The trailing comment on lines first..last, else the comment block right above `first`."""
  for line in range(first, last + 1):
    text, whole = comments.get(line, ("", True))
    if text and not whole:
      return text
  block, line = [], first - 1
  while line in comments and comments[line][1]:
    block.insert(0, comments[line][0])
    line -= 1
  return " ".join(block)


def definitions():
  """{dotted key: (meaning, 'file:line')} for every key assignment found in the sources."""
  found = {}
  for obj, prefix in _sources():
    lines, start = inspect.getsourcelines(obj)
    source = textwrap.dedent("".join(lines))
    comments = _comments(source)
    where = os.path.relpath(inspect.getsourcefile(obj),
                            os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for node in ast.walk(ast.parse(source)):
      targets = []
      if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        targets = [([node.target.id], node)]
      elif isinstance(node, ast.Assign) and len(node.targets) == 1:
        path = _attribute_path(node.targets[0])
        if path:
          targets = [(path, node)] + [(path + [kw.arg], kw) for kw in _dict_keywords(node.value)]
      for path, n in targets:
        key = prefix + ".".join(path)
        found[key] = (_meaning(comments, n.lineno, n.end_lineno),
                      f"{where}:{start + n.lineno - 1}")
  return found


def _leaves(node, prefix=""):
  for key in node.keys():
    if isinstance(node[key], ml_collections.ConfigDict):
      yield from _leaves(node[key], f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", node, key


def _type_name(node, key):
  value = node[key]
  if value is None:
    kind = node.get_ref(key).get_type()
    return f"{kind.__name__} or None" if kind else "None"
  if isinstance(value, tuple):
    return "tuple"
  return type(value).__name__


# Wrong values to offer validate(): below and above any sensible range for numbers.
_PROBES = {bool: ("maybe",), int: (-7, 10 ** 9), float: (-7.5, 1e9), str: ("\x01bogus",),
           tuple: (7,)}


def _rejection(cfg, dotted, key, probe):
  """What validate() says about `dotted` set to `probe`, without its key and `got ...`; '' if it
  accepts the probe, crashes, or the message is about something else."""
  bad = copy.deepcopy(cfg)
  target = bad
  for part in dotted.split(".")[:-1]:
    target = target[part]
  with target.unlocked():
    target._fields[key] = probe  # pylint: disable=protected-access  # bypass the type check
  try:
    config_lib.validate(bad, num_devices=1)  # 1 device: the mesh keys are checked too
  except UserError as e:
    message = str(e).split(", got ")[0].split(" (known:")[0]
  except Exception:  # pylint: disable=broad-except  # a check that crashes documents nothing
    return ""
  else:
    return ""
  if dotted not in message:
    return ""
  whole = message if repr(probe) not in message and str(probe) not in message else ""
  for lead in (f"{dotted}={probe!r} ", f"{dotted}: ", f"{dotted} "):
    if message.startswith(lead):
      rest = message[len(lead):]
      break
  else:
    return whole  # the message is about this key and another: keep it whole
  if repr(probe) in rest or str(probe) in rest:
    return ""
  for verb in ("must be ", "is not ", "must "):
    if rest.startswith(verb):
      rest = rest[len(verb):]
      break
  else:
    return whole
  if rest.startswith("one of (") or rest.startswith("one of ["):
    rest = "one of " + ", ".join(w.strip(" '\"") for w in rest[len("one of ("):-1].split(","))
  return rest


def valid_values(cfg, dotted, node, key):
  """What `validate()` says a value must be, from the messages it gives for wrong ones: the
  check itself is the documentation, so the two cannot disagree."""
  kind = type(node[key]) if node[key] is not None else node.get_ref(key).get_type()
  said = []
  for probe in _PROBES.get(kind, ()):
    text = _rejection(cfg, dotted, key, probe)
    if text and text not in said:
      said.append(text)
  return " and ".join(said)


def entries():
  """[(key, default, type, meaning, valid values, defined at)] in the order of the sources."""
  from jaxtrain.data import config as data_config  # pylint: disable=import-outside-toplevel
  cfg = config_lib.base_config()
  # data.data_dir defaults to $JAXTRAIN_DATA_DIR where set: document the code's own default.
  cfg.data.data_dir = data_config.DEFAULT_DATA_DIR
  found = definitions()
  rows = []
  for dotted, node, key in _leaves(cfg):
    meaning, where = found.get(dotted, ("", ""))
    rows.append((dotted, node[key], _type_name(node, key), meaning,
                 valid_values(cfg, dotted, node, key), where))
  section_order = {s: i for i, s in enumerate(("model", "data", "optimizer", "train", "mesh",
                                               "checkpoint"))}

  def order(row):
    file, _, line = row[5].partition(":")
    return (section_order.get(row[0].split(".")[0], 99), row[0].count("."), file,
            int(line or 1e9), row[0])
  return sorted(rows, key=order)


def missing_meanings():
  return [row[0] for row in entries() if not row[3]]


def _cell(text):
  return str(text).replace("|", "\\|").replace("\n", " ")


def render():
  """The whole of docs/configuration.md. Raises UserError when a key has no meaning written."""
  rows = entries()
  missing = [row[0] for row in rows if not row[3]]
  if missing:
    raise UserError(f"config keys without a meaning: {', '.join(missing)}; write a one-line "
                    "`# comment` on (or just above) the line that defines each")
  out = [
      "# Configuration reference",
      "",
      f"<!-- Generated by `{COMMAND}` from the code; do not edit by hand:",
      "     change the comment where a key is defined and regenerate. -->",
      "",
      "Every key of a jaxtrain config, its default (from `jaxtrain.config.base_config()`), type,",
      "meaning and valid values (as `validate()` words them; every value is checked before",
      "anything compiles). Set any of them on the command line with `--config.KEY=VALUE`, e.g.",
      "`jaxtrain train --config.optimizer.name=muon --config.train.steps=500`, or in a config",
      "file's `get_config`. Config files (`configs/default.py`, `configs/llama.py:SIZE,HW`) change",
      "only what differs from these defaults. `jaxtrain info` checks a config and its overrides",
      "without training:",
      "",
      "```bash runnable",
      "jaxtrain info --config=configs/llama.py:toy --config.optimizer.name=muon "
      "--config.optimizer.muon.ns_coeffs=polar_express",
      "```",
  ]
  section = None
  for key, default, kind, meaning, valid, where in rows:
    head = key.rsplit(".", 1)[0]
    if head != section:
      section = head
      out += ["", f"## `{section}`", "", f"Defined in `{where.split(':')[0]}`.", "",
              "| key | default | type | meaning | valid values |", "|---|---|---|---|---|"]
    out.append(f"| `{key}` | `{_cell(repr(default))}` | {kind} | {_cell(meaning)} | "
               f"{_cell(valid)} |")
  return "\n".join(out) + "\n"


def main():
  try:
    sys.stdout.write(render())
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
