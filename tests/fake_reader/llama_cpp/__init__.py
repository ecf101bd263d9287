"""A stand-in for llama-cpp-python that fails the way a native build can (tests only; put its folder on PYTHONPATH).

QLORA_FAKE_READER picks the failure: `segv` (the process kills itself with SIGSEGV, as an AMX build does on a CPU
whose OS did not grant tile state), `hang` (never returns), `importerror` (the shared library cannot be loaded).
"""

import os
import signal
import time

_MODE = os.environ.get("QLORA_FAKE_READER", "segv")
if _MODE == "importerror":
    raise ImportError("libllama.so: cannot open shared object file (stand-in)")

__version__ = "0.0.0-stand-in"


class Llama:
    def __init__(self, *args: object, **kwargs: object) -> None:
        if _MODE == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if _MODE == "hang":
            time.sleep(3600)
        raise RuntimeError(f"unknown QLORA_FAKE_READER mode {_MODE!r}")
