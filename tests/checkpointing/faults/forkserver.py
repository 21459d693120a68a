"""A process that pays the torch + torchtitan import once and forks a fresh child per job.

Starting a Python that imports torch and torchtitan costs ~4 s here; forking one that already
has costs milliseconds. The server runs no torch op and its math libraries are held to one
thread, so it is single-threaded whenever it forks (checked before every fork). It reads one
JSON request per line on stdin, forks, and answers with how the child ended:
``{"exitcode": int | None, "signal": int | None}``. Children write tracebacks to the server's
stderr, which the client keeps in a file for failure messages.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@dataclass
class Outcome:
    exitcode: int | None
    signal: int | None
    log: str

    def describe(self) -> str:
        how = f"signal {self.signal}" if self.signal is not None else f"exit code {self.exitcode}"
        return f"child ended with {how}; its output:\n{self.log[-4000:]}"


class ForkServer:
    """Client side: ``run(job, **kwargs)`` waits; ``start`` + ``poll`` let the caller work meanwhile."""

    def __init__(self, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self._log = tempfile.NamedTemporaryFile(prefix="forkserver-", suffix=".log", delete=False)
        # One-thread math libraries: OpenBLAS and OpenMP would otherwise start thread pools at
        # import, and a child forked from a multi-threaded process can hang in its first
        # parallel region. The children's tensors are tiny; one thread costs nothing.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.checkpointing.faults.forkserver"],
            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True, text=True, bufsize=1,
        )
        line = self._readline(120.0)
        if line.strip() != "ready":
            raise RuntimeError(f"fork server did not start: {line!r}\n{self.log_text()}")
        self._log_mark = 0

    def log_text(self) -> str:
        with open(self._log.name, errors="replace") as f:
            return f.read()

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"fork server gave no answer within {timeout:.0f} s\n{self.log_text()[-4000:]}")
        return self.proc.stdout.readline()

    def start(self, job: str, **kwargs) -> None:
        self._log_mark = len(self.log_text())
        self.proc.stdin.write(json.dumps({"job": job, "kwargs": kwargs}) + "\n")
        self.proc.stdin.flush()

    def poll(self) -> Outcome | None:
        """The outcome if the child has ended, else None (never blocks)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], 0)
        return self._outcome(self.proc.stdout.readline()) if ready else None

    def wait(self) -> Outcome:
        return self._outcome(self._readline(self.timeout_s))

    def _outcome(self, line: str) -> Outcome:
        if not line:
            raise RuntimeError(f"fork server died\n{self.log_text()[-4000:]}")
        answer = json.loads(line)
        return Outcome(answer["exitcode"], answer["signal"], self.log_text()[self._log_mark:])

    def run(self, job: str, **kwargs) -> Outcome:
        self.start(job, **kwargs)
        return self.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                os.killpg(self.proc.pid, 9)  # the server's own session: its children only
                self.proc.wait()
        os.unlink(self._log.name)


def _serve() -> None:
    import torch  # noqa: F401  (imported before forking: that is the point)
    import torchtitan
    import torchtitan.components.checkpoint  # noqa: F401

    import checkpointing  # noqa: F401
    from tests.checkpointing.faults import child_jobs

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        threads = os.listdir("/proc/self/task")
        if len(threads) != 1:  # forking a multi-threaded process can deadlock the child
            raise RuntimeError(f"fork server has {len(threads)} OS threads; it must fork single-threaded")
        pid = os.fork()
        if pid == 0:
            os.dup2(2, 1)  # the protocol owns stdout: a child's prints go to the log
            code = 0
            try:
                getattr(child_jobs, request["job"])(**request["kwargs"])
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        answer = {
            "exitcode": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        }
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _serve()
