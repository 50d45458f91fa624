"""The guides' examples run: every block marked `<!-- tested -->` in docs/*.md, in order, per guide."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_colour_dataset

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = ["cli.md", "python-api.md", "trainer.md", "bring-your-own-vlm.md"]
BLOCK = re.compile(r"<!-- tested -->\n```(python|bash)\n(.*?)```", re.DOTALL)


def marked_blocks(guide: str) -> list[tuple[str, str]]:
    return BLOCK.findall((DOCS / guide).read_text())


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_examples_run(guide, tiny_llava_dir, tmp_path):
    blocks = marked_blocks(guide)
    assert blocks, f"docs/{guide} has no tested example"
    data = tmp_path / "data"
    write_colour_dataset(data)
    env = {
        **os.environ,
        "HYDRA_MODEL": str(tiny_llava_dir),
        "HYDRA_DATA": str(data),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    languages = {language for language, _ in blocks}
    assert len(languages) == 1, "a guide's tested blocks share one language (python blocks share one namespace)"
    source = "\n".join(code for _, code in blocks)
    command = [sys.executable, "-c", source] if languages == {"python"} else ["bash", "-euo", "pipefail", "-c", source]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"docs/{guide} example failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
