"""privlora: compile and serve LoRA-fine-tuned LLMs so the prompt stays encrypted and the adapter
stays on the server.

Importing the package has no side effects (no heavy imports, no I/O); the work lives in the
subpackages: ``compiler``, ``passes``, ``runtime`` and ``models``.
"""

__version__ = "0.1.0"
