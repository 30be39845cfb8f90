"""`megalm generate`: streamed text, seeds, prompts files, incremental decoding of split characters, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megalm.data.tokenizer import load_tokenizer
from megalm.inference.generate import Sampling, generate
from megalm.inference.load import find_tokenizer, load_model
from megalm.inference.stream import IncrementalDecoder
from tests.helpers import REPO, subprocess_env


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
def test_incremental_decoding_rebuilds_multibyte_text(name):
    tok = load_tokenizer(name)
    text = "Größe 東京 naïve 🙂 café, ünïcödé!\n"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # half characters are held back, never printed
    assert sum(1 for p in pieces if p) < len(ids)  # ... so some tokens print nothing on their own


def test_decoder_keeps_the_space_after_a_prompt():
    tok = load_tokenizer("gpt2")
    prompt, rest = tok.encode("Hello"), tok.encode(" world")
    decoder = IncrementalDecoder(tok, context=prompt)
    assert "".join(decoder.push([i]) for i in rest) + decoder.flush() == " world"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from megalm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", *args, "--device", "cpu"])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_generate_streams_greedy_text_of_the_model(gpt2_checkpoint, capsys):
    path, _ = gpt2_checkpoint
    code, out, err = run_cli(capsys, "--checkpoint", str(path), "--prompt", "the king", "--temperature", "0",
                             "--max-new-tokens", "5")  # fmt: skip
    assert code == 0 and "5 tokens generated for 1 prompt(s)" in err
    loaded = load_model(path, "cpu")
    tok = find_tokenizer(loaded.cfg, loaded.path)
    gen = generate(loaded.model, tok.encode("the king"), Sampling(max_new_tokens=5, temperature=0.0))
    assert out == "the king" + tok.decode(gen.tokens) + "\n"


def test_seeded_sampling_repeats_and_prompts_file(gpt2_checkpoint, tmp_path, capsys):
    path = str(gpt2_checkpoint[0])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king\n\nfair lady speak\n")

    def args(seed: int) -> tuple[str, ...]:
        return ("--checkpoint", path, "--prompts-file", str(prompts), "--seed", str(seed), "--top-k", "10",
                "--top-p", "0.9", "--temperature", "1.5", "--max-new-tokens", "30")  # fmt: skip

    code, first, err = run_cli(capsys, *args(3))
    assert code == 0 and "for 2 prompt(s)" in err
    assert first.startswith("the king") and "\nfair lady speak" in first
    assert "model.seq_len=16" in err  # "fair lady speak" + 30 tokens would exceed the context: stopped, said so
    assert run_cli(capsys, *args(3))[1] == first
    assert run_cli(capsys, *args(4))[1] != first


@pytest.mark.parametrize(
    "args, message",
    [(("--temperature", "-1", "--prompt", "a"), "--temperature -1"), ((), "nothing to generate"),
     (("--prompt", "the king the queen speak"), "the prompt has 24 tokens"),
     (("--prompt", "a", "--prompts-file", "/nonexistent/p.txt"), "--prompts-file /nonexistent/p.txt")],
)  # fmt: skip
def test_bad_generate_input_is_one_line(gpt2_checkpoint, capsys, args, message):
    code, out, err = run_cli(capsys, "--checkpoint", str(gpt2_checkpoint[0]), *args)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_generate_command_stdout_holds_only_the_text(gpt2_checkpoint):
    """As a real command: nothing but the prompt and its continuation on stdout (logs go to stderr)."""
    cmd = [sys.executable, "-c", "from megalm.cli import main; main()", "generate", "--checkpoint",
           str(gpt2_checkpoint[0]), "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the") and len(result.stdout) == len("the") + 4 + 1  # 4 chars and a newline
    assert "tokens generated" in result.stderr
