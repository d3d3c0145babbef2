"""Orchestration: :func:`convert` and :func:`audit` run the stages of the other subpackages in order.

They live here rather than at the top level so that ``import sepify`` stays
cheap (the package exposes them lazily) and ``sepify.convert`` is always the
function, never a module.
"""
