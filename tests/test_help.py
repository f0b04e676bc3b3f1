"""``--help`` in words a newcomer reads: values named by metavar, no Python types, names never cut
at their hyphens, and the meanings, search order and exit codes the issue asked for."""

import re

import pytest
from typer.testing import CliRunner

from vitembed.cli import app
from vitembed.preprocess_config import INTERPOLATIONS

COMMANDS = ("encode", "inspect", "models", "verify", "show", "export")


def help_text(*args: str, width: int = 80) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="vitembed", terminal_width=width, env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("width", [80, 100])
def test_help_has_no_python_types_and_no_names_cut_at_hyphens(command, width):
    text = help_text(command, width=width)
    assert not re.search(r"<[a-z]+[\[>]|list\[|\brange\b|<=x|x>=|\{[A-Za-z_]+\}", text), text
    assert not re.search(r"\w-\n", text), text  # vit-\nbase-patch16 or size/crop-\npct
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: vitembed {command} [OPTIONS]") and "{" not in usage, usage
    assert max(len(line) for line in text.splitlines()) <= width


def test_encode_help_says_what_the_options_mean():
    text = " ".join(help_text("encode", width=100).split())
    for words in ("final LayerNorm", "last_hidden_state", "--layer 12 of a 12-block model is not 'last'",
                  "squash = resize the whole image", "shortest = shorter side", "Hugging Face repository id",
                  "$VITEMBED_WEIGHTS, ./weights/NAME/, the Hugging Face cache, then the Hub", "HF_HUB_OFFLINE=1",
                  "--out DIR", "--layer last|N|embeddings", "--pool none|cls|mean|patch|head", "--log-every SECONDS",
                  "130 interrupted", "143 terminated", "--allow-truncated Decode", "--overwrite Encode"):
        assert words in text, words
    assert "Interpolation" not in text and ", ".join(INTERPOLATIONS) in text
    assert "--no-overwrite" not in text and "[default: 0;" not in text  # plain flags; no ranges
    assert re.search(r"\b0 +every input encoded", text) and re.search(r"\b1 +some inputs failed", text)
    assert re.search(r"\b2 +usage or setup error", text)


def test_every_command_is_listed_with_a_whole_sentence():
    text = help_text(width=80)
    for command in COMMANDS:
        line = next(line for line in text.splitlines() if line.strip().startswith(command + " "))
        assert not line.endswith("..."), line
    assert "vitembed encode photos/ --out emb/ --weights random" in text


def test_a_bad_choice_is_one_error_line_like_any_bad_value(tmp_path):
    """New-user report: --pool avg gave a usage block and "Value error, 'avg' is not one of"."""
    for args, words in ((["encode", str(tmp_path), "--out", str(tmp_path / "o"), "--pool", "avg"],
                         "error: --pool 'avg': expected one of none, cls, mean, patch, head"),
                        (["encode", str(tmp_path), "--out", str(tmp_path / "o"), "--dtype", "fp16"],
                         "error: --dtype 'fp16': expected one of auto, float32, bfloat16, float16"),
                        (["export", str(tmp_path), str(tmp_path / "v.npy"), "--pool", "max"], "error: --pool 'max'")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and result.output.startswith(words) and "Usage:" not in result.output, result.output


def test_verify_help_does_not_offer_random_weights():
    text = " ".join(help_text("verify", width=100).split())
    assert "--weights DIR|FILE " in text and "not 'random'" in text


def test_negative_or_infinite_log_every_is_a_usage_error(tmp_path):
    for value in ("-1", "inf", "nan", "1e10"):  # 1e10: an OverflowError traceback in the progress thread
        result = CliRunner().invoke(app, ["encode", str(tmp_path), "--out", str(tmp_path / "o"), "--log-every", value])
        assert result.exit_code == 2, (value, result.output)
        assert "--log-every" in result.output
