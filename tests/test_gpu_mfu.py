"""benchmarks/gpu_mfu.py, the prepared GPU measurement, dry-run on CPU so it works when a GPU is
lent: its numbers follow from the step it times, failures come back as rows, bad input stops it
before any device is touched."""

import importlib.util
import json
import math
import os
import types

import pytest

from jaxtrain.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_mfu", os.path.join(ROOT, "benchmarks",
                                                                       "gpu_mfu.py"))
gpu_mfu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_mfu)

TINY = ["--hardware=cpu", "--set", "model.n_layers=1", "--set", "data.seq_len=32",
        "--set", "train.batch_size_per_device=2"]


@pytest.mark.parametrize("kind, preset", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-40GB", "a100"),
    ("NVIDIA A40", "a40"), ("Tesla T4", None)])
def test_the_preset_follows_the_device_kind(kind, preset):
  assert gpu_mfu.hardware_of(types.SimpleNamespace(platform="gpu", device_kind=kind)) == preset
  assert gpu_mfu.hardware_of(types.SimpleNamespace(platform="cpu", device_kind="cpu")) == "cpu"


def test_a_bad_size_or_override_stops_before_any_device_work(capsys):
  assert gpu_mfu.main(["--sizes=125m,2b"]) == 2
  assert "unknown size '2b'" in capsys.readouterr().err
  args = gpu_mfu.parse_args(["--set", "model.no_such_key=1"])
  with pytest.raises(UserError, match="no_such_key"):
    gpu_mfu.check_configs(args, ["125m"], ["adamw"])


def test_dry_run_on_cpu_reports_the_step_it_timed(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")  # The worker: one CPU device, as on a one-GPU machine.
  out = tmp_path / "r.jsonl"
  rc = gpu_mfu.main(["--sizes=toy", "--optimizers=adamw,muon", "--steps=2", "--rounds=2",
                     f"--json={out}", *TINY])
  assert rc == 0, capsys.readouterr()
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["size"], r["optimizer"]) for r in rows] == [("toy", "adamw"), ("toy", "muon")]
  for r in rows:
    assert (r["hardware"], r["n_layers"], r["batch_size"], r["seq_len"]) == ("cpu", 1, 2, 32)
    assert len(r["step_seconds"]) == 2 and r["median_step_seconds"] > 0
    tokens_per_sec = 2 * 32 / r["median_step_seconds"]
    assert r["tokens_per_sec"] == pytest.approx(tokens_per_sec)
    assert r["tflops_per_device"] == pytest.approx(tokens_per_sec * r["flops_per_token"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops_per_device"] / r["peak_tflops"])
    assert r["peak_source"].startswith("measured") and r["peak_memory_gib"] is None
    # Six steps on one batch: the loss must have moved down from about ln(vocab).
    assert math.isclose(r["first_loss"], math.log(4096), rel_tol=0.05)
    assert r["last_loss"] < r["first_loss"]
  table = capsys.readouterr().out
  assert "| toy | adamw | " in table and "| toy | muon | " in table

  # A worker that fails (here the config's heads do not divide the width) is a row, not a crash.
  rc = gpu_mfu.main(["--sizes=toy", "--steps=1", "--rounds=1", *TINY,
                     "--set", "model.n_heads=7"])
  assert rc == 1
  assert "| toy | adamw | failed: " in capsys.readouterr().out


def test_the_gpu_preset_runs_on_cpu_in_bf16(tmp_path, monkeypatch):
  # The h200 preset (bf16 compute, cuDNN attention falling back to XLA's here) on CPU: XLA:CPU
  # has no unfused BF16 x BF16 = F32 dot, so this failed before ops.einsum.
  monkeypatch.setenv("XLA_FLAGS", "")
  out = tmp_path / "r.jsonl"
  rc = gpu_mfu.main(["--sizes=toy", "--hardware=h200", "--steps=1", "--rounds=1", f"--json={out}",
                     "--set", "model.n_layers=1", "--set", "data.seq_len=64",
                     "--set", "train.batch_size_per_device=2"])
  assert rc == 0
  (r,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert (r["hardware"], r["dtype"], r["attention"], r["remat"]) == ("h200", "bfloat16", "cudnn",
                                                                     "dots")
  assert math.isclose(r["first_loss"], math.log(4096), rel_tol=0.05)
  assert r["last_loss"] < r["first_loss"]
