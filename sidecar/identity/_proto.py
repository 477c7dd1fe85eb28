"""The SPIFFE Workload API message classes, without importing the `spiffe` package (nor grpcio).
Owns only the import trick: the generated code stays in the installed `spiffe` wheel.

`from spiffe._proto import workload_pb2` first runs `spiffe/__init__.py`, which pulls pyasn1, pem and
pyOpenSSL (~4-6 MB of RSS the sidecar never uses). The generated `workload_pb2.py` itself needs only
`google.protobuf`, so it is executed from the wheel's file under a private module name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PRIVATE_NAME = "outrider.sidecar.identity._workload_pb2"


def _load_workload_pb2() -> ModuleType:
    # Reuse the package's own module when something in this process already imported it (tests,
    # dev tools): one set of classes, and the descriptor pool sees the file once either way.
    loaded = sys.modules.get("spiffe._proto.workload_pb2") or sys.modules.get(_PRIVATE_NAME)
    if loaded is not None:
        return loaded
    # find_spec of a top-level package locates it without executing its __init__.
    package = importlib.util.find_spec("spiffe")
    if package is None or not package.submodule_search_locations:
        raise ImportError("the spiffe package (Workload API stubs) is not installed")
    path = Path(next(iter(package.submodule_search_locations))) / "_proto" / "workload_pb2.py"
    spec = importlib.util.spec_from_file_location(_PRIVATE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the Workload API stubs from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PRIVATE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_PRIVATE_NAME]
        raise
    return module


workload_pb2 = _load_workload_pb2()
