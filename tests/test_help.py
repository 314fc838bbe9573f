"""The CLI explains itself: `jaxtrain --help` and `jaxtrain VERB --help` for every verb (from the
verb's own docstring), and a mistyped verb, flag or config key names the one that was meant."""

import os
import re
import subprocess
import sys

import pytest

from jaxtrain import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERBS = sorted(cli.COMMANDS)


def test_top_level_help_lists_every_verb_and_exits_0(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for verb in VERBS:
    assert re.search(rf"^  {re.escape(verb)} ", out, re.M), (verb, out)
  assert "exit codes" in out and "docs/configuration.md" in out


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_verb_answers_help_with_exit_0_and_does_no_work(verb, flag, capsys):
  # Help must win over everything else on the line, so it cannot start a run by accident.
  assert cli.main([verb, "--config=configs/nope.py", flag]) == 0
  captured = capsys.readouterr()
  assert captured.out.strip() == cli.verb_help(verb) and not captured.err


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_help_has_usage_flags_examples_and_exit_codes(verb, capsys):
  text = cli.verb_help(verb)
  for part in ("usage: jaxtrain", "examples:", "exit codes"):
    assert part in text, f"jaxtrain {verb} --help lacks {part!r}: add it to cmd_{verb}'s docstring"
  examples = text.split("examples:", 1)[1]
  assert f"jaxtrain {verb}" in examples
  # Every flag the verb accepts (its Args(...) list, as the unknown-flag error reports it) is
  # documented in its help; --config is accepted everywhere, documented where it means something.
  assert cli.main([verb, "--zzz-not-a-flag"]) == 2
  err = capsys.readouterr().err
  takes = re.search(r"this command takes: ([^)]*)\)", err)
  assert takes, err
  for flag in set(takes.group(1).split(", ")) - {"--config"}:
    assert flag in text or flag.replace("_", "-") in text, f"{flag} missing from {verb} --help"


def test_help_verb_is_the_same_as_verb_dash_dash_help(capsys):
  assert cli.main(["help", "eval"]) == 0
  assert capsys.readouterr().out.strip() == cli.verb_help("eval")


def test_installed_program_answers_help_with_exit_0():
  for args in (["--help"], ["train", "--help"]):
    result = subprocess.run([sys.executable, "-m", "jaxtrain.cli", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: jaxtrain" in result.stdout


@pytest.mark.parametrize("args, hint", [
    (["trian"], "did you mean train?"),
    (["evl", "--workdir=x"], "did you mean eval?"),
    (["help", "comapre"], "did you mean compare?"),
    (["eval", "--wrokdir=runs/x"], "did you mean --workdir?"),
    (["info", "--routnig"], "did you mean --routing?"),
    (["train", "--hlep"], "did you mean --help?"),
    (["data", "prepar"], "did you mean prepare?"),
    (["info", "--config.train.stpes=3"], "did you mean --config.train.steps?"),
    (["info", "--config.optimizer.muon.ns_step=3"],
     "did you mean --config.optimizer.muon.ns_steps?"),
])
def test_a_mistyped_verb_flag_or_key_suggests_the_closest_one_with_exit_2(args, hint, capsys):
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert hint in err and len(err.splitlines()) == 1, err


def test_a_word_close_to_nothing_gets_no_suggestion(capsys):
  assert cli.main(["xqzv"]) == 2
  err = capsys.readouterr().err
  assert "did you mean" not in err and "commands: " in err
