"""Model definitions (one module per architecture, each exposing the ``Architecture`` record that
``privlora.models.registry`` lists), weight loading and LoRA adapters.

Entry points: :func:`privlora.models.loading.load_model` (base model + optional adapter) and
:func:`privlora.models.loading.resolve_base` (``"smollm2"`` or a local checkpoint directory).
"""
