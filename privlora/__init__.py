"""privlora: compile and serve LoRA-fine-tuned LLMs so the prompt stays encrypted and the adapter
stays on the server.

Importing the package has no side effects (no heavy imports, no I/O). The rooms say which machine
(and which secret) code lives with: ``client`` (the user's machine: the secret key and the
prompt), ``server`` (the adapter owner's: the private weights), ``core`` and ``backends`` (what
both share), ``local`` (the two paired in one process), ``compiler`` and ``models`` (the adapter
owner's build machine), ``tools`` and ``cli``.
"""

__version__ = "0.1.0"
