"""What every role shares, torch-free: the artifact's layout, the plain data types and the wire.

The compiler writes these, the client and the server read them; nothing here imports torch,
transformers or an FHE library, so a client-only or server-only install can use all of it.
"""
