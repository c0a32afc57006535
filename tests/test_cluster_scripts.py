"""The cluster launch scripts, run with a stand-in for the python they start."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_script_hands_a_sigterm_to_torchrun(tmp_path):
    """A SIGTERM sent to `bash scripts/cluster/torchrun.sh` (kill, timeout, a container's PID 1, SLURM's
    --signal=B:) reaches torchrun, which passes it on to the fit: without exec, bash exited and left it running."""
    (tmp_path / "scripts" / "cluster").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "cluster" / "torchrun.sh", tmp_path / "scripts" / "cluster")
    stand_in = tmp_path / ".venv" / "bin" / "python"  # what the script starts: here, a loop that notes a SIGTERM
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text(
        '#!/bin/bash\ntrap \'echo "$@" > "$HERE/terminated"; exit 0\' TERM\ntouch "$HERE/started"\n'
        "while true; do sleep 0.05; done\n"
    )
    stand_in.chmod(0o755)
    env = {**os.environ, "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "HERE": str(tmp_path)}
    script = subprocess.Popen(["bash", "scripts/cluster/torchrun.sh", "seed=3"], cwd=tmp_path, env=env,
                              start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        script.send_signal(signal.SIGTERM)
        script.wait(timeout=30)
        deadline = time.monotonic() + 5
        while not (tmp_path / "terminated").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        argv = (tmp_path / "terminated").read_text().split()
        assert argv[:2] == ["-m", "torch.distributed.run"] and argv[-1] == "seed=3"
    finally:
        try:
            os.killpg(script.pid, signal.SIGKILL)  # the stand-in, where bash left it running
        except ProcessLookupError:
            pass
