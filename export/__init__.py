"""Export a trained classifier to ONNX with its metadata, and check parity with torch.

`tailwise.export` is both this package and the API function `tailwise.export(run, out, ...)` (the package is
callable), since importing a subpackage sets its name on the parent package. Importing it imports no torch.
"""

import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    def __call__(self, run, out, **options):
        from tailwise._api import export

        return export(run, out, **options)

    __call__.__doc__ = "`tailwise export`: see tailwise._api.export (returns the model folder)."


_sys.modules[__name__].__class__ = _CallablePackage
