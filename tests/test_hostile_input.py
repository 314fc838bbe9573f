"""Hostile input, generated: random config overrides and garbled data files end in success or a
one-line error with exit code 2, never a traceback; checkpoints and HF imports never unpickle."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

from jaxtrain import cli, convert
from jaxtrain.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
KEYS = cli._config_keys()  # pylint: disable=protected-access

VALUES = st.one_of(
    st.integers(-3, 600).map(str), st.integers(-2 ** 70, 2 ** 70).map(str),
    st.floats(allow_nan=True).map(repr),
    st.sampled_from(["", "0", "-1", "true", "off", "None", "[]", "[1, 2]", "{}", "{'a': 1}",
                     "nan", "inf", "-inf", "1e400", "float32", "muon", "fp8", "()", "'x'",
                     "__import__('os')", "a" * 300, "\x00", "é", "1_000"]),
    st.text(max_size=20))
KEY_NAMES = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(KEYS),
                      st.sampled_from(KEYS).map(lambda k: k + "x"),
                      st.sampled_from(["model", "train", "", ".", "model..d_model", "a.b.c",
                                       "train.steps.x"]),
                      st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", max_size=15))
OVERRIDES = st.lists(st.tuples(KEY_NAMES, VALUES), max_size=4)


def _assert_clean(code, err):
  event(f"exit code {code}")  # --hypothesis-show-statistics shows the mix of outcomes.
  assert code in (0, 2), err
  if code == 2:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err


def _main(argv, capsys):
  try:
    code = cli.main(argv)
  except SystemExit as e:  # (cli.main returns; a SystemExit would be a bug we still classify)
    code = e.code
  return code, capsys.readouterr().err


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(OVERRIDES)
@example([("optimizer.no_decay", "None")])  # once a TypeError from deep in validation
def test_random_overrides_to_info_are_success_or_one_line(capsys, overrides):
  argv = ["info"] + [f"--config.{k}={v}" for k, v in overrides]
  _assert_clean(*_main(argv, capsys))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(OVERRIDES)
def test_random_overrides_to_train_are_success_or_one_line_before_compile(capsys, monkeypatch,
                                                                          tmp_path, overrides):
  """Everything `train` does before compiling (config, resolve, validate, mesh, optimizer):
  `jaxtrain.train` is replaced by its setup, so a config that passes costs no compile."""
  import jaxtrain
  from jaxtrain import trainer
  monkeypatch.setattr(jaxtrain, "train", lambda cfg, workdir: (trainer.make_setup(cfg), {})[1])
  argv = ["train", f"--workdir={tmp_path}/w", "--config.model.n_layers=1",
          "--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.n_heads=2",
          "--config.model.n_kv_heads=2", "--config.model.vocab_size=256"]
  argv += [f"--config.{k}={v}" for k, v in overrides]
  _assert_clean(*_main(argv, capsys))


GARBAGE = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=2000),
    st.lists(st.one_of(st.text(max_size=80), st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=5).map(json.dumps)), max_size=40).map("\n".join))
SUFFIXES = st.sampled_from([".txt", ".jsonl", ".json", ".parquet", ".jsonl.zst", ".md"])


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(GARBAGE, SUFFIXES), min_size=1, max_size=4), st.booleans())
def test_garbled_data_files_are_prepared_or_refused_in_one_line(capsys, tmp_path_factory, files,
                                                                 one_glob):
  root = tmp_path_factory.mktemp("garbage")
  for i, (content, suffix) in enumerate(files):
    data = content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass")
    (root / f"f{i}{suffix}").write_bytes(data)
  source = str(root / "*") if one_glob else str(root / f"f0{files[0][1]}")
  argv = ["data", "prepare", f"--config.data.source={source}",
          f"--config.data.data_dir={tmp_path_factory.mktemp('prepared')}",
          "--config.model.vocab_size=300", "--config.data.seq_len=16",
          "--config.model.max_seq_len=32", "--config.data.prepare_workers=1"]
  _assert_clean(*_main(argv, capsys))


def test_a_data_dir_that_is_a_file_is_one_line_and_exit_2(capsys, tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  assert cli.main(["data", "prepare", f"--config.data.data_dir={blocker}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Not a directory" in err and str(blocker) in err, err


def _subprocess(args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", "jaxtrain.cli", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, culprit", [
    (["info", "--config.model.d_model=wide", "--config.train.steps=-3"], "model.d_model"),
    (["train", "--config.train.batch_size=-8", "--workdir=/tmp/jaxtrain-never-written"],
     "train.batch_size"),
], ids=["wrong-type", "negative-size"])
def test_the_real_exit_code_is_2_with_one_line(args, culprit):
  result = _subprocess(args)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and culprit in lines[0], result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Safe loading: nothing is ever unpickled.


@pytest.fixture
def no_unpickling(monkeypatch):
  """Any unpickling, by pickle or numpy or torch, fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError("something tried to unpickle")
  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)
  import numpy as np
  real_np_load = np.load

  def np_load(*args, **kwargs):
    kwargs["allow_pickle"] = False  # numpy's own switch: object arrays would need pickle.
    return real_np_load(*args, **kwargs)
  monkeypatch.setattr(np, "load", np_load)
  if "torch" in sys.modules:
    monkeypatch.setattr(sys.modules["torch"], "load", refuse)


def test_hf_import_and_workdir_restore_never_unpickle(no_unpickling, tmp_path):
  import jaxtrain
  model, _ = convert.load_hf(os.path.join(FIXTURES, "mha"))
  workdir = str(tmp_path / "imported")
  convert.hf_to_workdir(os.path.join(FIXTURES, "mha"), workdir)
  jaxtrain.load_model(workdir)  # Orbax restore: OCDBT/zarr arrays and JSON metadata.


def test_the_package_has_no_unpickling_code():
  package = os.path.join(REPO, "jaxtrain")
  offenders = []
  for root, _, names in os.walk(package):
    for name in names:
      if name.endswith(".py"):
        text = open(os.path.join(root, name)).read()
        for needle in ("import pickle", "torch.load", "allow_pickle=True", "cloudpickle",
                       "import dill", "joblib.load"):
          if needle in text:
            offenders.append(f"{name}: {needle}")
  assert not offenders, offenders


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.00.pth", "model.pt",
                                  "model.ckpt"])
def test_a_pickle_checkpoint_is_refused_with_how_to_convert_it(no_unpickling, tmp_path, name):
  directory = shutil.copytree(os.path.join(FIXTURES, "mha"), tmp_path / "hf")
  os.remove(directory / "model.safetensors")
  (directory / name).write_bytes(pickle.dumps({"weights": 1}))  # (dumps: writing is harmless)
  with pytest.raises(UserError) as e:
    convert.load_hf(str(directory))
  message = str(e.value)
  assert name in message and "never loads" in message and "save_pretrained" in message
  assert "safe_serialization=True" in message and "\n" not in message


def test_a_pickle_renamed_to_safetensors_is_a_one_line_error(no_unpickling, tmp_path):
  directory = shutil.copytree(os.path.join(FIXTURES, "mha"), tmp_path / "hf")
  (directory / "model.safetensors").write_bytes(pickle.dumps({"weights": 1}))
  with pytest.raises(UserError, match="is not a readable safetensors file") as e:
    convert.load_hf(str(directory))
  assert "\n" not in str(e.value)
