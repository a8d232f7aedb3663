"""Compiler passes, one module per pass, each a pure function over a GraphModule."""
