# IPython start-up file for the notebooks under test: block network access (see
# tests/offline/no_network.py).  Only used when IPYTHONDIR points here (make test).
import importlib.util as _util
import os as _os

_spec = _util.spec_from_file_location(
    "_book_no_network", _os.path.join(_os.path.dirname(__file__), "..", "..", "no_network.py"))
_module = _util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.install()
del _util, _os, _spec, _module
