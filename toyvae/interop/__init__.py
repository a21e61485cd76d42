"""Models fitted by other libraries, as toyvae models: :func:`toyvae.interop.sklearn.from_sklearn`.

Each submodule imports its library only when called, so ``import toyvae.interop`` needs none.
"""

from toyvae.interop.sklearn import from_sklearn

__all__ = ["from_sklearn"]
