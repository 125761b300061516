"""The one-time conversion of the bundled SmolLM2 GGUF file, with and without reading the file once
(backbones._gguf_read_once), alternating, each in its own process and empty cache; then whether the
two wrote the same files.

    .venv/bin/python bench/gguf_conversion.py
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

# Each conversion in its own process, into its own empty cache; "old" disables the read-once block.
code = r"""
import contextlib, sys, time
import mbc.network.backbones as b
if sys.argv[1] == "old":
    b._gguf_read_once = contextlib.nullcontext
t = time.perf_counter(); b.bundled_smollm2_folder(); print(f"{sys.argv[1]} conversion {time.perf_counter() - t:.1f} s")
"""
folders = {}
for mode in ("old", "new", "old", "new"):
    cache = tempfile.mkdtemp()
    environment = {**os.environ, "MBC_CACHE": cache}
    subprocess.run([sys.executable, "-c", code, mode], env=environment, check=True, stderr=subprocess.DEVNULL)
    folders[mode] = Path(cache) / "models" / "smollm2-135m-instruct"
a, b = (load_file(folders[m] / "model.safetensors") for m in ("old", "new"))
print("same tensors:", a.keys() == b.keys() and all((a[k] == b[k]).all().item() for k in a))
for name in sorted(p.name for p in folders["old"].iterdir()):
    print(name, (folders["old"] / name).read_bytes() == (folders["new"] / name).read_bytes())
