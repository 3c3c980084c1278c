"""Folding passes: compute at compile time what does not depend on the inputs (fold-constants,
fold-shapes)."""
