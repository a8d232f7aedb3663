"""Compiler passes, one module per pass: each a function over a GraphModule, declared with
``compiler_pass`` together with the analyses it requires and provides."""
