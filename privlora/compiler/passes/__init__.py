"""The compiler's passes, one module each, run in order by ``compiler/pipeline.py``: each declares
what it requires and ensures (``compiler_pass``) over the IR of ``compiler/ir.py``."""
