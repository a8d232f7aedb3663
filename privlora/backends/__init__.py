"""Private-round backends: one module per backend behind one small interface."""
