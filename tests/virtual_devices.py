"""Run a test module as a script in a fresh Python with N virtual CPU devices.

JAX reads ``XLA_FLAGS`` once per process, so a test that needs 8 or 32 devices runs its
module as ``__main__`` in a subprocess and reads back the JSON object it prints last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_virtual_devices(script: str, devices: int) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        # The script imports ``tests.*`` like any test module does under pytest.
        "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
    }
    done = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
