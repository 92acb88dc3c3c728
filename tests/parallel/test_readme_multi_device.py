"""The README's multi-device guide runs as written, in a fresh process (its XLA_FLAGS line must
come before JAX starts), on a tiny checkpoint whose heads, like SmolLM2's 9 and 3, divide by 3:
6 heads of 8 and 3 kv heads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.checkpoints import tiny_checkpoint
from tests.test_readme import guide_blocks

ROOT = Path(__file__).parents[2]
MODEL_LINE = "str(default_model_path())"


def test_multi_device_guide_runs(tmp_path):
    blocks = [code for lang, code in guide_blocks()["On several devices"] if lang == "python"]
    assert len(blocks) == 1 and MODEL_LINE in blocks[0]
    model = tiny_checkpoint(
        "llama", hidden_size=48, num_attention_heads=6, num_kv_heads=3, head_dim=8
    )
    script = tmp_path / "guide.py"
    script.write_text(blocks[0].replace(MODEL_LINE, repr(str(model))))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the guide sets it
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text_line, spec_line = done.stdout.strip().splitlines()[-2:]
    assert text_line.startswith("'") and len(text_line) > 2  # repr of the generated text
    assert spec_line == "P(None, 'model')"
