"""Compiler: torch.fx frontend, IR, pass manager, lowering and the compiled artifact."""
