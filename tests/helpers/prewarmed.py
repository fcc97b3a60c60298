"""`run(argv, ...)`: what `subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...)` returns, from a
child forked off a server process that has already imported torch, diffusers and `common`.

A fresh interpreter spends ~4-6 s of CPU importing those (torch, and diffusers pulling in torch._dynamo, peft,
transformers and scipy.stats) before a test's 2-iteration run starts; the suite starts a few hundred scripts. The
server imports and never runs a torch op (no OpenMP pool exists to be inherited), so each child starts where a fresh
`python script.py` would be once its imports are done: its own process, `__main__` run from the file, its own cwd,
environment, argv, stdout / stderr, exit code, atexit handlers. Where a fresh interpreter would differ - an
environment variable read at import time (thread counts, the hub's offline switch and cache paths, PYTHONPATH)
differs from the server's - `run` starts a real subprocess instead. Tests that signal a process or start several
(torchrun) keep `subprocess`.

    python -m tests.helpers.prewarmed      # the server (started by `run`; reads one JSON request per line)
"""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# prefixes of environment variables read when a library is imported (libgomp's thread count, huggingface_hub's
# constants, sys.path), which a child of the server would not see change: a request that changes one runs as a real
# subprocess
IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_",
               "CUDA_", "PYTHON", "HOME", "XDG_")
SERVER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # the tests' usual ENV
_server = None


def _child(req):
    """In the forked child: become `python {argv}` and exit with its code (never returns)."""
    import atexit
    import runpy
    import traceback

    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, fd)
            os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # not the server's request pipe
        signal.signal(signal.SIGINT, signal.default_int_handler)
        argv = req["argv"]
        if argv[0] == "-m":  # python -m module args: sys.path[0] is the cwd
            sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
            sys.modules.pop(argv[1], None)  # run fresh as __main__, without runpy's "found in sys.modules" warning
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:  # python script args: sys.path[0] is the script's folder
            script = os.path.join(os.getcwd(), argv[0])
            sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:  # as the interpreter does: None -> 0, an int, anything else printed -> 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def serve():
    import common.reward_models  # noqa: F401  what every method script imports
    import common.run  # noqa: F401
    import common.tools.hub  # noqa: F401
    import common.world  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


def _start():
    global _server
    if _server is None or _server.poll() is not None:
        # unbuffered: a buffered reader could take the second reply line in with the first, and select() would
        # then wait for bytes already read
        _server = subprocess.Popen([sys.executable, "-m", "tests.helpers.prewarmed"], cwd=ROOT, env=SERVER_ENV,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    return _server


def _read(server, timeout):
    if timeout is not None and not select.select([server.stdout], [], [], timeout)[0]:
        return None
    line = server.stdout.readline()  # byte by byte from the raw pipe: never past the line
    if not line:
        raise RuntimeError("the prewarmed server died")
    return json.loads(line)


def run(argv, cwd=ROOT, env=None, timeout=None):
    """-> subprocess.CompletedProcess of `python {argv}` (stdout / stderr as text); subprocess.TimeoutExpired after
    `timeout` s (the child is killed)."""
    argv, env = [str(a) for a in argv], {k: str(v) for k, v in (os.environ if env is None else env).items()}
    if any(k.startswith(IMPORT_TIME) and env.get(k) != SERVER_ENV.get(k) for k in {*env, *SERVER_ENV}):
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=timeout)
    server = _start()
    with tempfile.TemporaryDirectory() as d:
        req = dict(argv=argv, cwd=str(cwd), env=env, stdout=f"{d}/stdout", stderr=f"{d}/stderr")
        data = memoryview((json.dumps(req) + "\n").encode())
        while data:
            data = data[os.write(server.stdin.fileno(), data):]
        pid = _read(server, None)["pid"]
        done = _read(server, timeout)
        if done is None:
            os.kill(pid, signal.SIGKILL)
            _read(server, None)
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        out, err = (Path(d, f).read_text(errors="replace") for f in ("stdout", "stderr"))
    return subprocess.CompletedProcess([sys.executable, *argv], done["returncode"], out, err)


if __name__ == "__main__":
    serve()
