"""Start ``llm/serve.sh`` as a child process and wait for its ``ready:`` line (for the tests and the benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@dataclass
class ServeScript:
    """A running ``llm/serve.sh``: its process (leader of its own session), base URL and every output line so far."""

    proc: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)
    startup_s: float = 0.0

    def kill(self) -> None:
        """SIGKILL the script's whole process group (the server with it), if it still runs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _default_sigint() -> None:
    # A shell starts background commands with SIGINT ignored when job control is off (`pytest ... &` in a script,
    # nohup), and bash cannot trap a signal that was ignored when it started: give serve.sh the default back, as a
    # terminal's Ctrl-C would find it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_serve_script(
    script: Path, env: dict[str, str], *, timeout_s: float | None, log_path: Path | None = None, tail: int = 60
) -> ServeScript:
    """Run ``bash script`` with ``env`` in its own session and return once it prints ``ready: URL``.

    Its output is kept in ``lines`` (and copied to ``log_path`` when given). Raises RuntimeError with the last
    ``tail`` lines when it exits or ``timeout_s`` passes first (the process group is killed then).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=script.parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        log: IO[str] | None = log_path.open("w") if log_path is not None else None
        try:
            for line in proc.stdout:
                lines.append(line)
                if log is not None:
                    log.write(line)
                    log.flush()
                if line.startswith("ready: "):
                    ready.set()
        finally:
            if log is not None:
                log.close()

    threading.Thread(target=pump, daemon=True).start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not ready.is_set() and proc.poll() is None and (deadline is None or time.monotonic() < deadline):
        ready.wait(0.5)
    served = ServeScript(proc=proc, url="", lines=lines, startup_s=time.perf_counter() - start)
    if not ready.is_set():
        served.kill()
        raise RuntimeError(f"{script} did not report ready:\n" + "".join(lines[-tail:]))
    served.url = next(line for line in lines if line.startswith("ready: ")).split()[1]
    return served
