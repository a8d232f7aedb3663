"""The user's machine: it holds the secret key and sees the prompt and the answer in the clear.
It runs the public segments (ONNX Runtime), encrypts each private round's input for the server
and decrypts the reply (``secure``), reaches the server over a transport (``transports``), and
offers the generation loop and its front-ends (``assistant``, ``chat``, ``gateway``). It never
imports ``privlora.server``: it rests on ``core`` and ``backends`` only."""
