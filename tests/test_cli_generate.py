"""`jaxinfer generate` from a shell: what it prints."""

from __future__ import annotations

from jaxinfer.cli import main
from tests.checkpoints import IM_START


def _run(capsys, *argv: str) -> str:
    assert main(["generate", *argv]) == 0
    return capsys.readouterr().out


def test_chat_prints_the_reply_and_the_template_only_when_asked(tiny_llama, capsys):
    argv = ("--model", str(tiny_llama), "--prompt", "hello there", "--chat", "--max-tokens", "4")
    plain = _run(capsys, *argv)
    header, *reply, footer = plain.rstrip("\n").split("\n")
    assert header == "--- prompt: 'hello there'"
    assert footer.startswith("--- 4 tokens")
    assert IM_START not in plain  # the chat template's markup stays out of the answer

    shown = _run(capsys, *argv, "--show-prompt")
    rendered = shown.split("--- rendered prompt:\n", 1)[1].split("\n--- reply:\n", 1)
    assert rendered[0].startswith(f"<|bos|>{IM_START}user\nhello there")
    assert rendered[1].rstrip("\n").split("\n")[:-1] == reply  # the same greedy reply
