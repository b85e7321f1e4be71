"""Every python snippet in README.md runs as written.

Snippets whose first line is `# torchrun --standalone --nproc-per-node N name.py`
run under torchrun with N gloo processes; the others run as plain scripts
(from a temporary directory, so only the installed package is used).
"""

from __future__ import annotations

import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from train_helpers import ROOT, run

BLOCKS = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_snippet_runs(tmp_path, i):
    code = BLOCKS[i]
    script = tmp_path / "snippet.py"
    script.write_text(code)
    launch = re.match(r"# torchrun --standalone --nproc-per-node (\d+) ", code)
    if launch:
        args = [TORCHRUN, "--standalone", f"--nproc-per-node={launch.group(1)}", str(script)]
    else:
        args = [sys.executable, str(script)]
    run(args, timeout=300, cwd=tmp_path)


def test_readme_has_the_snippets_this_file_checks():
    assert len(BLOCKS) >= 8 and any("GroupQueryAttention" in b for b in BLOCKS) and any("cp_group" in b for b in BLOCKS)
