"""HF LLaMA import/export against logits transformers computed (tests/make_hf_fixtures.py).

Neither torch nor transformers runs here: the fixtures hold random fp32 `LlamaForCausalLM`s saved
with `save_pretrained` and the logits transformers gave for a fixed batch.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxtrain import convert
from jaxtrain import model as model_lib
from jaxtrain.errors import UserError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
NAMES = ("mha", "gqa_sharded", "tied", "llama3_rope", "head_dim")


def fixture(name):
  return os.path.join(FIXTURES, name)


def hf_tensors(directory):
  """{name: array} over every safetensors file of an HF directory."""
  tensors = {}
  for file in sorted(os.listdir(directory)):
    if file.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(directory, file)))
  return tensors


def assert_same_tensors(a_dir, b_dir):
  a, b = hf_tensors(a_dir), hf_tensors(b_dir)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def copy_fixture(name, tmp_path):
  return shutil.copytree(fixture(name), tmp_path / name)


def rewrite_config(directory, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


def rewrite_tensors(directory, edit):
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Numerics against transformers.


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  model, cfg = convert.load_hf(fixture(name))
  reference = np.load(os.path.join(fixture(name), "reference.npz"))
  logits_BTV = np.asarray(model(reference["tokens"]))
  assert logits_BTV.shape == reference["logits"].shape
  assert np.abs(logits_BTV - reference["logits"]).max() <= 1e-4
  assert cfg.param_dtype == "float32"


def test_llama3_fixture_would_catch_missing_rope_scaling():
  """The llama3 parity above means something only if the scaling moves the logits."""
  model, cfg = convert.load_hf(fixture("llama3_rope"))
  assert cfg.rope_scaling_factor == 8.0 and cfg.rope_original_max_seq_len == 16
  unscaled_cfg = dataclasses.replace(cfg, rope_scaling_factor=0.0)
  graphdef = model_lib.params_of(model_lib.abstract_model(unscaled_cfg))[0]
  unscaled = nnx.merge(graphdef, model_lib.params_of(model)[1])
  reference = np.load(os.path.join(fixture("llama3_rope"), "reference.npz"))
  assert np.abs(np.asarray(unscaled(reference["tokens"])) - reference["logits"]).max() > 1e-2


def test_rope_permutation_turns_interleaved_pairs_into_halves():
  """Meta's interleaved rope on original weights == HF/jaxtrain rope on permuted weights."""
  rng = np.random.default_rng(0)
  N, H, D, T = 3, 8, 16, 5
  w_meta = rng.normal(size=(N * H, D)).astype(np.float32)
  x_TD = rng.normal(size=(T, D)).astype(np.float32)
  inv_freq_h = 1.0 / (10000.0 ** (np.arange(0, H, 2) / H))
  angles_Th = np.arange(T)[:, None] * inv_freq_h
  q_TNH = (x_TD @ w_meta.T).reshape(T, N, H)
  pairs = q_TNH[..., 0::2] + 1j * q_TNH[..., 1::2]  # Meta: complex numbers from adjacent pairs.
  rotated = pairs * np.exp(1j * angles_Th)[:, None, :]
  meta_TNH = np.stack([rotated.real, rotated.imag], -1).reshape(T, N, H)

  w_half = convert.permute_interleaved_to_half(w_meta, N)
  q_half_1TNH = (x_TD @ w_half.T).reshape(1, T, N, H)
  ours_TNH = np.asarray(model_lib.apply_rope(q_half_1TNH, np.arange(T)[None],
                                             inv_freq_h.astype(np.float32)))[0]
  order = np.concatenate([np.arange(0, H, 2), np.arange(1, H, 2)])
  np.testing.assert_allclose(ours_TNH, meta_TNH[..., order], atol=1e-5)
  np.testing.assert_array_equal(convert.permute_half_to_interleaved(w_half, N), w_meta)


# ---------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("name", NAMES)
def test_hf_round_trip_gives_identical_tensors(name, tmp_path):
  model, cfg = convert.load_hf(fixture(name))
  files = convert.save_hf(model, cfg, tmp_path)
  assert_same_tensors(fixture(name), tmp_path)
  with open(tmp_path / "config.json") as f:
    exported = json.load(f)
  assert exported["architectures"] == ["LlamaForCausalLM"] and exported["model_type"] == "llama"
  assert exported["torch_dtype"] == "float32"
  assert convert.config_from_hf(exported) == cfg
  assert ("lm_head.weight" in hf_tensors(tmp_path)) == (not cfg.tie_embeddings)
  assert files[0] == "model.safetensors"


def test_save_hf_shards_above_max_shard_bytes_and_removes_stale_files(tmp_path):
  model, cfg = convert.load_hf(fixture("mha"))
  files = convert.save_hf(model, cfg, tmp_path, max_shard_bytes=20_000)
  shards = [f for f in files if f.startswith("model-")]
  n = len(shards)
  assert n > 2 and shards[-1] == f"model-{n:05d}-of-{n:05d}.safetensors"
  with open(tmp_path / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(shards)
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in hf_tensors(tmp_path).values())
  assert_same_tensors(fixture("mha"), tmp_path)
  reloaded, _ = convert.load_hf(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, model_lib.params_of(reloaded)[1],
               model_lib.params_of(model)[1])

  convert.save_hf(model, cfg, tmp_path)  # Unsharded into the same directory: old shards go.
  assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]


def test_save_hf_casts_to_bfloat16_and_says_so(tmp_path):
  model, cfg = convert.load_hf(fixture("gqa_sharded"))
  convert.save_hf(model, cfg, tmp_path, dtype="bfloat16", extra_config={"eos_token_id": 2})
  with open(tmp_path / "config.json") as f:
    exported = json.load(f)
  assert exported["torch_dtype"] == exported["dtype"] == "bfloat16"
  assert exported["eos_token_id"] == 2
  with open(tmp_path / "generation_config.json") as f:
    assert json.load(f)["eos_token_id"] == 2
  assert {str(x.dtype) for x in hf_tensors(tmp_path).values()} == {"bfloat16"}
  bf16_model, bf16_cfg = convert.load_hf(tmp_path, dtype="bfloat16")
  assert bf16_cfg.param_dtype == bf16_cfg.dtype == "bfloat16"
  assert bf16_model.embed.embedding[...].dtype == jax.numpy.bfloat16


def test_workdir_round_trip_gives_identical_tensors(tmp_path):
  src = copy_fixture("tied", tmp_path)
  (src / "tokenizer.json").write_text('{"version": "1.0"}')
  workdir, out = tmp_path / "run", tmp_path / "export"
  message = convert.convert_command(str(src), str(workdir))
  assert "step 0" in message and "tokenizer.json" in message
  assert sorted(os.listdir(workdir / "checkpoints")) == ["0"]
  with open(workdir / "config.json") as f:
    stored = json.load(f)
  assert model_lib.ModelConfig.from_config(stored["model"]) == convert.config_from_hf(
      json.load(open(src / "config.json")))
  assert stored["data"]["tokenizer"] == str(workdir / "tokenizer" / "tokenizer.json")
  assert stored["data"]["seq_len"] <= stored["model"]["max_seq_len"]
  assert (workdir / "tokenizer" / "tokenizer.json").read_text() == '{"version": "1.0"}'

  message = convert.convert_command(str(workdir), str(out))
  assert "step 0" in message
  assert_same_tensors(src, out)
  assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
  with open(out / "config.json") as f:
    exported = json.load(f)
  assert exported["bos_token_id"] == 1 and exported["eos_token_id"] == 2  # From hf_source/.
  assert json.load(open(out / "generation_config.json")) == json.load(
      open(src / "generation_config.json"))

  with pytest.raises(UserError, match="already holds checkpoints"):
    convert.hf_to_workdir(src, workdir)
  with pytest.raises(UserError, match="no step 7"):
    convert.workdir_to_hf(workdir, tmp_path / "other", step=7)


def test_sharded_checkpoint_through_workdir_functions(tmp_path):
  workdir, out = tmp_path / "run", tmp_path / "export"
  info = convert.hf_to_workdir(fixture("gqa_sharded"), workdir)
  assert info["tokenizer_files"] == []
  info = convert.workdir_to_hf(workdir, out, step=0, max_shard_bytes=40_000)
  assert "model.safetensors.index.json" in info["files"]
  assert_same_tensors(fixture("gqa_sharded"), out)


def test_convert_never_overwrites_a_model_and_clears_an_earlier_export(tmp_path):
  """Importing into an HF directory (here: the source itself) would replace its config.json;
  exporting over an earlier export leaves none of its files that this export does not write."""
  src = copy_fixture("tied", tmp_path)
  before = (src / "config.json").read_bytes()
  for target in (src, copy_fixture("mha", tmp_path)):
    with pytest.raises(UserError, match="exists and is not empty"):
      convert.hf_to_workdir(str(src), str(target))
  assert (src / "config.json").read_bytes() == before
  (src / "tokenizer.json").write_text('{"version": "1.0"}')
  with_tokenizer, without = tmp_path / "a", tmp_path / "b"
  convert.hf_to_workdir(str(src), str(with_tokenizer))
  convert.hf_to_workdir(fixture("gqa_sharded"), str(without))
  out = tmp_path / "export"
  convert.workdir_to_hf(str(with_tokenizer), str(out))
  assert {"tokenizer.json", "generation_config.json"} <= set(os.listdir(out))
  shutil.rmtree(without / convert.HF_SOURCE_DIR)  # as trained here: no generation config
  convert.workdir_to_hf(str(without), str(out))
  assert not {"tokenizer.json", "generation_config.json"} & set(os.listdir(out))
  assert_same_tensors(fixture("gqa_sharded"), out)


def test_convert_command_exports_in_the_dtype_asked(tmp_path):
  from jaxtrain import cli  # pylint: disable=import-outside-toplevel
  workdir, out = tmp_path / "run", tmp_path / "export"
  convert.hf_to_workdir(fixture("mha"), str(workdir))
  assert cli.main(["convert", str(workdir), str(out), "--dtype=bfloat16"]) == 0
  tensors = hf_tensors(out)
  reference = hf_tensors(fixture("mha"))
  assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
  name = sorted(reference)[0]
  np.testing.assert_array_equal(tensors[name], reference[name].astype(ml_dtypes.bfloat16))


def test_a_moved_converted_workdir_evaluates_with_its_own_tokenizer(tmp_path):
  from jaxtrain import evaluate  # pylint: disable=import-outside-toplevel
  src = copy_fixture("tied", tmp_path)
  (src / "tokenizer.json").write_text('{"version": "1.0"}')
  convert.hf_to_workdir(str(src), str(tmp_path / "run"))
  moved = shutil.move(tmp_path / "run", tmp_path / "moved")
  # pylint: disable=protected-access
  cfg = evaluate._workdir_config(str(moved))
  assert not os.path.exists(cfg.data.tokenizer)  # config.json names the old place
  evaluate._use_the_run_tokenizer(cfg, str(moved), other_data=False)
  assert cfg.data.tokenizer == str(moved / "tokenizer" / "tokenizer.json")


def test_damaged_files_and_bad_steps_are_one_line_errors(tmp_path, capsys):
  from jaxtrain import cli  # pylint: disable=import-outside-toplevel
  sharded = copy_fixture("gqa_sharded", tmp_path)
  shard = sorted(p for p in os.listdir(sharded) if p.startswith("model-"))[-1]
  os.truncate(sharded / shard, os.path.getsize(sharded / shard) // 2)
  workdir = tmp_path / "run"
  convert.hf_to_workdir(fixture("mha"), str(workdir))
  config = json.load(open(workdir / "config.json"))
  config["model"]["d_ff"] *= 2
  json.dump(config, open(workdir / "config.json", "w"))
  garbled = tmp_path / "garbled"
  garbled.mkdir()
  (garbled / "config.json").write_text('{"model_type": "llama",')
  capsys.readouterr()
  for argv, culprit in [
      (["convert", str(sharded), str(tmp_path / "x")], f"{shard} is not a readable safetensors"),
      (["convert", str(workdir), str(tmp_path / "y")], "step 0 could not be restored"),
      (["convert", str(workdir), str(tmp_path / "z"), "--step=abc"], "--step='abc'"),
      (["convert", str(workdir), str(tmp_path / "z"), "--dtype=bf16"], "--dtype='bf16'"),
      (["generate", f"--workdir={fixture('mha')}", "--prompt-ids=1", "--step=3"],
       "has no checkpoint steps"),
      (["generate", f"--workdir={garbled}", "--prompt-ids=1,2"], "config.json is unreadable")]:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err, (argv, err)


# ---------------------------------------------------------------------------------------------
# Configs.


def test_config_round_trips_through_hf_json():
  for cfg in (model_lib.ModelConfig(),
              model_lib.ModelConfig(n_heads=8, n_kv_heads=2, d_model=256, tie_embeddings=True),
              model_lib.ModelConfig(rope_scaling_factor=32.0, rope_theta=500000.0,
                                    rope_original_max_seq_len=8192, max_seq_len=131072),
              model_lib.ModelConfig(d_model=64, n_heads=4, head_dim=32, norm_eps=1e-6)):
    assert convert.config_from_hf(json.loads(json.dumps(convert.config_to_hf(cfg)))) == cfg


def test_transformers_v4_and_v5_rope_keys_read_alike():
  base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100}
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
  v4 = convert.config_from_hf({**base, "rope_theta": 500000.0,
                               "rope_scaling": {"type": "llama3", **scaling}})
  v5 = convert.config_from_hf({**base, "rope_parameters": {"rope_type": "llama3",
                                                           "rope_theta": 500000.0, **scaling}})
  assert v4 == v5 and v4.rope_theta == 500000.0 and v4.rope_scaling_factor == 8.0
  plain = convert.config_from_hf({**base, "rope_scaling": {"rope_type": "default"}})
  assert plain.rope_scaling_factor == 0.0 and plain.rope_theta == 10000.0


# ---------------------------------------------------------------------------------------------
# Bad inputs: one UserError that names the culprit.


@pytest.mark.parametrize("change, culprit", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type='yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_key_value_heads": 3}, "n_kv_heads=3"),
])
def test_unsupported_config_is_refused_naming_the_key(change, culprit, tmp_path):
  directory = copy_fixture("mha", tmp_path)
  rewrite_config(directory, **change)
  with pytest.raises(UserError, match=culprit.replace("(", r"\(").replace(".", r"\.")):
    convert.load_hf(directory)


def test_missing_tensor_is_named_with_its_file(tmp_path):
  directory = copy_fixture("mha", tmp_path)
  rewrite_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(UserError, match=r"model\.safetensors: tensor "
                     r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
    convert.load_hf(directory)


def test_missing_tensor_of_a_sharded_checkpoint_names_the_index(tmp_path):
  directory = copy_fixture("gqa_sharded", tmp_path)
  index_path = directory / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  del index["weight_map"]["model.norm.weight"]
  index_path.write_text(json.dumps(index))
  with pytest.raises(UserError, match=r"index\.json: tensor model\.norm\.weight is missing"):
    convert.load_hf(directory)
  index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
  index_path.write_text(json.dumps(index))
  with pytest.raises(UserError, match="model-00009-of-00009.safetensors, which does not exist"):
    convert.load_hf(directory)


def test_wrong_shape_is_named_with_its_file(tmp_path):
  directory = copy_fixture("mha", tmp_path)
  name = "model.layers.0.self_attn.k_proj.weight"

  def drop_a_head(tensors):
    tensors[name] = np.ascontiguousarray(tensors[name][:-8])
  rewrite_tensors(directory, drop_a_head)
  with pytest.raises(UserError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn"
                     r"\.k_proj\.weight has shape \(24, 32\), config\.json implies \(32, 32\)"):
    convert.load_hf(directory)


def test_unexpected_tensor_is_named(tmp_path):
  directory = copy_fixture("mha", tmp_path)
  rewrite_tensors(directory, lambda t: t.update(
      {"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32),
       "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}))
  with pytest.raises(UserError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"
                     r":"):
    convert.load_hf(directory)


def test_old_rotary_buffers_are_ignored(tmp_path):
  directory = copy_fixture("mha", tmp_path)
  rewrite_tensors(directory, lambda t: t.update(
      {"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}))
  convert.load_hf(directory)


def test_tied_checkpoint_with_a_different_head_is_refused(tmp_path):
  directory = copy_fixture("tied", tmp_path)
  rewrite_tensors(directory, lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"] + 1.0}))
  with pytest.raises(UserError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
    convert.load_hf(directory)
  rewrite_tensors(directory, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  convert.load_hf(directory)  # A stored copy of the tied head is fine.


def test_directory_without_safetensors_is_refused(tmp_path):
  directory = copy_fixture("mha", tmp_path)
  os.remove(directory / "model.safetensors")
  (directory / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(UserError, match="neither model.safetensors .*found pytorch_model.bin"):
    convert.load_hf(directory)


def test_convert_command_refuses_unknown_sources(tmp_path):
  with pytest.raises(UserError, match="is not a directory"):
    convert.convert_command(str(tmp_path / "nope"), str(tmp_path / "out"))
  with pytest.raises(UserError, match="neither an HF LLaMA directory"):
    convert.convert_command(str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(UserError, match="direction='sideways'"):
    convert.convert_command(fixture("mha"), str(tmp_path / "out"), direction="sideways")


def test_save_hf_refuses_params_that_do_not_fit_the_config(tmp_path):
  model, cfg = convert.load_hf(fixture("mha"))
  _, params = model_lib.params_of(model)
  params["blocks"]["mlp"]["w_up"] = params["blocks"]["mlp"]["w_up"][:, :, :8]
  with pytest.raises(UserError, match="param blocks/mlp/w_up has shape"):
    convert.save_hf(params, cfg, tmp_path)


def test_convert_imports_neither_torch_nor_transformers():
  code = ("import sys, jaxtrain.convert; "
          "sys.exit(bool({'torch', 'transformers'} & set(sys.modules)))")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
