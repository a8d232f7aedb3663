"""One module per architecture family, each exposing the ``Architecture`` record that
``privlora.models.registry`` lists."""
