"""In-process version of a method script's argument checks (what its __main__ runs before loading anything):
fast enough to test every bad flag without starting a Python process per case."""

import contextlib
import importlib
import io
import os

from common import utils


def check_flags(method, argv, world_size=1):
    """-> (exit code, stderr lines) of `python {method}.py {argv}` as run by `world_size` processes."""
    mod = importlib.import_module(method)
    err, old = io.StringIO(), os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # as torchrun sets it; some method checks read it
    try:
        with contextlib.redirect_stderr(err):
            args = utils.parse_args(mod.Args, argv)
            if hasattr(mod, "check_method_args"):
                mod.check_method_args(args)
            utils.check_args(args, world_size)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.environ.pop("WORLD_SIZE") if old is None else os.environ.__setitem__("WORLD_SIZE", old)
    return code, err.getvalue().strip().splitlines()
