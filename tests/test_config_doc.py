"""docs/configuration.md cannot drift from the config: every key has a meaning written where it
is defined, and the committed file is exactly what the generator prints from the code."""

import os
import subprocess
import sys

import pytest

from jaxtrain import config as config_lib, config_doc
from jaxtrain.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "configuration.md")


def test_every_config_key_has_a_meaning_written_where_it_is_defined():
  missing = config_doc.missing_meanings()
  assert not missing, (
      f"config keys without a meaning: {', '.join(missing)}. Write a one-line `# comment` on (or "
      f"just above) the line that defines each key, then run `{config_doc.COMMAND}`.")


def test_committed_configuration_reference_matches_the_code():
  with open(DOC) as f:
    committed = f.read()
  assert committed == config_doc.render(), (
      f"docs/configuration.md is stale (a config key, default, comment or check changed): run "
      f"`{config_doc.COMMAND}` and commit the result.")


def test_reference_lists_every_key_with_its_default():
  text = config_doc.render()
  rows = {r[0]: r for r in config_doc.entries()}
  cfg = config_lib.base_config()

  def leaves(node, prefix=""):
    for key in node.keys():
      if hasattr(node[key], "keys"):
        yield from leaves(node[key], f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"
  for key in leaves(cfg):
    assert f"| `{key}` |" in text, key
    assert rows[key][2], key
  assert rows["optimizer.name"][4] == "one of adamw, muon"
  assert rows["train.steps"][1] == cfg.train.steps


def test_a_new_key_without_a_comment_fails_naming_it(monkeypatch):
  real = config_lib.base_config

  def base_config():
    cfg = real()
    cfg.train.brand_new_key = 3
    return cfg
  monkeypatch.setattr(config_lib, "base_config", base_config)
  with pytest.raises(UserError, match=r"without a meaning: .*train\.brand_new_key"):
    config_doc.render()


def test_generator_runs_as_documented_and_prints_the_reference():
  env = {k: v for k, v in os.environ.items() if k != "JAXTRAIN_DATA_DIR"}
  env["JAXTRAIN_DATA_DIR"] = "/somewhere/else"  # a machine's own default must not leak in
  result = subprocess.run([sys.executable, "-m", "jaxtrain.config_doc"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  with open(DOC) as f:
    assert result.stdout == f.read()
