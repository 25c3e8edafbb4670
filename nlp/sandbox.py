"""Run generated code against tests in a sandboxed subprocess (execution-based evaluation,
as HumanEval / MBPP; Chen et al., 2021).

The program runs in a fresh ``python -I`` process inside its own temporary folder, in a
new session (the whole process group is killed at the time limit), with CPU, memory,
file-size and process-count limits, and under a ``sys.addaudithook`` guard installed
before the code (audit hooks cannot be removed) that refuses: opening files for writing
outside the folder, deleting or renaming files outside it, sockets, subprocesses, and
``os.system`` / ``exec`` / ``fork``. It is a guard against accidents of generated code,
not a security boundary against a determined attacker; use a container for that.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUARD = r"""
import os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
_BLOCKED = ("socket.", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
            "os.fork", "os.forkpty", "os.kill", "pty.spawn", "ctypes.")
def _inside(path):
    try:
        real = _os.path.realpath(_os.fsdecode(path))
    except Exception:
        return True  # file descriptors
    return real == _ROOT or real.startswith(_ROOT + _os.sep)
def _guard(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and isinstance(args[0], (str, bytes, _os.PathLike)):
        mode, flags = args[1] or "r", args[2] if len(args) > 2 else 0
        writes = any(c in str(mode) for c in "wax+") or (
            isinstance(flags, int) and flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT))
        if writes and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox folder")
    if event in ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "shutil.rmtree",
                 "os.chmod", "os.truncate", "os.symlink", "os.link"):
        if args and not _inside(args[0]):
            raise PermissionError(f"sandbox: {event} {args[0]!r} outside the sandbox folder")
_sys.addaudithook(_guard)
del _guard
"""


@dataclass(frozen=True)
class RunResult:
    status: str  # "passed", "failed" or "timeout"
    returncode: int | None
    output: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(cpu_s: int, memory_mb: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        memory = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))

    return apply


def run_program(code: str, timeout: float = 5.0, memory_mb: int = 1024) -> RunResult:
    """Run ``code`` (a whole program: solution + tests) in the sandbox; exit status 0 passes."""
    with tempfile.TemporaryDirectory(prefix="omnipeft-sandbox-") as folder:
        script = Path(folder) / "program.py"
        script.write_text(GUARD + "\n" + code, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "HOME": folder}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(script)],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_limits(int(timeout) + 1, memory_mb),
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the whole session, children included
            out, _ = proc.communicate()
            return RunResult("timeout", None, out.decode(errors="replace")[-2000:])
        status = "passed" if proc.returncode == 0 else "failed"
        return RunResult(status, proc.returncode, out.decode(errors="replace")[-2000:])


def check_completion(
    prompt: str, completion: str, test: str, entry_point: str | None, timeout: float = 5.0
) -> RunResult:
    """HumanEval's program: prompt + completion + test + ``check(entry_point)``."""
    program = f"{prompt}{completion}\n\n{test}\n"
    if entry_point:
        program += f"\ncheck({entry_point})\n"
    return run_program(program, timeout)


def check_unit_tests(reference_code: str, generated_tests: str, timeout: float = 5.0) -> RunResult:
    """Unit-test generation: the generated tests run, and pass, on the reference code."""
    return run_program(f"{reference_code}\n\n{generated_tests}\n", timeout)
